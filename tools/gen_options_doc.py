"""Write docs/OPTIONS.md from the command line's parsers; ``--check`` fails when the file is stale.

Usage::

    python tools/gen_options_doc.py            # (re)write docs/OPTIONS.md
    python tools/gen_options_doc.py --check    # exit 1 if docs/OPTIONS.md differs from the parsers

The flags come from the parsers themselves (``onnx_dwdecomp.cli.build_parser``: the decompose
subcommand, whose job options are declared once in ``onnx_dwdecomp/options.py``, and the bench
subcommand of ``onnx_dwdecomp/bench.py``), so a new or changed flag shows up on the next run.
Per command: every argument group in ``--help`` order, per argument its flags and metavar, its
default and its help text (argparse's ``%(default)s`` and ``%%`` expanded). The decompose job
options hide their defaults from argparse (``argparse.SUPPRESS``); their defaults are read from
the :class:`~onnx_dwdecomp.DecomposeOptions` field they set.

The output is deterministic: no dates, and values that depend on the machine (the CPU count
that the ``--threads`` help texts quote) are replaced by the description the help text gives
("the CPUs available"). tests/test_options_doc.py compares the committed file with
:func:`render` and checks, in a process that pretends to have another CPU count, home and cache
folder, that the text does not change with the machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "OPTIONS.md"
REGENERATE = "python tools/gen_options_doc.py"

#: Commands documented, in this order.
COMMANDS = ("decompose", "bench")

INTRO = """\
# Command-line options

Every option of `onnx-dwdecomp` (also `python -m onnx_dwdecomp`), generated from the parsers
themselves by `{regenerate}`; do not edit by hand (tests/test_options_doc.py
fails when this file is stale). The decompose options are declared once in
`onnx_dwdecomp/options.py` (the same names are the keyword arguments of
`onnx_dwdecomp.decompose`), the bench options in `onnx_dwdecomp/bench.py`.

Default: the value used when the flag is not given; "off" for a switch that is not given; "—"
where nothing is passed and the description says what happens instead (for example a choice
made from the other options, or the number of CPUs of the machine).
"""


def parsers() -> dict[str, argparse.ArgumentParser]:
    """The subcommand parsers of ``onnx_dwdecomp.cli.build_parser()``, by command name."""
    from onnx_dwdecomp import cli

    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS}


def option_defaults() -> dict[str, object]:
    """The default of every :class:`~onnx_dwdecomp.DecomposeOptions` field, by field name."""
    from onnx_dwdecomp.options import DecomposeOptions

    out = {}
    for f in dataclasses.fields(DecomposeOptions):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def machine_substitutions() -> list[tuple[str, str]]:
    """``(regex, replacement)`` pairs that turn machine-specific values of help texts into the
    fixed words the help text uses for them: ``(default: the CPUs available, 8)`` →
    ``(default: the CPUs available)``."""
    from onnx_dwdecomp.timing.clock import default_threads

    n = default_threads()
    return [(rf"(CPUs available)\s*[,:]\s*{n}(?=\))", r"\1")]


# --------------------------------------------------------------------------------------------
# One argument
# --------------------------------------------------------------------------------------------


def _is_switch(action: argparse.Action) -> bool:
    return action.nargs == 0


def _real_default(action: argparse.Action, defaults: Mapping[str, object]) -> object:
    if action.default is argparse.SUPPRESS:
        return defaults.get(action.dest, argparse.SUPPRESS)
    return action.default


def format_default(action: argparse.Action, defaults: Mapping[str, object]) -> str:
    """The default column: the value the flag's absence means, as one would type it."""
    if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
        return "—"
    if _is_switch(action):
        return "off"
    value = _real_default(action, defaults)
    if value is None or value is argparse.SUPPRESS:
        return "—"
    if isinstance(value, (tuple, list, set, frozenset, dict)) and not value:
        return "none"
    if isinstance(value, (tuple, list)):
        return "`" + ",".join(map(str, value)) + "`"
    if isinstance(value, (str, int, float)):
        return f"`{value}`"
    text = str(value)
    return "—" if " at 0x" in text else f"`{text}`"  # no memory addresses


