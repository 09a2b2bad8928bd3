"""Tests of onnx_dwdecomp.timing_cache: the key, the file format, damaged and unwritable files,
concurrent writers, and LatencySelector's use of the cache. Timers are injected fakes; no test
times onnxruntime."""

from __future__ import annotations

import json
import multiprocessing
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnx_dwdecomp.timing.latency import ConvConfig, LatencySelector, Timing, TimingError
from onnx_dwdecomp.timing.clock import cpu_model
from onnx_dwdecomp.timing.cache import FORMAT, VERSION, TimingCache, default_cache_path


def _config(c=8, mult=1, threads=1, providers=("CPUExecutionProvider",)):
    return ConvConfig((1, c, 10, 10), 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), "NOTSET", c * mult, c, True,
                      "float32", threads, providers)


def _cache(path, version="1.0", cpu="CPU A"):
    return TimingCache(path, onnxruntime_version=version, cpu=cpu)


T = Timing(1.0, 0.5, 20, 0.1, 0.05, 0.02)


class _Timer:
    """Fake timer: a fixed timing, counting its calls."""

    def __init__(self, timing=T):
        self.timing, self.calls = timing, []

    def __call__(self, config, scale):
        self.calls.append((config, scale))
        return self.timing


def _file(path) -> dict:
    data = json.loads(Path(path).read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION
    return data["entries"]


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "onnx_dwdecomp" / "timing_cache.json"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for value in ("relative/dir", ""):  # the XDG spec ignores a relative value
        monkeypatch.setenv("XDG_CACHE_HOME", value)
        assert default_cache_path() == tmp_path / "home" / ".cache" / "onnx_dwdecomp" / "timing_cache.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_path() == tmp_path / "home" / ".cache" / "onnx_dwdecomp" / "timing_cache.json"
    cache = TimingCache()
    assert cache.path == default_cache_path() and cache.notes == []  # a missing file: an empty cache


def test_key_parts_default_to_this_installation():
    import onnxruntime

    cache = TimingCache(Path("/nonexistent/timing_cache.json"))
    assert (cache.onnxruntime_version, cache.cpu) == (onnxruntime.__version__, cpu_model())
    assert cpu_model() and not cache.notes
    key = json.loads(cache.key(_config()))
    assert key["config"]["providers"] == ["CPUExecutionProvider"] and key["config"]["threads"] == 1
    assert key["onnxruntime"] == onnxruntime.__version__ and key["cpu"] == cpu_model()


def test_round_trip(tmp_path):
    path = tmp_path / "sub" / "cache.json"
    cache = _cache(path)
    assert cache.get(_config()) is None
    retimed = replace(T, retimes=1)
    cache.put(_config(), retimed)
    assert cache.get(_config()) == retimed and cache.get(_config()).cached
    again = _cache(path).get(_config())
    assert again == retimed and again.cached and again.retimes == 1 and not cache.notes
    assert list(_file(path).values()) == [{"regular_ms": 1.0, "separable_ms": 0.5, "regular_iqr_ms": 0.1,
                                           "separable_iqr_ms": 0.05, "ratio_halfwidth": 0.02, "runs": 20,
                                           "retimes": 1, "clock": "wall"}]


def test_same_key_hits_without_timing_and_every_key_part_invalidates(tmp_path):
    path = tmp_path / "cache.json"
    first = _Timer()
    LatencySelector(first, threads=1, cache=_cache(path)).decide(_config())
    assert len(first.calls) == 1
    timer = _Timer(Timing(1.0, 2.0, 5))
    sel = LatencySelector(timer, threads=1, cache=_cache(path))
    d = sel.decide(_config())
    assert timer.calls == [] and d.timing == T and d.timing.cached and d.rewrite
    assert sel.cache_hits == {_config()} and "from the timing cache" in d.reason
    misses = [(_cache(path, version="2.0"), _config()),                          # onnxruntime
              (_cache(path, cpu="CPU B"), _config()),                            # CPU model
              (_cache(path), _config(threads=2)),                                # threads
              (_cache(path), _config(providers=("CUDAExecutionProvider",))),     # providers
              (_cache(path), _config(mult=2))]                                   # option (multiplier)
    for cache, config in misses:
        timer = _Timer(Timing(1.0, 2.0, 5))
        sel = LatencySelector(timer, threads=1, cache=cache)
        d = sel.decide(config)
        assert len(timer.calls) == 1 and not d.rewrite and not d.timing.cached and not sel.cache_hits
    assert len(_file(path)) == 1 + len(misses)


def test_a_cached_retimed_decision_is_rederived_without_timing(tmp_path):
    path = tmp_path / "cache.json"
    noisy = Timing(1.0, 0.94, 5, ratio_halfwidth=0.05)  # θ = 0.95 inside the band

    def timer(config, scale):
        calls.append(scale)
        return replace(noisy, runs=5 * scale)

    calls = []
    first = LatencySelector(timer, threads=1, cache=_cache(path)).decide(_config())
    assert calls == [1, 3, 9] and first.timing.retimes == 2
    calls = []
    again = LatencySelector(timer, threads=1, cache=_cache(path)).decide(_config())
    assert calls == [] and again.timing == first.timing and again.rewrite == first.rewrite
    # a stored timing with re-timings left (e.g. from timing(), pricing an option) is re-timed
    fresh = _cache(path)
    fresh.put(_config(), noisy)
    LatencySelector(timer, threads=1, cache=fresh).decide(_config())
    assert calls == [3, 9] and _cache(path).get(_config()).retimes == 2


def test_timing_errors_are_not_persisted(tmp_path):
    def fails(config, scale):
        raise TimingError("onnxruntime cannot run it")

    path = tmp_path / "cache.json"
    sel = LatencySelector(fails, threads=1, cache=_cache(path))
    assert not sel.decide(_config()).rewrite
    assert not path.exists()


def test_writers_merge_instead_of_overwriting(tmp_path):
    path = tmp_path / "cache.json"
    a, b = _cache(path), _cache(path)  # both read the (absent) file first
    a.put(_config(c=4), T)
    b.put(_config(c=5), T)
    a.put(_config(c=6), T)
    assert len(_file(path)) == 3
    assert a.get(_config(c=5)) == T  # a saw b's entry when it merged


# ------------------------------------------------------------------------------- damaged files

_VALID = json.dumps({"format": FORMAT, "version": VERSION, "entries": {}})


@pytest.mark.parametrize("content, note", [
    (b"", "empty"),
    (b'{"format": "onnx_dwdecomp.timing_cache", "version": 1, "entries": {"k": {"regular_ms"', "truncated"),
    (b'{"format": "onnx_dwdecomp.timing_cache", "version": 1, "entries": []}', "not an onnx_dwdecomp"),
    (json.dumps({"format": FORMAT, "version": 99, "entries": {}}).encode(), "format version 99"),
])
def test_unusable_file_is_noted_once_and_rewritten(tmp_path, content, note):
    path = tmp_path / "cache.json"
    path.write_bytes(content)
    cache = _cache(path)
    assert len(cache.notes) == 1 and note in cache.notes[0] and str(path) in cache.notes[0]
    assert cache.get(_config()) is None
    timer = _Timer()
    LatencySelector(timer, threads=1, cache=cache).decide(_config())
    cache.put(_config(c=4), T)
    assert len(cache.notes) == 1 and len(timer.calls) == 1
    assert len(_file(path)) == 2
    assert _cache(path).get(_config()) == T and not _cache(path).notes


@pytest.mark.parametrize("content", [np.random.default_rng(0).bytes(256), b"[1, 2, 3]", b'{"entries": {}}',
                                     onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])).SerializeToString()])
