"""Export: a tiny trained checkpoint becomes an ONNX model that honours the worker's contract."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="export needs the train extra (torch)")

from conftest import run_without  # noqa: E402
from test_train import make_dataset, tiny_config  # noqa: E402

from export import onnx_export  # noqa: E402
from train import train as training  # noqa: E402
from train.model import ExportWrapper  # noqa: E402
from train.report import cross_fitted_ece  # noqa: E402
from worker.exceptions import ModelError  # noqa: E402
from worker.model import Model  # noqa: E402
from worker.preprocess import load_pixels  # noqa: E402


def assert_cross_fitted_ece(figures: dict, probs: np.ndarray, labels: np.ndarray, temperature: str) -> None:
    """`ece_cross_fitted` sits beside `ece` and is the figure of the worker's own outputs on validation."""
    names = list(figures)
    assert names.index("ece_cross_fitted") == names.index("ece") + 1
    assert isinstance(figures["ece_cross_fitted"], float) and 0.0 <= figures["ece_cross_fitted"] <= 1.0
    assert figures["ece_cross_fitted"] == round(cross_fitted_ece(labels, probs, float(temperature)), 4)


def validation(data):
    """(pixels through the worker's path, labels) of the tiny validation split, in class order."""
    files = sorted((data / "validation").rglob("*.jpg"))
    classes = sorted(p.name for p in (data / "validation").iterdir())
    batch = np.stack([load_pixels(f.read_bytes(), (64, 64), max_pixels=10**8) for f in files])
    return batch, np.array([classes.index(f.parent.name) for f in files])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "data")
    training.main(tiny_config(data, root / "run"))
    return root / "run" / "best.pt", data


@pytest.mark.timeout(300)
def test_export_honours_the_contract_and_agrees_with_pytorch(checkpoint, tmp_path):
    best, data = checkpoint
    out = tmp_path / "model.onnx"
    report = onnx_export.main(onnx_export.ExportConfig(checkpoint=str(best), out=str(out)))
    assert report["parity_max_abs_diff"] <= 1e-4

    proto = onnx.load(str(out))
    (images,) = proto.graph.input
    assert images.name == "images"
    assert images.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = images.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [64, 64, 3]
    assert [o.name for o in proto.graph.output] == ["probabilities"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["labels"]) == ["hat", "shoes", "skirt"]
    assert json.loads(meta["input_size"]) == [64, 64]
    assert meta["resize"] == "squash"
    assert meta["name"] == "fashion-efficientnet-lite0" and meta["version"] == "1.0.0"
    assert float(meta["val_accuracy"]) == report["fp32"]["accuracy"]
    assert meta["data_fingerprint"] == torch.load(best, weights_only=False)["data_fingerprint"]
    assert int(meta["macs_per_image"]) > 0
    assert float(meta["temperature"]) == report["temperature"] > 0
    assert 0.0 <= report["fp32"]["ece"] <= 1.0
    scored = report["fp32"]
    assert scored["classes"] == ["hat", "shoes", "skirt"] and scored["n"] == 6
    assert np.array(scored["confusion_matrix"]).sum() == 6
    assert np.trace(scored["confusion_matrix"]) / 6 == pytest.approx(scored["accuracy"], abs=1e-4)
    assert set(scored["per_class"]["hat"]) == {"precision", "recall", "f1", "support"}
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    model = Model(out)  # the worker's own loader accepts it
    files = sorted((data / "validation").rglob("*.jpg"))
    batch = np.stack([load_pixels(f.read_bytes(), (64, 64), max_pixels=10**8) for f in files])
    probs = model.probabilities(batch)
    assert probs.dtype == np.float32 and probs.shape == (len(files), 3)
    assert np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert model.probabilities(batch[:1]).shape == (1, 3)  # N is dynamic

    network = onnx_export.rebuild(torch.load(best, weights_only=False))
    with torch.inference_mode():
        expected = ExportWrapper(network, float(meta["temperature"]))(torch.from_numpy(batch)).numpy()
    assert np.abs(probs - expected).max() <= 1e-4
    assert_cross_fitted_ece(report["fp32"], probs, validation(data)[1], meta["temperature"])


