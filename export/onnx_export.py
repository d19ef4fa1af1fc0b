"""Checkpoint → ONNX model honouring the worker's contract, checked before it is written.

1. Rebuild the network from the checkpoint alone (its config, spec and class order).
2. Export uint8 NHWC `images` → softmax `probabilities`, normalisation inside the graph.
3. Parity: onnxruntime vs PyTorch on real validation images decoded by the worker's own path; a model
   whose probabilities differ by more than `tolerance` is refused, nothing is written.
4. Validation accuracy of the ONNX model through the worker's path (decode → resize → onnxruntime),
   stored in the model's metadata together with labels, input size, resize policy, name, version,
   training-data fingerprint and cost.
5. Optionally an int8 model (static QDQ quantisation calibrated on training images), scored and timed
   against fp32 the same way, and an fp16 model for GPUs.
6. A confusion matrix of the model the worker runs by default on the CPU (int8 when written, else fp32)
   as `confusion_matrix.png` beside the model.

`rescore` repeats steps 4 and 6 for models already written, without touching them: for checking a shipped
model's figures after a change to the worker's preprocessing.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from export.flops import count_macs
from train.model import Classifier, ExportWrapper, ModelSpec
from train.report import classification_metrics, cross_fitted_ece, plot_confusion
from worker.exceptions import DataError, ModelError
from worker.model import Model
from worker.preprocess import load_pixels

log = logging.getLogger(__name__)
MAX_PIXELS = 100_000_000
EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
FLOAT_HEAD_OPS = ("Gemm", "MatMul", "Div", "Softmax")  # left unquantised by --int8
MEASURED_AT_EXPORT = ("images_per_s", "speedup", "max_abs_diff_vs_fp32")  # figures a rescore keeps


@dataclass
class ExportConfig:
    checkpoint: str = ""
    out: str = "model.onnx"
    data: str = ""  # dataset with train/ and validation/; empty: the path recorded in the checkpoint
    name: str = ""  # model name in the metadata; empty: fashion-<arch>
    version: str = "1.0.0"
    int8: bool = False  # also write <out>.int8.onnx and compare it with fp32
    fp16: bool = False  # also write <out>.fp16.onnx (half-precision weights and activations, for GPUs)
    calibration_images: int = 300  # training images that calibrate the int8 ranges
    calibrate: bool = True  # fit a softmax temperature on validation so confidences mean what they say
    parity_images: int = 64  # validation images the parity check runs on
    tolerance: float = 1e-4  # max |p_onnx - p_torch| accepted
    opset: int = 17


def main(config: ExportConfig) -> dict:
    checkpoint = load_checkpoint(Path(config.checkpoint))
    model = rebuild(checkpoint)
    spec: ModelSpec = model.spec
    data_root = Path(config.data or checkpoint["config"]["data"])
    val_files, val_labels = list_split(data_root / "validation", checkpoint["classes"])
    out = Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    temperature = fit_temperature(model, val_files, val_labels, spec.image_size) if config.calibrate else 1.0
    exported = ExportWrapper(model, temperature).eval()
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        export_graph(exported, spec.image_size, raw, config.opset)
        parity = check_parity(exported, raw, val_files[: config.parity_images], spec.image_size, config.tolerance)
        macs = count_macs(exported, torch.zeros(1, spec.image_size, spec.image_size, 3, dtype=torch.uint8))
        params = sum(p.numel() for p in model.parameters())
        metadata = {
            "labels": json.dumps(checkpoint["classes"]),
            "input_size": json.dumps([spec.image_size, spec.image_size]),
            "resize": "squash",
            "name": config.name or f"fashion-{spec.arch}",
            "version": config.version,
            "architecture": spec.arch,
            "data_fingerprint": checkpoint["data_fingerprint"],
            "macs_per_image": str(macs),
            "parameters": str(params),
            "precision": "fp32",
            "temperature": f"{temperature:.4f}",
            "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "training": json.dumps({k: checkpoint["config"][k] for k in
                                    ("arch", "frozen_blocks", "views", "epochs", "lr", "seed")}),
        }
        write_metadata(raw, {**metadata, "val_accuracy": "pending"})
        fp32 = evaluate(Model(raw), val_files, val_labels)
        metadata["val_accuracy"] = f"{fp32['accuracy']:.4f}"
        write_metadata(raw, metadata)
        raw.replace(out)
    report = {"model": str(out), "parity_max_abs_diff": parity, "macs_per_image": macs,
              "parameters": params, "temperature": round(temperature, 4), "fp32": fp32}
    log.info("wrote %s: validation accuracy %.4f through the worker path, parity %.2e, %.2f GMACs",
             out, fp32["accuracy"], parity, macs / 1e9)

    if config.int8:
        train_files, _ = list_split(data_root / "train", checkpoint["classes"])
        int8_path = out.with_suffix(".int8.onnx")
        quantize(out, int8_path, calibration_set(train_files, config.calibration_images), spec.image_size)
        write_metadata(int8_path, {**metadata, "precision": "int8", "val_accuracy": "pending"})
        int8 = evaluate(Model(int8_path), val_files, val_labels)
        write_metadata(int8_path, {**metadata, "precision": "int8", "val_accuracy": f"{int8['accuracy']:.4f}"})
        speed = {"fp32": throughput(out), "int8": throughput(int8_path)}
        report["int8"] = {"model": str(int8_path), **int8, "images_per_s": speed}
        report["int8"]["accuracy_drop_points"] = round(100 * (fp32["accuracy"] - int8["accuracy"]), 2)
        report["int8"]["speedup"] = round(speed["int8"] / speed["fp32"], 2)
        log.info("int8: validation accuracy %.4f (fp32 %.4f), %.1f vs %.1f images/s", int8["accuracy"],
                 fp32["accuracy"], speed["int8"], speed["fp32"])

    if config.fp16:
        fp16_path = out.with_suffix(".fp16.onnx")
        half = ExportWrapper(copy.deepcopy(model).half(), temperature).eval()
        export_graph(half, spec.image_size, fp16_path, config.opset)
        write_metadata(fp16_path, {**metadata, "precision": "fp16", "val_accuracy": "pending"})
        fp16 = evaluate(Model(fp16_path), val_files, val_labels)  # on the CPU, onnxruntime casts where it must
        write_metadata(fp16_path, {**metadata, "precision": "fp16", "val_accuracy": f"{fp16['accuracy']:.4f}"})
        report["fp16"] = {"model": str(fp16_path), **fp16,
                          "accuracy_drop_points": round(100 * (fp32["accuracy"] - fp16["accuracy"]), 2),
                          "max_abs_diff_vs_fp32": onnx_difference(out, fp16_path, val_files[: config.parity_images],
                                                                  spec.image_size)}
        log.info("fp16: validation accuracy %.4f (fp32 %.4f)", fp16["accuracy"], fp32["accuracy"])
    write_confusion(out, report)
    return report


def rescore(config: ExportConfig, report: dict) -> dict:
    """Score the models already at `config.out` (and its .int8/.fp16 siblings) again through the worker's
    path; return `report` (the export report of metrics.json) with their figures replaced.

    The ONNX files are not touched, so their recorded `val_accuracy` may now differ: that is logged.
    """
    out = Path(config.out)
    if not out.is_file():
        raise ModelError(f"nothing to rescore: {out} does not exist")
    data = config.data or (load_checkpoint(Path(config.checkpoint))["config"]["data"] if config.checkpoint else "")
    if not data:
        raise DataError("--rescore needs the dataset: pass --data DIR (with validation/) or the checkpoint")
    val_files, val_labels = list_split(Path(data) / "validation", json.loads(model_metadata(out)["labels"]))
    report = {**report, "model": str(out)}
    for precision, path in (("fp32", out), ("int8", out.with_suffix(".int8.onnx")),
                            ("fp16", out.with_suffix(".fp16.onnx"))):
        if not path.is_file():
            continue
        scored_model = Model(path)
        scored = evaluate(scored_model, val_files, val_labels)
        recorded = scored_model.info.metadata.get("val_accuracy", "")
        log.info("%s: validation accuracy %.4f (recorded in the model: %s)", precision, scored["accuracy"],
                 recorded or "none")
        if recorded and recorded != f"{scored['accuracy']:.4f}":
            log.warning("%s scores %.4f now but records %s: export it again to update its metadata",
                        path, scored["accuracy"], recorded)
        kept = {k: v for k, v in report.get(precision, {}).items() if k in MEASURED_AT_EXPORT}
        report[precision] = {**kept, "model": str(path), **scored}
        if precision != "fp32" and "fp32" in report:
            report[precision]["accuracy_drop_points"] = round(
                100 * (report["fp32"]["accuracy"] - scored["accuracy"]), 2)
    write_confusion(out, report)
    return report


def write_confusion(out: Path, report: dict) -> None:
    """`confusion_matrix.png` beside `out` for the model the worker picks on a CPU: int8 if there is one."""
    precision = "int8" if "int8" in report else "fp32"
    metadata = model_metadata(out.with_suffix(".int8.onnx") if precision == "int8" else out)
    title = f"{metadata.get('name', 'model')} {metadata.get('version', '')} {precision}, validation"
    plot_confusion(out.parent / "confusion_matrix.png", report[precision], title)


def onnx_difference(first: Path, second: Path, files: list[Path], size: int) -> float:
    """Max |p_first - p_second| of two ONNX models on real images."""
    batch = pixels(files, size)
    outputs = [Model(path).probabilities(batch) for path in (first, second)]
    return round(float(np.abs(outputs[0] - outputs[1]).max()), 6)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)  # plain data: runs no code
    except Exception as exc:
        raise ModelError(f"checkpoint {path} cannot be read: {exc}") from None
    missing = [k for k in ("config", "spec", "classes", "model", "data_fingerprint") if k not in checkpoint]
    if missing:
        raise ModelError(f"{path} is not a fashion-train checkpoint (missing {', '.join(missing)})")
    return checkpoint


def rebuild(checkpoint: dict) -> Classifier:
    model = Classifier(ModelSpec(**checkpoint["spec"]), pretrained=False)
    model.load_state_dict(checkpoint["model"])
    return model.eval()


def export_graph(wrapper: ExportWrapper, size: int, path: Path, opset: int) -> None:
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapper, (example,), str(path), input_names=["images"], output_names=["probabilities"],
            dynamic_axes={"images": {0: "N"}, "probabilities": {0: "N"}}, opset_version=opset, dynamo=False,
        )
    onnx.checker.check_model(str(path))


def model_metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def write_metadata(path: Path, metadata: dict[str, str]) -> None:
    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    proto.doc_string = "fashion-worker clothing classifier: uint8 NHWC RGB images -> probabilities"
    onnx.save(proto, str(path))


def list_split(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    """(files, labels) of an ImageFolder split in the checkpoint's class order."""
    if not folder.is_dir():
        raise DataError(f"no image folder at {folder}; pass --data DIR with train/ and validation/")
    files, labels = [], []
    for index, name in enumerate(classes):
        for path in sorted((folder / name).glob("*")):
            if path.suffix.lower() in EXTENSIONS:
                files.append(path)
                labels.append(index)
    if not files:
        raise DataError(f"{folder} has no images in the checkpoint's classes {classes}")
    return files, labels


