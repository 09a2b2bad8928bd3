"""Sources of samples: the :class:`Source` protocol every kind implements (batches of fresh
per-sample arrays) and :class:`ArraySource`, random-access arrays — in memory, memory-mapped or
a reader's cached feeds — validated in one chunked pass before anything is gathered.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from ..errors import CalibrationError
from ..formatting import fmt_shape
from ..memory import require
from .arrays import CompressedMember
from .specs import (InputSpec, batch_inputs, check_finite, check_layout, fmt_expected, fresh_copy, key_problems,
                    quoted_names, target_dtype, unbatched_form)

CHUNK_BYTES = 32 << 20  # validation pass over memory-mapped files reads this much at a time


class Source:
    """Internal: yields dicts of fresh arrays, ``batch_size`` rows (last may be fewer)."""

    description: str
    num_samples: int
    sample_shapes: dict[str, tuple[int, ...]]  # per-sample shape of each input's rows
    unbatched: frozenset[str] = frozenset()  # inputs without a sample axis (one value per batch)
    value_shapes: dict[str, tuple[int, ...]] = {}  # their value's shape (what the model is fed)
    varying: frozenset[str] = frozenset()  # those whose value differs between samples
    available: int | bool | None = None  # samples in the source beyond the cap: a count, True (more), None
    notes: tuple[str, ...] = ()  # what the user should know about how the data was read (CalibrationData.notes)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:  # pragma: no cover
        raise NotImplementedError


class ArraySource(Source):
    """Random-access arrays (memory-mapped or in memory), cast per batch."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.dtype]], n: int, description: str,
                 specs: Sequence[InputSpec] = ()):
        self._arrays = arrays
        self.num_samples = n
        self.sample_shapes = {k: tuple(int(d) for d in a.shape[1:]) for k, (a, _) in arrays.items()}
        self.description = description
        mark_unbatched(self, specs, {k: a for k, (a, _) in arrays.items()})

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, self.num_samples, batch_size):
            e = min(s + batch_size, self.num_samples)
            yield {k: fresh_copy(a[s:e], dt) for k, (a, dt) in self._arrays.items()}


def checked_arrays(values: Any, specs: Sequence[InputSpec], where: str
                    ) -> tuple[dict[str, tuple[Any, np.dtype]], int]:
    """Arrays per input with their target dtype, layout-checked, and their common sample count.

    An input without a sample axis (:func:`batch_inputs`) given one value gets it repeated for
    every sample (a broadcast view); its other forms are kept as given (package docstring,
    onnx_dwdecomp.data).
    """
    unbatched = {s.name for s in specs} - batch_inputs(specs)
    arrays: dict[str, tuple[Any, np.dtype]] = {}
    counts: dict[str, int] = {}
    single: list[str] = []
    for spec in specs:
        value = values[spec.name]
        try:
            a = value if isinstance(value, (np.ndarray, CompressedMember)) else np.asarray(value)
        except Exception as e:
            raise CalibrationError(
                f"calibration input {spec.name!r}: cannot convert {type(value).__name__} to an array{where}"
            ) from e
        if spec.name in unbatched:
            form = unbatched_form(spec, a.shape, where)
            if form == "one":
                single.append(spec.name)
            else:
                counts[spec.name] = int(a.shape[0])
        else:
            if a.ndim == 0:
                raise CalibrationError(
                    f"calibration input {spec.name!r}: expected rank {len(spec.shape)} with shape "
                    f"{fmt_expected(spec)}, got a scalar{where}"
                )
            check_layout(spec, a.shape, where)
            counts[spec.name] = int(a.shape[0])
        arrays[spec.name] = (a, target_dtype(spec, a.dtype, where))
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k!r} has {c}" for k, c in counts.items())
        hint = (f" (inputs without a sample axis, {quoted_names(sorted(unbatched))}, take one value of their own shape "
                f"for every sample, or one per sample)" if unbatched else "")
        raise CalibrationError(f"calibration inputs have different numbers of samples: {listing}{hint}{where}")
    n = next(iter(counts.values())) if counts else 1
    for name in single:  # one value for every sample: read now (its size is the model input's)
        a, dt = arrays[name]
        if isinstance(a, CompressedMember):
            a = a.read(a.shape[0] if a.shape else 0)
        arrays[name] = (np.broadcast_to(np.asarray(a)[None], (n,) + tuple(a.shape)), dt)
    return arrays, n


