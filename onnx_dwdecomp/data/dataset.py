"""The entry point: :func:`load_calibration` opens any source (package docstring), validates it
against the model's inputs and returns one :class:`CalibrationData` that hands out
fixed-size :class:`Batch` es of model feeds, in the same order on every pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping, Sequence

import numpy as np

from ..checks import check_int
from ..errors import CalibrationError, OptionError, exc_text
from .arrays import NPY_MAGIC, ZIP_MAGICS, load_npy, load_npz
from .images import image_source
from .readers import reader_source
from .sources import Source, named_arrays_source, single_array_source
from .specs import InputSpec, check_specs, quoted_names

#: Calibration samples read when ``calib_size`` is not given: accuracy saturates at 256–512
#: images (docs/ACCURACY.md §2), and the statistics' cost grows with every sample.
DEFAULT_CALIB_SIZE = 512


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
        The inputs without a sample axis (package docstring, onnx_dwdecomp.data): each batch
        feeds them one value.
    max_batch : int or None
        1 when an input without a sample axis has values that differ between samples (each run
        takes one sample), else None (any batch size).
    description : str
        Where the data comes from, for reports (e.g. ``"image folder imgs (256 images)"``).
    notes : tuple of str
        What the user should know about how the data was read (e.g. the default cap).
    """

    def __init__(self, source: Source, inputs: Sequence[InputSpec], notes: Sequence[str] = ()):
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
        batch_size = check_int(batch_size, "batch_size")
        if pad_to is not None:
            pad_to = check_int(pad_to, "pad_to")
            if pad_to < batch_size:
                raise OptionError(f"pad_to ({pad_to}) must be >= batch_size ({batch_size})")
        if self.max_batch is not None and max(batch_size, pad_to or 0) > self.max_batch:
            varying = quoted_names(sorted(self._source.varying))
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
        A ``.npy`` file (single-input models), a ``.npz`` file keyed by input name (exactly the
        model's input names; one array feeds a single-input model whatever its key, with a
        note), a folder
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
    specs = check_specs(inputs)
    default_cap = calib_size is None
    calib_size = DEFAULT_CALIB_SIZE if default_cap else check_int(calib_size, "calib_size")
    if hasattr(source, "get_next") and callable(getattr(source, "get_next")):
        src: Source = reader_source(source, specs, calib_size, probe_more=default_cap)
    elif isinstance(source, (str, os.PathLike)):
        src = _path_source(Path(source), specs, calib_size, mean, std)
    elif isinstance(source, np.ndarray):
        src = single_array_source(source, specs, calib_size, "in-memory array")
    elif isinstance(source, Mapping):
        src = named_arrays_source(dict(source), specs, calib_size, "in-memory arrays")
    else:
        raise OptionError(
            f"calibration source must be a path, a CalibrationDataReader (with get_next()), an array "
            f"or a dict of arrays; got {type(source).__name__}"
        )
    notes = list(getattr(src, "notes", ()))
    available = getattr(src, "available", None)
    if default_cap and (available is True or (available or 0) > src.num_samples):
        of = "" if available is True else f" of {available}"
        notes.append(f"calibration: read the first {src.num_samples}{of} samples of {src.description} (default "
                     f"--calib-size {DEFAULT_CALIB_SIZE}: accuracy saturates at 256–512 images; --calib-size N "
                     f"reads more)")
    data = CalibrationData(src, specs, notes)
    return data


def _path_source(
    path: Path, specs: list[InputSpec], calib_size: int | None, mean: Sequence[float], std: Sequence[float]
) -> Source:
    if not path.exists():
        raise CalibrationError(f"calibration data not found: {path}")
    if path.is_dir():
        return image_source(path, specs, calib_size, mean, std)
    if not path.is_file():
        raise CalibrationError(f"calibration data {path} is not a regular file or a folder")
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise CalibrationError(f"cannot read calibration data {path}: {exc_text(e)}") from e
    suffix = path.suffix.lower()
    if magic.startswith(NPY_MAGIC):
        return single_array_source(load_npy(path), specs, calib_size, str(path))
    if magic[:4] in ZIP_MAGICS:
        return named_arrays_source(load_npz(path), specs, calib_size, str(path))
    if suffix in (".npy", ".npz"):
        raise CalibrationError(f"calibration data {path} is not a valid {suffix} file (bad header); is it corrupt?")
    raise CalibrationError(
        f"calibration data {path} is not a .npy file, a .npz file or a folder of .jpg/.jpeg/.png images"
    )
