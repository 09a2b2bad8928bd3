"""onnxruntime sessions for in-memory models (no files in the working directory)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import EncodeError

from . import modelio


def make_session(model: onnx.ModelProto, *, optimize: bool = True, threads: int | None = None
                 ) -> ort.InferenceSession:
    """A CPU session for ``model``.

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
        return ort.InferenceSession(serialized, opts, providers=["CPUExecutionProvider"])
    with tempfile.TemporaryDirectory(prefix="onnx_dwdecomp_") as tmp:
        path = Path(tmp) / "model.onnx"
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def session_options(threads: int | None = None, *, optimize: bool = True, spinning: bool = False
                    ) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (None: onnxruntime's default), one
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
