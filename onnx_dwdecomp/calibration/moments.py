"""Running moment sums of patch pairs ``(x, x̂)`` for one conv, from which its
:class:`~onnx_dwdecomp.solve.LayerStats` follow (see :class:`MomentSums`).
"""

from __future__ import annotations

import numpy as np

from ..solve import LayerStats
from .patches import tap_major


class MomentSums:
    """Running float64 sums of patch pairs (x, x̂) for one conv with weight ``W`` (n, C, kh, kw).

    Rows are tap-major (see :func:`extract_patches`); :meth:`stats` reorders to channel-major.

    Per batch of ``m`` rows the products are float32 and the running sums float64. ``Σx̂x̂ᵀ`` is
    ``x̂ᵀx̂``, which numpy's matmul hands to BLAS ``syrk`` (a symmetric rank-m update: one
    triangle, half the multiply-adds of a general product, mirrored into the other; about
    0.55–0.6× the time of the general product measured here).

    ``symmetric=True`` (the symmetric pass: every batch has ``x_hat is x``): the response
    moments are not accumulated row by row — ``Σ(Wx)xᵀ = W·Σxxᵀ``, ``ΣWx = W·Σx`` and
    ``Σ‖Wx‖² = ⟨W·Σxxᵀ, W⟩`` follow from the input moments once, in float64 (n·D² work per
    layer instead of 2·n·D per row; equal up to float32 round-off). A batch with
    ``x_hat is not x`` turns those into running sums and continues row by row. Without it
    every batch is summed row by row (the asymmetric pass, whose results stay bit for bit as
    they were: its L-BFGS solves amplify round-off differences, see tests/test_calibrate.py).
    """

    def __init__(self, weight: np.ndarray, symmetric: bool = False):
        n, c = weight.shape[:2]
        k = int(np.prod(weight.shape[2:]))
        self.shape = (n, c, k)
        self.w = tap_major(np.asarray(weight, dtype=np.float32))
        d = c * k
        self.count = 0
        #: the response sums are derived from ``Σxxᵀ`` in :meth:`stats` (every batch had ``x_hat is x``)
        self.symmetric = symmetric
        self.sum_x = np.zeros(d)
        self.sum_xhat = np.zeros(d)
        self.sum_xhat_xhat = np.zeros((d, d))
        self.sum_y_xhat = np.zeros((n, d))
        self.sum_y = np.zeros(n)
        self.sum_y_sq = 0.0

    def add(self, x: np.ndarray, x_hat: np.ndarray) -> None:
        """Accumulate rows of ``x`` and ``x_hat`` (m, D), float32 products per batch."""
        if not len(x):
            return
        if x_hat is x and self.symmetric:
            s = x.sum(axis=0, dtype=np.float64)
            self.sum_x += s
            self.sum_xhat += s
        else:
            if self.symmetric and self.count:
                self._response_from_moments()
            self.symmetric = False
            y = x @ self.w.T
            self.sum_x += x.sum(axis=0, dtype=np.float64)
            self.sum_xhat += x_hat.sum(axis=0, dtype=np.float64)
            self.sum_y_xhat += y.T @ x_hat
            self.sum_y += y.sum(axis=0, dtype=np.float64)
            self.sum_y_sq += float(np.einsum("ij,ij->", y, y, dtype=np.float64))
        self.count += len(x)
        self.sum_xhat_xhat += x_hat.T @ x_hat  # BLAS syrk (see the class docstring)

    def _response(self) -> tuple[np.ndarray, np.ndarray, float]:
        """``(Σ(Wx)xᵀ, ΣWx, Σ‖Wx‖²)`` of the symmetric batches so far, from ``Σxxᵀ`` and ``Σx``."""
        w = self.w.astype(np.float64)
        wf = w @ self.sum_xhat_xhat
        return wf, w @ self.sum_x, float(np.vdot(wf, w))

    def _response_from_moments(self) -> None:
        wf, sy, syy = self._response()
        self.sum_y_xhat += wf
        self.sum_y += sy
        self.sum_y_sq += syy

    def stats(self) -> LayerStats:
        """Centred moments: ``Cov = Σ/m − μμᵀ``."""
        _, c, k = self.shape
        d = c * k
        m = max(self.count, 1)

        def channel_major(v: np.ndarray) -> np.ndarray:  # (…, K·C) tap-major → (…, C·K)
            return v.reshape(v.shape[:-1] + (k, c)).swapaxes(-1, -2).reshape(v.shape[:-1] + (d,))

        if self.symmetric:
            sum_y_xhat, sum_y, sum_y_sq = self._response()
        else:
            sum_y_xhat, sum_y, sum_y_sq = self.sum_y_xhat, self.sum_y, self.sum_y_sq
        mx, mxh, my = channel_major(self.sum_x) / m, channel_major(self.sum_xhat) / m, sum_y / m
        # Σx̂x̂ᵀ comes from syrk (both triangles written alike) and μμᵀ is symmetric too, so
        # the covariance is exactly symmetric without averaging it with its transpose.
        cov = np.ascontiguousarray(self.sum_xhat_xhat.reshape(k, c, k, c).transpose(1, 0, 3, 2)).reshape(d, d)
        cov /= m
        cov -= np.outer(mxh, mxh)
        cross = channel_major(sum_y_xhat) / m
        cross -= np.outer(my, mxh)
        var = max(sum_y_sq / m - float(my @ my), 0.0)
        return LayerStats(self.count, mx, mxh, cov, cross, var)
