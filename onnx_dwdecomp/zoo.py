"""ShuffleNet V2 and its regular counterparts, built directly as ONNX graphs (numpy weights).

The package and its tests never depend on torch, yet they need realistic efficient CNNs to
decompose. :func:`shufflenet_v2` writes the ONNX graph an exporter would write for torchvision's
``shufflenetv2.py`` — same channel table, same unit structure, same split / shuffle pattern —
with seeded random weights. Nothing is trained: the weights are He-initialised so activations
stay O(1) through the network, which is what graph-rewriting and numerical-equivalence tests need.

Architecture (Ma et al. 2018), for ``width`` in {0.5, 1.0, 1.5, 2.0}::

    input [N, 3, S, S]
    conv1    Conv 3->24, 3x3, s2, p1 -> BN -> ReLU
    maxpool  MaxPool 3x3, s2, p1
    stage2   4 units   (first unit stride 2)   out = C2
    stage3   8 units   (first unit stride 2)   out = C3
    stage4   4 units   (first unit stride 2)   out = C4
    conv5    Conv 1x1 C4->C5 -> BN -> ReLU
    mean     ReduceMean over [2, 3] (keepdims=0), as torchvision's ``x.mean([2, 3])``
    fc       Gemm C5 -> num_classes                                 -> output [N, num_classes]

    width  C2   C3   C4   C5
    0.5    48   96   192  1024
    1.0    116  232  464  1024
    1.5    176  352  704  1024
    2.0    244  488  976  2048

A unit with ``b = out // 2`` branch channels:

* stride 1: ``Split`` the input into two halves ``x1, x2``; ``out = Concat(x1, branch2(x2))``;
* stride 2: ``out = Concat(branch1(x), branch2(x))``;

followed by the channel shuffle (groups = 2) written as ``Reshape [N, 2, out/2, h, w] ->
Transpose [0, 2, 1, 3, 4] -> Reshape [N, out, h, w]``.

The branches in each ``form`` (node names in brackets; ``reluK`` follows ``convK``/``bnK``):

* ``"standard"`` (native ShuffleNet V2):
  branch2 = 1x1 [conv1] -> BN -> ReLU [relu1] -> depthwise 3x3, stride s, group=b [conv2] -> BN
  -> 1x1 [conv3] -> BN -> ReLU [relu3];
  branch1 = depthwise 3x3, s2, group=c_in [conv1] -> BN -> 1x1 c_in->b [conv2] -> BN -> ReLU [relu2].
  One regular 3x3 conv (the stem), 19 depthwise and 36 pointwise convs.
* ``"merged"`` (regular counterpart): every ``depthwise 3x3 -> BN -> 1x1`` pair is one regular 3x3
  conv (group=1) with the pair's in/out channels and stride, then BN -> ReLU:
  branch2 = 1x1 [conv1] -> BN -> ReLU [relu1] -> 3x3 b->b [conv2] -> BN -> ReLU [relu2];
  branch1 = 3x3 c_in->b, s2 [conv1] -> BN -> ReLU [relu1].
  20 regular 3x3 convs, 0 depthwise, 17 pointwise.
* ``"depthwise_only"`` (regular counterpart): only the depthwise 3x3 becomes a regular 3x3
  (c->c, group=1, same stride); the following BN and 1x1 stay. Names as in ``"standard"``.
  20 regular 3x3 convs, 0 depthwise, 36 pointwise.

With ``fold_bn=True`` every BN is folded into the preceding conv (weight scaled, bias added), as
the legacy ``torch.onnx.export`` writes it; with ``fold_bn=False`` the convs have no bias and are
followed by real ``BatchNormalization`` nodes. The random numbers drawn do not depend on
``fold_bn``, so both variants compute the same function.

Names follow the module path: nodes ``stage2.0.branch2.conv2``, ``stage2.0.branch2.bn2``,
``stage2.0.branch2.relu1``, ``stage2.0.split``, ``stage2.0.shuffle.transpose``; initializers
``<node>.weight`` / ``<node>.bias`` (and ``<bn>.scale`` / ``.bias`` / ``.mean`` / ``.var``);
the output tensor of node ``X`` is ``X_output`` (``X_output_0`` / ``_1`` for Split).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnx_dwdecomp.errors import OptionError

__all__ = ["FORMS", "STAGE_OUT_CHANNELS", "STAGE_REPEATS", "shufflenet_v2"]

#: Output channels of conv1, stage2, stage3, stage4 and conv5, as in torchvision.
STAGE_OUT_CHANNELS: dict[float, tuple[int, int, int, int, int]] = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
#: Number of units in stage2, stage3, stage4.
STAGE_REPEATS: tuple[int, int, int] = (4, 8, 4)
#: The accepted values of ``form``.
FORMS: tuple[str, ...] = ("standard", "merged", "depthwise_only")

_MIN_OPSET, _MAX_OPSET = 11, 21
_MAX_IR_VERSION = 10  # onnxruntime 1.32 reads IR <= 10 for every opset we emit
_BN_EPS = 1e-5


def _out_size(size: int, kernel: int = 3, stride: int = 2, pad: int = 1) -> int:
    return (size + 2 * pad - kernel) // stride + 1


class _Builder:
    """Accumulates nodes and initializers; every conv/BN weight comes from one seeded rng."""

    def __init__(self, rng: np.random.Generator, opset: int, fold_bn: bool) -> None:
        self.rng = rng
        self.opset = opset
        self.fold_bn = fold_bn
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._names: set[str] = set()

    # -- bookkeeping -------------------------------------------------------------------------
    def _claim(self, name: str) -> str:
        if name in self._names:
            raise AssertionError(f"duplicate name {name!r}")  # a bug in this module, not user input
        self._names.add(name)
        return name

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(array, self._claim(name)))
        return name

    def node(self, op: str, name: str, inputs: list[str], n_out: int = 1, **attrs) -> list[str]:
        self._claim(name)
        outs = [f"{name}_output"] if n_out == 1 else [f"{name}_output_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs

    # -- layers ------------------------------------------------------------------------------
    def conv_bn(self, x: str, name: str, bn_name: str, c_in: int, c_out: int, kernel: int,
                stride: int, group: int, gain: float) -> str:
        """Conv (no bias) followed by BN, folded or not; He init with the given gain."""
        fan_in = (c_in // group) * kernel * kernel
        w = self.rng.standard_normal((c_out, c_in // group, kernel, kernel))
        w *= np.sqrt(gain / fan_in)
        # BN in inference mode with non-trivial statistics; its affine map stays near identity
        # (scale in [0.8, 1.2], small shift) so the He scaling above is what sets the magnitude.
        var = self.rng.uniform(0.5, 2.0, c_out)
        mean = self.rng.normal(0.0, 0.1, c_out)
        scale = self.rng.uniform(0.8, 1.2, c_out) * np.sqrt(var + _BN_EPS)
        beta = self.rng.normal(0.0, 0.1, c_out) + mean * scale / np.sqrt(var + _BN_EPS)
        pad = kernel // 2
        conv_attrs = dict(kernel_shape=[kernel, kernel], strides=[stride, stride],
                          pads=[pad, pad, pad, pad], dilations=[1, 1], group=group)
        if self.fold_bn:
            k = scale / np.sqrt(var + _BN_EPS)
            wf = (w * k[:, None, None, None]).astype(np.float32)
            bf = (beta - mean * k).astype(np.float32)
            inputs = [self.init(f"{name}.weight", wf), self.init(f"{name}.bias", bf)]
            return self.node("Conv", name, [x, *inputs], **conv_attrs)[0]
        y = self.node("Conv", name, [x, self.init(f"{name}.weight", w.astype(np.float32))],
                      **conv_attrs)[0]
        bn_inputs = [self.init(f"{bn_name}.{p}", a.astype(np.float32))
                     for p, a in (("scale", scale), ("bias", beta), ("mean", mean), ("var", var))]
        return self.node("BatchNormalization", bn_name, [y, *bn_inputs], epsilon=_BN_EPS)[0]

    def relu(self, x: str, name: str) -> str:
        return self.node("Relu", name, [x])[0]

    def split_half(self, x: str, name: str, channels: int) -> tuple[str, str]:
        half = channels // 2
        if self.opset >= 13:
            sizes = self.init(f"{name}.split", np.array([half, half], dtype=np.int64))
            a, b = self.node("Split", name, [x, sizes], n_out=2, axis=1)
        else:
            a, b = self.node("Split", name, [x], n_out=2, axis=1, split=[half, half])
        return a, b

    def channel_shuffle(self, x: str, prefix: str, channels: int, h: int, w: int) -> str:
        s1 = self.init(f"{prefix}.shape1", np.array([0, 2, channels // 2, h, w], dtype=np.int64))
        y = self.node("Reshape", f"{prefix}.reshape1", [x, s1])[0]
        y = self.node("Transpose", f"{prefix}.transpose", [y], perm=[0, 2, 1, 3, 4])[0]
        s2 = self.init(f"{prefix}.shape2", np.array([0, channels, h, w], dtype=np.int64))
        return self.node("Reshape", f"{prefix}.reshape2", [y, s2])[0]

    def reduce_mean_hw(self, x: str, name: str) -> str:
        if self.opset >= 18:
            axes = self.init(f"{name}.axes", np.array([2, 3], dtype=np.int64))
            return self.node("ReduceMean", name, [x, axes], keepdims=0)[0]
        return self.node("ReduceMean", name, [x], axes=[2, 3], keepdims=0)[0]


def _branch1(b: _Builder, x: str, p: str, form: str, c_in: int, c_out: int) -> str:
    """Downsampling branch (stride 2) of a unit: c_in -> c_out."""
    if form == "merged":
        y = b.conv_bn(x, f"{p}.conv1", f"{p}.bn1", c_in, c_out, 3, 2, 1, gain=2.0)
        return b.relu(y, f"{p}.relu1")
    group = c_in if form == "standard" else 1
    y = b.conv_bn(x, f"{p}.conv1", f"{p}.bn1", c_in, c_in, 3, 2, group, gain=1.0)
    y = b.conv_bn(y, f"{p}.conv2", f"{p}.bn2", c_in, c_out, 1, 1, 1, gain=2.0)
    return b.relu(y, f"{p}.relu2")


def _branch2(b: _Builder, x: str, p: str, form: str, c_in: int, c_out: int, stride: int) -> str:
    """Main branch of a unit: c_in -> c_out."""
    y = b.conv_bn(x, f"{p}.conv1", f"{p}.bn1", c_in, c_out, 1, 1, 1, gain=2.0)
    y = b.relu(y, f"{p}.relu1")
    if form == "merged":
        y = b.conv_bn(y, f"{p}.conv2", f"{p}.bn2", c_out, c_out, 3, stride, 1, gain=2.0)
        return b.relu(y, f"{p}.relu2")
    group = c_out if form == "standard" else 1
    y = b.conv_bn(y, f"{p}.conv2", f"{p}.bn2", c_out, c_out, 3, stride, group, gain=1.0)
    y = b.conv_bn(y, f"{p}.conv3", f"{p}.bn3", c_out, c_out, 1, 1, 1, gain=2.0)
    return b.relu(y, f"{p}.relu3")


def shufflenet_v2(width: float = 1.0, form: str = "standard", *, num_classes: int = 1000,
                  seed: int = 0, opset: int = 17, fold_bn: bool = True,
                  dynamic_batch: bool = True, image_size: int = 224) -> onnx.ModelProto:
    """Build ShuffleNet V2 (or a regular counterpart) as an ONNX model with random weights.

    Parameters
    ----------
    width : float
        Width multiplier, one of 0.5, 1.0, 1.5, 2.0 (torchvision's channel table).
    form : str
        ``"standard"``, ``"merged"`` or ``"depthwise_only"`` (see the module docstring).
    num_classes : int
        Output features of the final Gemm.
    seed : int
        Seed of ``np.random.default_rng``; same arguments give byte-identical models.
    opset : int
        Default-domain opset, 11 to 21. Split sizes are an attribute below 13 and an input from
        13; ReduceMean axes are an attribute below 18 and an input from 18.
    fold_bn : bool
        Fold BN into the convs (legacy exporter style) or emit ``BatchNormalization`` nodes.
    dynamic_batch : bool
        Batch dimension is the symbolic ``"N"`` (else fixed to 1).
    image_size : int
        Spatial size ``S`` of the square input, at least 32.

    Returns
    -------
    onnx.ModelProto
        Input ``"input"`` float32 ``[N, 3, S, S]``, output ``"output"`` float32
        ``[N, num_classes]``; passes ``onnx.checker.check_model(full_check=True)``.

    Raises
    ------
    OptionError
        An argument is outside the supported values.
    """
    width_key = float(width)
    if width_key not in STAGE_OUT_CHANNELS:
        raise OptionError(f"width must be one of {sorted(STAGE_OUT_CHANNELS)}, got {width!r}")
    if form not in FORMS:
        raise OptionError(f"form must be one of {FORMS}, got {form!r}")
    if not _MIN_OPSET <= opset <= _MAX_OPSET:
        raise OptionError(f"opset must be in {_MIN_OPSET}..{_MAX_OPSET}, got {opset}")
    if num_classes < 1:
        raise OptionError(f"num_classes must be positive, got {num_classes}")
    if image_size < 32:
        raise OptionError(f"image_size must be at least 32, got {image_size}")

    channels = STAGE_OUT_CHANNELS[width_key]
    b = _Builder(np.random.default_rng(seed), opset, fold_bn)

    # Stem.
    x = b.conv_bn("input", "conv1.conv", "conv1.bn", 3, channels[0], 3, 2, 1, gain=2.0)
    x = b.relu(x, "conv1.relu")
    x = b.node("MaxPool", "maxpool", [x], kernel_shape=[3, 3], strides=[2, 2],
               pads=[1, 1, 1, 1])[0]
    h = _out_size(_out_size(image_size))
    c_in = channels[0]

    for stage, (repeats, c_out) in enumerate(zip(STAGE_REPEATS, channels[1:4]), start=2):
        branch = c_out // 2
        for i in range(repeats):
            p = f"stage{stage}.{i}"
            if i == 0:
                h = _out_size(h)
                y1 = _branch1(b, x, f"{p}.branch1", form, c_in, branch)
                y2 = _branch2(b, x, f"{p}.branch2", form, c_in, branch, 2)
            else:
                y1, x2 = b.split_half(x, f"{p}.split", c_out)
                y2 = _branch2(b, x2, f"{p}.branch2", form, branch, branch, 1)
            y = b.node("Concat", f"{p}.concat", [y1, y2], axis=1)[0]
            x = b.channel_shuffle(y, f"{p}.shuffle", c_out, h, h)
        c_in = c_out

    x = b.conv_bn(x, "conv5.conv", "conv5.bn", c_in, channels[4], 1, 1, 1, gain=2.0)
    x = b.relu(x, "conv5.relu")
    x = b.reduce_mean_hw(x, "mean")
    fc_w = b.rng.standard_normal((num_classes, channels[4])) * np.sqrt(1.0 / channels[4])
    fc_b = b.rng.normal(0.0, 0.01, num_classes)
    b.node("Gemm", "fc", [x, b.init("fc.weight", fc_w.astype(np.float32)),
                          b.init("fc.bias", fc_b.astype(np.float32))], transB=1)
    b.nodes[-1].output[0] = "output"

    batch: str | int = "N" if dynamic_batch else 1
    graph = helper.make_graph(
        b.nodes,
        f"shufflenet_v2_x{width_key}_{form}",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT,
                                       [batch, 3, image_size, image_size])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [batch, num_classes])],
        initializer=b.inits,
    )
    opset_imports = [helper.make_opsetid("", opset)]
    model = helper.make_model(graph, opset_imports=opset_imports, producer_name="onnx_dwdecomp.zoo",
                              doc_string=f"ShuffleNet V2 x{width_key}, form={form}, seed={seed}, "
                                         f"fold_bn={fold_bn}, random weights (untrained)")
    model.ir_version = min(_MAX_IR_VERSION, helper.find_min_ir_version_for(opset_imports))
    return model
