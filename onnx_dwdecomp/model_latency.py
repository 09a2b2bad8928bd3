"""The chosen plan checked as a whole: is the rewritten model faster than the one it replaces?

Per-conv timings price the options (latency.py), but tiny convs time as noise (the same 20 µs
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
on the same machine decides alike whatever the load.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from .errors import first_line
from .latency import Decision, LatencySelector, Timing, TimingError
from .runtime import session_options
from .timing import interleaved_timings
from .timing_cache import TimingCache

#: The plan's model must be at least this much faster (median ratio) than the all-regular one.
MODEL_MIN_GAIN = 0.02
#: Timing budget (seconds) of the first measurement; re-timings scale it (latency.RETIME_FACTOR).
BUDGET_S = 0.5


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
    """Interleaved per-round latencies of the two serialized models (regular = ``reference``)."""
    import onnxruntime as ort

    try:
        sessions = [ort.InferenceSession(m, session_options(threads), providers=list(providers))
                    for m in (reference, candidate)]
        fns = [lambda s=s: s.run(None, feeds) for s in sessions]
        probe = interleaved_timings(fns, runs=3, warmup=warmup)
    except Exception as exc:  # onnxruntime's own exception types
        raise TimingError(f"onnxruntime cannot time the whole models: {first_line(exc)}") from exc
    per_round = float(sum(np.median(t) for t in probe))
    runs = int(np.clip(scale * budget_s / max(per_round, 1e-9), scale * min_runs, scale * max_runs))
    times = interleaved_timings(fns, runs=runs, warmup=0)
    return Timing.from_samples(1e3 * times[0], 1e3 * times[1])


def check_faster(reference: onnx.ModelProto, candidate: onnx.ModelProto, feeds: dict[str, np.ndarray], *,
                 threads: int, providers: Sequence[str], cache: TimingCache | None) -> Decision:
    """Whether ``candidate`` runs at least ``MODEL_MIN_GAIN`` faster than ``reference`` (module
    docstring); the decision carries the timing (``regular_ms`` = reference)."""
    ref_bytes, cand_bytes = reference.SerializeToString(), candidate.SerializeToString()
    pair = model_pair(ref_bytes, cand_bytes, feeds, threads, providers)

    def timer(config: ModelPair, scale: int = 1) -> Timing:
        return ort_model_timer(ref_bytes, cand_bytes, feeds, config.threads, config.providers, scale)

    selector = LatencySelector(timer, threads=threads, min_gain=MODEL_MIN_GAIN, cache=cache, providers=providers)
    return selector.decide(pair)