@pytest.mark.timeout(300)
def test_int8_model_is_written_scored_and_timed(checkpoint, tmp_path):
    best, _ = checkpoint
    out = tmp_path / "model.onnx"
    report = onnx_export.main(onnx_export.ExportConfig(checkpoint=str(best), out=str(out), int8=True,
                                                       calibration_images=8))
    int8 = Model(tmp_path / "model.int8.onnx")
    assert int8.info.metadata["precision"] == "int8"
    assert int8.info.labels == ["hat", "shoes", "skirt"]
    # The reported and recorded accuracy is the one the worker gets from this file on validation.
    batch, labels = validation(checkpoint[1])
    measured = float((int8.probabilities(batch).argmax(1) == labels).mean())
    assert_cross_fitted_ece(report["int8"], int8.probabilities(batch), labels, int8.info.metadata["temperature"])
    assert report["int8"]["accuracy"] == pytest.approx(measured, abs=1e-4)
    assert float(int8.info.metadata["val_accuracy"]) == pytest.approx(measured, abs=1e-4)
    fp32 = float((Model(out).probabilities(batch).argmax(1) == labels).mean())
    assert report["int8"]["accuracy_drop_points"] == pytest.approx(100 * (fp32 - measured), abs=0.01)
    assert report["int8"]["images_per_s"]["int8"] > 0 and report["int8"]["images_per_s"]["fp32"] > 0
    quantized = onnx.load(str(tmp_path / "model.int8.onnx"))
    assert any(node.op_type == "QuantizeLinear" for node in quantized.graph.node)
    # the head stays in float, so probabilities are not rounded to steps of 1/255
    producers = {output: node.op_type for node in quantized.graph.node for output in node.output}
    softmax = next(node for node in quantized.graph.node if node.op_type == "Softmax")
    assert producers[softmax.input[0]] == "Div" and softmax.output[0] == "probabilities"


def test_failed_parity_writes_nothing(checkpoint, tmp_path):
    best, _ = checkpoint
    out = tmp_path / "model.onnx"
    # A negative tolerance cannot be met: this is how a parity failure looks to the user.
    with pytest.raises(ModelError, match="ONNX and PyTorch disagree"):
        onnx_export.main(onnx_export.ExportConfig(checkpoint=str(best), out=str(out), tolerance=-1.0))
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_missing_checkpoint_is_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "export", str(tmp_path / "none.pt"), "--out",
                             str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fashion-export: error: checkpoint {tmp_path / 'none.pt'} does not exist"


def test_help_shows_defaults_and_example():
    result = subprocess.run([sys.executable, "-m", "export", "--help"], capture_output=True, text=True)
    assert "(default: 0.0001)" in result.stdout
    assert "\n  fashion-export runs/lite2/best.pt --out worker/models/default.onnx --int8 --fp16\n" in result.stdout
    assert "\n  fashion-export --rescore --out worker/models/default.onnx --data " in result.stdout


