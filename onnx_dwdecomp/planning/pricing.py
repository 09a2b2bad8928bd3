"""Prices: what each candidate conv's options cost (planner.py step 1).

Every option's exact MACs (a new pointwise conv merged into a following 1×1 conv included,
:func:`option_macs`); offered are the r whose MACs are at most ``MAX_OPTION_MACS`` (½) of the
regular conv's: a larger r saves little (timing noise decides it) and each offered r costs a
solve per layer in the curve pass — on a ResNet-18-shaped model r = 6–7 options timed "faster"
under load measured ×1.03 on a quiet machine, while their solves made the default job 8× the
uniform one.

With ``price="latency"`` (``--select latency``, the default) the options to offer are found by
timing each conv alone in onnxruntime at its real shape (timing/latency.py): r = 1, 2, … while the
separable form runs at least ``MIN_GAIN`` faster than the regular conv (latency grows with r);
a *tiny* conv (regular form below ``TINY_CONV_MS``, whose timings alone are noise) is offered
its first ``TINY_OPTIONS`` multipliers. The offered options are then **priced inside the whole
model** (:func:`in_model_latencies`, timing/node_profile.py): the all-regular model and, per offered
r, the model with every conv that offers r rewritten at r (data-free factors, pointwise convs
merged as emitted) are profiled per node; a conv's regular price is its node's time (plus the
1×1 conv its pointwise will be merged into), an option's the time of the nodes that replace it.
An option not ``MIN_GAIN`` faster inside the model is not offered. A conv's time alone is not
its share of the model: on models/mnist the convs alone timed ×6.55 faster where the model
moved ×0.98. The chosen plan is then timed as a whole model (search.py, timing/model.py).
``price="macs"`` (``--select all``) offers every such r and times nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from ..candidates import ConvLayer
from ..errors import BudgetError, Refused
from ..fold import rewrite_and_merge
from ..graph import label
from ..methods import GSVD, Method
from ..progress import say
from ..report import Selection
from ..rewrite import Replacement
from ..shapes import node_macs
from ..solve import check_multiplier, svd_factors
from ..timing.latency import MIN_GAIN, Decision, LatencySelector, TimingError
from ..timing.model import MODEL_MIN_GAIN
from ..timing.node_profile import NodeTimes
from .budget import SKIP

#: Offered options: MACs at most this share of the regular conv's (module docstring, step 1).
MAX_OPTION_MACS = 0.5
#: A conv whose regular form times below this (ms) is *tiny*: its per-conv timings are noise
#: (one MNIST configuration timed 25.6 and 16.5 µs in two runs; three such convs "faster" at
#: r = 2 gave ×1.000 on the whole model). It is offered its first ``TINY_OPTIONS`` multipliers,
#: priced by MACs (``t_regular × MACs_r / MACs_regular``), and the plan is checked as a whole
#: model.
TINY_CONV_MS = 0.1
#: Multipliers offered to a tiny conv: beyond 2 the r depthwise convs and their Concat cost more
#: than they save at this size (MNIST, 1 thread: 7 tiny convs at r = 3–4 gave ×1.01; 4 at r = 2
#: ×0.95; all 19 at r = 1 ×0.76).
TINY_OPTIONS = 2


@dataclass(frozen=True)
class Priced:
    """Per layer: the offered options' MACs and, priced by latency, their latencies (ms) inside
    the whole model, and the all-regular model's time (``model_ms``)."""

    macs: dict[str, dict[int, int]]
    latency_ms: dict[str, dict[int, float]] | None
    model_ms: float | None = None


#: ``profile(model) → NodeTimes``: one model's per-node times at the job's settings.
Profiler = Callable[[onnx.ModelProto], NodeTimes]


def replacement_nodes(model: onnx.ModelProto, layer: ConvLayer) -> list[str]:
    """Names of the nodes rewrite.py emitted for ``layer`` in ``model`` (its depthwise convs,
    their Concat, its pointwise conv)."""
    base = layer.name if not layer.name.startswith("Conv@") else layer.output
    pattern = re.compile(re.escape(base) + r"/(depthwise(_\d+)?|depthwise_concat|pointwise)(_\d+)?")
    return [node.name for node in model.graph.node if pattern.fullmatch(node.name)]


