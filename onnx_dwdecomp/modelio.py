"""Reading models safely and writing them atomically.

The input file is never modified. Outputs are *staged*: written completely into a private
temporary folder inside each destination folder (:func:`stage_model`, :func:`stage_text`), then
moved into place together (:func:`commit_together`) — if one cannot be moved, those already
moved are put back as they were — so a failed run leaves neither a half-written file nor a model
without its report. :func:`check_writable` tries each destination before any work. Written
files get the permissions the umask gives any new file.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.numpy_helper
from google.protobuf.message import DecodeError, EncodeError

from .errors import MAX_LINE, ModelError, OptionError, OutputError, one_line
from .graph import constant_tensors, nested_graphs, subgraph_reads, subgraphs

#: Protobuf cannot serialise a message above 2 GiB; larger models need external data.
PROTOBUF_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class LoadedModel:
    """A model held in memory together with where it came from."""

    model: onnx.ModelProto
    path: Path | None
    used_external_data: bool
    file_size: int | None
    seconds: float = 0.0  # time taken to read and check it
    external_files: tuple[Path, ...] = ()  # the files its external data was read from
    #: What loading changed or noticed, one sentence each, for the job's report (e.g. the
    #: nodes were put in topological order). The pipeline adds them to the report's notes.
    notes: tuple[str, ...] = ()


def _uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in constant_tensors(model.graph))


def load_model(source: str | os.PathLike | onnx.ModelProto) -> LoadedModel:
    """Load an ONNX model (with its external data) from a path, or wrap a ``ModelProto``.

    A ``ModelProto`` passed in is copied, so later stages can never mutate the caller's object.

    Raises
    ------
    ModelError
        Missing, empty or unreadable file; not an ONNX model; missing external data.
    """
    start = time.perf_counter()
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_is_model(model, "<ModelProto>")
        notes = _sort_notes(model)
        _check_valid(model, "<ModelProto>")
        return LoadedModel(model, None, _uses_external_data(model), None, time.perf_counter() - start,
                           notes=notes)

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
    files = tuple(sorted({(path.parent / entry.value).resolve() for t in constant_tensors(model.graph)
                          if t.data_location == onnx.TensorProto.EXTERNAL
                          for entry in t.external_data if entry.key == "location"}))
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
        except (OSError, ValueError, onnx.checker.ValidationError) as exc:
            raise ModelError(f"cannot read the external data of {path}: {str(exc).splitlines()[0]}") from exc
    notes = _sort_notes(model)
    _check_valid(model, str(path))
    return LoadedModel(model, path, external, size, time.perf_counter() - start, files, notes)


def toposort_graph(graph: onnx.GraphProto) -> int:
    """Put the nodes of ``graph`` and of every graph nested in it in topological order (in
    place); return how many nodes changed position.

    ONNX requires each node to come after the producers of its inputs, but onnxruntime runs
    graphs that break the rule, and some exporters write such graphs. The sort is a stable
    Kahn sort: of the nodes whose inputs are ready, the one that came first in the file goes
    first, so a sorted graph keeps its order and an unsorted one moves as few nodes as it can.
    A node holding subgraphs (``If``, ``Loop``, ``Scan``) also waits for the values they read
    from the enclosing graph. Names no node produces (graph inputs, initializers, outer-scope
    values, undefined names) add no constraint. A graph with a cycle is left as it is (the
    checker then reports it). Nothing else changes: initializers, value_info, names,
    attributes and the graph's inputs and outputs stay as they are.
    """
    moved = 0
    for sub in (sub for node in graph.node for sub in subgraphs(node)):
        moved += toposort_graph(sub)
    nodes = list(graph.node)
    producer: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for out in node.output:
            if out:
                producer.setdefault(out, i)
    users: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        deps = {producer[name] for name in set(node.input) | subgraph_reads(node) if name in producer}
        deps.discard(i)
        waiting[i] = len(deps)
        for j in deps:
            users[j].append(i)
    ready = [i for i, n in enumerate(waiting) if n == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for k in users[i]:
            waiting[k] -= 1
            if waiting[k] == 0:
                heapq.heappush(ready, k)
    if len(order) < len(nodes) or order == list(range(len(nodes))):
        return moved  # a cycle (reported by the checker), or already sorted
    rank = {i: r for r, i in enumerate(order)}
    position = {id(node): rank[i] for i, node in enumerate(nodes)}
    try:  # in place, no copies (a Constant node may hold a large tensor)
        graph.node.sort(key=lambda node: position[id(node)])
    except KeyError:  # a protobuf build whose element objects are not kept: rebuild the list
        copies = [onnx.NodeProto() for _ in order]
        for copy, i in zip(copies, order, strict=True):
            copy.CopyFrom(nodes[i])
        del graph.node[:]
        graph.node.extend(copies)
    return moved + sum(1 for r, i in enumerate(order) if r != i)


def _sort_notes(model: onnx.ModelProto) -> tuple[str, ...]:
    """Sort ``model``'s nodes (in place, :func:`toposort_graph`); the note saying so, if any."""
    total = sum(len(g.node) for g in nested_graphs(model.graph))
    moved = toposort_graph(model.graph)
    if not moved:
        return ()
    return (f"the model's nodes were not in topological order (ONNX requires it, onnxruntime does not); "
            f"sorted them: {moved} of {total} node(s) moved, nothing else changed (the input file is "
            f"untouched)",)


