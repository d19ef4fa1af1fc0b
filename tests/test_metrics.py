"""The metrics endpoint scraped over loopback with urllib, parsed with Prometheus' own text parser."""

from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from worker.metrics import Metrics


def get(port: int, path: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} from a Prometheus text exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


@pytest.fixture
def served():
    metrics = Metrics()
    server = metrics.start_server("127.0.0.1", 0)
    yield metrics, server.server_address[1]
    metrics.stop()


@pytest.mark.timeout(60)
def test_scrape_reports_every_metric_after_observations(served):
    metrics, port = served
    assert port > 0 and metrics.port == port
    metrics.set_model("sha256abc", "efficientnet-lite2", "1.2.0")
    metrics.set_queue_depth(7)
    metrics.observe_batch(3, 0.020)
    metrics.observe_batch(16, 0.200)
    for status, seconds in [("ok", 0.3), ("ok", 0.7), ("failed", 0.05), ("duplicate", 0.01)]:
        metrics.observe_image(status, seconds)
    for stage, seconds in [("inference", 0.2), ("inference", 0.02), ("commit", 0.003)]:
        metrics.observe_stage(stage, seconds)

    code, content_type, body = get(port, "/metrics")
    assert code == 200
    assert content_type.startswith("text/plain")
    s = samples(body.decode())
    assert s[("fashion_worker_queue_depth", ())] == 7
    processed = "fashion_worker_images_processed_total"
    assert s[(processed, (("status", "ok"),))] == 2
    assert s[(processed, (("status", "failed"),))] == 1
    assert s[(processed, (("status", "duplicate"),))] == 1
    assert s[("fashion_worker_batch_size_count", ())] == 2
    assert s[("fashion_worker_batch_size_sum", ())] == 19
    assert s[("fashion_worker_batch_size_bucket", (("le", "4.0"),))] == 1
    assert s[("fashion_worker_batch_size_bucket", (("le", "16.0"),))] == 2
    assert s[("fashion_worker_inference_seconds_count", ())] == 2
    assert s[("fashion_worker_inference_seconds_sum", ())] == pytest.approx(0.22)
    assert s[("fashion_worker_inference_seconds_bucket", (("le", "0.025"),))] == 1
    assert s[("fashion_worker_end_to_end_seconds_count", ())] == 4
    assert s[("fashion_worker_end_to_end_seconds_bucket", (("le", "0.5"),))] == 3
    stage = "fashion_worker_batch_stage_seconds"
    assert s[(f"{stage}_count", (("stage", "inference"),))] == 2
    assert s[(f"{stage}_sum", (("stage", "inference"),))] == pytest.approx(0.22)
    assert s[(f"{stage}_count", (("stage", "commit"),))] == 1
    assert s[(f"{stage}_bucket", (("le", "0.005"), ("stage", "commit")))] == 1
    model = (("model_id", "sha256abc"), ("name", "efficientnet-lite2"), ("version", "1.2.0"))
    assert s[("fashion_worker_model_info", model)] == 1
    assert s[("fashion_worker_ready", ())] == 0


def test_counters_exist_at_zero_before_any_image(served):
    _metrics, port = served
    s = samples(get(port, "/metrics")[2].decode())
    for status in ("ok", "failed", "duplicate"):
        assert s[("fashion_worker_images_processed_total", (("status", status),))] == 0


@pytest.mark.timeout(60)
def test_healthz_is_503_until_ready_and_fresh_then_200_with_json(served):
    metrics, port = served
    code, content_type, body = get(port, "/healthz")
    assert (code, content_type) == (503, "application/json")
    assert json.loads(body)["status"] == "unavailable"

    metrics.set_ready(True)  # ready, but the loop has not beaten yet
    assert get(port, "/healthz")[0] == 503

    metrics.set_model("abc", "tiny", "1")
    metrics.set_queue_depth(2)
    metrics.heartbeat()
    code, _, body = get(port, "/healthz")
    health = json.loads(body)
    assert code == 200
    assert health["status"] == "ok"
    assert health["queue_depth"] == 2
    assert 0 <= health["last_heartbeat_age_s"] < 60
    assert health["model"] == {"model_id": "abc", "name": "tiny", "version": "1"}

    metrics.set_ready(False)  # shutting down
    assert get(port, "/healthz")[0] == 503


@pytest.mark.timeout(60)
def test_healthz_turns_503_when_the_heartbeat_goes_stale():
    metrics = Metrics(heartbeat_timeout_s=0.2)
    port = metrics.start_server("127.0.0.1", 0).server_address[1]
    try:
        metrics.set_ready(True)
        metrics.heartbeat()
        assert get(port, "/healthz")[0] == 200
        deadline = time.monotonic() + 30
        while get(port, "/healthz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        code, _, body = get(port, "/healthz")
        assert code == 503
        assert "heartbeat" in json.loads(body)["reason"]
    finally:
        metrics.stop()


def test_unknown_paths_are_404(served):
    assert get(served[1], "/")[0] == 404


def test_binds_to_loopback_by_default_and_stop_is_idempotent():
    metrics = Metrics()
    server = metrics.start_server(port=0)
    assert server.server_address[0] == "127.0.0.1"
    metrics.stop()
    metrics.stop()
    assert metrics.port is None


def test_works_with_the_server_off_and_instances_do_not_collide():
    first, second = Metrics(), Metrics()  # each its own registry: no "Duplicated timeseries" error
    first.observe_image("ok", 0.1)
    first.observe_batch(1, 0.01)
    first.set_queue_depth(4)
    first.stop()  # never started: harmless
    s = samples(first.exposition().decode())
    assert s[("fashion_worker_images_processed_total", (("status", "ok"),))] == 1
    assert samples(second.exposition().decode())[
        ("fashion_worker_images_processed_total", (("status", "ok"),))] == 0


def test_status_line_and_throughput_for_systemd_status():
    created = time.monotonic()
    metrics = Metrics()
    metrics.set_queue_depth(5)
    for _ in range(30):
        metrics.observe_image("ok", None)  # end-to-end time unknown: counted, not timed
    assert metrics.processed_total == 30
    # 30 images over the time since the start, counted as at least one second
    assert 30 / max(1.0, time.monotonic() - created) <= metrics.throughput() <= 30.0
    line = metrics.status_line()
    assert re.fullmatch(r"starting; queue 5; (\d+\.\d) images/s \(last minute\); 30 processed", line)
    assert 0 < float(line.split("; ")[2].split()[0]) <= 30.0
    metrics.set_ready(True)
    assert metrics.status_line().startswith("ready; ")
    s = samples(metrics.exposition().decode())
    assert s[("fashion_worker_end_to_end_seconds_count", ())] == 0
