"""export/flops.py: multiply-accumulates counted on a network small enough to count by hand."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")  # the train extra
from torch import nn  # noqa: E402

from export.flops import count_macs  # noqa: E402


def test_convolutions_grouped_convolutions_and_linear_layers_are_counted_per_image() -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # 8x10x10 outputs, each 3*3*3 = 27 MACs: 21,600
        nn.ReLU(),  # element-wise: not counted
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise: 800 outputs of 1*3*3 = 9 MACs: 7,200
        nn.Conv2d(8, 4, 1, stride=2),  # 4x5x5 outputs of 8 MACs: 800
        nn.Flatten(),
        nn.Linear(100, 5),  # 5 outputs of 100 MACs: 500
    )
    for batch in (1, 3):  # per image, whatever the batch
        assert count_macs(model, torch.zeros(batch, 3, 10, 10)) == 21_600 + 7_200 + 800 + 500


def test_the_hooks_are_removed_even_when_the_forward_pass_fails() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Linear(7, 2))  # the Linear cannot take the conv's output
    with pytest.raises(RuntimeError):
        count_macs(model, torch.zeros(1, 3, 8, 8))
    assert all(not module._forward_hooks for module in model.modules())
