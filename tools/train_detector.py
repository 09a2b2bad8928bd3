"""Train a small YOLOv8-style shape detector on synthetic scenes and export it to ONNX.

Usage::

    python tools/train_detector.py [--out-dir models/detector] [--steps 1200] [--batch 32]
                                   [--lr 0.002] [--seed 0] [--threads 1]
                                   [--form lowrank|plain] [--penalty 0.05]

Scenes (:func:`make_scene`, numpy only, seeded): 96x96 RGB, a smooth random colour texture
(bilinearly upsampled 7x7 noise in 0.3..0.7 plus per-pixel noise, sigma 0.03) with 1-4 filled
shapes of :data:`CLASSES` (square, disc, triangle, cross), box side 8..56 px, each a random
high-contrast colour, overlapping earlier shapes' boxes by IoU <= 0.1. Pixels are quantised to
uint8 and fed as ``uint8 / 255`` float32 NCHW. Ground truth: the tight box of each shape's
mask, xyxy in pixels (x2, y2 exclusive), and its class id.

Model (:class:`Detector`): 20 regular 3x3 convs (Conv -> BN -> SiLU; 16..80 channels), a
stride-32 backbone with an FPN top-down neck (strides 8 / 16 / 32, 48 / 64 / 80 channels) and
a YOLOv8-style anchor-free decoupled head per stride (a shared 3x3 to 32 / 48 / 48 channels,
then a box 3x3 -> 1x1 -> 4 and a class 3x3 -> 1x1 -> C). With ``--form lowrank`` (default)
each regular 3x3 is trained as a depthwise 3x3 merged into a 1x1 plus a residual penalised
by ``--penalty`` x its sum of squares (:class:`LowRankConv3x3`) and exported merged: near
rank 1 per input channel, so the tool has real choices; ``--form plain``: ordinary convs.

The decode is part of the graph: ltrb distances ``softplus(raw) * stride`` from each grid cell's centre, turned into ``cx, cy, w, h`` in
pixels; class probabilities ``sigmoid(logits)``. The single output ``output0`` is
``(N, 4 + C, A)``, A = 12*12 + 6*6 + 3*3 = 189 anchors, stride 8 first (row-major cells).

Training: each ground-truth box goes to the stride matching its size (max side < 20 px:
8, < 40 px: 16, else 32) and to the cells of that stride whose centres lie inside the box
and within 1.5 strides of its centre (always the centre cell). Loss: BCE on the class
probabilities of every anchor (sum / positives) + 2 x (1 - GIoU) + 0.5 x L1 of ltrb / stride
on the positives (+ the low-rank penalty). AdamW, warm-up then cosine schedule, batch 32,
fresh scenes every step, ``torch.manual_seed(seed)``, ``torch.set_num_threads(threads)``
(default 1: on the shared 2-core machine two threads ran 2.7x slower per step). Rerunning
with the same torch build and thread count gives byte-identical files (checked: two runs of
the default, same ``detector.onnx`` md5; the ``.npz`` files depend on numpy only).

Writes into ``--out-dir``: ``detector.onnx`` (legacy exporter, opset 17, BN folded,
input ``images`` / output ``output0``, dynamic batch), ``calib.npz`` (key ``images``: 64
scenes from the training generator's distribution, own seed), ``test.npz`` (100 held-out
scenes: ``images`` float32 (100, 3, 96, 96), ``boxes`` float32 (100, 4, 4) xyxy pixels,
``labels`` int64 (100, 4), padding rows have label -1 and box 0).

Tools-only: needs torch (CPU); the evaluation (``tools/evaluate_detector.py``) does not.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

IMAGE_SIZE = 96
CLASSES = ("square", "disc", "triangle", "cross")
STRIDES = (8, 16, 32)
MAX_OBJECTS = 4
SIZE_RANGE = (8, 56)
LEVEL_LIMITS = (20, 40)  # max side < 20 -> stride 8, < 40 -> stride 16, else 32
N_CALIB, N_TEST = 64, 100
OPSET = 17

# seeds of the three scene streams (added to --seed): never the same scene twice
TRAIN_STREAM, CALIB_STREAM, TEST_STREAM = 0, 1_000_003, 2_000_003


# ---------------------------------------------------------------------------- scenes

def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour texture (3, size, size) in about 0.3..0.7 plus fine noise."""
    cells = 7
    low = rng.random((3, cells, cells))
    pos = np.linspace(0, cells - 1, size)
    i0 = np.minimum(np.floor(pos).astype(int), cells - 2)
    f = pos - i0
    rows = low[:, i0] * (1 - f)[None, :, None] + low[:, i0 + 1] * f[None, :, None]
    up = rows[:, :, i0] * (1 - f)[None, None, :] + rows[:, :, i0 + 1] * f[None, None, :]
    return 0.3 + 0.4 * up + rng.normal(0.0, 0.03, (3, size, size))


