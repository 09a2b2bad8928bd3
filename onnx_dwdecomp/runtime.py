"""onnxruntime sessions for in-memory models (no files in the working directory), on the
execution providers the job runs on.

Every session of a job (calibration segments, shape probes, the reference pass, verification)
runs on the providers given to :func:`using_providers` — the ``--providers`` list, in priority
order, default ``CPUExecutionProvider`` — so that calibration runs on the fastest backend the
user has and the model is verified where it will be deployed. Latency probes and ``bench`` take
the list explicitly (it is part of their timing-cache key). The list is a context variable:
work handed to another thread must run in a copy of the context
(``contextvars.copy_context().run``), as the calibration driver's look-ahead forward does.
"""

from __future__ import annotations

import contextlib
import difflib
import tempfile
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from . import modelio
from .errors import OptionError

#: The default execution providers: onnxruntime's CPU kernels, available in every build.
DEFAULT_PROVIDERS: tuple[str, ...] = ("CPUExecutionProvider",)
_providers: ContextVar[tuple[str, ...]] = ContextVar("onnx_dwdecomp_providers", default=DEFAULT_PROVIDERS)


def check_providers(providers: str | Sequence[str]) -> tuple[str, ...]:
    """``providers`` (a sequence of names, or one comma-separated string) as a tuple after
    checking each is an execution provider of this onnxruntime build (e.g. ``CUDAExecutionProvider``
    needs the onnxruntime-gpu wheel); else :class:`OptionError` naming the available ones."""
    names = tuple(p.strip() for p in providers.split(",")) if isinstance(providers, str) else tuple(providers)
    if not all(names):
        raise OptionError("--providers: give at least one onnxruntime execution provider name")
    available = ort.get_available_providers()
    for name in names:
        if name in available:
            continue
        if name in ort.get_all_providers():  # a real provider this build lacks
            why = f"not in this onnxruntime {ort.__version__} build (it needs the package built with it)"
        else:
            known = ort.get_all_providers()
            close = ([k for k in known if k.lower().startswith(name.lower())]
                     or difflib.get_close_matches(name, known, n=1))
            why = "not an onnxruntime execution provider" + (f" (did you mean {close[0]}?)" if close else "")
        raise OptionError(f"--providers {name}: {why}; available here: {', '.join(available)}")
    if len(set(names)) != len(names):
        raise OptionError(f"--providers {','.join(names)}: a provider is listed twice")
    return names


@contextlib.contextmanager
def using_providers(providers: Sequence[str]) -> Iterator[None]:
    """Within the block, :func:`make_session` builds sessions on ``providers`` (checked)."""
    token = _providers.set(check_providers(providers))
    try:
        yield
    finally:
        _providers.reset(token)


def current_providers() -> tuple[str, ...]:
    """The providers :func:`make_session` uses here (see :func:`using_providers`)."""
    return _providers.get()


def make_session(model: onnx.ModelProto, *, optimize: bool = True, threads: int | None = None
                 ) -> ort.InferenceSession:
    """A session for ``model`` on :func:`current_providers`.

    ``optimize=False`` turns graph optimisations off so every requested intermediate tensor
    survives. Thread-pool spinning is off: between runs this process computes with numpy, and
    spinning onnxruntime threads would take the cores from it (the moment sums ran about 3×
    slower beside them on 2 cores). Models above the protobuf limit go through a private
    temporary folder, never the working directory.
    """
    opts = session_options(threads, optimize=optimize)
    try:
        serialized = model.SerializeToString()  # one pass; ByteSize() first would cost another
    except EncodeError:  # over protobuf's 2 GiB
        serialized = None
    if serialized is not None and len(serialized) < modelio.PROTOBUF_LIMIT:
        return ort.InferenceSession(serialized, opts, providers=list(current_providers()))
    with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=list(current_providers()))


def session_options(threads: int | None = None, *, optimize: bool = True, spinning: bool = False
                    ) -> ort.SessionOptions:
    """Session options: ``threads`` intra-op threads (None: onnxruntime's default), one
    sequential inter-op thread, full graph optimisation unless ``optimize=False``, quiet logs,
    thread-pool spinning off unless asked for (see :func:`make_session`)."""
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    opts.log_severity_level = 4  # errors reach us as exceptions; ORT would also print them
    spin = "1" if spinning else "0"
    opts.add_session_config_entry("session.intra_op.allow_spinning", spin)
    opts.add_session_config_entry("session.inter_op.allow_spinning", spin)
    return opts


def run(session: ort.InferenceSession, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
        ) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))
