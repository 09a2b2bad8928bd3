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
bias, dtype, thread count and execution providers — is timed once (:class:`LatencySelector`
keeps each configuration's timing for the run, and with a
:class:`~onnx_dwdecomp.timing.cache.TimingCache` across runs; ShuffleNet V2 x1.0 has 20
candidates but 8 configurations). Two one-purpose models are built with seeded random weights
of the real shapes:

    regular:    x → Conv(W, b) → y
    separable:  x → Conv(depthwise or k×k low-rank) → t → Conv(1×1, b) → y

exactly as rewrite.py emits them: at multiplier ``r > 1`` the depthwise part is ``r`` convs with
``group = C`` and one output channel per group, joined by a Concat (onnxruntime's CPU depthwise
kernel only serves one output channel per group; a ``group = C`` conv with ``C·r`` outputs takes
the slow grouped-GEMM path and measured slower than the regular conv here).

and run in onnxruntime with a deployment's settings (all graph optimisations, sequential
execution, ``threads`` intra-op threads, spinning off as in ``bench``), interleaved regular,
separable, regular, … (:func:`onnx_dwdecomp.timing.clock.interleaved_timings`) so that machine noise
hits both alike. A short first pass estimates the per-call time, the second pass takes as many
rounds as fit in ``budget_s`` (between ``min_runs`` and ``max_runs``).

Decision
--------
With the medians of ``n`` rounds, the point estimate of the ratio and the threshold are

    R = median(separable) / median(regular),        θ = 1 − min_gain,

and the conv is rewritten when ``R ≤ θ``, with ``min_gain = 0.05`` by default: the separable
form must be at least 5 % faster. Below that a difference is within what repeated measurements
of the same pair vary by on a busy 2-core machine, and a rewrite that only *might* be faster
also costs accuracy. The threshold is deliberately asymmetric: leaving a conv regular is always
safe.

Noise band. Round ``i`` times both forms back to back, so its ratio ``q_i = s_i / r_i`` cancels
the noise that hits both alike; the spread of the ``q_i`` is the noise that does not cancel.
From it (:meth:`Timing.from_samples`):

    σ = 1.4826 · median_i | ln q_i − median_j ln q_j |      (MAD, consistent for a normal σ)
    SE = sqrt(π/2) · σ / sqrt(n)                            (standard error of a median of n)
    h = z · SE · R,  z = 2                                  (≈ 95 %; ln → ratio, delta method)

and the band is ``[R − h, R + h]``. When the threshold lies strictly inside it,
``|R − θ| < h``, the rounds cannot tell which side of ``θ`` the true ratio is on, and the
configuration is re-timed with :data:`RETIME_FACTOR` (3) times the budget and round limits, up to
:data:`MAX_RETIMES` (2) times (3×, then 9×); each re-timing replaces the previous measurement
and narrows the band by about ``sqrt(3)``. Whenever ``θ`` is on the band's edge or outside
it, ``R ≤ θ`` decides; still inside after the last re-timing, the conv stays regular — the
safe side, and the one that does not flip from run to run on a machine whose load changes
(measured on a loaded 2-core machine: ratios of 10–35 µs convs moved by ±0.1–0.5 between runs). A band of width 0 (one round, or rounds without
spread) never re-times. Every :class:`Decision` carries its :class:`Timing`: medians,
interquartile ranges, rounds, the band, how often it was re-timed, and whether it came from the
persistent cache.

Timings depend on the machine, the onnxruntime version, the thread count and the load at the
moment, so two runs without a shared timing cache can choose differently for a conv near the
threshold; the noise band makes that rarer and the cache (keyed by all of those, see
:mod:`onnx_dwdecomp.timing.cache`) makes a repeated run on the same machine reuse the same
timings. ``select="all"`` (``--select all``) times nothing (a uniform multiplier rewrites every
candidate, a plan prices its options by MACs): use
it for outputs that are the same on every machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..candidates import ConvLayer
from ..errors import DwDecompError, first_line
from ..memory import THREAD_BYTES, require
from ..progress import say
from ..runtime import DEFAULT_PROVIDERS, session_options
from .cache import TimingCache
from .clock import OTHERS_BUSY, OthersLoad, clock_for, default_threads, interleaved_timings, machine_load
from .records import BAND_Z, ConvConfig, Timing

