"""onnxruntime's ``CalibrationDataReader`` protocol: ``get_next() -> {name: array} | None``,
``rewind()`` before each pass when it exists (otherwise the first pass is cached, within the
available memory). :func:`load_reader` builds one from ``--calib-reader MODULE:CALLABLE``
(the import rule is usercode.load_callable's).
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from ..errors import CalibrationError, exc_text
from ..formatting import fmt_shape
from ..memory import require
from ..usercode import load_callable
from .sources import ArraySource, Source, checked_arrays
from .specs import InputSpec, batch_inputs, check_finite, fresh_copy, key_problems, quoted_names

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
    factory = load_callable(spec, "calibration reader", CalibrationError)
    try:
        reader = factory()
    except Exception as e:
        raise CalibrationError(f"calibration reader raised {exc_text(e)} (calling {spec!r})") from e
    if not callable(getattr(reader, "get_next", None)):
        raise CalibrationError(
            f"calibration reader {spec!r} returned a {type(reader).__name__}, which has no get_next() method "
            "(expected an onnxruntime CalibrationDataReader)"
        )
    return reader


class _ReaderSource(Source):
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
        raise CalibrationError(f"calibration reader raised {exc_text(e)}") from e


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
                f"{{input_name: array}} with keys {quoted_names(wanted)}, or None at the end{where}"
            )
        problems = key_problems(wanted, list(feed), "missing inputs")
        if problems:
            raise CalibrationError(
                f"calibration reader feed: {problems} (expected exactly the keys {quoted_names(wanted)}){where}"
            )
        arrays, count = checked_arrays(feed, specs, where)
        if count == 0:
            continue
        for name, (a, _) in arrays.items():
            shape = tuple(int(d) for d in a.shape[1:])
            if name not in sample_shapes:
                sample_shapes[name] = shape
            elif sample_shapes[name] != shape:
                raise CalibrationError(
                    f"calibration input {name!r}: per-sample shape {fmt_shape(shape)} differs from the earlier "
                    f"samples' {fmt_shape(sample_shapes[name])}{where}"
                )
        take = count if limit is None else min(count, limit - total)
        out: dict[str, np.ndarray] = {}
        for name, (a, dt) in arrays.items():
            raw = a[:take]
            out[name] = fresh_copy(raw, dt)
            check_finite(name, out[name], total, where, raw=raw)
        yield out, take
        total += take


def reader_source(reader: Any, specs: list[InputSpec], calib_size: int | None, probe_more: bool = False) -> Source:
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
        src: Source = _ReaderSource(reader, specs, n, sample_shapes, description)
        value_shapes = {k: (v if len(v) == len(spec.shape) else (1,) + v)
                        for spec in specs for k, v in sample_shapes.items() if k == spec.name and k in unbatched}
        src.unbatched, src.value_shapes, src.varying = frozenset(unbatched), value_shapes, frozenset(varying)
    else:
        # cached feeds are fresh copies already in the model dtypes; ArraySource copies each batch it hands out
        arrays = {
            s.name: (np.concatenate([f[s.name] for f in cached]) if len(cached) > 1 else cached[0][s.name], s.dtype)
            for s in specs
        }
        src = ArraySource(arrays, n, f"{description} (cached, {n} samples)", specs)
    src.available = more
    return src
