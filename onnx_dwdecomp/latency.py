"""Latency-aware selection: rewrite a conv only where onnxruntime runs the two-conv form faster.

Fewer multiply-adds do not always mean lower latency. A depthwise conv does little arithmetic
per byte it reads, so it is memory-bound; splitting one conv into two also adds a second kernel
launch and writes an intermediate tensor. For ShuffleNet V2's 3-channel stem (3 → 24, 3×3,
stride 2, 224²) the separable form does 6.5× fewer MACs, yet measures about 1.3× *slower*
here (onnxruntime 1.32, 2 threads), while its inner 3×3 convs get 2–5× faster.

Method
------
For each candidate conv, the *configuration* that determines its speed — input shape (batch
and spatial size as resolved for the run), output channels, kernel, strides, pads/auto_pad,
dilations, the replacement's middle width and grouping (``C·r`` channels with ``group = C`` for
the separable form at multiplier ``r``; ``d'`` channels, group 1, for a channel decomposition),
bias, dtype and thread count — is timed once per run (:class:`LatencySelector` caches by
configuration; ShuffleNet V2 x1.0 has 20 candidates but 8 configurations). Two one-purpose
models are built with seeded random weights of the real shapes:

    regular:    x → Conv(W, b) → y
    separable:  x → Conv(depthwise or k×k low-rank) → t → Conv(1×1, b) → y

and run in onnxruntime with a deployment's settings (all graph optimisations, sequential
execution, ``threads`` intra-op threads, spinning off as in ``bench``), interleaved regular,
separable, regular, … (:func:`onnx_dwdecomp.bench.interleaved_timings`) so that machine noise
hits both alike. A short first pass estimates the per-call time, the second pass takes as many
rounds as fit in ``budget_s`` (between ``min_runs`` and ``max_runs``).

Decision
--------
Rewrite when ``median(separable) ≤ (1 − min_gain) · median(regular)``, with
``min_gain = 0.05`` by default: the separable form must be at least 5 % faster. Below that a
difference is within what repeated measurements of the same pair vary by on a busy 2-core
machine, and a rewrite that only *might* be faster also costs accuracy. The threshold is
deliberately asymmetric: leaving a conv regular is always safe.

Timings depend on the machine, the onnxruntime version, the thread count and the load at the
moment, so two runs can choose differently for a conv near the threshold. ``select="all"``
(``--select all``) skips the timing and rewrites every candidate: use it for reproducible
outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .bench import default_threads, interleaved_timings
from .candidates import ConvLayer
from .errors import DwDecompError, first_line
from .runtime import session_options

__all__ = ["MIN_GAIN", "ConvConfig", "Timing", "Decision", "LatencySelector", "TimingError", "decide",
           "conv_pair_models", "ort_timer"]

#: The separable form must be at least this much faster (relative median) to be chosen.
MIN_GAIN = 0.05
_OPSET = 17


@dataclass(frozen=True)
class ConvConfig:
    """Everything that determines the latency of one conv and of its two-conv replacement.

    Attributes
    ----------
    input_shape : tuple of int
        ``(N, C, H, W)`` as the conv sees it in this run.
    out_channels : int
    kernel, strides, dilations : tuple of int
    pads : tuple of int
        ONNX order ``(top, left, bottom, right)``; ignored when ``auto_pad`` is set.
    auto_pad : str
    mid_channels : int
        Channels between the two convs of the replacement (``C·r`` or ``d'``).
    mid_group : int
        ``group`` of the first conv of the replacement (``C`` for depthwise, 1 for low-rank).
    bias : bool
        Whether the regular conv has a bias (the replacement's second conv always has one).
    dtype : str
        Weight dtype name, e.g. ``"float32"``.
    threads : int
        onnxruntime intra-op threads.
    """

    input_shape: tuple[int, ...]
    out_channels: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]
    auto_pad: str
    mid_channels: int
    mid_group: int
    bias: bool
    dtype: str
    threads: int

    @classmethod
    def of(cls, layer: ConvLayer, input_shape: tuple[int, ...], *, mid_channels: int, mid_group: int,
           threads: int) -> "ConvConfig":
        return cls(tuple(int(d) for d in input_shape), int(layer.weight.shape[0]), tuple(layer.kernel),
                   tuple(layer.strides), tuple(layer.pads), tuple(layer.dilations),
                   layer.auto_pad if layer.auto_pad not in ("", "NOTSET") else "NOTSET",
                   int(mid_channels), int(mid_group), layer.bias is not None, layer.weight.dtype.name,
                   int(threads))

    def describe(self) -> str:
        n, c, *hw = self.input_shape
        k = "×".join(map(str, self.kernel))
        s = "×".join(map(str, self.strides))
        return f"{c}→{self.out_channels} {k}/s{s} @{n}×{'×'.join(map(str, hw))}"


@dataclass(frozen=True)
class Timing:
    """Median latencies (milliseconds) of the regular conv and its replacement."""

    regular_ms: float
    separable_ms: float
    runs: int

    @property
    def ratio(self) -> float:
        """``separable_ms / regular_ms``; below 1 the replacement is faster."""
        return self.separable_ms / self.regular_ms if self.regular_ms > 0 else float("inf")


@dataclass(frozen=True)
class Decision:
    """Whether to rewrite, why, and the timing it rests on (None when nothing was timed)."""

    rewrite: bool
    reason: str
    timing: Timing | None = None


Timer = Callable[[ConvConfig], Timing]


class TimingError(DwDecompError):
    """onnxruntime could not build or run a probe model (e.g. a dtype its CPU convs lack)."""


def decide(timing: Timing, min_gain: float = MIN_GAIN) -> Decision:
    """The rewrite decision for one measured configuration (see the module docstring)."""
    t = timing
    text = f"separable {t.separable_ms:.3f} ms vs regular {t.regular_ms:.3f} ms"
    if t.regular_ms > 0 and t.separable_ms <= (1.0 - min_gain) * t.regular_ms:
        return Decision(True, f"faster: {text} (×{1 / t.ratio:.2f})", t)
    return Decision(False, f"not faster: {text}; needs ≥ {100 * min_gain:g} % lower median", t)


def conv_pair_models(config: ConvConfig, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The one-conv regular model and the two-conv replacement model of ``config``.

    Weights are seeded random numbers of the real shapes; input ``x`` has ``config.input_shape``.
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(config.dtype)
    n, c = config.out_channels, config.input_shape[1]
    spatial = {"kernel_shape": list(config.kernel), "strides": list(config.strides),
               "dilations": list(config.dilations)}
    if config.auto_pad != "NOTSET":
        spatial["auto_pad"] = config.auto_pad
    else:
        spatial["pads"] = list(config.pads)
    ones = [1] * len(config.kernel)

    def const(name, shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(dtype), name)

    def model(nodes, inits):
        elem = helper.np_dtype_to_tensor_dtype(dtype)
        graph = helper.make_graph(nodes, "latency_probe",
                                  [helper.make_tensor_value_info("x", elem, list(config.input_shape))],
                                  [helper.make_tensor_value_info("y", elem, [f"d{i}" for i in range(
                                      len(config.input_shape))])], initializer=inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)])
        m.ir_version = 8
        return m

    regular_inputs = ["x", "W"] + (["B"] if config.bias else [])
    regular_inits = [const("W", (n, c, *config.kernel))] + ([const("B", (n,))] if config.bias else [])
    regular = model([helper.make_node("Conv", regular_inputs, ["y"], group=1, **spatial)], regular_inits)
    mid, group = config.mid_channels, config.mid_group
    separable = model(
        [helper.make_node("Conv", ["x", "D"], ["t"], group=group, **spatial),
         helper.make_node("Conv", ["t", "P", "B"], ["y"], kernel_shape=ones, group=1)],
        [const("D", (mid, c // group, *config.kernel)), const("P", (n, mid, *ones)), const("B", (n,))])
    return regular, separable


def _session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    return ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                providers=["CPUExecutionProvider"])


def ort_timer(config: ConvConfig, *, budget_s: float = 0.15, min_runs: int = 7, max_runs: int = 100,
              warmup: int = 2, seed: int = 0) -> Timing:
    """Median onnxruntime latency of the regular conv and its replacement, interleaved.

    A first pass of 3 rounds (after ``warmup`` untimed calls each) estimates the time per round;
    the second pass runs ``budget_s / round`` rounds, clamped to ``[min_runs, max_runs]``.
    """
    regular, separable = conv_pair_models(config, seed)
    x = np.random.default_rng(seed).standard_normal(config.input_shape).astype(config.dtype)
    try:
        sessions = [_session(regular, config.threads), _session(separable, config.threads)]
        fns = [lambda s=s: s.run(None, {"x": x}) for s in sessions]
        probe = interleaved_timings(fns, runs=3, warmup=warmup)
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise TimingError(f"onnxruntime cannot run {config.describe()}: {first_line(exc)}") from exc
    per_round = float(sum(np.median(t) for t in probe))
    runs = int(np.clip(budget_s / max(per_round, 1e-9), min_runs, max_runs))
    times = interleaved_timings(fns, runs=runs, warmup=0)
    return Timing(1e3 * float(np.median(times[0])), 1e3 * float(np.median(times[1])), runs)


class LatencySelector:
    """Decides per conv, timing each distinct :class:`ConvConfig` once.

    Parameters
    ----------
    timer : callable ``ConvConfig → Timing``, optional
        Default :func:`ort_timer`. Tests inject a cost function here.
    threads : int, optional
        onnxruntime intra-op threads for the timing (default: the CPUs this process may use).
    min_gain : float
        Required relative gain of the separable median, see :func:`decide`.
    """

    def __init__(self, timer: Timer | None = None, *, threads: int | None = None,
                 min_gain: float = MIN_GAIN):
        self.timer = timer or ort_timer
        self.threads = threads or default_threads()
        self.min_gain = min_gain
        self.cache: dict[ConvConfig, Timing | TimingError] = {}

    def config(self, layer: ConvLayer, input_shape: tuple[int, ...], *, mid_channels: int,
               mid_group: int) -> ConvConfig:
        return ConvConfig.of(layer, input_shape, mid_channels=mid_channels, mid_group=mid_group,
                             threads=self.threads)

    def timing(self, config: ConvConfig) -> Timing:
        """The cached timing of ``config``, measured on first use.

        Raises
        ------
        TimingError
            The timer failed for this configuration (the failure is cached too).
        """
        if config not in self.cache:
            try:
                self.cache[config] = self.timer(config)
            except TimingError as exc:
                self.cache[config] = exc
        result = self.cache[config]
        if isinstance(result, TimingError):
            raise result
        return result

    def decide(self, config: ConvConfig) -> Decision:
        """:func:`decide` on the cached timing; a configuration that cannot be timed stays regular."""
        try:
            timing = self.timing(config)
        except TimingError as exc:
            return Decision(False, f"not timed ({exc}); kept regular, --select all forces it")
        return decide(timing, self.min_gain)
