"""`fashion-export` / `python -m export`: checkpoint → ONNX (+ int8, fp16), with metrics.json and a confusion
matrix beside it; `--rescore` scores models already exported again."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING

from worker.exceptions import FashionWorkerError, MissingExtra

if TYPE_CHECKING:
    from export.onnx_export import ExportConfig


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in each option's help, and the epilog's line breaks kept."""


def parse_args(argv: list[str] | None = None) -> tuple[ExportConfig, bool]:
    from export.onnx_export import ExportConfig

    defaults = ExportConfig()
    parser = argparse.ArgumentParser(
        prog="fashion-export",
        description="Export a fashion-train checkpoint to the ONNX model the worker runs. The parity check "
        "(onnxruntime vs PyTorch on real images) must pass or nothing is written.",
        formatter_class=_Formatter,
        epilog="examples:\n  fashion-export runs/lite2/best.pt --out worker/models/default.onnx --int8 --fp16\n"
        "  fashion-export --rescore --out worker/models/default.onnx --data ../shared/data/clothing-dataset-small",
    )
    parser.add_argument("checkpoint", nargs="?", default="",
                        help="best.pt or last.pt written by fashion-train (optional with --rescore)")
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
    parser.add_argument("--rescore", action="store_true",
                        help="write nothing but figures: score the models already at OUT (and OUT.int8.onnx, "
                        "OUT.fp16.onnx) on validation through the worker's path again, and rewrite their "
                        "figures in metrics.json and confusion_matrix.png; the models are not touched")
    args = parser.parse_args(argv)
    if not args.checkpoint and not args.rescore:
        parser.error("the checkpoint is required (or --rescore to score models already exported)")
    for flag, value in (("--calibration-images", args.calibration_images), ("--parity-images", args.parity_images)):
        if value < 1:
            parser.error(f"{flag} must be at least 1, got {value}")
    if args.tolerance <= 0:
        parser.error(f"--tolerance must be positive, got {args.tolerance:g}")
    return ExportConfig(**{f.name: getattr(args, f.name) for f in fields(ExportConfig)}), args.rescore


def main(argv: list[str] | None = None) -> int:
    try:
        import export.onnx_export  # torch and onnx: the train extra
    except ModuleNotFoundError as exc:  # the base install: say which extra, not a traceback
        print(f"fashion-export: error: {MissingExtra('train', exc.name or str(exc))}", file=sys.stderr)
        return 2
    config, rescoring = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from export.onnx_export import main as export
    from export.onnx_export import rescore

    metrics_path = Path(config.out).parent / "metrics.json"
    try:
        if rescoring:
            payload = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
            report = rescore(config, payload.get("export", {}))
        else:
            report = export(config)
            payload = {}
            training = Path(config.checkpoint).parent / "metrics.json"
            if training.is_file():
                found = json.loads(training.read_text())
                # Exported into the run folder before: that file is an export's; its "training" is the run's.
                payload["training"] = found.get("training", {}) if "export" in found else found
    except FashionWorkerError as exc:
        print(f"fashion-export: error: {exc}", file=sys.stderr)
        return 2
    payload = {"export": report, **{k: v for k, v in payload.items() if k != "export"}}
    metrics_path.write_text(json.dumps(payload, indent=2) + "\n")
    line = f"{'scored' if rescoring else 'wrote'} {config.out}: validation accuracy {report['fp32']['accuracy']:.4f}"
    if "int8" in report:
        line += f"; int8 {report['int8']['accuracy']:.4f}"
        if "speedup" in report["int8"]:
            line += f" at {report['int8']['speedup']}x the speed"
    if "fp16" in report:
        line += f"; fp16 {report['fp16']['accuracy']:.4f}"
    print(f"{line}; metrics in {metrics_path}, confusion matrix in {metrics_path.with_name('confusion_matrix.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
