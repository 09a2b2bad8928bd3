"""The chosen plan checked as a whole: is the rewritten model faster than the one it replaces?

Per-conv timings price the options (timing/latency.py), but tiny convs time as noise (the same 20 µs
conv measured 25.6 and 16.5 µs in two runs) and their sum leaves out what the rewrite changes
around them (an extra intermediate tensor, a Concat). So the plan's model and the model it
would otherwise hand back (every conv regular, BatchNormalization folded) are timed against
each other in onnxruntime, interleaved like ``bench``, on one input at the job's shapes, with
the deployment's settings (all graph optimisations, the job's threads and providers).

The decision is :func:`latency.decide` on that pair (regular = the all-regular model, separable =
the plan's) with ``min_gain = MODEL_MIN_GAIN``: re-timed with 3× and 9× the rounds while the
threshold lies inside the noise band, and still inside, *not faster* — the safe side. A timing
is stored in the persistent timing cache under the sha256 of both serialized models, the input
shapes, threads and providers (plus the cache's onnxruntime version and CPU), so the same job
on the same machine decides alike whatever the load. At one thread the rounds are timed on the
calling thread's CPU time, which load barely changes; at more, on the wall clock, and a timing
taken while other processes competed for the CPUs (timing.machine_load) decides this run but is
not stored: a busy machine's verdict is never frozen for the next run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..errors import first_line
from ..runtime import session_options
from .cache import TimingCache
from .latency import Decision, LatencySelector, Timing, TimingError, timed_pair

#: The plan's model must be at least this much faster (median ratio) than the all-regular one.
MODEL_MIN_GAIN = 0.02
#: Timing budget (seconds) of the first measurement; re-timings scale it (latency.RETIME_FACTOR).
BUDGET_S = 0.5
#: One verdict's timings may take this many forward passes of the calibration set (the job's
#: yardstick, report.job_cost), and at least CHECK_MIN_S seconds: a re-timing that would pass
#: that is not run, and a ratio still within its noise band keeps every conv regular. (A
#: 1024² model at 0.5 s a run took 130 rounds of both models, 169 s, for one "not faster".)
CHECK_FORWARDS = 3
CHECK_MIN_S = 30.0


def check_time_limit(forward_s: float | None) -> float:
    """Seconds one whole-model verdict may take, given the job's forward pass (None: no data)."""
    return max(CHECK_MIN_S, CHECK_FORWARDS * (forward_s or 0.0))


@dataclass(frozen=True)
class ModelPair:
    """What a whole-model timing depends on (its timing-cache key, with the cache's own parts)."""

    kind: str
    reference_sha256: str
    candidate_sha256: str
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    threads: int
    providers: tuple[str, ...]

    def describe(self) -> str:
        shapes = ", ".join(f"{name} {'×'.join(map(str, dims))}" for name, dims in self.input_shapes)
        return f"whole model ({shapes}; {self.threads} thread{'s' if self.threads != 1 else ''})"


def model_pair(reference: bytes, candidate: bytes, feeds: dict[str, np.ndarray], threads: int,
               providers: Sequence[str]) -> ModelPair:
    digest = lambda b: hashlib.sha256(b).hexdigest()  # noqa: E731
    shapes = tuple(sorted((name, tuple(int(d) for d in v.shape)) for name, v in feeds.items()))
    return ModelPair("model_pair", digest(reference), digest(candidate), shapes, int(threads), tuple(providers))


def ort_model_timer(reference: bytes, candidate: bytes, feeds: dict[str, np.ndarray], threads: int,
                    providers: Sequence[str], scale: int = 1, *, budget_s: float = BUDGET_S, min_runs: int = 10,
                    max_runs: int = 200, warmup: int = 3) -> Timing:
    """Interleaved per-round latencies of the two serialized models (regular = ``reference``),
    latency.timed_pair: CPU time of the calling thread at one thread, else wall clock with the
    machine's load recorded."""
    import onnxruntime as ort

    try:
        sessions = [ort.InferenceSession(m, session_options(threads), providers=list(providers))
                    for m in (reference, candidate)]
        fns = [lambda s=s: s.run(None, feeds) for s in sessions]
        return timed_pair(fns, threads, scale, budget_s=budget_s, min_runs=min_runs, max_runs=max_runs,
                          warmup=warmup)
    except Exception as exc:  # onnxruntime's own exception types
        raise TimingError(f"onnxruntime cannot time the whole models: {first_line(exc)}") from exc


def check_faster(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray], *,
                 threads: int, providers: Sequence[str], cache: TimingCache | None,
                 time_limit_s: float | None = None) -> Decision:
    """Whether ``candidate`` runs at least ``MODEL_MIN_GAIN`` faster than ``reference`` (module
    docstring) within ``time_limit_s`` of timing (:func:`check_time_limit`); the decision
    carries the timing (``regular_ms`` = reference)."""
    ref_bytes, cand_bytes = reference.SerializeToString(), candidate.SerializeToString()
    pair = model_pair(ref_bytes, cand_bytes, feeds, threads, providers)

    def timer(config: ModelPair, scale: int = 1) -> Timing:
        return ort_model_timer(ref_bytes, cand_bytes, feeds, config.threads, config.providers, scale)

    selector = LatencySelector(timer, threads=threads, min_gain=MODEL_MIN_GAIN, cache=cache, providers=providers,
                               time_limit_s=time_limit_s)
    return selector.decide(pair)