def test_a_file_that_is_not_a_cache_is_never_overwritten(tmp_path, content):
    """--timing-cache pointed at a model (or any other file): noted, read as empty, left as it is."""
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    cache = _cache(path)
    assert len(cache.notes) == 1 and "left alone" in cache.notes[0]
    cache.put(_config(), T)
    assert path.read_bytes() == content and len(cache.notes) == 1


def test_malformed_entries_are_dropped_with_one_note(tmp_path):
    path = tmp_path / "cache.json"
    cache = _cache(path)
    cache.put(_config(), T)
    data = json.loads(path.read_text())
    good = data["entries"][cache.key(_config())]
    data["entries"].update({"a": {**good, "runs": 0}, "b": {**good, "regular_ms": "fast"}, "c": [1],
                            "d": {**good, "extra": 1}, "e": {**good, "retimes": True}})
    path.write_text(json.dumps(data))
    again = _cache(path)
    assert again.notes == [f"timing cache {path} has 5 malformed entries; ignored"]
    assert again.get(_config()) == T


def _unwritable_paths(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text(_VALID)
    return [blocker / "cache.json",                     # the parent is a regular file
            Path("/proc/onnx_dwdecomp/cache.json")]     # not writable even for root


@pytest.mark.parametrize("which", [0, 1])
def test_unwritable_location_is_noted_once_and_the_run_continues(tmp_path, which):
    path = _unwritable_paths(tmp_path)[which]
    cache = _cache(path)
    assert cache.notes == []
    timer = _Timer()
    sel = LatencySelector(timer, threads=1, cache=cache)
    assert sel.decide(_config()).rewrite and sel.decide(_config(c=4)).rewrite
    assert len(timer.calls) == 2
    assert len(cache.notes) == 1 and "not writable" in cache.notes[0] and "not saved" in cache.notes[0]
    assert cache.get(_config()) == T  # kept in memory for this run


@pytest.mark.parametrize("read_only", ["file", "folder"])
def test_read_only_file_or_folder(tmp_path, read_only):
    path = tmp_path / "cache.json"
    _cache(path).put(_config(), T)
    target = path if read_only == "file" else tmp_path
    target.chmod(0o444 if read_only == "file" else 0o555)
    try:
        enforced = not os.access(target, os.W_OK)  # root may write anyway
        cache = _cache(path)
        assert cache.get(_config()) == T and cache.notes == []  # still readable
        cache.put(_config(c=4), T)  # never raises
        if not enforced:
            pytest.skip("permissions are not enforced here (root)")
        assert len(cache.notes) == 1 and "not writable" in cache.notes[0]
        assert list(_file(path)) == [cache.key(_config())]  # unchanged
    finally:
        target.chmod(0o755 if read_only == "folder" else 0o644)


def test_a_file_the_user_may_not_write_is_left_alone(tmp_path, monkeypatch):
    """The read-only-file rule, also where permissions are not enforced: os.replace would
    succeed on a 0o444 file in a writable folder, but the user marked it read-only."""
    path = tmp_path / "cache.json"
    _cache(path).put(_config(), T)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != path)
    cache = _cache(path)
    cache.put(_config(c=4), T)
    cache.put(_config(c=5), T)
    assert len(cache.notes) == 1 and "read-only" in cache.notes[0]
    assert list(_file(path)) == [cache.key(_config())]


