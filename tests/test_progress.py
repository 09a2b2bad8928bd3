"""progress.py: the job's progress lines, and the time left of a long phase."""

from __future__ import annotations

from onnx_dwdecomp import progress
from onnx_dwdecomp.progress import Steps, reporting, say


def test_say_reaches_the_jobs_reporter_only():
    lines: list[str] = []
    say("nobody listens")
    with reporting(lines.append):
        say("one")
    say("after")
    assert lines == ["one"]


def test_steps_tell_the_time_left_from_the_pace_so_far(monkeypatch):
    clock = iter([0.0, 0.0, 30.0, 150.0])  # start, step 1, step 2 after 30 s, step 3 after 150 s
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    lines: list[str] = []
    with reporting(lines.append):
        steps = Steps("plan: sensitivity probe", 112)
        steps.step(0, "conv0")
        steps.step(1, "conv1")
        steps.step(2)
    assert lines[0] == "plan: sensitivity probe 1/112 conv0"  # no pace yet
    assert lines[1] == "plan: sensitivity probe 2/112 conv1, ~56 min left"  # 30 s a step, 111 to go
    assert lines[2] == "plan: sensitivity probe 3/112, ~138 min left"  # 75 s a step, 110 to go