def pixels(files: list[Path], size: int) -> np.ndarray:
    return np.stack([load_pixels(f.read_bytes(), (size, size), max_pixels=MAX_PIXELS) for f in files])


@torch.inference_mode()
def check_parity(wrapper: ExportWrapper, path: Path, files: list[Path], size: int, tolerance: float) -> float:
    """Max |onnxruntime - torch| over real images; raises ModelError above `tolerance`."""
    batch = pixels(files, size)
    expected = wrapper(torch.from_numpy(batch)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (actual,) = session.run(["probabilities"], {"images": batch})
    diff = float(np.abs(actual - expected).max())
    if not diff <= tolerance:
        raise ModelError(f"ONNX and PyTorch disagree: max probability difference {diff:.2e} > {tolerance:.0e}; "
                         "model not written")
    return diff


def fit_temperature(model: Classifier, files: list[Path], labels: list[int], size: int) -> float:
    """The softmax temperature minimising validation log-loss (Guo et al. 2017, temperature scaling).

    Label smoothing trains the network to be under-confident; one scalar fitted on held-out data makes
    "confidence 0.9" mean right about 90 % of the time again. Accuracy is unchanged.
    """
    with torch.no_grad():  # not inference_mode: the logits take part in the autograd fit below
        logits = torch.cat([model(torch.from_numpy(pixels(files[i:i + 32], size)).permute(0, 3, 1, 2).float())
                            for i in range(0, len(files), 32)])
    targets = torch.tensor(labels)
    log_t = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200)

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    log.info("softmax temperature %.3f fitted on %d validation images", temperature, len(files))
    return temperature