def _shape_mask(cls: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean mask (side, side) of one shape filling its square."""
    yy, xx = np.mgrid[0:side, 0:side] + 0.5
    c = side / 2.0
    if cls == 0:  # square
        return np.ones((side, side), dtype=bool)
    if cls == 1:  # disc
        return (yy - c) ** 2 + (xx - c) ** 2 <= c * c
    if cls == 2:  # triangle, apex up
        return np.abs(xx - c) <= yy / 2.0
    arm = max(2, int(round(side / 3.0)))  # cross (plus sign)
    lo = (side - arm) // 2
    m = np.zeros((side, side), dtype=bool)
    m[lo:lo + arm, :] = True
    m[:, lo:lo + arm] = True
    return m


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    lt = np.maximum(a[:2], b[:2])
    rb = np.minimum(a[2:], b[2:])
    inter = float(np.prod(np.clip(rb - lt, 0, None)))
    union = float(np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter)
    return inter / union if union > 0 else 0.0


def _colour(rng: np.random.Generator) -> np.ndarray:
    """A colour whose channels are dark (0.02..0.22) or bright (0.78..0.98): contrast ≥ 0.08."""
    bright = rng.random(3) < 0.5
    return np.where(bright, rng.uniform(0.78, 0.98, 3), rng.uniform(0.02, 0.22, 3))


def make_scene(rng: np.random.Generator, size: int = IMAGE_SIZE
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (image uint8 (3, size, size), boxes float32 (k, 4) xyxy, labels int64 (k,))."""
    img = _background(rng, size)
    boxes: list[np.ndarray] = []
    labels: list[int] = []
    want = int(rng.integers(1, MAX_OBJECTS + 1))
    tries = 0
    while len(boxes) < want and tries < 50:
        tries += 1
        cls = int(rng.integers(len(CLASSES)))
        side = int(rng.integers(SIZE_RANGE[0], SIZE_RANGE[1] + 1))
        x0 = int(rng.integers(0, size - side + 1))
        y0 = int(rng.integers(0, size - side + 1))
        mask = _shape_mask(cls, side, rng)
        ys, xs = np.nonzero(mask)
        box = np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1],
                       dtype=np.float64)
        if any(_iou(box, b) > 0.1 for b in boxes):
            continue
        colour = _colour(rng)
        region = img[:, y0:y0 + side, x0:x0 + side]
        region[:, mask] = colour[:, None] + rng.normal(0.0, 0.02, (3, int(mask.sum())))
        boxes.append(box)
        labels.append(cls)
    img8 = np.round(np.clip(img, 0.0, 1.0) * 255.0).astype(np.uint8)
    return (img8, np.array(boxes, dtype=np.float32).reshape(-1, 4),
            np.array(labels, dtype=np.int64))


