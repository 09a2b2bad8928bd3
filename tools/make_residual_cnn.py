"""Write a plain residual CNN of near-separable 3×3 convs, and smooth calibration images, for cost benchmarks.

Usage::

    python tools/make_residual_cnn.py --convs 8  --out-dir /tmp/res8
    python tools/make_residual_cnn.py --convs 48 --out-dir /tmp/res48
    python tools/make_residual_cnn.py --convs 52 --image-size 1024 --images 8 --channels 24 \\
        --stem-stride 2 --stride2-every 13 --out-dir /tmp/big

MACs per image: 0.31 G (the first, 9 convs at 64², C 32), 1.8 G (the second, 49 convs; its 64
default calibration images make 116 G). The last is the large-input model: 53 3×3 convs, 1024²
input, C 24, 41.8 G MACs per image (the stem and blocks 1–12 at 512², blocks 13–25 at 256², the
last block's second conv at 128²); its 8 calibration images make 334 G, which one onnxruntime
session on 2 threads ran in 8.9–10.6 s as one batch (1.3–1.7 s for one image) on a shared
2-core machine; the block outputs of the first image at full size had RMS 0.72–1.14.

The graph (opset 17, built with ``onnx.helper`` + numpy, no torch), input ``input``
(batch, 3, S, S) with a dynamic batch dimension, output ``logits`` (batch, classes):

- stem: Conv 3×3 (3 → C, stride ``--stem-stride``, padding 1, bias) + Relu;
- ``--convs N`` / 2 residual blocks (N even), each Conv 3×3 → Relu → Conv 3×3 → Add(skip) →
  Relu, C → C, padding 1, bias (batch norm already folded); block ``b`` (1-based) has a stride-2
  first conv when ``--stride2-every K`` divides ``b`` (default 0: never), and then its skip is an
  AveragePool 3×3 / 2 (padding 1, padding not counted) so that both sides are ⌈H/2⌉;
- GlobalAveragePool → Flatten → Gemm (C → ``--classes``).

The weights are near-separable, the regime in which a regular conv is worth rewriting as
depthwise + pointwise (a trained network's regular counterpart of a separable one): every
3×3 conv is W[o, c] = Σ_{s<rank} P_s[o, c] · F_s[c] (per input channel ``--rank`` spatial
filters F, mixed by pointwise matrices P; standard normal) plus i.i.d. noise of ``--noise`` (5 %)
of that part's RMS. Their scale is set like a folded batch norm: a numpy forward pass over a
center crop (≤ 512²) of the first calibration images (≤ 16, and ≤ 2²⁰ pixels: 16 of 256², 4 of
512²) normalises each conv's output per
channel (mean 0, std 1) with the stem's and first convs' biases small and random (std 0.1); each
block's second conv is normalised to std 0.5 (the branch smaller than the skip, so that per-image
differences do not compound through the depth) and gets the per-channel bias that makes the
block's output (after the add and the Relu) RMS 1 per channel. Scaling a conv's output channels keeps the rank of every W[:, c], so the
separable structure survives. The activations thus neither explode nor die out through the
depth; the tool prints their RMS from onnxruntime on the first full-size image (``--no-check``
skips that forward).

Calibration images ``calib.npz`` (key ``input``, float32 (M, 3, S, S), stored uncompressed so it
can be memory-mapped): seeded smooth random images, 1/f ("pink") noise blurred by a 1-pixel
Gaussian — a luminance field shared by the three channels plus a weaker field per channel —
normalised per image and channel (mean about 0, std about 1). Not white noise: neighbouring
pixels are correlated as in photos (0.87 at 16², 0.91 at 64², 0.96 at 1024²).

``meta.json`` holds the arguments (not ``--out-dir``), conv count, MACs, sha256 of the two other
files and the fitted activation RMS. Deterministic: the same arguments give byte-identical files
(same machine and library versions; the ``.npz`` is zipped with a fixed timestamp).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

from provenance import file_sha256  # noqa: E402

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
OPSET = 17
FIT_IMAGES = 16  # at most this many images in the scale-fitting forward pass,
FIT_CROP = 512  # their center crop (side) at most this,
FIT_PIXELS = 1 << 20  # and images × crop² at most this (4 crops of 512², 16 of 256²), at least 1 image
#: std of each block's branch (its second conv's output, per channel) against block outputs of RMS
#: 1: with the branch as large as the skip, per-image differences compound through 24 blocks
#: (some images' activations ×30 at the end); at 0.5 they stay within about 0.8–1.9.
BRANCH_STD = 0.5
ZIP_TIME = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------


def pink_noise(rng: np.random.Generator, count: int, size: int, blur: float = 1.0) -> np.ndarray:
    """``count`` fields (count, size, size) float64: white noise filtered to a 1/f amplitude
    spectrum and a Gaussian blur of ``blur`` pixels (the optics), zero mean, std 1."""
    fy, fx = np.fft.fftfreq(size)[:, None], np.fft.rfftfreq(size)[None, :]  # cycles per pixel
    f = np.hypot(fy, fx)
    amp = np.exp(-2 * (np.pi * blur * f) ** 2) / (f * size + 2.0)  # +2: the largest scales stay finite
    amp[0, 0] = 0.0
    out = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((count, size, size))) * amp, s=(size, size))
    out -= out.mean(axis=(1, 2), keepdims=True)
    return out / out.std(axis=(1, 2), keepdims=True)


def make_images(count: int, size: int, seed: int) -> np.ndarray:
    """Seeded smooth random images (count, 3, size, size) float32: per image a shared luminance
    field plus a weaker field per channel, normalised per channel, plus a small colour offset."""
    rng = np.random.default_rng([seed, 0])
    out = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):  # one image at a time: 1024² images stay cheap in memory
        fields = pink_noise(rng, 4, size)
        img = 0.8 * fields[:1] + 0.6 * fields[1:]
        img = (img - img.mean(axis=(1, 2), keepdims=True)) / img.std(axis=(1, 2), keepdims=True)
        out[i] = img + 0.2 * rng.standard_normal((3, 1, 1))
    return out


# --------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------


def out_size(size: int, stride: int) -> int:
    """Side after a 3×3 conv (or 3×3 pool) with padding 1 and ``stride``: ⌈size / stride⌉."""
    return (size + 2 - 3) // stride + 1


def layout(convs: int, stem_stride: int, stride2_every: int) -> list[tuple[str, int]]:
    """``(name, stride)`` of every 3×3 conv in graph order: the stem, then two per block."""
    rows = [("stem", stem_stride)]
    for b in range(1, convs // 2 + 1):
        down = stride2_every > 0 and b % stride2_every == 0
        rows += [(f"block{b}_conv1", 2 if down else 1), (f"block{b}_conv2", 1)]
    return rows


def count_macs(channels: int, image_size: int, classes: int, rows: list[tuple[str, int]]) -> dict:
    """Multiply-accumulates per image: of the 3×3 convs, and in all (convs + head)."""
    size, conv_macs, sides = image_size, 0, []
    for name, stride in rows:
        size = out_size(size, stride)
        cin = 3 if name == "stem" else channels
        conv_macs += size * size * channels * cin * 9
        sides.append(size)
    return {"conv_macs": conv_macs, "total_macs": conv_macs + channels * classes, "sides": sides}


def separable_weight(rng: np.random.Generator, cout: int, cin: int, rank: int, noise: float) -> np.ndarray:
    """W (cout, cin, 3, 3) = Σ_s P_s[:, c] · F_s[c] + noise (``noise`` × that part's RMS), float64."""
    p = rng.standard_normal((rank, cout, cin))
    f = rng.standard_normal((rank, cin, 3, 3))
    w = np.einsum("soc,sckl->ockl", p, f)
    return w + noise * np.sqrt(np.mean(w * w)) * rng.standard_normal(w.shape)


# --------------------------------------------------------------------------------------------
# numpy forward of the scale fit
# --------------------------------------------------------------------------------------------


def conv3x3(x: np.ndarray, w: np.ndarray, stride: int) -> np.ndarray:
    """3×3 conv, padding 1, no bias, float32 (im2col + one batched matmul): x (N, Ci, H, W),
    w (Co, Ci, 3, 3) → (N, Co, Ho, Wo)."""
    n, ci, h, wd = x.shape
    ho, wo = out_size(h, stride), out_size(wd, stride)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, dy:dy + stride * (ho - 1) + 1:stride, dx:dx + stride * (wo - 1) + 1:stride]
                     for dy in range(3) for dx in range(3)], axis=2).reshape(n, ci * 9, ho * wo)
    return (w.reshape(w.shape[0], ci * 9).astype(np.float32) @ cols).reshape(n, w.shape[0], ho, wo)


