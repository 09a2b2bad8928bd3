"""Tests of onnx_dwdecomp.memory: available memory and the --threads bound."""

from __future__ import annotations

import pytest

from onnx_dwdecomp import memory
from onnx_dwdecomp.errors import OptionError, ResourceError
from onnx_dwdecomp.timing.clock import default_threads


@pytest.mark.parametrize("text, value", [("1000", 1000), ("512M", 512 << 20), ("2G", 2 << 30), ("1.5GiB", 3 << 29),
                                         ("64k", 64 << 10), ("1T", 1 << 40)])
def test_parse_size(text, value):
    assert memory.parse_size(text) == value


def test_parse_size_rejects_garbage():
    with pytest.raises(OptionError, match="ONNX_DWDECOMP_MEMORY"):
        memory.parse_size("lots")


def test_environment_caps_the_available_memory(monkeypatch):
    monkeypatch.setenv(memory.ENV_VAR, "3M")
    assert memory.available_memory() == (3 << 20, f"allowed by ${memory.ENV_VAR}")
    memory.require(1 << 20, "a test", "no flag")
    with pytest.raises(ResourceError, match=r"not enough memory: a test needs about 4.0 MiB, 3.0 MiB allowed by "
                                            r"\$ONNX_DWDECOMP_MEMORY; --some-flag"):
        memory.require(4 << 20, "a test", "--some-flag")


def test_machine_memory_is_read():
    available, source = memory.available_memory()
    assert available is None or (available > 0 and source)


def test_threads_bound():
    memory.check_threads(None)
    memory.check_threads(4 * default_threads())
    with pytest.raises(OptionError, match="--threads 100000: at most"):
        memory.check_threads(100000)
