"""One network's cut tensors, batch by batch as the segments computed them, spilled to
memory-mapped files in a private temporary folder past a memory budget (:data:`CUT_BUDGET` by
default, shared by both networks' stores; also the memory estimate's figure).
"""

from __future__ import annotations

import mmap
import os
import tempfile
from collections.abc import Callable

import numpy as np

from ..errors import CalibrationError


#: Calibration cut tensors (both networks together) spill to disk past this many bytes.
CUT_BUDGET = 1 << 30


class _PerBatch(list):
    """A tensor's values kept per batch, in batch order; ``nbytes``: those held in memory."""

    def __init__(self):
        super().__init__()
        self.nbytes = 0


class TensorStore:
    """One network's cut tensors, batch by batch exactly as the segments computed them.

    Batch ``b`` covers ``ranges[b] = (start, rows)``: samples from ``start`` on, ``rows`` rows
    (beyond its samples only when a fixed-batch model pads the last batch). A per-sample tensor
    is one array of the batches' values stacked along axis 0 (sample ``i`` in row ``i``, padding
    rows last); a per-batch tensor is the list of its values (:class:`_PerBatch`). Which one a
    tensor gets: module docstring. Arrays go to memory-mapped files in a private temporary
    folder once the bytes in memory (both stores together, ``shared()``) would pass the budget.
    """

    def __init__(self, budget: int, tmp_dir: str, n: int, batch: int, fixed_batch: int | None):
        self.values: dict[str, np.ndarray | _PerBatch] = {}
        self.n = n
        self.ranges = [(start, fixed_batch or min(batch, n - start)) for start in range(0, n, batch)]
        self.rows = self.ranges[-1][0] + self.ranges[-1][1]
        self.budget = budget
        self.tmp_dir = tmp_dir
        self.spilled_bytes = 0  # everything ever written to disk

    def in_memory(self) -> dict[int, int]:
        """id → bytes held in memory, per tensor (ids: the two stores share values at first)."""
        return {id(v): v.nbytes for v in self.values.values() if not isinstance(v, np.memmap)}

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype, shared_bytes: Callable[[], int]) -> np.ndarray:
        """An uninitialised array, memory-mapped if it would take the bytes in memory past the
        budget — unless it is smaller than a page, which a file of its own would not save."""
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if nbytes >= mmap.PAGESIZE and shared_bytes() + nbytes > self.budget:
            fd, path = tempfile.mkstemp(dir=self.tmp_dir, suffix=".bin")  # unique across both stores
            os.close(fd)
            arr = np.memmap(path, dtype=dtype, mode="w+", shape=shape)
            try:
                os.unlink(path)  # POSIX: the mapping stays valid, the space goes when the array is freed
            except OSError:
                pass  # elsewhere the file goes with the temporary folder
            self.spilled_bytes += nbytes
        else:
            arr = np.empty(shape, dtype=dtype)
        return arr

    def put(self, name: str, b: int, value: np.ndarray, shared_bytes: Callable[[], int],
            per_batch: bool = False) -> None:
        """Keep tensor ``name``'s ``value`` in batch ``b`` (a tensor's batches arrive in order from 0).

        Unless ``per_batch``, the tensor is kept per sample as long as every value has its
        batch's ``rows`` rows and the first value's trailing shape; the first value that does
        not turns the rows stacked so far back into the earlier batches' values.
        """
        start, rows = self.ranges[b]
        held = self.values.get(name) if b else None
        per_sample = not per_batch and value.shape[:1] == (rows,)
        if held is None:
            held = (self.allocate((self.rows,) + value.shape[1:], value.dtype, shared_bytes) if per_sample
                    else _PerBatch())
        elif not isinstance(held, _PerBatch) and not (per_sample and value.shape[1:] == held.shape[1:]):
            stacked, held = held, _PerBatch()
            for s, r in self.ranges[:b]:
                self._append(held, stacked[s:s + r], shared_bytes)
        self.values[name] = held
        if isinstance(held, _PerBatch):
            self._append(held, value, shared_bytes)
        else:
            held[start:start + rows] = value

    def _append(self, held: _PerBatch, value: np.ndarray, shared_bytes: Callable[[], int]) -> None:
        arr = self.allocate(value.shape, value.dtype, shared_bytes)
        arr[...] = value
        held.append(arr)
        if not isinstance(arr, np.memmap):
            held.nbytes += arr.nbytes

    def batch(self, name: str, b: int) -> np.ndarray:
        """Tensor ``name`` in batch ``b``, as computed."""
        held = self.values[name]
        if isinstance(held, _PerBatch):
            return held[b]
        start, rows = self.ranges[b]
        return np.asarray(held[start:start + rows])

    def samples(self, name: str) -> np.ndarray:
        """A per-sample tensor's rows of the ``n`` real samples (for the statistics)."""
        held = self.values[name]
        if isinstance(held, _PerBatch):
            shapes = ", ".join(str(s) for s in dict.fromkeys(v.shape for v in held))
            rows = "/".join(str(r) for r in sorted({r for _, r in self.ranges}, reverse=True))
            raise CalibrationError(
                f"tensor {name!r}, a decomposed conv's input, has no row per calibration sample: on "
                f"batches of {rows} rows its values have shapes {shapes}, so its statistics cannot be "
                f"gathered; leave that conv out with --exclude")
        return held[:self.n]
