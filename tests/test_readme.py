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


def _own_model_blocks() -> tuple[str, list[str]]:
    """The "Your own model" example of the Quick start: its Python block and the shell commands
    that follow it."""
    own = _section("Quick start").split("**Your own model**", 1)[1]
    (code,) = re.findall(r"```python\n(.*?)```", own, flags=re.S)
    after = own.split(code, 1)[1]
    commands = re.findall(r"```bash\n(.*?)```", after, flags=re.S)[0].strip().splitlines()
    return code, commands


def _same_model_without_torch(path: Path) -> None:
    """The README's torch model written with onnx.helper (the tests never need torch)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits, nodes, cur = [], [], "x"
    for k, cin in enumerate((3, 64, 64)):
        w = rng.standard_normal((64, cin, 3, 3)).astype(np.float32) / np.sqrt(9 * cin)
        if k:  # a depthwise 3×3 merged into a 1×1, as in the README
            w = np.einsum("oi,ik->oik", rng.standard_normal((64, 64)) / 8, rng.standard_normal((64, 9)))
        inits += [numpy_helper.from_array(w.reshape(64, cin, 3, 3).astype(np.float32), f"w{k}"),
                  numpy_helper.from_array(np.zeros(64, np.float32), f"b{k}")]
        nodes.append(helper.make_node("Conv", [cur, f"w{k}", f"b{k}"], [f"c{k}"], name=f"/{2 * k}/Conv", pads=[1] * 4))
        cur = f"c{k}"
        if k < 2:
            nodes.append(helper.make_node("Relu", [cur], [f"r{k}"]))
            cur = f"r{k}"
    graph = helper.make_graph(nodes, "net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
                              [helper.make_tensor_value_info(cur, TensorProto.FLOAT, ["N", 64, "H", "W"])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    np.save(path.parent / "calib.npy", np.random.default_rng(0).random((64, 3, 64, 64), np.float32))


def test_own_model_quick_start_runs(tmp_path, monkeypatch, capsys):
    """The Quick start's "Your own model" example as written: export (torch when installed, else the same
    model built with onnx.helper), decompose with the --max-rel-error gate, bench."""
    import importlib.util
    import json
    import shlex

    from onnx_dwdecomp.cli import main

    code, commands = _own_model_blocks()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a fresh timing cache
    if importlib.util.find_spec("torch") is not None:
        exec(compile(code, "README.md (your own model)", "exec"), {})
    else:
        _same_model_without_torch(tmp_path / "my.onnx")
    assert len(commands) == 2
    for line in commands:
        argv = shlex.split(line)
        assert argv[:3] == ["python", "-m", "onnx_dwdecomp"]
        assert main(argv[3:]) == 0, line
    report = json.loads((tmp_path / "my.json").read_text())
    # what the README says of it: both inner convs rewritten, rel. error ~3e-6 (tolerance: < 1e-4)
    assert [layer["name"] for layer in report["layers"]] == ["/2/Conv", "/4/Conv"]
    assert report["verification"]["outputs"] and all(
        o["feature_rel_l2"] < 1e-4 for o in report["verification"]["outputs"].values())
    assert "my.dw.onnx" in capsys.readouterr().out  # bench's table
