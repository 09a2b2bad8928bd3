"""The ways to replace one regular conv (``--method``), as objects: what the replacement's first
conv looks like, what it costs, and how its weights are solved (solve.py has the math).

For a weight ``W`` (n, c, kh, kw), ``K = kh·kw``, at depth multiplier ``r``:

=========  ==============================  =====================  ==========================
method     first conv (channels, groups)   MACs per position      weights
=========  ==============================  =====================  ==========================
svd        depthwise: (c·r, c)             c·r·K + n·c·r          per-channel SVD, data-free
gsvd       depthwise: (c·r, c)             c·r·K + n·c·r          GSVD + compensation (data)
channel    k×k conv: (d', 1)               d'·(c·K + n)           reduced-rank regression
=========  ==============================  =====================  ==========================

with ``d' = solve.channel_rank(W.shape, r)``, the rank whose cost matches the separable form's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .candidates import ConvLayer
from .errors import Refused, refuse
from .solve import (RIDGE, SOLVER_ROUNDS, ChannelFactors, LayerStats, SeparableFactors, channel_factors, channel_rank,
                    check_multiplier, gsvd_factors, svd_factors)


@dataclass(frozen=True)
class Method:
    """A depth-wise separable replacement (svd and gsvd share the form, not the weights)."""

    name: str

    def mid(self, weight_shape: tuple[int, ...], r: int) -> tuple[int, int]:
        """(channels, groups) of the first conv of the replacement."""
        return weight_shape[1] * r, weight_shape[1]

    def depthwise_macs(self, weight_shape: tuple[int, ...], r: int) -> int:
        """MACs per output position of the first conv."""
        return weight_shape[1] * r * int(np.prod(weight_shape[2:]))

    def pointwise_macs(self, weight_shape: tuple[int, ...], r: int) -> int:
        """MACs per output position of the second (1×1) conv."""
        return weight_shape[0] * self.mid(weight_shape, r)[0]

    def macs(self, weight_shape: tuple[int, ...], r: int) -> int:
        """MACs per output position of the replacement."""
        return self.depthwise_macs(weight_shape, r) + self.pointwise_macs(weight_shape, r)

    def unprofitable(self, weight_shape: tuple[int, ...], r: int) -> Refused | None:
        """Why the replacement at ``r`` is impossible or saves no MACs, or None."""
        reason = check_multiplier(weight_shape, r)
        if reason:
            return reason
        regular, cost = int(np.prod(weight_shape)), self.macs(weight_shape, r)
        if cost >= regular:
            return refuse(f"no MAC saving at multiplier {r}: {cost} vs {regular} MACs per output position")
        return None

    def solve(self, layer: ConvLayer, r: int, stats: LayerStats | None, *, rounds: int = SOLVER_ROUNDS,
              ridge: float = RIDGE) -> SeparableFactors | ChannelFactors:
        """The factors at ``r`` (``rounds`` L-BFGS rounds and the relative ``ridge`` of the
        data-driven solvers: solve.gsvd_factors, solve.ridged_moments)."""
        if self.name == "svd":
            return svd_factors(layer.weight, layer.bias, r)
        return gsvd_factors(layer.weight, layer.bias, stats, r, max_iter=rounds, ridge=ridge)


@dataclass(frozen=True)
class ChannelMethod(Method):
    """Zhang et al.'s channel decomposition at the separable form's cost (brief §1.5)."""

    def mid(self, weight_shape: tuple[int, ...], r: int) -> tuple[int, int]:
        return channel_rank(weight_shape, r), 1

    def depthwise_macs(self, weight_shape: tuple[int, ...], r: int) -> int:
        return self.mid(weight_shape, r)[0] * weight_shape[1] * int(np.prod(weight_shape[2:]))

    def solve(self, layer: ConvLayer, r: int, stats: LayerStats | None, *, rounds: int = SOLVER_ROUNDS,
              ridge: float = RIDGE) -> ChannelFactors:
        return channel_factors(layer.weight, layer.bias, channel_rank(layer.weight_shape, r), stats, ridge)


SVD = Method("svd")
GSVD = Method("gsvd")
CHANNEL = ChannelMethod("channel")
METHODS: dict[str, Method] = {m.name: m for m in (SVD, GSVD, CHANNEL)}
