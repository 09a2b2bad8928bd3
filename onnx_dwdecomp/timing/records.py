"""The records of latency selection, shared by the selector (timing/latency.py) and the persistent
timing cache (timing/cache.py): what determines a conv's latency (:class:`ConvConfig`, the
cache's key) and one interleaved measurement of it (:class:`Timing`, the cache's entry). The
noise band's formula is in latency.py's docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ..candidates import ConvLayer
from ..runtime import DEFAULT_PROVIDERS

#: Half-width of the noise band in standard errors of the ratio.
BAND_Z = 2.0


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
    providers : tuple of str
        onnxruntime execution providers of the sessions, in priority order.
    merged_channels : int
        Output channels of the 1×1 conv that the replacement's pointwise conv will be merged
        into (fold.fold_pointwise), 0 when there is none. Then both probes end in that 1×1
        stage: the regular conv followed by the 1×1 conv, against the depthwise part followed
        by the merged pointwise conv — what the output model runs.
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
    providers: tuple[str, ...] = DEFAULT_PROVIDERS
    merged_channels: int = 0

    @classmethod
    def of(cls, layer: ConvLayer, input_shape: tuple[int, ...], *, mid_channels: int, mid_group: int,
           threads: int, providers: Sequence[str] = DEFAULT_PROVIDERS, merged_channels: int = 0) -> "ConvConfig":
        return cls(tuple(int(d) for d in input_shape), int(layer.weight.shape[0]), tuple(layer.kernel),
                   tuple(layer.strides), tuple(layer.pads), tuple(layer.dilations),
                   layer.auto_pad if layer.auto_pad not in ("", "NOTSET") else "NOTSET",
                   int(mid_channels), int(mid_group), layer.bias is not None, layer.weight.dtype.name,
                   int(threads), tuple(providers), int(merged_channels))

    def describe(self) -> str:
        n, c, *hw = self.input_shape
        k = "×".join(map(str, self.kernel))
        s = "×".join(map(str, self.strides))
        merged = f" +1×1→{self.merged_channels}" if self.merged_channels else ""
        return f"{c}→{self.out_channels} {k}/s{s} @{n}×{'×'.join(map(str, hw))}{merged}"


@dataclass(frozen=True)
class Timing:
    """One interleaved measurement of the regular conv and its replacement (milliseconds).

    Attributes
    ----------
    regular_ms, separable_ms : float
        Median latency of each form.
    runs : int
        Interleaved rounds the medians rest on.
    regular_iqr_ms, separable_iqr_ms : float
        Interquartile range of each form's rounds.
    ratio_halfwidth : float
        Half-width ``h`` of the noise band around :attr:`ratio` (see the module docstring).
    retimes : int
        How often the configuration was re-timed because the threshold lay inside the band;
        this measurement is the last of them.
    cached : bool
        Read from the persistent timing cache rather than measured in this run (not part of
        equality: it says where the measurement came from, not what it is).
    clock : str
        ``"cpu"``: the calling thread's CPU time (one intra-op thread), ``"wall"``: wall-clock
        time (clock.clock_for).
    contention, load_average : float
        The machine's load while timing, worst of before and after (clock.machine_load; not
        part of equality, not stored in the cache).
    others : float
        The share of all CPUs other processes used during the rounds (clock.OthersLoad; 0 at
        one thread, where it is not measured).
    loaded : bool
        Other processes competed for the CPUs of a wall-clock timing: used for this run's
        decision, never stored in the timing cache (not part of equality).
    """

    regular_ms: float
    separable_ms: float
    runs: int
    regular_iqr_ms: float = 0.0
    separable_iqr_ms: float = 0.0
    ratio_halfwidth: float = 0.0
    retimes: int = 0
    cached: bool = field(default=False, compare=False)
    clock: str = "wall"
    contention: float = field(default=1.0, compare=False)
    load_average: float = field(default=0.0, compare=False)
    others: float = field(default=0.0, compare=False)
    loaded: bool = field(default=False, compare=False)

    @classmethod
    def from_samples(cls, regular_ms: Sequence[float], separable_ms: Sequence[float]) -> "Timing":
        """The summary of paired per-round latencies: round ``i`` timed ``regular_ms[i]`` and
        ``separable_ms[i]`` back to back.

        Raises
        ------
        ValueError
            The two sequences are empty or of different lengths.
        """
        reg = np.asarray(regular_ms, dtype=np.float64)
        sep = np.asarray(separable_ms, dtype=np.float64)
        if reg.ndim != 1 or reg.shape != sep.shape or reg.size == 0:
            raise ValueError(f"need two equally long, non-empty sample sequences, got shapes "
                             f"{reg.shape} and {sep.shape}")
        regular, separable = float(np.median(reg)), float(np.median(sep))
        halfwidth = 0.0
        if np.all(reg > 0) and np.all(sep > 0):
            log_q = np.log(sep / reg)
            sigma = 1.4826 * float(np.median(np.abs(log_q - np.median(log_q))))
            halfwidth = BAND_Z * math.sqrt(math.pi / 2) * sigma / math.sqrt(reg.size) * separable / regular
        return cls(regular, separable, int(reg.size), _iqr(reg), _iqr(sep), halfwidth)

    @property
    def ratio(self) -> float:
        """``separable_ms / regular_ms``; below 1 the replacement is faster."""
        return self.separable_ms / self.regular_ms if self.regular_ms > 0 else float("inf")

    @property
    def retimed(self) -> bool:
        return self.retimes > 0

    def load_text(self) -> str:
        """How the timing was taken: clock and, under load, the load (for reports)."""
        clock = "CPU time of the calling thread" if self.clock == "cpu" else "wall clock"
        if not self.loaded:
            return clock
        return (f"{clock}, under load: other processes used {100 * self.others:.0f} % of the CPUs, CPU contention "
                f"×{self.contention:.2f}, load average {self.load_average:.1f}; {self.runs} rounds, not cached")


def _iqr(x: np.ndarray) -> float:
    q1, q3 = np.percentile(x, [25, 75])
    return float(q3 - q1)
