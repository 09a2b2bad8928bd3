"""Tests of onnx_dwdecomp.solve: SVD / GSVD / channel decompositions on synthetic data."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from conftest import separable_weight, stats_from_samples
from onnx_dwdecomp.solve import (channel_factors, channel_rank, gsvd_factors, relative_response_error,
                                 relative_weight_error, separable_objective, svd_factors, ridged_moments, _gsvd_sweep, _ProjectedObjective)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _correlated_patches(m: int, d: int, seed: int = 1) -> np.ndarray:
    """Rows with a strongly non-isotropic covariance and a non-zero mean."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) * np.geomspace(3.0, 0.03, d)[:, None]
    return rng.standard_normal((m, d)) @ mix + rng.standard_normal(d)


@pytest.mark.parametrize("rank,shape", [(1, (6, 4, 3, 3)), (2, (5, 3, 3, 3)), (3, (4, 2, 1, 5)), (9, (10, 3, 3, 3))])
def test_svd_exact_for_separable_weights(rank, shape):
    n, c, kh, kw = shape
    w = separable_weight(n, c, kh, kw, rank, seed=rank)
    f = svd_factors(w, None, multiplier=rank)
    assert f.depthwise.shape == (c * rank, 1, kh, kw)
    assert f.pointwise.shape == (n, c * rank)
    assert f.depthwise.dtype == np.float32
    # float32 weights: exact up to float32 rounding of the factors (~1e-7 relative); 1e-5 leaves margin.
    assert _rel(f.dense_weight(), w) <= 1e-5


def test_svd_bias_passthrough_and_deterministic_signs():
    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    f1, f2 = svd_factors(w, b, 2), svd_factors(w, b, 2)
    np.testing.assert_array_equal(f1.depthwise, f2.depthwise)
    np.testing.assert_array_equal(f1.pointwise, f2.pointwise)
    np.testing.assert_array_equal(f1.bias, b)
    # sign convention: largest-|entry| of every depthwise filter is positive
    taps = f1.depthwise.reshape(-1, 9)
    assert np.all(taps[np.arange(len(taps)), np.abs(taps).argmax(axis=1)] > 0)
    # sign-flipped input channel slices give the same factors (up to the paired sign of P)
    f3 = svd_factors(-w, b, 2)
    np.testing.assert_allclose(f3.depthwise, f1.depthwise, atol=1e-6)  # float32 rounding only
    np.testing.assert_allclose(f3.pointwise, -f1.pointwise, atol=1e-6)


def test_svd_multiplier_above_out_channels_is_honoured():
    # A slice has rank ≤ n = 2, so filters beyond the second are zero padding; still exact.
    w = separable_weight(2, 3, 3, 3, 2, seed=0)  # n=2 < r=4 <= K=9
    f = svd_factors(w, None, 4)
    assert f.multiplier == 4 and f.depthwise.shape == (12, 1, 3, 3)
    np.testing.assert_allclose(f.dense_weight(), w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("r", [0, -1, 10])
def test_multiplier_out_of_range(r):
    w = np.zeros((4, 2, 3, 3), np.float32)
    with pytest.raises(ValueError, match="multiplier"):
        svd_factors(w, None, r)
    stats = stats_from_samples(w, np.ones((5, 18)))
    with pytest.raises(ValueError, match="multiplier"):
        gsvd_factors(w, None, stats, r)


@pytest.mark.parametrize("samples", [3, 40, 2000])
def test_representable_layer_reproduced_whatever_the_data(samples):
    """The ridge pulls towards W, not towards zero: a weight the structure holds exactly (rank-1
    channel slices for gsvd at r = 1, rank d' for channel) comes back exactly even from a few
    patches (fewer than the patch length D = 36). With ``B + λI`` alone it shrank towards zero
    (3.5 % output error in a 4-channel test). Tolerance: squared relative error 1e-8, i.e.
    1e-4 relative: float32 factors, weights and moment products (measured up to 5e-5)."""
    w = separable_weight(6, 4, 3, 3, rank=1, seed=9)
    x = _correlated_patches(samples, 36, seed=3)
    stats = stats_from_samples(w, x)
    g = gsvd_factors(w, None, stats, 1)
    assert relative_weight_error(w, g.dense_weight()) < 1e-8
    rng = np.random.default_rng(4)
    w_low = (rng.standard_normal((6, 2)) @ rng.standard_normal((2, 36))).reshape(6, 4, 3, 3).astype(np.float32)
    ch = channel_factors(w_low, None, 2, stats_from_samples(w_low, x))
    assert relative_weight_error(w_low, ch.dense_weight()) < 1e-8


def _problem(seed=0, n=8, c=4, m=2000):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n, c, 3, 3))
    b = rng.standard_normal(n)
    x = _correlated_patches(m, c * 9, seed + 1)
    return w, b, x


