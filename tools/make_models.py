"""Write the generated ShuffleNet V2 models used by the examples and benchmarks.

Usage: ``python tools/make_models.py [--out-dir models] [--num-classes 100]``

Writes ShuffleNet V2 x0.5 in its three forms (standard, merged, depthwise-only), random weights
from seed 0, 224x224 input with a dynamic batch. See ``onnx_dwdecomp.zoo`` for the architecture.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, uninstalled

from onnx_dwdecomp.zoo import shufflenet_v2  # noqa: E402

#: file stem suffix -> form
MODELS = {"standard": "standard", "merged": "merged", "dwonly": "depthwise_only"}
WIDTH = 0.5


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", type=Path, default=Path("models"),
                        help="folder to write the .onnx files into (default: models)")
    parser.add_argument("--num-classes", type=int, default=100,
                        help="classifier outputs (default: 1000)")
    args = parser.parse_args(argv)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    total = 0
    for suffix, form in MODELS.items():
        model = shufflenet_v2(WIDTH, form, num_classes=args.num_classes, seed=0,
                              image_size=224, dynamic_batch=True)
        onnx.checker.check_model(model, full_check=True)
        path = args.out_dir / f"shufflenetv2_x{WIDTH}_{suffix}.onnx"
        path.write_bytes(model.SerializeToString())
        size = path.stat().st_size
        total += size
        print(f"wrote {path}  ({size / 1e6:.2f} MB, form={form}, opset "
              f"{model.opset_import[0].version}, {len(model.graph.node)} nodes)")
    print(f"total {total / 1e6:.2f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
