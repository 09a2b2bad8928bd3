"""Graph input shapes, shape inference and cost counting (MACs, parameters).

Dynamic dims are resolved once, up front: ``--input-shape NAME:D0,D1,...`` fixes them, a
dynamic batch dim defaults to 1 (with a note), any other unknown dim is an error naming the
flag. The resolved shapes drive shape inference, MAC counting and random verification inputs;
the output model keeps its original (dynamic) inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from .data.specs import InputSpec
from .errors import ModelError, OptionError, first_line
from .formatting import fmt_shape
from .memory import array_bytes, require
from .modelio import metadata_copy
from .runtime import make_session


def parse_input_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """Parse ``NAME:D0,D1,...`` (one value of ``--input-shape``); bare ``D0,D1,...`` gives the
    name ``""`` (the model's only input)."""
    name, sep, dims = text.rpartition(":")
    if sep and not name:
        raise OptionError(f"--input-shape {text!r}: expected NAME:D0,D1,... e.g. input:1,3,224,224")
    try:
        shape = tuple(int(d) for d in dims.split(","))
    except ValueError:
        raise OptionError(f"--input-shape {text!r}: expected NAME:D0,D1,... (or bare D0,D1,... for a single-input "
                          f"model) with the dims as integers, e.g. input:1,3,224,224") from None
    if any(d < 1 for d in shape):
        raise OptionError(f"--input-shape {text!r}: dims must be positive")
    if any(d >= 2**63 for d in shape):
        raise OptionError(f"--input-shape {text!r}: dims must be below 2^63 (ONNX dims are int64)")
    return name, shape


def parse_input_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    """The values of ``--input-shape`` as ``{name: dims}`` (each name once; bare dims alone)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for text in values:
        name, shape = parse_input_shape(text)
        if name in shapes:
            raise OptionError(f"--input-shape gives {name or 'bare dims'!r} twice")
        shapes[name] = shape
    if "" in shapes and len(shapes) > 1:
        raise OptionError("--input-shape: bare dims are for a single-input model; name every input "
                          "(NAME:D0,D1,...) when giving several")
    return shapes


def split_shapes(values: list[str]) -> tuple[list[str], list[str]]:
    """Split values given after ``--input-shape`` into the shapes and the positionals that
    followed them (``--input-shape x:1,3,8,8 m.onnx``): the first value that does not look like
    a shape (``NAME:...`` or digits and commas; never a ``.onnx`` file) ends the shapes."""
    def shape_like(v: str) -> bool:
        return not v.lower().endswith(".onnx") and (":" in v or all(ch.isdigit() or ch == "," for ch in v))

    k = next((i for i, v in enumerate(values) if not shape_like(v)), len(values))
    return values[:k], values[k:]


def graph_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The model's real inputs (graph inputs that are not initializers), as :class:`InputSpec`."""
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for vi in model.graph.input:
        if vi.name in initializers:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"graph input {vi.name!r} is not a tensor; only tensor inputs are supported")
        dims = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                     for d in tt.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))
        specs.append(InputSpec(vi.name, dtype, dims))
    return specs


def resolve_input_shapes(specs: list[InputSpec], overrides: dict[str, tuple[int, ...]] | None = None,
                         data_shapes: dict[str, tuple[int, ...]] | None = None,
                         ) -> tuple[dict[str, tuple[int, ...]], list[str]]:
    """Fix every dim of every input; return the shapes and notes for the user.

    Precedence: ``overrides`` (``--input-shape``), then the per-sample shape of calibration data
    (``data_shapes``, without the batch axis), then a dynamic batch dim taken as 1.
    """
    overrides = dict(overrides or {})
    known = {s.name for s in specs}
    for name in overrides:
        if name not in known:
            raise OptionError(f"--input-shape names {name!r}, but the model's inputs are {sorted(known)}")
    notes: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in overrides:
            shape = overrides[spec.name]
            if len(shape) != len(spec.shape):
                raise OptionError(f"--input-shape {spec.name}: rank {len(shape)} given, "
                                  f"the model's input has rank {len(spec.shape)} {fmt_shape(spec.shape)}")
            for axis, (want, got) in enumerate(zip(spec.shape, shape)):
                if want is not None and want != got:
                    raise OptionError(f"--input-shape {spec.name}: dim {axis} is fixed to {want} in the "
                                      f"model, got {got}")
            shapes[spec.name] = shape
            continue
        dims = list(spec.shape)
        if data_shapes and spec.name in data_shapes:
            sample = data_shapes[spec.name]
            dims[1:] = [d if d is not None else s for d, s in zip(dims[1:], sample)]
        if dims and dims[0] is None:
            dims[0] = 1
            notes.append(f"input {spec.name!r} has a dynamic batch dim; using batch 1 "
                         f"(set --input-shape to change)")
        if any(d is None for d in dims):
            raise OptionError(f"input {spec.name!r} has unknown dims {fmt_shape(spec.shape)}; fix them with "
                              f"--input-shape {spec.name}:D0,D1,...")
        shapes[spec.name] = tuple(int(d) for d in dims)
    return shapes, notes


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...] | None
    dtype: np.dtype | None


