"""Folding passes: per-channel affine maps into convs (before), pointwise pairs into one (after).

Both passes are onnx-graphsurgeon rewrites that return a :class:`FoldResult` and never mutate
their input model. Folding is exact in real arithmetic; the new weights are computed in float64
and cast back to the weight's dtype, so float32 outputs change only by rounding (≈ 1e-7 relative).

BatchNormalization / per-channel affine folding (:func:`fold_batchnorm`)
------------------------------------------------------------------------
A ``Conv`` with weight ``W`` (``n × c/g × k…``) and bias ``b`` (``n``, zero when absent)
computes, per output channel ``o``, ``y_o = W_o ⋆ x + b_o``. A per-channel affine map after it,
``z_o = s_o · y_o + t_o``, is the same conv with

    W'_o = s_o · W_o,        b'_o = s_o · b_o + t_o.

The affine maps recognised (inference form, every parameter a constant):

- ``BatchNormalization(scale γ, bias β, mean μ, var σ²)``:
  ``s = γ / √(σ² + ε)``, ``t = β − μ · s``;
- ``Mul(y, m)``: ``s = m``, ``t = 0``;  ``Add(y, a)``: ``s = 1``, ``t = a``,

where ``m``/``a`` broadcast along the channel axis only: a scalar, ``(1,)``, ``(C, 1, 1)``,
``(1, C, 1, 1)`` and the like (a ``(C,)`` constant broadcasts along the *last* axis, so it is
not per-channel and is left alone). A map is folded when the conv's output feeds nothing but
that node and is not a graph output; chains (``Conv → BN → Mul → Add``) fold one after another.
The folded node disappears and the conv writes the folded node's output tensor, so graph
outputs and every downstream name are unchanged.

Pointwise-pair folding (:func:`fold_pointwise`)
-----------------------------------------------
Two 1×1 convs (group 1, stride 1, no padding, dilation 1) with weights ``W1`` (``m × c``),
``W2`` (``n × m``) and biases ``b1``, ``b2``, with a per-channel affine ``(s, t)`` between them
(BatchNormalization / Mul / Add as above, or none: ``s = 1, t = 0``) and no nonlinearity,
compute ``z = W2 (s ⊙ (W1 x + b1) + t) + b2``, i.e. one 1×1 conv with

    W = W2 · diag(s) · W1,      b = W2 (s ⊙ b1 + t) + b2.

Only the first conv of a pair is given (the new pointwise convs of a decomposition); the second
must be the only consumer along the way. The merged conv keeps the second conv's node name and
output tensor. This is what turns a decomposed *depthwise-only* regular counterpart
(``3×3 → BN → 1×1`` with the 3×3 regular) back into ``depthwise 3×3 → 1×1``.

Every check that can refuse a fold returns the reason as text instead of raising
(:func:`affine_after`, :func:`check_pointwise`); refusals are listed in the result. A fold is
refused when a weight, a parameter or the folded result would hold NaN/Inf (a
BatchNormalization with ``var + ε ≤ 0`` divides by zero; float64 products can overflow the
weight's dtype): the nodes then stay as they are.

For models of IR version < 4, whose graph inputs must list every initializer, the folded and
rewritten models list their new initializers too (:func:`modelio.sync_initializer_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import modelio
from .candidates import constant_values
from .errors import NumericalError, Refused, refuse
from .graph import node_label
from .rewrite import NameAllocator, Replacement, apply_replacements, drop_orphan_producers, export_like

__all__ = ["Affine", "Fold", "Merge", "FoldResult", "affine_after", "check_pointwise",
           "fold_batchnorm", "fold_pointwise"]

_AFFINE_OPS = ("BatchNormalization", "Mul", "Add")


@dataclass(frozen=True)
class Fold:
    """``node`` (a BatchNormalization, Mul or Add) was folded into conv ``conv``."""

    node: str
    op: str
    conv: str


@dataclass(frozen=True)
class Merge:
    """Pointwise conv ``first`` (and the affine nodes ``through``) were merged into ``into``."""

    first: str
    through: tuple[str, ...]
    into: str


@dataclass(frozen=True)
class FoldResult:
    """The output of a folding pass.

    Attributes
    ----------
    model : onnx.ModelProto
        The new model (the input model itself when nothing changed).
    folds : tuple of Fold or Merge
        What was folded, in graph order.
    refused : tuple of Refused
        Nodes that looked foldable but were not (BatchNormalization after a conv, or a given
        pointwise conv), with the reason.
    """

    model: onnx.ModelProto
    folds: tuple[Fold | Merge, ...]
    refused: tuple[Refused, ...] = ()

    @property
    def modified(self) -> bool:
        return bool(self.folds)


@dataclass(frozen=True)
class Affine:
    """Per-channel ``z = scale · y + shift`` (both shape ``(channels,)``, float64)."""

    scale: np.ndarray
    shift: np.ndarray


def _name(node: gs.Node) -> str:
    return node_label(node.op, node.name, node.outputs[0].name if node.outputs else None)


def _attr(node: gs.Node, key: str, default):
    value = node.attrs.get(key, default)
    return value.decode() if isinstance(value, bytes) else value


def _per_channel(value: np.ndarray, channels: int, rank: int) -> np.ndarray | Refused:
    """``value`` as a ``(channels,)`` vector if it broadcasts along axis 1 of a rank-``rank``
    tensor only; otherwise the reason it does not."""
    if value.ndim > rank:
        return refuse(f"constant of shape {value.shape} has more dims than the conv output (rank {rank})")
    shape = (1,) * (rank - value.ndim) + tuple(value.shape)
    for axis, d in enumerate(shape):
        if d != 1 and not (axis == 1 and d == channels):
            return refuse(f"constant of shape {tuple(value.shape)} is not per-channel for {channels} channels "
                    f"(expected a scalar, (C,1,1) or (1,C,1,1))")
    return np.broadcast_to(value.reshape(shape[1]).astype(np.float64), (channels,)).copy()


def affine_after(node: gs.Node, tensor: gs.Tensor, channels: int, rank: int,
                 values: dict[str, np.ndarray], dtype: np.dtype) -> Affine | Refused:
    """The per-channel affine map ``node`` applies to ``tensor``, or why it is not one.

    Parameters
    ----------
    node : gs.Node
        A consumer of ``tensor``.
    tensor : gs.Tensor
        A conv output with ``channels`` channels on axis 1 and ``rank`` dims.
    values : dict
        Constant tensor values by name (:func:`onnx_dwdecomp.candidates.constant_values`).
    dtype : numpy dtype
        The conv weight's dtype; parameters of another dtype are refused.
    """
    if node.op not in _AFFINE_OPS or node.domain not in (None, "", "ai.onnx"):
        return refuse(f"{node.op} is not a per-channel affine map")
    outputs = [o for o in node.outputs if o.name]
    if len(outputs) != 1:
        return refuse(f"{node.op} has {len(outputs)} outputs (training-mode statistics?)")
    if node.op == "BatchNormalization":
        if node.inputs[0] is not tensor:
            return refuse("the conv output is not the normalised input")
        if _attr(node, "training_mode", 0):
            return refuse("training_mode=1")
        if len(node.inputs) != 5:
            return refuse(f"BatchNormalization with {len(node.inputs)} inputs, expected 5")
        params = [values.get(t.name) for t in node.inputs[1:]]
        if any(p is None for p in params):
            return refuse("its scale/bias/mean/var are not all constants")
        if any(p.shape != (channels,) for p in params):
            return refuse(f"parameter shapes {[p.shape for p in params]} do not match {channels} channels")
        if any(p.dtype != dtype for p in params):
            return refuse(f"parameter dtype differs from the conv weight's {dtype}")
        gamma, beta, mean, var = (p.astype(np.float64) for p in params)
        eps = float(_attr(node, "epsilon", 1e-5))
        if not all(np.isfinite(p).all() for p in (gamma, beta, mean, var)) or not np.isfinite(eps):
            return refuse("its scale/bias/mean/var hold NaN/Inf")
        if (var + eps <= 0).any():
            k = int(np.argmax(var + eps <= 0))
            return refuse(f"var + epsilon = {var[k] + eps:g} ≤ 0 for channel {k} (it divides by zero; "
                    f"the node computes NaN/Inf)")
        with np.errstate(all="ignore"):
            scale = gamma / np.sqrt(var + eps)
            shift = beta - mean * scale
        if not (np.isfinite(scale).all() and np.isfinite(shift).all()):
            return refuse("its scale γ/√(var + ε) overflows")
        return Affine(scale, shift)
    if len(node.inputs) != 2:
        return refuse(f"{node.op} with {len(node.inputs)} inputs")
    others = [t for t in node.inputs if t is not tensor]
    if len(others) != 1:
        return refuse(f"{node.op} uses the conv output twice")
    value = values.get(others[0].name)
    if value is None:
        return refuse(f"{node.op} operand {others[0].name!r} is computed at run time")
    if value.dtype != dtype:
        return refuse(f"{node.op} operand dtype {value.dtype} differs from the conv weight's {dtype}")
    vec = _per_channel(value, channels, rank)
    if isinstance(vec, Refused):
        return vec
    if not np.isfinite(vec).all():
        return refuse(f"{node.op} operand {others[0].name!r} holds NaN/Inf")
    if node.op == "Mul":
        return Affine(vec, np.zeros(channels))
    return Affine(np.ones(channels), vec)


def _conv_params(conv: gs.Node, values: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None] | Refused:
    """Constant weight and bias of a Conv, or why they are not usable."""
    if conv.op != "Conv" or conv.domain not in (None, "", "ai.onnx"):
        return refuse(f"{conv.op} is not a Conv")
    if len(conv.inputs) < 2:
        return refuse("Conv without weight")
    weight = values.get(conv.inputs[1].name)
    if weight is None:
        return refuse("conv weight is computed at run time")
    if not np.issubdtype(weight.dtype, np.floating):
        return refuse(f"conv weight dtype {weight.dtype} is not floating point")
    bias = None
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        bias = values.get(conv.inputs[2].name)
        if bias is None:
            return refuse("conv bias is computed at run time")
    for what, value in (("weight", weight), ("bias", bias)):
        if value is not None and np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            return refuse(f"conv {what} holds NaN/Inf")
    return weight, bias


def _sole_consumer(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | Refused:
    if tensor.name in graph_outputs:
        return refuse(f"{tensor.name!r} is a graph output")
    if len(tensor.outputs) != 1:
        return refuse(f"{tensor.name!r} has {len(tensor.outputs)} consumers")
    return tensor.outputs[0]


def check_pointwise(conv: gs.Node, values: dict[str, np.ndarray]) -> Refused | None:
    """Why ``conv`` is not a plain 1×1 conv (group 1, stride 1, no pads, dilation 1), or None."""
    params = _conv_params(conv, values)
    if isinstance(params, Refused):
        return params
    weight = params[0]
    if weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]):
        return refuse(f"kernel {tuple(weight.shape[2:])} is not 1×1")
    if _attr(conv, "group", 1) != 1:
        return refuse(f"group={_attr(conv, 'group', 1)}")
    spatial = weight.ndim - 2
    if any(s != 1 for s in _attr(conv, "strides", [1] * spatial)):
        return refuse(f"strides {list(_attr(conv, 'strides', []))}")
    if any(d != 1 for d in _attr(conv, "dilations", [1] * spatial)):
        return refuse(f"dilations {list(_attr(conv, 'dilations', []))}")
    if any(p != 0 for p in _attr(conv, "pads", [0] * 2 * spatial)):
        return refuse(f"pads {list(_attr(conv, 'pads', []))}")
    # auto_pad SAME_* / VALID pad nothing for a 1×1 kernel at stride 1.
    return None


class _Surgery:
    """Shared bookkeeping of both passes: constant values, names, replaced weights, export."""

    def __init__(self, model: onnx.ModelProto):
        model, self.stash = modelio.without_large_data(model)  # > 1 GiB tensors travel as stubs
        self.model = model
        self.graph = gs.import_onnx(model)
        self.values = constant_values(model.graph, model.ir_version)
        self.names = NameAllocator.for_model(model)
        self.graph_outputs = {o.name for o in model.graph.output}
        self.replaced: set[str] = set()  # initializer names whose values were replaced in place
        self.removed: set[int] = set()  # id() of removed nodes

    def set_param(self, conv: gs.Node, index: int, array: np.ndarray, suffix: str) -> None:
        """Make ``conv.inputs[index]`` a constant holding ``array`` (appending a bias if needed).

        An initializer that only this conv reads is overwritten under its own name; anything
        else (shared initializer, Constant node output) gets a new name derived from the node.
        """
        old = conv.inputs[index] if index < len(conv.inputs) and conv.inputs[index].name else None
        if (old is not None and isinstance(old, gs.Constant) and len(old.outputs) == 1
                and old.name not in self.graph_outputs):
            name = old.name
            self.replaced.add(name)
        else:
            base = conv.name or conv.outputs[0].name
            name = self.names(f"{base}.{suffix}")
        new = gs.Constant(name, np.ascontiguousarray(array))
        self.values[name] = new.values
        if old is not None:
            conv.inputs[index] = new
            drop_orphan_producers(old, self.graph, self.graph_outputs)
        else:
            while len(conv.inputs) < index:
                conv.inputs.append(gs.Variable.empty())
            conv.inputs.append(new)

    def remove(self, node: gs.Node) -> None:
        """Disconnect and delete ``node`` and the Constant chains that fed only it."""
        inputs = list(node.inputs)
        node.inputs.clear()
        node.outputs.clear()
        self.graph.nodes.remove(node)
        self.removed.add(id(node))
        for t in inputs:
            drop_orphan_producers(t, self.graph, self.graph_outputs)

    def export(self) -> onnx.ModelProto:
        """The graph as a model with the input's metadata and initializer order (see rewrite.py)."""
        exported = modelio.restore_large_data(export_like(self.graph, self.model, self.replaced), self.stash)
        return modelio.sync_initializer_inputs(exported, self.model)


