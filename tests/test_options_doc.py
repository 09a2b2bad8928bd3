"""docs/OPTIONS.md is generated from the parsers by tools/gen_options_doc.py and must be current."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from conftest import TOOLS, load_tool

gen = load_tool("gen_options_doc")


def test_committed_options_doc_is_current():
    committed = gen.OUT.read_text(encoding="utf-8") if gen.OUT.is_file() else ""
    assert gen.render() == committed, (
        "docs/OPTIONS.md is stale (the command-line options changed): run `python tools/gen_options_doc.py` "
        "and commit docs/OPTIONS.md")


def test_every_flag_and_field_default_is_rendered():
    text = gen.render()
    commands = gen.parsers()
    defaults = gen.option_defaults()
    for name, parser in commands.items():
        assert f"## `onnx-dwdecomp {name}`" in text
        for action in parser._actions:
            for flag in action.option_strings:
                assert f"`{flag}`" in text, f"{name} {flag} missing"
    # the decompose job options hide their defaults from argparse: they come from DecomposeOptions
    batch = next(line for line in text.splitlines() if line.startswith("| `--batch-size`"))
    assert f"| `{defaults['batch_size']}` |" in batch
    assert "SUPPRESS" not in text and "%(" not in text and "%%" not in text


def test_a_changed_parser_makes_the_doc_stale(tmp_path, capsys):
    """The comparison can fail: a parser with one more flag renders differently, and --check
    exits 1 naming the command that regenerates the file."""
    commands = gen.parsers()
    before = gen.render(commands)
    group = next(g for g in commands["decompose"]._action_groups if g.title == "runtime")
    group.add_argument("--fake-flag-for-test", metavar="X", default="7", help="a flag nobody declared")
    after = gen.render(commands)
    assert after != before
    assert "| `--fake-flag-for-test` `X` | `7` | a flag nobody declared |" in after

    stale = tmp_path / "OPTIONS.md"
    stale.write_text(before.replace("seed for sampling", "seed for nothing"), encoding="utf-8")
    assert gen.main(["--check", "--out", str(stale)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "python tools/gen_options_doc.py" in err
    assert gen.main(["--check", "--out", str(tmp_path / "missing.md")]) == 1
    capsys.readouterr()
    assert gen.main(["--out", str(stale)]) == 0 and gen.main(["--check", "--out", str(stale)]) == 0


def test_render_does_not_depend_on_the_machine(tmp_path):
    """Another CPU count, home and cache folder give the same text (a help text that quotes a
    machine value in new words would show here)."""
    script = (
        "import os, sys\n"
        "os.sched_getaffinity = lambda pid: set(range(977))\n"
        "os.cpu_count = lambda: 977\n"
        "if hasattr(os, 'process_cpu_count'): os.process_cpu_count = lambda: 977\n"
        f"sys.path.insert(0, {str(TOOLS)!r})\n"
        "import gen_options_doc\n"
        "sys.stdout.write(gen_options_doc.render())\n")
    env = dict(os.environ, HOME=str(tmp_path / "home"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True, encoding="utf-8").stdout
    assert out == gen.render()
    assert "977" not in out


def test_switch_and_suppressed_defaults():
    p = argparse.ArgumentParser(prog="x")
    on = p.add_argument("--on", action="store_true", help="h %(default)s")
    val = p.add_argument("--val", dest="val", default=argparse.SUPPRESS, metavar="V", help="v=%(default)s, 5%%")
    tup = p.add_argument("--tup", default=(), help="t")
    assert gen.format_default(on, {}) == "off"
    assert gen.format_default(val, {"val": (1, 2)}) == "`1,2`"
    assert gen.format_default(tup, {}) == "none"
    assert gen.expand_help(p, val, {"val": 3}, []) == "v=3, 5%"
    assert gen.format_flags(p, val) == "`--val` `V`"
