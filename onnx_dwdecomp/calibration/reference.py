"""The plain pass of the input model over all calibration samples: each output's per-feature
scale (what verification measures errors against, verify.py) and each sample's output energy
(what the held-out split is spread over, holdout.split_holdout); its onnxruntime time is the
job's yardstick, one forward pass of the calibration set (report.job_cost).
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np
import onnx

from ..errors import CalibrationError, first_line
from ..runtime import make_session
from ..verify import OutputScale, ScaleAccumulator


class Reference(NamedTuple):
    scales: dict[str, OutputScale]  # per output: mean square and peak per feature over all samples
    energy: np.ndarray | None  # per sample: output power normalised per feature (None: no per-sample output)
    seconds: float  # onnxruntime's time for the pass


def reference_pass(model: onnx.ModelProto, data, batch: int, fixed: int | None) -> Reference:
    """One plain onnxruntime pass of the original model over all calibration samples.

    Gives each output's per-feature mean square ``m_f`` and peak (the scale verification
    measures errors against, verify.py) and each sample's energy ``Σ_outputs Σ_f Σ_positions
    y_f² / m_f`` along the output's first feature axis (the held-out split is spread over it,
    calibration.holdout.split_holdout); outputs whose axis 0 is not the sample axis count in
    the scales only.
    """
    session = make_session(model)
    names = [o.name for o in model.graph.output]
    scales = ScaleAccumulator()
    per_sample: dict[str, list[np.ndarray] | None] = {}
    seconds = 0.0
    for b in data.iter_batches(fixed or batch, pad_to=fixed):
        fed = len(next(iter(b.feeds.values())))
        try:
            t0 = time.perf_counter()
            values = session.run(names, b.feeds)
            seconds += time.perf_counter() - t0
        except Exception as exc:  # onnxruntime's own exception types
            raise CalibrationError(f"onnxruntime cannot run the input model on calibration batches of "
                                   f"{fixed or batch}: {first_line(exc)} (a model that only runs at batch 1 "
                                   f"needs --batch-size 1)") from exc
        for name, value in zip(names, values):
            if not isinstance(value, np.ndarray) or not value.ndim or not np.issubdtype(value.dtype, np.floating):
                continue
            sample_axis = value.shape[0] == fed
            f = np.nan_to_num(scales.add(name, value[:b.count] if sample_axis else value)[0][1],
                              nan=0.0, posinf=0.0, neginf=0.0)
            parts = per_sample.get(name, [])
            if sample_axis and parts is not None and (not parts or parts[0].shape[1] == f.shape[1]):
                per_sample.setdefault(name, []).append((f * f).reshape(b.count, -1, f.shape[1]).sum(axis=1))
            else:  # no sample axis, or the feature view changed between batches: no per-sample energy
                per_sample[name] = None
    result = scales.scales()
    energy = None
    for name, parts in per_sample.items():
        if parts and result[name][0].mean_square.shape == (parts[0].shape[1],):
            mean_square = result[name][0].mean_square
            live = mean_square > 0
            part = (np.concatenate(parts)[:, live] / mean_square[live]).sum(axis=1)
            energy = part if energy is None else energy + part
    return Reference(result, energy, seconds)
