"""worker/gpudecode.py and the pipeline's `batch.decode_on = "gpu"` path.

CI has no GPU, so these run torchvision's decoder and torch's resize on the CPU device: the same code,
the same torch calls, with `device="cpu"` (the one thing that cannot be made real here is the CUDA
device itself; the H100 run is in README "GPU"). The pipeline tests use real files, a real SQLite file
and a real onnxruntime session on a generated model, as in test_pipeline.py.
"""

from __future__ import annotations

import io
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model, write_image
from PIL import Image
from test_pipeline import Harness, make_config

from worker.gpudecode import GpuDecoder, gpu_eligible
from worker.preprocess import load_pixels, open_image

pytest.importorskip("torchvision")

SIZE = (32, 32)


def jpeg_bytes(color: tuple[int, int, int], size: tuple[int, int] = (120, 90), mode: str = "RGB",
               orientation: int | None = None, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    array = np.clip(np.array(color) + rng.integers(-15, 15, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(array).convert(mode)
    buffer = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def test_only_plain_upright_jpegs_are_eligible(tmp_path: Path) -> None:
    png = write_image(tmp_path / "a.png", (10, 200, 10)).read_bytes()
    cases = {
        "rgb": jpeg_bytes((200, 10, 10)),
        "grey": jpeg_bytes((90, 90, 90), mode="L"),
        "cmyk": jpeg_bytes((200, 10, 10), mode="CMYK"),
        "rotated": jpeg_bytes((200, 10, 10), orientation=6),
        "upright tag": jpeg_bytes((200, 10, 10), orientation=1),
        "png": png,
        "large": jpeg_bytes((200, 10, 10), size=(1040, 600)),  # Pillow decodes it at 1/2 scale: CPU
        "wide": jpeg_bytes((200, 10, 10), size=(1040, 500)),  # not twice the input on both sides: GPU
        "listing": jpeg_bytes((200, 10, 10), size=(400, 533)),  # GPU at full size (the CPU: at 1/2)
    }
    eligible = {name: gpu_eligible(open_image(data, max_pixels=10**8), (260, 260)) for name, data in cases.items()}
    assert eligible == {"rgb": True, "grey": True, "cmyk": False, "rotated": False, "upright tag": True,
                        "png": False, "large": False, "wide": True, "listing": True}


def test_decoder_matches_the_cpu_path() -> None:
    blobs = [jpeg_bytes(c, size=s, seed=i) for i, (c, s) in enumerate(
        [((200, 10, 10), (400, 533)), ((10, 200, 10), (533, 400)), ((30, 30, 220), (64, 48))])]
    decoder = GpuDecoder((260, 260), device="cpu")
    batch = decoder.decode(blobs)
    assert tuple(batch.shape) == (3, 260, 260, 3) and str(batch.dtype) == "torch.uint8"
    cpu = np.stack([load_pixels(b, (260, 260), max_pixels=10**8) for b in blobs])
    difference = np.abs(batch.numpy().astype(int) - cpu.astype(int))
    assert difference.mean() < 1.0 and difference.max() <= 40, (difference.mean(), difference.max())


def test_decoder_refuses_a_corrupt_batch() -> None:
    good = jpeg_bytes((200, 10, 10))
    broken = good[:20] + b"\x00" * 200 + good[220:]
    with pytest.raises(RuntimeError):
        GpuDecoder(SIZE, device="cpu").decode([good, broken])


def write_mixed_inbox(inbox: Path) -> None:
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / "red.jpg").write_bytes(jpeg_bytes((230, 20, 20), seed=1))
    (inbox / "grey-green.jpg").write_bytes(jpeg_bytes((20, 230, 20), seed=2))
    (inbox / "rotated-blue.jpg").write_bytes(jpeg_bytes((20, 20, 230), orientation=6, seed=3))
    write_image(inbox / "green.png", (20, 230, 20), (80, 60))
    truncated = jpeg_bytes((230, 20, 20), seed=4)
    (inbox / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])  # header intact, no end marker
    (inbox / "cmyk.jpg").write_bytes(jpeg_bytes((230, 20, 20), mode="CMYK", seed=5))


def gpu_config(tmp_path: Path, **overrides: object):
    """A pipeline config whose model takes 96x96 pixels: the 120x90 test JPEGs are GPU-eligible (a photo
    twice the input size on both sides is left to Pillow's reduced-scale decoding)."""
    make_model(tmp_path / "model.onnx", size=(96, 96))
    return make_config(tmp_path, **overrides)


def classify_inbox(tmp_path: Path, decode_on: str) -> list[tuple]:
    cfg = gpu_config(tmp_path, **{"batch.decode_on": decode_on})
    write_mixed_inbox(cfg.inbox_path)
    harness = Harness(cfg)
    try:
        assert harness.submit_all() == 6
        harness.drain()
        # red.jpg and grey-green.jpg went through the GPU path; the other four are not plain JPEGs
        assert harness.pipeline.counters.gpu_decoded == (2 if decode_on == "gpu" else 0)
        with sqlite3.connect(harness.store.path) as db:
            return db.execute("SELECT file, status, category, round(confidence, 2), error FROM results "
                              "ORDER BY file").fetchall()
    finally:
        harness.close()


def test_pipeline_decoding_on_the_gpu_gives_the_cpu_paths_answers(tmp_path: Path) -> None:
    on_gpu = classify_inbox(tmp_path / "gpu", "gpu")
    on_cpu = classify_inbox(tmp_path / "cpu", "cpu")
    assert on_gpu == on_cpu
    by_file = {row[0]: row for row in on_gpu}
    assert [by_file[name][1:3] for name in ("red.jpg", "grey-green.jpg", "rotated-blue.jpg", "green.png",
                                            "cmyk.jpg")] == [("ok", "red"), ("ok", "green"), ("ok", "blue"),
                                                             ("ok", "green"), ("ok", "red")]
    assert by_file["truncated.jpg"][1] == "failed"
    assert by_file["truncated.jpg"][4].startswith("corrupt or truncated JPEG")
    assert sorted(p.name for p in (tmp_path / "gpu" / "processed").iterdir()) == [
        "cmyk.jpg", "green.png", "grey-green.jpg", "red.jpg", "rotated-blue.jpg"]


def test_a_batch_the_gpu_refuses_is_decoded_on_the_cpu(tmp_path: Path, caplog) -> None:
    """A JPEG whose header parses and whose end marker is there, but whose frame names a quantisation
    table it never defines: the batched decode refuses the whole batch, its JPEGs are decoded on the CPU
    one by one, the good one is classified and the bad one fails with the CPU path's message."""
    cfg = gpu_config(tmp_path, **{"batch.decode_on": "gpu", "batch.max_wait_ms": 500})
    (cfg.inbox_path / "good.jpg").write_bytes(jpeg_bytes((230, 20, 20), seed=7))
    bad = bytearray(jpeg_bytes((20, 230, 20), seed=8))
    frame = bad.index(b"\xff\xc0")  # SOF0: length, precision, height, width, count, then per component
    bad[frame + 12] = 3  # the first component's quantisation table: one that is not defined
    (cfg.inbox_path / "bad.jpg").write_bytes(bytes(bad))
    harness = Harness(cfg)
    try:
        with caplog.at_level("INFO", logger="worker.pipeline"):
            assert harness.submit_all() == 2
            harness.drain()
        rows = {r[0]: r for r in harness.rows()}
    finally:
        harness.close()
    assert rows["good.jpg"][1:3] == ("ok", "red")
    assert harness.pipeline.counters.gpu_decoded == 0  # the refused batch was decoded on the CPU
    assert rows["bad.jpg"][1] == "failed" and rows["bad.jpg"][5].startswith("corrupt or truncated JPEG")
    assert any("the GPU could not decode a batch of 2 JPEGs" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records]
