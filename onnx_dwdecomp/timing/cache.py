"""Persistent latency timings, so that repeated runs on one machine decide alike and time less.

Key
---
A timing is valid for exactly what determined it: the full :class:`~onnx_dwdecomp.timing.records.ConvConfig`
(conv configuration, the option's middle width and grouping, i.e. the multiplier, dtype, intra-op
threads and execution providers), the onnxruntime version and the CPU model (``model name`` of
``/proc/cpuinfo``, else ``platform.processor()`` or ``platform.machine()``). The key is that
record as canonical JSON (sorted keys, no spaces), so a change of any part misses.

File
----
``$XDG_CACHE_HOME/onnx_dwdecomp/timing_cache.json`` (``~/.cache/...`` when ``XDG_CACHE_HOME`` is
unset or relative) by default::

    {"format": "onnx_dwdecomp.timing_cache", "version": 2,
     "entries": {"<key>": {"regular_ms": 0.041, "separable_ms": 0.029, "runs": 100,
                           "regular_iqr_ms": 0.002, "separable_iqr_ms": 0.001,
                           "ratio_halfwidth": 0.021, "retimes": 0, "clock": "cpu"}, ...}}

An entry holds the :class:`~onnx_dwdecomp.timing.records.Timing` summary (medians, interquartile ranges,
rounds, noise band, re-timings, clock), enough to re-derive and show the decision. Failed
timings are not stored: they are cheap to repeat and may depend on the installation; nor are
wall-clock timings taken under load (``Timing.loaded``, latency.LatencySelector): a busy
machine's verdict is never frozen. Version 1 files (wall clock at every thread count, load not
checked) are ignored and rewritten. Beside the timings, ``"profiles"`` keeps per-node profiles
of whole models (node_profile.NodeTimes, keyed by node_profile.ProfileKey: the model's sha256,
input shapes, threads, providers), from which the plan's prices come.

Every new timing is written at once: under an exclusive ``fcntl.flock`` on the sidecar
``timing_cache.json.lock``, the file is re-read, this run's entries are merged into it, and the
result is written to a temporary file in the same folder that ``os.replace`` moves over the
cache. Concurrent runs therefore neither corrupt the file nor lose each other's entries; without
``fcntl`` (not POSIX) the replace stays atomic but concurrent entries can be lost. There is no
fsync: a crash can at worst leave a damaged file, which the next run ignores.

A file that is empty, or a damaged or older cache (its format marker near the start), is
ignored with one note in :attr:`TimingCache.notes` and rewritten on the next save; any other
file (``--timing-cache`` pointed at a model, say) is noted and never overwritten. Malformed
entries of a valid file are dropped with one note. A location that cannot be
written (read-only file or folder, a path through a regular file) gives one note and the run
continues without saving. Nothing here raises for a bad cache.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: atomic replace without the lock
    fcntl = None

from ..errors import OutputError, first_line
from ..modelio import write_text_atomic
from .clock import cpu_model
from .records import ConvConfig, Timing

__all__ = ["FORMAT", "VERSION", "TimingCache", "default_cache_path"]

#: ``format`` marker of the cache file.
FORMAT = "onnx_dwdecomp.timing_cache"
#: Version of the file's layout; a file of another version is ignored and rewritten.
VERSION = 2
_MS_FIELDS = ("regular_ms", "separable_ms", "regular_iqr_ms", "separable_iqr_ms", "ratio_halfwidth")
_COUNT_FIELDS = ("runs", "retimes")


def default_cache_path() -> Path:
    """``$XDG_CACHE_HOME/onnx_dwdecomp/timing_cache.json``, or under ``~/.cache`` when
    ``XDG_CACHE_HOME`` is unset or not absolute (as the XDG specification asks)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    root = Path(base) if os.path.isabs(base) else Path.home() / ".cache"
    return root / "onnx_dwdecomp" / "timing_cache.json"


