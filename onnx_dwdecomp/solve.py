r"""Depth-wise decomposition of one regular convolution — numpy/scipy only, no graph code.

Notation (shapes in parentheses)
--------------------------------
A regular conv has weight ``W`` (n, c, kh, kw) and bias ``b`` (n,). Let ``K = kh·kw`` and
``D = c·K``. At one output position the conv sees a patch vector ``x`` (D,) made of channel
blocks ``x_i`` (K,), and responds ``y = W x + b`` with ``W`` read as (n, D).

A depthwise-separable replacement with depth multiplier ``r`` has depthwise filters
``F`` (c, r, K) — filter ``s`` of input channel ``i`` is ``F[i, s]`` — and a pointwise matrix
``P`` (n, c, r). Its equivalent regular weight is

    Ŵ[:, i, :] = Σ_s P[:, i, s] ⊗ F[i, s]        (each channel slice has rank ≤ r)

In ONNX it is a ``Conv(group=c)`` with ``c·r`` outputs (output ``i·r + s`` filters input ``i``
with ``F[i, s]``) followed by a ``1×1 Conv`` with weight ``P.reshape(n, c·r)``.

Data-free (SVD, brief §1.1)
    Per channel, ``W_i = U Σ Vᵀ`` (n, K); ``P_i = U_r Σ_r``, ``F_i = V_rᵀ``. Optimal for
    ‖W − Ŵ‖_F. Signs are fixed (largest |entry| of each right singular vector positive) so
    the result is repeatable.

Data-driven (GSVD, brief §1.2–1.4)
    Given calibration statistics of the original input ``x`` and of the input ``x̂`` that the
    partially decomposed network feeds this layer, minimise

        f(Ŵ, b̂) = E‖W x + b − Ŵ x̂ − b̂‖².

    The optimal bias keeps the mean response, ``b̂ = b + W E[x] − Ŵ E[x̂]``, which leaves the
    centred problem ``f(Ŵ) = V − 2⟨Ŵ, A⟩ + ⟨Ŵ B, Ŵ⟩`` with ``B = Cov(x̂)`` (D, D),
    ``A = Cov(W x, x̂)`` (n, D) and ``V = E‖W x − E[W x]‖²``. Symmetric = the same with x̂ = x.

    *GSVD sweep* — with the other channels fixed, channel ``i`` minimises
    ``⟨Ŵ_i B_ii, Ŵ_i⟩ − 2⟨Ŵ_i, M_i⟩`` with ``M_i = A_i − Σ_{j≠i} Ŵ_j B_ji``. With
    ``B_ii = L Lᵀ`` the optimum is the rank-r truncated SVD of ``M_i L⁻ᵀ``, times ``L⁻¹``.

    *Inter-channel compensation (alternating least squares)* — with ``F`` fixed, ``P`` is a
    linear regression of ``W x`` on the depthwise outputs ``z = F x̂``:
    ``P = Cov(W x, z) Cov(z)⁻¹``. With ``P`` fixed, the taps solve one linear system
    ``H vec(F) = g`` with ``H[(i,s,k),(j,t,l)] = B[(i,k),(j,l)]·(PᵀP)[(i,s),(j,t)]`` and
    ``g[i,s,k] = Σ_n P[n,i,s] A[n,i,k]``. Every step is an exact minimiser, so the objective
    never increases; iteration stops when the relative improvement falls below ``tol``.

Channel decomposition (Zhang et al. 2016, brief §1.5)
    A rank-``d`` approximation of the whole (n, D) matrix: ``Ŵ = Q Rᵀ``, computed by
    reduced-rank regression: whiten by ``B = L Lᵀ``, truncate the SVD of ``A L⁻ᵀ`` to rank d,
    un-whiten. Data-free it is the truncated SVD of ``W``.

Regularisation: every Cholesky factor / solve adds a ridge ``RIDGE·tr(M)/dim`` relative to the
matrix's own scale, so dead channels (all-zero inputs), rank-deficient moments and tiny
calibration sets give finite results. Channels with no input energy fall back to SVD factors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg

#: Ridge relative to a matrix's mean diagonal (Tikhonov). 1 % measurably helps generalisation:
#: on the MNIST model the decomposed top-1 went from 97.6 % (1e-6) to 98.0 % (1e-2), because the
#: deepest layers (2×2 outputs) see about as many patch vectors as their patch length.
RIDGE = 1e-2
#: A channel whose input variance is below this fraction of the mean channel variance is dead.
DEAD_CHANNEL = 1e-10


@dataclass(frozen=True)
class LayerStats:
    """Centred calibration moments of one conv's input patches (all float64).

    Attributes
    ----------
    count : int
        Number of patch vectors accumulated.
    mean_x, mean_xhat : (D,)
        ``E[x]`` (original network input) and ``E[x̂]`` (decomposed network input).
    cov_xhat : (D, D)
        ``B = Cov(x̂)``.
    cov_y_xhat : (n, D)
        ``A = Cov(W x, x̂)``.
    response_var : float
        ``V = E‖W x − E[W x]‖²`` (sum over the n output channels).
    """

    count: int
    mean_x: np.ndarray
    mean_xhat: np.ndarray
    cov_xhat: np.ndarray
    cov_y_xhat: np.ndarray
    response_var: float


@dataclass(frozen=True)
class SeparableFactors:
    """A depthwise (c·r, 1, kh, kw) + pointwise (n, c·r) pair equivalent to one regular conv."""

    depthwise: np.ndarray
    pointwise: np.ndarray
    bias: np.ndarray
    multiplier: int
    iterations: int = 0
    fallback_channels: tuple[int, ...] = field(default=())

    def dense_weight(self) -> np.ndarray:
        """The equivalent regular weight (n, c, kh, kw)."""
        n = self.pointwise.shape[0]
        cr, _, kh, kw = self.depthwise.shape
        r = self.multiplier
        c = cr // r
        p = self.pointwise.reshape(n, c, r)
        f = self.depthwise.reshape(c, r, kh * kw)
        return np.einsum("nis,isk->nik", p, f).reshape(n, c, kh, kw)

    def macs_per_position(self) -> int:
        cr, _, kh, kw = self.depthwise.shape
        return cr * kh * kw + self.pointwise.shape[0] * cr


@dataclass(frozen=True)
class ChannelFactors:
    """A kh×kw conv with ``rank`` outputs (first) followed by a 1×1 conv (second), Zhang et al."""

    first: np.ndarray  # (rank, c, kh, kw)
    second: np.ndarray  # (n, rank)
    bias: np.ndarray

    def dense_weight(self) -> np.ndarray:
        d, c, kh, kw = self.first.shape
        return (self.second @ self.first.reshape(d, -1)).reshape(self.second.shape[0], c, kh, kw)

    def macs_per_position(self) -> int:
        d, c, kh, kw = self.first.shape
        return d * c * kh * kw + self.second.shape[0] * d


def check_multiplier(weight_shape: tuple[int, ...], multiplier: int) -> str | None:
    """Why ``multiplier`` cannot be used for this weight, or ``None`` if it can."""
    k = int(np.prod(weight_shape[2:]))
    if not 1 <= multiplier <= k:
        return f"multiplier {multiplier} outside 1..{k} (kh·kw) for weight {tuple(weight_shape)}"
    return None


def _fix_signs(u: np.ndarray, vt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Make the largest-magnitude entry of each right singular vector positive (repeatable SVD)."""
    idx = np.argmax(np.abs(vt), axis=-1)
    signs = np.sign(np.take_along_axis(vt, idx[..., None], axis=-1))
    signs[signs == 0] = 1.0
    return u * np.swapaxes(signs, -1, -2), vt * signs


