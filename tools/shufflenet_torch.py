"""ShuffleNet V2 in PyTorch, in its native form and its regular counterparts.

Tools-only (training / export of test models); the ``onnx_dwdecomp`` package
never imports torch.

Layout follows torchvision's ``shufflenetv2.py`` so that exported graphs look
like the ones found in the field:

* stem: conv 3x3 stride 2 (3 -> 24) + BN + ReLU, max-pool 3x3 stride 2;
* three stages (``stage2``..``stage4``) with ``[4, 8, 4]`` units; the first
  unit of every stage downsamples (stride 2, two branches), the others split
  the channels in halves (``chunk``) and transform only the second half;
* every unit ends with a channel shuffle (``view`` / ``transpose`` / ``view``);
* ``conv5`` 1x1 + BN + ReLU, global mean over H and W, ``fc``.

Three forms of the units' branches (``c`` = branch width):

``"standard"``  (native, separable)
    branch2: 1x1 -> BN -> ReLU -> dw3x3 -> BN -> 1x1 -> BN -> ReLU
    branch1: dw3x3 s2 -> BN -> 1x1 -> BN -> ReLU
``"merged"``  (regular counterpart; each ``dw3x3 -> BN -> 1x1`` becomes one
regular 3x3 conv ``c_in -> c_out`` with the same stride)
    branch2: 1x1 -> BN -> ReLU -> conv3x3 -> BN -> ReLU
    branch1: conv3x3 s2 -> BN -> ReLU
``"depthwise_only"``  (only the depthwise 3x3 becomes a regular 3x3 ``c -> c``)
    branch2: 1x1 -> BN -> ReLU -> conv3x3 -> BN -> 1x1 -> BN -> ReLU
    branch1: conv3x3 s2 -> BN -> 1x1 -> BN -> ReLU
"""

from __future__ import annotations

import torch
from torch import nn

FORMS = ("standard", "merged", "depthwise_only")

STAGE_REPEATS = (4, 8, 4)
STAGE_WIDTHS = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}


def shuffle_channels(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` equal groups (ShuffleNet shuffle)."""
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(n, c, h, w)


def _conv_bn(c_in: int, c_out: int, kernel: int, stride: int = 1,
             groups: int = 1, relu: bool = True) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(c_out),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return layers


def _spatial_then_pointwise(c_in: int, c_out: int, stride: int, form: str) -> list[nn.Module]:
    """The ``3x3 -> BN -> 1x1 -> BN -> ReLU`` tail of a branch, in the given form."""
    if form == "standard":
        return (_conv_bn(c_in, c_in, 3, stride, groups=c_in, relu=False)
                + _conv_bn(c_in, c_out, 1))
    if form == "depthwise_only":
        return (_conv_bn(c_in, c_in, 3, stride, relu=False)
                + _conv_bn(c_in, c_out, 1))
    if form == "merged":
        return _conv_bn(c_in, c_out, 3, stride)
    raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")


class ShuffleUnit(nn.Module):
    """One ShuffleNet V2 unit; ``stride=2`` units have two branches."""

    def __init__(self, c_in: int, c_out: int, stride: int, form: str = "standard") -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if c_out % 2:
            raise ValueError(f"c_out must be even, got {c_out}")
        half = c_out // 2
        if stride == 1 and c_in != c_out:
            raise ValueError(f"a stride-1 unit keeps the width, got {c_in} -> {c_out}")
        self.stride = stride
        if stride == 2:
            self.branch1 = nn.Sequential(*_spatial_then_pointwise(c_in, half, 2, form))
        else:
            self.branch1 = nn.Sequential()
        branch2_in = c_in if stride == 2 else half
        self.branch2 = nn.Sequential(
            *_conv_bn(branch2_in, half, 1),
            *_spatial_then_pointwise(half, half, stride, form),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            keep, work = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(work)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return shuffle_channels(out, 2)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 with torchvision's module names (``conv1``, ``stage2``.., ``conv5``, ``fc``)."""

    def __init__(self, width: float = 0.5, num_classes: int = 1000,
                 form: str = "standard") -> None:
        super().__init__()
        if form not in FORMS:
            raise ValueError(f"unknown form {form!r}; expected one of {FORMS}")
        if width not in STAGE_WIDTHS:
            raise ValueError(f"width must be one of {sorted(STAGE_WIDTHS)}, got {width}")
        self.form = form
        widths = STAGE_WIDTHS[width]
        self.conv1 = nn.Sequential(*_conv_bn(3, widths[0], 3, 2))
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        c = widths[0]
        for idx, (repeats, c_out) in enumerate(zip(STAGE_REPEATS, widths[1:4]), start=2):
            units = [ShuffleUnit(c, c_out, 2, form)]
            units += [ShuffleUnit(c_out, c_out, 1, form) for _ in range(repeats - 1)]
            setattr(self, f"stage{idx}", nn.Sequential(*units))
            c = c_out
        self.conv5 = nn.Sequential(*_conv_bn(c, widths[4], 1))
        self.fc = nn.Linear(widths[4], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.conv1(x))
        x = self.stage4(self.stage3(self.stage2(x)))
        x = self.conv5(x)
        x = x.mean([2, 3])
        return self.fc(x)


def shufflenet_v2(width: float = 0.5, num_classes: int = 1000,
                  form: str = "standard") -> ShuffleNetV2:
    """Build an untrained ShuffleNet V2 of the given width, class count and form."""
    return ShuffleNetV2(width=width, num_classes=num_classes, form=form)


def count_conv_macs(model: nn.Module, input_size: int = 224) -> int:
    """Multiply-adds of all Conv2d and Linear layers for one ``input_size``² image."""
    macs = 0

    def hook(mod: nn.Module, _inp, out) -> None:
        nonlocal macs
        if isinstance(mod, nn.Conv2d):
            k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
            macs += out.numel() // out.shape[0] * k
        elif isinstance(mod, nn.Linear):
            macs += mod.in_features * mod.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    return macs
