"""planning/pricing.py: what the options cost, and whether any plan can pay."""

from __future__ import annotations

from onnx_dwdecomp.planning.budget import SKIP
from onnx_dwdecomp.planning.pricing import Priced, cannot_pay_reason


def test_no_curve_pass_when_no_plan_can_pay():
    """Priced inside the model, the candidates' fastest options together must save ≥ MODEL_MIN_GAIN
    (2 %) of the model's time, or the bound mode plans nothing (no curve pass, no probes, no
    rounds: the whole-model check would refuse any plan they found). A MACs target is the
    user's call, and a task-aware search scores the input model anyway: both are planned."""
    macs = {"a": {SKIP: 100, 1: 20}, "b": {SKIP: 100, 1: 20, 2: 40}}
    latency = {"a": {SKIP: 1.0, 1: 0.9}, "b": {SKIP: 1.0, 1: 0.95, 2: 0.7}}
    # fastest options save 0.1 + 0.3 = 0.4 ms: 2 % of a 20 ms model pays, of a 20.1 ms one not
    assert cannot_pay_reason(Priced(macs, latency, model_ms=20.0), "max_error") is None
    reason = cannot_pay_reason(Priced(macs, latency, model_ms=20.1), "max_error")
    assert reason.startswith("rewriting every candidate at its fastest option would save 0.400 ms "
                             "of the model's 20.100 ms (1.99 %)")
    assert cannot_pay_reason(Priced(macs, latency, model_ms=20.1), "task") is None  # scores the input anyway
    assert cannot_pay_reason(Priced(macs, latency, model_ms=20.1), "target_macs") is None
    assert cannot_pay_reason(Priced(macs, None, model_ms=None), "max_error") is None  # priced by MACs
