"""Each node's time inside the whole model, from onnxruntime's per-node profile.

A conv timed alone in its own session is not the conv inside the model: the model's other
operators (an export's runtime shape arithmetic can cost as much as its convs), cache state
and onnxruntime's fusions change what a rewrite saves. So the plan's prices come from the
model as it runs: a session with the deployment's settings (all graph optimisations, the job's
threads and providers) and ``enable_profiling``, whose JSON trace has one ``cat == "Node"``
event ``<node>_kernel_time`` per kernel run with its duration in µs. A node's time is the
median over the runs of its summed kernel time in each run.

Profiling adds about the same overhead to every kernel event (on models/mnist, 439 nodes at
one thread: kernel times summing to 3.4 ms for a model that runs in ~1.5 ms), so a profile
gives shares, not totals. The model is also timed without profiling (``model_ms``, same
settings, wall clock like the trace), and the overhead is taken off every kernel that ran,
alike: ``δ = (Σ_nodes t_node − model_ms) / kernels``, ``t'_node = max(t_node − k_node·δ, 0)``;
the corrected times then add up to the model's time (less what the clamp at 0 keeps).

onnxruntime renames nodes it rewrites (a Conv fused with its activation and moved to the
NCHWc layout is named after its output tensor): the optimized graph is saved beside the
trace, and each of its nodes is mapped back to a node of the given model by name, else — for
a Conv — by its weight's fingerprint ``(Σ w², Σ |w|)``, which reordering and zero-padding the
weight for a blocked layout leave unchanged (an initializer, or a ``Constant`` node's value:
Paddle2ONNX exports keep weights in ``Constant`` nodes whose names onnxruntime drops). Nodes that map nowhere (inserted reorders,
shape arithmetic) are summed under ``OTHER``.

Nothing is written outside a temporary folder, which is removed. A profile taken on a quiet
machine is kept in the timing cache (:func:`cached_profile`), so a rerun prices alike and the
same inputs give the same output model; one taken under load (other processes using the CPUs
during it, clock.OthersLoad, or clock.machine_load before or after) is used for the run, not
kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import first_line
from ..graph import label
from ..runtime import session_options
from .clock import OTHERS_BUSY, OthersLoad, machine_load
from .latency import TimingError

#: Key of the summed time of optimized nodes that map to no node of the given model.
OTHER = ""
#: Relative tolerance of a weight fingerprint match.
FINGERPRINT_RTOL = 1e-5


def fingerprint(weight: np.ndarray) -> tuple[float, float]:
    """``(Σ w², Σ |w|)`` in float64: unchanged by reordering and zero-padding the weight."""
    w = np.asarray(weight, dtype=np.float64)
    return float(np.sum(w * w)), float(np.sum(np.abs(w)))


def _constant_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensor name → value of the initializers and ``Constant`` node outputs (Paddle2ONNX writes
    weights as ``Constant`` nodes, which onnxruntime folds into initializers)."""
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    tensors[node.output[0]] = attr.t
    return tensors


def _conv_weights(model: onnx.ModelProto) -> dict[str, tuple[float, float]]:
    """Conv node label (graph.label: its name, or ``Conv@<output>`` when it has none) →
    fingerprint of its constant weight (convs whose weight is computed at run time are left out)."""
    tensors = _constant_tensors(model)
    out = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in tensors:
            out[label(node)] = fingerprint(numpy_helper.to_array(tensors[node.input[1]]))
    return out


def _match(value: tuple[float, float], table: dict[str, tuple[float, float]]) -> str | None:
    hits = [name for name, fp in table.items()
            if all(math.isclose(a, b, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-12) for a, b in zip(value, fp))]
    return hits[0] if len(hits) == 1 else None


@dataclass(frozen=True)
class NodeTimes:
    """One model's profile: ``node_ms`` (node name → ms inside the model, overhead taken off;
    ``OTHER``: optimized nodes mapped to none), ``model_ms`` (the model without profiling),
    ``overhead_ms`` (δ per node), ``runs`` (profiled runs the medians rest on)."""

    node_ms: dict[str, float]
    model_ms: float
    overhead_ms: float
    runs: int
    loaded: bool = field(default=False, compare=False)  # taken while the machine was busy (not cached)
    cached: bool = field(default=False, compare=False)

    def to_cache(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("loaded", "cached")}


@dataclass(frozen=True)
class ProfileKey:
    """What a profile depends on (its timing-cache key, with the cache's onnxruntime and CPU)."""

    kind: str
    model_sha256: str
    input_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    threads: int
    providers: tuple[str, ...]


