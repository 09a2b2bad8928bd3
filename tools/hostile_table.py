"""Print a markdown table of the hostile-input cases (tests/test_hostile.py) and the CLI's answer to each.

Per case: the exit code and the exact line the CLI prints, against the expected exit code.

    python tools/hostile_table.py [--subprocess] [--class N]

Cases run in-process (``onnx_dwdecomp.cli.main``) by default, in ``python -m onnx_dwdecomp``
with ``--subprocess`` (cases that patch the package, e.g. the simulated internal error, stay
in-process); each in its own temporary folder, whose path is shown as ``<tmp>``. ``issue`` is
the class of issue 15 a case reproduces (``15.N``), or ``22`` for the cases of issue 22 (inputs
without a sample axis, quantized and transposed convs, image folders on dynamic sizes, symbolic
link loops, a declared 3.9 GB read only up to the default ``--calib-size``). A row is marked ⚠ when the exit code differs from the
expected one, a failure prints anything but one line, or a traceback shows. Exit codes: 0 the
model was written (a checker-valid, onnxruntime-runnable model), 1 verification failed, 2 the
input cannot be used, 3 internal error (README "Exit codes").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile import CASES, assert_valid_output, case_context, prepare  # noqa: E402

from onnx_dwdecomp.cli import main  # noqa: E402


def run(case, real_process: bool) -> tuple[int, str, str]:
    """``(exit code, stderr, note)``: the note says what was checked of a written model."""
    with tempfile.TemporaryDirectory() as d:
        argv = prepare(case, Path(d)) + (["--quiet"] if case.id != "no_model" else [])
        if real_process and case.patch is None:
            r = subprocess.run([sys.executable, "-m", "onnx_dwdecomp", *argv], capture_output=True, text=True,
                               cwd=d, env={"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                           **dict(case.env)})
            rc, err = r.returncode, r.stderr
        else:
            buf = io.StringIO()
            with case_context(case), contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            err = buf.getvalue()
        note = ""
        out = Path(d) / "out.onnx"
        if rc == 0 and out.exists():
            try:
                assert_valid_output(out, [p for p in Path(d).glob("*.onnx") if p != out])
                note = "written: checker-valid, runs in onnxruntime, no new NaN/Inf weight"
            except Exception as exc:  # noqa: BLE001 - reported in the table
                note = f"written but INVALID: {exc}"
        return rc, err.strip().replace(d, "<tmp>").replace(str(Path(d).resolve()), "<tmp>"), note


def issue(case) -> int:
    """The issue a case belongs to: 22 for the ``i22_`` cases, else 15."""
    return 22 if case.id.startswith("i22_") else 15


def main_table() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subprocess", action="store_true", help="run each case as a real process")
    ap.add_argument("--class", dest="issue_class", type=int, help="only the cases of this class of issue 15")
    ap.add_argument("--issue", type=int, choices=(15, 22), help="only the cases of this issue")
    args = ap.parse_args()
    print("| # | issue | case | input | exit (expected) | stderr, or what was checked of the written model |")
    print("|---|---|---|---|---|---|")
    bad = 0
    for i, case in enumerate(CASES, 1):
        if args.issue_class is not None and case.issue_class != args.issue_class:
            continue
        if args.issue is not None and issue(case) != args.issue:
            continue
        rc, err, note = run(case, args.subprocess)
        lines = err.splitlines()
        if case.exit == 0:
            ok = rc == 0 and not err and note.startswith("written:")
        else:
            prefix = "internal error: " if case.exit == 3 else "error: "
            ok = (rc == case.exit and len(lines) == 1 and lines[0].startswith(prefix)
                  and "Traceback" not in err and case.needle in lines[0])
        bad += not ok
        msg = (" / ".join(lines) or note).replace("|", "\\|")
        tag = f"15.{case.issue_class}" if case.issue_class else ("22" if issue(case) == 22 else "")
        print(f"| {i} | {tag} | `{case.id}` | {case.what} | {rc} ({case.exit}){'' if ok else ' ⚠'} "
              f"| `{msg}` |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_table())
