"""Decoding and resizing JPEGs on the GPU (nvJPEG through torchvision), for `batch.decode_on = "gpu"`.

On a GPU machine the CPU's decoding, not the model, limits the worker: one core decodes and resizes a
few hundred listing photos a second, the H100 runs the model on thousands. nvJPEG decodes a whole batch
on the GPU, torch resizes it there with the same antialiased bilinear filter as Pillow's, and the model
reads the result in place (IO binding): the pixels never come back to the host.

Only plain JPEGs go this way, chosen by `gpu_eligible` from the header the decode pool has already
parsed: 8-bit RGB or greyscale, upright (no EXIF rotation). Anything else (PNG, WebP, CMYK, rotated
photos) and any batch nvJPEG refuses is decoded by the CPU path of worker.preprocess instead, so the
answers and the error messages are the same either way.

torch and torchvision are needed at run time for this mode only (the `gpu` extra); the default CPU mode
never imports them.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from PIL import Image

from worker.exceptions import ConfigError
from worker.preprocess import draft_scale

log = logging.getLogger(__name__)

ORIENTATION = 0x0112  # the EXIF tag Pillow's exif_transpose acts on


def gpu_eligible(image: Image.Image, size: tuple[int, int]) -> bool:
    """True when nvJPEG decodes the photo at least as fast as the CPU would: a JPEG, 8-bit RGB or
    greyscale, with no EXIF rotation to apply, and less than twice the model's input on some side.

    `image` is opened, not decoded (worker.preprocess.open_image); `size` is the model's (H, W). A photo at
    least twice the model's input on both sides stays on the CPU, where Pillow decodes it at 1/2, 1/4 or
    1/8 scale straight from the DCT, far cheaper than nvJPEG's full-size decode, whose entropy decoding
    runs on the host (measured on the H100 machine: 12-megapixel photos went 4x slower through the GPU).
    A listing photo (400x533 for a 260x260 model) goes to nvJPEG at full size, where the CPU path would
    decode it at half size (`DRAFT_MIN_SHARE`): the pictures differ a little (on the CPU, 2 % of the
    validation predictions differ between the two), the GPU's is the sharper one.
    """
    if image.format != "JPEG" or image.mode not in ("RGB", "L"):
        return False
    if draft_scale(image.size, size, min_share=1.0) > 1:
        return False
    return image.getexif().get(ORIENTATION, 1) == 1


class GpuDecoder:
    """Batched JPEG decode + resize to (H, W) on one CUDA device; returns uint8 NHWC tensors there."""

    def __init__(self, size: tuple[int, int], device: str = "cuda") -> None:
        try:
            import torch
            import torchvision.io
        except ImportError:
            raise ConfigError('batch.decode_on = "gpu" needs torch and torchvision (pip install '
                              "'fashion-worker[gpu]'); use \"cpu\" otherwise") from None
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError('batch.decode_on = "gpu" but torch sees no CUDA device; use "cpu"')
        # torchvision 0.29 deprecates its decoders in favour of torchcodec, which has no batched nvJPEG
        # decode yet; said once per process, the warning would read like a fault in the worker's log.
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                                category=DeprecationWarning)
        self.torch = torch
        self.io = torchvision.io
        self.size = size
        self.device = torch.device(device)

    def decode(self, blobs: list[bytes]) -> Any:
        """JPEG bytes → uint8 tensor [N, H, W, 3] on the device. Raises RuntimeError when nvJPEG refuses
        any of them (the caller then decodes that batch on the CPU)."""
        torch = self.torch
        data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        images = self.io.decode_jpeg(data, mode=self.io.ImageReadMode.RGB, device=self.device)
        height, width = self.size
        out = torch.empty((len(images), height, width, 3), dtype=torch.uint8, device=self.device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):  # [3, h, w] each
            by_shape.setdefault(tuple(image.shape), []).append(index)
        # One resize per distinct photo size (listing photos come in a few): every torch call costs the
        # host time and a hand-over of Python's lock, which is what limits a busy worker.
        for indices in by_shape.values():
            group = torch.stack([images[i] for i in indices]).float()
            resized = torch.nn.functional.interpolate(group, size=(height, width), mode="bilinear",
                                                      antialias=True, align_corners=False)
            pixels = resized.round_().clamp_(0, 255).permute(0, 2, 3, 1).to(torch.uint8)
            if len(indices) == len(images):
                out = pixels.contiguous()
            else:
                out[torch.tensor(indices, device=self.device)] = pixels
        return out

    def upload(self, pixels: Any) -> Any:
        """A host uint8 array [N, H, W, 3] as a tensor on the device."""
        return self.torch.from_numpy(pixels).to(self.device)

    def concat(self, parts: list[Any]) -> Any:
        return parts[0] if len(parts) == 1 else self.torch.cat(parts)

    def synchronize(self) -> None:
        """Wait for torch's work on the device: onnxruntime reads the tensor on its own stream."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