def format_flags(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """``--calib-size N``, ``-o OUTPUT, --output OUTPUT`` written once as ``-o, --output OUTPUT``,
    a positional as argparse shows it in usage (``[MODEL]``)."""
    formatter = parser._get_formatter()
    if not action.option_strings:
        return f"`{formatter._format_args(action, formatter._get_default_metavar_for_positional(action))}`"
    flags = ", ".join(f"`{s}`" for s in action.option_strings)
    if _is_switch(action):
        return flags
    args = formatter._format_args(action, formatter._get_default_metavar_for_optional(action))
    return f"{flags} `{args}`"


def expand_help(parser: argparse.ArgumentParser, action: argparse.Action, defaults: Mapping[str, object],
                substitutions: Sequence[tuple[str, str]]) -> str:
    """The help text as ``--help`` shows it (``%(default)s``, ``%(choices)s``, ``%(prog)s``,
    ``%%`` expanded; the real default where argparse holds SUPPRESS), on one line."""
    text = action.help or ""
    if text is argparse.SUPPRESS:
        return ""
    params = {k: v for k, v in vars(action).items() if v is not argparse.SUPPRESS}
    params["default"] = _real_default(action, defaults)
    params["prog"] = parser.prog
    for key in ("choices",):
        if params.get(key) is not None:
            params[key] = ", ".join(map(str, params[key]))
    text = text % params
    for pattern, replacement in substitutions:
        text = re.sub(pattern, replacement, text)
    return " ".join(text.split())


def exclusive_note(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """`` (not with `--calib-reader`)`` for a member of a mutually exclusive group, else ``""``."""
    for group in parser._mutually_exclusive_groups:
        if action in group._group_actions:
            others = [o.option_strings[-1] if o.option_strings else o.dest
                      for o in group._group_actions if o is not action]
            if others:
                return " (not with " + ", ".join(f"`{o}`" for o in others) + ")"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


# --------------------------------------------------------------------------------------------
# The document
# --------------------------------------------------------------------------------------------


def render_command(name: str, parser: argparse.ArgumentParser, defaults: Mapping[str, object],
                   substitutions: Sequence[tuple[str, str]]) -> list[str]:
    """The section of one subcommand: its description, then one table per argument group."""
    lines = [f"## `onnx-dwdecomp {name}`", ""]
    if parser.description:
        lines += [" ".join(parser.description.split()), ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help is not argparse.SUPPRESS]
        if not actions:
            continue
        lines += [f"### {group.title}", "", "| argument | default | description |", "|---|---|---|"]
        for action in actions:
            text = expand_help(parser, action, defaults, substitutions) + exclusive_note(parser, action)
            lines.append(f"| {_cell(format_flags(parser, action))} | {_cell(format_default(action, defaults))} "
                         f"| {_cell(text.strip())} |")
        lines.append("")
    return lines


def render(commands: Mapping[str, argparse.ArgumentParser] | None = None,
           defaults: Mapping[str, object] | None = None,
           substitutions: Sequence[tuple[str, str]] | None = None) -> str:
    """The text of docs/OPTIONS.md (from the package's parsers unless ``commands`` is given)."""
    commands = parsers() if commands is None else commands
    defaults = option_defaults() if defaults is None else defaults
    substitutions = machine_substitutions() if substitutions is None else substitutions
    lines = [INTRO.format(regenerate=REGENERATE)]
    for name, parser in commands.items():
        # only the decompose job's options read their defaults from DecomposeOptions
        lines += render_command(name, parser, defaults if name == "decompose" else {}, substitutions)
    return "\n".join(lines).rstrip("\n") + "\n"


def stale_message(path: Path = OUT) -> str:
    return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path} is stale: run `{REGENERATE}`"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 with one line if the file differs from the parsers")
    p.add_argument("--out", type=Path, default=OUT, help="the file (default: docs/OPTIONS.md)")
    args = p.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.is_file() else None
        if current != text:
            print(stale_message(args.out), file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
