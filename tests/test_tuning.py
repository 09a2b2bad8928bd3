"""tuning.py and the task-aware mode (--eval / evaluate=, --max-drop)."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import pytest

from conftest import correlated_images, three_layer_net
from onnx_dwdecomp import EvaluationError, OptionError, decompose
from onnx_dwdecomp.planning.budget import SKIP, LayerCurve, Option
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.planning.tuning import (MAX_EVALUATIONS, Bisection, Tolerance, call_evaluate, candidate_allocations,
                                  parse_max_drop)


@pytest.mark.parametrize("text, expected", [
    ("3%", Tolerance(0.03, True)), ("0.5 %", Tolerance(0.005, True)), ("0.5", Tolerance(0.5, False)),
    (0.02, Tolerance(0.02, False)), (1, Tolerance(1.0, False)), ("1e-3", Tolerance(1e-3, False)),
])
def test_parse_max_drop(text, expected):
    assert parse_max_drop(text) == expected


@pytest.mark.parametrize("text", ["-1", "abc", "3%%", "", True, "nan"])
def test_parse_max_drop_rejects(text):
    with pytest.raises(OptionError, match="--max-drop"):
        parse_max_drop(text)


def test_tolerance_allowed():
    assert Tolerance(0.01, True).allowed(-80.0) == pytest.approx(0.8)  # |score|: a negative loss
    assert Tolerance(0.2, False).allowed(80.0) == 0.2


@pytest.mark.parametrize("n", range(0, 20))
def test_bisection_finds_the_last_within(n):
    """Within tolerance up to index ``last`` (monotone scores): found in ⌈log₂(n+1)⌉ evaluations."""
    for last in range(-1, n):
        search, calls = Bisection(n, budget=10), 0
        while (k := search.next()) is not None:
            calls += 1
            search.record(k, k <= last)
        assert search.lo == last and calls <= math.ceil(math.log2(n + 1))


def test_bisection_stops_when_the_budget_is_spent():
    search = Bisection(100, budget=2)
    for _ in range(2):
        search.record(search.next(), True)
    assert search.next() is None and search.lo == 75


def test_candidates_grow_from_the_least_sensitive_layer():
    options = (Option(SKIP, 900, 0.0), Option(1, 100, 0.01), Option(2, 300, 0.002))
    curves = [LayerCurve("loud", options, weight=50.0), LayerCurve("quiet", options, weight=1.0)]
    plans = [alloc.multipliers for _, alloc in candidate_allocations(curves, "macs")]
    assert plans[0] == {"loud": SKIP, "quiet": 2}  # least error first: the quiet layer alone
    errors = [alloc.error for _, alloc in candidate_allocations(curves, "macs")]
    assert errors == sorted(errors) and len(set(map(str, plans))) == len(plans)
    assert plans[-1] == {"loud": 2, "quiet": 1}  # loud at r = 1 (weighted 0.5) is beyond the ladder


def _fn(value):
    def evaluate(path):
        return value
    return evaluate


@pytest.mark.parametrize("fn, match", [
    (lambda path: 1 / 0, r"evaluate function .* raised ZeroDivisionError: division by zero while scoring the input"),
    (_fn(float("nan")), "returned nan .* expected a finite number"),
    (_fn("0.9"), "returned str '0.9' .* expected a number"),
    (_fn(None), "returned NoneType"),
])
def test_call_evaluate_errors_name_the_function(fn, match):
    with pytest.raises(EvaluationError, match=match):
        call_evaluate(fn, "m.onnx", "mod:fn", "the input model")


def test_call_evaluate_accepts_numpy_numbers():
    assert call_evaluate(_fn(np.float32(0.5)), "m.onnx", "f", "x") == 0.5


# ------------------------------------------------------------------------------ end to end

def rewritten_count(path: str) -> int:
    """How many of three_layer_net's convs (conv0..conv2) a model no longer has as nodes."""
    names = {node.name for node in onnx.load(path).graph.node}
    return sum(1 for k in range(3) if f"conv{k}" not in names)


class CountingScore:
    """A fake metric: 1 minus 0.01 per rewritten conv, counting its calls."""

    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, path: str) -> float:
        n = rewritten_count(path)
        self.calls.append(n)
        return 1.0 - 0.01 * n


@pytest.fixture(scope="module")
def data():
    return three_layer_net(c=6, width=16), correlated_images(40, 6, 12, 12, seed=1)


def test_task_mode_picks_the_fastest_plan_within_the_tolerance(data):
    net, calib = data
    score = CountingScore()
    model, rep = decompose(net, calib=calib, select="all", evaluate=score, max_drop=0.015)
    b = rep.budget
    assert b["mode"] == "task" and b["tolerance"]["input_score"] == 1.0
    assert b["tolerance"]["allowed_drop"] == pytest.approx(0.015)
    assert score.calls[0] == 0  # the input model first
    assert 2 <= len(score.calls) <= MAX_EVALUATIONS
    # every score is in the report, in call order
    assert [e["score"] for e in b["evaluations"]] == pytest.approx([1.0 - 0.01 * n for n in score.calls])
    # at most one rewritten conv keeps the score within 0.015: the chosen plan has exactly one
    assert len(rep.layers) == 1 and b["met"] is True
    assert [r.get("within") for r in b["rounds"]][b["chosen_round"]] is True
    json.dumps(rep.to_dict())


