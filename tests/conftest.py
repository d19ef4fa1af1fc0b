"""Shared fixtures: real temp folders, real image files, and a tiny real ONNX model with the contract."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import sqlalchemy as sa
from onnx import TensorProto, helper
from PIL import Image

LABELS = ["red", "green", "blue"]


def make_model(
    path: Path,
    labels: list[str] | None = None,
    size: tuple[int, int] = (32, 32),
    *,
    metadata: dict[str, str] | None = None,
    input_dtype: int = TensorProto.UINT8,
) -> Path:
    """Write a small ONNX model honouring the worker's contract.

    It averages each colour channel and scores class i by channel i, so a red image is "red" with high
    confidence: real onnxruntime inference with predictable answers, built without torch.
    """
    labels = labels or LABELS
    height, width = size
    n = len(labels)
    weight = np.zeros((3, n), dtype=np.float32)
    for i in range(n):
        weight[i % 3, i] = 0.1
    nodes = [
        helper.make_node("Cast", ["images"], ["pixels"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["pixels", "axes"], ["mean"], keepdims=0),
        helper.make_node("MatMul", ["mean", "weight"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", input_dtype, ["N", height, width, 3])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n])],
        initializer=[
            helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("weight", TensorProto.FLOAT, weight.shape, weight.flatten().tolist()),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    props = {
        "labels": json.dumps(labels),
        "input_size": json.dumps([height, width]),
        "resize": "squash",
        "name": "tiny-test-model",
        "version": "1",
        "val_accuracy": "1.0",
        "data_fingerprint": "test",
    }
    props.update(metadata or {})
    for key, value in props.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def write_image(path: Path, color: tuple[int, int, int] = (255, 0, 0), size: tuple[int, int] = (64, 48),
                fmt: str | None = None, noise_seed: int | None = None) -> Path:
    """A real image file. `noise_seed` makes the bytes distinct while the dominant colour stays."""
    array = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    array[:] = color
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        array = np.clip(array.astype(int) + rng.integers(-20, 20, array.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)
    return path


def distinct_jpegs(folder: Path, count: int, size: tuple[int, int] = (160, 120), prefix: str = "img-") -> list[Path]:
    """`count` red JPEGs with distinct bytes: one noisy image with a different trailer after the
    end-of-image marker each (decoders ignore it), so each costs a real decode but has its own sha256."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 60, (size[1], size[0], 3), dtype=np.uint8)
    pixels[..., 0] = 230
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
    return write_with_trailers(folder, buffer.getvalue(), count, f"{prefix}{{:04}}.jpg")


def write_with_trailers(folder: Path, jpeg: bytes, count: int, name: str) -> list[Path]:
    """`count` copies of `jpeg`, each with its own trailer after the end-of-image marker (decoders ignore
    it): distinct sha256s, a real decode each. `name` is a format string taking the index."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / name.format(i)
        path.write_bytes(jpeg + f"trailer {i}".encode())
        paths.append(path)
    return paths


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    return make_model(tmp_path / "models" / "tiny.onnx")


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    path = tmp_path / "inbox"
    path.mkdir()
    return path


@contextlib.contextmanager
def unwritable(path: Path) -> Iterator[None]:
    """`path` (a file or folder) refuses writes for real while the block runs: chmod for a normal user;
    for root, who ignores permission bits, the immutable attribute (chattr +i). Skips the test where
    neither is possible."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        undo = lambda: path.chmod(mode)  # noqa: E731
    elif shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    else:
        pytest.skip("cannot make a path unwritable here (root without chattr)")
    try:
        yield
    finally:
        undo()


def run_without(package: str, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m COMMAND ARGS` in a process where `import PACKAGE` fails as it does when the package is not
    installed (a None in sys.modules raises the same ModuleNotFoundError): the base install, without the
    train extra, on a machine where the extra is installed."""
    code = (f"import sys; sys.modules[{package!r}] = None\n"
            f"from {command}.__main__ import main; sys.exit(main({list(args)!r}))")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@contextlib.contextmanager
def statements_of(store: Any) -> Iterator[list[str]]:
    """The SQL texts a worker.store.Store sends to its database meanwhile (BEGIN and COMMIT are not statements)."""
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *rest: Any) -> None:
        sent.append(statement)

    sa.event.listen(store.engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", note)