def validated_array_source(
    named: dict[str, Any], specs: list[InputSpec], calib_size: int | None, where: str, description: str
) -> ArraySource:
    """Check ``named`` (input name -> array-like) against ``specs`` and wrap it."""
    arrays, total = checked_arrays(named, specs, where)
    n = total if calib_size is None else min(total, calib_size)
    if n == 0:
        raise CalibrationError(f"calibration data has no samples (expected at least 1){where}")
    lazy = {k: a for k, (a, _) in arrays.items() if isinstance(a, CompressedMember)}
    if lazy:
        need = sum(a.bytes_for(n) for a in lazy.values())
        require(need, f"decompressing {n} sample(s) of " + ", ".join(
            f"{k!r} {fmt_shape(a.shape)} {a.dtype}" for k, a in lazy.items()) + where,
            "--calib-size N reads fewer samples (or store the .npz uncompressed, np.savez, to memory-map it)")
        arrays = {k: ((a.read(n), dt) if k in lazy else (a, dt)) for k, (a, dt) in arrays.items()}
    for name, (a, dt) in arrays.items():
        if dt.kind != "f":
            continue
        row_bytes = max(1, math.prod(a.shape[1:]) * max(a.dtype.itemsize, dt.itemsize))
        step = max(1, CHUNK_BYTES // row_bytes)
        for s in range(0, n, step):
            raw = a[s : min(s + step, n)]
            with np.errstate(over="ignore", invalid="ignore"):
                cast = np.asarray(raw, dtype=dt)
            check_finite(name, cast, s, where, raw=raw)
    src = ArraySource(arrays, n, description, specs)
    src.available = total
    return src


def mark_unbatched(src: Source, specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray]) -> None:
    """Set ``src.unbatched``, ``value_shapes`` and ``varying`` from the per-sample ``arrays``
    (``src.num_samples`` rows used) of the inputs without a sample axis."""
    unbatched = {s.name for s in specs} - batch_inputs(specs)
    shapes, varying = {}, set()
    for spec in specs:
        if spec.name not in unbatched:
            continue
        a = arrays[spec.name]
        row = tuple(int(d) for d in a.shape[1:])
        shapes[spec.name] = row if len(row) == len(spec.shape) else (1,) + row
        if a.strides[:1] != (0,):  # not one value broadcast: compare the samples with the first
            first = np.asarray(a[0])
            step = max(1, CHUNK_BYTES // max(1, first.nbytes))
            if any(not np.array_equal(np.asarray(a[s:s + step]),
                                      np.broadcast_to(first, (min(step, src.num_samples - s),) + first.shape))
                   for s in range(0, src.num_samples, step)):
                varying.add(spec.name)
    src.unbatched, src.value_shapes, src.varying = frozenset(unbatched), shapes, frozenset(varying)


def single_array_source(arr: Any, specs: list[InputSpec], calib_size: int | None, where_name: str) -> ArraySource:
    where = f" in {where_name}"
    if len(specs) != 1:
        raise CalibrationError(
            f"calibration data{where} holds a single array, but the model has {len(specs)} inputs "
            f"({quoted_names([s.name for s in specs])}); use an .npz (or dict) with one array per input name"
        )
    return validated_array_source({specs[0].name: arr}, specs, calib_size, where, where_name)


def named_arrays_source(
    named: dict[str, Any], specs: list[InputSpec], calib_size: int | None, where_name: str
) -> ArraySource:
    """Arrays by name (an ``.npz``, a dict) for the model's inputs ``specs``.

    The keys must be exactly the model's input names: a key that names no input, or an input
    without an array, is a :class:`CalibrationError` naming the model's inputs and the keys
    that do not match. One rule on top: a **single array** feeds a **single-input model**
    whatever its key (like a ``.npy``); when its key is not the input's name a note says
    which array fed which input (``src.notes``, shown in the report).
    """
    where = f" in {where_name}"
    wanted = [s.name for s in specs]
    inputs = (f"the model's input is {quoted_names(wanted)} (expected that key, or one array under any key)"
              if len(wanted) == 1 else
              f"the model's inputs are {quoted_names(wanted)} (expected exactly those keys, one array each)")
    if not named:
        raise CalibrationError(f"calibration data{where} holds no arrays; {inputs}")
    keys = list(named)
    if len(specs) == 1 and len(keys) == 1:
        src = validated_array_source({wanted[0]: named[keys[0]]}, specs, calib_size, where, where_name)
        if str(keys[0]) != wanted[0]:
            src.notes = (f"calibration data{where}: its only array, {keys[0]!r}, feeds the model's only input "
                         f"{wanted[0]!r} (a single array feeds a single-input model whatever its key)",)
        return src
    problems = key_problems(wanted, keys, "missing arrays for inputs")
    if problems:
        raise CalibrationError(f"calibration data{where}: {problems}; {inputs}")
    return validated_array_source(named, specs, calib_size, where, where_name)
