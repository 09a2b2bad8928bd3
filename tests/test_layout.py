"""The package's import layout, read with ``ast`` (nothing is imported): no import cycles — counting
imports under ``if TYPE_CHECKING:`` and inside functions —, no import of the package's own modules
inside a function (optional third-party imports such as Pillow or matplotlib may stay lazy), and
no module over :data:`MAX_LINES` lines (issue 21)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import tarfile
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "onnx_dwdecomp"
MAX_LINES = 600
#: A commit whose layout had every problem this test looks for (cycles, inner imports, 1,050 lines).
TANGLED = "d04bd98"


def modules(package: Path) -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` file under ``package`` (a package is its
    ``__init__``)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The package modules an import statement in ``module`` loads."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[:len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        # ``from pkg import sub`` loads the submodule; ``from mod import name`` the module
        names = [f"{target}.{alias.name}" if f"{target}.{alias.name}" in known else target for alias in node.names]
    out = []
    for name in names:
        while name and name not in known:  # ``import a.b.c`` of a package module: the deepest one known
            name = name.rpartition(".")[0]
        if name and name not in out:
            out.append(name)
    return out


class Inner(NamedTuple):
    """An import of a package module inside a function."""

    module: str
    line: int
    target: str
    function: str

    def __str__(self) -> str:
        return f"{self.module}:{self.line} imports {self.target} inside {self.function}()"


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[Inner], dict[str, int]]:
    """``(edges, inner, lines)``: module → the package modules it imports anywhere in its source;
    every import of a package module within a function; the line count of every module."""
    mods = modules(package)
    known = set(mods)
    edges: dict[str, set[str]] = defaultdict(set)
    inner: list[Inner] = []
    lines: dict[str, int] = {}
    for module, path in mods.items():
        source = path.read_text(encoding="utf-8")
        lines[module] = len(source.splitlines())
        tree = ast.parse(source, filename=str(path))
        in_function: dict[int, str] = {}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    if isinstance(node, (ast.Import, ast.ImportFrom)):
                        in_function.setdefault(id(node), fn.name)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "__future__":
                continue
            for target in _targets(node, module, path.name == "__init__.py", known):
                if target == module:
                    continue
                edges[module].add(target)
                if id(node) in in_function:
                    inner.append(Inner(module, node.lineno, target, in_function[id(node)]))
    return edges, inner, lines


def cycles(edges: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """``(cycle, component)`` for each strongly connected component of more than one module
    (Tarjan's algorithm, iterative): a shortest cycle ``[a, b, ..., a]`` through its first module,
    and all its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    component = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        component.append(w)
                        if w == v:
                            break
                    if len(component) > 1:
                        components.append(sorted(component))
    found = []
    for component in components:  # a shortest way back to the first module, inside the component
        members, start = set(component), component[0]
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for v in frontier:
                for w in sorted(edges.get(v, ())):
                    if w in members and w not in previous:
                        previous[w] = v
                        following.append(w)
            frontier = following
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(previous[path[-1]])
        found.append((path[::-1], component))
    return found


def layout_problems(package: Path = PACKAGE) -> list[str]:
    """Every layout problem of the package at ``package``, one line each (empty: none)."""
    edges, inner, lines = import_graph(package)
    problems = [f"import cycle: {' → '.join(cycle)}"
                + (f" (one of the cycles among {', '.join(component)})" if len(component) + 1 > len(cycle) else "")
                for cycle, component in cycles(edges)]
    problems += [f"package import inside a function: {where}" for where in inner]
    problems += [f"module over {MAX_LINES} lines: {module} ({n})" for module, n in sorted(lines.items())
                 if n > MAX_LINES]
    return problems


def test_no_import_cycles():
    edges, _, _ = import_graph(PACKAGE)
    assert [" → ".join(cycle) for cycle, _ in cycles(edges)] == []


def test_no_package_imports_inside_functions():
    _, inner, _ = import_graph(PACKAGE)
    assert [str(i) for i in inner] == []


def test_no_module_over_the_line_limit():
    _, _, lines = import_graph(PACKAGE)
    assert {m: n for m, n in lines.items() if n > MAX_LINES} == {}


def test_the_checks_see_through_type_checking_and_function_imports(tmp_path):
    """A cycle hidden under TYPE_CHECKING and one through an import inside a function are found,
    and so is the inner import itself."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (pkg / "b.py").write_text("from .a import A\n")
    (pkg / "c.py").write_text("import json\n\ndef f():\n    from .sub import d\n    import numpy\n")
    (pkg / "sub" / "d.py").write_text("from .. import c\n" + "x = 1\n" * MAX_LINES)
    problems = layout_problems(pkg)
    assert "import cycle: pkg.a → pkg.b → pkg.a" in problems
    assert "import cycle: pkg.c → pkg.sub.d → pkg.c" in problems
    assert "package import inside a function: pkg.c:4 imports pkg.sub.d inside f()" in problems
    assert f"module over {MAX_LINES} lines: pkg.sub.d ({MAX_LINES + 1})" in problems
    assert len(problems) == 4  # numpy, a third-party import, may stay lazy


def test_the_tangled_layout_of_d04bd98_fails(tmp_path):
    """The checks fail on the layout issue 21 started from (skipped without git or that commit)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git history")
    archive = tmp_path / "old.tar"
    done = subprocess.run(["git", "-C", str(ROOT), "archive", "-o", str(archive), TANGLED, "onnx_dwdecomp"],
                          capture_output=True)
    if done.returncode:
        pytest.skip(f"commit {TANGLED} not in this clone")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    problems = layout_problems(tmp_path / "onnx_dwdecomp")
    assert "import cycle: onnx_dwdecomp.bench → onnx_dwdecomp.cli → onnx_dwdecomp.bench" in problems
    assert any(p.startswith("import cycle: onnx_dwdecomp → onnx_dwdecomp.pipeline → onnx_dwdecomp.timing → "
                            "onnx_dwdecomp (one of the cycles among ") for p in problems)
    assert "package import inside a function: onnx_dwdecomp.timing:105 imports onnx_dwdecomp inside environment()" \
        in problems
    assert sum(p.startswith("package import inside a function: ") for p in problems) == 21
    assert [p for p in problems if p.startswith("module over")] == [
        "module over 600 lines: onnx_dwdecomp.calibdata (1050)", "module over 600 lines: onnx_dwdecomp.calibrate (797)"]


def test_design_doc_lists_every_module_and_subpackage():
    """docs/DESIGN.md's "Where things are" has one line per module or subpackage of the tree, no more."""
    text = (ROOT / "docs" / "DESIGN.md").read_text(encoding="utf-8")
    section = text.split("## Where things are", 1)[1].split("```text", 1)[1].split("```", 1)[0]
    listed = [line.split()[0] for line in section.strip().splitlines()]
    tree = sorted([p.name for p in PACKAGE.glob("*.py")] + [p.name + "/" for p in PACKAGE.iterdir()
                                                             if (p / "__init__.py").is_file()])
    assert sorted(listed) == tree
    assert len(listed) == len(set(listed))
