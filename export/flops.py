"""Cost of one image through the network: multiply-accumulates (MACs), counted with forward hooks.

MACs are the unit of the EfficientNet paper's "FLOPs" and of the usual Xception figure, so they compare
like with like. Convolutions and linear layers only; element-wise work is a rounding error here.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.inference_mode()
def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs of `model(example)` divided by the batch size of `example`."""
    total = 0

    def conv(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        per_output = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        total += output.numel() * per_output

    def linear(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv))
        elif isinstance(module, nn.Linear):
            hooks.append(module.register_forward_hook(linear))
    try:
        model(example)
    finally:
        for hook in hooks:
            hook.remove()
    return total // example.shape[0]
