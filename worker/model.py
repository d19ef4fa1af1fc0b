"""The ONNX model: load it, check it honours the contract, run batches with onnxruntime.

The contract (written by `fashion-export`, relied on here):
- input `images`: uint8 [N, H, W, 3] RGB, N dynamic; normalisation happens inside the graph;
- output `probabilities`: float32 [N, num_classes], softmax inside the graph;
- metadata_props: `labels` (JSON list in output order), `input_size` (JSON [H, W]), `resize` (a policy
  of worker.preprocess, e.g. "squash"), `name`, `version`, `val_accuracy`, `data_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from worker.exceptions import ModelError
from worker.preprocess import RESIZE_POLICIES

log = logging.getLogger(__name__)

MODELS_DIR = Path(__file__).parent / "models"
# The shipped model, three precisions of one network with the same validation accuracy (0.9267, see
# worker/models/metrics.json): int8 on the CPU (about twice the speed of fp32), fp16 on CUDA/TensorRT
# (where int8 QDQ graphs gain nothing and half precision is native), fp32 as the reference.
DEFAULT_MODEL = MODELS_DIR / "default.int8.onnx"
DEFAULT_MODEL_GPU = MODELS_DIR / "default.fp16.onnx"
DEFAULT_MODEL_FP32 = MODELS_DIR / "default.onnx"
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
REQUIRED_METADATA = ("labels", "input_size", "resize", "name", "version")
AUTO_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


@dataclass(frozen=True)
class ModelInfo:
    path: Path
    model_id: str  # sha256 of the model file
    name: str
    version: str
    labels: list[str]
    input_size: tuple[int, int]  # (H, W)
    resize: str
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Prediction:
    category: str
    confidence: float
    top3: list[tuple[str, float]]


def model_file(path: Path | None, providers: list[str] | None = None) -> Path:
    """The configured model, or the default shipped in the package for these execution providers."""
    if path:
        return Path(path)
    if providers and any(p in GPU_PROVIDERS for p in providers):
        return DEFAULT_MODEL_GPU
    return DEFAULT_MODEL


def read_contract(session: ort.InferenceSession, path: Path, model_id: str) -> ModelInfo:
    """Check inputs, outputs and metadata against the contract; raise ModelError naming what is off."""
    where = f"model {path}"
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ModelError(f"{where} has inputs {[i.name for i in inputs]}; the contract needs one named 'images'")
    if OUTPUT_NAME not in [o.name for o in outputs]:
        raise ModelError(f"{where} has outputs {[o.name for o in outputs]}; the contract needs 'probabilities'")
    image_input = inputs[0]
    if image_input.type != "tensor(uint8)" or len(image_input.shape) != 4 or image_input.shape[3] != 3:
        raise ModelError(
            f"{where}: input 'images' is {image_input.type} {image_input.shape}; "
            "the contract needs tensor(uint8) [N, H, W, 3]"
        )
    meta = dict(session.get_modelmeta().custom_metadata_map)
    missing = [key for key in REQUIRED_METADATA if key not in meta]
    if missing:
        raise ModelError(f"{where} lacks metadata {', '.join(missing)} (needs {', '.join(REQUIRED_METADATA)})")
    try:
        labels = json.loads(meta["labels"])
        height, width = (int(v) for v in json.loads(meta["input_size"]))
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{where}: metadata labels/input_size are not valid JSON lists: {exc}") from None
    if not labels or not all(isinstance(label, str) for label in labels):
        raise ModelError(f"{where}: metadata 'labels' must be a non-empty JSON list of strings")
    if meta["resize"] not in RESIZE_POLICIES:
        raise ModelError(
            f"{where}: resize policy {meta['resize']!r} is not supported; supported: {', '.join(RESIZE_POLICIES)}"
        )
    fixed = [image_input.shape[1], image_input.shape[2]]
    if all(isinstance(v, int) for v in fixed) and fixed != [height, width]:
        raise ModelError(f"{where}: input is {fixed[0]}x{fixed[1]} but metadata input_size says {height}x{width}")
    output = next(o for o in outputs if o.name == OUTPUT_NAME)
    if len(output.shape) != 2 or (isinstance(output.shape[1], int) and output.shape[1] != len(labels)):
        raise ModelError(f"{where}: output 'probabilities' is {output.shape}, expected [N, {len(labels)}]")
    return ModelInfo(path, model_id, meta["name"], meta["version"], labels, (height, width), meta["resize"], meta)


def choose_providers(requested: list[str]) -> list[str]:
    """Resolve ["auto"] to the best available providers; check explicit ones exist."""
    available = ort.get_available_providers()
    if requested in ([], ["auto"]):
        return [p for p in AUTO_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    unknown = [p for p in requested if p not in available]
    if unknown:
        raise ModelError(f"execution provider(s) {', '.join(unknown)} not available; available: {', '.join(available)}")
    return list(requested)


class Model:
    """An onnxruntime session over a contract-checked model."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        inter_op_threads: int = 1,
        spin_wait: bool = True,
        optimized_cache: Path | None = None,
    ) -> None:
        chosen = choose_providers(providers or ["auto"])
        path = model_file(path, chosen)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ModelError(f"model file {path} does not exist") from None
        except OSError as exc:
            raise ModelError(f"cannot read model file {path}: {exc.strerror}") from None
        model_id = hashlib.sha256(data).hexdigest()
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = inter_op_threads
        # Spinning threads answer the next batch a little sooner but burn cores that decoding needs.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin_wait else "0")
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if optimized_cache is not None:
            optimized_cache.parent.mkdir(parents=True, exist_ok=True)
            options.optimized_model_filepath = str(optimized_cache)
        try:
            self.session = ort.InferenceSession(data, options, providers=chosen)
        except Exception as exc:  # onnxruntime raises its own classes for every kind of bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"model file {path} cannot be loaded: {first}") from None
        self.info = read_contract(self.session, path, model_id)
        self.providers = self.session.get_providers()
        log.info("model %s %s (%s…) on %s, labels %s, input %sx%s", self.info.name, self.info.version,
                 model_id[:12], ",".join(self.providers), len(self.info.labels), *self.info.input_size)

    @property
    def input_size(self) -> tuple[int, int]:
        return self.info.input_size

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] → float32 [N, num_classes]."""
        (probs,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: images})
        return probs

    def predict(self, images: np.ndarray) -> list[Prediction]:
        return [self.prediction(row) for row in self.probabilities(images)]

    def prediction(self, probs: np.ndarray) -> Prediction:
        order = np.argsort(-probs, kind="stable")[:3]  # ties keep label order: deterministic output
        top3 = [(self.info.labels[i], round(float(probs[i]), 6)) for i in order]
        return Prediction(top3[0][0], top3[0][1], top3)

    def warm_up(self, batch: int = 1) -> None:
        """Run a dummy batch so the first real image does not pay for lazy initialisation."""
        height, width = self.input_size
        self.probabilities(np.zeros((batch, height, width, 3), dtype=np.uint8))
