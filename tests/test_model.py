"""Model loading: the contract is checked and every violation is named in one line."""

from __future__ import annotations

import hashlib
import json
import logging
import threading

import numpy as np
import onnxruntime as ort
import pytest
from conftest import LABELS, make_model, write_image
from onnx import TensorProto

import worker.model
from worker.exceptions import ModelError
from worker.model import (
    DEFAULT_MODEL,
    DEFAULT_MODEL_FP32,
    DEFAULT_MODEL_GPU,
    GPU_PROVIDERS,
    Model,
    choose_providers,
    model_file,
    preload_cuda_libraries,
    session_options,
    tensorrt_loadable,
)
from worker.preprocess import load_pixels


def test_contract_model_loads_and_predicts(tiny_model):
    model = Model(tiny_model)
    assert model.info.labels == LABELS
    assert model.input_size == (32, 32)
    assert model.info.resize == "squash" and model.info.name == "tiny-test-model"
    assert len(model.info.model_id) == 64
    assert model.providers == ["CPUExecutionProvider"]
    batch = np.zeros((3, 32, 32, 3), dtype=np.uint8)
    for i in range(3):
        batch[i, ..., i] = 255
    predictions = model.predict(batch)
    assert [p.category for p in predictions] == LABELS
    assert predictions[0].top3[0] == ("red", predictions[0].confidence)
    assert [label for label, _ in predictions[0].top3] == ["red", "green", "blue"]
    # the tiny model's logits are 0.1 x the channel means: [25.5, 0, 0] for image 0 (all red)
    logits = 0.1 * batch.reshape(3, -1, 3).mean(1)
    expected = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert np.allclose(model.probabilities(batch), expected, atol=1e-6)
    assert predictions[0].confidence == pytest.approx(float(expected[0, 0]), abs=1e-6)
    model.warm_up(max_batch=2)  # dummy runs change nothing of what follows
    assert np.allclose(model.probabilities(batch), expected, atol=1e-6)


def test_missing_model_file(tmp_path):
    with pytest.raises(ModelError, match=r"model file .*missing.onnx does not exist"):
        Model(tmp_path / "missing.onnx")


def test_truncated_model_file(tiny_model, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(tiny_model.read_bytes()[:100])
    with pytest.raises(ModelError, match="cannot be loaded"):
        Model(broken)


def test_wrong_input_type_is_named(tmp_path):
    path = make_model(tmp_path / "float.onnx", input_dtype=TensorProto.FLOAT)
    with pytest.raises(ModelError, match=r"input 'images' is tensor\(float\).*needs tensor\(uint8\)"):
        Model(path)


def test_labels_that_are_not_json_are_named(tmp_path):
    path = make_model(tmp_path / "m.onnx", metadata={"labels": ""})
    with pytest.raises(ModelError) as caught:
        Model(path)
    assert str(caught.value) == f"model {path}: metadata 'labels' is not a JSON list: ''"


@pytest.mark.parametrize("value", ["32x32", "[32]", '["a", "b"]'])
def test_an_input_size_that_is_not_height_width_is_named(tmp_path, value):
    path = make_model(tmp_path / "m.onnx", metadata={"input_size": value})
    with pytest.raises(ModelError) as caught:
        Model(path)
    assert str(caught.value) == f"model {path}: metadata 'input_size' is not a JSON list [height, width]: {value!r}"


def _edited(path, edit):
    """`path` after `edit(model proto)`: a contract broken in one place, as a third-party export might be."""
    import onnx

    proto = onnx.load(str(path))
    edit(proto)
    onnx.save(proto, str(path))
    return path


def _drop_metadata(key):
    def edit(proto):
        kept = [(p.key, p.value) for p in proto.metadata_props if p.key != key]
        del proto.metadata_props[:]
        for k, v in kept:
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
    return edit


def _rename(where, old, new):
    def edit(proto):
        for value in getattr(proto.graph, where):
            if value.name == old:
                value.name = new
        for node in proto.graph.node:
            node.input[:] = [new if name == old else name for name in node.input]
            node.output[:] = [new if name == old else name for name in node.output]
    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_drop_metadata("labels"), r"lacks metadata labels \(needs labels, input_size, resize, name, version"),
        (_drop_metadata("resize"), r"lacks metadata resize \(needs "),
        (_rename("input", "images", "pixels_in"),
         r"has inputs \['pixels_in'\]; the contract needs one named 'images'"),
        (_rename("output", "probabilities", "scores"),
         r"has outputs \['scores'\]; the contract needs 'probabilities'"),
    ],
    ids=["no-labels", "no-resize", "input-name", "output-name"],
)
def test_every_contract_violation_is_named(tmp_path, edit, message):
    path = _edited(make_model(tmp_path / "m.onnx"), edit)
    with pytest.raises(ModelError, match=message):
        Model(path)


