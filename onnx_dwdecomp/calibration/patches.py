"""Patch geometry: a conv's effective padding and output size, its input patch vectors at
sampled output positions (tap-major, gathered from a zero-padded NHWC copy), and how many
positions each sample contributes (:func:`positions_per_sample`, also used by the memory
estimate).
"""

from __future__ import annotations

import numpy as np

from ..candidates import ConvLayer


def effective_pads(layer: ConvLayer, in_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) zero padding actually applied, resolving ``auto_pad``."""
    if layer.auto_pad in ("", "NOTSET"):
        return layer.pads
    if layer.auto_pad == "VALID":
        return (0, 0, 0, 0)
    begin, end = [], []
    for size, k, s, d in zip(in_hw, layer.kernel, layer.strides, layer.dilations):
        out = -(-size // s)
        total = max((out - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        if layer.auto_pad == "SAME_UPPER":
            begin.append(small), end.append(total - small)
        else:
            begin.append(total - small), end.append(small)
    return (begin[0], begin[1], end[0], end[1])


def output_hw(layer: ConvLayer, in_hw: tuple[int, int]) -> tuple[int, int]:
    top, left, bottom, right = effective_pads(layer, in_hw)
    return tuple(
        (size + p0 + p1 - (k - 1) * d - 1) // s + 1
        for size, p0, p1, k, s, d in zip(in_hw, (top, left), (bottom, right), layer.kernel, layer.strides,
                                         layer.dilations)
    )


def extract_patches(x: np.ndarray, layer: ConvLayer, positions: np.ndarray) -> np.ndarray:
    """Patch vectors of ``x`` (B, C, H, W) at flat output positions ``positions`` (B, P).

    Returns (B·P, kh·kw·C), *tap-major*: entry ``k·C + i`` is tap ``k`` of channel ``i`` — the
    order the gather produces, so no transposed copy is made. :class:`MomentSums` takes rows
    in this order and returns channel-major moments (``i·K + k``, like ``W.reshape(n, -1)``).
    """
    bsz, c, h, w = x.shape
    top, left, bottom, right = effective_pads(layer, (h, w))
    _, ow = output_hw(layer, (h, w))
    # A contiguous zero-padded NHWC copy: gathering whole channel vectors is about 2× faster
    # than gathering from a transposed NCHW view.
    nhwc = np.zeros((bsz, h + top + bottom, w + left + right, c), dtype=x.dtype)
    nhwc[:, top:top + h, left:left + w] = x.transpose(0, 2, 3, 1)
    kh, kw = layer.kernel
    (sh, sw), (dh, dw) = layer.strides, layer.dilations
    oy, ox = np.divmod(positions, ow)  # (B, P)
    ky, kx = np.divmod(np.arange(kh * kw), kw)  # (K,)
    rows = oy[:, :, None] * sh + ky * dh  # (B, P, K)
    cols = ox[:, :, None] * sw + kx * dw
    batch = np.arange(bsz)[:, None, None]
    patches = nhwc[batch, rows, cols]  # (B, P, K, C)
    return patches.reshape(bsz * positions.shape[1], -1)


def tap_major(weight: np.ndarray) -> np.ndarray:
    """A conv weight (n, C, kh, kw) as the (n, kh·kw·C) matrix that acts on tap-major patches."""
    n, c = weight.shape[:2]
    return np.ascontiguousarray(weight.reshape(n, c, -1).transpose(0, 2, 1)).reshape(n, -1)


#: Fit patches wanted per patch dimension D = C_in·kh·kw: the D×D moments need well over D
#: patches to be full rank; below that the ridge decides the solution instead of the data.
PATCHES_PER_DIM = 4


def positions_per_sample(positions: int | None, total: int, dim: int, fit_samples: int) -> int:
    """Output positions sampled per image: at least ``positions`` (None = all), raised so the fit
    samples give ``PATCHES_PER_DIM · dim`` patches, capped at all ``total`` positions."""
    if positions is None:
        return total
    wanted = -(-PATCHES_PER_DIM * dim // max(fit_samples, 1))
    return min(total, max(positions, wanted))


def patch_pair(layer: ConvLayer, x_all: np.ndarray, xhat_all: np.ndarray, rows: np.ndarray,
                positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Patches of samples ``rows`` in the original and in the decomposed network (tap-major)."""
    x = extract_patches(np.asarray(x_all[rows], dtype=np.float32), layer, positions[rows])
    if xhat_all is x_all:
        return x, x
    return x, extract_patches(np.asarray(xhat_all[rows], dtype=np.float32), layer, positions[rows])
