"""Graph surgery: replace each decomposed ``Conv`` by its two-conv form (onnx-graphsurgeon).

For a separable result the regular conv ``X → Conv(W, b) → Y`` becomes

    X → Conv(group=C_in, C_in·r outputs, same kernel/strides/pads/dilations/auto_pad) → T
      → Conv(1×1, bias b̂) → Y

and for a channel decomposition ``X → Conv(kh×kw, d' outputs) → T → Conv(1×1, bias b̂) → Y``.
The second conv writes the original output name ``Y``, so nothing downstream changes. New
names derive from the original node's name (``<name>/depthwise``, ``<name>/pointwise``,
``<name>/depthwise.weight`` …) and get a numeric suffix if they would collide. The new nodes
take the old node's place in the node list; every other node, tensor, input, output, the opset
and the model metadata are kept. Weights that only the rewritten convs used (initializers, or
``Constant``/``Identity``/``Cast`` producers) are dropped. The input model is never mutated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from . import modelio
from .candidates import ConvLayer
from .solve import ChannelFactors, SeparableFactors


@dataclass(frozen=True)
class Replacement:
    """A conv and the factors that replace it."""

    layer: ConvLayer
    factors: SeparableFactors | ChannelFactors


@dataclass(frozen=True)
class NewConv:
    """One Conv node to insert, described independently of any graph library."""

    name: str
    input: str
    output: str
    weight_name: str
    weight: np.ndarray
    bias_name: str | None
    bias: np.ndarray | None
    attrs: dict


class NameAllocator:
    """Hands out names that collide neither with the graph's names nor with each other."""

    def __init__(self, taken: set[str]):
        self._taken = set(taken)

    def __call__(self, wanted: str) -> str:
        name, i = wanted, 1
        while name in self._taken:
            name = f"{wanted}_{i}"
            i += 1
        self._taken.add(name)
        return name

    @classmethod
    def for_model(cls, model: onnx.ModelProto) -> "NameAllocator":
        g = model.graph
        taken = {n.name for n in g.node} | {t.name for t in g.initializer}
        taken |= {v.name for v in list(g.input) + list(g.output) + list(g.value_info)}
        for n in g.node:
            taken.update(n.input)
            taken.update(n.output)
        return cls(taken)


def _spatial_attrs(layer: ConvLayer) -> dict:
    attrs = {"kernel_shape": list(layer.kernel), "strides": list(layer.strides),
             "dilations": list(layer.dilations)}
    if layer.auto_pad not in ("", "NOTSET"):
        attrs["auto_pad"] = layer.auto_pad
    else:
        attrs["pads"] = list(layer.pads)
    return attrs


def replacement_convs(rep: Replacement, names: NameAllocator) -> tuple[NewConv, NewConv]:
    """The two Conv nodes that replace ``rep.layer``."""
    layer, f = rep.layer, rep.factors
    base = layer.name if not layer.name.startswith("Conv@") else layer.output
    if isinstance(f, SeparableFactors):
        first_kind, second_kind = "depthwise", "pointwise"
        first_w, group = f.depthwise, layer.weight.shape[1]
        second_w = f.pointwise
    else:
        first_kind, second_kind = "lowrank", "lowrank_pointwise"
        first_w, group = f.first, 1
        second_w = f.second
    mid = names(f"{base}/{first_kind}_output")
    first = NewConv(
        name=names(f"{base}/{first_kind}"), input=layer.input, output=mid,
        weight_name=names(f"{base}/{first_kind}.weight"), weight=np.ascontiguousarray(first_w),
        bias_name=None, bias=None, attrs={**_spatial_attrs(layer), "group": group},
    )
    second = NewConv(
        name=names(f"{base}/{second_kind}"), input=mid, output=layer.output,
        weight_name=names(f"{base}/{second_kind}.weight"),
        weight=np.ascontiguousarray(second_w.reshape(*second_w.shape, 1, 1)),
        bias_name=names(f"{base}/{second_kind}.bias"), bias=f.bias,
        attrs={"kernel_shape": [1, 1], "strides": [1, 1], "dilations": [1, 1], "pads": [0, 0, 0, 0],
               "group": 1},
    )
    return first, second