def infer_tensor_info(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    """Shape inference at fixed input shapes; returns the info of every tensor it could infer.

    Works on a copy whose graph inputs carry ``input_shapes``; tensors static inference cannot
    resolve (run-time computed shapes) are observed with one onnxruntime run. Above the 2 GiB
    protobuf limit the copy drops the data of large tensors (see :func:`modelio.metadata_copy`).
    """
    probe = metadata_copy(model)
    for vi in probe.graph.input:
        if vi.name in input_shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in input_shapes[vi.name]:
                dims.add().dim_value = d
    del probe.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(probe, data_prop=True)
    except Exception as exc:  # onnx raises several unrelated types here
        raise ModelError(f"shape inference failed: {str(exc).splitlines()[0]}") from exc
    infos: dict[str, TensorInfo] = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        shape = None
        if tt.HasField("shape") and all(d.HasField("dim_value") for d in tt.shape.dim):
            shape = tuple(d.dim_value for d in tt.shape.dim)
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)) if tt.elem_type else None
        infos[vi.name] = TensorInfo(shape, dtype)
    for init in g.initializer:
        infos[init.name] = TensorInfo(tuple(init.dims), np.dtype(helper.tensor_dtype_to_np_dtype(init.data_type)))
    missing = [o for n in model.graph.node for o in n.output
               if o and (o not in infos or infos[o].shape is None or infos[o].dtype is None)]
    if missing:
        infos.update(_observed_tensor_info(model, input_shapes, missing))
    return infos


def _observed_tensor_info(model: onnx.ModelProto, input_shapes: dict[str, tuple[int, ...]],
                          names: list[str]) -> dict[str, TensorInfo]:
    """Shapes that static inference could not find (e.g. shapes computed by Shape→Gather→Concat
    chains), observed by one onnxruntime run on zero inputs at ``input_shapes``. Only tensors get
    an entry (sequences and optionals are skipped)."""

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    known = {o.name for o in probe.graph.output}
    for name in names:
        if name not in known:
            probe.graph.output.add().name = name
    specs = graph_inputs(model)

    require(2 * sum(array_bytes(input_shapes[s.name], s.dtype) for s in specs),
                      "one onnxruntime run to observe tensor shapes at input shapes "
                      + ", ".join(f"{s.name!r} {fmt_shape(input_shapes[s.name])}" for s in specs),
                      "--input-shape NAME:D0,D1,... with smaller dims")
    feeds = {s.name: np.zeros(input_shapes[s.name], dtype=s.dtype) for s in specs}
    try:
        values = make_session(probe, optimize=False).run(names, feeds)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise ModelError(f"cannot determine tensor shapes: onnxruntime failed on the model at input shapes "
                         f"{input_shapes}: {first_line(exc)}") from exc
    # Sequence- or optional-valued outputs come back as lists / None: they have no tensor info.
    return {n: TensorInfo(tuple(v.shape), v.dtype) for n, v in zip(names, values) if isinstance(v, np.ndarray)}


def node_macs(node: onnx.NodeProto, infos: dict[str, TensorInfo]) -> int:
    """Multiply-accumulates per inference of one node (Conv, ConvTranspose, Gemm, MatMul); 0 otherwise.

    Conv: ``prod(output shape) · (C_in / group) · prod(kernel)``.
    """
    def shape(name):
        info = infos.get(name)
        return info.shape if info else None

    if node.op_type in ("Conv", "ConvTranspose"):
        w, y = shape(node.input[1]), shape(node.output[0])
        x = shape(node.input[0])
        if w is None or y is None:
            return 0
        if node.op_type == "Conv":
            return int(np.prod(y, dtype=np.int64) * np.prod(w[1:], dtype=np.int64))
        return int(np.prod(x, dtype=np.int64) * np.prod(w[1:], dtype=np.int64)) if x else 0
    if node.op_type == "Gemm":
        a, y = shape(node.input[0]), shape(node.output[0])
        if a is None or y is None:
            return 0
        trans_a = any(at.name == "transA" and at.i for at in node.attribute)
        k = a[0] if trans_a else a[1]
        return int(y[0] * y[1] * k)
    if node.op_type == "MatMul":
        a, y = shape(node.input[0]), shape(node.output[0])
        if a is None or y is None:
            return 0
        return int(np.prod(y, dtype=np.int64) * a[-1])
    return 0


@dataclass(frozen=True)
class ModelCost:
    macs: int
    params: int


def model_cost(model: onnx.ModelProto, infos: dict[str, TensorInfo]) -> ModelCost:
    """Total MACs (per inference at the resolved shapes) and parameter count of a model.

    Parameters are the elements of all initializers and ``Constant`` tensors (main graph).
    """
    macs = sum(node_macs(n, infos) for n in model.graph.node)
    params = sum(int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer)
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    params += int(np.prod(a.t.dims, dtype=np.int64))
    return ModelCost(int(macs), int(params))