def cached_profile(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, threads: int,
                   providers: Sequence[str], cache=None) -> NodeTimes:
    """:func:`profile_node_times`, read from ``cache`` (cache.TimingCache) when it has
    this model's profile at these shapes, threads and providers; a new profile is stored unless
    the machine was busy before or after it."""
    key = ProfileKey("node_profile", hashlib.sha256(model.SerializeToString()).hexdigest(),
                     tuple(sorted((name, tuple(int(d) for d in v.shape)) for name, v in feeds.items())),
                     int(threads), tuple(providers))
    stored = cache.get_profile(key) if cache is not None else None
    if stored is not None:
        return NodeTimes(**stored, cached=True)
    busy, meter = machine_load(threads)[2], OthersLoad().start()
    times = profile_node_times(model, feeds, threads=threads, providers=providers)
    others = meter.share()
    busy = busy or machine_load(threads)[2] or (others is not None and others > OTHERS_BUSY)
    if cache is not None and not busy:
        cache.put_profile(key, times.to_cache())
    return NodeTimes(times.node_ms, times.model_ms, times.overhead_ms, times.runs, loaded=busy)


def profile_node_times(model: onnx.ModelProto, feeds: dict[str, np.ndarray], *, threads: int,
                       providers: Sequence[str], budget_s: float = 1.0, min_runs: int = 5,
                       max_runs: int = 30, warmup: int = 3) -> NodeTimes:
    """Each node's time (ms) inside the whole model (module docstring), keyed by graph.label (the
    node's name, or ``Op@<output>`` for an unnamed node). As many runs as fit in
    ``budget_s`` (by the warm-up's pace), between ``min_runs`` and ``max_runs``, profiled, then
    as many unprofiled for ``model_ms``.

    Raises
    ------
    TimingError
        onnxruntime cannot build or run the model.
    """
    import onnxruntime as ort

    weights = _conv_weights(model)
    names = {node.name for node in model.graph.node if node.name}
    with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_profile_") as folder:
        options = session_options(threads)
        options.enable_profiling = True
        options.profile_file_prefix = os.path.join(folder, "trace")
        options.optimized_model_filepath = os.path.join(folder, "optimized.onnx")
        options.log_severity_level = 3  # the optimized model's "hardware specific" warning
        try:
            session = ort.InferenceSession(model.SerializeToString(), options, providers=list(providers))
            t0 = time.perf_counter()
            for _ in range(warmup):
                session.run(None, feeds)
            pace = (time.perf_counter() - t0) / max(warmup, 1)
            runs = int(np.clip(budget_s / max(pace, 1e-9), min_runs, max_runs))
            for _ in range(runs):
                session.run(None, feeds)
            trace = session.end_profiling()
            model_ms = _plain_ms(model, feeds, threads, providers, runs, warmup)
        except Exception as exc:  # onnxruntime's own exception types
            raise TimingError(f"onnxruntime cannot profile the model: {first_line(exc)}") from exc
        with open(trace, encoding="utf-8") as f:
            events = json.load(f)
        optimized = onnx.load(os.path.join(folder, "optimized.onnx"), load_external_data=False)
    owner = _owners(optimized, names, weights)
    per_run: dict[str, list[float]] = defaultdict(list)
    kernels: dict[str, int] = defaultdict(int)  # kernel events per node over the timed runs
    starts = sorted(e["ts"] for e in events if e.get("name") == "model_run")[-runs:]
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        run = int(np.searchsorted(starts, event["ts"], side="right")) - 1
        if run < 0:
            continue  # a warm-up run
        node = owner.get(event["name"][:-len("_kernel_time")], OTHER)
        bucket = per_run[node]
        bucket.extend([0.0] * (len(starts) - len(bucket)))
        bucket[run] += event["dur"] / 1e3
        kernels[node] += 1
    medians = {node: float(np.median(times)) for node, times in per_run.items()}
    timed = max(len(starts), 1)
    per_run_kernels = sum(kernels.values()) / timed
    overhead = max(sum(medians.values()) - model_ms, 0.0) / max(per_run_kernels, 1.0)
    node_ms = {node: max(ms - overhead * kernels[node] / timed, 0.0) for node, ms in medians.items()}
    return NodeTimes(node_ms, model_ms, overhead, len(starts))


def _plain_ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], threads: int, providers: Sequence[str],
              runs: int, warmup: int) -> float:
    """Median wall-clock time (ms) of ``model`` without profiling — the trace's clock, so the
    overhead δ is one clock's difference."""
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), session_options(threads), providers=list(providers))
    clock = time.perf_counter
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        t0 = clock()
        session.run(None, feeds)
        times.append(clock() - t0)
    return 1e3 * float(np.median(times))


def _owners(optimized: onnx.ModelProto, names: set[str], weights: dict[str, tuple[float, float]]
            ) -> dict[str, str]:
    """Optimized node name → the given model's node it computes (by name, else by weight; keys
    of the result are graph.label's)."""
    tensors = _constant_tensors(optimized)
    owner = {}
    for node in optimized.graph.node:
        if node.name in names:
            owner[node.name] = node.name
        elif node.op_type == "Conv" and len(node.input) > 1 and node.input[1] in tensors:
            match = _match(fingerprint(numpy_helper.to_array(tensors[node.input[1]])), weights)
            if match is not None:
                owner[node.name] = match
    return owner
