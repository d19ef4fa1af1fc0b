"""`fashion-worker bench` runs the real worker and reports every figure (speed itself is not asserted)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from conftest import make_model, write_image
from pgserver import postgres_server

from worker.bench import BenchOptions, bottleneck, image_files, per_batch, percentile, several_workers, targets


@pytest.mark.timeout(300)
def test_bench_reports_every_figure(tmp_path):
    images = tmp_path / "images"
    for i, color in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)] * 2):
        write_image(images / f"{i}.jpg", color, (400, 533), noise_seed=i)
    model = make_model(tmp_path / "tiny.onnx", size=(64, 64))
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, "-m", "worker", "bench", str(images), "--model", str(model), "--burst", "12",
         "--large", "2", "--drops", "3", "--batch-sizes", "1,4", "--threads", "1", "--idle-seconds", "1",
         "--ceiling", "--json", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=280,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert [(r["threads"], r["batch"]) for r in report["model_throughput"]] == [(1, 1), (1, 4)]
    assert all(r["images_per_s"] > 0 for r in report["model_throughput"])
    assert report["decode"]["listing_images_per_s"] > 0 and report["decode"]["large_12mp_images_per_s"] > 0
    e2e = report["end_to_end"]
    assert e2e["burst"]["images"] == 12 and e2e["burst"]["images_per_s"] > 0
    per_batch = e2e["burst"]["per_batch"]  # from the worker's own Prometheus metrics, burst only
    assert per_batch["batches"] >= 1 and 0 < per_batch["images_per_batch"] <= 16
    assert per_batch["batches"] * per_batch["images_per_batch"] == pytest.approx(12, abs=0.6)
    assert all(per_batch[f"{stage}_ms"] >= 0 for stage in ("wait", "match", "inference", "commit", "dispose"))
    assert per_batch["inference_ms"] > 0 and per_batch["commit_ms"] > 0
    assert e2e["large_burst"]["images"] == 2
    assert e2e["latency_ms"]["drops"] == 3 and 0 < e2e["latency_ms"]["p50"] <= e2e["latency_ms"]["p95"]
    assert e2e["idle_cpu_percent"] >= 0 and e2e["peak_rss_mb"] > 0
    assert e2e["failed_rows"] == 0 and e2e["worker_exit_code"] == 0
    assert set(report["targets"]) == {"burst_vs_model", "latency_p50", "idle_cpu", "large_vs_listing"}
    assert report["decode"]["threads"] == 2 and report["decode"]["listing_images_per_s_all_threads"] > 0
    assert report["ceiling"]["images"] == 12 and report["ceiling"]["images_per_s"] > 0
    assert report["ceiling"]["cpu_ms_per_image_besides_the_model"] > 0
    assert set(report["bottleneck"]["stages_images_per_s"]) == {"decode", "inference", "decode_and_bookkeeping"}
    assert 0 < report["bottleneck"]["best_possible_ratio"] < 1
    assert report["model"]["providers"] == ["CPUExecutionProvider"]
    for heading in ("model throughput", "decode+resize", "end to end", "per batch (", "single-drop latency",
                    "ceiling (same burst",
                    "stages (images/s)", "targets:"):
        assert heading in result.stdout
    assert "bench: starting the worker" in result.stderr


@pytest.mark.timeout(300)
def test_bench_times_several_workers_sharing_the_inbox_through_postgresql(tmp_path):
    """--workers 2: two real `run --instance` processes on one inbox and a real PostgreSQL server; every photo
    of the burst gets exactly one row, and a second run in the same database counts only its own rows."""
    images = tmp_path / "images"
    for i, color in enumerate([(200, 20, 20), (20, 200, 20), (20, 20, 200)] * 2):
        write_image(images / f"{i}.jpg", color, (400, 533), noise_seed=i)
    model = make_model(tmp_path / "tiny.onnx", size=(64, 64))
    out = tmp_path / "bench.json"
    with postgres_server() as url:
        result = subprocess.run(
            [sys.executable, "-m", "worker", "bench", str(images), "--model", str(model), "--burst", "24",
             "--large", "2", "--drops", "2", "--batch-sizes", "1,4", "--threads", "1", "--idle-seconds", "1",
             "--max-batch", "4", "--workers", "2", "--database", url, "--json", str(out)],
            capture_output=True, text=True, cwd=tmp_path, timeout=280,
        )
        assert result.returncode == 0, result.stderr
        options = BenchOptions(images=images, burst=6, workers=2, database=url, max_batch=4, decode_threads=1)
        again = several_workers(tmp_path / "again", image_files(images), model, options)
        with sa.create_engine(url).connect() as conn:
            total = conn.execute(sa.text("select count(*) from results")).scalar_one()
    group = json.loads(out.read_text())["workers"]
    assert (group["workers"], group["images"], group["rows"], group["files"]) == (2, 24, 24, 24)
    assert group["failed_rows"] == 0 and group["worker_exit_codes"] == [0, 0]
    assert len(group["rows_per_worker"]) in (1, 2)  # ids of their own, never a production worker's HOST@i
    assert all(re.fullmatch(r"bench-\d+-\d+@[12]", worker) for worker in group["rows_per_worker"])
    assert sum(group["rows_per_worker"].values()) == 24
    assert group["images_per_s"] > 0 and group["cpu_ms_per_image"] > 0 and group["peak_rss_mb_per_worker"] > 0
    assert group["per_batch"]["batches"] >= 6 and group["per_batch"]["inference_ms"] > 0
    line = f"  2 workers sharing the inbox (PostgreSQL), burst of 24: {group['images_per_s']:.1f} images/s"
    assert line in result.stdout
    assert "one row per photo" in result.stdout
    assert "bench: 2 workers sharing the inbox: burst of 24" in result.stderr
    assert (again["images"], again["rows"], again["files"], again["worker_exit_codes"]) == (6, 6, 6, [0, 0])
    assert total == 24 + 2 + 6 + 2  # each run's burst and as many warm-up photos as workers (whichever
    # workers take them); the bench's own single-worker figures went to its temp SQLite file


def test_bench_names_a_missing_image_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "worker", "bench", str(tmp_path / "none")],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"fashion-worker: error: image folder {tmp_path / 'none'} does not exist"


def test_model_throughput_also_times_the_workers_concurrent_batches(tmp_path):
    """On 2 cores or more the table gets the worker's own setup: two batches at once, a share of the cores
    each (model.concurrent_batches); with concurrent_batches = 1 only one batch at a time is timed."""
    from worker.affinity import core_groups, place
    from worker.bench import model_throughput

    if len(core_groups(place(0).threads, 2)) < 2:
        pytest.skip("needs 2 physical cores")
    model = make_model(tmp_path / "tiny.onnx", size=(64, 64))
    decoded = np.zeros((4, 64, 64, 3), dtype=np.uint8)
    rows = model_throughput(model, decoded, [1, 4], [2], concurrent=0)
    assert [(r["threads"], r.get("concurrent", 1), r["batch"]) for r in rows] == [
        (2, 1, 1), (2, 1, 4), (2, 2, 1), (2, 2, 4)]
    assert all(r["images_per_s"] > 0 for r in rows)
    assert [r.get("concurrent", 1) for r in model_throughput(model, decoded, [1], [2], concurrent=1)] == [1]


def hand_made_report(*, burst: float, large_ms: float, p50: float, idle: float, speedup: float,
                     provider: str = "CPUExecutionProvider") -> dict:
    """A report with the figures `targets` and `bottleneck` read, chosen so each verdict is known."""
    return {
        "machine": {"cores": 2},
        "model": {"providers": [provider]},
        "model_throughput": [  # the best at the worker's batch size (16) with every thread: 200 images/s
            {"threads": 1, "batch": 16, "images_per_s": 120.0}, {"threads": 2, "batch": 1, "images_per_s": 150.0},
            {"threads": 2, "batch": 16, "images_per_s": 190.0}, {"threads": 2, "batch": 16, "images_per_s": 200.0},
            {"threads": 2, "batch": 32, "images_per_s": 400.0},  # above max_batch: not the comparison
        ],
        "decode": {"listing_images_per_s_all_threads": 1000.0},
        "ceiling": {"images_per_s": 600.0, "cpu_ms_per_image_besides_the_model": 2.5},
        "single_image_inference_ms": 5.0,
        "int8": {"speedup": speedup},
        "end_to_end": {"burst": {"images_per_s": burst, "ms_per_image": 1000 / burst},
                       "large_burst": {"ms_per_image": large_ms}, "latency_ms": {"p50": p50},
                       "idle_cpu_percent": idle},
    }


def test_targets_are_ratios_against_the_model_alone_at_the_worker_batch_size() -> None:
    options = BenchOptions(images=Path("."), batch_sizes=[1, 16, 32], threads=[1, 2], max_batch=16, max_wait_ms=20)
    met = targets(hand_made_report(burst=170.0, large_ms=15.0, p50=30.0, idle=0.5, speedup=1.6), options)
    assert met == {
        "burst_vs_model": {"ratio": 0.85, "target": ">= 0.85", "met": True},  # 170 / 200
        "latency_p50": {"ms": 30.0, "bound_ms": 30.0, "met": True},  # 20 + 2 x 5
        "int8_speedup": {"ratio": 1.6, "target": ">= 1.6", "met": True},
        "idle_cpu": {"percent": 0.5, "target": "< 1", "met": True},
        "large_vs_listing": {"ratio": 2.55, "target": "<= 3", "met": True},  # 15 / (1000 / 170)
    }
    missed = targets(hand_made_report(burst=160.0, large_ms=20.0, p50=30.1, idle=1.0, speedup=1.5,
                                      provider="CUDAExecutionProvider"), options)
    assert {name: verdict["met"] for name, verdict in missed.items()} == {
        "burst_vs_model": False, "latency_p50": False, "int8_speedup": False, "gpu_end_to_end": False,
        "idle_cpu": False, "large_vs_listing": False}
    assert missed["gpu_end_to_end"] == {"images_per_s": 160.0, "workers": 1, "target": ">= 3000", "met": False}
    several = hand_made_report(burst=160.0, large_ms=20.0, p50=30.1, idle=1.0, speedup=1.5,
                               provider="CUDAExecutionProvider")
    several["workers"] = {"workers": 4, "images_per_s": 3000.0}  # the better of one worker and several counts
    assert targets(several, options)["gpu_end_to_end"] == {"images_per_s": 3000.0, "workers": 4,
                                                           "target": ">= 3000", "met": True}


def test_bottleneck_names_the_slowest_stage_and_the_bound_the_cpu_allows() -> None:
    options = BenchOptions(images=Path("."), batch_sizes=[1, 16, 32], threads=[1, 2], max_batch=16)
    found = bottleneck(hand_made_report(burst=170.0, large_ms=15.0, p50=30.0, idle=0.5, speedup=2.0), options)
    assert found["stages_images_per_s"] == {"decode": 1000.0, "inference": 200.0, "decode_and_bookkeeping": 600.0}
    assert found["slowest"] == "inference"
    # per photo: the model 2 cores / 200 per s = 10 core-ms, the rest 2.5: at most 10 / 12.5 of the model
    assert found["best_possible_ratio"] == 0.8
    slow = bottleneck(hand_made_report(burst=90.0, large_ms=15.0, p50=30.0, idle=0.5, speedup=2.0), options)
    assert slow["slowest"] == "the worker between the stages (per-file and per-batch work, contention)"


def test_percentile_and_per_batch() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5 and np.isnan(percentile([], 50))
    before = {"images": (10.0, 2.0), "inference": (0.1, 2.0)}
    after = {"images": (42.0, 4.0), "inference": (0.5, 4.0)}
    stages = per_batch(before, after)
    assert stages["batches"] == 2 and stages["images_per_batch"] == 16.0
    assert stages["inference_ms"] == 200.0  # 0.4 s over 2 batches


def test_the_workers_config_carries_the_bench_settings(tmp_path) -> None:
    """The config bench writes for its worker(s) loads, and passes on the model and batch settings, the
    inference threads included (model.intra_op_threads of the config given to bench)."""
    from worker.bench import write_config
    from worker.config import load

    options = BenchOptions(images=Path("."), max_batch=64, decode_threads=8, max_queue=8192, decode_on="cpu",
                           intra_op_threads=4, spin_wait=True)
    path = write_config(tmp_path, tmp_path / "m.onnx", options, "postgresql+psycopg://u@h/d", 9100)
    config = load(path)
    assert (config.model.intra_op_threads, config.model.spin_wait) == (4, True)
    assert (config.batch.max_batch, config.batch.decode_threads, config.batch.max_queue) == (64, 8, 8192)
    assert (config.database.url, config.service.metrics_port) == ("postgresql+psycopg://u@h/d", 9100)
