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
with the reason it was left alone. Nothing here modifies the model.
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
    for index, node in enumerate(graph.node):
        if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
            continue
        name = label(node)
        conv_names.append(name)
        layer = _classify(node, index, name, constants, channels)
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


def _static_channels(model: onnx.ModelProto) -> dict[str, int]:
    """Channel count (dim 1) of every tensor whose channel dim is known statically.

    From the declared types and a lenient shape inference on a copy (its failures are ignored
    here: this only feeds a consistency check).
    """
    from .modelio import metadata_copy

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
