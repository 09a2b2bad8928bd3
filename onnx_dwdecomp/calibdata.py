"""Calibration data sources: arrays files, image folders and onnxruntime-style readers.

Every source is turned into one :class:`CalibrationData` that hands out fixed-size batches
of model feeds, always in the same order, as many passes as the caller wants:

========================  ==============================================================
source                    how it is read
========================  ==============================================================
``data.npy``              one array, single-input models only; memory-mapped
``data.npz``              one array per graph input name (stored members memory-mapped)
``folder/``               ``*.jpg|*.jpeg|*.png`` sorted by name, decoded per batch with
                          Pillow, resize (shorter side) + center crop, ``/255``,
                          ``(x - mean) / std``, NCHW
reader object             ``get_next() -> {name: array} | None``; ``rewind()`` before each
                          pass when it exists, otherwise cached on the first pass
``ndarray`` / ``dict``    in-memory arrays, same rules as ``.npy`` / ``.npz``
========================  ==============================================================

At most :data:`DEFAULT_CALIB_SIZE` samples are read unless ``calib_size`` says otherwise
(accuracy saturates at 256–512 images, docs/ACCURACY.md): only those rows are read, and
:attr:`CalibrationData.notes` says when the source held more.

**Inputs without a sample axis.** Axis 0 of an input is its sample (batch) axis when it is
dynamic in the model; when no input has a dynamic axis 0 (a fixed-batch model), the inputs
whose axis 0 equals the first input's carry the samples. Every other input — a rank-0 scalar,
a ``[1]``-shaped scale, a conv weight fed as a graph input — has no sample axis
(:func:`batch_inputs`). Its data is either one value of exactly the input's shape, fed with
every batch, or one value per sample: an array ``(N, *shape)``, or ``(N, *shape[1:])`` when
the input's axis 0 is 1. Values that differ between samples cannot share a run: calibration
then runs one sample at a time (:attr:`CalibrationData.max_batch` is 1; a model with a fixed
batch above 1 is an error). A reader gives each such input one value per ``get_next()`` feed.

All the checks run up front in :func:`load_calibration` (one validation pass, chunked for
memory-mapped files), so a problem in the data is reported before any statistics are
gathered. Values must be finite and at most :data:`MAX_ABS` in magnitude (the statistics are
float32 products of values). Memory: ``.npy`` files and stored ``.npz`` members are
memory-mapped; a compressed ``.npz`` member is decompressed — only its first ``calib_size``
rows — after its header's declared shape and dtype were checked against the model and the
bytes against the available memory (:mod:`onnx_dwdecomp.resources`); a reader without
``rewind()`` is cached under the same check. Problems raise
:class:`~onnx_dwdecomp.errors.CalibrationError` (the data),
:class:`~onnx_dwdecomp.errors.OptionError` (an argument) or
:class:`~onnx_dwdecomp.errors.ResourceError` (not enough memory), with a one-line message
saying what is wrong, where, and what was expected.

This module is numeric only: numpy, plus Pillow imported lazily for image folders.
"""

from __future__ import annotations

import collections
import importlib
import importlib.util
import math
import numbers
import os
import struct
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping, Sequence

import numpy as np

from .formatting import fmt_shape
from .memory import require
from .errors import CalibrationError, OptionError, ResourceError

__all__ = [
    "Batch",
    "CalibrationData",
    "InputSpec",
    "load_calibration",
    "load_reader",
]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
#: Calibration samples read when ``calib_size`` is not given: accuracy saturates at 256–512
#: images (docs/ACCURACY.md §2), and the statistics' cost grows with every sample.
DEFAULT_CALIB_SIZE = 512
"""File name endings (compared case-insensitively) picked up from an image folder."""

_CHUNK_BYTES = 32 << 20  # validation pass over memory-mapped files reads this much at a time
#: Largest magnitude accepted in calibration data: √(float32 max), above which the float32
#: products of the statistics (x·xᵀ) overflow.
MAX_ABS = float(np.sqrt(np.finfo(np.float32).max))
_NPY_MAGIC = b"\x93NUMPY"
_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_PILLOW_MISSING = "reading an image folder needs Pillow: pip install 'onnx-dwdecomp[images]'"


# --------------------------------------------------------------------------- public types


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


@dataclass(frozen=True)
class Batch:
    """One batch of model feeds.

    Attributes
    ----------
    feeds : dict of str to numpy.ndarray
        One C-contiguous, writable array per model input, in the model's dtype; axis 0 is
        the batch axis, of length ``count`` or ``pad_to``.
    start : int
        Index of the first sample of this batch in the whole set.
    count : int
        Number of real samples; rows after ``count`` are padding (copies of the last real
        sample) and must be ignored by the consumer.
    """

    feeds: dict[str, np.ndarray]
    start: int
    count: int