def evaluate(model: Model, files: list[Path], labels: list[int], batch: int = 32) -> dict:
    """Accuracy, per-class figures, confusion matrix and calibration error of an ONNX model loaded by the
    worker's own loader, through the worker's preprocessing.

    With a fitted temperature in the model's metadata (not 1), also `ece_cross_fitted`: the calibration error of a
    temperature fitted, fold by fold, on other validation images than those scored (`ece` scores the
    temperature on the images it was fitted on)."""
    probs = np.concatenate([model.probabilities(pixels(files[start:start + batch], model.input_size[0]))
                            for start in range(0, len(files), batch)])
    metrics = classification_metrics(np.array(labels), probs, model.info.labels)
    temperature = float(model.info.metadata.get("temperature") or 1.0)  # 1: not calibrated (--no-calibrate)
    if temperature != 1.0 and len(labels) >= 2:  # `ece` is in-sample: the temperature was fitted on these images
        ece = round(cross_fitted_ece(np.array(labels), probs, temperature, folds=min(5, len(labels))), 4)
        at = list(metrics).index("ece") + 1  # beside `ece` in metrics.json
        metrics = dict([*list(metrics.items())[:at], ("ece_cross_fitted", ece), *list(metrics.items())[at:]])
    return metrics


def calibration_set(files: list[Path], count: int) -> list[Path]:
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(files), size=min(count, len(files)), replace=False)
    return [files[i] for i in sorted(chosen)]


def quantize(fp32: Path, int8: Path, calibration: list[Path], size: int) -> None:
    """Static QDQ int8 (per-channel weights, uint8 activations) calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([pixels(calibration[i:i + 16], size) for i in range(0, len(calibration), 16)])

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        # The classifier, temperature and softmax stay in float: quantised, the probabilities would come
        # out in steps of 1/255 and lose the calibration; they cost nothing next to the convolutions.
        graph = onnx.load(str(prepared)).graph
        head = [node.name for node in graph.node if node.op_type in FLOAT_HEAD_OPS]
        quantize_static(str(prepared), str(int8), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=head)


def throughput(path: Path, batch: int = 16, repeats: int = 5) -> float:
    """Images/s of onnxruntime on one pre-decoded batch (CPU, all cores): a quick comparison figure."""
    model = Model(path, providers=["CPUExecutionProvider"])  # the int8 speed-up is a CPU figure, GPU or not
    h, w = model.input_size
    images = np.random.default_rng(0).integers(0, 256, (batch, h, w, 3), dtype=np.uint8)
    model.probabilities(images)
    started = time.perf_counter()
    for _ in range(repeats):
        model.probabilities(images)
    return round(batch * repeats / (time.perf_counter() - started), 1)