def in_model_latencies(work: onnx.ModelProto, layers: list[ConvLayer], offered: dict[str, list[int]],
                       second: dict[str, onnx.NodeProto], profile: Profiler
                       ) -> tuple[dict[str, dict[int, float | None]], float]:
    """Each layer's regular time (``SKIP``) and its offered multipliers' times inside the whole
    model (module docstring), and the all-regular model's time; ``second[name]``: the 1×1 conv
    the layer's pointwise conv is merged into, counted on both sides. A price is None when one
    of its convs was not found in the profile (node_profile maps nodes back by name or weight)."""
    regular = profile(work)
    convs = {label(node) for node in work.graph.node if node.op_type == "Conv"}
    prices: dict[str, dict[int, float | None]] = {}
    for layer in layers:
        if layer.name in offered:
            target = second.get(layer.name)
            prices[layer.name] = {SKIP: _inside(regular, [layer.name] + ([label(target)] if target is not None else []),
                                                convs)}
    for r in sorted({r for rs in offered.values() for r in rs}):
        group = [layer for layer in layers if r in offered.get(layer.name, ())]
        say(f"select: profiling the model with {len(group)} conv(s) at r={r}")
        rewritten, _ = rewrite_and_merge(work, [Replacement(layer, svd_factors(layer.weight, layer.bias, r))
                                                for layer in group])
        times = profile(rewritten.model)
        convs_r = {label(node) for node in rewritten.model.graph.node if node.op_type == "Conv"}
        for layer in group:
            nodes = replacement_nodes(rewritten.model, layer)
            if layer.name in second:
                nodes.append(label(second[layer.name]))  # the merged conv keeps the 1×1 conv's name
            prices[layer.name][r] = _inside(times, nodes, convs_r)
    return prices, regular.model_ms


def _inside(times: NodeTimes, nodes: list[str], convs: set[str]) -> float | None:
    """The summed time of ``nodes`` (graph.label's) inside the model; None when none of them is a
    conv or a conv among them is missing from the profile (a node that did not map — a Concat —
    counts 0)."""
    if not any(n in convs for n in nodes) or any(n in convs and n not in times.node_ms for n in nodes):
        return None
    return sum(times.node_ms.get(n, 0.0) for n in nodes)


def merge_targets(work: onnx.ModelProto, layers: list[ConvLayer]) -> dict[str, onnx.NodeProto]:
    """Layer name → the 1×1 conv its new pointwise conv will be merged into (fold_pointwise),
    found by one dry-run rewrite with data-free factors; layers without one are left out."""
    if not layers:
        return {}
    merged, by_pointwise = rewrite_and_merge(work, [Replacement(layer, svd_factors(layer.weight, layer.bias, 1))
                                                    for layer in layers])
    by_name = {label(node): node for node in work.graph.node}
    return {by_pointwise[m.first]: by_name[m.into] for m in merged.folds}


def merged_channels(targets: dict[str, onnx.NodeProto], infos) -> dict[str, int]:
    """Layer name → output channels of its merge target (ConvConfig.merged_channels)."""
    out = {}
    for name, node in targets.items():
        info = infos.get(node.output[0])
        if info is not None and info.shape is not None and len(info.shape) > 1:
            out[name] = int(info.shape[1])
    return out


def option_macs(work: onnx.ModelProto, layers: list[ConvLayer], infos,
                second: dict[str, onnx.NodeProto]) -> dict[str, dict[int, int]]:
    """MACs of each layer per option (``SKIP`` and every r whose MACs are at most
    ``MAX_OPTION_MACS`` of the regular conv's), exact for the rewritten model.

    A layer's cost includes the 1×1 conv ``second[name]`` its new pointwise conv will be merged
    into (if any, :func:`merge_targets`): kept regular, both convs run (``P·n·c·K + P·m·n``);
    decomposed, the depthwise conv and the merged pointwise (``P·c·r·K + P·m·c·r``).
    """
    costs: dict[str, dict[int, int]] = {}
    for layer in layers:
        shape = layer.weight_shape
        n = shape[0]
        out_shape = infos[layer.output].shape
        positions = int(np.prod(out_shape[:1] + out_shape[2:]))
        merged = node_macs(second[layer.name], infos) if layer.name in second else 0
        options = {SKIP: node_macs(work.graph.node[layer.node_index], infos) + merged}
        for r in range(1, int(np.prod(shape[2:])) + 1):
            mid = GSVD.mid(shape, r)[0]
            pointwise = merged // n * mid if layer.name in second else positions * GSVD.pointwise_macs(shape, r)
            macs = positions * GSVD.depthwise_macs(shape, r) + pointwise
            if check_multiplier(shape, r) is None and macs <= MAX_OPTION_MACS * options[SKIP]:
                options[r] = macs
        costs[layer.name] = options
    return costs


