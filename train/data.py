"""Training data: ImageFolder splits, checked up front, decoded through the worker's own decoder.

Validation images go exactly the worker's way (`worker_pixels`: the same decode, half-size draft and
resize). Training images are decoded in full by the same decoder (EXIF rotation, mode flattening) and then
augmented (`training_pixels`: random resized crops need the full picture).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets
from torchvision.transforms import v2

from worker.exceptions import DataError, ImageRejected
from worker.preprocess import decode, load_pixels

MAX_PIXELS = 100_000_000
#: Part of the activation cache's key: change it when what `worker_pixels` or `training_pixels` produce changes.
PREPROCESSING_VERSION = "draft-0.75"


def load_split(root: Path, name: str) -> datasets.ImageFolder:
    """The ImageFolder at `root/name`, or a DataError saying what is wrong with it."""
    folder = root / name
    if not folder.is_dir():
        raise DataError(f"no {name} folder at {folder} (expected {root}/{{train,validation}}/<class>/*.jpg)")
    classes = sum(1 for entry in folder.iterdir() if entry.is_dir())
    if classes < 2:
        raise DataError(f"{folder} has {classes} class folder(s); at least 2 are needed, one per category "
                        f"({folder}/<class>/*.jpg)")
    try:
        dataset = datasets.ImageFolder(str(folder), loader=read_bytes)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{folder}: {_first_line(exc)}") from None
    return dataset


def check_splits(train: datasets.ImageFolder, val: datasets.ImageFolder) -> None:
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"train and validation classes differ: only in train {only_train}, only in validation {only_val}"
        )


def check_images(dataset: datasets.ImageFolder) -> None:
    """Decode every header now, so a corrupt file stops training at once with its name."""
    for path, _ in dataset.samples:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception as exc:
            raise DataError(f"corrupt image {path}: {_first_line(exc)}") from None


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


def fingerprint(dataset: datasets.ImageFolder) -> str:
    """sha256 over (class/file name, content sha256) of every sample: names the exact training data."""
    digest = hashlib.sha256()
    root = Path(dataset.root)
    for path, _ in sorted(dataset.samples):
        content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        digest.update(f"{Path(path).relative_to(root).as_posix()}\0{content}\n".encode())
    return digest.hexdigest()


def class_counts(dataset: datasets.ImageFolder) -> list[int]:
    return np.bincount(dataset.targets, minlength=len(dataset.classes)).tolist()


def train_transform(size: int) -> v2.Compose:
    """Augmentation for one training view: crop, flip, colour, a little rotation; ends squashed to size."""
    return v2.Compose(
        [
            v2.RandomResizedCrop((size, size), scale=(0.5, 1.0), ratio=(0.6, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomApply([v2.RandomRotation(10, fill=255)], p=0.3),
            v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.25, hue=0.03),
        ]
    )


def training_pixels(data: bytes, transform: v2.Compose) -> torch.Tensor:
    """Bytes → augmented float CHW tensor in 0..255 (same decode as the worker, then augmentation)."""
    image = decode(data, max_pixels=MAX_PIXELS)
    image = transform(image)
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def worker_pixels(data: bytes, size: int) -> torch.Tensor:
    """Bytes → float CHW tensor exactly as the worker feeds the model."""
    array = load_pixels(data, (size, size), max_pixels=MAX_PIXELS)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float()


def torchvision_pixels(data: bytes, size: int) -> torch.Tensor:
    """Bytes → tensor through torchvision's own decode and resize, to compare with the worker's path."""
    with warnings.catch_warnings():  # torchvision.io decoding is deprecated in favour of torchcodec
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_image

        tensor = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB,
                              apply_exif_orientation=True)  # upright, as the worker sees it
    return v2.functional.resize(tensor, [size, size], antialias=True).float()


class Decoded(torch.utils.data.Dataset):
    """(pixels, label) pairs from an ImageFolder of bytes, through a `bytes -> tensor` function."""

    def __init__(self, dataset: datasets.ImageFolder, to_pixels: Callable[[bytes], torch.Tensor]) -> None:
        self.dataset = dataset
        self.to_pixels = to_pixels

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        data, label = self.dataset[index]
        try:
            return self.to_pixels(data), label
        except ImageRejected as exc:
            raise DataError(f"{self.dataset.samples[index][0]}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