def test_empty_labels_are_named(tmp_path):
    path = make_model(tmp_path / "m.onnx", metadata={"labels": "[]"})
    with pytest.raises(ModelError, match="metadata 'labels' must be a non-empty JSON list of strings"):
        Model(path)


def test_labels_must_match_outputs(tmp_path):
    path = make_model(tmp_path / "m.onnx", metadata={"labels": json.dumps(["a", "b"])})
    with pytest.raises(ModelError, match=r"output 'probabilities' is .*expected \[N, 2\]"):
        Model(path)


def test_unknown_resize_policy_is_named(tmp_path):
    path = make_model(tmp_path / "m.onnx", metadata={"resize": "letterbox"})
    with pytest.raises(ModelError, match="resize policy 'letterbox' is not supported; supported: squash"):
        Model(path)


def test_unavailable_provider_names_the_available_ones():
    with pytest.raises(ModelError, match=r"NoSuchExecutionProvider not available; available: .*CPUExecutionProvider"):
        choose_providers(["NoSuchExecutionProvider"])
    assert choose_providers(["auto"])[-1] == "CPUExecutionProvider"


@pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="the trained default model has not been exported yet")
def test_shipped_default_model_honours_the_contract():
    model = Model(None)
    assert model.info.path == DEFAULT_MODEL and model.info.metadata["precision"] == "int8"
    assert model_file(None, ["CUDAExecutionProvider", "CPUExecutionProvider"]) == DEFAULT_MODEL_GPU
    assert Model(DEFAULT_MODEL_GPU).info.metadata["precision"] == "fp16"
    fp32 = Model(DEFAULT_MODEL_FP32)
    assert fp32.info.metadata["precision"] == "fp32"
    assert fp32.info.metadata["data_fingerprint"] == model.info.metadata["data_fingerprint"]
    assert model.info.labels == ["dress", "hat", "longsleeve", "outwear", "pants", "shirt", "shoes",
                                 "shorts", "skirt", "t-shirt"]
    assert float(model.info.metadata["val_accuracy"]) >= 0.92
    assert model.probabilities(np.zeros((2, *model.input_size, 3), dtype=np.uint8)).shape == (2, 10)


def test_cpu_sessions_get_a_thread_per_core_and_gpu_sessions_one_that_does_not_spin() -> None:
    """What onnxruntime is told (its own sessions do not report their thread count back)."""
    from worker.affinity import place
    from worker.model import session_options

    cpu, placement = session_options(0, 1, False, gpu=False)
    assert placement == place(0) and cpu.intra_op_num_threads == placement.threads
    assert cpu.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert cpu.get_session_config_entry("session.force_spinning_stop") == "1"
    gpu, placement = session_options(0, 1, False, gpu=True)
    assert gpu.intra_op_num_threads == 1 and placement.pool_affinities == ""
    assert gpu.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    explicit, _ = session_options(3, 1, True, gpu=True)  # a configured count is kept, also on a GPU
    assert explicit.intra_op_num_threads == 3
    assert explicit.get_session_config_entry("session.force_spinning_stop") == "0"


def test_a_batch_alone_gets_every_core_and_one_started_meanwhile_gets_a_lane(tiny_model) -> None:
    """concurrent_batches: the lane policy (deterministic, through the model's own bookkeeping), then real
    concurrent runs from two threads giving the same answers as one at a time."""
    from worker.affinity import core_groups

    model = Model(tiny_model, concurrent_batches=2)
    if len(core_groups(model.placement.threads, 2)) < 2:
        pytest.skip("needs 2 physical cores")
    assert model.concurrent_batches == 2 and Model(tiny_model).concurrent_batches == 1
    # Lanes are plain CPU sessions: with any other execution provider first, every batch stays on it.
    # (AzureExecutionProvider is the one besides the CPU's in every onnxruntime build.)
    other = Model(tiny_model, providers=["AzureExecutionProvider", "CPUExecutionProvider"], concurrent_batches=2)
    assert other.providers[0] == "AzureExecutionProvider" and other.concurrent_batches == 1
    alone = model._take_lane()
    meanwhile = model._take_lane()
    assert alone is None and meanwhile == 0  # the main session (all cores), then the first lane
    model._give_back(alone)
    after = model._take_lane()  # the lane still runs: the next batch takes the other lane
    assert after == 1
    model._give_back(meanwhile)
    model._give_back(after)
    assert model._take_lane() is None  # nothing runs: every core again
    model._give_back(None)

    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8) for _ in range(8)]
    expected = [model.probabilities(b) for b in batches]
    got: dict[int, list[np.ndarray]] = {0: [], 1: []}

    def run(index: int) -> None:
        for _ in range(25):
            got[index].append(model.probabilities(batches[index * 4 + _ % 4]))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [len(got[index]) for index in (0, 1)] == [25, 25]  # a thread that raised would have fewer
    for index in (0, 1):
        for n, probs in enumerate(got[index]):
            np.testing.assert_allclose(probs, expected[index * 4 + n % 4], rtol=1e-5, atol=1e-6)
    assert model._running == 0 and sorted(model._free) == [0, 1]