def test_task_mode_relative_default_and_nothing_within(data):
    net, calib = data
    score = CountingScore()  # default 1 % relative of 1.0: no rewritten conv fits (each costs 0.01… 1 %)
    _, rep = decompose(net, calib=calib, select="all", evaluate=lambda p: score(p) - 0.0001)
    assert rep.layers == () and rep.options["max_drop"] == "1%"
    assert any("no candidate plan kept the score within the tolerance" in n for n in rep.notes)
    assert rep.budget["rounds"][-1]["fallback"] is True


@pytest.mark.parametrize("fn, match", [
    (lambda path: 1 / 0, "raised ZeroDivisionError"),
    (lambda path: float("nan"), "returned nan"),
])
def test_task_mode_bad_scores_are_one_error(data, fn, match):
    net, calib = data
    with pytest.raises(EvaluationError, match=match):
        decompose(net, calib=calib, select="all", evaluate=fn)


@pytest.mark.parametrize("options, match", [
    (dict(max_drop="1%"), "--max-drop needs --eval"),
    (dict(evaluate=lambda p: 1.0, max_error=0.1), "drop --max-error"),
    (dict(evaluate=lambda p: 1.0, calib=None), "--eval needs calibration data"),
    (dict(evaluate=lambda p: 1.0, max_drop="x"), "--max-drop 'x'"),
])
def test_task_mode_option_errors(data, options, match):
    net, calib = data
    with pytest.raises(OptionError, match=match):
        decompose(net, **({"calib": calib} | options))


def test_cli_eval_from_a_file_and_its_errors(tmp_path, data, capsys):
    net, calib = data
    onnx.save(net, tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", calib)
    (tmp_path / "metric.py").write_text("def score(path):\n    return 1.0\n\ndef broken(path):\n"
                                        "    raise RuntimeError('labels missing')\n")
    args = [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npy"), "--select", "all", "--quiet",
            "-o", str(tmp_path / "out.onnx"), "--report", str(tmp_path / "r.json")]
    assert main(args + ["--eval", f"{tmp_path / 'metric.py'}:score", "--max-drop", "0"]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["options"]["evaluate"].endswith("metric.py:score") and report["budget"]["mode"] == "task"
    capsys.readouterr()
    (tmp_path / "out.onnx").unlink()
    assert main(args + ["--eval", f"{tmp_path / 'metric.py'}:broken"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "raised RuntimeError: labels missing while scoring the input model" in err[0]
    assert not (tmp_path / "out.onnx").exists()
    assert main(args + ["--eval", f"{tmp_path / 'metric.py'}:nothing"]) == 2
    assert "has no attribute 'nothing'" in capsys.readouterr().err


def test_call_evaluate_system_exit_is_one_error():
    """A metric script that calls sys.exit('...') (or argparse's exit) is an EvaluationError, not a
    silent exit of the whole job."""
    def leaves(path):
        raise SystemExit("labels file missing")
    with pytest.raises(EvaluationError, match="raised SystemExit: labels file missing while scoring the input"):
        call_evaluate(leaves, "m.onnx", "mod:fn", "the input model")


def test_task_mode_evaluate_may_write_a_folder_beside_the_model(data):
    """An evaluate function that writes its outputs into a folder next to the model it scores
    (e.g. 'model.onnx.out/') does not break the cleanup of the private temporary folder."""
    net, calib = data
    folders = []

    def score(path):
        os.makedirs(path + ".out")
        with open(os.path.join(path + ".out", "log.txt"), "w") as f:
            f.write("scored")
        folders.append(path + ".out")
        return 1.0

    _, rep = decompose(net, calib=calib, select="all", evaluate=score, max_drop=0.5)
    assert len(folders) >= 2 and rep.budget["mode"] == "task"
    assert not any(os.path.exists(os.path.dirname(f)) for f in folders)


def test_eval_file_that_exits_on_import_is_one_error(tmp_path):
    """A metric file that runs argparse or sys.exit() at import time: one EvaluationError, not a
    silent exit."""
    from onnx_dwdecomp.usercode import load_callable

    (tmp_path / "exits.py").write_text("import sys\nsys.exit('usage: exits.py LABELS')\ndef score(path):\n"
                                       "    return 1.0\n")
    with pytest.raises(EvaluationError, match="importing evaluate function file .*exits.py raised SystemExit"):
        load_callable(f"{tmp_path / 'exits.py'}:score", "evaluate function", EvaluationError)


def test_task_mode_without_candidates_says_so(tmp_path):
    """No conv has an option (c = 1: no multiplier halves the MACs): no candidate is scored, and
    the report does not claim one was scored outside the tolerance or that 'every candidate'
    was evaluated."""
    net, calib = three_layer_net(c=1, width=2), correlated_images(40, 1, 12, 12, seed=1)
    score = CountingScore()
    _, rep = decompose(net, calib=calib, select="all", evaluate=score)
    assert len(score.calls) == 1 and rep.layers == ()
    assert not any("kept the score within" in n for n in rep.notes)
    assert any("no candidate plan to score" in n for n in rep.notes)
    assert "0 candidate plans" in rep.budget["stop_reason"] and "every candidate" not in rep.budget["stop_reason"]
    rep.render()


def test_task_mode_stop_reason_counts_the_evaluations(data):
    net, calib = data
    score = CountingScore()
    _, rep = decompose(net, calib=calib, select="all", evaluate=score, max_drop=0.015)
    n = len(score.calls) - 1
    assert f"{n} evaluated" in rep.budget["stop_reason"]