def test_gsvd_beats_svd_and_channel_on_correlated_inputs():
    w, b, x = _problem()
    stats = stats_from_samples(w, x)
    held = stats_from_samples(w, _correlated_patches(2000, w.shape[1] * 9, seed=1)[::-1])  # same distribution
    g = gsvd_factors(w, b, stats, 1)
    s = svd_factors(w, b, 1)
    s_bias = b + w.reshape(len(w), -1) @ stats.mean_x - s.dense_weight().reshape(len(w), -1) @ stats.mean_xhat
    ch = channel_factors(w, b, channel_rank(w.shape, 1), stats)
    s = dataclasses.replace(s, bias=s_bias)
    e_g = relative_response_error(w, b, g, stats)
    e_s = relative_response_error(w, b, s, stats)
    e_c = relative_response_error(w, b, ch, stats)
    # strict ordering with a clear margin: data-driven must be meaningfully better, not tie.
    assert e_g < 0.9 * e_s, (e_g, e_s)
    assert e_g < e_c, (e_g, e_c)
    assert np.isfinite([e_g, e_s, e_c]).all()
    # the mean-corrected bias keeps the mean response: the mean gap is ~0 (float64 algebra)
    mean_gap = (w.reshape(8, -1) @ stats.mean_x + b) - (g.dense_weight().reshape(8, -1) @ stats.mean_xhat + g.bias)
    assert np.abs(mean_gap).max() < 1e-8 * (1 + np.abs(b).max())
    assert relative_response_error(w, b, g, held) < relative_response_error(w, b, s, held)