# The CUDA and TensorRT branches, on this CPU build of onnxruntime. The one thing that cannot be real here is
# onnxruntime-gpu's listing: it names TensorRT and CUDA as available on any machine, GPU or not, so
# `gpu_listing` makes `onnxruntime.get_available_providers()` (which worker.model calls through the module)
# return that listing. Everything else is real: libnvinfer is absent (tensorrt_loadable() really is False),
# ort.preload_dlls() really runs, and the real InferenceSession, asked for TensorRT or CUDA (its own check of
# the providers does not go through the patched function), warns "Specified provider ... is not in available
# provider names" and starts on the CPU, as onnxruntime-gpu does (with an error log) where no GPU can start:
# the case of Model.__init__'s fallback to the CPU.
REAL_PROVIDERS = ort.get_available_providers()
GPU_LISTING = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
CPU_FALLBACK = "no GPU provider could start (have CPUExecutionProvider); running on the CPU"
ORT_REFUSES = r"Specified provider '(Tensorrt|CUDA)ExecutionProvider' is not in available provider names"
cpu_build = pytest.mark.skipif(any(p in REAL_PROVIDERS for p in GPU_PROVIDERS),
                               reason="this onnxruntime really lists a GPU provider")
default_model = pytest.mark.skipif(not (DEFAULT_MODEL.exists() and DEFAULT_MODEL_GPU.exists()),
                                   reason="the trained default model has not been exported yet")


@pytest.fixture
def gpu_listing(monkeypatch):
    """onnxruntime-gpu's listing on a machine without a GPU (see above), with the cached answers of
    tensorrt_loadable and preload_cuda_libraries cleared before and after: no test sees another's."""
    tensorrt_loadable.cache_clear()
    preload_cuda_libraries.cache_clear()
    monkeypatch.setattr(worker.model.ort, "get_available_providers", lambda: list(GPU_LISTING))
    yield
    tensorrt_loadable.cache_clear()
    preload_cuda_libraries.cache_clear()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "worker.model" and r.levelno >= logging.WARNING]


def _assert_cpu_session(model: Model, path, data: bytes) -> None:
    """`model` runs `path` (whose bytes are `data`) on the CPU only, rebuilt with the CPU's options
    (session_options(gpu=False): a thread per core, spinning) rather than the GPU's (one thread, no spin)."""
    assert model.info.path == path and model.info.model_id == hashlib.sha256(data).hexdigest()
    assert model.providers == ["CPUExecutionProvider"] and model.device == "cpu"
    _, cpu = session_options(0, 1, True, gpu=False)
    assert model.placement == cpu
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == cpu.threads
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"