def _svd_channel_factors(w3: np.ndarray, r: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel truncated SVD. ``w3`` (n, c, K) → P (n, c, r), F (c, r, K)."""
    slices = np.transpose(w3, (1, 0, 2))  # (c, n, K)
    u, s, vt = np.linalg.svd(slices, full_matrices=False)
    u, vt = _fix_signs(u, vt)
    p = u[:, :, :r] * s[:, None, :r]  # (c, n, min(r, n, K))
    f = vt[:, :r, :]
    if p.shape[2] < r:  # more filters than the slice's rank (r > n): pad with zero filters
        p = np.concatenate([p, np.zeros(p.shape[:2] + (r - p.shape[2],))], axis=2)
        f = np.concatenate([f, np.zeros((f.shape[0], r - f.shape[1], f.shape[2]))], axis=1)
    return np.transpose(p, (1, 0, 2)), f


def _as_factors(p: np.ndarray, f: np.ndarray, bias: np.ndarray, kernel: tuple[int, int], *,
                iterations: int = 0, fallback: tuple[int, ...] = (), dtype=np.float32) -> SeparableFactors:
    n, c, r = p.shape
    return SeparableFactors(
        depthwise=f.reshape(c * r, 1, *kernel).astype(dtype),
        pointwise=p.reshape(n, c * r).astype(dtype),
        bias=np.asarray(bias).astype(dtype),
        multiplier=r,
        iterations=iterations,
        fallback_channels=tuple(int(i) for i in fallback),
    )


def svd_factors(weight: np.ndarray, bias: np.ndarray | None, multiplier: int = 1) -> SeparableFactors:
    """Data-free decomposition: best rank-``multiplier`` approximation of each channel slice.

    Parameters
    ----------
    weight : (n, c, kh, kw)
    bias : (n,) or None
    multiplier : depthwise filters per input channel, 1 ≤ r ≤ kh·kw.
    """
    weight = np.asarray(weight)
    n, c, kh, kw = weight.shape
    reason = check_multiplier(weight.shape, multiplier)
    if reason:
        raise ValueError(reason)
    w3 = weight.astype(np.float64).reshape(n, c, kh * kw)
    p, f = _svd_channel_factors(w3, multiplier)
    b = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    return _as_factors(p, f, b, (kh, kw), dtype=weight.dtype)


def _ridge(m: np.ndarray) -> float:
    scale = float(np.trace(m)) / m.shape[0] if m.shape[0] else 0.0
    return RIDGE * max(scale, 0.0) + 1e-30


def _cholesky(m: np.ndarray) -> np.ndarray:
    """Lower Cholesky factor of ``m + λI``; λ starts at the relative ridge and grows until it works.

    Moments computed as ``Σ/m − μμᵀ`` can be slightly indefinite in floating point.
    """
    eye = np.eye(m.shape[0])
    ridge = _ridge(m)
    for _ in range(12):
        try:
            return np.linalg.cholesky(m + ridge * eye)
        except np.linalg.LinAlgError:
            ridge *= 10.0
    eigval, eigvec = np.linalg.eigh(0.5 * (m + m.T))
    floor = max(float(eigval.max()), 1e-30) * 1e-6
    return np.linalg.cholesky((eigvec * np.maximum(eigval, floor)) @ eigvec.T)


def _solve_pd(m: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve ``(m + λI) x = rhs`` for symmetric positive semi-definite ``m``."""
    return scipy.linalg.cho_solve((_cholesky(m), True), rhs, check_finite=False)


def _block_diag_taps(f: np.ndarray) -> np.ndarray:
    """Depthwise taps F (c, r, K) as the (D, c·r) matrix mapping a patch to the depthwise outputs."""
    c, r, k = f.shape
    fb = np.zeros((c, k, c, r))
    idx = np.arange(c)
    fb[idx, :, idx, :] = np.transpose(f, (0, 2, 1))
    return fb.reshape(c * k, c * r)


def _dense(p: np.ndarray, f: np.ndarray) -> np.ndarray:
    """Ŵ (n, D) from P (n, c, r) and F (c, r, K)."""
    return np.einsum("nis,isk->nik", p, f).reshape(p.shape[0], -1)


def separable_objective(p: np.ndarray, f: np.ndarray, a: np.ndarray, b: np.ndarray, v: float) -> float:
    """``f(Ŵ) = V − 2⟨Ŵ, A⟩ + ⟨Ŵ B, Ŵ⟩`` for Ŵ given by P (n,c,r), F (c,r,K); A (n,D), B (D,D)."""
    w_hat = _dense(p, f)
    return float(v - 2.0 * np.vdot(w_hat, a) + np.vdot(w_hat @ b, w_hat))


def _gsvd_sweep(p: np.ndarray, f: np.ndarray, a: np.ndarray, b: np.ndarray, live: np.ndarray) -> None:
    """One block-coordinate pass over the channels, updating ``p`` and ``f`` in place."""
    n, c, r = p.shape
    k = f.shape[2]
    w_hat = _dense(p, f)
    q = w_hat @ b  # Q = Ŵ B, kept current
    for i in np.flatnonzero(live):
        blk = slice(i * k, (i + 1) * k)
        b_ii = b[blk, blk]
        m_i = a[:, blk] - q[:, blk] + w_hat[:, blk] @ b_ii
        lower = _cholesky(b_ii)
        t = scipy.linalg.solve_triangular(lower, m_i.T, lower=True).T  # M_i L⁻ᵀ
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        u, vt = _fix_signs(u, vt)
        f_i = scipy.linalg.solve_triangular(lower, vt[:r].T, lower=True, trans="T").T  # (L⁻ᵀ V_r)ᵀ
        norms = np.linalg.norm(f_i, axis=1, keepdims=True)
        norms[norms == 0] = 1.0
        p_i = u[:, :r] * s[:r] * norms.T
        f_i = f_i / norms
        new_w = p_i @ f_i
        q += (new_w - w_hat[:, blk]) @ b[blk, :]
        w_hat[:, blk] = new_w
        p[:, i, :] = p_i
        f[i] = f_i


def _als_step(p: np.ndarray, f: np.ndarray, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One alternating least-squares round: taps given P, then P given the taps."""
    n, c, r = p.shape
    k = f.shape[2]
    p2 = p.reshape(n, c * r)
    g4 = (p2.T @ p2).reshape(c, r, c, r)
    b4 = b.reshape(c, k, c, k)
    h = (b4[:, None, :, :, None, :] * g4[:, :, None, :, :, None]).reshape(c * r * k, c * r * k)
    rhs = np.einsum("nis,nik->isk", p, a.reshape(n, c, k)).reshape(-1)
    f = _solve_pd(h, rhs).reshape(c, r, k)
    norms = np.linalg.norm(f, axis=2, keepdims=True)
    norms[norms == 0] = 1.0
    f = f / norms
    fb = _block_diag_taps(f)
    cov_z = fb.T @ b @ fb
    cross = a @ fb
    p = _solve_pd(cov_z, cross.T).T.reshape(n, c, r)
    return p, f


def gsvd_factors(weight: np.ndarray, bias: np.ndarray | None, stats: LayerStats, multiplier: int = 1, *,
                 max_iter: int = 30, tol: float = 1e-4, sweeps: int = 1) -> SeparableFactors:
    """Data-driven decomposition minimising ``E‖W x + b − Ŵ x̂ − b̂‖²`` (see module docstring).

    Starts from the SVD solution, runs ``sweeps`` per-channel GSVD passes (the paper's solver),
    then alternating least squares (inter-channel compensation) until the relative improvement
    of the objective is below ``tol`` or ``max_iter`` rounds. The best iterate is returned, so
    more iterations never give a worse objective.
    """
    weight = np.asarray(weight)
    n, c, kh, kw = weight.shape
    reason = check_multiplier(weight.shape, multiplier)
    if reason:
        raise ValueError(reason)
    k = kh * kw
    w3 = weight.astype(np.float64).reshape(n, c, k)
    b = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    cov, cross = stats.cov_xhat, stats.cov_y_xhat

    p_svd, f_svd = _svd_channel_factors(w3, multiplier)
    channel_var = np.diagonal(cov).reshape(c, k).sum(axis=1)
    live = channel_var > DEAD_CHANNEL * max(float(channel_var.mean()), 1e-300)
    p, f = p_svd.copy(), f_svd.copy()

    best = separable_objective(p, f, cross, cov, stats.response_var)
    best_pf = (p.copy(), f.copy())
    iterations = 0
    for _ in range(sweeps):
        _gsvd_sweep(p, f, cross, cov, live)
        iterations += 1
        obj = separable_objective(p, f, cross, cov, stats.response_var)
        if obj < best:
            best, best_pf = obj, (p.copy(), f.copy())
    prev = best
    for _ in range(max_iter):
        p, f = _als_step(p, f, cross, cov)
        iterations += 1
        obj = separable_objective(p, f, cross, cov, stats.response_var)
        if obj < best:
            best, best_pf = obj, (p.copy(), f.copy())
        if prev - obj <= tol * max(abs(prev), 1e-30):
            break
        prev = obj
    p, f = best_pf
    dead = np.flatnonzero(~live)
    p[:, dead], f[dead] = p_svd[:, dead], f_svd[dead]
    w_hat = np.einsum("nis,isk->nik", p, f).reshape(n, c * k)
    b_hat = b + w3.reshape(n, c * k) @ stats.mean_x - w_hat @ stats.mean_xhat
    return _as_factors(p, f, b_hat, (kh, kw), iterations=iterations, fallback=tuple(dead), dtype=weight.dtype)


def channel_rank(weight_shape: tuple[int, ...], multiplier: int) -> int:
    """Rank d' whose channel decomposition costs what the separable form costs at ``multiplier``.

    ``d'·(c·K + n) ≈ r·(c·K + n·c)``, rounded, clipped to ``1..min(n, c·K)``.
    """
    n, c = weight_shape[:2]
    k = int(np.prod(weight_shape[2:]))
    d = round(multiplier * (c * k + n * c) / (c * k + n))
    return int(min(max(d, 1), n, c * k))


def channel_factors(weight: np.ndarray, bias: np.ndarray | None, rank: int,
                    stats: LayerStats | None = None) -> ChannelFactors:
    """Channel decomposition by (reduced-rank) regression; data-free if ``stats`` is None."""
    weight = np.asarray(weight)
    n, c, kh, kw = weight.shape
    w2 = weight.astype(np.float64).reshape(n, -1)
    b = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    if stats is None:
        u, s, vt = np.linalg.svd(w2, full_matrices=False)
        u, vt = _fix_signs(u, vt)
        second, first = u[:, :rank] * s[:rank], vt[:rank]
        b_hat = b
    else:
        lower = _cholesky(stats.cov_xhat)
        t = scipy.linalg.solve_triangular(lower, stats.cov_y_xhat.T, lower=True).T  # A L⁻ᵀ
        u, s, vt = np.linalg.svd(t, full_matrices=False)
        u, vt = _fix_signs(u, vt)
        first = scipy.linalg.solve_triangular(lower, vt[:rank].T, lower=True, trans="T").T
        second = u[:, :rank] * s[:rank]
        b_hat = b + w2 @ stats.mean_x - second @ (first @ stats.mean_xhat)
    dtype = weight.dtype
    return ChannelFactors(first.reshape(rank, c, kh, kw).astype(dtype), second.astype(dtype), b_hat.astype(dtype))


def relative_response_error(weight: np.ndarray, bias: np.ndarray | None, approx_weight: np.ndarray,
                            approx_bias: np.ndarray, stats: LayerStats) -> float:
    """``E‖W x + b − Ŵ x̂ − b̂‖² / E‖W x − E[W x]‖²`` from moments (held-out statistics).

    The centred part is ``V − 2⟨Ŵ, A⟩ + ⟨Ŵ B, Ŵ⟩``; the mean part is ``‖E[y] − E[ŷ]‖²``.
    """
    n = weight.shape[0]
    w2 = np.asarray(weight, dtype=np.float64).reshape(n, -1)
    wh = np.asarray(approx_weight, dtype=np.float64).reshape(n, -1)
    b = np.zeros(n) if bias is None else np.asarray(bias, dtype=np.float64)
    centred = stats.response_var - 2.0 * np.vdot(wh, stats.cov_y_xhat) + np.vdot(wh @ stats.cov_xhat, wh)
    mean_gap = (w2 @ stats.mean_x + b) - (wh @ stats.mean_xhat + np.asarray(approx_bias, dtype=np.float64))
    err = max(float(centred), 0.0) + float(mean_gap @ mean_gap)
    if stats.response_var <= 0:
        return 0.0 if err <= 1e-30 else float("inf")
    return err / stats.response_var


def relative_weight_error(weight: np.ndarray, approx_weight: np.ndarray) -> float:
    """``‖W − Ŵ‖_F² / ‖W‖_F²`` — the data-free error measure."""
    w = np.asarray(weight, dtype=np.float64)
    denom = float(np.vdot(w, w))
    diff = w - np.asarray(approx_weight, dtype=np.float64)
    return float(np.vdot(diff, diff)) / denom if denom > 0 else 0.0
