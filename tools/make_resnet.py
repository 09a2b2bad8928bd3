"""Write a ResNet-18-shaped ONNX model with random but calibrated weights, and image data for it.

Usage::

    python tools/make_resnet.py [--out-dir ~/.cache/onnx_dwdecomp/resnet18] [--seed 0]

Writes into ``--out-dir`` (kept out of the repository: the model is ~45 MB):

``resnet18.onnx``   ResNet-18 (BasicBlocks [2, 2, 2, 2], 64-128-256-512 channels, 7×7/2 stem,
                    3×3/2 max-pool, global average pool, 1000-way head), 224×224 input ``input``,
                    output ``logits``, dynamic batch; legacy exporter (``dynamo=False``) in eval
                    mode, so every BatchNormalization is folded into its Conv.
``calib.npz``       32 images (N, 3, 224, 224) float32 under the key ``input``: 224² crops of
                    scikit-image sample photos, ImageNet mean/std normalised; stored uncompressed.
``test.npz``        16 images, same format, from *other* photos (no photo is shared with calib).
``meta.json``       seed, arguments, sha256 of each file, activation statistics.

The weights are "random but calibrated": Kaiming-normal convs (fan-out, ReLU), BN γ = 1, β = 0,
and each BN's running mean/variance set from one forward pass over the calibration images in
training mode (one batch, ``momentum=None``: the statistics are exactly the batch's). Every BN
therefore normalises its input on the calibration images, layer after layer, so the activations
neither explode nor die out through the 17 convs — a plausible stand-in for a trained network's
layer statistics, not for its function. Deterministic given ``--seed`` (torch runs on one thread).

Needs torch (CPU build; torchvision is not used) and scikit-image (``pip install scikit-image``).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

from provenance import file_sha256  # noqa: E402
from thirdparty import to_rgb_uint8  # noqa: E402  (the same conversion of skimage samples)

#: ImageNet normalisation (RGB, 0..1 scale).
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
#: skimage.data sample photos: calibration and test crops come from disjoint sets.
PHOTOS_CALIB = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field",
                "camera", "coins", "brick", "grass")
PHOTOS_TEST = ("stereo_motorcycle", "retina", "colorwheel", "logo", "clock", "moon", "gravel", "cell")
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
DEFAULT_OUT = Path("~/.cache/onnx_dwdecomp/resnet18")


# --------------------------------------------------------------------------------------------
# Images (numpy + scikit-image only)
# --------------------------------------------------------------------------------------------


def load_photos(names: tuple[str, ...]) -> list[tuple[str, np.ndarray]]:
    try:
        import skimage.data as skd
    except ImportError as exc:  # pragma: no cover - environment
        raise SystemExit("tools/make_resnet.py needs scikit-image: pip install scikit-image") from exc
    out = []
    for name in names:
        img = getattr(skd, name)()
        out.append((name, to_rgb_uint8(img[0] if isinstance(img, tuple) else img)))
    return out


def random_crops(photos: list[tuple[str, np.ndarray]], n: int, size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """``n`` crops (N, 3, size, size) float32, normalised: photo k % len(photos), a random square
    window of side 35–100 % of the photo's short side, random horizontal flip, resized to ``size``."""
    from skimage.transform import resize

    batch = np.empty((n, 3, size, size), dtype=np.float32)
    names = []
    for k in range(n):
        name, rgb = photos[k % len(photos)]
        h, w = rgb.shape[:2]
        short = min(h, w)
        side = int(round(short * rng.uniform(0.35, 1.0)))
        side = max(min(side, short), min(size, short))
        y = int(rng.integers(0, h - side + 1))
        x = int(rng.integers(0, w - side + 1))
        flip = bool(rng.integers(0, 2))
        patch = rgb[y:y + side, x:x + side]
        if flip:
            patch = patch[:, ::-1]
        img = resize(patch, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
        img = (img.astype(np.float32) / 255.0 - MEAN) / STD
        batch[k] = img.transpose(2, 0, 1)
        names.append(f"{name}[y={y},x={x},side={side}{',flip' if flip else ''}]")
    return batch, names


# --------------------------------------------------------------------------------------------
# The network (torch imported lazily)
# --------------------------------------------------------------------------------------------


def build_resnet(width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2), num_classes: int = 1000):
    """ResNet-18 as in torchvision (BasicBlock, projection shortcut = 1×1 conv + BN), written out."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return self.relu(out + identity)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(width)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            stages, cin = [], width
            for i, n in enumerate(blocks):
                cout = width * 2 ** i
                stage = [BasicBlock(cin, cout, 1 if i == 0 else 2)]
                stage += [BasicBlock(cout, cout, 1) for _ in range(n - 1)]
                stages.append(nn.Sequential(*stage))
                cin = cout
            self.layer1, self.layer2, self.layer3, self.layer4 = (stages + [nn.Identity()] * 4)[:4]
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(cin, num_classes)

        def forward(self, x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    net = ResNet()
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def calibrate_bn(net, images: np.ndarray) -> None:
    """Running statistics of every BN = the batch statistics of its input over ``images`` (one
    training-mode pass, cumulative average), so each BN normalises its input in eval mode."""
    import torch
    from torch import nn

    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    net.train()
    with torch.no_grad():
        net(torch.from_numpy(images))
    net.eval()


def activation_stats(net, images: np.ndarray) -> list[dict]:
    """Per stage output in eval mode: std, mean, fraction of zeros."""
    import torch

    stats, hooks = [], []
    names = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    mods = [net.maxpool, net.layer1, net.layer2, net.layer3, net.layer4, net.fc]
    for name, mod in zip(names, mods):
        def hook(_m, _i, out, name=name):
            o = out.detach().float()
            stats.append({"tensor": name, "shape": list(o.shape), "mean": float(o.mean()),
                          "std": float(o.std()), "zero_fraction": float((o == 0).float().mean())})
        hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        logits = net(torch.from_numpy(images))
    for h in hooks:
        h.remove()
    top1 = logits.argmax(1).numpy()
    stats.append({"tensor": "top1_classes", "distinct": int(len(set(top1.tolist()))), "of": int(len(top1))})
    return stats


def export(net, path: Path, size: int) -> None:
    import torch

    net.eval()
    dummy = torch.zeros(1, 3, size, size)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        torch.onnx.export(net, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          do_constant_folding=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


def check_export(net, path: Path, x: np.ndarray) -> float:
    """Checker, no BatchNormalization left, onnxruntime vs torch; returns max |diff| / max |ref|."""
    import onnx
    import onnxruntime as ort
    import torch

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise RuntimeError(f"{path}: BatchNormalization was not folded")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT_NAME: x})[0]
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    rel = float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-12))
    if rel > 1e-3:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {rel:.2e} (relative to max |logit|)")
    return rel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT,
                        help=f"folder to write into (default: {DEFAULT_OUT}; not the repository)")
    parser.add_argument("--seed", type=int, default=0, help="weights and crops (default: 0)")
    parser.add_argument("--image-size", type=int, default=224, help="input side (default: 224)")
    parser.add_argument("--calib-count", type=int, default=32, help="calibration images (default: 32)")
    parser.add_argument("--test-count", type=int, default=16, help="test images (default: 16)")
    parser.add_argument("--width", type=int, default=64, help="stem / first stage channels (default: 64)")
    parser.add_argument("--blocks", default="2,2,2,2", help="BasicBlocks per stage (default: 2,2,2,2)")
    parser.add_argument("--num-classes", type=int, default=1000, help="head outputs (default: 1000)")
    args = parser.parse_args(argv)

    import torch

    blocks = tuple(int(b) for b in args.blocks.split(","))
    out = args.out_dir.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # reduction order fixed: the BN statistics do not depend on the machine
    rng = np.random.default_rng(args.seed)
    calib, calib_names = random_crops(load_photos(PHOTOS_CALIB), args.calib_count, args.image_size, rng)
    test, test_names = random_crops(load_photos(PHOTOS_TEST), args.test_count, args.image_size, rng)

    torch.manual_seed(args.seed)
    net = build_resnet(args.width, blocks, args.num_classes)
    calibrate_bn(net, calib)
    stats = {"calib": activation_stats(net, calib), "test": activation_stats(net, test)}

    model_path, calib_path, test_path = out / "resnet18.onnx", out / "calib.npz", out / "test.npz"
    export(net, model_path, args.image_size)
    rel = check_export(net, model_path, test[:2])
    np.savez(calib_path, **{INPUT_NAME: calib})  # uncompressed: the package memory-maps it
    np.savez(test_path, **{INPUT_NAME: test})

    meta = {"tool": "tools/make_resnet.py", "args": {k: str(v) for k, v in vars(args).items()},
            "opset": OPSET, "input": INPUT_NAME, "output": OUTPUT_NAME,
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
                      for p in (model_path, calib_path, test_path)},
            "onnxruntime_vs_torch_rel": rel, "activations": stats,
            "calib_crops": calib_names, "test_crops": test_names}
    (out / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")

    for p in (model_path, calib_path, test_path):
        print(f"wrote {p}  ({p.stat().st_size / 1e6:.2f} MB)")
    print(f"onnxruntime vs torch: {rel:.1e} of max |logit|")
    for split, rows in stats.items():
        parts = [f"{r['tensor']} std {r['std']:.3g} zero {r['zero_fraction']:.2f}"
                 for r in rows if "std" in r]
        print(f"{split}: " + "; ".join(parts) + f"; top-1 classes {rows[-1]['distinct']}/{rows[-1]['of']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
