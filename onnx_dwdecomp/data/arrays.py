"""``.npy`` and ``.npz`` files, recognised by their magic bytes: a ``.npy`` file and the stored
(uncompressed) members of an ``.npz`` are memory-mapped; a compressed member is a
:class:`CompressedMember` whose header (shape, dtype) is known at once and whose rows are read
only when asked for, after the checks (onnx_dwdecomp.data.sources).
"""

from __future__ import annotations

import math
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import CalibrationError, ResourceError, exc_text

NPY_MAGIC = b"\x93NUMPY"
ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")


def load_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        if "Python objects" in str(e) or "allow_pickle" in str(e):
            raise CalibrationError(f"cannot read .npy file {path}: it holds Python objects (pickled); "
                                   "expected a numeric array") from e
        raise CalibrationError(f"cannot read .npy file {path}: {exc_text(e)}") from e
    except Exception as e:
        raise CalibrationError(f"cannot read .npy file {path}: {exc_text(e)}") from e
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


class CompressedMember:
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
            raise CalibrationError(f"cannot read .npz file {self.path}: {exc_text(e)}") from e
        if len(data) != count * self.dtype.itemsize:
            raise CalibrationError(f"cannot read .npz file {self.path}: member {self.info.filename!r} is truncated "
                                   f"({len(data)} of {count * self.dtype.itemsize} bytes)")
        return np.frombuffer(data, dtype=self.dtype, count=count).reshape((rows,) + self.shape[1:]).copy()


def load_npz(path: Path) -> dict[str, np.ndarray]:
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
                    arr = CompressedMember(path, info)
                out[key] = arr
    except (CalibrationError, ResourceError):
        raise
    except Exception as e:
        raise CalibrationError(f"cannot read .npz file {path}: {exc_text(e)}") from e
    return out
