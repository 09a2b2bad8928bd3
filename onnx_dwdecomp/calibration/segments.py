"""The graph cut just before every calibrated conv into segments, each a standalone in-memory
model; which cut tensors are static, shape-derived (kept per batch) or per sample (package
docstring, onnx_dwdecomp.calibration), and which have no sample axis at all (``sample_free``).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper

from ..errors import CalibrationError
from ..graph import node_reads, subgraph_reads
from ..shapes import TensorInfo


@dataclass(frozen=True)
class Segment:
    """Nodes ``[start, stop)`` of the graph, with the cut tensors they read and write.

    ``static_nodes`` are earlier nodes whose outputs do not depend on any graph input
    (``Constant`` weights as Paddle2ONNX writes them, casts of initializers): the segment
    model recomputes them instead of storing them per sample as cut tensors. ``per_batch``
    are the shape-derived ``outputs``, kept per batch whatever their shape (module docstring).
    """

    start: int
    stop: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    static_nodes: tuple[int, ...] = ()
    per_batch: tuple[str, ...] = ()


#: Ops whose output differs between runs even without inputs: never treated as static.
_RANDOM_OPS = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


def static_producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name → index of the node producing it, for outputs computable without graph inputs."""
    known = {t.name for t in graph.initializer}
    producers: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if node.op_type not in _RANDOM_OPS and node_reads(node) <= known:
            for out in node.output:
                if out:
                    known.add(out)
                    producers[out] = index
    return producers


#: Inputs (by position) an op reads only the metadata of, its shape or element type, never its values.
_METADATA_INPUTS = {"Shape": (0,), "Size": (0,), "EyeLike": (0,), "CastLike": (1,)}


def shape_derived(graph: onnx.GraphProto) -> set[str]:
    """Node outputs that graph inputs reach only through metadata reads (see the module docstring).

    One pass in graph order: a node's outputs depend on the data when it reads a data-dependent
    tensor's values (subgraphs' outer-scope reads count as value reads) or is random; otherwise,
    unless static, they are shape-derived.
    """
    data = {i.name for i in graph.input} - {t.name for t in graph.initializer}
    static = set(static_producers(graph))
    derived: set[str] = set()
    for node in graph.node:
        outputs = {o for o in node.output if o}
        if outputs <= static:
            continue
        metadata = _METADATA_INPUTS.get(node.op_type, ())
        values = {name for pos, name in enumerate(node.input) if name and pos not in metadata}
        if node.op_type in _RANDOM_OPS or (values | subgraph_reads(node)) & data:
            data |= outputs
        else:
            derived |= outputs
    return derived


def sample_free(graph: onnx.GraphProto, unbatched: frozenset[str]) -> set[str]:
    """Tensors computed from the graph inputs without a sample axis (``unbatched``) and constants
    only: one value for every sample, whatever their first dimension."""
    free = set(unbatched)
    constants = {t.name for t in graph.initializer}
    for node in graph.node:
        reads = {name for name in node.input if name and name not in constants}
        if reads and reads <= free:
            free.update(o for o in node.output if o)
    return free


def _static_closure(names: set[str], graph: onnx.GraphProto, producers: dict[str, int]) -> set[int]:
    """Indices of the static nodes needed to compute ``names``."""
    needed: set[int] = set()
    todo = [producers[n] for n in names if n in producers]
    while todo:
        index = todo.pop()
        if index not in needed:
            needed.add(index)
            todo.extend(producers[r] for r in node_reads(graph.node[index]) if r in producers)
    return needed


def plan_segments(model: onnx.ModelProto, cuts: list[int], tail: bool = False) -> list[Segment]:
    """Segments between successive cut positions (node indices; a cut sits before its node);
    with ``tail``, one more from the last cut to the end of the graph, whose outputs are the
    graph outputs it computes (the sensitivity probes run the network on from each cut, and
    the tensors that part reads must stay in the store until the last probe).

    The first input of a node at a cut (a decomposed conv's input) is never ``per_batch``.
    """
    spans = _Spans(model, cuts)
    stops = list(cuts) + ([len(model.graph.node)] if tail and cuts else [])
    return [spans.segment(start, stop) for start, stop in zip([0] + stops[:-1], stops)]


def suffix_segment(model: onnx.ModelProto, start: int) -> Segment:
    """Nodes ``[start, end)`` of the graph as one segment: the cut tensors it reads (computed
    before ``start``) and the graph outputs it computes."""
    return _Spans(model, [start]).segment(start, len(model.graph.node))


class _Spans:
    """What every segment of one graph is cut from: static producers, shape-derived tensors,
    each tensor's last reader (graph outputs: read "after" the last node)."""

    def __init__(self, model: onnx.ModelProto, cuts: list[int]):
        graph = self.graph = model.graph
        self.producers = static_producers(graph)
        self.per_batch = shape_derived(graph) - {graph.node[stop].input[0] for stop in cuts}
        self.constants = {t.name for t in graph.initializer} | set(self.producers)
        self.last_use: dict[str, int] = {}
        for index, node in enumerate(graph.node):
            for name in node_reads(node):
                self.last_use[name] = index
        for out in graph.output:
            self.last_use[out.name] = len(graph.node)

    def segment(self, start: int, stop: int) -> Segment:
        nodes = self.graph.node[start:stop]
        produced = {o for n in nodes for o in n.output if o}
        reads = set().union(*(node_reads(n) for n in nodes)) if nodes else set()
        inputs = sorted(r for r in reads if r not in produced and r not in self.constants)
        outputs = sorted(p for p in produced if self.last_use.get(p, -1) >= stop and p not in self.producers)
        static = _static_closure({r for r in reads if r not in produced}, self.graph, self.producers)
        return Segment(start, stop, tuple(inputs), tuple(outputs), tuple(sorted(static)),
                       tuple(o for o in outputs if o in self.per_batch))


def segment_model(model: onnx.ModelProto, seg: Segment, infos: dict[str, TensorInfo],
                  replace: tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None = None) -> onnx.ModelProto:
    """A standalone model of ``seg``; ``replace`` substitutes the segment's first node."""
    nodes = list(model.graph.node[seg.start:seg.stop])
    extra_inits: list[onnx.TensorProto] = []
    if replace is not None:
        new_nodes, extra_inits = replace
        nodes = new_nodes + nodes[1:]
    nodes = [model.graph.node[i] for i in seg.static_nodes] + nodes
    reads = set().union(*(node_reads(n) for n in nodes))
    inits = [t for t in model.graph.initializer if t.name in reads] + extra_inits

    def value_info(name: str) -> onnx.ValueInfoProto:
        info = infos.get(name)
        if info is None or info.dtype is None:
            raise CalibrationError(f"cannot determine the type of tensor {name!r} (shape inference "
                                   f"gave nothing); calibration needs typed intermediate tensors")
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(info.dtype), None)

    graph = helper.make_graph(nodes, f"segment_{seg.start}_{seg.stop}",
                              [value_info(n) for n in seg.inputs], [value_info(n) for n in seg.outputs],
                              initializer=inits)
    seg_model = helper.make_model(graph, opset_imports=list(model.opset_import))
    seg_model.ir_version = model.ir_version
    seg_model.functions.extend(model.functions)
    return seg_model