class CalibrationData:
    """Validated calibration samples, served in fixed-size batches.

    Build it with :func:`load_calibration`; the constructor is internal.

    Attributes
    ----------
    input_names : tuple of str
        Model input names, in the order of the ``inputs`` given to :func:`load_calibration`.
    inputs : tuple of InputSpec
        The specs the data was validated against.
    num_samples : int
        Number of samples one pass yields (after the ``calib_size`` cap).
    sample_shapes : dict of str to tuple of int
        Per-sample shape of each input (without the batch axis), taken from the data; for an
        input without a sample axis, its value's shape without axis 0 (``()`` for a scalar).
    unbatched : frozenset of str
        The inputs without a sample axis (module docstring): each batch feeds them one value.
    max_batch : int or None
        1 when an input without a sample axis has values that differ between samples (each run
        takes one sample), else None (any batch size).
    description : str
        Where the data comes from, for reports (e.g. ``"image folder imgs (256 images)"``).
    notes : tuple of str
        What the user should know about how the data was read (e.g. the default cap).
    """

    def __init__(self, source: _Source, inputs: Sequence[InputSpec], notes: Sequence[str] = ()):
        self._source = source
        self.inputs: tuple[InputSpec, ...] = tuple(inputs)
        self.input_names: tuple[str, ...] = tuple(s.name for s in self.inputs)
        self.num_samples: int = source.num_samples
        self.unbatched: frozenset[str] = source.unbatched
        self.max_batch: int | None = 1 if source.varying else None
        self._value_shapes = dict(source.value_shapes)
        self.sample_shapes: dict[str, tuple[int, ...]] = {
            k: (self._value_shapes[k][1:] if k in self.unbatched else v) for k, v in source.sample_shapes.items()}
        self.description: str = source.description
        self.notes: tuple[str, ...] = tuple(notes)
        # batched inputs first: consumers take a batch's row count from its first feed
        self._order = sorted(self.input_names, key=lambda n: n in self.unbatched)

    def __repr__(self) -> str:
        return (
            f"CalibrationData({self.description}, num_samples={self.num_samples}, "
            f"sample_shapes={self.sample_shapes})"
        )

    def iter_batches(self, batch_size: int, *, pad_to: int | None = None) -> Iterator[Batch]:
        """Yield the samples in batches, from sample 0, in the same order on every call.

        Parameters
        ----------
        batch_size : int
            Samples per batch (>= 1, at most :attr:`max_batch`); the last batch may hold fewer.
        pad_to : int, optional
            For a model with a fixed batch dimension: every batch then has exactly ``pad_to``
            rows (``pad_to >= batch_size``); short batches are padded by repeating their last
            sample and :attr:`Batch.count` says how many rows are real.

        Yields
        ------
        Batch
            ``feeds[name]`` has shape ``(rows, *sample_shapes[name])``; an input without a
            sample axis gets its value (the model input's shape). Inputs with a sample axis
            come first in ``feeds``.

        Raises
        ------
        OptionError
            ``batch_size`` or ``pad_to`` is invalid (raised at the call, not on iteration).
        CalibrationError
            A reader source failed or changed between passes, or ``batch_size`` exceeds
            :attr:`max_batch`.

        Notes
        -----
        For a reader with ``rewind()``, each pass re-reads the reader: do not interleave two
        passes over the same object.
        """
        batch_size = self._check_batch(batch_size, pad_to)
        return self._iter(batch_size, pad_to)

    def _check_batch(self, batch_size: int, pad_to: int | None) -> int:
        batch_size = _positive_int(batch_size, "batch_size")
        if pad_to is not None:
            pad_to = _positive_int(pad_to, "pad_to")
            if pad_to < batch_size:
                raise OptionError(f"pad_to ({pad_to}) must be >= batch_size ({batch_size})")
        if self.max_batch is not None and max(batch_size, pad_to or 0) > self.max_batch:
            varying = _names(sorted(self._source.varying))
            raise CalibrationError(f"calibration input(s) {varying} have no sample axis and a value that differs "
                                   f"between samples, so each run takes one sample: use batch size 1 (a model "
                                   f"whose batch is fixed above 1 needs one value for all samples)")
        return batch_size

    def _feeds(self, per_sample: dict[str, np.ndarray], pad_to: int | None) -> dict[str, np.ndarray]:
        """Per-sample arrays → model feeds: one value for unbatched inputs, padding for the rest."""
        feeds = {k: (np.ascontiguousarray(per_sample[k][0]).reshape(self._value_shapes[k]) if k in self.unbatched
                     else per_sample[k]) for k in self._order}
        return pad_feeds(feeds, pad_to, self.unbatched) if pad_to is not None else feeds

    def _iter(self, batch_size: int, pad_to: int | None) -> Iterator[Batch]:
        start = 0
        for per_sample in self._source.batches(batch_size):
            count = len(per_sample[self._order[0]])
            yield Batch(feeds=self._feeds(per_sample, pad_to), start=start, count=count)
            start += count

    def subset_batches(self, mask: np.ndarray, batch_size: int, *, pad_to: int | None = None) -> list[Batch]:
        """The samples where ``mask`` (bool, one per sample) is set, in order, as batches of
        ``batch_size`` (padded to ``pad_to`` like :meth:`iter_batches`); ``start`` counts
        within the subset. One pass over the source."""
        batch_size = self._check_batch(batch_size, pad_to)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (self.num_samples,):
            raise OptionError(f"mask must have one entry per sample ({self.num_samples}), got shape {mask.shape}")
        parts: dict[str, list[np.ndarray]] = {k: [] for k in self._order}
        start = 0
        for per_sample in self._source.batches(batch_size):
            count = len(per_sample[self._order[0]])
            keep = mask[start:start + count]
            for k in self._order:
                parts[k].append(per_sample[k][keep])
            start += count
        chosen = {k: np.concatenate(v) for k, v in parts.items()}
        total = int(mask.sum())
        return [Batch(feeds=self._feeds({k: v[s:s + batch_size] for k, v in chosen.items()}, pad_to),
                      start=s, count=min(batch_size, total - s))
                for s in range(0, total, batch_size)]


def batch_inputs(specs: Sequence[InputSpec]) -> set[str]:
    """The inputs whose axis 0 is the sample (batch) axis (module docstring): those with a
    dynamic axis 0; in a fixed-batch model (none dynamic), those whose axis 0 equals the first
    input's. Rank-0 inputs never have one."""
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


