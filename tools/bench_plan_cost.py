"""Measure what planning costs: the default (planned) job against the uniform ``--multiplier 1 --select all``.

Usage::

    python tools/bench_plan_cost.py MODEL --calib CALIB.npz [--rounds N] [--timing-cache PATH]
                                    [--work-dir DIR] [EXTRA ARGS FOR BOTH JOBS ...]

Each round runs, each as a fresh process (``sys.executable -m onnx_dwdecomp``)::

    (a) default:  MODEL --calib CALIB -o OUT --report R.json --timing-cache TC  EXTRA...
    (b) uniform:  MODEL --calib CALIB -o OUT --report R.json --timing-cache TC  --multiplier 1 --select all  EXTRA...

interleaved (a, b in even rounds, b, a in odd ones, so a drift in the machine's load hits both),
and measures each process's wall time and peak RSS (``/usr/bin/time -f %M`` where it exists, else
``os.wait4``'s ``ru_maxrss`` of that child, which counts this process's own RSS as a floor).
One timing-cache file is shared by all runs of one invocation (a temporary file created once,
or ``--timing-cache PATH`` to keep one across invocations): the first default run measures its
conv timings, later rounds read them, so timing noise does not dominate the comparison. Arguments the tool does not know (or everything after ``--``) are
passed to both jobs, so they must suit both (``--input-shape``, ``--threads``, ``--quiet``; not
``--max-error``, which the uniform job refuses beside ``--multiplier``).

Prints one row per run (wall s, peak RSS, exit code), then per job the median wall / RSS and the
ratio default / uniform, then what the default job's JSON report says about its plan
(``report["budget"]``; read with ``.get``, keys may change): convs rewritten, every plan round's
predicted and measured output error (the first round that rewrote something marked), and
``report["timing_s"]``. ``--json FILE`` writes all of it.

The jobs run in the work dir, so ``python -m`` does not pick up a checkout from the current
folder; ``--src DIR`` puts DIR first on their PYTHONPATH to bench another version of the package
(e.g. ``git archive HEAD onnx_dwdecomp | tar -x -C DIR`` while the working tree is being edited).

Run it under ``nice`` on a shared machine; it takes as long as the jobs do (minutes on
ResNet-18 at 224²; see tools/make_resnet.py for such a model).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOBS = {
    "default": [],
    "uniform": ["--multiplier", "1", "--select", "all"],
}


def child_env(src: Path | None) -> dict[str, str]:
    """The jobs' environment: ``src`` (a folder holding ``onnx_dwdecomp/``) first on PYTHONPATH."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(src)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def package_location(env: dict[str, str], cwd: Path) -> str:
    """Where the jobs import onnx_dwdecomp from (same interpreter, environment and folder)."""
    res = subprocess.run([sys.executable, "-c", "import onnx_dwdecomp; print(onnx_dwdecomp.__file__)"],
                         env=env, cwd=cwd, capture_output=True, text=True)
    return res.stdout.strip() or f"(import failed: {res.stderr.strip().splitlines()[-1:]})"


#: GNU time, when present: it forks the job from a small process. ``ru_maxrss`` of a child survives
#: ``exec`` and starts from the RSS of the process it was forked (or vforked) from, so measuring a
#: job forked straight from a large Python process would report at least that process's size.
GNU_TIME = Path("/usr/bin/time")


