"""Training end to end on a tiny synthetic ImageFolder, and its refusals of bad data."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

torch = pytest.importorskip("torch", reason="training needs the train extra (torch)")

from conftest import run_without, write_image  # noqa: E402

from train import train as training  # noqa: E402
from train.model import ARCHS, ModelSpec, build, weights_path  # noqa: E402
from worker.exceptions import DataError  # noqa: E402

COLORS = {"hat": (200, 30, 30), "shoes": (30, 200, 30), "skirt": (30, 30, 200)}


def make_dataset(root: Path, per_class: int = 6) -> Path:
    for split in ("train", "validation"):
        for index, (name, color) in enumerate(COLORS.items()):
            for i in range(per_class if split == "train" else 2):
                write_image(root / split / name / f"{i}.jpg", color, (48, 64), noise_seed=index * 100 + i)
    return root


def tiny_config(data: Path, out: Path, **overrides) -> training.TrainConfig:
    settings = dict(data=str(data), out=str(out), arch="efficientnet-lite0", image_size=64, frozen_blocks=8,
                    views=1, epochs=1, batch_size=8, workers=0)
    settings.update(overrides)
    return training.TrainConfig(**settings)


def test_pretrained_weights_come_from_the_pip_packages():
    for arch in ARCHS:
        path = Path(weights_path(arch))
        assert path.is_file() and "site-packages" in str(path)
    model = build(ModelSpec("efficientnet-lite0", 3, 64))
    state = torch.load(weights_path("efficientnet-lite0"), map_location="cpu", weights_only=True)
    # every pretrained tensor but the 1000-class head is loaded as shipped
    for key, value in state.items():
        if not key.startswith("_fc."):
            assert torch.equal(model.net.state_dict()[key], value), key
    assert model.net._fc.out_features == 3


def test_unknown_architecture_names_the_choices():
    with pytest.raises(ValueError, match="efficientnet-lite0, efficientnet-lite1, efficientnet-lite2"):
        weights_path("resnet50")


def test_trunk_and_top_compose_to_the_whole_network():
    model = build(ModelSpec("efficientnet-lite0", 3, 64)).eval()
    pixels = torch.rand(2, 3, 64, 64) * 255
    with torch.inference_mode():
        whole = model(pixels)
        for split in (0, 5, model.num_blocks):
            assert torch.allclose(model.top(model.trunk(pixels, split), split), whole, atol=1e-5)


@pytest.mark.timeout(300)
def test_one_short_epoch_writes_checkpoint_metrics_and_pngs(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    metrics = training.main(tiny_config(data, out))
    for name in ("best.pt", "last.pt", "metrics.json", "confusion_matrix.png", "training_curves.png"):
        assert (out / name).is_file(), name
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["validation"]["n"] == 6
    assert set(saved["validation"]["per_class"]) == set(COLORS)
    assert 0.0 <= saved["validation"]["ece"] <= 1.0
    assert len(saved["validation"]["confusion_matrix"]) == 3
    assert metrics["validation"]["accuracy"] == saved["validation"]["accuracy"]
    checkpoint = torch.load(out / "best.pt", weights_only=False)
    assert checkpoint["classes"] == sorted(COLORS)
    assert checkpoint["config"]["arch"] == "efficientnet-lite0"
    assert checkpoint["spec"]["image_size"] == 64
    assert len(checkpoint["data_fingerprint"]) == 64


@pytest.mark.timeout(300)
def test_seed_makes_runs_repeatable_and_resume_continues(tmp_path):
    data = make_dataset(tmp_path / "data")
    first = training.main(tiny_config(data, tmp_path / "a", epochs=2))
    second = training.main(tiny_config(data, tmp_path / "b", epochs=2))
    assert first["history"] == [{**h, "seconds": s["seconds"]} for h, s in zip(second["history"],
                                                                                first["history"], strict=True)]
    # Run again in the same folder: the activation caches are found on disk, and the run is the same.
    again = training.main(tiny_config(data, tmp_path / "b", epochs=2))
    assert [{**h, "seconds": 0} for h in again["history"]] == [{**h, "seconds": 0} for h in first["history"]]
    resumed = training.main(tiny_config(data, tmp_path / "a", epochs=3, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert resumed["history"][:2] == first["history"]


def test_resume_refuses_a_run_of_another_shape(tmp_path):
    data = make_dataset(tmp_path / "data")
    training.main(tiny_config(data, tmp_path / "run"))
    with pytest.raises(DataError, match=r"--resume: .*last.pt was trained with another frozen_blocks \(8, now 6\); "
                                        "start a new --out or drop --resume"):
        training.main(tiny_config(data, tmp_path / "run", frozen_blocks=6, epochs=2, resume=True))


def test_a_changed_validation_set_is_not_scored_from_a_stale_cache(tmp_path):
    data = make_dataset(tmp_path / "data")
    assert training.main(tiny_config(data, tmp_path / "run"))["validation"]["n"] == 6
    write_image(data / "validation" / "hat" / "new.jpg", COLORS["hat"], (48, 64), noise_seed=777)
    assert training.main(tiny_config(data, tmp_path / "run"))["validation"]["n"] == 7  # crashed before


@pytest.mark.parametrize(("flags", "message"), [
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--lr", "-1"], "--lr must be positive, got -1"),
    (["--mixup", "-1"], "--mixup must be >= 0, got -1"),
    (["--ema", "1"], "--ema must be in [0, 1), got 1"),
    (["--frozen-blocks", "-3"], "--frozen-blocks must be >= 0, got -3"),
    (["--image-size", "8"], "--image-size must be 0 or at least 32, got 8"),
])
def test_flags_out_of_range_are_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as info:
        training.parse_args(["--data", "d", *flags])
    assert info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"fashion-train: error: {message}"


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        training.main(tiny_config(tmp_path / "nope", tmp_path / "run"))


def test_empty_data_folder(tmp_path):
    (tmp_path / "data" / "train").mkdir(parents=True)
    (tmp_path / "data" / "validation").mkdir()
    with pytest.raises(DataError) as caught:
        training.main(tiny_config(tmp_path / "data", tmp_path / "run"))
    train = tmp_path / "data" / "train"
    assert str(caught.value) == (f"{train} has 0 class folder(s); at least 2 are needed, one per category "
                                 f"({train}/<class>/*.jpg)")


def test_class_folders_without_images(tmp_path):
    data = make_dataset(tmp_path / "data")
    (data / "train" / "scarf").mkdir()
    with pytest.raises(DataError) as caught:
        training.main(tiny_config(data, tmp_path / "run"))
    assert str(caught.value).startswith(f"{data / 'train'}: Found no valid file for the classes scarf.")


def test_validation_classes_must_match_train(tmp_path):
    data = make_dataset(tmp_path / "data")
    write_image(data / "validation" / "scarf" / "0.jpg")
    with pytest.raises(DataError, match=r"only in validation \['scarf'\]"):
        training.main(tiny_config(data, tmp_path / "run"))


def test_corrupt_image_is_named(tmp_path):
    data = make_dataset(tmp_path / "data")
    bad = data / "train" / "hat" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    with pytest.raises(DataError, match=r"broken\.jpg"):
        training.main(tiny_config(data, tmp_path / "run"))


@pytest.mark.timeout(120)
def test_cli_reports_bad_data_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "train", "--data", str(tmp_path / "nope"), "--out",
                             str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2
    expected = f"fashion-train: error: data folder {tmp_path / 'nope'} does not exist"
    assert result.stderr.strip().splitlines()[-1] == expected
    assert "Traceback" not in result.stderr


@pytest.mark.timeout(300)
def test_an_image_failing_in_a_decoding_process_is_one_line(tmp_path):
    # A BMP passes the header check (ImageFolder takes .bmp) and is refused by the worker's decoder, which
    # runs in a DataLoader worker process: that error comes back wrapped in the process's traceback.
    data = make_dataset(tmp_path / "data")
    Image.new("RGB", (48, 64), COLORS["hat"]).save(data / "train" / "hat" / "0.bmp")
    (data / "train" / "hat" / "0.jpg").unlink()
    result = subprocess.run([sys.executable, "-m", "train", "--data", str(data), "--out", str(tmp_path / "run"),
                             "--arch", "efficientnet-lite0", "--image-size", "64", "--epochs", "1",
                             "--batch-size", "8", "--workers", "2"], capture_output=True, text=True)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"fashion-train: error: {data / 'train' / 'hat' / '0.bmp'}: not a supported image (expected "
                    "one of JPEG, PNG, WEBP)")
    assert "Original Traceback" not in result.stderr


def test_cli_help_shows_defaults_and_example():
    result = subprocess.run([sys.executable, "-m", "train", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert "(default: efficientnet-lite2)" in result.stdout
    assert "example: fashion-train --data" in result.stdout


@pytest.mark.timeout(300)
def test_mixup_and_weight_averaging_save_the_averaged_weights(tmp_path):
    data = make_dataset(tmp_path / "data")
    out = tmp_path / "run"
    training.main(tiny_config(data, out, epochs=2, mixup=0.2, ema=0.9))
    last = torch.load(out / "last.pt", weights_only=False)
    assert "raw_model" in last and "ema" in last
    # the exported weights are the average, not the last step's
    raw = last["raw_model"]
    assert [k for k, v in last["model"].items() if v.is_floating_point() and not torch.equal(v, raw[k])]
    resumed = training.main(tiny_config(data, out, epochs=3, mixup=0.2, ema=0.9, resume=True))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]


def test_without_the_train_extra_the_command_says_which_extra_in_one_line():
    proc = run_without("torch", "train", "--help")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == ("fashion-train: error: needs the train extra (no module named 'torch'); install it "
                           "with: .venv/bin/pip install -e '.[train]'\n")


def test_weight_average_warms_up_its_decay():
    # decay 0.3 is capped by the warm-up (1+n)/(10+n) at n = 1, 2 (2/11, 3/12) and reached from n = 3 (4/13)
    decay, steps = 0.3, 6
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = training.make_ema(model, decay)
    generator = torch.Generator().manual_seed(0)
    names = [name for name, value in model.state_dict().items() if value.is_floating_point()]
    expected: dict[str, torch.Tensor] = {}
    for n in range(steps):
        with torch.no_grad():
            for name in names:
                model.state_dict()[name].copy_(torch.randn(model.state_dict()[name].shape, generator=generator))
        ema.update_parameters(model)
        current = {name: model.state_dict()[name].double() for name in names}
        if n == 0:  # the first update copies the weights
            expected = current
        else:
            d = min(decay, (1 + n) / (10 + n))
            expected = {name: d * expected[name] + (1 - d) * current[name] for name in names}
    averaged = ema.module.state_dict()
    for name in names:
        torch.testing.assert_close(averaged[name].double(), expected[name], rtol=1e-6, atol=1e-6, msg=name)
    assert int(ema.n_averaged) == steps
    assert averaged["1.num_batches_tracked"].dtype == torch.int64