# --------------------------------------------------------------------------- entry points


def pad_feeds(feeds: dict[str, np.ndarray], rows: int, unbatched: Collection[str] = ()) -> dict[str, np.ndarray]:
    """Pad every array but the ``unbatched`` ones to ``rows`` along axis 0 by repeating its last
    row (fixed-batch models)."""
    return {k: v if k in unbatched or len(v) >= rows
            else np.concatenate([v, np.repeat(v[-1:], rows - len(v), axis=0)])
            for k, v in feeds.items()}


def load_calibration(
    source: Any,
    inputs: Sequence[InputSpec],
    *,
    calib_size: int | None = None,
    mean: Sequence[float] = (0.485, 0.456, 0.406),
    std: Sequence[float] = (0.229, 0.224, 0.225),
) -> CalibrationData:
    """Open and validate calibration data for a model.

    Parameters
    ----------
    source : str, os.PathLike, CalibrationDataReader, numpy.ndarray or mapping
        A ``.npy`` file (single-input models), a ``.npz`` file keyed by input name, a folder
        of ``.jpg/.jpeg/.png`` images (single NCHW float input), an object with
        ``get_next()`` (onnxruntime ``CalibrationDataReader`` protocol), or in-memory data:
        one array (like ``.npy``) or a mapping ``{input_name: array}`` (like ``.npz``).
        Files are recognised by content (magic bytes), not by extension.
    inputs : sequence of InputSpec
        The model's graph inputs (non-initializer), in order.
    calib_size : int, optional
        Use only the first ``calib_size`` samples (>= 1); only those are read. Default:
        :data:`DEFAULT_CALIB_SIZE` (a note says when the source held more).
    mean, std : sequence of float
        Per-channel normalisation for image folders, applied after scaling to [0, 1]; length
        must equal the model's channel count. Ignored for other sources.

    Returns
    -------
    CalibrationData

    Raises
    ------
    CalibrationError
        The data is missing, unreadable, or does not fit the model: missing/extra inputs,
        wrong rank, wrong fixed dim, wrong dtype, NaN/Inf, zero samples, inputs with
        different sample counts, a reader that raises or returns a non-dict.
    OptionError
        An argument is invalid (``calib_size < 1``, bad ``mean``/``std``, no inputs,
        duplicate input names, an unsupported ``source`` type).

    Notes
    -----
    Float data of another width is cast to the model's float dtype; any other dtype
    mismatch is an error. NaN/Inf are checked after the cast (so float64 values that
    overflow float16 are caught). For a reader, the validation pass is the first pass: it
    counts the samples and, without ``rewind()``, caches them in memory.
    """
    specs = _check_specs(inputs)
    default_cap = calib_size is None
    calib_size = DEFAULT_CALIB_SIZE if default_cap else _positive_int(calib_size, "calib_size")
    if hasattr(source, "get_next") and callable(getattr(source, "get_next")):
        src: _Source = _reader_source(source, specs, calib_size, probe_more=default_cap)
    elif isinstance(source, (str, os.PathLike)):
        src = _path_source(Path(source), specs, calib_size, mean, std)
    elif isinstance(source, np.ndarray):
        src = _single_array_source(source, specs, calib_size, "in-memory array")
    elif isinstance(source, Mapping):
        src = _named_arrays_source(dict(source), specs, calib_size, "in-memory arrays")
    else:
        raise OptionError(
            f"calibration source must be a path, a CalibrationDataReader (with get_next()), an array "
            f"or a dict of arrays; got {type(source).__name__}"
        )
    notes = []
    available = getattr(src, "available", None)
    if default_cap and (available is True or (available or 0) > src.num_samples):
        of = "" if available is True else f" of {available}"
        notes.append(f"calibration: read the first {src.num_samples}{of} samples of {src.description} (default "
                     f"--calib-size {DEFAULT_CALIB_SIZE}: accuracy saturates at 256–512 images; --calib-size N "
                     f"reads more)")
    data = CalibrationData(src, specs, notes)
    return data


