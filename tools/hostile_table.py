"""Print a markdown table of the hostile-input cases (tests/test_hostile.py) and the exact
error line the CLI prints for each, with its exit code.

    python tools/hostile_table.py [--subprocess]

Cases run in-process (``onnx_dwdecomp.cli.main``) by default, in ``python -m onnx_dwdecomp``
with ``--subprocess``; each in its own temporary folder, whose path is shown as ``<tmp>``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_hostile import CASES, prepare  # noqa: E402

from onnx_dwdecomp.cli import main  # noqa: E402


def run(case, real_process: bool) -> tuple[int, str]:
    with tempfile.TemporaryDirectory() as d:
        argv = prepare(case, Path(d)) + (["--quiet"] if case.id != "no_model" else [])
        if real_process:
            r = subprocess.run([sys.executable, "-m", "onnx_dwdecomp", *argv], capture_output=True, text=True,
                               cwd=d, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
            rc, err = r.returncode, r.stderr
        else:
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf), contextlib.redirect_stdout(io.StringIO()):
                rc = main(argv)
            err = buf.getvalue()
        return rc, err.strip().replace(d, "<tmp>").replace(str(Path(d).resolve()), "<tmp>")


def main_table() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--subprocess", action="store_true", help="run each case as a real process")
    args = ap.parse_args()
    print("| # | case | input | exit | message (stderr) |")
    print("|---|---|---|---|---|")
    bad = 0
    for i, case in enumerate(CASES, 1):
        rc, err = run(case, args.subprocess)
        lines = err.splitlines()
        ok = rc == 2 and len(lines) == 1 and "Traceback" not in err
        bad += not ok
        msg = " / ".join(lines).replace("|", "\\|")
        print(f"| {i} | `{case.id}` | {case.what} | {rc}{'' if ok else ' ⚠'} | `{msg}` |")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main_table())
