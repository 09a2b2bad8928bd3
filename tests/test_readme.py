"""README.md: the Python API example runs as written (from a scratch folder, with the repo's
models), and the two commands at the top are the install/run line and the test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def test_python_api_example_runs(tmp_path, monkeypatch, capsys):
    (code,) = re.findall(r"```python\n(.*?)```", _section("Python API"), flags=re.S)
    code = code.replace('"models/', f'"{ROOT}/models/')
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    assert "conv" in capsys.readouterr().out  # the printed report lists the rewritten convs
    assert (tmp_path / "mnist.dw.onnx").stat().st_size > 0


def test_the_first_block_is_install_and_run_then_the_test_command():
    first = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1).strip().splitlines()
    assert first[0].startswith("pip install -e '.[test]' && python -m onnx_dwdecomp models/")
    assert first[1] == "python -m pytest -q"