def model_byte_size(model: onnx.ModelProto) -> int:
    """Serialized size of ``model`` in bytes; above 2 GiB, where protobuf's ``ByteSize()``
    raises, the sum of the tensors' sizes plus the rest of the graph (exact to a few bytes
    of framing per tensor)."""
    try:
        return model.ByteSize()
    except EncodeError:
        pass
    return _byte_size_by_parts(model)


def _byte_size_by_parts(model: onnx.ModelProto) -> int:
    tensors = sum(_tensor_byte_size(t) for t in constant_tensors(model.graph))
    skeleton = metadata_copy(model, min_bytes=0, force=True)
    return tensors + skeleton.ByteSize()


def _tensor_byte_size(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):  # a single tensor may be over 2 GiB itself
        return len(tensor.raw_data) + 16
    try:
        return tensor.ByteSize()
    except EncodeError:
        return PROTOBUF_LIMIT


def metadata_copy(model: onnx.ModelProto, min_bytes: int = 1024, *, force: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` for shape inference or checking, serialisable even above 2 GiB.

    Under :data:`PROTOBUF_LIMIT` it is a plain copy. Above it, every tensor of at least
    ``min_bytes`` keeps its name, dtype and dims but loses its data: it is marked as external
    data at a location that does not exist, which shape inference never reads.
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    if not force and model_byte_size(model) < PROTOBUF_LIMIT:
        return copy
    for tensor in constant_tensors(copy.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL and _tensor_byte_size(tensor) >= min_bytes:
            dims, dtype, name = list(tensor.dims), tensor.data_type, tensor.name
            tensor.Clear()
            tensor.name, tensor.data_type = name, dtype
            tensor.dims.extend(dims)
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="stripped-over-protobuf-limit")
    return copy


def without_large_data(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, bytes]]:
    """``(light, stash)``: ``model`` with the raw data of main-graph initializers of at least
    ``PROTOBUF_LIMIT / 2`` bytes moved into ``stash`` (name → bytes), for graph surgery.

    onnx-graphsurgeon and repeated-field copies serialise each tensor, which protobuf refuses
    above 2 GiB; stubs (as in :func:`metadata_copy`) pass through untouched. Returns ``model``
    itself and an empty stash when nothing is that large. Undo with :func:`restore_large_data`.
    """
    threshold = PROTOBUF_LIMIT // 2
    if not any(t.HasField("raw_data") and len(t.raw_data) >= threshold for t in model.graph.initializer):
        return model, {}
    light = onnx.ModelProto()
    light.CopyFrom(model)
    stash: dict[str, bytes] = {}
    for tensor in light.graph.initializer:
        if tensor.HasField("raw_data") and len(tensor.raw_data) >= threshold:
            stash[tensor.name] = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.external_data.add(key="location", value="stripped-over-protobuf-limit")
    return light, stash


def restore_large_data(model: onnx.ModelProto, stash: dict[str, bytes]) -> onnx.ModelProto:
    """Put the data :func:`without_large_data` took back into ``model``'s stubs (in place)."""
    for tensor in model.graph.initializer:
        if tensor.name in stash and tensor.data_location == onnx.TensorProto.EXTERNAL:
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            tensor.raw_data = stash[tensor.name]
    return model


def _check_is_model(model: onnx.ModelProto, where: str) -> None:
    # Random bytes can parse as a protobuf with only unknown fields: demand the parts a model has.
    if not model.opset_import or not model.HasField("graph") or len(model.graph.node) == 0:
        raise ModelError(f"{where} is not an ONNX model (no graph, nodes or opset import)")
    try:
        _text(model.producer_name, model.producer_version, model.domain, model.doc_string,
              *[o.domain for o in model.opset_import])
        for prop in model.metadata_props:
            _text(prop.key, prop.value)
        _touch_strings(model.graph)
    except UnicodeDecodeError:
        raise ModelError(f"{where} holds names that are not valid UTF-8 text; the file is corrupt") from None


def _check_opsets(model: onnx.ModelProto, where: str) -> None:
    """The default-domain opset must be one this onnx knows (onnxruntime's own limit shows
    when a session is made)."""
    known = onnx.defs.onnx_opset_version()
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx") and not 1 <= imp.version <= known:
            raise ModelError(f"{where} imports opset {imp.version} of the default ONNX domain; this onnx "
                             f"{onnx.__version__} knows opsets 1 to {known} (convert the model, e.g. "
                             f"onnx.version_converter, or upgrade onnx and onnxruntime)")


def _check_valid(model: onnx.ModelProto, where: str) -> None:
    # The rewritten model must pass the full checker; an input that does not is reported here,
    # as the input's problem, rather than as a failure of the rewrite later on.
    _check_opsets(model, where)
    try:
        if model_byte_size(model) < PROTOBUF_LIMIT:
            onnx.checker.check_model(model, full_check=True)
        else:  # the checker cannot take it; strict shape inference on a copy without weights
            onnx.shape_inference.infer_shapes(metadata_copy(model), strict_mode=True)
    except Exception as exc:  # ValidationError, InferenceError and others on corrupt input
        prefix = f"{where} fails the ONNX checker: "
        raise ModelError(prefix + whole_sentences(str(exc), MAX_LINE - len(prefix))) from exc


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_CLAUSE_END = re.compile(r"(?<=[,;:])\s+")


def whole_sentences(text: str, limit: int) -> str:
    """``text`` on one line (:func:`errors.one_line`), at most ``limit`` characters, cut only
    where a sentence ends: as many whole sentences as fit, then `` …`` when some were left
    out. When even the first sentence does not fit, it is cut after its last clause (``,``
    ``;`` ``:``) that fits, and failing that at a word; the result never ends mid-word.
    (The checker's messages run over several lines — "…, however input 'x' of node:",
    the node, "is not output of any previous nodes." — so their first line alone is half a
    sentence.)"""
    text = one_line(text, limit=10**9) or "(no message)"
    limit = max(limit, 40)
    if len(text) <= limit:
        return text
    room = limit - 2  # for " …"
    kept = ""
    for m in _SENTENCE_END.finditer(text):
        if m.start() > room:
            break
        kept = text[:m.start()]
    if not kept:
        cuts = [m.start() for m in _CLAUSE_END.finditer(text) if m.start() <= room] or \
               [m.start() for m in re.finditer(r"\s+", text) if m.start() <= room] or [room]
        kept = text[:cuts[-1]]
    return kept.rstrip() + " …"


def sync_initializer_inputs(model: onnx.ModelProto, reference: onnx.ModelProto) -> onnx.ModelProto:
    """Before IR version 4 every initializer must also be a graph input. For such a model (in
    place, returned): add a graph input for each initializer that lacks one and drop the graph
    inputs that stood for initializers no longer there; the real inputs of ``reference`` (the
    model before the rewrite) keep their place. A no-op from IR 4 on."""
    if model.ir_version >= 4:
        return model
    inits = {t.name: t for t in model.graph.initializer}
    ref_inits = {t.name for t in reference.graph.initializer}
    real = {vi.name for vi in reference.graph.input if vi.name not in ref_inits}
    keep = [vi for vi in model.graph.input if vi.name in real or vi.name in inits]
    listed = {vi.name for vi in keep}
    for name, t in inits.items():
        if name not in listed:
            keep.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    if [vi.name for vi in keep] != [vi.name for vi in model.graph.input]:
        copies = [onnx.ValueInfoProto() for _ in keep]
        for c, vi in zip(copies, keep, strict=True):
            c.CopyFrom(vi)
        del model.graph.input[:]
        model.graph.input.extend(copies)
    return model


def _text(*values) -> None:
    for v in values:
        if not isinstance(v, str):
            raise UnicodeDecodeError("utf-8", b"", 0, 1, "not text")


def _touch_strings(graph: onnx.GraphProto) -> None:
    """Read every name of ``graph`` and its subgraphs (protobuf decodes text lazily; corrupt
    bytes fail here)."""
    for g in nested_graphs(graph):
        _text(g.name, g.doc_string)
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            _text(vi.name, vi.doc_string)
        for t in g.initializer:
            _text(t.name)
        for node in g.node:
            _text(node.name, node.op_type, node.domain, node.doc_string, *node.input, *node.output)
            for attr in node.attribute:
                _text(attr.name)
                if attr.type == onnx.AttributeProto.STRING:
                    attr.s.decode()
                elif attr.type == onnx.AttributeProto.STRINGS:
                    for v in attr.strings:
                        v.decode()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _move_to_external_data(model: onnx.ModelProto, data_path: Path, location: str,
                           threshold: int = 1024) -> bool:
    """Write every tensor of at least ``threshold`` bytes to ``data_path`` (64-byte aligned) and
    point the model at ``location`` (relative to the model file). False (and no file) when no
    tensor is that large."""
    from onnx.external_data_helper import set_external_data

    with open(data_path, "wb") as fh:
        for tensor in constant_tensors(model.graph):
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
    if data_path.stat().st_size == 0:
        data_path.unlink()
        return False
    return True


def default_output_path(input_path: Path) -> Path:
    """``model.onnx`` → ``model.dw.onnx`` beside the input."""
    return input_path.with_name(input_path.stem + ".dw.onnx")


def check_writable(path: Path, flag: str) -> None:
    """:class:`OutputError` unless a file can be created at ``path``: its folder exists and
    takes a new file (one is created and removed), and ``path`` is not a folder."""
    folder = path.parent
    if not folder.is_dir():
        raise OutputError(f"{flag} {path}: folder {folder} does not exist")
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a directory, expected a file path")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot create files in {folder}: {exc.strerror or exc}") from None


class Staged:
    """Files written completely into a private temporary folder inside their destination
    folder; :meth:`commit` moves them into place (and moves ``obsolete`` files out of the way),
    :meth:`rollback` undoes a commit (puts back what it replaced or removed), :meth:`discard`
    removes what is left of the temporary folder."""

    def __init__(self, tmp_dir: Path, files: list[tuple[Path, Path]], obsolete: tuple[Path, ...] = ()):
        self.tmp_dir = tmp_dir
        self.files = files  # (staged, destination)
        self.obsolete = obsolete  # e.g. an old OUTPUT.data the new OUTPUT no longer reads
        self._done: list[tuple[Path, Path | None]] = []  # (destination, backup of what it replaced)

    @property
    def destination(self) -> Path:
        return self.files[0][1]

    def commit(self) -> None:
        for k, (staged, dest) in enumerate(self.files):
            backup = None
            if dest.exists() and not dest.is_dir():
                backup = self.tmp_dir / f".backup{k}"
                try:
                    os.link(dest, backup)
                except OSError:  # no hard links here: a copy keeps the rollback able to restore it
                    shutil.copy2(dest, backup)
            os.replace(staged, dest)
            self._done.append((dest, backup))
        for k, path in enumerate(self.obsolete):
            if path.is_file():
                backup = self.tmp_dir / f".obsolete{k}"
                os.replace(path, backup)
                self._done.append((path, backup))

    def rollback(self) -> None:
        for dest, backup in reversed(self._done):
            try:
                if backup is not None:
                    os.replace(backup, dest)
                else:
                    dest.unlink()
            except OSError:
                pass
        self._done = []

    def discard(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


@contextlib.contextmanager
def _staging(dest: Path, flag: str) -> Iterator[Path]:
    """A private temporary folder beside ``dest`` to write into; removed when the writing fails
    (an OSError becomes an :class:`OutputError` naming ``dest``)."""
    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise OutputError(f"{flag} {dest}: cannot create files in {dest.parent}: {exc.strerror or exc}") from None
    try:
        yield tmp_dir
    except OSError as exc:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise


def stage_model(model: onnx.ModelProto, out_path: str | os.PathLike, *, external_data: bool,
                input_path: Path | None = None, flag: str = "output") -> Staged:
    """Write ``model`` (and ``<out name>.data`` with ``external_data``, or when the model would
    exceed the 2 GiB protobuf limit) into a temporary folder beside ``out_path``."""
    out = Path(out_path)
    if input_path is not None and out.resolve() == input_path.resolve():
        raise OptionError(f"output path {out} is the input file; choose another output path")
    check_writable(out, flag)
    if not external_data and model_byte_size(model) > PROTOBUF_LIMIT:
        external_data = True
    with _staging(out, flag) as tmp_dir:
        tmp_model = tmp_dir / out.name
        data_name = out.name + ".data"
        files = []
        if external_data:
            copy = onnx.ModelProto()
            copy.CopyFrom(model)
            if _move_to_external_data(copy, tmp_dir / data_name, data_name):
                files.append((tmp_dir / data_name, out.parent / data_name))
            onnx.save_model(copy, str(tmp_model))
        else:
            onnx.save_model(model, str(tmp_model))
        files.insert(0, (tmp_model, out))
        _follow_umask([f for f, _ in files])
    stale = out.parent / data_name
    obsolete = (stale,) if len(files) == 1 and stale.is_file() and _reads_external(out, data_name) else ()
    return Staged(tmp_dir, files, obsolete)


def _reads_external(model_path: Path, location: str) -> bool:
    """Does the model file at ``model_path`` (if any) keep tensors in ``location``."""
    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # missing, not a model: it reads nothing we would remove
        return False
    return any(entry.key == "location" and entry.value == location
               for t in constant_tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
               for entry in t.external_data)


def stage_text(path: str | os.PathLike, text: str | bytes, *, flag: str = "--report", mode: int | None = None
               ) -> Staged:
    """Write ``text`` (UTF-8; bytes as they are) into a temporary folder beside ``path`` (see
    :class:`Staged`), with file mode ``mode`` (default: 0666 less the umask)."""
    path = Path(path)
    check_writable(path, flag)
    with _staging(path, flag) as tmp_dir:
        tmp = tmp_dir / path.name
        with (open(tmp, "wb") if isinstance(text, bytes) else open(tmp, "w", encoding="utf-8")) as fh:
            fh.write(text)
        _follow_umask([tmp], mode)
    return Staged(tmp_dir, [(tmp, path)])


def _follow_umask(paths: list[Path], mode: int | None = None) -> None:
    mode = 0o666 & ~_umask() if mode is None else mode
    for p in paths:
        os.chmod(p, mode)


def commit_together(staged: list[Staged]) -> None:
    """Move every staged file into place, or none: when one cannot be moved, the ones already
    moved are put back (what they replaced restored) and an :class:`OutputError` is raised.
    The temporary folders are removed either way."""
    done: list[Staged] = []
    try:
        for s in staged:
            done.append(s)
            s.commit()
    except OSError as exc:
        for s in reversed(done):
            s.rollback()
        raise OutputError(f"cannot write {done[-1].destination}: {exc.strerror or exc}; nothing written") from None
    except BaseException:
        for s in reversed(done):
            s.rollback()
        raise
    finally:
        for s in staged:
            s.discard()


def write_text_atomic(path: str | os.PathLike, text: str, *, flag: str = "--report",
                      mode: int | None = None) -> None:
    """Write ``text`` to ``path`` atomically (:func:`stage_text` + :func:`commit_together`);
    the one way this package writes a text file (JSON reports, bench results, the timing cache)."""
    commit_together([stage_text(path, text, flag=flag, mode=mode)])


def save_model_atomic(model: onnx.ModelProto, out_path: str | os.PathLike, *,
                      external_data: bool, input_path: Path | None = None) -> Path:
    """Write ``model`` to ``out_path`` atomically (:func:`stage_model` + :func:`commit_together`);
    return the path written.

    With ``external_data`` (or when the model would exceed the 2 GiB protobuf limit) the
    weights go to ``<out name>.data`` beside the model.
    """
    staged = stage_model(model, out_path, external_data=external_data, input_path=input_path)
    commit_together([staged])
    return staged.destination
