"""train/trunk.py: the frozen trunk run by onnxruntime on the CPU gives what the torch trunk gives."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="training needs the train extra (torch)")

from train.model import ModelSpec, build  # noqa: E402
from train.trunk import trunk_runner  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return build(ModelSpec("efficientnet-lite0", 3, 64)).eval()


def test_the_onnx_trunk_matches_the_torch_trunk(model) -> None:
    pixels = torch.rand(3, 3, 64, 64) * 255
    run = trunk_runner(model, 5, torch.device("cpu"))
    assert not any(module.training for module in model.modules())  # the export left the model in eval mode
    features = run(pixels)
    with torch.inference_mode():
        expected = model.trunk(pixels, 5)
    assert features.dtype == torch.float32 and features.shape == expected.shape
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-4)
    assert run(pixels[:1]).shape[0] == 1  # any batch size


def test_nothing_frozen_is_the_identity(model) -> None:
    pixels = torch.rand(2, 3, 64, 64) * 255
    assert torch.equal(trunk_runner(model, 0, torch.device("cpu"))(pixels), pixels)
