"""Reading models safely and writing them atomically.

The input file is never modified. The output is written into a temporary folder beside the
destination and moved into place only when complete, so an interrupted or failed run leaves no
half-written model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError

from .errors import ModelError, OptionError

#: Protobuf cannot serialise a message above 2 GiB; larger models need external data.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class LoadedModel:
    """A model held in memory together with where it came from."""

    model: onnx.ModelProto
    path: Path | None
    used_external_data: bool
    file_size: int | None


def iter_graph_tensors(graph: onnx.GraphProto):
    """Yield every constant tensor of ``graph`` and its subgraphs (initializers, Constant values)."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from iter_graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from iter_graph_tensors(sub)


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in iter_graph_tensors(model.graph))


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load an ONNX model (with its external data) from a path, or wrap a ``ModelProto``.

    A ``ModelProto`` passed in is copied, so later stages can never mutate the caller's object.

    Raises
    ------
    ModelError
        Missing, empty or unreadable file; not an ONNX model; missing external data.
    """
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_is_model(model, "<ModelProto>")
        return LoadedModel(model, None, _uses_external_data(model), None)

    path = Path(source)
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a directory, expected an .onnx file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"model file is empty: {path}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise ModelError(f"cannot parse {path} as an ONNX model (truncated or not ONNX): {exc}") from exc
    _check_is_model(model, str(path))
    external = _uses_external_data(model)
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(f"cannot read the external data of {path}: {str(exc).splitlines()[0]}") from exc
    return LoadedModel(model, path, external, size)


def _check_is_model(model: onnx.ModelProto, where: str) -> None:
    # Random bytes can parse as a protobuf with only unknown fields: demand the parts a model has.
    if not model.opset_import or not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{where} is not an ONNX model (no graph, nodes or opset import)")


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _move_to_external_data(model: onnx.ModelProto, data_path: Path, location: str,
                           threshold: int = 1024) -> None:
    """Write every tensor of at least ``threshold`` bytes to ``data_path`` (64-byte aligned) and
    point the model at ``location`` (relative to the model file)."""
    from onnx.external_data_helper import set_external_data

    with open(data_path, "wb") as fh:
        for tensor in iter_graph_tensors(model.graph):
            if not tensor.HasField("raw_data"):
                if tensor.data_location == onnx.TensorProto.EXTERNAL:
                    raise ModelError(f"tensor {tensor.name!r} still refers to external data")
                value = onnx.numpy_helper.to_array(tensor)
                if value.nbytes < threshold or value.dtype == object:
                    continue
                tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
            if len(tensor.raw_data) < threshold:
                continue
            offset = -(-fh.tell() // 64) * 64
            fh.seek(offset)
            fh.write(tensor.raw_data)
            set_external_data(tensor, location, offset, len(tensor.raw_data))
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL


def default_output_path(input_path: Path) -> Path:
    """``model.onnx`` → ``model.dw.onnx`` beside the input."""
    return input_path.with_name(input_path.stem + ".dw.onnx")


def save_model_atomic(model: onnx.ModelProto, out_path: str | os.PathLike, *,
                      external_data: bool, input_path: Path | None = None) -> Path:
    """Write ``model`` to ``out_path`` atomically; return the path written.

    With ``external_data`` (or when the model would exceed the 2 GiB protobuf limit) the
    weights go to ``<out name>.data`` beside the model. Both files are first written into a
    temporary folder inside the destination folder and renamed into place at the end.
    """
    out = Path(out_path)
    if input_path is not None and out.resolve() == input_path.resolve():
        raise OptionError(f"output path {out} is the input file; choose another with -o")
    if not out.parent.exists():
        raise OptionError(f"output folder does not exist: {out.parent}")
    if out.is_dir():
        raise OptionError(f"output path is a directory: {out}")
    if not external_data and model.ByteSize() > PROTOBUF_LIMIT:
        external_data = True

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tmp_model = tmp_dir / out.name
        data_name = out.name + ".data"
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            _move_to_external_data(copy, tmp_dir / data_name, data_name)
            onnx.save_model(copy, str(tmp_model))
            os.replace(tmp_dir / data_name, out.parent / data_name)
        else:
            onnx.save_model(model, str(tmp_model))
        mode = 0o666 & ~_umask()
        os.chmod(tmp_model, mode)
        if external_data and (out.parent / data_name).exists():
            os.chmod(out.parent / data_name, mode)
        os.replace(tmp_model, out)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out
