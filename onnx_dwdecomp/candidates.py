"""Which ``Conv`` nodes can be decomposed, and why the others are skipped. Read-only.

A ``Conv`` of the main graph is a *candidate* when

- its kernel is 2-D with ``kh·kw > 1`` (a 1×1 conv is already pointwise),
- ``group == 1`` (depthwise and grouped convs are skipped),
- its weight (and bias) are constants: an initializer, a ``Constant`` node, or either of those
  behind ``Identity``/``Cast`` nodes, as some exporters write them,
- its weight is floating point, and its weight and bias are finite (a NaN/Inf weight would
  break the solvers; such a conv is left as it is, with the reason), and
- it matches ``--include`` (if given) and no ``--exclude`` glob (matched against node names).

Every other ``Conv`` — including those inside ``If``/``Loop``/``Scan`` subgraphs — is reported
with the reason it was left alone, and so is every other convolution operator of the main graph:
``ConvTranspose`` (not decomposed), ``QLinearConv``/``ConvInteger`` (a quantized model in the
QOperator format). A ``Conv`` whose weight comes from ``DequantizeLinear`` (the QDQ format) is
reported as quantized: decompose the float model, then quantize the result.
:func:`candidate_notes` says in one line when a model has no float ``Conv`` to work on. Nothing
here modifies the model.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .errors import ModelError, OptionError, Refused, refuse
from .graph import label, subgraphs
from .modelio import metadata_copy


@dataclass(frozen=True)
class ConvLayer:
    """A decomposable regular conv, with everything the later stages need."""

    name: str  # display name: the node name, or a stand-in derived from its output tensor
    node_index: int  # position in model.graph.node
    input: str
    output: str
    weight: np.ndarray  # (n, c, kh, kw)
    bias: np.ndarray | None  # (n,)
    strides: tuple[int, int]
    pads: tuple[int, int, int, int]  # (top, left, bottom, right), ONNX order is (t, l, b, r)
    dilations: tuple[int, int]
    auto_pad: str

    @property
    def kernel(self) -> tuple[int, int]:
        return tuple(self.weight.shape[2:])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)


@dataclass(frozen=True)
class Candidates:
    layers: tuple[ConvLayer, ...]
    skipped: tuple[Refused, ...]


def conv_kinds(model: onnx.ModelProto) -> Counter:
    """Count the main graph's convs by kind: ``pointwise`` (1×1), ``depthwise`` (one input
    channel per group), ``regular`` (group 1) or ``grouped``. Weight shapes come from
    initializers or ``Constant`` nodes (dims only, so external data need not be loaded)."""
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    kinds: Counter = Counter()
    for node in model.graph.node:
        if node.op_type != "Conv":
            continue
        w = shapes[node.input[1]]
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if w[2:] == (1, 1):
            kinds["pointwise"] += 1
        elif group > 1 and w[1] == 1:
            kinds["depthwise"] += 1
        else:
            kinds["regular" if group == 1 else "grouped"] += 1
    return kinds


def constant_values(graph: onnx.GraphProto, ir_version: int | None = None) -> dict[str, np.ndarray]:
    """Values of every tensor of ``graph`` that is known before run time.

    Initializers, ``Constant`` nodes (``value`` and the ``value_float(s)``/``value_int(s)``
    forms), and ``Identity``/``Cast`` of those. Tensors still marked external are stubs
    (see :func:`~onnx_dwdecomp.modelio.without_large_data`; loaded models hold their data).

    From IR version 4 on, an initializer that is also a graph input is a default the caller
    may override at run time, so it is not a constant. Before IR 4 every initializer had to be
    listed among the graph inputs — that was how weights were stored — so with ``ir_version``
    below 4 they count as constants.
    """
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer
              if t.data_location != onnx.TensorProto.EXTERNAL}  # external here = a data-less stub
    if ir_version is None or ir_version >= 4:
        for vi in graph.input:
            values.pop(vi.name, None)
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            value = _constant_node_value(node)
            if value is not None:
                values[node.output[0]] = value
        elif node.op_type == "Identity" and node.input and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "Cast" and node.input and node.input[0] in values:
            to = next((a.i for a in node.attribute if a.name == "to"), None)
            if to is not None:
                dtype = onnx.helper.tensor_dtype_to_np_dtype(to)
                values[node.output[0]] = values[node.input[0]].astype(dtype)
    return values


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name == "value_float":
            return np.array(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.array(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.array(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.array(list(attr.ints), dtype=np.int64)
    return None


_ATTR_TYPES = {"int": onnx.AttributeProto.INT, "ints": onnx.AttributeProto.INTS,
               "str": onnx.AttributeProto.STRING}
_ATTR_NAMES = set(onnx.AttributeProto.AttributeType.values())


def _attr(node: onnx.NodeProto, name: str, default, kind: str | None = None):
    """Attribute ``name`` of ``node`` (``default`` if absent); with ``kind`` ("int", "ints",
    "str") an attribute of another type is a :class:`ModelError`, not a crash later."""
    for a in node.attribute:
        if a.name == name:
            if kind is not None and a.type != _ATTR_TYPES[kind]:
                got = onnx.AttributeProto.AttributeType.Name(a.type) if a.type in _ATTR_NAMES else a.type
                raise ModelError(f"{node.op_type} {node.name or '(unnamed)'!r}: attribute {name!r} has type "
                                 f"{got}, expected {kind.upper()}")
            value = onnx.helper.get_attribute_value(a)
            if isinstance(value, bytes):
                try:
                    return value.decode()
                except UnicodeDecodeError:
                    raise ModelError(f"{node.op_type} {node.name!r}: attribute {name!r} is not valid text") from None
            return value
    return default


def _subgraph_convs(graph: onnx.GraphProto):
    """``(conv, where)`` for every Conv inside a subgraph of ``graph``, at any depth (``where``
    names the node that holds it)."""
    for node in graph.node:
        for sub in subgraphs(node):
            for inner in sub.node:
                if inner.op_type == "Conv":
                    yield inner, f"inside the {node.op_type} subgraph of {label(node)!r}"
            yield from _subgraph_convs(sub)


def find_candidates(model: onnx.ModelProto, include: tuple[str, ...] = (),
                    exclude: tuple[str, ...] = ()) -> Candidates:
    """Classify every ``Conv`` node of ``model`` (see module docstring).

    Raises
    ------
    OptionError
        An ``include`` pattern matches no Conv node.
    ModelError
        A Conv's weight shape contradicts its attributes (kernel_shape, group).
    """
    graph = model.graph
    constants = constant_values(graph, model.ir_version)
    channels = _static_channels(model)
    layers: list[ConvLayer] = []
    skipped: list[Refused] = []
    conv_names: list[str] = []
    producers = {out: node for node in graph.node for out in node.output}
    for index, node in enumerate(graph.node):
        if node.op_type in OTHER_CONVS and node.domain in ("", "ai.onnx", "com.microsoft"):
            skipped.append(Refused(label(node), OTHER_CONVS[node.op_type]))
            continue
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = label(node)
        conv_names.append(name)
        dq = _dequantized(node, producers)
        layer = (refuse(f"quantized (QDQ): weight {node.input[1]!r} comes from DequantizeLinear {label(dq)!r}; "
                        f"{QUANTIZED_HINT}") if dq is not None
                 else _classify(node, index, name, constants, channels))
        if isinstance(layer, ConvLayer):
            if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
                layer = refuse("not matched by --include")
            elif any(fnmatch.fnmatchcase(name, p) for p in exclude):
                layer = refuse("excluded by --exclude")
        if isinstance(layer, ConvLayer):
            layers.append(layer)
        else:
            skipped.append(layer.named(name))
    for node, where in _subgraph_convs(graph):
        skipped.append(Refused(label(node), f"{where}; subgraphs are not rewritten"))
    for pattern in include:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in conv_names):
            raise OptionError(f"--include {pattern!r} matches no Conv node; Conv nodes are named like "
                              f"{', '.join(repr(n) for n in conv_names[:3]) or '(none)'}")
    return Candidates(tuple(layers), tuple(skipped))


#: What to do with a quantized model (the reasons and the note say it).
QUANTIZED_HINT = "decompose the float model, then quantize the result (README: Quantized models)"
#: Convolution operators other than Conv, listed among the skipped convs with the reason.
OTHER_CONVS = {
    "ConvTranspose": "ConvTranspose (transposed conv): not decomposed, only Conv is",
    "QLinearConv": f"quantized conv (QLinearConv, QOperator format): {QUANTIZED_HINT}",
    "ConvInteger": f"quantized conv (ConvInteger): {QUANTIZED_HINT}",
}


def _dequantized(node: onnx.NodeProto, producers: dict[str, onnx.NodeProto]) -> onnx.NodeProto | None:
    """The DequantizeLinear node the conv's weight comes from (through Identity/Cast/Reshape/
    Transpose), or None."""
    name = node.input[1] if len(node.input) > 1 else ""
    for _ in range(8):
        producer = producers.get(name)
        if producer is None:
            return None
        if producer.op_type == "DequantizeLinear":
            return producer
        if producer.op_type not in ("Identity", "Cast", "Reshape", "Transpose") or not producer.input:
            return None
        name = producer.input[0]
    return None


def candidate_notes(model: onnx.ModelProto) -> str:
    """One line when the main graph offers no float ``Conv`` to decompose: a quantized model
    (QOperator or QDQ, with what to do instead) or a model without convs; else ``""``."""
    graph = model.graph
    ops = Counter(node.op_type for node in graph.node)
    producers = {out: node for node in graph.node for out in node.output}
    convs = [node for node in graph.node if node.op_type == "Conv" and node.domain in ("", "ai.onnx")]
    qdq = sum(1 for node in convs if _dequantized(node, producers) is not None)
    quantized = {op: ops[op] for op in ("QLinearConv", "ConvInteger") if ops[op]}
    if quantized and len(convs) == qdq:
        listing = ", ".join(f"{n} {op}" for op, n in quantized.items())
        return (f"the model is quantized (QOperator format: {listing}) and has no float Conv to decompose; "
                f"{QUANTIZED_HINT}")
    if convs and qdq == len(convs):
        return (f"the model is quantized (QDQ format: the weights of all {qdq} Conv node(s) come from "
                f"DequantizeLinear); {QUANTIZED_HINT}")
    if qdq:
        return f"{qdq} of {len(convs)} Conv node(s) have quantized (QDQ) weights and are left as they are; {QUANTIZED_HINT}"
    if not convs:
        other = ", ".join(f"{ops[op]} {op}" for op in OTHER_CONVS if ops[op])
        return "the model has no Conv node" + (f" ({other})" if other else "") + ": nothing to decompose"
    return ""


def _static_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Channel count (dim 1) of every tensor whose channel dim is known statically.

    From the declared types and a lenient shape inference on a copy (its failures are ignored
    here: this only feeds a consistency check).
    """
    try:
        inferred = onnx.shape_inference.infer_shapes(metadata_copy(model)).graph
    except Exception:  # onnx raises several unrelated types; fall back to the declared types
        inferred = model.graph
    out = {}
    for vi in list(inferred.input) + list(inferred.value_info) + list(inferred.output):
        dims = vi.type.tensor_type.shape.dim
        if len(dims) >= 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 0:
            out[vi.name] = dims[1].dim_value
    return out