__all__ = ["MIN_GAIN", "BAND_Z", "MAX_RETIMES", "RETIME_FACTOR", "DEFAULT_PROVIDERS", "ConvConfig",
           "Timing", "Decision", "Timer", "LatencySelector", "TimingError", "decide", "within_noise",
           "conv_pair_models", "ort_timer"]

#: The separable form must be at least this much faster (relative median) to be chosen.
MIN_GAIN = 0.05
#: At most this many re-timings of a configuration whose threshold lies inside the noise band.
MAX_RETIMES = 2
#: Each re-timing multiplies the budget and the round limits of the previous one by this.
RETIME_FACTOR = 3
_OPSET = 17


@dataclass(frozen=True)
class Decision:
    """Whether to rewrite, why, and the timing it rests on (None when nothing was timed)."""

    rewrite: bool
    reason: str
    timing: Timing | None = None


#: ``timer(config, scale) → Timing``: measures ``config`` with ``scale`` times the base budget
#: and round limits (1 for the first timing, ``RETIME_FACTOR ** k`` for the k-th re-timing).
Timer = Callable[[ConvConfig, int], Timing]


class TimingError(DwDecompError):
    """onnxruntime could not build or run a probe model (e.g. a dtype its CPU convs lack)."""


def within_noise(timing: Timing, min_gain: float = MIN_GAIN) -> bool:
    """Whether the threshold ``1 − min_gain`` lies strictly inside the timing's noise band
    ``ratio ± ratio_halfwidth``; on the band's edge the point estimate is trusted."""
    return abs(timing.ratio - (1.0 - min_gain)) < timing.ratio_halfwidth


def decide(timing: Timing, min_gain: float = MIN_GAIN, time_limit_s: float | None = None) -> Decision:
    """The rewrite decision on the point estimate of one timing, or "keep regular" when the
    threshold is still inside the noise band after the last re-timing (module docstring) — or
    before it, when ``time_limit_s`` is given: the re-timing would not fit in that budget.

    The reason states the medians and the evidence: ratio and band, rounds, re-timings and the
    persistent cache.
    """
    t = timing
    text = f"separable {t.separable_ms:.3f} ms vs regular {t.regular_ms:.3f} ms"
    evidence = f"ratio {t.ratio:.3f} ± {t.ratio_halfwidth:.3f}, {t.runs} round{'s' if t.runs != 1 else ''}"
    if t.retimed:
        evidence += f", re-timed {t.retimes}×"
    if t.cached:
        evidence += ", from the timing cache"
    if within_noise(t, min_gain) and t.retimes >= MAX_RETIMES:
        return Decision(False, f"within noise after {t.retimes} re-timings, kept regular: {text} ({evidence})", t)
    if within_noise(t, min_gain) and time_limit_s is not None:
        return Decision(False, f"within noise, and a re-timing would not fit in the {time_limit_s:.3g} s this "
                               f"timing may take; kept regular: {text} ({evidence})", t)
    if t.regular_ms > 0 and t.separable_ms <= (1.0 - min_gain) * t.regular_ms:
        return Decision(True, f"faster: {text} (×{1 / t.ratio:.2f}; {evidence})", t)
    return Decision(False, f"not faster: {text}; needs ≥ {100 * min_gain:g} % lower median ({evidence})", t)