def _scaled(weight: np.ndarray, bias: np.ndarray | None, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
    """``(s · W, s · b + t)`` in float64, cast back to the weight's dtype (NaN/Inf where that
    overflows: the caller refuses the fold)."""
    shape = (-1,) + (1,) * (weight.ndim - 1)
    b = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    with np.errstate(all="ignore"):
        w = weight.astype(np.float64) * affine.scale.reshape(shape)
        return w.astype(weight.dtype), (affine.scale * b + affine.shift).astype(weight.dtype)


def _finite(*arrays: np.ndarray) -> bool:
    return all(np.isfinite(a).all() for a in arrays)


def fold_batchnorm(model: onnx.ModelProto) -> FoldResult:
    """Fold ``Conv → BatchNormalization`` and ``Conv → Mul/Add`` (per-channel constants).

    Preconditions: none (anything not matching the patterns in the module docstring is left
    alone). Postconditions: the model computes the same function; every folded node is gone;
    graph inputs, outputs, opset and all tensor names outside the folded pairs are unchanged.
    ``refused`` lists each BatchNormalization that directly follows a Conv but was not folded.
    """
    conv_outputs = {n.output[0] for n in model.graph.node if n.op_type == "Conv" and n.output}
    if not any(n.op_type in _AFFINE_OPS and conv_outputs.intersection(n.input) for n in model.graph.node):
        return FoldResult(model, ())  # nothing to look at: skip the graph import (large models)
    surgery = _Surgery(model)
    folds: list[Fold] = []
    refused: list[Refused] = []
    for conv in list(surgery.graph.nodes):
        if conv.op != "Conv":
            continue
        while conv.outputs:
            out = conv.outputs[0]
            following = [n for n in out.outputs if n.op in _AFFINE_OPS]
            if not following:
                break
            params = _conv_params(conv, surgery.values)
            reason = params if isinstance(params, Refused) else None
            consumer = _sole_consumer(out, surgery.graph_outputs)
            if reason is None and isinstance(consumer, Refused):
                reason = refuse(f"the conv output {consumer.reason}")
            affine = None
            if reason is None:
                weight, bias = params
                affine = affine_after(consumer, out, weight.shape[0], weight.ndim, surgery.values,
                                      weight.dtype)
                if isinstance(affine, Refused):
                    reason = affine
            if reason is not None:
                refused += [reason.named(_name(n)) for n in following if n.op == "BatchNormalization"]
                break
            nxt = consumer
            new_w, new_b = _scaled(weight, bias, affine)
            if not _finite(new_w, new_b):
                refused += [Refused(_name(n), f"the folded weights would overflow {weight.dtype} (NaN/Inf)")
                            for n in following if n.op == "BatchNormalization"]
                break
            result = nxt.outputs[0]
            surgery.set_param(conv, 1, new_w, "weight")
            surgery.set_param(conv, 2, new_b, "bias")
            folds.append(Fold(_name(nxt), nxt.op, _name(conv)))
            surgery.remove(nxt)
            conv.outputs[0] = result  # the conv now writes the folded node's output name
    if not folds:
        return FoldResult(model, (), tuple(refused))
    return FoldResult(surgery.export(), tuple(folds), tuple(refused))


def fold_pointwise(model: onnx.ModelProto, first_convs: Iterable[str]) -> FoldResult:
    """Merge each named 1×1 conv into the 1×1 conv it feeds (see the module docstring).

    Parameters
    ----------
    model : onnx.ModelProto
    first_convs : iterable of str
        Node names of the first convs of candidate pairs (e.g. the pointwise convs a
        decomposition just inserted). Each is merged when its output reaches, through nothing
        but per-channel affine nodes with a single consumer each, a plain 1×1 conv; otherwise
        it is listed in ``refused`` with the reason.

    Postconditions: the model computes the same function; graph inputs/outputs and the names
    of every surviving tensor are unchanged; merged nodes and their weights are gone.
    """
    first_convs = list(first_convs)
    if not first_convs:
        return FoldResult(model, ())
    surgery = _Surgery(model)
    by_name = {n.name: n for n in surgery.graph.nodes if n.name}
    merges: list[Merge] = []
    refused: list[Refused] = []
    for name in first_convs:
        first = by_name.get(name)
        if first is None or id(first) in surgery.removed:
            refused.append(Refused(name, "no such node (already merged?)"))
            continue
        outcome = _merge_pair(surgery, first)
        if isinstance(outcome, Refused):
            refused.append(outcome.named(name))
        else:
            merges.append(outcome)
    if not merges:
        return FoldResult(model, (), tuple(refused))
    return FoldResult(surgery.export(), tuple(merges), tuple(refused))


def _merge_pair(surgery: _Surgery, first: gs.Node) -> Merge | Refused:
    """Merge ``first`` into the 1×1 conv it feeds, or return why not (the graph is unchanged)."""
    values = surgery.values
    reason = check_pointwise(first, values)
    if reason:
        return refuse(f"not a plain 1×1 conv: {reason.reason}")
    w1, b1 = _conv_params(first, values)
    m = w1.shape[0]
    scale, shift = np.ones(m), np.zeros(m)
    path: list[gs.Node] = []
    tensor = first.outputs[0]
    while True:
        nxt = _sole_consumer(tensor, surgery.graph_outputs)
        if isinstance(nxt, Refused):
            return nxt
        if nxt.op in _AFFINE_OPS:
            affine = affine_after(nxt, tensor, m, w1.ndim, values, w1.dtype)
            if isinstance(affine, Refused):
                return refuse(f"{_name(nxt)}: {affine.reason}")
            scale, shift = affine.scale * scale, affine.scale * shift + affine.shift
            path.append(nxt)
            tensor = nxt.outputs[0]
            continue
        if nxt.op != "Conv" or not nxt.inputs or nxt.inputs[0] is not tensor:
            return refuse(f"feeds {nxt.op} {_name(nxt)!r}, not a 1×1 conv")
        reason = check_pointwise(nxt, values)
        if reason:
            return refuse(f"feeds conv {_name(nxt)!r} that is not a plain 1×1 conv: {reason.reason}")
        second = nxt
        break
    w2, b2 = _conv_params(second, values)
    if w2.dtype != w1.dtype or w2.shape[1] != m:
        return refuse(f"conv {_name(second)!r} has weight {w2.shape} {w2.dtype}, expected (n, {m}) {w1.dtype}")
    a1 = w1.reshape(m, -1).astype(np.float64)                      # (m, c)
    a2 = w2.reshape(w2.shape[0], m).astype(np.float64)             # (n, m)
    bias1 = np.zeros(m) if b1 is None else b1.astype(np.float64)
    bias2 = np.zeros(w2.shape[0]) if b2 is None else b2.astype(np.float64)
    with np.errstate(all="ignore"):
        weight = ((a2 * scale) @ a1).astype(w2.dtype)
        bias = (a2 @ (scale * bias1 + shift) + bias2).astype(w2.dtype)
    if not _finite(weight, bias):
        return refuse(f"the merged weights would overflow {w2.dtype} (NaN/Inf)")
    surgery.set_param(second, 1, weight.reshape(w2.shape[0], *w1.shape[1:]), "weight")
    surgery.set_param(second, 2, bias, "bias")
    second.inputs[0] = first.inputs[0]  # rewire before removing, so x keeps a consumer
    for node in [first, *path]:
        surgery.remove(node)
    return Merge(_name(first), tuple(_name(n) for n in path), _name(second))


def rewrite_and_merge(model: onnx.ModelProto, replacements: list[Replacement]) -> tuple[FoldResult, dict[str, str]]:
    """Apply ``replacements`` (rewrite.py), then merge each one's new pointwise conv — the node
    that writes the replaced conv's output — into a 1×1 conv it feeds (:func:`fold_pointwise`).

    Returns the fold result (its ``model`` is the rewritten model) and pointwise node name →
    name of the conv it replaced.
    """
    for r in replacements:
        arrays = [v for v in vars(r.factors).values() if isinstance(v, np.ndarray)]
        if not _finite(*arrays):
            raise NumericalError(f"conv {r.layer.name!r}: the solver gave NaN/Inf weights (the calibration data "
                                 f"or the weights are too large for float32 statistics; rescale the data or "
                                 f"--exclude {r.layer.name!r}); nothing written")
    rewritten = apply_replacements(model, replacements)
    producer = {out: node.name for node in rewritten.graph.node for out in node.output}
    pointwise = {producer[r.layer.output]: r.layer.name for r in replacements}
    merged = fold_pointwise(rewritten, list(pointwise))
    return replace(merged, model=modelio.sync_initializer_inputs(merged.model, model)), pointwise