class TimingCache:
    """The timing cache file at ``path``, read once on construction, written on every :meth:`put`.

    Parameters
    ----------
    path : path-like, optional
        Default :func:`default_cache_path`.
    onnxruntime_version, cpu : str, optional
        Parts of every key; default the installed onnxruntime's version and :func:`~onnx_dwdecomp.timing.clock.cpu_model`.

    Attributes
    ----------
    notes : list of str
        One line per problem with the file (ignored content, not writable), for the caller to show.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, onnxruntime_version: str | None = None,
                 cpu: str | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        if onnxruntime_version is None:
            import onnxruntime

            onnxruntime_version = onnxruntime.__version__
        self.onnxruntime_version = onnxruntime_version
        self.cpu = cpu if cpu is not None else cpu_model()
        self.notes: list[str] = []
        self._writable = True
        self._pending: dict[str, dict] = {}  # this run's entries not yet in the file
        self._pending_profiles: dict[str, dict] = {}
        self._entries, self._profiles, problem = _read_entries(self.path)
        if problem and not _ours(self.path):  # e.g. --timing-cache pointed at a model: never overwrite it
            self._writable = False
            problem = "is not an onnx_dwdecomp timing cache; left alone, the timings of this run are not saved"
        if problem:
            self.notes.append(f"timing cache {self.path} {problem}")

    def key(self, config: ConvConfig) -> str:
        """The entry key of ``config`` on this onnxruntime and CPU (canonical JSON)."""
        return json.dumps({"config": asdict(config), "onnxruntime": self.onnxruntime_version, "cpu": self.cpu},
                          sort_keys=True, separators=(",", ":"))

    def get(self, config: ConvConfig) -> Timing | None:
        """The stored timing of ``config`` (marked ``cached``), or None."""
        entry = self._entries.get(self.key(config))
        if entry is None:
            return None
        return Timing(**{name: float(entry[name]) for name in _MS_FIELDS},
                      **{name: entry[name] for name in _COUNT_FIELDS}, clock=entry["clock"], cached=True)

    def put(self, config: ConvConfig, timing: Timing) -> None:
        """Store ``timing`` for ``config``, replacing any entry, and write the file (see the
        module docstring; a location that cannot be written adds one note and keeps it in memory)."""
        entry = {name: getattr(timing, name) for name in _MS_FIELDS + _COUNT_FIELDS} | {"clock": timing.clock}
        key = self.key(config)
        self._entries[key] = self._pending[key] = entry
        self._save()

    def get_profile(self, key: object) -> dict | None:
        """The stored per-node profile under ``key`` (a dataclass, node_profile.ProfileKey), or None."""
        return self._profiles.get(self.key(key))

    def put_profile(self, key: object, profile: dict) -> None:
        """Store a per-node profile (node_profile.NodeTimes as a dict) under ``key`` and write the file."""
        k = self.key(key)
        self._profiles[k] = self._pending_profiles[k] = profile
        self._save()

    def _save(self) -> None:
        """Merge this run's pending entries into the file under the lock and replace it atomically;
        the first failure to write notes it and stops further attempts."""
        if not self._writable:
            return
        try:
            if self.path.exists() and not os.access(self.path, os.W_OK):
                raise PermissionError(errno.EACCES, "the file is read-only", str(self.path))
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._lock():
                entries, profiles, _ = _read_entries(self.path)  # damage was noted on construction
                entries.update(self._pending)
                profiles.update(self._pending_profiles)
                self._write(entries, profiles)
        except (OSError, OutputError) as exc:
            self._writable = False
            self.notes.append(f"timing cache {self.path} is not writable ({first_line(exc)}); "
                              f"timings of this run are not saved")
            return
        self._entries, self._profiles = entries, profiles
        self._pending.clear()
        self._pending_profiles.clear()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Exclusive ``flock`` on the sidecar lock file (none without ``fcntl``)."""
        if fcntl is None:
            yield
            return
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, entries: dict[str, dict], profiles: dict[str, dict]) -> None:
        text = json.dumps({"format": FORMAT, "version": VERSION, "entries": dict(sorted(entries.items())),
                           "profiles": dict(sorted(profiles.items()))}, indent=1)
        # the existing file's mode: a shared cache stays shared
        write_text_atomic(self.path, text, flag="--timing-cache", mode=_file_mode(self.path))


def _file_mode(path: Path) -> int:
    """The mode to write ``path`` with: the existing file's, else 0666 less the umask."""
    try:
        return path.stat().st_mode & 0o777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask


def _ours(path: Path) -> bool:
    """May the file at ``path`` be (re)written as the cache: missing, empty, or carrying the
    cache's format marker near its start (a damaged or older cache)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        return False
    return not head.strip() or FORMAT.encode() in head


def _read_entries(path: Path) -> tuple[dict[str, dict], dict[str, dict], str | None]:
    """The valid timing entries and per-node profiles of the cache file at ``path`` and, when
    some or all of the file is unusable, what is wrong with it (a missing file is an empty
    cache, no problem)."""
    try:
        data = json.loads(path.read_bytes())
    except (FileNotFoundError, NotADirectoryError):
        return {}, {}, None
    except OSError as exc:
        return {}, {}, f"cannot be read ({first_line(exc)}); ignored"
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return {}, {}, "is empty, truncated or not JSON; ignored and rewritten on save"
    if not (isinstance(data, dict) and data.get("format") == FORMAT and isinstance(data.get("entries"), dict)):
        return {}, {}, "is not an onnx_dwdecomp timing cache; ignored and rewritten on save"
    if data.get("version") != VERSION:
        return {}, {}, f"has format version {data.get('version')!r}, not {VERSION}; ignored and rewritten on save"
    entries = {key: entry for key, entry in data["entries"].items() if _valid_entry(entry)}
    raw_profiles = data.get("profiles") if isinstance(data.get("profiles"), dict) else {}
    profiles = {key: p for key, p in raw_profiles.items() if _valid_profile(p)}
    dropped = len(data["entries"]) - len(entries) + len(raw_profiles) - len(profiles)
    return entries, profiles, f"has {dropped} malformed entr{'y' if dropped == 1 else 'ies'}; ignored" if dropped else None


def _valid_profile(profile) -> bool:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    return (isinstance(profile, dict) and set(profile) == {"node_ms", "model_ms", "overhead_ms", "runs"}
            and isinstance(profile["node_ms"], dict) and all(number(v) for v in profile["node_ms"].values())
            and number(profile["model_ms"]) and number(profile["overhead_ms"])
            and isinstance(profile["runs"], int) and profile["runs"] >= 1)


def _valid_entry(entry) -> bool:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0

    def count(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return (isinstance(entry, dict) and set(entry) == set(_MS_FIELDS + _COUNT_FIELDS + ("clock",))
            and all(number(entry[k]) for k in _MS_FIELDS) and all(count(entry[k]) for k in _COUNT_FIELDS)
            and entry["runs"] >= 1 and entry["clock"] in ("cpu", "wall"))
