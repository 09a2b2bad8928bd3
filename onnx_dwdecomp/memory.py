"""What the machine has: available memory, checked before anything large is allocated, and the
bound on ``--threads``.

Available memory (:func:`available_memory`) is the least of

- ``MemAvailable`` of ``/proc/meminfo`` (elsewhere ``os.sysconf`` available physical pages),
- the cgroup's limit minus its usage (v2 ``memory.max − memory.current``, v1
  ``memory.limit_in_bytes − memory.usage_in_bytes``),
- the address-space limit (``ulimit -v``) minus this process's current size,
- ``$ONNX_DWDECOMP_MEMORY`` (bytes, or with a K/M/G/T suffix): a cap of the user's own on what
  the job may still allocate (like the others, compared with each estimate as it is made: it
  does not shrink by what the process already holds, e.g. decompressed calibration data),

or None when none can be read (then nothing is checked). Each is read afresh at every check.
:func:`require` guards each large allocation where it happens (calibration files before they
are read, random timing and verification inputs, shape probing); the whole job's estimate is
:mod:`onnx_dwdecomp.resources`.

Threads: ``--threads`` above :func:`max_threads` (4 × the CPUs this process may use) is refused:
timings with that many more threads than cores measure contention, and each onnxruntime
thread costs memory of its own.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable

import numpy as np

from .errors import OptionError, ResourceError
from .formatting import fmt_bytes
from .timing.clock import default_threads

#: Allowance per onnxruntime thread per session (stack in use, per-thread scratch).
THREAD_BYTES = 4 << 20
#: --threads may be at most this many times the CPUs this process may use.
THREADS_PER_CPU = 4
ENV_VAR = "ONNX_DWDECOMP_MEMORY"

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


# --------------------------------------------------------------------------- what is available


def parse_size(text: str) -> int:
    """``"512M"``, ``"2G"``, ``"1.5GiB"``, ``"65536"`` → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise OptionError(f"${ENV_VAR} {text!r}: expected a size in bytes, e.g. 8G or 512M")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def _meminfo() -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:  # v1 writes a huge number for "no limit"
            usage = _read_int(usage_file) or 0
            return max(limit - usage, 0)
    return None


def _address_space() -> int | None:
    try:
        import resource

        soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    except (ImportError, ValueError, OSError):
        return None
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    size = 0
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmSize:"):
                    size = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return max(soft - size, 0)


def available_memory() -> tuple[int | None, str]:
    """``(bytes, where from)``: the least of the bounds in the module docstring, or
    ``(None, "")`` when none can be read."""
    bounds: list[tuple[int, str]] = []
    for value, what in ((_meminfo(), "available"), (_cgroup(), "left under the cgroup's memory limit"),
                        (_address_space(), "left under the address-space limit (ulimit -v)")):
        if value is not None:
            bounds.append((value, what))
    env = os.environ.get(ENV_VAR)
    if env:
        bounds.append((parse_size(env), f"allowed by ${ENV_VAR}"))
    if not bounds:
        return None, ""
    return min(bounds)


def require(nbytes: float, what: str, hint: str) -> None:
    """Raise :class:`ResourceError` when ``nbytes`` (for ``what``) exceed the available memory."""
    available, source = available_memory()
    if available is not None and nbytes > available:
        raise ResourceError(f"not enough memory: {what} needs about {fmt_bytes(nbytes)}, "
                            f"{fmt_bytes(available)} {source}; {hint}")


def array_bytes(shape: Iterable[int], dtype) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (exact Python integers: no overflow)."""
    return math.prod(int(d) for d in shape) * np.dtype(dtype).itemsize


# --------------------------------------------------------------------------- threads


def max_threads() -> int:
    """The most ``--threads`` accepted: :data:`THREADS_PER_CPU` × the CPUs this process may use."""
    return THREADS_PER_CPU * default_threads()


def check_threads(threads: int | None) -> None:
    """:class:`OptionError` for ``--threads`` above :func:`max_threads`."""
    if threads is None:
        return
    limit = max_threads()
    if threads > limit:
        raise OptionError(f"--threads {threads}: at most {limit} ({THREADS_PER_CPU} × the {limit // THREADS_PER_CPU} "
                          f"CPU(s) this process may use); more threads than cores time contention, not the conv")
