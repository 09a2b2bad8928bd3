"""plot.py and the CLI's --plot: the trade-off as a picture."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from conftest import correlated_images
from onnx_dwdecomp.cli import main
from onnx_dwdecomp.errors import OptionError
from onnx_dwdecomp.plot import check_plot_path, frontier_plot
from test_report import budget_dict


def test_svg_and_png_of_a_budget_record():
    svg = frontier_plot(budget_dict(), "svg").decode()
    assert svg.lstrip().startswith("<?xml") and "chosen plan" in svg and "frontier" in svg
    assert frontier_plot(budget_dict(), "svg") == frontier_plot(budget_dict(), "svg")  # no date inside
    assert frontier_plot(budget_dict(), "png")[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_path_checks(monkeypatch):
    assert check_plot_path("a/b.SVG") == "svg"
    with pytest.raises(OptionError, match="ending in .png or .svg"):
        check_plot_path("trade.pdf")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(OptionError, match=r"pip install 'onnx-dwdecomp\[plot\]'"):
        check_plot_path("trade.png")


def test_cli_plot(tmp_path, capsys):
    from test_plan import mixed_net

    onnx.save(mixed_net(), tmp_path / "m.onnx")
    np.save(tmp_path / "c.npy", correlated_images(40, 6, 12, 12, seed=4))
    base = [str(tmp_path / "m.onnx"), "--calib", str(tmp_path / "c.npy"), "--select", "all",
            "-o", str(tmp_path / "o.onnx")]
    assert main(base + ["--plot", str(tmp_path / "t.svg")]) == 0
    assert (tmp_path / "t.svg").read_text().lstrip().startswith("<?xml")
    assert f"and {tmp_path / 't.svg'}" in capsys.readouterr().out
    for extra, match in ((["--plot", str(tmp_path / "t.pdf")], "ending in .png or .svg"),
                         (["--plot", str(tmp_path / "u.png"), "--multiplier", "1"], "needs a planned job"),
                         (["--plot", str(tmp_path / "m.onnx")], "would overwrite the input model")):
        (tmp_path / "o.onnx").unlink(missing_ok=True)
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and match in err[0], err
        assert not (tmp_path / "o.onnx").exists() and not (tmp_path / "u.png").exists()


def test_task_mode_plots_the_scores_with_the_tolerance_line():
    """--eval: the scores that decided, against MACs, the input's score and the tolerance drawn
    (before: a flat predicted-latency line and none of the scores)."""
    from test_report import _round

    budget = budget_dict(mode="task", tolerance={"max_drop": "0.5%", "input_score": 0.99, "allowed_drop": 0.005},
                         rounds=[_round(10, 0.03, 0.02, 1.0, score=0.988, within=True),
                                 _round(13, 0.05, 0.04, 1.0, score=0.97, within=False)], chosen_round=0)
    svg = frontier_plot(budget, "svg").decode()
    for label in ("tolerance", "input model", "scored plan, within tolerance", "scored plan, outside"):
        assert label in svg
    assert "tolerance" not in frontier_plot(budget_dict(), "svg").decode()
