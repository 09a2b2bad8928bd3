"""Time the data-driven job against one plain onnxruntime pass (issue 3's speed and memory target).

Builds the merged regular ShuffleNet V2 (random weights, ``onnx_dwdecomp.zoo``) at 224×224,
feeds seeded random calibration images, decomposes every regular conv except the stem with
``--method gsvd`` and prints the phase timings, the ratio ``total / reference_forward`` and
the peak resident memory of the process.

    python tools/bench_decompose.py --width 1.0 --images 128
    python tools/bench_decompose.py --width 1.0 --images 512     # memory check

Random inputs have different statistics from photos, but the work done (forward passes,
moment sums, solves) depends only on shapes, so the timings carry over.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import numpy as np

from onnx_dwdecomp import decompose, zoo


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--method", default="gsvd")
    parser.add_argument("--multiplier", type=int, default=1)
    parser.add_argument("--json", help="also write the timings here")
    args = parser.parse_args(argv)

    model = zoo.shufflenet_v2(args.width, "merged", image_size=args.image_size)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.images, 3, args.image_size, args.image_size), dtype=np.float32)
    start = time.perf_counter()
    _, report = decompose(model, calib=images, method=args.method, multiplier=args.multiplier,
                          exclude=("conv1.*",),
                          progress=lambda msg: print(f"  {time.perf_counter() - start:7.1f}s {msg}",
                                                     file=sys.stderr))
    timing = dict(report.timing_s)
    timing.update({f"calibration.{k}": v for k, v in report.calibration["timing_s"].items()})
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {
        "width": args.width, "images": args.images, "method": args.method, "multiplier": args.multiplier,
        "layers": len(report.layers), "timing_s": {k: round(v, 2) for k, v in timing.items()},
        "total_over_reference_forward": round(timing["total"] / timing["reference_forward"], 2),
        "peak_rss_mb": round(peak_mb), "spilled_mb": round(report.calibration["spilled_bytes"] / 2**20),
        "mean_iterations": float(np.mean([layer.iterations for layer in report.layers])),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