def _classify(node: onnx.NodeProto, index: int, name: str, constants: dict[str, np.ndarray],
              channels: dict[str, int] | None = None) -> ConvLayer | Refused:
    """The conv as a candidate, or why it is not one; a Conv that contradicts itself is a ModelError."""
    if len(node.input) < 2 or len(node.output) < 1 or not node.output[0]:
        raise ModelError(f"Conv {name!r} has {len(node.input)} input(s) and {len(node.output)} output(s), "
                         f"expected at least 2 and 1")
    weight = constants.get(node.input[1])
    if weight is None:
        return refuse(f"weight {node.input[1]!r} is computed at run time, not a constant")
    if weight.ndim < 3:
        raise ModelError(f"Conv {name!r}: weight {node.input[1]!r} has shape {weight.shape}, "
                         f"expected (out, in/group, k...)")
    kernel = tuple(weight.shape[2:])
    declared = _attr(node, "kernel_shape", None, "ints")
    if declared is not None and tuple(declared) != kernel:
        raise ModelError(f"Conv {name!r}: kernel_shape {tuple(declared)} disagrees with weight shape "
                         f"{weight.shape}")
    group = _attr(node, "group", 1, "int")
    if group < 1 or weight.shape[0] % group:
        raise ModelError(f"Conv {name!r}: {weight.shape[0]} output channels not divisible by group {group}")
    c_in = (channels or {}).get(node.input[0])
    if c_in is not None and weight.shape[1] * group != c_in:
        raise ModelError(f"Conv {name!r}: weight shape {weight.shape} with group {group} expects "
                         f"{weight.shape[1] * group} input channels, but input {node.input[0]!r} has {c_in}")
    if len(kernel) != 2:
        return refuse(f"{len(kernel)}-D kernel {kernel}; only 2-D convs are decomposed")
    if kernel[0] * kernel[1] == 1:
        return refuse("pointwise (1×1): already the cheap form")
    if group != 1:
        if weight.shape[1] == 1:
            return refuse(f"depthwise (group={group}): already separable")
        return refuse(f"grouped conv (group={group}); only group=1 is decomposed")
    if not np.issubdtype(weight.dtype, np.floating):
        return refuse(f"weight dtype {weight.dtype} is not floating point (quantized?)")
    bias = None
    if len(node.input) > 2 and node.input[2]:
        bias = constants.get(node.input[2])
        if bias is None:
            return refuse(f"bias {node.input[2]!r} is computed at run time, not a constant")
        if bias.shape != (weight.shape[0],):
            raise ModelError(f"Conv {name!r}: bias shape {bias.shape} does not match {weight.shape[0]} "
                             f"output channels")
    for what, value in (("weight", weight), ("bias", bias)):
        if value is not None and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            bad = int(value.size - np.count_nonzero(np.isfinite(value)))
            return refuse(f"{what} holds {bad} NaN/Inf value(s); left as it is")
    pads = tuple(_attr(node, "pads", (0, 0, 0, 0), "ints"))
    if len(pads) != 4 or min(pads) < 0:
        raise ModelError(f"Conv {name!r}: pads {pads} should be 4 non-negative values for a 2-D kernel")
    strides = tuple(_attr(node, "strides", (1, 1), "ints"))
    dilations = tuple(_attr(node, "dilations", (1, 1), "ints"))
    for what, values in (("strides", strides), ("dilations", dilations)):
        if len(values) != 2 or min(values) < 1:
            raise ModelError(f"Conv {name!r}: {what} {values} should be 2 positive values for a 2-D kernel")
    auto_pad = _attr(node, "auto_pad", "NOTSET", "str")
    if auto_pad not in ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID"):
        raise ModelError(f"Conv {name!r}: auto_pad {auto_pad!r} is not one of NOTSET, SAME_UPPER, SAME_LOWER, VALID")
    layer = ConvLayer(
        name=name,
        node_index=index,
        input=node.input[0],
        output=node.output[0],
        weight=weight,
        bias=bias,
        strides=strides,
        pads=(pads[0], pads[1], pads[2], pads[3]),
        dilations=dilations,
        auto_pad=auto_pad,
    )
    return layer