def make_scenes(n: int, seed: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """``n`` scenes from ``numpy.random.default_rng(seed)``: float32 images (n, 3, S, S) in
    [0, 1], and per-scene boxes / labels lists."""
    rng = np.random.default_rng(seed)
    imgs, boxes, labels = [], [], []
    for _ in range(n):
        im, b, lab = make_scene(rng)
        imgs.append(im)
        boxes.append(b)
        labels.append(lab)
    return np.stack(imgs).astype(np.float32) / 255.0, boxes, labels


def padded(boxes: list[np.ndarray], labels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per-scene lists -> (n, MAX_OBJECTS, 4) float32 boxes, (n, MAX_OBJECTS) int64 labels (-1 pad)."""
    n = len(boxes)
    pb = np.zeros((n, MAX_OBJECTS, 4), dtype=np.float32)
    pl = np.full((n, MAX_OBJECTS), -1, dtype=np.int64)
    for i, (b, lab) in enumerate(zip(boxes, labels)):
        pb[i, :len(b)] = b
        pl[i, :len(lab)] = lab
    return pb, pl


# ---------------------------------------------------------------------------- model

class LowRankConv3x3(nn.Module):
    """A regular 3x3 conv (no bias) trained as ``W[o, i] = P[o, i] * d_i + R[o, i]``.

    ``d_i`` (9 taps per input channel) and ``P`` (cout x cin) are a depthwise 3x3 merged into
    a 1x1 -- the paper's "regular counterpart" of a separable conv -- and ``R`` is a full
    residual, zero at the start and kept small by :func:`lowrank_penalty`. The exported conv is
    one ordinary regular 3x3 (:meth:`merged`): near rank 1 per input channel, not exactly.
    """

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.stride = stride
        self.d = nn.Parameter(torch.randn(cin, 9) / 3.0)
        self.p = nn.Parameter(torch.randn(cout, cin) * math.sqrt(2.0 / cin))
        self.res = nn.Parameter(torch.zeros(cout, cin, 3, 3))

    def weight(self) -> torch.Tensor:
        rank1 = self.p[:, :, None] * self.d[None]
        return rank1.reshape(self.res.shape) + self.res

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight(), None, self.stride, 1)

    def merged(self) -> nn.Conv2d:
        cout, cin = self.p.shape
        conv = nn.Conv2d(cin, cout, 3, self.stride, 1, bias=False)
        with torch.no_grad():
            conv.weight.copy_(self.weight())
        return conv


#: Build 3x3 convs as :class:`LowRankConv3x3` (``--form lowrank``) or plain ``nn.Conv2d``.
FORM = {"value": "lowrank"}


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, stride: int = 1, k: int = 3):
        if k == 3 and FORM["value"] == "lowrank":
            conv = LowRankConv3x3(cin, cout, stride)
        else:
            conv = nn.Conv2d(cin, cout, k, stride, k // 2, bias=False)
        super().__init__(conv, nn.BatchNorm2d(cout), nn.SiLU())


def lowrank_penalty(model: nn.Module) -> torch.Tensor:
    """Sum of squares of every :class:`LowRankConv3x3` residual (0 for plain convs)."""
    terms = [m.res.square().sum() for m in model.modules() if isinstance(m, LowRankConv3x3)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def merge_lowrank(model: nn.Module) -> nn.Module:
    """Replace every :class:`LowRankConv3x3` by its merged regular ``nn.Conv2d`` (in place)."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LowRankConv3x3):
                setattr(module, name, child.merged())
    return model


def residual_share(model: nn.Module) -> list[float]:
    """Per low-rank conv: ||R|| / ||W|| (how far from rank 1 per input channel it trained)."""
    with torch.no_grad():
        return [float(m.res.norm() / m.weight().norm()) for m in model.modules()
                if isinstance(m, LowRankConv3x3)]


class Head(nn.Module):
    """YOLOv8-style decoupled head for one stride: shared 3x3 ``cin -> c``, then box
    3x3 -> 1x1 -> 4 and class 3x3 -> 1x1 -> C."""

    def __init__(self, cin: int, c: int, num_classes: int):
        super().__init__()
        self.stem = ConvBNAct(cin, c)
        self.box = nn.Sequential(ConvBNAct(c, c), nn.Conv2d(c, 4, 1))
        self.cls = nn.Sequential(ConvBNAct(c, c), nn.Conv2d(c, num_classes, 1))
        nn.init.constant_(self.box[-1].bias, 1.0)
        nn.init.constant_(self.cls[-1].bias, -4.6)  # prior 0.01

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stem(x)
        return self.box(x), self.cls(x)


class Detector(nn.Module):
    """Backbone (9 regular 3x3) + FPN (2) + heads (3 x 3): 20 regular 3x3 convs."""

    def __init__(self, num_classes: int = len(CLASSES), size: int = IMAGE_SIZE):
        super().__init__()
        self.num_classes = num_classes
        self.stem = ConvBNAct(3, 16, 2)                                      # /2
        self.stage2 = nn.Sequential(ConvBNAct(16, 32, 2), ConvBNAct(32, 32))  # /4
        self.stage3 = nn.Sequential(ConvBNAct(32, 48, 2), ConvBNAct(48, 48))  # /8
        self.stage4 = nn.Sequential(ConvBNAct(48, 64, 2), ConvBNAct(64, 64))  # /16
        self.stage5 = nn.Sequential(ConvBNAct(64, 80, 2), ConvBNAct(80, 80))  # /32
        self.lat5 = ConvBNAct(80, 64, k=1)
        self.fuse4 = ConvBNAct(64, 64)
        self.lat4 = ConvBNAct(64, 48, k=1)
        self.fuse3 = ConvBNAct(48, 48)
        self.heads = nn.ModuleList([Head(cin, c, num_classes)
                                    for cin, c in ((48, 32), (64, 48), (80, 48))])
        anchors, strides = [], []
        for s in STRIDES:
            g = size // s
            yy, xx = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
            anchors.append(torch.stack([xx, yy]).reshape(2, -1).float().add(0.5).mul(s))
            strides.append(torch.full((g * g,), float(s)))
        self.register_buffer("anchors", torch.cat(anchors, 1), persistent=False)  # (2, A)
        self.register_buffer("strides", torch.cat(strides), persistent=False)     # (A,)

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 4, A) raw box regressions and (N, C, A) class logits, strides concatenated."""
        c2 = self.stage2(self.stem(x))
        c3 = self.stage3(c2)
        c4 = self.stage4(c3)
        c5 = self.stage5(c4)
        p4 = self.fuse4(c4 + F.interpolate(self.lat5(c5), scale_factor=2.0, mode="nearest"))
        p3 = self.fuse3(c3 + F.interpolate(self.lat4(p4), scale_factor=2.0, mode="nearest"))
        boxes, logits = [], []
        for head, p in zip(self.heads, (p3, p4, c5)):
            b, c = head(p)
            boxes.append(b.flatten(2))
            logits.append(c.flatten(2))
        return torch.cat(boxes, 2), torch.cat(logits, 2)

    def ltrb(self, raw_box: torch.Tensor) -> torch.Tensor:
        """Raw regressions -> ltrb distances in pixels (N, 4, A)."""
        return F.softplus(raw_box) * self.strides

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raw_box, logits = self.raw(x)
        d = self.ltrb(raw_box)
        l, t, r, b = d[:, 0:1], d[:, 1:2], d[:, 2:3], d[:, 3:4]
        cx = self.anchors[0] + (r - l) * 0.5
        cy = self.anchors[1] + (b - t) * 0.5
        return torch.cat([cx, cy, l + r, t + b, torch.sigmoid(logits)], 1)


# ---------------------------------------------------------------------------- targets & loss

def level_of(side: float) -> int:
    """Index into STRIDES for a box whose larger side is ``side`` pixels."""
    return 0 if side < LEVEL_LIMITS[0] else (1 if side < LEVEL_LIMITS[1] else 2)


def assign(boxes: list[np.ndarray], labels: list[np.ndarray], anchors: np.ndarray,
           strides: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and anchor: the assigned gt box (n, A, 4) xyxy and class (n, A), -1 = none.

    A gt goes to the anchors of its size's stride whose centre is inside the box and within
    1.5 strides (Chebyshev) of the box centre, and always to the cell holding its centre; an
    anchor claimed twice keeps the smaller box.
    """
    n, a = len(boxes), anchors.shape[1]
    tbox = np.zeros((n, a, 4), dtype=np.float32)
    tcls = np.full((n, a), -1, dtype=np.int64)
    for i, (bs, ls) in enumerate(zip(boxes, labels)):
        area_taken = np.full(a, np.inf)
        for box, lab in zip(bs, ls):
            s = STRIDES[level_of(float(max(box[2] - box[0], box[3] - box[1])))]
            cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
            ax, ay = anchors
            near = (np.abs(ax - cx) < 1.5 * s) & (np.abs(ay - cy) < 1.5 * s)
            inside = (ax > box[0]) & (ax < box[2]) & (ay > box[1]) & (ay < box[3])
            centre = (np.floor(ax / s) == np.floor(cx / s)) & (np.floor(ay / s) == np.floor(cy / s))
            m = (strides == s) & ((near & inside) | centre)
            area = float((box[2] - box[0]) * (box[3] - box[1]))
            m &= area < area_taken
            tbox[i, m] = box
            tcls[i, m] = lab
            area_taken[m] = area
    return tbox, tcls


def giou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Generalised IoU of matching xyxy rows (P, 4)."""
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-6)
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).prod(1)
    return iou - (hull - union) / hull.clamp(min=1e-6)


def detection_loss(model: Detector, x: torch.Tensor, tbox: torch.Tensor, tcls: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    raw_box, logits = model.raw(x)
    pos = tcls >= 0                                             # (n, A)
    npos = max(1, int(pos.sum()))
    target = torch.zeros_like(logits)                           # (n, C, A)
    target.scatter_(1, tcls.clamp(min=0).unsqueeze(1), pos.unsqueeze(1).to(logits.dtype))
    l_cls = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / npos
    d = model.ltrb(raw_box).permute(0, 2, 1)[pos]               # (P, 4) ltrb
    anc = model.anchors.T.unsqueeze(0).expand(len(x), -1, -1)[pos]  # (P, 2)
    strd = model.strides.unsqueeze(0).expand(len(x), -1)[pos].unsqueeze(1)
    pred = torch.cat([anc - d[:, :2], anc + d[:, 2:]], 1)
    gt = tbox[pos]
    gt_ltrb = torch.cat([anc - gt[:, :2], gt[:, 2:] - anc], 1)
    l_giou = (1.0 - giou(pred, gt)).mean()
    l_l1 = ((d - gt_ltrb).abs() / strd).mean()
    loss = l_cls + 2.0 * l_giou + 0.5 * l_l1
    return loss, {"cls": float(l_cls.detach()), "giou": float(l_giou.detach()), "l1": float(l_l1.detach())}


# ---------------------------------------------------------------------------- train / export

def train(model: Detector, steps: int, seed: int, batch: int = 32, lr: float = 2e-3,
          penalty: float = 0.0, log_every: int = 100) -> dict:
    """AdamW + cosine schedule on fresh scenes every step; returns timing and loss history."""
    rng = np.random.default_rng(seed + TRAIN_STREAM)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 5e-4},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    anchors, strides = model.anchors.numpy(), model.strides.numpy()
    warmup = min(100, steps // 10)
    history = []
    t0, c0 = time.perf_counter(), time.process_time()
    run: dict[str, float] = {}
    model.train()
    for step in range(steps):
        scenes = [make_scene(rng) for _ in range(batch)]
        x = torch.from_numpy(np.stack([s[0] for s in scenes]).astype(np.float32) / 255.0)
        tbox, tcls = assign([s[1] for s in scenes], [s[2] for s in scenes], anchors, strides)
        cur = lr * (step + 1) / warmup if step < warmup else \
            0.5 * lr * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = cur
        loss, parts = detection_loss(model, x, torch.from_numpy(tbox), torch.from_numpy(tcls))
        if penalty > 0:
            reg = lowrank_penalty(model)
            parts["res"] = float(reg.detach())
            loss = loss + penalty * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for k, v in {"loss": float(loss.detach()), **parts}.items():
            run[k] = run.get(k, 0.0) + v
        if (step + 1) % log_every == 0 or step + 1 == steps:
            k = (step % log_every) + 1
            rec = {"step": step + 1, **{n: v / k for n, v in run.items()},
                   "seconds": time.perf_counter() - t0}
            history.append(rec)
            print(f"step {step + 1:5d}/{steps}  loss {rec['loss']:.3f}  cls {rec['cls']:.3f}  "
                  f"giou {rec['giou']:.3f}  l1 {rec['l1']:.3f}  |R|² {rec.get('res', 0.0):.3f}  "
                  f"{rec['seconds']:.0f} s", flush=True)
            run = {}
    model.eval()
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "history": history}


def export(model: Detector, path: Path) -> None:
    """Legacy TorchScript exporter: BN folded into Conv, opset 17, dynamic batch."""
    model.eval()
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore")
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
            do_constant_folding=True, input_names=["images"], output_names=["output0"],
            dynamic_axes={"images": {0: "batch"}, "output0": {0: "batch"}},
        )


def check_export(model: Detector, path: Path, x: np.ndarray) -> float:
    """Checker, no BatchNormalization left, onnxruntime vs torch; returns max |diff|."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    if any(n.op_type == "BatchNormalization" for n in proto.graph.node):
        raise RuntimeError(f"{path}: BatchNormalization was not folded")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"images": x})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    return float(np.max(np.abs(got - ref)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models/detector"))
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--form", choices=("lowrank", "plain"), default="lowrank",
                        help="lowrank: each 3x3 trained as rank-1-per-input-channel + penalised "
                             "residual, merged at export; plain: ordinary convs")
    parser.add_argument("--penalty", type=float, default=0.05,
                        help="weight of the residual's sum of squares in the loss (lowrank)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)

    calib, _, _ = make_scenes(N_CALIB, args.seed + CALIB_STREAM)
    np.savez_compressed(args.out_dir / "calib.npz", images=calib)
    test_x, test_b, test_l = make_scenes(N_TEST, args.seed + TEST_STREAM)
    pb, pl = padded(test_b, test_l)
    np.savez_compressed(args.out_dir / "test.npz", images=test_x, boxes=pb, labels=pl)

    FORM["value"] = args.form
    model = Detector()
    n_params = sum(p.numel() for p in model.parameters())
    n3 = sum(1 for m in model.modules() if isinstance(m, LowRankConv3x3)
             or (isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)))
    print(f"{n_params:,} parameters, {n3} regular 3x3 convs, {args.steps} steps x batch "
          f"{args.batch}", flush=True)
    stats = train(model, args.steps, args.seed, batch=args.batch, lr=args.lr,
                  penalty=args.penalty if args.form == "lowrank" else 0.0)
    shares = residual_share(model)
    if shares:
        print("||R|| / ||W|| per 3x3: " + " ".join(f"{v:.3f}" for v in shares), flush=True)
    merge_lowrank(model)
    path = args.out_dir / "detector.onnx"
    export(model, path)
    diff = check_export(model, path, test_x[:8])
    print(f"exported {path} ({path.stat().st_size:,} bytes), max|ort - torch| {diff:.1e}")

    from evaluate_detector import evaluate_vs_ground_truth  # numpy + onnxruntime
    summary = {"form": args.form, "penalty": args.penalty, "residual_share": shares,
               "steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed,
               "threads": args.threads, "params": n_params, "regular_3x3": n3,
               "train_seconds": round(stats["seconds"], 1),
               "train_cpu_seconds": round(stats["cpu_seconds"], 1), "max_abs_export": diff}
    for conf in (0.25, 0.1):
        summary[f"f1_vs_gt@{conf}"] = evaluate_vs_ground_truth(path, args.out_dir / "test.npz",
                                                               conf=conf)["f1"]
    for f in ("detector.onnx", "calib.npz", "test.npz"):
        summary[f"bytes:{f}"] = (args.out_dir / f).stat().st_size
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
