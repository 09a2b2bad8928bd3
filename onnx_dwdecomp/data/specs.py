"""What a model input expects (:class:`InputSpec`), which inputs carry the samples
(:func:`batch_inputs`, :func:`fixed_batch`), and the checks every source's values go through:
the layout against the spec, the dtype it may be cast to, finite values within :data:`MAX_ABS`.
The rules for inputs without a sample axis are in the package docstring (onnx_dwdecomp.data).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import CalibrationError, OptionError
from ..formatting import fmt_shape

#: Largest magnitude accepted in calibration data: √(float32 max), above which the float32
#: products of the statistics (x·xᵀ) overflow.
MAX_ABS = float(np.sqrt(np.finfo(np.float32).max))


@dataclass(frozen=True)
class InputSpec:
    """What one graph input expects.

    Parameters
    ----------
    name : str
        Graph input name.
    dtype : numpy.dtype
        Element type the model expects (anything :class:`numpy.dtype` accepts; normalised).
    shape : tuple of (int or None)
        Model input shape, ``None`` for a dynamic or unknown dimension. Axis 0 is the batch
        axis; its value is never compared with the data (see ``pad_to`` in
        :meth:`CalibrationData.iter_batches`).
    """

    name: str
    dtype: np.dtype
    shape: tuple[int | None, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise OptionError(f"InputSpec name must be a non-empty string, got {self.name!r}")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError as e:
            raise OptionError(f"InputSpec {self.name!r}: invalid dtype {self.dtype!r}") from e
        try:
            dims = tuple(self.shape)
        except TypeError as e:
            raise OptionError(f"InputSpec {self.name!r}: shape must be a tuple, got {self.shape!r}") from e
        shape: list[int | None] = []
        for d in dims:
            if d is None:
                shape.append(None)
            elif isinstance(d, numbers.Integral) and not isinstance(d, bool) and int(d) >= 0:
                shape.append(int(d))
            else:
                raise OptionError(
                    f"InputSpec {self.name!r}: each dim must be a non-negative int or None, got {self.shape!r}"
                )
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "shape", tuple(shape))


def batch_inputs(specs: Sequence[InputSpec]) -> set[str]:
    """The inputs whose axis 0 is the sample (batch) axis (package docstring, onnx_dwdecomp.data):
    those with a dynamic axis 0; in a fixed-batch model (none dynamic), those whose axis 0 equals
    the first input's. Rank-0 inputs never have one."""
    ranked = [s for s in specs if s.shape]
    dynamic = {s.name for s in ranked if s.shape[0] is None}
    if dynamic or not ranked:
        return dynamic
    return {s.name for s in ranked if s.shape[0] == ranked[0].shape[0]}


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The model's fixed batch dim (axis 0 of the inputs with a sample axis, when none is
    dynamic); None for a dynamic batch. Calibration batches are padded to it."""
    batched = batch_inputs(specs)
    first = next((s for s in specs if s.name in batched), None)
    return first.shape[0] if first is not None and first.shape[0] else None


def fix_dims(specs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]]) -> list[InputSpec]:
    """``specs`` with the dims the model leaves dynamic (not axis 0, the batch) set from
    ``shapes`` (``--input-shape``), so that data is read at those sizes — an image folder is
    cropped to them. A shape of another rank, or one that contradicts a fixed dim, leaves the
    spec as it is (shapes.resolve_input_shapes reports it)."""
    out = []
    for spec in specs:
        given = shapes.get(spec.name)
        if (given is not None and len(given) == len(spec.shape) and spec.shape
                and all(w is None or w == g for w, g in zip(spec.shape, given))):
            spec = InputSpec(spec.name, spec.dtype, spec.shape[:1] + tuple(
                int(g) if w is None else w for w, g in zip(spec.shape[1:], given[1:])))
        out.append(spec)
    return out


# --------------------------------------------------------------------------- checks


def fmt_expected(spec: InputSpec) -> str:
    return fmt_shape(["N"] + ["?" if d is None else d for d in spec.shape[1:]])


def quoted_names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def check_specs(inputs: Sequence[InputSpec]) -> list[InputSpec]:
    try:
        specs = list(inputs)
    except TypeError as e:
        raise OptionError(f"inputs must be a sequence of InputSpec, got {type(inputs).__name__}") from e
    if not specs:
        raise OptionError("inputs is empty: the model needs at least one input to calibrate")
    for s in specs:
        if not isinstance(s, InputSpec):
            raise OptionError(f"inputs must hold InputSpec objects, got {type(s).__name__}")
    names = [s.name for s in specs]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise OptionError(f"duplicate input names in inputs: {quoted_names(dups)}")
    return specs


def key_problems(wanted: Sequence[str], keys: Sequence[Any], missing_what: str) -> str:
    """``"<missing_what> 'a'; unexpected keys 'b'"`` for a key set that differs from ``wanted``, else ``""``."""
    missing = [n for n in wanted if n not in keys]
    extra = [str(k) for k in keys if k not in wanted]
    parts = [f"{missing_what} {quoted_names(missing)}"] if missing else []
    if extra:
        parts.append(f"unexpected keys {quoted_names(extra)}")
    return "; ".join(parts)


def unbatched_form(spec: InputSpec, shape: tuple[int, ...], where: str) -> str:
    """How data of ``shape`` feeds ``spec``, an input without a sample axis: ``"one"`` value
    for all samples (the input's shape), or ``"rows"``, one per sample along axis 0 (module
    docstring); anything else is a :class:`CalibrationError` saying what fits."""
    want = spec.shape

    def fits(dims: tuple[int, ...]) -> bool:
        return len(dims) == len(want) and all(w is None or w == g for w, g in zip(want, dims))

    if fits(shape):
        if not want or want[0] != 1 or shape[0] == 1:
            return "one"
    if len(shape) == len(want) + 1 and fits(shape[1:]):
        return "rows"
    if want and want[0] == 1 and len(shape) == len(want) and fits((1,) + tuple(shape[1:])):
        return "rows"
    own = fmt_shape(["?" if d is None else d for d in want])
    kind = "a scalar (rank 0)" if not want else f"shaped {own} with no sample axis"
    per = "(N,)" if not want else fmt_shape(["N"] + ["?" if d is None else d for d in want])
    alt = f" or {fmt_shape(['N'] + ['?' if d is None else d for d in want[1:]])}" if want and want[0] == 1 else ""
    raise CalibrationError(f"calibration input {spec.name!r}: model input {kind}: give one value of shape {own} "
                           f"for every sample, or one per sample, shape {per}{alt}; got shape {fmt_shape(shape)}"
                           f"{where}")


def check_layout(spec: InputSpec, shape: tuple[int, ...], where: str) -> None:
    """Rank and fixed non-batch dims of ``shape`` against ``spec``."""
    if len(shape) != len(spec.shape):
        raise CalibrationError(
            f"calibration input {spec.name!r}: expected rank {len(spec.shape)} with shape {fmt_expected(spec)}, "
            f"got rank {len(shape)} with shape {fmt_shape(shape)}{where}"
        )
    for want, got in zip(spec.shape[1:], shape[1:]):
        if want is not None and want != got:
            raise CalibrationError(
                f"calibration input {spec.name!r}: expected shape {fmt_expected(spec)}, "
                f"got {fmt_shape(shape)}{where}"
            )


def target_dtype(spec: InputSpec, dtype: np.dtype, where: str) -> np.dtype:
    """The dtype the data is cast to, or an error if it cannot stand for ``spec.dtype``."""
    want = spec.dtype
    if want.kind == "f":
        if dtype.kind == "f":
            return want
        raise CalibrationError(
            f"calibration input {spec.name!r}: expected dtype {want} (or another float width), got {dtype}{where}"
        )
    if dtype.kind == want.kind and dtype.itemsize == want.itemsize and want.kind in "biu":
        return want  # same type, maybe other byte order
    if dtype == want:
        return want
    raise CalibrationError(f"calibration input {spec.name!r}: expected dtype {want}, got {dtype}{where}")


def fresh_copy(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A fresh, C-contiguous, writable copy of ``arr`` in ``dtype`` (never a memmap view)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(arr, dtype=dtype, order="C", copy=True, subok=False)


def check_finite(name: str, arr: np.ndarray, offset: int, where: str, raw: np.ndarray | None = None) -> None:
    """Raise on the first sample of ``arr`` (global index ``offset + i``) holding NaN or Inf, or
    a value beyond :data:`MAX_ABS`."""
    if arr.dtype.kind != "f" or arr.size == 0:
        return
    if np.isfinite(arr).all():
        big = float(np.abs(arr).max())
        if big > MAX_ABS:
            i = int(np.argmax((np.abs(arr.reshape(len(arr), -1)) > MAX_ABS).any(axis=1)))
            raise CalibrationError(f"calibration input {name!r}: sample {offset + i} holds values up to {big:.3g}, "
                                   f"above {MAX_ABS:.3g} where the float32 products of the statistics overflow; "
                                   f"rescale the data{where}")
        return
    bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)
    i = int(np.argmax(bad))
    what = "NaN" if np.isnan(arr[i]).any() else "Inf"
    extra = ""
    if raw is not None and raw.dtype != arr.dtype and np.isfinite(raw[i]).all():
        extra = f" after conversion from {raw.dtype} to {arr.dtype} (values out of range)"
    raise CalibrationError(f"calibration input {name!r}: sample {offset + i} contains {what}{extra}{where}")