def load_reader(spec: str) -> Any:
    """Import and build a calibration reader from ``"module:callable"`` or ``"file.py:callable"``.

    Parameters
    ----------
    spec : str
        ``"package.module:factory"`` (importable module) or ``"path/to/file.py:factory"``;
        ``factory`` may be dotted (``"mod:Class.create"``). It is called with no arguments.

    Returns
    -------
    object
        What the callable returned; it has a callable ``get_next``.

    Raises
    ------
    OptionError
        Malformed ``spec``, module or file not found, attribute missing or not callable.
    CalibrationError
        Importing the module or calling the factory raised, or the result has no
        ``get_next()``.
    """
    if not isinstance(spec, str):
        raise OptionError(f"calibration reader must be 'module:callable' or 'file.py:callable', got {spec!r}")
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise OptionError(f"calibration reader {spec!r}: expected 'module:callable' or 'path/to/file.py:callable'")
    if target.endswith(".py") or "/" in target or os.sep in target:
        path = Path(target)
        if not path.is_file():
            raise OptionError(f"calibration reader {spec!r}: file not found: {target}")
        modname = f"_onnx_dwdecomp_reader_{abs(hash(str(path.resolve())))}"
        mspec = importlib.util.spec_from_file_location(modname, path)
        if mspec is None or mspec.loader is None:
            raise OptionError(f"calibration reader {spec!r}: cannot import {target} as a Python file")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[modname] = module
        try:
            mspec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(modname, None)
            raise CalibrationError(f"importing calibration reader file {target} raised {_exc_text(e)}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as e:
            if e.name and (target == e.name or target.startswith(e.name + ".")):
                raise OptionError(
                    f"calibration reader {spec!r}: module {target!r} not found "
                    "(expected 'module:callable' or 'path/to/file.py:callable')"
                ) from e
            raise CalibrationError(f"importing calibration reader module {target!r} raised {_exc_text(e)}") from e
        except Exception as e:
            raise CalibrationError(f"importing calibration reader module {target!r} raised {_exc_text(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise OptionError(f"calibration reader {spec!r}: {target} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise OptionError(f"calibration reader {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    try:
        reader = obj()
    except Exception as e:
        raise CalibrationError(f"calibration reader raised {_exc_text(e)} (calling {spec!r})") from e
    if not callable(getattr(reader, "get_next", None)):
        raise CalibrationError(
            f"calibration reader {spec!r} returned a {type(reader).__name__}, which has no get_next() method "
            "(expected an onnxruntime CalibrationDataReader)"
        )
    return reader


# --------------------------------------------------------------------------- small helpers


def _exc_text(e: BaseException, limit: int = 300) -> str:
    """``"Type: message"`` on one line, shortened."""
    msg = " ".join(str(e).split())
    if len(msg) > limit:
        msg = msg[: limit - 3] + "..."
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < 1:
        raise OptionError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def _fmt_shape(shape: Sequence[Any]) -> str:
    parts = [str(d) for d in shape]
    return "(" + ", ".join(parts) + ("," if len(parts) == 1 else "") + ")"


def _fmt_expected(spec: InputSpec) -> str:
    return _fmt_shape(["N"] + ["?" if d is None else d for d in spec.shape[1:]])


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _check_specs(inputs: Sequence[InputSpec]) -> list[InputSpec]:
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
        raise OptionError(f"duplicate input names in inputs: {_names(dups)}")
    return specs


def _key_problems(wanted: Sequence[str], keys: Sequence[Any], missing_what: str) -> str:
    """``"<missing_what> 'a'; unexpected keys 'b'"`` for a key set that differs from ``wanted``, else ``""``."""
    missing = [n for n in wanted if n not in keys]
    extra = [str(k) for k in keys if k not in wanted]
    parts = [f"{missing_what} {_names(missing)}"] if missing else []
    if extra:
        parts.append(f"unexpected keys {_names(extra)}")
    return "; ".join(parts)


def _checked_arrays(values: Any, specs: Sequence[InputSpec], where: str
                    ) -> tuple[dict[str, tuple[Any, np.dtype]], int]:
    """Arrays per input with their target dtype, layout-checked, and their common sample count.

    An input without a sample axis (:func:`batch_inputs`) given one value gets it repeated for
    every sample (a broadcast view); its other forms are kept as given (module docstring).
    """
    unbatched = {s.name for s in specs} - batch_inputs(specs)
    arrays: dict[str, tuple[Any, np.dtype]] = {}
    counts: dict[str, int] = {}
    single: list[str] = []
    for spec in specs:
        value = values[spec.name]
        try:
            a = value if isinstance(value, (np.ndarray, _CompressedMember)) else np.asarray(value)
        except Exception as e:
            raise CalibrationError(
                f"calibration input {spec.name!r}: cannot convert {type(value).__name__} to an array{where}"
            ) from e
        if spec.name in unbatched:
            form = _unbatched_form(spec, a.shape, where)
            if form == "one":
                single.append(spec.name)
            else:
                counts[spec.name] = int(a.shape[0])
        else:
            if a.ndim == 0:
                raise CalibrationError(
                    f"calibration input {spec.name!r}: expected rank {len(spec.shape)} with shape "
                    f"{_fmt_expected(spec)}, got a scalar{where}"
                )
            _check_layout(spec, a.shape, where)
            counts[spec.name] = int(a.shape[0])
        arrays[spec.name] = (a, _target_dtype(spec, a.dtype, where))
    if len(set(counts.values())) > 1:
        listing = ", ".join(f"{k!r} has {c}" for k, c in counts.items())
        hint = (f" (inputs without a sample axis, {_names(sorted(unbatched))}, take one value of their own shape "
                f"for every sample, or one per sample)" if unbatched else "")
        raise CalibrationError(f"calibration inputs have different numbers of samples: {listing}{hint}{where}")
    n = next(iter(counts.values())) if counts else 1
    for name in single:  # one value for every sample: read now (its size is the model input's)
        a, dt = arrays[name]
        if isinstance(a, _CompressedMember):
            a = a.read(a.shape[0] if a.shape else 0)
        arrays[name] = (np.broadcast_to(np.asarray(a)[None], (n,) + tuple(a.shape)), dt)
    return arrays, n


def _unbatched_form(spec: InputSpec, shape: tuple[int, ...], where: str) -> str:
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
    own = _fmt_shape(["?" if d is None else d for d in want])
    kind = "a scalar (rank 0)" if not want else f"shaped {own} with no sample axis"
    per = "(N,)" if not want else _fmt_shape(["N"] + ["?" if d is None else d for d in want])
    alt = f" or {_fmt_shape(['N'] + ['?' if d is None else d for d in want[1:]])}" if want and want[0] == 1 else ""
    raise CalibrationError(f"calibration input {spec.name!r}: model input {kind}: give one value of shape {own} "
                           f"for every sample, or one per sample, shape {per}{alt}; got shape {_fmt_shape(shape)}"
                           f"{where}")


def _check_layout(spec: InputSpec, shape: tuple[int, ...], where: str) -> None:
    """Rank and fixed non-batch dims of ``shape`` against ``spec``."""
    if len(shape) != len(spec.shape):
        raise CalibrationError(
            f"calibration input {spec.name!r}: expected rank {len(spec.shape)} with shape {_fmt_expected(spec)}, "
            f"got rank {len(shape)} with shape {_fmt_shape(shape)}{where}"
        )
    for want, got in zip(spec.shape[1:], shape[1:]):
        if want is not None and want != got:
            raise CalibrationError(
                f"calibration input {spec.name!r}: expected shape {_fmt_expected(spec)}, "
                f"got {_fmt_shape(shape)}{where}"
            )


def _target_dtype(spec: InputSpec, dtype: np.dtype, where: str) -> np.dtype:
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


def _cast(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """A fresh, C-contiguous, writable copy of ``arr`` in ``dtype`` (never a memmap view)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.array(arr, dtype=dtype, order="C", copy=True, subok=False)


def _check_finite(name: str, arr: np.ndarray, offset: int, where: str, raw: np.ndarray | None = None) -> None:
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


# --------------------------------------------------------------------------- sources


class _Source:
    """Internal: yields dicts of fresh arrays, ``batch_size`` rows (last may be fewer)."""

    description: str
    num_samples: int
    sample_shapes: dict[str, tuple[int, ...]]  # per-sample shape of each input's rows
    unbatched: frozenset[str] = frozenset()  # inputs without a sample axis (one value per batch)
    value_shapes: dict[str, tuple[int, ...]] = {}  # their value's shape (what the model is fed)
    varying: frozenset[str] = frozenset()  # those whose value differs between samples
    available: int | bool | None = None  # samples in the source beyond the cap: a count, True (more), None

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:  # pragma: no cover
        raise NotImplementedError


class _ArraySource(_Source):
    """Random-access arrays (memory-mapped or in memory), cast per batch."""

    def __init__(self, arrays: dict[str, tuple[np.ndarray, np.dtype]], n: int, description: str,
                 specs: Sequence[InputSpec] = ()):
        self._arrays = arrays
        self.num_samples = n
        self.sample_shapes = {k: tuple(int(d) for d in a.shape[1:]) for k, (a, _) in arrays.items()}
        self.description = description
        _mark_unbatched(self, specs, {k: a for k, (a, _) in arrays.items()})

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, self.num_samples, batch_size):
            e = min(s + batch_size, self.num_samples)
            yield {k: _cast(a[s:e], dt) for k, (a, dt) in self._arrays.items()}


def _validated_array_source(
    named: dict[str, Any], specs: list[InputSpec], calib_size: int | None, where: str, description: str
) -> _ArraySource:
    """Check ``named`` (input name -> array-like) against ``specs`` and wrap it."""
    arrays, total = _checked_arrays(named, specs, where)
    n = total if calib_size is None else min(total, calib_size)
    if n == 0:
        raise CalibrationError(f"calibration data has no samples (expected at least 1){where}")
    lazy = {k: a for k, (a, _) in arrays.items() if isinstance(a, _CompressedMember)}
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
        step = max(1, _CHUNK_BYTES // row_bytes)
        for s in range(0, n, step):
            raw = a[s : min(s + step, n)]
            with np.errstate(over="ignore", invalid="ignore"):
                cast = np.asarray(raw, dtype=dt)
            _check_finite(name, cast, s, where, raw=raw)
    src = _ArraySource(arrays, n, description, specs)
    src.available = total
    return src


def _mark_unbatched(src: _Source, specs: Sequence[InputSpec], arrays: Mapping[str, np.ndarray]) -> None:
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
            step = max(1, _CHUNK_BYTES // max(1, first.nbytes))
            if any(not np.array_equal(np.asarray(a[s:s + step]), np.broadcast_to(first, (min(step, src.num_samples - s),)
                                                                                    + first.shape))
                   for s in range(0, src.num_samples, step)):
                varying.add(spec.name)
    src.unbatched, src.value_shapes, src.varying = frozenset(unbatched), shapes, frozenset(varying)


def _single_array_source(arr: Any, specs: list[InputSpec], calib_size: int | None, where_name: str) -> _ArraySource:
    where = f" in {where_name}"
    if len(specs) != 1:
        raise CalibrationError(
            f"calibration data{where} holds a single array, but the model has {len(specs)} inputs "
            f"({_names([s.name for s in specs])}); use an .npz (or dict) with one array per input name"
        )
    return _validated_array_source({specs[0].name: arr}, specs, calib_size, where, where_name)


def _named_arrays_source(
    named: dict[str, Any], specs: list[InputSpec], calib_size: int | None, where_name: str
) -> _ArraySource:
    where = f" in {where_name}"
    if not named:
        raise CalibrationError(f"calibration data{where} holds no arrays (expected {_names([s.name for s in specs])})")
    wanted = [s.name for s in specs]
    keys = list(named)
    if len(specs) == 1 and len(keys) == 1:
        return _validated_array_source({wanted[0]: named[keys[0]]}, specs, calib_size, where, where_name)
    problems = _key_problems(wanted, keys, "missing arrays for inputs")
    if problems:
        raise CalibrationError(
            f"calibration data{where}: {problems} (expected exactly the keys {_names(wanted)})"
        )
    return _validated_array_source(named, specs, calib_size, where, where_name)


# ---- files


def _path_source(
    path: Path, specs: list[InputSpec], calib_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> _Source:
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.is_dir():
        return _image_source(path, specs, calib_size, mean, std)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} is not a regular file or a folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CalibrationError(f"cannot read calibration data {path}: {_exc_text(e)}") from e
    suffix = path.suffix.lower()
    if magic.startswith(_NPY_MAGIC):
        return _single_array_source(_load_npy(path), specs, calib_size, str(path))
    if magic[:4] in _ZIP_MAGICS:
        return _named_arrays_source(_load_npz(path), specs, calib_size, str(path))
    if suffix in (".npy", ".npz"):
        raise CalibrationError(f"calibration data {path} is not a valid {suffix} file (bad header); is it corrupt?")
    raise CalibrationError(
        f"calibration data {path} is not a .npy file, a .npz file or a folder of .jpg/.jpeg/.png images"
    )


def _load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "Python objects" in str(e) or "allow_pickle" in str(e):
            raise CalibrationError(f"cannot read .npy file {path}: it holds Python objects (pickled); "
                                   "expected a numeric array") from e
        raise CalibrationError(f"cannot read .npy file {path}: {_exc_text(e)}") from e
    except Exception as e:
        raise CalibrationError(f"cannot read .npy file {path}: {_exc_text(e)}") from e
    if not isinstance(arr, np.ndarray):  # pragma: no cover - np.load on npy magic always gives an array
        raise CalibrationError(f"cannot read .npy file {path}: not an array")
    return arr


def _npz_member_memmap(path: Path, info: zipfile.ZipInfo) -> np.ndarray | None:
    """Memory-map an uncompressed ``.npy`` member of an ``.npz``; None when not possible."""
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        return None
    try:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
        nbytes = math.prod(shape) * dtype.itemsize
        if dtype.hasobject or nbytes == 0 or not shape or offset - start + nbytes != info.file_size:
            return None
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")
    except Exception:
        return None


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype]:
    """``(shape, fortran_order, dtype)`` of the ``.npy`` stream ``member`` (left after the header)."""
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    return np.lib.format._read_array_header(member, version)  # 3.0: utf-8 header, no public reader


class _CompressedMember:
    """A ``.npz`` member that cannot be memory-mapped (compressed): its header's shape and dtype
    now, its data — the first ``n`` rows only — when :meth:`read` is called (after the checks)."""

    def __init__(self, path: Path, info: zipfile.ZipInfo):
        self.path, self.info = path, info
        with zipfile.ZipFile(path) as zf, zf.open(info) as member:
            shape, fortran, dtype = _npy_header(member)
        if dtype.hasobject:
            raise ValueError("it holds Python objects (pickled); expected a numeric array")
        self.shape, self.fortran, self.dtype = tuple(int(d) for d in shape), bool(fortran), np.dtype(dtype)
        self.ndim = len(self.shape)

    def bytes_for(self, n: int) -> int:
        """Bytes :meth:`read` allocates for ``n`` rows (all of them for a Fortran-order array)."""
        rows = self.shape[0] if self.fortran or not self.shape else min(n, self.shape[0])
        return rows * math.prod(self.shape[1:]) * self.dtype.itemsize

    def read(self, n: int) -> np.ndarray:
        """The first ``n`` rows (read whole and cut when stored in Fortran order)."""
        try:
            with zipfile.ZipFile(self.path) as zf, zf.open(self.info) as member:
                if self.fortran or not self.shape:
                    arr = np.lib.format.read_array(member, allow_pickle=False)
                    return arr[:n] if self.shape else arr
                _npy_header(member)
                rows = min(n, self.shape[0])
                count = rows * math.prod(self.shape[1:])
                data = member.read(count * self.dtype.itemsize)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError, zlib.error) as e:
            raise CalibrationError(f"cannot read .npz file {self.path}: {_exc_text(e)}") from e
        if len(data) != count * self.dtype.itemsize:
            raise CalibrationError(f"cannot read .npz file {self.path}: member {self.info.filename!r} is truncated "
                                   f"({len(data)} of {count * self.dtype.itemsize} bytes)")
        return np.frombuffer(data, dtype=self.dtype, count=count).reshape((rows,) + self.shape[1:]).copy()


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.is_dir():
                    continue
                if not info.filename.endswith(".npy"):
                    raise ValueError(f"member {info.filename!r} is not a .npy array")
                key = info.filename[: -len(".npy")]
                arr = _npz_member_memmap(path, info)
                if arr is None:
                    arr = _CompressedMember(path, info)
                out[key] = arr
    except (CalibrationError, ResourceError):
        raise
    except Exception as e:
        raise CalibrationError(f"cannot read .npz file {path}: {_exc_text(e)}") from e
    return out


# ---- image folders


def _import_pil() -> Any:
    try:
        return importlib.import_module("PIL.Image")
    except ImportError as e:
        raise CalibrationError(_PILLOW_MISSING) from e


def _norm_values(values: Sequence[float], what: str, channels: int) -> np.ndarray:
    try:
        v = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise OptionError(f"{what} must be a list of numbers, got {values!r}") from e
    if v.ndim != 1 or len(v) != channels:
        raise OptionError(f"{what} must have {channels} value(s), one per model input channel, got {values!r}")
    if not np.isfinite(v).all():
        raise OptionError(f"{what} must be finite numbers, got {values!r}")
    return v


class _ImageSource(_Source):
    """Images decoded, resized, cropped and normalised per batch."""

    def __init__(
        self,
        image_module: Any,
        files: list[Path],
        spec: InputSpec,
        channels: int,
        mean: np.ndarray,
        std: np.ndarray,
        description: str,
    ):
        self._image = image_module
        self._files = files
        self._spec = spec
        self._mode = "L" if channels == 1 else "RGB"
        self._h = int(spec.shape[2])  # type: ignore[arg-type]
        self._w = int(spec.shape[3])  # type: ignore[arg-type]
        self._mean = mean.astype(np.float32)[:, None, None]
        self._std = std.astype(np.float32)[:, None, None]
        self.num_samples = len(files)
        self.sample_shapes = {spec.name: (channels, self._h, self._w)}
        self.description = description

    def load(self, path: Path, *, fast: bool = False) -> np.ndarray:
        """One image as a normalised ``(C, H, W)`` array in the model dtype.

        ``fast`` lets JPEG decode at reduced scale (``Image.draft``): only for checking
        that the file is readable, the pixels differ slightly.
        """
        image, mode, h, w = self._image, self._mode, self._h, self._w
        try:
            with image.open(path) as im:
                if fast:
                    im.draft(mode, (w, h))
                im = im.convert(mode)
                iw, ih = im.size
                if iw < 1 or ih < 1:
                    raise ValueError(f"empty image ({iw}x{ih})")
                # Resize so the image just covers h x w: for a square target, the shorter side
                # becomes the target size and the longer is truncated like torchvision's Resize.
                if w / iw >= h / ih:
                    nw, nh = w, max(h, int(w * ih / iw))
                else:
                    nw, nh = max(w, int(h * iw / ih)), h
                if (nw, nh) != (iw, ih):
                    resample = getattr(image, "Resampling", image).BILINEAR
                    im = im.resize((nw, nh), resample)
                left = int(round((nw - w) / 2.0))
                top = int(round((nh - h) / 2.0))
                im = im.crop((left, top, left + w, top + h))
                pixels = np.asarray(im, dtype=np.float32)
        except Exception as e:
            raise CalibrationError(f"cannot read image {path}: {_exc_text(e)}") from e
        pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
        out = (pixels / np.float32(255.0) - self._mean) / self._std
        return out.astype(self._spec.dtype, copy=False)

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        for s in range(0, self.num_samples, batch_size):
            chunk = self._files[s : s + batch_size]
            yield {self._spec.name: np.stack([self.load(p) for p in chunk])}


def _file_kind(p: Path) -> str:
    import stat

    try:
        mode = p.stat().st_mode
    except OSError as e:
        return _exc_text(e)
    target = f"a link to {os.path.realpath(p)}, " if p.is_symlink() else ""
    for test, name in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return target + name
    return target + "a special file"


def _image_source(
    folder: Path, specs: list[InputSpec], calib_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> _ImageSource:
    try:
        files = sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")),
            key=lambda p: p.name,
        )
        files = [p for p in files if not p.is_dir()]  # subfolders are not searched
        for p in files:  # a link to /dev/zero would be read for ever, a dangling one not at all
            if not p.is_file():
                what = ("a link to nothing (dangling)" if p.is_symlink() and not p.exists()
                        else f"not a regular file ({_file_kind(p)})")
                raise CalibrationError(f"image folder {folder}: {p.name} is {what}; remove it or point it at an image")
    except OSError as e:
        raise CalibrationError(f"cannot list image folder {folder}: {_exc_text(e)}") from e
    if not files:
        raise CalibrationError(
            f"image folder {folder} contains no .jpg/.jpeg/.png files (subfolders are not searched)"
        )
    if len(specs) != 1:
        raise CalibrationError(
            f"an image folder ({folder}) can only feed a single-input model; this one has inputs "
            f"{_names([s.name for s in specs])}: use an .npz keyed by input name or a reader"
        )
    spec = specs[0]
    if len(spec.shape) != 4:
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} must be NCHW (rank 4), "
            f"its shape is {_fmt_expected(spec)}"
        )
    if spec.dtype.kind != "f":
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} has dtype {spec.dtype}, images need a float input"
        )
    c, h, w = spec.shape[1:]
    channels = 3 if c is None else c
    if channels not in (1, 3):
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} has {channels} channels, images give 1 (L) or 3 (RGB)"
        )
    if h is None or w is None:
        raise CalibrationError(
            f"image folder {folder}: model input {spec.name!r} has a dynamic height/width "
            f"{_fmt_expected(spec)}; give the size to crop to with --input-shape"
        )
    if h < 1 or w < 1:
        raise CalibrationError(f"image folder {folder}: model input {spec.name!r} has an empty image size {h}x{w}")
    mean_v = _norm_values(mean, "mean", channels)
    std_v = _norm_values(std, "std", channels)
    if (std_v == 0).any():
        raise OptionError(f"std must not contain 0, got {std!r}")
    image = _import_pil()
    total = len(files)
    if calib_size is not None:
        files = files[:calib_size]
    src = _ImageSource(image, files, spec, channels, mean_v, std_v, f"image folder {folder} ({len(files)} images)")
    src.available = total
    for p in files:  # validation pass: every file decodes
        src.load(p, fast=True)
    return src


# ---- readers


class _ReaderSource(_Source):
    """A reader with ``rewind()``: re-read on every pass, re-validated, re-batched."""

    def __init__(
        self, reader: Any, specs: list[InputSpec], n: int, sample_shapes: dict[str, tuple[int, ...]], description: str
    ):
        self._reader = reader
        self._specs = specs
        self.num_samples = n
        self.sample_shapes = sample_shapes
        self.description = description

    def batches(self, batch_size: int) -> Iterator[dict[str, np.ndarray]]:
        names = [s.name for s in self._specs]
        pending: collections.deque[tuple[dict[str, np.ndarray], int, int]] = collections.deque()
        have = 0
        total = 0
        feeds = _reader_feeds(self._reader, self._specs, self.num_samples, self.sample_shapes, self.description)
        for feed, count in feeds:
            pending.append((feed, 0, count))
            have += count
            total += count
            while have >= batch_size:
                yield _take(pending, batch_size, names)
                have -= batch_size
        if total < self.num_samples:
            raise CalibrationError(
                f"calibration reader returned {total} samples on this pass but {self.num_samples} on the first "
                f"({self.description}); rewind() must restart the same data"
            )
        if have:
            yield _take(pending, have, names)


def _take(
    pending: collections.deque[tuple[dict[str, np.ndarray], int, int]], rows: int, names: list[str]
) -> dict[str, np.ndarray]:
    """Pop ``rows`` rows off the front of ``pending`` (feed, offset, count) into one batch."""
    parts: list[dict[str, np.ndarray]] = []
    need = rows
    while need:
        feed, off, count = pending[0]
        k = min(need, count - off)
        parts.append({n: feed[n][off : off + k] for n in names})
        need -= k
        if off + k == count:
            pending.popleft()
        else:
            pending[0] = (feed, off + k, count)
    if len(parts) == 1:
        return {n: np.ascontiguousarray(parts[0][n]) for n in names}
    return {n: np.concatenate([p[n] for p in parts]) for n in names}


def _call_reader(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:
        raise CalibrationError(f"calibration reader raised {_exc_text(e)}") from e


def _reader_feeds(
    reader: Any,
    specs: list[InputSpec],
    limit: int | None,
    sample_shapes: dict[str, tuple[int, ...]],
    description: str,
) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """One pass over a reader: validated feeds (fresh arrays in the model dtypes) and row counts.

    ``sample_shapes`` is filled from the first non-empty feed when empty, checked otherwise.
    Stops after ``limit`` samples (the last feed is cut), without calling ``get_next`` again.
    """
    rewind = getattr(reader, "rewind", None)
    if callable(rewind):
        _call_reader(rewind)
    wanted = [s.name for s in specs]
    total = 0
    call = 0
    while limit is None or total < limit:
        call += 1
        feed = _call_reader(reader.get_next)
        if feed is None:
            return
        where = f" in {description}, get_next() call {call}"
        if not isinstance(feed, Mapping):
            raise CalibrationError(
                f"calibration reader get_next() returned a {type(feed).__name__}, expected a dict "
                f"{{input_name: array}} with keys {_names(wanted)}, or None at the end{where}"
            )
        problems = _key_problems(wanted, list(feed), "missing inputs")
        if problems:
            raise CalibrationError(
                f"calibration reader feed: {problems} (expected exactly the keys {_names(wanted)}){where}"
            )
        arrays, count = _checked_arrays(feed, specs, where)
        if count == 0:
            continue
        for name, (a, _) in arrays.items():
            shape = tuple(int(d) for d in a.shape[1:])
            if name not in sample_shapes:
                sample_shapes[name] = shape
            elif sample_shapes[name] != shape:
                raise CalibrationError(
                    f"calibration input {name!r}: per-sample shape {_fmt_shape(shape)} differs from the earlier "
                    f"samples' {_fmt_shape(sample_shapes[name])}{where}"
                )
        take = count if limit is None else min(count, limit - total)
        out: dict[str, np.ndarray] = {}
        for name, (a, dt) in arrays.items():
            raw = a[:take]
            out[name] = _cast(raw, dt)
            _check_finite(name, out[name], total, where, raw=raw)
        yield out, take
        total += take


def _reader_source(reader: Any, specs: list[InputSpec], calib_size: int | None, probe_more: bool = False) -> _Source:
    """Validate a reader by one pass (cached when it has no ``rewind()``). With ``probe_more``
    (the default cap was reached) ``get_next()`` is called once more to learn whether the
    reader held more samples, for the note."""
    description = f"calibration reader {type(reader).__name__}"
    sample_shapes: dict[str, tuple[int, ...]] = {}
    has_rewind = callable(getattr(reader, "rewind", None))
    unbatched = {s.name for s in specs} - batch_inputs(specs)
    first: dict[str, np.ndarray] = {}
    varying: set[str] = set()
    cached: list[dict[str, np.ndarray]] = []
    n = 0
    held = 0
    for feed, count in _reader_feeds(reader, specs, calib_size, sample_shapes, description):
        n += count
        for name in unbatched:
            value = feed[name]
            if name not in first:
                first[name] = np.array(value[0])
            if not np.array_equal(value, np.broadcast_to(first[name], value.shape)):
                varying.add(name)
        if not has_rewind:
            cached.append(feed)
            held += sum(a.nbytes for a in feed.values())
            # the cache, and the one copy concatenating it makes
            require(2 * held, f"caching {n} sample(s) of {description} (it has no rewind())",
                              "--calib-size N caches fewer samples (or give the reader a rewind() method)")
    if n == 0:
        raise CalibrationError(f"calibration data has no samples (expected at least 1) in {description}")
    more = None
    if probe_more and calib_size is not None and n >= calib_size:
        try:
            more = True if reader.get_next() is not None else None
        except Exception:  # the samples read are what counts; the probe only feeds a note
            more = None
    if has_rewind:
        src: _Source = _ReaderSource(reader, specs, n, sample_shapes, description)
        value_shapes = {k: (v if len(v) == len(spec.shape) else (1,) + v)
                        for spec in specs for k, v in sample_shapes.items() if k == spec.name and k in unbatched}
        src.unbatched, src.value_shapes, src.varying = frozenset(unbatched), value_shapes, frozenset(varying)
    else:
        # cached feeds are fresh copies already in the model dtypes; _ArraySource copies each batch it hands out
        arrays = {
            s.name: (np.concatenate([f[s.name] for f in cached]) if len(cached) > 1 else cached[0][s.name], s.dtype)
            for s in specs
        }
        src = _ArraySource(arrays, n, f"{description} (cached, {n} samples)", specs)
    src.available = more
    return src