def test_more_iterations_never_worse():
    """The solver minimises the ridged objective; more L-BFGS rounds never raise it."""
    w, b, x = _problem(seed=5, m=800)
    stats = stats_from_samples(w, x)
    cross, cov, var = ridged_moments(w.reshape(8, -1), stats)
    objs = []
    for it in (0, 1, 2, 5, 10, 40):
        f = gsvd_factors(w, b, stats, 2, max_iter=it, tol=0.0)  # float64 weight -> float64 factors
        n, cr = f.pointwise.shape
        p = f.pointwise.reshape(n, cr // 2, 2)
        ff = f.depthwise.reshape(cr // 2, 2, 9)
        objs.append(separable_objective(p, ff, cross, cov, var))
    s = svd_factors(w, b, 2)
    svd_obj = separable_objective(s.pointwise.reshape(8, 4, 2), s.depthwise.reshape(4, 2, 9),
                                  cross, cov, var)
    # non-increasing up to float64 rounding of the objective (relative 1e-12)
    for a, b2 in zip(objs, objs[1:]):
        assert b2 <= a + 1e-12 * abs(a), objs
    assert objs[0] < svd_obj  # the GSVD sweep improves on the SVD start
    assert objs[-1] < 0.99 * objs[0]  # inter-channel compensation improves on the sweep


def test_blocked_sweep_equals_channel_by_channel_sweep():
    """Grouping the Q updates is a reordering of exact arithmetic: same factors as block=1."""
    w, b, x = _problem(seed=7, n=6, c=10, m=900)
    stats = stats_from_samples(w, x)
    cross, cov, _ = ridged_moments(w.reshape(6, -1), stats)
    results = []
    for block in (1, 4, 32):
        s = svd_factors(w, b, 2)
        p, f = s.pointwise.reshape(6, 10, 2).copy(), s.depthwise.reshape(10, 2, 9).copy()
        _gsvd_sweep(p, f, cross, cov, np.ones(10, bool), block=block)
        results.append((p, f))
    for p, f in results[1:]:  # float64 round-off of reordered sums only
        np.testing.assert_allclose(p, results[0][0], rtol=1e-8, atol=1e-10)
        np.testing.assert_allclose(f, results[0][1], rtol=1e-8, atol=1e-10)


def test_projected_gradient_matches_finite_differences():
    """∇g of the projected objective (pointwise solved out) against central differences."""
    w, b, x = _problem(seed=6, n=5, c=3, m=300)
    stats = stats_from_samples(w, x)
    obj = _ProjectedObjective(*ridged_moments(w.reshape(5, -1), stats), 3, 2, 9)
    f = np.random.default_rng(0).standard_normal(3 * 2 * 9)
    _, grad = obj(f)
    eps = 1e-6
    numeric = np.array([(obj(f + eps * e)[0] - obj(f - eps * e)[0]) / (2 * eps) for e in np.eye(f.size)])
    # central differences are O(eps²) accurate; 1e-5 relative leaves room for round-off (~1e-10/eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-7 * np.abs(numeric).max())


def test_dead_channel_falls_back_to_svd():
    w, b, x = _problem(seed=2, m=500)
    x[:, 9:18] = 0.0  # channel 1 never sees any input
    stats = stats_from_samples(w, x)
    f = gsvd_factors(w, b, stats, 1)
    assert 1 in f.fallback_channels
    assert np.isfinite(f.depthwise).all() and np.isfinite(f.pointwise).all() and np.isfinite(f.bias).all()
    s = svd_factors(w, b, 1)
    np.testing.assert_allclose(f.depthwise[1], s.depthwise[1], rtol=1e-12, atol=1e-12)  # exact copy


def test_tiny_sample_count_is_finite():
    w, b, x = _problem(seed=3, m=3)
    stats = stats_from_samples(w, x)
    assert stats.count == 3
    for f in (gsvd_factors(w, b, stats, 1), gsvd_factors(w, b, stats, 3)):
        assert np.isfinite(f.depthwise).all() and np.isfinite(f.pointwise).all() and np.isfinite(f.bias).all()
    ch = channel_factors(w, b, 2, stats)
    assert np.isfinite(ch.first).all() and np.isfinite(ch.second).all()


def test_gsvd_deterministic():
    w, b, x = _problem(seed=4, m=400)
    stats = stats_from_samples(w.astype(np.float32), x)
    f1 = gsvd_factors(w.astype(np.float32), b, stats, 2)
    f2 = gsvd_factors(w.astype(np.float32), b, stats, 2)
    assert f1.depthwise.dtype == np.float32
    for a, c in ((f1.depthwise, f2.depthwise), (f1.pointwise, f2.pointwise), (f1.bias, f2.bias)):
        np.testing.assert_array_equal(a, c)
    assert f1.iterations == f2.iterations


def test_channel_data_free_is_truncated_svd():
    w = separable_weight(6, 3, 3, 3, 1, seed=7)
    d = channel_rank(w.shape, 1)
    assert 1 <= d <= 6
    ch = channel_factors(w, None, 6)  # full rank of a (6, 27) matrix -> exact
    assert ch.first.shape == (6, 3, 3, 3) and ch.second.shape == (6, 6)
    assert _rel(ch.dense_weight(), w) <= 1e-5  # float32 rounding only


@pytest.mark.parametrize("r", [1, 2])
def test_structured_response_terms_equal_dense(r):
    """⟨Ŵ, A⟩ and ⟨ŴB, Ŵ⟩ from the factors equal the dense n·D² formulas (float64 round-off)."""
    w, b, x = _problem(seed=8, n=7, c=5, m=600)
    stats = stats_from_samples(w, x)
    for factors in (gsvd_factors(w, b, stats, r), channel_factors(w, b, channel_rank(w.shape, r), stats)):
        wh = factors.dense_weight().reshape(7, -1)
        dense = (np.vdot(wh, stats.cov_y_xhat), np.vdot(wh @ stats.cov_xhat, wh))
        np.testing.assert_allclose(factors.response_terms(stats.cov_y_xhat, stats.cov_xhat), dense, rtol=1e-10)


@pytest.mark.parametrize("max_iter", [0, 10])
def test_prepared_problem_equals_separate_calls(max_iter):
    """GsvdProblem shares the ridged moments, the slice SVDs and the whitening between
    multipliers (the plan's curves): every r gives gsvd_factors' factors bit for bit, in any order."""
    from onnx_dwdecomp.solve import GsvdProblem
    w, b, x = _problem(seed=11, n=7, c=5, m=600)
    stats = stats_from_samples(w, x)
    problem = GsvdProblem(w, b, stats)
    for r in (3, 1, 2, 9, 1):
        shared = problem.factors(r, max_iter=max_iter)
        alone = gsvd_factors(w, b, stats, r, max_iter=max_iter)
        for field_ in ("depthwise", "pointwise", "bias"):
            np.testing.assert_array_equal(getattr(shared, field_), getattr(alone, field_))
        assert shared.iterations == alone.iterations
    with pytest.raises(ValueError):
        problem.factors(10)