def to_onnx_nodes(convs) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Plain ``NodeProto``/``TensorProto`` form of :class:`NewConv` s (for in-memory segments)."""
    nodes, inits = [], []
    for c in convs:
        inputs = [c.input, c.weight_name] + ([c.bias_name] if c.bias_name else [])
        nodes.append(helper.make_node("Conv", inputs, [c.output], name=c.name, **c.attrs))
        inits.append(numpy_helper.from_array(c.weight, c.weight_name))
        if c.bias_name:
            inits.append(numpy_helper.from_array(c.bias, c.bias_name))
    return nodes, inits


def drop_orphan_producers(tensor: gs.Tensor, graph: gs.Graph, graph_outputs: set[str]) -> None:
    """Remove Constant/Identity/Cast chains that only fed a removed conv's weight or bias."""
    if not isinstance(tensor, gs.Variable) or tensor.outputs or tensor.name in graph_outputs:
        return
    if len(tensor.inputs) != 1:
        return
    producer = tensor.inputs[0]
    if producer.op not in ("Constant", "Identity", "Cast") or len(producer.outputs) != 1:
        return
    upstream = list(producer.inputs)
    producer.inputs.clear()
    producer.outputs.clear()
    graph.nodes.remove(producer)
    for t in upstream:
        drop_orphan_producers(t, graph, graph_outputs)


def apply_replacements(model: onnx.ModelProto, replacements: list[Replacement]) -> onnx.ModelProto:
    """A new model in which every replacement's conv is split into two convs (see module doc)."""
    model, stash = modelio.without_large_data(model)
    graph = gs.import_onnx(model)
    names = NameAllocator.for_model(model)
    graph_outputs = {o.name for o in model.graph.output}
    for rep in replacements:
        # Locate by output name: tensor names are unique, node positions may differ after import.
        index = next(i for i, node in enumerate(graph.nodes)
                     if node.op == "Conv" and node.outputs and node.outputs[0].name == rep.layer.output)
        old = graph.nodes[index]
        x, y = old.inputs[0], old.outputs[0]
        old_params = list(old.inputs[1:])
        dtype = rep.layer.weight.dtype
        new_nodes = []
        tensors = {x.name: x, y.name: y}
        for conv in replacement_convs(rep, names):
            if conv.output not in tensors:
                tensors[conv.output] = gs.Variable(conv.output, dtype=dtype)
            inputs = [tensors[conv.input], gs.Constant(conv.weight_name, conv.weight)]
            if conv.bias_name:
                inputs.append(gs.Constant(conv.bias_name, conv.bias))
            new_nodes.append(gs.Node("Conv", name=conv.name, attrs=conv.attrs, inputs=inputs,
                                     outputs=[tensors[conv.output]]))
        old.inputs.clear()
        old.outputs.clear()
        graph.nodes[index:index + 1] = new_nodes
        for t in old_params:
            drop_orphan_producers(t, graph, graph_outputs)

    return modelio.restore_large_data(export_like(graph, model), stash)


def export_like(graph: gs.Graph, model: onnx.ModelProto, replaced: set[str] = frozenset()) -> onnx.ModelProto:
    """Export ``graph`` (edited from ``model``) with ``model``'s metadata and initializer order.

    gs re-exports only referenced initializers, in traversal order. The original protos are
    restored in their original order (byte-identical data), except those named in
    ``replaced`` (their values were changed under the same name: the exported proto is used);
    initializers nothing reads any more are dropped; new ones are appended.
    """
    out = gs.export_onnx(graph, do_type_check=False, opset_imports=list(model.opset_import))
    out.ir_version = model.ir_version
    out.producer_name = model.producer_name
    out.producer_version = model.producer_version
    out.domain = model.domain
    out.model_version = model.model_version
    out.doc_string = model.doc_string
    del out.metadata_props[:]
    out.metadata_props.extend(model.metadata_props)
    exported = {t.name: t for t in out.graph.initializer}
    used_before, used_after = referenced_names(model.graph), referenced_names(out.graph)
    original = {t.name for t in model.graph.initializer}
    kept = []
    for t in model.graph.initializer:
        if t.name in replaced:
            if t.name in exported:
                kept.append(exported[t.name])
        elif t.name in used_after or t.name not in used_before:
            kept.append(t)
    added = [t for t in out.graph.initializer if t.name not in original]
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept + added)
    return out


def referenced_names(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name a node of ``graph`` or of its subgraphs reads, plus the graph outputs."""
    names = {o.name for o in graph.output}
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                names |= referenced_names(sub)
    return names