def avgpool3x3s2(x: np.ndarray) -> np.ndarray:
    """AveragePool 3×3, stride 2, padding 1, padding not counted (the skip of a stride-2 block)."""
    _, _, h, wd = x.shape
    ho, wo = out_size(h, 2), out_size(wd, 2)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    ones = np.pad(np.ones((h, wd)), 1)
    total, count = 0.0, 0.0
    for dy in range(3):
        for dx in range(3):
            total = total + xp[:, :, dy:dy + 2 * (ho - 1) + 1:2, dx:dx + 2 * (wo - 1) + 1:2]
            count = count + ones[dy:dy + 2 * (ho - 1) + 1:2, dx:dx + 2 * (wo - 1) + 1:2]
    return (total / count).astype(x.dtype)


def rms(x: np.ndarray, axis=None) -> np.ndarray:
    return np.sqrt(np.mean(np.square(x), axis=axis, dtype=np.float64))


def relu_rms_bias(z: np.ndarray, target: float = 1.0, samples: int = 1 << 12) -> np.ndarray:
    """Per channel c the bias β_c with RMS(relu(z[:, c] + β_c)) = ``target`` (bisection; the RMS
    is increasing in β), on at most ``samples`` evenly strided values per channel."""
    flat = z.transpose(1, 0, 2, 3).reshape(z.shape[1], -1)
    flat = flat[:, ::max(1, flat.shape[1] // samples)]
    lo, hi = -flat.max(axis=1) - target, target - flat.min(axis=1)  # RMS 0 at lo, ≥ target at hi
    for _ in range(40):
        mid = 0.5 * (lo + hi)
        high = rms(np.maximum(flat + mid[:, None], 0.0), axis=1) > target
        hi, lo = np.where(high, mid, hi), np.where(high, lo, mid)
    return 0.5 * (lo + hi)


def normalise(raw: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold a batch norm: scale output channel o of ``w`` by 1/σ_o and return (w, bias, output)
    with the output (N, Co, H, W) of mean 0 and std 1 per channel on ``raw``'s images."""
    mu, sigma = raw.mean(axis=(0, 2, 3), dtype=np.float64), raw.std(axis=(0, 2, 3), dtype=np.float64) + 1e-12
    out = (raw - mu[None, :, None, None].astype(np.float32)) / sigma[None, :, None, None].astype(np.float32)
    return w / sigma[:, None, None, None], -mu / sigma, out


def fit_region(image_size: int, images: int) -> tuple[int, int]:
    """(images, side of their center crop) of the scale-fitting forward pass."""
    side = min(image_size, FIT_CROP)
    return min(images, max(1, min(FIT_IMAGES, FIT_PIXELS // side**2))), side


def fit_weights(args, rows: list[tuple[str, int]], images: np.ndarray) -> tuple[dict, list[dict]]:
    """All initializers (name → float32 array) and per-conv RMS of the fit pass."""
    rng = np.random.default_rng([args.seed, 1])
    c, (count, side) = args.channels, fit_region(args.image_size, args.images)
    top = (args.image_size - side) // 2
    x = np.ascontiguousarray(images[:count, :, top:top + side, top:top + side])
    params, stats, block_in, down = {}, [], None, False

    def bias_noise() -> np.ndarray:
        return 0.1 * rng.standard_normal(c)

    for name, stride in rows:
        cin = 3 if name == "stem" else c
        w = separable_weight(rng, c, cin, args.rank, args.noise)
        w, b, pre = normalise(conv3x3(x, w, stride), w)
        in_rms = float(rms(x))
        if name.endswith("conv2"):
            w, b, pre = w * BRANCH_STD, b * BRANCH_STD, pre * np.float32(BRANCH_STD)
            skip = avgpool3x3s2(block_in) if down else block_in
            beta = relu_rms_bias(skip + pre)
            x = np.maximum(skip + pre + beta[None, :, None, None].astype(np.float32), 0.0)
            b = b + beta
        else:
            beta = bias_noise()
            x = np.maximum(pre + beta[None, :, None, None].astype(np.float32), 0.0)
            b = b + beta
        down = name.endswith("conv1") and stride == 2  # the block's skip is pooled
        if not name.endswith("conv1"):
            block_in = x  # the stem's and every block's output is the next block's input (skip)
        params[f"{name}.weight"], params[f"{name}.bias"] = w.astype(np.float32), b.astype(np.float32)
        stats.append({"conv": name, "stride": stride, "input_rms": round(in_rms, 4),
                      "output_rms": round(float(rms(x)), 4)})
    pooled = x.mean(axis=(2, 3), dtype=np.float64)
    head = rng.standard_normal((args.classes, c)) / np.sqrt(c)
    logits = pooled @ head.T
    mean = logits.mean(axis=0)  # the bias centres each class; the scale makes the rest std 1
    scale = 1.0 / (np.std(logits - mean) + 1e-12)
    params["head.weight"] = (head * scale).astype(np.float32)
    params["head.bias"] = (-mean * scale).astype(np.float32)
    return params, stats


# --------------------------------------------------------------------------------------------
# ONNX graph and files
# --------------------------------------------------------------------------------------------


def build_model(args, rows: list[tuple[str, int]], params: dict):
    """The ONNX model (opset 17, dynamic batch) of ``rows`` with the fitted ``params``."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, x, block_in = [], INPUT_NAME, None

    def conv(name: str, src: str, stride: int) -> str:
        nodes.append(helper.make_node("Conv", [src, f"{name}.weight", f"{name}.bias"], [f"{name}_out"], name=name,
                                      kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[stride, stride]))
        return f"{name}_out"

    def relu(name: str, src: str) -> str:
        nodes.append(helper.make_node("Relu", [src], [name], name=name))
        return name

    for name, stride in rows:
        if name == "stem":
            x = block_in = relu("stem_relu", conv(name, x, stride))
        elif name.endswith("conv1"):
            x = relu(name.replace("conv1", "relu1"), conv(name, block_in, stride))
            down = stride == 2
        else:
            block = name[:-len("_conv2")]
            skip = block_in
            if down:
                skip = f"{block}_skip"
                nodes.append(helper.make_node("AveragePool", [block_in], [skip], name=skip, kernel_shape=[3, 3],
                                              strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=0))
            nodes.append(helper.make_node("Add", [conv(name, x, stride), skip], [f"{block}_add"], name=f"{block}_add"))
            x = block_in = relu(f"{block}_relu2", f"{block}_add")
    nodes += [helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
              helper.make_node("Flatten", ["pool"], ["flat"], name="flatten", axis=1),
              helper.make_node("Gemm", ["flat", "head.weight", "head.bias"], [OUTPUT_NAME], name="head", transB=1)]
    graph = helper.make_graph(
        nodes, "residual_cnn",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["batch", 3, args.image_size, args.image_size])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, ["batch", args.classes])],
        [numpy_helper.from_array(value, name) for name, value in params.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="tools/make_residual_cnn.py")
    model.ir_version = 8  # opset 17's IR version; readable by older onnxruntime too
    return model


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` (stored, not compressed) with a fixed timestamp, so the bytes depend on the
    arrays only (``np.savez`` stamps each member with the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key, value in arrays.items():
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_TIME)
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(value), allow_pickle=False)


def check(model, image: np.ndarray, threads: int = 2) -> dict:
    """One onnxruntime forward of one image (``threads`` intra-op threads) with every block's
    output as an extra graph output: its wall time and the RMS of each block output and the logits."""
    import onnx
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [n.output[0] for n in probe.graph.node if n.op_type == "Relu" and not n.name.endswith("relu1")]
    probe.graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in names)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    t0 = time.perf_counter()
    session = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter()
    outs = session.run(None, {INPUT_NAME: image[None]})
    t2 = time.perf_counter()
    return {"session_s": t1 - t0, "run_s": t2 - t1, "logits_rms": float(rms(outs[0])),
            "block_rms": {name: float(rms(out)) for name, out in zip(names, outs[1:])}}


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:8]))
    parser.add_argument("--out-dir", type=Path, required=True, help="writes model.onnx, calib.npz, meta.json here")
    parser.add_argument("--convs", type=int, default=48, help="3×3 convs in the residual blocks, even (default 48)")
    parser.add_argument("--channels", type=int, default=32, help="channels C of every conv (default 32)")
    parser.add_argument("--image-size", type=int, default=64, help="input side S (default 64)")
    parser.add_argument("--images", type=int, default=64, help="calibration images (default 64)")
    parser.add_argument("--classes", type=int, default=10, help="outputs of the Gemm head (default 10)")
    parser.add_argument("--stem-stride", type=int, choices=[1, 2], default=1, help="stride of the stem conv (default 1)")
    parser.add_argument("--stride2-every", type=int, default=0, metavar="K",
                        help="every K-th block's first conv has stride 2 (default 0: never)")
    parser.add_argument("--rank", type=int, default=2, help="spatial filters per input channel (default 2)")
    parser.add_argument("--noise", type=float, default=0.05,
                        help="non-separable noise, fraction of the separable part's RMS (default 0.05)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-check", action="store_true",
                        help="skip the onnxruntime forward of one image (activation RMS, time)")
    args = parser.parse_args(argv)
    if args.convs < 2 or args.convs % 2:
        parser.error(f"--convs must be even and at least 2 (two convs per residual block), not {args.convs}")
    for opt in ("channels", "image_size", "images", "classes", "rank"):
        if getattr(args, opt) < 1:
            parser.error(f"--{opt.replace('_', '-')} must be at least 1")
    if args.stride2_every < 0 or args.noise < 0:
        parser.error("--stride2-every and --noise must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    import onnx

    args = parse_args(argv)
    out = args.out_dir.expanduser()
    out.mkdir(parents=True, exist_ok=True)
    rows = layout(args.convs, args.stem_stride, args.stride2_every)
    macs = count_macs(args.channels, args.image_size, args.classes, rows)
    images = make_images(args.images, args.image_size, args.seed)
    params, stats = fit_weights(args, rows, images)
    model = build_model(args, rows, params)
    onnx.checker.check_model(model)
    model_path, calib_path, meta_path = out / "model.onnx", out / "calib.npz", out / "meta.json"
    onnx.save_model(model, str(model_path))
    save_npz(calib_path, {INPUT_NAME: images})
    meta = {"tool": "tools/make_residual_cnn.py",
            "args": {k: v for k, v in vars(args).items() if k not in ("out_dir", "no_check")},
            "input": INPUT_NAME, "output": OUTPUT_NAME, "opset": OPSET, "conv3x3": len(rows),
            "sides": macs["sides"], "macs_per_image": macs["total_macs"], "conv_macs_per_image": macs["conv_macs"],
            "calib_macs": macs["total_macs"] * args.images,
            "sha256": {"model.onnx": file_sha256(model_path), "calib.npz": file_sha256(calib_path)},
            "fit": dict(zip(("images", "crop"), fit_region(args.image_size, args.images)), convs=stats)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")

    side = " → ".join(f"{s}²" for s in dict.fromkeys(macs["sides"]))
    print(f"residual CNN: {len(rows)} 3×3 convs (stem + {args.convs} in {args.convs // 2} blocks), "
          f"C {args.channels}, {args.image_size}² input, feature maps {side}, {args.classes} classes")
    print(f"MACs per image {macs['total_macs'] / 1e9:.3f} G (3×3 convs {macs['conv_macs'] / 1e9:.3f} G); "
          f"{args.images} calibration images: {macs['total_macs'] * args.images / 1e9:.2f} G")
    outs = [s["output_rms"] for s in stats]
    print(f"fit pass ({meta['fit']['images']} images, {meta['fit']['crop']}² center crop): activation RMS after "
          f"each conv's Relu {min(outs):.3f} … {max(outs):.3f}")
    for path in (model_path, calib_path, meta_path):
        print(f"wrote {path}  ({path.stat().st_size / 1e6:.2f} MB)")
    if not args.no_check:
        res = check(model, images[0])
        blocks = list(res["block_rms"].values())
        print(f"onnxruntime, image 0 at {args.image_size}²: block output RMS {min(blocks):.3f} … {max(blocks):.3f} "
              f"(last {blocks[-1]:.3f}), logits RMS {res['logits_rms']:.3f}; one forward of 1 image on 2 threads "
              f"{res['run_s']:.2f} s (session {res['session_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
