"""options.py: every option declared once — defaults, checks, and the flag each maps to."""

from __future__ import annotations

import argparse
from dataclasses import fields

import numpy as np
import pytest

from onnx_dwdecomp.errors import BudgetError, OptionError
from onnx_dwdecomp.options import DecomposeOptions, parse_floats, parse_positions
from onnx_dwdecomp.options import DEFAULT_MAX_ERROR

DATA = np.zeros((4, 3, 8, 8), np.float32)


def test_defaults_resolve_by_data():
    assert DecomposeOptions().resolved_method() == "svd" and DecomposeOptions().plan_mode() == "uniform"
    with_data = DecomposeOptions(calib=DATA)
    assert with_data.resolved_method() == "gsvd" and with_data.plan_mode() == "max_error" and with_data.default_plan
    assert DecomposeOptions(calib=DATA, multiplier=1).plan_mode() == "uniform"
    assert DecomposeOptions(calib=DATA, target_macs=0.5).plan_mode() == "target_macs"


@pytest.mark.parametrize("options, flag", [
    (dict(multiplier=0), "--multiplier"), (dict(multiplier="2"), "--multiplier"), (dict(multiplier=True), "--multiplier"),
    (dict(batch_size=0), "--batch-size"), (dict(positions=0), "--positions"), (dict(calib_size=0), "--calib-size"),
    (dict(seed=-1), "--seed"), (dict(seed=1.5), "--seed"), (dict(threads=0), "--threads"),
    (dict(std=(1.0, 0.0, 1.0)), "--std"), (dict(method="bogus"), "--method"), (dict(method="gsvd"), "--method gsvd"),
    (dict(select="some"), "--select"), (dict(symmetric=True), "--symmetric"),
    (dict(calib=DATA, max_error=float("nan")), "--max-error"), (dict(calib=DATA, target_macs="0.5"), "--target-macs"),
    (dict(calib=DATA, target_macs=0.5, max_error=0.1), "give one of"),
    (dict(calib=DATA, multiplier=2, max_error=0.1), "--multiplier cannot be combined"),
    (dict(max_error=0.1), "needs calibration data"),
    (dict(calib=DATA, verify=False), "--no-verify"),
    (dict(providers="NoSuchExecutionProvider"), "--providers"),
])
def test_bad_values_name_the_flag(options, flag):
    with pytest.raises(OptionError, match=flag):
        DecomposeOptions.of(options)


def test_out_of_range_budgets_are_budget_errors():
    with pytest.raises(BudgetError, match="--target-macs"):
        DecomposeOptions.of(dict(calib=DATA, target_macs=1.5))
    with pytest.raises(BudgetError, match="--max-error"):
        DecomposeOptions.of(dict(calib=DATA, max_error=0.0))


def test_unknown_option_lists_the_valid_ones_with_a_hint():
    with pytest.raises(OptionError) as err:
        DecomposeOptions.of({"calib_sise": 8})
    message = str(err.value)
    assert "did you mean 'calib_size'" in message
    assert all(f.name in message for f in fields(DecomposeOptions))


def test_lists_and_comma_strings_are_normalised():
    opts = DecomposeOptions.of(dict(include=["a*"], exclude=["b", "c"], providers="CPUExecutionProvider"))
    assert opts.include == ("a*",) and opts.exclude == ("b", "c") and opts.providers == ("CPUExecutionProvider",)


def test_to_dict_resolves_defaults():
    d = DecomposeOptions(calib="calib.npz").to_dict({"x": (1, 3, 8, 8)})
    assert d["method"] == "gsvd" and d["plan"] == "max_error" and d["max_error"] == DEFAULT_MAX_ERROR
    assert d["input_shapes"] == {"x": [1, 3, 8, 8]} and d["positions"] == 64 and d["threads"] >= 1
    assert d["calib"] == "calib.npz" and d["providers"] == ["CPUExecutionProvider"]
    assert set(d) >= {f.name for f in fields(DecomposeOptions)}


def test_every_field_declares_a_flag_with_help_and_group():
    for f in fields(DecomposeOptions):
        specs = f.metadata["cli"]
        assert specs, f.name
        for spec in specs:
            assert spec["flags"][0].startswith("--") and spec["help"] and spec["group"], f.name


def test_flag_parsers():
    assert parse_floats("0.5,1,2e-1") == (0.5, 1.0, 0.2)
    assert parse_positions("all") is None and parse_positions("16") == 16
    for parse, text in ((parse_floats, "red"), (parse_positions, "many")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