@cpu_build
def test_auto_drops_tensorrt_when_libnvinfer_does_not_load(gpu_listing, caplog) -> None:
    assert choose_providers(["auto"]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert tensorrt_loadable() is False  # really: no libnvinfer on this machine
    assert preload_cuda_libraries.cache_info().currsize == 1  # CUDA listed: its libraries were preloaded
    assert choose_providers([]) == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert _warnings(caplog) == []


@cpu_build
@default_model
def test_default_model_without_a_usable_gpu_runs_the_int8_model_on_the_cpu_threads(
        gpu_listing, monkeypatch, caplog, tmp_path) -> None:
    """The fp16 GPU model is picked, no GPU provider starts, and the int8 CPU model runs instead, with the
    CPU's threads: the same model, predictions and placement as on a machine with the CPU build."""
    assert model_file(None, choose_providers(["auto"])) == DEFAULT_MODEL_GPU
    with pytest.warns(UserWarning, match=ORT_REFUSES):  # the real session asked for CUDA starts on the CPU
        model = Model()
    assert _warnings(caplog) == [CPU_FALLBACK]
    _assert_cpu_session(model, DEFAULT_MODEL, DEFAULT_MODEL.read_bytes())
    assert model.info.metadata["precision"] == "int8"

    monkeypatch.undo()  # back to the real listing: the model a machine with the CPU build runs
    assert worker.model.ort.get_available_providers() == REAL_PROVIDERS
    plain = Model()
    assert plain.info == model.info and plain.placement == model.placement
    assert plain.concurrent_batches == model.concurrent_batches
    image = write_image(tmp_path / "red.png", (200, 30, 40), size=(120, 90), noise_seed=1)
    pixels = load_pixels(image.read_bytes(), model.input_size, max_pixels=10_000_000)[None]
    np.testing.assert_allclose(model.probabilities(pixels), plain.probabilities(pixels), rtol=0, atol=1e-6)
    assert model.predict(pixels) == plain.predict(pixels)


@cpu_build
def test_an_explicit_model_without_a_usable_gpu_is_kept_on_the_cpu(gpu_listing, caplog, tiny_model) -> None:
    with pytest.warns(UserWarning, match=ORT_REFUSES):
        model = Model(tiny_model)
    assert _warnings(caplog) == [CPU_FALLBACK]
    _assert_cpu_session(model, tiny_model, tiny_model.read_bytes())  # the given file, not the int8 default
    assert model.info.labels == LABELS
    red = np.zeros((1, 32, 32, 3), dtype=np.uint8)
    red[..., 0] = 255
    assert model.predict(red)[0].category == "red"


@cpu_build
@default_model
def test_the_shipped_fp16_model_named_explicitly_is_not_swapped(gpu_listing, caplog) -> None:
    """Only the default (no path configured) switches to int8: a configured path, even the fp16 file, stays."""
    with pytest.warns(UserWarning, match=ORT_REFUSES):
        model = Model(DEFAULT_MODEL_GPU)
    assert _warnings(caplog) == [CPU_FALLBACK]
    _assert_cpu_session(model, DEFAULT_MODEL_GPU, DEFAULT_MODEL_GPU.read_bytes())
    assert model.info.metadata["precision"] == "fp16"


@cpu_build
def test_explicit_cuda_is_refused_when_not_listed(tiny_model, caplog) -> None:
    """The real listing of this CPU build, no patch: CUDA is not in it."""
    with pytest.raises(ModelError) as caught:
        Model(tiny_model, providers=["CUDAExecutionProvider"])
    assert str(caught.value) == ("execution provider(s) CUDAExecutionProvider not available; available: "
                                 + ", ".join(REAL_PROVIDERS))
    assert _warnings(caplog) == []


@cpu_build
def test_explicit_cuda_listed_but_unusable_falls_back_to_the_cpu(gpu_listing, caplog, tiny_model) -> None:
    assert choose_providers(["CUDAExecutionProvider"]) == ["CUDAExecutionProvider"]  # taken as asked
    with pytest.warns(UserWarning, match=ORT_REFUSES):
        model = Model(tiny_model, providers=["CUDAExecutionProvider"])
    assert _warnings(caplog) == [CPU_FALLBACK]
    _assert_cpu_session(model, tiny_model, tiny_model.read_bytes())
    assert model.predict(np.zeros((2, 32, 32, 3), dtype=np.uint8))[0].top3[0][0] == "red"  # ties: label order


def test_each_padded_batch_size_gets_a_session_of_its_own(tiny_model) -> None:
    """On a GPU, onnxruntime's CUDA Conv keeps cuDNN plans for the last input shape only and rebuilds them
    (seconds) at every change: the model keeps one session per padded batch size. No GPU here, so the
    selection is checked on real CPU sessions made the same way; the GPU path that calls it needs a GPU host
    (measured there: README, GPU)."""
    model = Model(tiny_model, providers=["CPUExecutionProvider"])
    first = model._session_for(64)
    assert first is model.session  # the first size uses the session already made
    assert model._session_for(64) is first
    one = model._session_for(1)
    assert one is not first and model._session_for(1) is one
    batch = np.random.default_rng(0).integers(0, 256, (1, *model.input_size, 3), dtype=np.uint8)
    same = [s.run(["probabilities"], {"images": batch})[0] for s in (first, one)]
    np.testing.assert_array_equal(*same)  # the same model and options, only a separate plan cache
    assert set(model._by_rows) == {1, 64}