def conv_pair_models(config: ConvConfig, seed: int = 0) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """The one-conv regular model and the two-conv replacement model of ``config`` (with
    ``merged_channels``: regular conv + 1×1 conv against the replacement with its pointwise conv
    merged into that 1×1 conv).

    The replacement has the form :mod:`onnx_dwdecomp.rewrite` emits: for the separable form at
    multiplier ``r = mid_channels / C > 1`` (``mid_group = C``) that is ``r`` depthwise convs
    (``group = C``, ``C`` outputs each, weights ``D0`` … ``D{r-1}``), a ``Concat`` on axis 1 and the
    1×1 conv, not one grouped conv with ``r`` outputs per group (which onnxruntime's CPU ``Conv``
    runs on a much slower path); otherwise one first conv (weight ``D``, ``mid_group`` groups)
    and the 1×1 conv. Weights are seeded random numbers of the real shapes; input ``x`` has
    ``config.input_shape``.
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

    m = config.merged_channels
    regular_inputs = ["x", "W"] + (["B"] if config.bias else [])
    regular_inits = [const("W", (n, c, *config.kernel))] + ([const("B", (n,))] if config.bias else [])
    regular_nodes = [helper.make_node("Conv", regular_inputs, ["u" if m else "y"], group=1, **spatial)]
    if m:  # the 1×1 conv it feeds, which the separable form absorbs
        regular_nodes.append(helper.make_node("Conv", ["u", "Q", "C"], ["y"], kernel_shape=ones, group=1))
        regular_inits += [const("Q", (m, n, *ones)), const("C", (m,))]
    regular = model(regular_nodes, regular_inits)
    mid, group = config.mid_channels, config.mid_group
    r = mid // c
    if group == c and r > 1 and mid == c * r:  # split depthwise form, as rewrite.py emits it
        first = [helper.make_node("Conv", ["x", f"D{j}"], [f"t{j}"], group=c, **spatial) for j in range(r)]
        first.append(helper.make_node("Concat", [f"t{j}" for j in range(r)], ["t"], axis=1))
        first_inits = [const(f"D{j}", (c, 1, *config.kernel)) for j in range(r)]
    else:
        first = [helper.make_node("Conv", ["x", "D"], ["t"], group=group, **spatial)]
        first_inits = [const("D", (mid, c // group, *config.kernel))]
    out = m or n
    separable = model(
        first + [helper.make_node("Conv", ["t", "P", "B"], ["y"], kernel_shape=ones, group=1)],
        first_inits + [const("P", (out, mid, *ones)), const("B", (out,))])
    return regular, separable


def _session(model: onnx.ModelProto, threads: int, providers: Sequence[str]):
    import onnxruntime as ort

    missing = [p for p in providers if p not in ort.get_available_providers()]
    if missing:  # onnxruntime would fall back to the CPU with only a warning
        raise ValueError(f"execution provider(s) {', '.join(missing)} not available in this onnxruntime")
    return ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=list(providers))


def probe_bytes(config: ConvConfig) -> int:
    """Memory the probes of ``config`` need at least (resources.py): the random input (drawn in
    float64), and per probe session its output and the depthwise part's output, ``threads``
    thread allowances each."""
    itemsize = np.dtype(config.dtype).itemsize
    n, c, *hw = config.input_shape
    begin, end = config.pads[:len(hw)], config.pads[len(hw):]
    positions = 1
    for k, h in enumerate(hw):
        if config.auto_pad == "NOTSET" and len(config.pads) == 2 * len(hw):
            positions *= max((h + begin[k] + end[k] - config.dilations[k] * (config.kernel[k] - 1) - 1)
                             // config.strides[k] + 1, 1)
        else:
            positions *= -(-h // config.strides[k])
    x = n * c * math.prod(hw)
    y = n * (config.merged_channels or config.out_channels) * positions
    mid = n * config.mid_channels * positions
    return x * (8 + itemsize) + 2 * (y + mid) * itemsize + 2 * config.threads * THREAD_BYTES


def ort_timer(config: ConvConfig, scale: int = 1, *, budget_s: float = 0.15, min_runs: int = 7,
              max_runs: int = 100, warmup: int = 2, seed: int = 0) -> Timing:
    """Per-round onnxruntime latencies of the regular conv and its replacement, interleaved
    (:func:`timed_pair`). The sessions use ``config.threads`` and ``config.providers``.

    Raises
    ------
    TimingError
        onnxruntime cannot build or run the probe models, or lacks one of the providers.
    """
    require(probe_bytes(config), f"timing {config.describe()} in onnxruntime",
                      "--select all times nothing")
    regular, separable = conv_pair_models(config, seed)
    x = np.random.default_rng(seed).standard_normal(config.input_shape).astype(config.dtype)
    try:
        sessions = [_session(m, config.threads, config.providers) for m in (regular, separable)]
        fns = [lambda s=s: s.run(None, {"x": x}) for s in sessions]
        return timed_pair(fns, config.threads, scale, budget_s=budget_s, min_runs=min_runs, max_runs=max_runs,
                          warmup=warmup)
    except TimingError:
        raise
    except Exception as exc:  # onnxruntime raises its own unrelated exception types
        raise TimingError(f"onnxruntime cannot run {config.describe()}: {first_line(exc)}") from exc


#: A timing whose rounds will take longer than this says so (progress).
LONG_TIMING_S = 5.0
#: A timing at more than one thread on a busy machine takes this many times its rounds more.
BUSY_RETIME = 3
#: Rounds beyond what fits in this many seconds (× the re-timing scale) are not required:
#: a slow model (seconds a round) is timed on fewer than ``min_runs`` rounds, at least 3.
MAX_TIMING_S = 10.0


def timed_pair(fns: Sequence[Callable[[], object]], threads: int, scale: int = 1, *, budget_s: float,
               min_runs: int, max_runs: int, warmup: int) -> Timing:
    """The :class:`Timing` of two calls (regular, separable) at ``threads`` onnxruntime threads.

    A first pass of 3 rounds (after ``warmup`` untimed calls each) estimates the time per round;
    the second pass runs ``scale · budget_s / round`` rounds, clamped to
    ``[scale · min_runs, scale · max_runs]`` — the lower end lowered to what fits in
    ``scale · MAX_TIMING_S`` (at least 3 rounds) for slow models. At one thread the rounds are
    timed on the calling thread's CPU time. At more, on the wall clock; when the machine was
    busy — other processes used more than ``OTHERS_BUSY`` of the CPUs during the rounds
    (clock.OthersLoad), or clock.machine_load found it busy before or after — ``BUSY_RETIME`` ×
    as many rounds more are timed (their noise averages out), and the timing is ``loaded``:
    used for this run, never cached.
    """
    contention, load, busy = machine_load(threads)
    clock_name, clock = clock_for(threads)
    meter = OthersLoad().start() if threads > 1 else None
    probe = interleaved_timings(fns, runs=3, warmup=warmup, clock=clock)
    per_round = max(float(sum(np.median(t) for t in probe)), 1e-9)
    least = min(scale * min_runs, max(3, math.ceil(scale * MAX_TIMING_S / per_round)))
    runs = int(np.clip(scale * budget_s / per_round, least, scale * max_runs))
    if runs * per_round > LONG_TIMING_S:
        say(f"timing: {runs} interleaved rounds, ~{runs * per_round:.0f} s")
    times = interleaved_timings(fns, runs=runs, warmup=0, clock=clock)
    after = machine_load(threads)
    others = meter.share() if meter is not None else None
    if meter is not None:
        busy = busy or after[2] or (others is not None and others > OTHERS_BUSY)
        if busy:  # load's noise averages out over more rounds (what fits in the time cap); not kept
            extra = min(BUSY_RETIME * runs, max(3, math.ceil(BUSY_RETIME * scale * MAX_TIMING_S / per_round)))
            if extra * per_round > LONG_TIMING_S:
                say(f"timing: under load, {extra} rounds more, ~{extra * per_round:.0f} s")
            more = interleaved_timings(fns, runs=extra, warmup=0, clock=clock)
            times = [np.concatenate([t, m]) for t, m in zip(times, more)]
    timing = Timing.from_samples(1e3 * times[0], 1e3 * times[1])
    return replace(timing, clock=clock_name, contention=max(contention, after[0]), load_average=max(load, after[1]),
                   others=others or 0.0, loaded=meter is not None and busy)


def _seconds(timing: Timing) -> float:
    """What a timing's rounds took, from its medians (both calls, every round): the cost of a
    cached timing, whose wall time is not known."""
    return timing.runs * (timing.regular_ms + timing.separable_ms) / 1e3


class LatencySelector:
    """Decides per conv, timing each distinct :class:`ConvConfig` once.

    Parameters
    ----------
    timer : callable ``(ConvConfig, scale) → Timing``, optional
        Default :func:`ort_timer`. Tests inject a cost function here.
    threads : int, optional
        onnxruntime intra-op threads for the timing (default: the CPUs this process may use).
    min_gain : float
        Required relative gain of the separable median, see :func:`decide`.
    cache : TimingCache, optional
        Persistent timings: looked up before timing, every new timing is stored in it. Without
        one, timings live for this selector only.
    providers : sequence of str
        onnxruntime execution providers of the probe sessions (part of every configuration).
    time_limit_s : float, optional
        What one decision's timings may take (their rounds, both calls): a re-timing that would
        pass it is not run, and a ratio still within its noise band keeps the regular form.

    Attributes
    ----------
    timings : dict
        This selector's timing (or :class:`TimingError`) of every configuration it saw.
    cache_hits : set of ConvConfig
        The configurations whose timing was found in the persistent cache.
    """

    def __init__(self, timer: Timer | None = None, *, threads: int | None = None,
                 min_gain: float = MIN_GAIN, cache: TimingCache | None = None,
                 providers: Sequence[str] = DEFAULT_PROVIDERS, time_limit_s: float | None = None):
        self.timer = timer or ort_timer
        self.time_limit_s = time_limit_s
        self.threads = threads or default_threads()
        self.min_gain = min_gain
        self.cache = cache
        self.providers = tuple(providers)
        self.timings: dict[ConvConfig, Timing | TimingError] = {}
        self.cache_hits: set[ConvConfig] = set()

    def config(self, layer: ConvLayer, input_shape: tuple[int, ...], *, mid_channels: int,
               mid_group: int, merged_channels: int = 0) -> ConvConfig:
        """The configuration of ``layer`` replaced by ``mid_channels`` channels in ``mid_group``
        groups (``C·r`` and ``C`` prices the separable form at multiplier ``r``), with this
        selector's threads and providers."""
        return ConvConfig.of(layer, input_shape, mid_channels=mid_channels, mid_group=mid_group,
                             threads=self.threads, providers=self.providers, merged_channels=merged_channels)

    def timing(self, config: ConvConfig) -> Timing:
        """The timing of any configuration (e.g. an option at another multiplier): this
        selector's, else the persistent cache's, else measured now and stored in both.

        Raises
        ------
        TimingError
            The timer failed for this configuration (remembered by this selector, not persisted).
        """
        result = self.timings.get(config)
        if result is None:
            result = self.cache.get(config) if self.cache is not None else None
            if result is None:
                return self._measure(config, retimes=0)
            self.cache_hits.add(config)
            self.timings[config] = result
        if isinstance(result, TimingError):
            raise result
        return result

    def decide(self, config: ConvConfig) -> Decision:
        """:func:`decide` on the configuration's timing, re-timed while the threshold lies inside
        its noise band (at most :data:`MAX_RETIMES` times); a configuration that cannot be timed
        stays regular."""
        try:
            # what a timing took: its wall seconds (rounds, warm-ups, sessions, extra rounds under
            # load), at least its rounds' medians (a cached timing's cost); a re-timing takes
            # RETIME_FACTOR × the last
            t0 = time.perf_counter()
            timing = self.timing(config)
            spent = last = max(time.perf_counter() - t0, _seconds(timing))
            while within_noise(timing, self.min_gain) and timing.retimes < MAX_RETIMES:
                if self.time_limit_s is not None and spent + RETIME_FACTOR * last > self.time_limit_s:
                    return decide(timing, self.min_gain, self.time_limit_s)
                t0 = time.perf_counter()
                timing = self._measure(config, retimes=timing.retimes + 1)
                last = max(time.perf_counter() - t0, _seconds(timing))
                spent += last
        except TimingError as exc:
            return Decision(False, f"not timed ({exc}); kept regular, --select all forces it")
        return decide(timing, self.min_gain)

    def _measure(self, config: ConvConfig, retimes: int) -> Timing:
        """Time ``config`` with ``RETIME_FACTOR ** retimes`` times the base budget and record the
        result, replacing any earlier timing."""
        try:
            timing = replace(self.timer(config, RETIME_FACTOR ** retimes), retimes=retimes)
        except TimingError as exc:
            self.timings[config] = exc
            raise
        self.timings[config] = timing
        if self.cache is not None and not timing.loaded:  # a timing under load is not kept
            self.cache.put(config, timing)
        return timing