def time_option(selector: LatencySelector, layer: ConvLayer, input_shape: tuple[int, ...], method: Method, r: int,
                merged_channels: int, step: str) -> Decision:
    """One option of one conv timed in the form it is emitted (``method`` at multiplier ``r``,
    its pointwise conv merged into a following 1×1 conv of ``merged_channels`` outputs, or 0):
    the configuration, one progress line (``step``: "k/n"), the decision with its noise band and
    timing cache (latency.LatencySelector.decide). Both the uniform selection and the plan's
    prices time options through here."""
    mid, group = method.mid(layer.weight_shape, r)
    config = selector.config(layer, input_shape, mid_channels=mid, mid_group=group, merged_channels=merged_channels)
    say(f"select: timing {step} {layer.name} r={r} ({config.describe()})")
    return selector.decide(config)


def option_latencies(layers: list[ConvLayer], infos, macs: dict[str, dict[int, int]],
                     selector: LatencySelector, merged: dict[str, int] | None = None
                     ) -> tuple[dict[str, dict[int, float]], list[Selection]]:
    """Latency (ms) of each layer's regular conv (``SKIP``) and of every r that runs faster,
    timed in the form the output model runs (``merged[name]``: the 1×1 conv the new pointwise
    conv is merged into, see ConvConfig.merged_channels).

    r = 1, 2, … in order until one is not ``MIN_GAIN`` faster (see the module docstring); each
    option is priced ``ratio_r × t_regular`` with ``t_regular`` from r = 1's timing. Returns
    the latencies and one :class:`Selection` per layer (the r = 1 timing and the verdict).
    """
    latencies: dict[str, dict[int, float]] = {}
    selection: list[Selection] = []
    for k, layer in enumerate(layers):
        info = infos.get(layer.input)
        if info is None or info.shape is None:
            selection.append(Selection(layer.name, False, "input shape unknown, latency not measured; "
                                                          "--select all prices by MACs instead"))
            continue
        offered: dict[int, float] = {}
        first = None
        reason = ""
        for r in sorted(m for m in macs[layer.name] if m != SKIP):
            decision = time_option(selector, layer, info.shape, GSVD, r, (merged or {}).get(layer.name, 0),
                                   f"{k + 1}/{len(layers)}")
            t = decision.timing
            if t is None:  # onnxruntime cannot run this option (nor, then, a larger r)
                reason = decision.reason
                break
            if first is None:
                first = t
                offered[SKIP] = t.regular_ms
                if t.regular_ms < TINY_CONV_MS:  # its timings are noise: the first r's, priced by MACs
                    offered.update({m: t.regular_ms * macs[layer.name][m] / macs[layer.name][SKIP]
                                    for m in sorted(macs[layer.name])[1:1 + TINY_OPTIONS]})
                    break
            if not decision.rewrite:
                reason = decision.reason
                break
            offered[r] = t.ratio * first.regular_ms
        rs = sorted(r for r in offered if r != SKIP)
        if rs and first.regular_ms < TINY_CONV_MS:
            verdict = (f"tiny: regular {first.regular_ms:.3f} ms < {TINY_CONV_MS:g} ms, so r = "
                       f"{', '.join(map(str, rs))} are offered, priced by MACs (the whole plan is timed as one model)")
            latencies[layer.name] = offered
        elif rs:
            verdict = (f"faster at r = {', '.join(map(str, rs))} (×{first.regular_ms / offered[rs[0]]:.2f} at "
                       f"r = {rs[0]}); the plan chooses among them")
            latencies[layer.name] = offered
        else:
            verdict = reason or "no multiplier saves MACs"
        selection.append(Selection(layer.name, bool(rs), verdict, first.regular_ms if first else None,
                                   offered.get(rs[0]) if rs else (first.separable_ms if first else None)))
    return latencies, selection


