"""Run an ONNX graph in torch, node by node, and write trained weights back into the ONNX.

:func:`onnx_to_torch` is an interpreter for the ops of this project's exports (the MNIST
ShuffleNet V2 models of ``tools/train.py`` and what ``onnx_dwdecomp.decompose`` makes of them):
the returned module's forward runs the graph's nodes in order with torch functions, so it is
differentiable and can be fine-tuned. :func:`trainable_initializers` names its parameters and
:func:`replace_initializers` puts trained values back into the same graph, so the fine-tuned
model is the original ONNX with new weights. (onnx2torch was not used: it imports torchvision,
which does not import beside the CPU build of torch used here.)

torch is imported inside :func:`onnx_to_torch` only, so the ONNX helpers work without it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def trainable_initializers(model: onnx.ModelProto) -> list[str]:
    """Float initializers read as weight or bias by Conv / Gemm / MatMul nodes, in graph order."""
    floats = {t.name for t in model.graph.initializer
              if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm", "MatMul"):
            for name in node.input[1:]:
                if name in floats and name not in names:
                    names.append(name)
    return names


def replace_initializers(model: onnx.ModelProto, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` whose named initializers hold ``arrays`` (same shapes, dtype kept).

    Raises
    ------
    KeyError
        A name is not an initializer of the model.
    ValueError
        An array's shape differs from the initializer's.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    index = {t.name: i for i, t in enumerate(out.graph.initializer)}
    for name, value in arrays.items():
        if name not in index:
            raise KeyError(f"{name!r} is not an initializer of the model")
        old = out.graph.initializer[index[name]]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(old.dims):
            raise ValueError(f"{name!r}: shape {tuple(value.shape)} differs from the model's {tuple(old.dims)}")
        dtype = helper.tensor_dtype_to_np_dtype(old.data_type)
        out.graph.initializer[index[name]].CopyFrom(numpy_helper.from_array(value.astype(dtype), name))
    return out


def onnx_to_torch(model: onnx.ModelProto):
    """A torch ``nn.Module`` that runs ``model``'s graph node by node (the ops of our exports).

    Float initializers read as Conv/Gemm weights or biases become parameters (names in
    ``module.param_names``, order of :func:`trainable_initializers`); everything else is a
    constant. Supported: Conv, Relu, MaxPool, Concat, Split, Slice, Shape, Gather, Unsqueeze,
    Squeeze, Reshape, Transpose, Cast, Div, Mul, Add, Sub, ReduceMean, GlobalAveragePool,
    Flatten, Gemm, MatMul, Identity, Constant. One input, first output returned.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    graph = model.graph
    if len(graph.input) - len({t.name for t in graph.initializer} & {i.name for i in graph.input}) != 1:
        raise ValueError("onnx_to_torch handles single-input models only")
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    trainable = trainable_initializers(model)
    dtypes = {onnx.TensorProto.FLOAT: torch.float32, onnx.TensorProto.DOUBLE: torch.float64,
              onnx.TensorProto.INT64: torch.int64, onnx.TensorProto.INT32: torch.int32,
              onnx.TensorProto.BOOL: torch.bool}

    def ints(t) -> list[int]:
        return [int(v) for v in (t.tolist() if hasattr(t, "tolist") else t)] if t is not None else []

    def conv(a, x, w, b=None):
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError("auto_pad Conv not supported")
        t, l, bo, r = a.get("pads", [0, 0, 0, 0])
        if (t, l) != (bo, r):
            x, t, l = F.pad(x, (l, r, t, bo)), 0, 0
        return F.conv2d(x, w, b, stride=a.get("strides", [1, 1]), padding=(t, l),
                        dilation=a.get("dilations", [1, 1]), groups=a.get("group", 1))

    def maxpool(a, x):
        t, l, bo, r = a.get("pads", [0, 0, 0, 0])
        if (t, l) != (bo, r):
            raise ValueError("asymmetric MaxPool pads not supported")
        return F.max_pool2d(x, a["kernel_shape"], a.get("strides", [1, 1]), (t, l),
                            a.get("dilations", [1, 1]), ceil_mode=bool(a.get("ceil_mode", 0)))

    def gather(a, data, idx):
        axis = a.get("axis", 0) % data.dim()
        idx = torch.where(idx < 0, idx + data.shape[axis], idx)
        out = torch.index_select(data, axis, idx.reshape(-1))
        return out.reshape(tuple(data.shape[:axis]) + tuple(idx.shape) + tuple(data.shape[axis + 1:]))

    def unsqueeze(a, x, axes=None):
        axes = ints(axes) if axes is not None else a["axes"]
        rank = x.dim() + len(axes)
        for ax in sorted(v % rank for v in axes):
            x = x.unsqueeze(ax)
        return x

    def squeeze(a, x, axes=None):
        axes = ints(axes) if axes is not None else a.get("axes")
        if not axes:
            return x.squeeze()
        for ax in sorted((v % x.dim() for v in axes), reverse=True):
            x = x.squeeze(ax)
        return x

    def reshape(a, x, shape):
        dims = ints(shape)
        if not a.get("allowzero", 0):
            dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
        return x.reshape(dims)

    def slice_(a, x, starts, ends, axes=None, steps=None):
        starts, ends = ints(starts), ints(ends)
        axes = ints(axes) if axes is not None else list(range(len(starts)))
        steps = ints(steps) if steps is not None else [1] * len(starts)
        index = [slice(None)] * x.dim()
        for s, e, ax, st in zip(starts, ends, axes, steps):
            if st != 1:
                raise ValueError("Slice with step != 1 not supported")
            n = x.shape[ax]
            index[ax] = slice(max(min(s, n), -n), max(min(e, n), -n - 1) if e < 0 else min(e, n))
        return x[tuple(index)]

    def split(a, x, sizes=None):
        axis = a.get("axis", 0)
        if sizes is not None:
            return tuple(torch.split(x, ints(sizes), dim=axis))
        if "split" in a:
            return tuple(torch.split(x, list(a["split"]), dim=axis))
        k = a.get("num_outputs")
        return tuple(torch.chunk(x, k, dim=axis))

    def div(a, x, y):
        if not x.is_floating_point() and not y.is_floating_point():
            return torch.div(x, y, rounding_mode="trunc")
        return x / y

    def reduce_mean(a, x, axes=None):
        axes = ints(axes) if axes is not None else a.get("axes")
        keep = bool(a.get("keepdims", 1))
        return x.mean(dim=tuple(axes), keepdim=keep) if axes else x.mean()

    def gemm(a, x, w, c=None):
        if a.get("transA", 0):
            x = x.t()
        if a.get("transB", 0):
            w = w.t()
        y = a.get("alpha", 1.0) * (x @ w)
        return y if c is None else y + a.get("beta", 1.0) * c

    def shape(a, x):
        dims = list(x.shape)
        start, end = a.get("start", 0), a.get("end", len(dims))
        return torch.tensor(dims[start:end], dtype=torch.int64)

    def flatten(a, x):
        axis = a.get("axis", 1)
        lead = int(np.prod(x.shape[:axis])) if axis else 1
        return x.reshape(lead, -1)

    ops = {
        "Conv": conv, "MaxPool": maxpool, "Gather": gather, "Unsqueeze": unsqueeze, "Squeeze": squeeze,
        "Reshape": reshape, "Slice": slice_, "Split": split, "Div": div, "ReduceMean": reduce_mean,
        "Gemm": gemm, "Shape": shape, "Flatten": flatten,
        "Relu": lambda a, x: F.relu(x),
        "Concat": lambda a, *xs: torch.cat(xs, dim=a["axis"]),
        "Transpose": lambda a, x: x.permute(*a["perm"]) if "perm" in a else x.permute(*reversed(range(x.dim()))),
        "Cast": lambda a, x: x.to(dtypes[a["to"]]),
        "Mul": lambda a, x, y: x * y, "Add": lambda a, x, y: x + y, "Sub": lambda a, x, y: x - y,
        "MatMul": lambda a, x, y: x @ y, "Identity": lambda a, x: x,
        "GlobalAveragePool": lambda a, x: x.mean(dim=(2, 3), keepdim=True),
    }
    unknown = sorted({n.op_type for n in graph.node} - set(ops) - {"Constant"})
    if unknown:
        raise ValueError(f"onnx_to_torch: unsupported op(s) {unknown}")

    class OnnxModule(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.param_names = list(trainable)
            self.weights = nn.ParameterList(
                [nn.Parameter(torch.from_numpy(np.array(inits[n], copy=True))) for n in trainable])
            self.constants = {n: torch.from_numpy(np.array(v, copy=True)) for n, v in inits.items()
                              if n not in trainable}
            self.steps = []
            for node in graph.node:
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                if node.op_type == "Constant":
                    if "value" not in attrs:
                        raise ValueError(f"Constant {node.name!r}: only 'value' is supported")
                    self.constants[node.output[0]] = torch.from_numpy(
                        np.array(numpy_helper.to_array(attrs["value"]), copy=True))
                    continue
                self.steps.append((ops[node.op_type], attrs, list(node.input), list(node.output)))
            self.input_name = next(i.name for i in graph.input if i.name not in inits)
            self.output_name = graph.output[0].name

        def forward(self, x):
            env = dict(self.constants)
            env.update(zip(self.param_names, self.weights))
            env[self.input_name] = x
            for fn, attrs, inputs, outputs in self.steps:
                result = fn(attrs, *[env[i] if i else None for i in inputs])
                if len(outputs) == 1:
                    env[outputs[0]] = result
                else:
                    env.update(zip(outputs, result))
            return env[self.output_name]

        def state_arrays(self) -> dict[str, np.ndarray]:
            return {n: p.detach().cpu().numpy() for n, p in zip(self.param_names, self.weights)}

    return OnnxModule()

