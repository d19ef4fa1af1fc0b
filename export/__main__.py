"""`fashion-export` / `python -m export`: checkpoint → ONNX (+ int8), with a metrics.json beside it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path

from worker.exceptions import FashionWorkerError


def parse_args(argv: list[str] | None = None):
    from export.onnx_export import ExportConfig

    defaults = ExportConfig()
    parser = argparse.ArgumentParser(
        prog="fashion-export",
        description="Export a fashion-train checkpoint to the ONNX model the worker runs. The parity check "
        "(onnxruntime vs PyTorch on real images) must pass or nothing is written.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="example: fashion-export runs/lite2/best.pt --out worker/models/default.onnx --int8",
    )
    parser.add_argument("checkpoint", help="best.pt or last.pt written by fashion-train")
    parser.add_argument("--out", default=defaults.out, help="ONNX file to write; metrics.json goes beside it")
    parser.add_argument("--data", default=defaults.data,
                        help="dataset folder with train/ and validation/; empty = the one used for training")
    parser.add_argument("--name", default=defaults.name, help="model name in the metadata; empty = fashion-<arch>")
    parser.add_argument("--version", default=defaults.version, help="model version in the metadata")
    parser.add_argument("--int8", action="store_true", help="also write OUT.int8.onnx (static quantisation)")
    parser.add_argument("--fp16", action="store_true",
                        help="also write OUT.fp16.onnx (half precision, for GPUs) and score it")
    parser.add_argument("--calibration-images", type=int, default=defaults.calibration_images,
                        help="training images that calibrate int8 activation ranges")
    parser.add_argument("--parity-images", type=int, default=defaults.parity_images,
                        help="validation images the parity check runs on")
    parser.add_argument("--tolerance", type=float, default=defaults.tolerance,
                        help="largest accepted |p_onnx - p_torch|")
    parser.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                        help="keep the softmax temperature at 1 instead of fitting it on validation")
    parser.add_argument("--opset", type=int, default=defaults.opset, help="ONNX opset")
    args = parser.parse_args(argv)
    return ExportConfig(**{f.name: getattr(args, f.name) for f in fields(ExportConfig)})


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from export.onnx_export import main as export

    try:
        report = export(config)
    except FashionWorkerError as exc:
        print(f"fashion-export: error: {exc}", file=sys.stderr)
        return 2
    metrics_path = Path(config.out).parent / "metrics.json"
    training = Path(config.checkpoint).parent / "metrics.json"
    payload = {"export": report}
    if training.is_file():
        payload["training"] = json.loads(training.read_text())
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")
    line = f"wrote {config.out}: validation accuracy {report['fp32']['accuracy']:.4f}"
    if "int8" in report:
        line += f"; int8 {report['int8']['accuracy']:.4f} at {report['int8']['speedup']}x the speed"
    if "fp16" in report:
        line += f"; fp16 {report['fp16']['accuracy']:.4f}"
    print(f"{line}; metrics in {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
