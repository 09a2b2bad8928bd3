"""methods.py: each method's form and cost agree with the factors its solver returns."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import stats_from_samples
from onnx_dwdecomp.candidates import ConvLayer
from onnx_dwdecomp.methods import CHANNEL, GSVD, METHODS, SVD


def _layer(n=8, c=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, c, k, k)).astype(np.float32)
    return ConvLayer("L", 0, "x", "y", w, rng.standard_normal(n).astype(np.float32), (1, 1), (1, 1, 1, 1),
                     (1, 1), "NOTSET")


@pytest.mark.parametrize("method", [SVD, GSVD, CHANNEL], ids=lambda m: m.name)
@pytest.mark.parametrize("r", [1, 2, 3])
def test_cost_and_form_match_the_solved_factors(method, r):
    layer = _layer()
    x = np.random.default_rng(1).standard_normal((300, 45))
    f = method.solve(layer, r, stats_from_samples(layer.weight, x))
    assert method.macs(layer.weight_shape, r) == f.macs_per_position()
    channels, groups = method.mid(layer.weight_shape, r)
    first = f.first if method is CHANNEL else f.depthwise  # (channels, c / groups, kh, kw)
    assert first.shape[:2] == (channels, layer.weight_shape[1] // groups)


def test_unprofitable_names_the_costs():
    assert METHODS["gsvd"].unprofitable((8, 5, 3, 3), 1) is None
    # 4 → 4, 3×3 at r = 3: 4·3·9 + 4·4·3 = 156 ≥ 144 regular
    reason = METHODS["svd"].unprofitable((4, 4, 3, 3), 3)
    assert reason is not None and "156 vs 144 MACs per output position" in reason.reason
    assert "outside 1..9" in METHODS["channel"].unprofitable((4, 4, 3, 3), 10).reason