def price_options(work: onnx.ModelProto, layers: list[ConvLayer], infos, price: str,
                  selector: LatencySelector | None, profile: Profiler | None = None
                  ) -> tuple[Priced, list[Selection], list[Refused]]:
    """The options offered per layer (layers with none left out), the selection records and
    the layers kept regular for want of an option, with the reason. With ``profile`` the
    latency-priced options are priced inside the whole model (:func:`in_model_latencies`)."""
    second = merge_targets(work, layers)
    macs = option_macs(work, layers, infos, second)
    macs = {name: options for name, options in macs.items() if len(options) > 1}
    skipped = [Refused(layer.name, f"kept regular: no multiplier saves ≥ {100 * (1 - MAX_OPTION_MACS):g} % of its "
                                   f"MACs (merged pointwise included)")
               for layer in layers if layer.name not in macs]
    if price == "macs":
        return Priced(macs, None), [], skipped
    assert selector is not None
    latencies, selection = option_latencies([layer for layer in layers if layer.name in macs], infos, macs,
                                            selector, merged_channels(second, infos))
    unknown = {s.name for s in selection if s.regular_ms is None}  # input shape unknown or not timed
    skipped += [Refused(name, "kept regular: latency not measured" if name in unknown else
                        f"kept regular: no multiplier runs ≥ {100 * MIN_GAIN:g} % faster in onnxruntime")
                for name in macs if name not in latencies]
    model_ms = None
    inside = None
    if profile is not None and latencies:
        try:
            inside, model_ms = in_model_latencies(
                work, [layer for layer in layers if layer.name in latencies],
                {name: sorted(r for r in o if r != SKIP) for name, o in latencies.items()}, second, profile)
        except TimingError as exc:  # a model onnxruntime cannot profile: the convs' own timings price it
            say(f"select: {exc}; options priced by the convs timed alone")
    if inside is not None:
        alone, latencies = latencies, {}
        for name, options in inside.items():
            if options[SKIP] is None:  # the conv itself was not found in the profile: its prices alone
                options = alone[name]
            else:  # an option not found: the in-model regular time × its ratio timed alone
                options = {r: alone[name][r] / alone[name][SKIP] * options[SKIP] if ms is None else ms
                           for r, ms in options.items()}
            kept = {r: ms for r, ms in options.items() if r == SKIP or ms <= (1 - MIN_GAIN) * options[SKIP]}
            if len(kept) > 1:
                latencies[name] = kept
            else:
                best = min((ms for r, ms in options.items() if r != SKIP), default=float("nan"))
                skipped.append(Refused(name, f"kept regular: not ≥ {100 * MIN_GAIN:g} % faster inside the model "
                                             f"(regular {options[SKIP]:.4f} ms, best option {best:.4f} ms)"))
    macs = {name: {r: macs[name][r] for r in offered} for name, offered in latencies.items()}
    return Priced(macs, latencies, model_ms), selection, skipped


def check_latency_reachable(target: float, latency_ms: dict[str, dict[int, float]]) -> None:
    """BudgetError when ``--target-latency`` is below what the offered options can reach."""
    regular = sum(options[SKIP] for options in latency_ms.values())
    least = sum(min(options.values()) for options in latency_ms.values())
    if not latency_ms or target * regular < least:
        reach = f"{least / regular:.3f}" if regular > 0 else "1"
        raise BudgetError(
            f"--target-latency {target:g} is out of reach: the {len(latency_ms)} conv(s) that run faster "
            f"separable can reach {reach} of their regular latency at best ({least:.3f} of {regular:.3f} ms, "
            f"timed on this machine)")


def check_reachable(target_macs: float, before: int, macs: dict[str, dict[int, int]]) -> None:
    """BudgetError when ``--target-macs`` is below what the offered options can reach."""
    fixed = before - sum(c[SKIP] for c in macs.values())
    least = fixed + sum(min(c.values()) for c in macs.values())
    if target_macs * before < least:
        raise BudgetError(
            f"--target-macs {target_macs:g} is out of reach: with the {len(macs)} selected conv(s) "
            f"the output model's MACs range from {least / before:.4f} (each at its cheapest multiplier) to 1 "
            f"× the input's ({least} .. {before} MACs)")


def cannot_pay_reason(priced: Priced, mode: str) -> str | None:
    """Why no plan can pay, or None: priced inside the model, rewriting every candidate at its
    fastest option saves less than ``MODEL_MIN_GAIN`` of the all-regular model's time — and a plan
    the whole-model check does not find ``MODEL_MIN_GAIN`` faster is not used (the bound mode; a
    MACs or latency target is the user's call, and a task-aware search scores the input anyway)."""
    if mode != "max_error" or priced.latency_ms is None or not priced.model_ms:
        return None
    saving = 0.0
    for times in priced.latency_ms.values():
        regular = times.get(SKIP)
        fastest = min((t for r, t in times.items() if r != SKIP and t is not None), default=None)
        if regular is not None and fastest is not None:
            saving += max(regular - fastest, 0.0)
    if saving >= MODEL_MIN_GAIN * priced.model_ms:
        return None
    return (f"rewriting every candidate at its fastest option would save {saving:.3f} ms of the "
            f"model's {priced.model_ms:.3f} ms ({100 * saving / priced.model_ms:.3g} %), less than the "
            f"{100 * MODEL_MIN_GAIN:g} % a plan must gain as a whole model")