def test_no_checkpoint_without_rescore_is_a_usage_error():
    result = subprocess.run([sys.executable, "-m", "export"], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == ("fashion-export: error: the checkpoint is required "
                                              "(or --rescore to score models already exported)")


@pytest.mark.timeout(300)
def test_rescore_rewrites_the_figures_and_never_the_models(checkpoint, tmp_path):
    best, data = checkpoint
    out = tmp_path / "m.onnx"
    exported = subprocess.run([sys.executable, "-m", "export", str(best), "--out", str(out), "--int8",
                               "--calibration-images", "8"], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    models = {path.name: path.read_bytes() for path in tmp_path.glob("*.onnx")}
    assert set(models) == {"m.onnx", "m.int8.onnx"}
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    speed = metrics["export"]["int8"]["images_per_s"]
    # Figures gone stale, as after a change to the worker's preprocessing:
    metrics["export"]["int8"]["accuracy"] = metrics["export"]["fp32"]["accuracy"] = -1.0
    exported_figures = {p: metrics["export"][p].pop("ece_cross_fitted") for p in ("fp32", "int8")}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / "confusion_matrix.png").unlink()

    result = subprocess.run([sys.executable, "-m", "export", "--rescore", "--out", str(out), "--data", str(data)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert {path.name: path.read_bytes() for path in tmp_path.glob("*.onnx")} == models
    rescored = json.loads((tmp_path / "metrics.json").read_text())
    assert rescored["training"] == metrics["training"]  # the training section is kept as it was
    for precision, path in (("fp32", out), ("int8", tmp_path / "m.int8.onnx")):
        recorded = float(Model(path).info.metadata["val_accuracy"])
        assert rescored["export"][precision]["accuracy"] == recorded
    assert rescored["export"]["int8"]["images_per_s"] == speed  # measured at export, kept
    assert {p: rescored["export"][p]["ece_cross_fitted"] for p in ("fp32", "int8")} == exported_figures
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    fp32, int8 = (rescored["export"][p]["accuracy"] for p in ("fp32", "int8"))
    assert result.stdout == (f"scored {out}: validation accuracy {fp32:.4f}; int8 {int8:.4f} at "
                             f"{rescored['export']['int8']['speedup']}x the speed; metrics in "
                             f"{tmp_path / 'metrics.json'}, confusion matrix in {tmp_path / 'confusion_matrix.png'}\n")


def test_rescore_errors_are_one_line(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "export", "--rescore", "--out", str(tmp_path / "none.onnx")],
                             capture_output=True, text=True)
    assert missing.returncode == 2
    none = tmp_path / "none.onnx"
    assert missing.stderr.strip() == f"fashion-export: error: nothing to rescore: {none} does not exist"


def test_temperature_changes_confidence_never_the_winner(checkpoint, tmp_path):
    best, data = checkpoint
    files = sorted((data / "validation").rglob("*.jpg"))
    batch = np.stack([load_pixels(f.read_bytes(), (64, 64), max_pixels=10**8) for f in files])
    network = onnx_export.rebuild(torch.load(best, weights_only=False))
    with torch.inference_mode():
        plain = ExportWrapper(network)(torch.from_numpy(batch))
        sharper = ExportWrapper(network, 0.5)(torch.from_numpy(batch))
    assert torch.equal(plain.argmax(1), sharper.argmax(1))
    assert (sharper.max(1).values >= plain.max(1).values - 1e-6).all()
    out = tmp_path / "m.onnx"
    report = onnx_export.main(onnx_export.ExportConfig(checkpoint=str(best), out=str(out), calibrate=False))
    assert report["temperature"] == 1.0
    assert "ece" in report["fp32"] and "ece_cross_fitted" not in report["fp32"]  # nothing fitted: `ece` is fair


@pytest.mark.timeout(300)
def test_fp16_variant_is_written_scored_and_close_to_fp32(checkpoint, tmp_path):
    best, _ = checkpoint
    report = onnx_export.main(onnx_export.ExportConfig(checkpoint=str(best), out=str(tmp_path / "m.onnx"),
                                                       fp16=True))
    half = onnx.load(str(tmp_path / "m.fp16.onnx"))
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in half.graph.initializer)
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    model = Model(tmp_path / "m.fp16.onnx")  # the worker's loader accepts it: same contract
    assert model.info.metadata["precision"] == "fp16"
    # Measured here, independently of the report: the worker's outputs of both files on validation.
    batch, labels = validation(checkpoint[1])
    half_probs, full_probs = model.probabilities(batch), Model(tmp_path / "m.onnx").probabilities(batch)
    assert np.abs(half_probs - full_probs).max() < 0.05
    assert report["fp16"]["max_abs_diff_vs_fp32"] == pytest.approx(np.abs(half_probs - full_probs).max(), abs=1e-5)
    measured = float((half_probs.argmax(1) == labels).mean())
    assert_cross_fitted_ece(report["fp16"], half_probs, labels, model.info.metadata["temperature"])
    assert report["fp16"]["accuracy"] == pytest.approx(measured, abs=1e-4)
    assert float(model.info.metadata["val_accuracy"]) == pytest.approx(measured, abs=1e-4)
    assert (half_probs.argmax(1) != full_probs.argmax(1)).sum() <= 1  # at most one of 6 images changes


def test_without_the_train_extra_the_command_says_which_extra_in_one_line():
    proc = run_without("onnx", "export", "--help")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("fashion-export: error: needs the train extra (no module named 'onnx'); install it "
                           "with: .venv/bin/pip install -e '.[train]'\n")


@pytest.mark.timeout(300)
def test_exporting_into_the_run_folder_again_keeps_the_training_figures_flat(checkpoint, tmp_path):
    best, _ = checkpoint
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(best.read_bytes())
    training_figures = json.loads((best.parent / "metrics.json").read_text())
    (run / "metrics.json").write_text(json.dumps(training_figures))
    for _ in range(2):  # as in the README: the model written beside the checkpoint, twice
        done = subprocess.run([sys.executable, "-m", "export", str(run / "best.pt"), "--out", str(run / "m.onnx")],
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    written = json.loads((run / "metrics.json").read_text())
    assert written["training"] == training_figures  # not {"export": …, "training": {"training": …}}


@pytest.mark.parametrize(("flags", "message"), [
    (["--parity-images", "0"], "--parity-images must be at least 1, got 0"),
    (["--calibration-images", "0"], "--calibration-images must be at least 1, got 0"),
    (["--tolerance", "0"], "--tolerance must be positive, got 0"),
])
def test_flags_out_of_range_are_one_line(flags, message):
    done = subprocess.run([sys.executable, "-m", "export", "x.pt", *flags], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"fashion-export: error: {message}"