# ------------------------------------------------------------------------------- concurrency

_WRITERS, _ENTRIES = 4, 25


def _write_entries(path, writer, barrier):
    cache = _cache(path)
    barrier.wait()
    for i in range(_ENTRIES):
        cache.put(_config(c=1 + i, threads=1 + writer), Timing(1.0 + writer, 0.5 + i, 3))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_concurrent_writers_keep_every_entry(tmp_path):
    path = tmp_path / "cache.json"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(_WRITERS)
    procs = [ctx.Process(target=_write_entries, args=(path, w, barrier)) for w in range(_WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * _WRITERS
    cache = _cache(path)
    assert cache.notes == [] and len(_file(path)) == _WRITERS * _ENTRIES
    for w in range(_WRITERS):
        for i in range(_ENTRIES):
            assert cache.get(_config(c=1 + i, threads=1 + w)) == Timing(1.0 + w, 0.5 + i, 3)
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]  # no temporary file left


def test_rewritten_cache_keeps_a_shared_files_mode(tmp_path):
    path = tmp_path / "shared.json"
    first = TimingCache(path, onnxruntime_version="1.0", cpu="cpu")
    first.put(_config(), Timing(1.0, 0.5, runs=3))
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a new file follows the umask
    path.chmod(0o664)
    TimingCache(path, onnxruntime_version="1.0", cpu="cpu").put(_config(threads=2), Timing(1.0, 0.5, runs=3))
    assert path.stat().st_mode & 0o777 == 0o664


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
