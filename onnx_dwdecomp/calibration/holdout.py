"""The held-out samples: which ones (:func:`split_holdout`, :func:`heldout_count`, one rule for
the driver and the memory estimate) and each layer's response error measured directly on their
patches (:class:`HeldoutPatches`, gathered once per layer however many candidates are measured).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..candidates import ConvLayer
from ..errors import CalibrationError
from ..solve import ChannelFactors, SeparableFactors
from .patches import patch_pair, tap_major

#: The share of the calibration samples held out (CalibrationOptions.holdout's default).
HOLDOUT_FRACTION = 0.1
#: The output error bound is checked on at least this many held-out samples when the data has
#: ``3 · MIN_HELDOUT`` (48) or more; with fewer, on a third of them.
MIN_HELDOUT = 16


def heldout_count(n: int, fraction: float = HOLDOUT_FRACTION) -> int:
    """How many of ``n`` samples are held out: ``max(round(fraction·n), min(MIN_HELDOUT, n // 3))``,
    at least 1 and at most ``n − 1`` (1 when ``n < 2``, which :func:`split_holdout` refuses).

    16 of 48 and more, 10 % of 160 and more; a third of fewer than 48 (8 of 24). A bound
    checked on 4 images let a detector's plan through whose detections changed on others."""
    return max(1, min(max(int(round(fraction * n)), min(MIN_HELDOUT, n // 3)), n - 1))


def split_holdout(n: int, fraction: float, seed: int, energy: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask of the held-out samples.

    ``k =`` :func:`heldout_count`: 10 % of many samples, at least 16 of 48 or more, a third of
    fewer.
    With ``energy`` (each sample's output power, normalised per feature) the samples are taken
    systematically over its ranks — ``k`` evenly spaced ranks from a seeded offset — so the
    held-out set spans quiet and busy inputs (a text detector's held-out image is not only a
    photo without text); without it, a seeded random choice.
    """
    if n < 2:
        raise CalibrationError(f"calibration needs at least 2 samples (one is held out for "
                               f"verification), got {n}")
    k = heldout_count(n, fraction)
    rng = np.random.default_rng(seed)
    if energy is None:
        chosen = rng.permutation(n)[:k]
    else:
        ranks = np.argsort(np.asarray(energy, dtype=np.float64), kind="stable")
        chosen = ranks[((np.arange(k) + rng.random()) * n / k).astype(int)]
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


def heldout_response_error(layer: ConvLayer, factors: SeparableFactors | ChannelFactors, x_all: np.ndarray,
                           xhat_all: np.ndarray, heldout: np.ndarray, positions: np.ndarray, batch: int) -> float:
    """``E‖Wx + b − Ŵx̂ − b̂‖² / E‖Wx − E[Wx]‖²`` over the held-out samples' patches, computed
    directly (n·D work per patch) rather than from D×D moments."""
    return HeldoutPatches(layer, x_all, xhat_all, heldout, positions, batch).error(factors)


class HeldoutPatches:
    """One layer's held-out patches and original responses, gathered once for any number of
    candidate factors (:func:`heldout_response_error`; the plan's curves measure every offered
    multiplier of a layer). Same chunks, products and sums as measuring each candidate afresh."""

    def __init__(self, layer: ConvLayer, x_all: np.ndarray, xhat_all: np.ndarray, heldout: np.ndarray,
                 positions: np.ndarray, batch: int):
        n = layer.weight.shape[0]
        # float32 products like the moment sums; the sums below are float64
        w = tap_major(layer.weight).astype(np.float32)
        b = np.zeros(n, np.float32) if layer.bias is None else layer.bias.astype(np.float32)
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []  # (x̂ patches, Wx + b)
        self.count, self.sum_y, self.sum_y_sq = 0, np.zeros(n), 0.0
        index = np.flatnonzero(heldout)
        for start in range(0, len(index), batch):
            x, x_hat = patch_pair(layer, x_all, xhat_all, index[start:start + batch], positions)
            y = x @ w.T + b
            self.chunks.append((x_hat, y))
            self.count += len(y)
            self.sum_y += y.sum(axis=0, dtype=np.float64)
            self.sum_y_sq += float(np.einsum("ij,ij->", y, y, dtype=np.float64))

    def error(self, factors: SeparableFactors | ChannelFactors) -> float:
        if self.count == 0:
            return float("nan")
        w_hat = tap_major(factors.dense_weight()).astype(np.float32)
        b_hat = factors.bias.astype(np.float32)
        gap = 0.0
        for x_hat, y in self.chunks:
            diff = y - (x_hat @ w_hat.T + b_hat)
            gap += float(np.einsum("ij,ij->", diff, diff, dtype=np.float64))
        var = self.sum_y_sq / self.count - float(self.sum_y @ self.sum_y) / self.count ** 2
        err = gap / self.count
        if var <= 0:
            return 0.0 if err <= 1e-30 else float("inf")
        return err / var


def heldout_measure(patches: HeldoutPatches) -> Callable[[SeparableFactors | ChannelFactors], float]:
    """``heldout_error(factors)`` for one layer's held-out patches; the last factors' error is
    remembered (the driver re-measures the factors a solve returns)."""
    last: list = [None, 0.0]

    def heldout_error(factors: SeparableFactors | ChannelFactors) -> float:
        if last[0] is not factors:
            last[:] = [factors, patches.error(factors)]
        return last[1]
    return heldout_error