def run_job(cmd: list[str], log: Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> dict:
    """Run ``cmd`` with stdout+stderr to ``log``; wall seconds, peak RSS (bytes), exit code, and how
    the RSS was measured (``/usr/bin/time`` %M, else ``os.wait4``'s ``ru_maxrss`` of the child)."""
    rss_file = log.with_name(log.name + ".maxrss")
    wrap = GNU_TIME.exists()
    full = [str(GNU_TIME), "-f", "%M", "-o", str(rss_file), *cmd] if wrap else cmd
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    peak, how = usage.ru_maxrss * scale, "wait4"
    if wrap:
        try:  # the last line is %M (KiB); GNU time puts "Command exited with ..." before it
            lines = rss_file.read_text().split()
            peak, how = int(lines[-1]) * 1024, "gnu-time"
        except (OSError, ValueError, IndexError):
            pass
    return {"wall_s": wall, "peak_rss": peak, "rss_by": how, "rc": proc.returncode,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


def command(job: str, model: Path, calib: Path, out: Path, report: Path, timing_cache: Path,
            extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "onnx_dwdecomp", str(model), "--calib", str(calib), "-o", str(out),
            "--report", str(report), "--timing-cache", str(timing_cache), *JOBS[job], *extra]


def _num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _fmt(x, spec: str = ".3g") -> str:
    v = _num(x)
    return "-" if v is None else format(v, spec)


def plan_summary(report: dict) -> dict:
    """What a report says about its plan, tolerant of missing keys."""
    budget = report.get("budget") or {}
    layers = report.get("layers")
    out = {
        "convs_rewritten": len(layers) if isinstance(layers, list) else None,
        "convs_planned": len(budget.get("layers") or []) or None,
        "timing_s": report.get("timing_s"),
        "budget_timing_s": budget.get("timing_s"),
        "mode": budget.get("mode"),
        "target": budget.get("target"),
        "met": budget.get("met"),
        "interaction_scale": budget.get("interaction_scale"),
        "probes": budget.get("probes"),
        "chosen_round": budget.get("chosen_round"),
        "predicted_output_rel_l2": budget.get("predicted_output_rel_l2"),
        "measured_output_rel_l2": budget.get("measured_output_rel_l2"),
        "macs_ratio": None,
        "rounds": [],
    }
    before, after = _num(budget.get("original_macs")), _num(budget.get("macs"))
    if before and after is not None:
        out["macs_ratio"] = after / before
    model = report.get("model")
    if out["macs_ratio"] is None and isinstance(model, dict):
        b, a = _num(model.get("macs_before")), _num(model.get("macs_after"))
        if b and a is not None:
            out["macs_ratio"] = a / b
    for i, rnd in enumerate(budget.get("rounds") or []):
        if not isinstance(rnd, dict):
            continue
        predicted = _num(rnd.get("predicted_output_rel_l2"))
        mults = rnd.get("multipliers") or {}
        rewritten = sum(1 for v in mults.values() if v != "skip") if isinstance(mults, dict) else None
        measured = _num(rnd.get("measured_output_rel_l2"))
        out["rounds"].append({
            "round": i, "rewritten": rewritten, "predicted": predicted,
            "measured": measured, "ratio": predicted / measured if predicted and measured else None,
            "fallback": bool(rnd.get("fallback")),
            "extra": {k: v for k, v in rnd.items() if k not in (
                "multipliers", "predicted_output_rel_l2", "measured_output_rel_l2", "interaction_scale",
                "predicted_error_sum", "fallback") and not isinstance(v, (dict, list))},
        })
    return out


def verification_error(report: dict) -> float | None:
    """Worst per-output rel L2 of the report's verification, if present."""
    outs = (report.get("verification") or {}).get("outputs") or {}
    vals = [_num(v.get("rel_l2")) for v in outs.values() if isinstance(v, dict)]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def print_plan(summary: dict, file=sys.stdout) -> None:
    p = lambda *a: print(*a, file=file)
    p(f"\ndefault job's plan (report['budget']): mode {summary['mode']}, target {summary['target']}, "
      f"met {summary['met']}, convs rewritten {summary['convs_rewritten']} of {summary['convs_planned']} planned, "
      f"MACs ×{_fmt(summary['macs_ratio'], '.3f')}")
    p(f"  interaction scale α {_fmt(summary['interaction_scale'])}, probes {summary['probes']}, chosen round "
      f"{summary['chosen_round']}, output error predicted {_fmt(summary['predicted_output_rel_l2'])} / measured "
      f"{_fmt(summary['measured_output_rel_l2'])}")
    if summary["rounds"]:
        first = next((r["round"] for r in summary["rounds"] if r["rewritten"]), None)
        p(f"  {'round':>5}  {'rewritten':>9}  {'predicted':>9}  {'measured':>9}  {'pred/meas':>9}  note")
        for r in summary["rounds"]:
            note = []
            if r["round"] == first:
                note.append("first round that rewrote something")
            if r["round"] == summary["chosen_round"]:
                note.append("chosen")
            if r["fallback"]:
                note.append("fallback")
            p(f"  {r['round']:>5}  {'-' if r['rewritten'] is None else str(r['rewritten']):>9}  "
              f"{_fmt(r['predicted']):>9}  {_fmt(r['measured']):>9}  {_fmt(r['ratio'], '.2f'):>9}  "
              f"{'; '.join(note)}")
    else:
        p("  (no plan rounds in the report)")
    for key in ("timing_s", "budget_timing_s"):
        t = summary.get(key)
        if isinstance(t, dict):
            p(f"  {key}: " + ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in t.items()))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="Unknown arguments (or all after --) go to both jobs.")
    parser.add_argument("model", type=Path)
    parser.add_argument("--calib", type=Path, required=True, help="calibration .npz for both jobs")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds (default: 1)")
    parser.add_argument("--timing-cache", type=Path, default=None,
                        help="timing cache shared by all runs (default: a temporary file for this invocation)")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep outputs, reports and logs here (default: a temporary folder, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON")
    parser.add_argument("--src", type=Path, default=None,
                        help="import onnx_dwdecomp from this folder (e.g. an exported older commit: "
                             "git archive REV onnx_dwdecomp | tar -x -C DIR) instead of the installed one")
    args, unknown = parser.parse_known_args(argv)
    extra = unknown + extra
    if args.rounds < 1:
        parser.error("--rounds must be ≥ 1")

    tmp = None
    if args.work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench_plan_cost_")
        work = Path(tmp.name)
    else:
        work = args.work_dir
        work.mkdir(parents=True, exist_ok=True)
    work = work.resolve()
    timing_cache = (args.timing_cache or work / "timing_cache.json").resolve()
    model, calib = args.model.resolve(), args.calib.resolve()
    env = child_env(args.src.resolve() if args.src else None)
    print(f"model {model}, calib {calib}, {args.rounds} round(s), timing cache {timing_cache}"
          f"{' (new)' if not timing_cache.exists() else ' (existing)'}, extra args {extra or 'none'}")
    print(f"work dir {work}{' (temporary)' if tmp else ''}; niceness {os.nice(0)}; cpus {os.cpu_count()}")
    print(f"jobs import {package_location(env, work)} (run from the work dir)")

    runs: list[dict] = []
    reports: dict[str, dict] = {}
    try:
        for rnd in range(args.rounds):
            order = list(JOBS) if rnd % 2 == 0 else list(JOBS)[::-1]
            for job in order:
                stem = work / f"{job}_r{rnd}"
                report = stem.with_suffix(".json")
                cmd = command(job, model, calib, stem.with_suffix(".onnx"), report, timing_cache, extra)
                res = run_job(cmd, stem.with_suffix(".log"), env, work)
                res.update(job=job, round=rnd)
                if res["rc"] == 0 and report.exists():
                    rep = json.loads(report.read_text())
                    reports[job] = rep
                    res["convs_rewritten"] = len(rep.get("layers") or [])
                    res["verified_rel_l2"] = verification_error(rep)
                else:
                    tail = stem.with_suffix(".log").read_text(errors="replace").splitlines()[-15:]
                    print(f"!! {job} round {rnd} exited {res['rc']}; command: {' '.join(cmd)}\n   "
                          + "\n   ".join(tail), file=sys.stderr)
                runs.append(res)
                print(f"  round {rnd} {job:<8} wall {res['wall_s']:7.1f} s  peak RSS "
                      f"{res['peak_rss'] / 2**30:5.2f} GiB  (user {res['user_s']:.0f} s, sys {res['sys_s']:.0f} s)"
                      f"  rc {res['rc']}", flush=True)
    finally:
        print(f"\n{'job':<8}  {'round':>5}  {'wall s':>7}  {'peak RSS GiB':>12}  {'user s':>6}  "
              f"{'rewritten':>9}  {'verified rel L2':>15}  rc")
        for r in runs:
            print(f"{r['job']:<8}  {r['round']:>5}  {r['wall_s']:7.1f}  {r['peak_rss'] / 2**30:12.2f}  "
                  f"{r['user_s']:6.0f}  {r.get('convs_rewritten', '-'):>9}  {_fmt(r.get('verified_rel_l2')):>15}  "
                  f"{r['rc']}")
        med = {}
        for job in JOBS:
            ok = [r for r in runs if r["job"] == job and r["rc"] == 0]
            if ok:
                med[job] = {"wall_s": statistics.median(r["wall_s"] for r in ok),
                            "peak_rss": statistics.median(r["peak_rss"] for r in ok), "runs": len(ok)}
        if med:
            print()
            for job, m in med.items():
                print(f"{job:<8} median of {m['runs']}: wall {m['wall_s']:.1f} s, peak RSS {m['peak_rss'] / 2**30:.2f} GiB")
        ratio = None
        if len(med) == 2:
            ratio = {"wall": med["default"]["wall_s"] / med["uniform"]["wall_s"],
                     "peak_rss": med["default"]["peak_rss"] / med["uniform"]["peak_rss"]}
            print(f"ratio default / uniform: wall ×{ratio['wall']:.2f}, peak RSS ×{ratio['peak_rss']:.2f}"
                  f"  (issue 20 asks wall ≤ ×2)")
        summary = plan_summary(reports["default"]) if "default" in reports else None
        if summary:
            print_plan(summary)
        if "uniform" in reports:
            u = plan_summary(reports["uniform"])
            print(f"\nuniform job: convs rewritten {u['convs_rewritten']}, MACs ×{_fmt(u['macs_ratio'], '.3f')}, "
                  f"verified rel L2 {_fmt(verification_error(reports['uniform']))}")
            if isinstance(u["timing_s"], dict):
                print("  timing_s: " + ", ".join(f"{k} {_fmt(v, '.1f')}" for k, v in u["timing_s"].items()))
        if args.json:
            args.json.write_text(json.dumps({"runs": runs, "median": med, "ratio": ratio, "default_plan": summary,
                                             "extra_args": extra}, indent=1, default=str) + "\n")
        if tmp is not None:
            tmp.cleanup()
    return 0 if runs and all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
