"""Prometheus metrics and a health check for the running worker.

`Metrics` is always created by the worker loop and is cheap to update (a few lock-protected adds per
image); the HTTP endpoint is opt-in (`service.metrics_port`, 0 = off) and binds to 127.0.0.1 by default.

We use prometheus-client for the metric types and the text exposition format: it is the reference
implementation maintained by the Prometheus project, pure Python with no dependencies, and gets the
histogram/label escaping rules right. Each `Metrics` owns its own registry, so several workers (or
tests) in one process never collide. The HTTP server is our own small stdlib server so that `/metrics`
and `/healthz` share one port.

Endpoints:
- `GET /metrics`: Prometheus text format.
- `GET /healthz`: 200 `{"status": "ok", ...}` when the worker is ready (model warmed up) and its main
  loop has called `heartbeat()` within `heartbeat_timeout_s`; otherwise 503 `{"status": "unavailable"}`
  with the reason. For a load balancer, a systemd timer, or `curl -fsS`.
"""

from __future__ import annotations

import collections
import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

STATUSES = ("ok", "failed", "duplicate")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
INFERENCE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STAGES = ("wait", "match", "inference", "commit", "dispose")
END_TO_END_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
THROUGHPUT_WINDOW_S = 60


class Metrics:
    """Counters, gauges and histograms of one worker, and the state behind /healthz."""

    def __init__(self, heartbeat_timeout_s: float = 60.0, namespace: str = "fashion_worker") -> None:
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._queue_depth = Gauge(
            "queue_depth", "Image files waiting to be classified.", namespace=namespace, registry=r)
        self._images = Counter(
            "images_processed", "Images finished, by status (ok, failed, duplicate).", ["status"],
            namespace=namespace, registry=r)
        for status in STATUSES:  # present at 0 from the first scrape, so rate() works at once
            self._images.labels(status=status)
        self._batch_size = Histogram(
            "batch_size", "Images per inference batch.", buckets=BATCH_BUCKETS,
            namespace=namespace, registry=r)
        self._inference = Histogram(
            "inference_seconds", "Model inference time per batch.", buckets=INFERENCE_BUCKETS,
            namespace=namespace, registry=r)
        self._stage = Histogram(
            "batch_stage_seconds", "Time per batch in each step: in an inference thread, waiting for its "
            "files to be decoded, looking up earlier results, inference (GPU decoding included); in the main "
            "thread, the commit and moving the files.", ["stage"], buckets=INFERENCE_BUCKETS,
            namespace=namespace, registry=r)
        self._end_to_end = Histogram(
            "end_to_end_seconds", "From a file being ready in the inbox to its result row committed.",
            buckets=END_TO_END_BUCKETS, namespace=namespace, registry=r)
        self._model = Info("model", "The loaded model.", namespace=namespace, registry=r)
        self._ready = Gauge(
            "ready", "1 once the model is loaded and warmed up.", namespace=namespace, registry=r)
        self._heartbeat_ts = Gauge(
            "last_heartbeat_timestamp_seconds", "Unix time of the main loop's last heartbeat.",
            namespace=namespace, registry=r)

        self._lock = threading.Lock()
        self._depth = 0
        self._is_ready = False
        self._last_heartbeat: float | None = None  # time.monotonic()
        self._model_fields: dict[str, str] | None = None
        self._started = time.monotonic()
        self._total = 0
        # Per-second completion counts over the last THROUGHPUT_WINDOW_S seconds, for status lines.
        self._recent: collections.deque[list[int]] = collections.deque()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # Updates from the worker loop -------------------------------------------------------------------
    def set_queue_depth(self, n: int) -> None:
        self._depth = int(n)
        self._queue_depth.set(n)

    def observe_batch(self, size: int, inference_s: float) -> None:
        self._batch_size.observe(size)
        self._inference.observe(inference_s)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One batch spent `seconds` in `stage` (one of STAGES)."""
        self._stage.labels(stage=stage).observe(seconds)

    def observe_image(self, status: str, end_to_end_s: float | None = None) -> None:
        """One image finished with `status` (ok, failed, duplicate); end_to_end_s None = not timed."""
        self._images.labels(status=status).inc()
        if end_to_end_s is not None:
            self._end_to_end.observe(end_to_end_s)
        second = int(time.monotonic())
        with self._lock:
            self._total += 1
            if self._recent and self._recent[-1][0] == second:
                self._recent[-1][1] += 1
            else:
                self._recent.append([second, 1])
                while self._recent and self._recent[0][0] <= second - THROUGHPUT_WINDOW_S:
                    self._recent.popleft()

    def set_model(self, model_id: str, name: str, version: str) -> None:
        fields = {"model_id": model_id, "name": name, "version": version}
        self._model.info(fields)
        with self._lock:
            self._model_fields = fields

    def set_ready(self, ready: bool) -> None:
        self._is_ready = bool(ready)
        self._ready.set(1 if ready else 0)

    def heartbeat(self) -> None:
        """Called by the main loop on every turn (also when idle); /healthz fails when it stops."""
        self._last_heartbeat = time.monotonic()
        self._heartbeat_ts.set(time.time())

    # Reading ----------------------------------------------------------------------------------------
    @property
    def processed_total(self) -> int:
        return self._total

    def throughput(self, window_s: float = THROUGHPUT_WINDOW_S) -> float:
        """Images finished per second over the last `window_s` seconds (at most 60)."""
        now = time.monotonic()
        window = min(float(window_s), THROUGHPUT_WINDOW_S, max(now - self._started, 1.0))
        with self._lock:
            count = sum(n for second, n in self._recent if second > now - window)
        return count / window

    def status_line(self) -> str:
        """One line for systemd's STATUS=: queue depth, recent throughput and total."""
        state = "ready" if self._is_ready else "starting"
        return (f"{state}; queue {self._depth}; {self.throughput():.1f} images/s (last minute); "
                f"{self._total} processed")

    def health(self) -> tuple[bool, dict[str, Any]]:
        """(healthy, JSON-able body) as served by /healthz."""
        age = None if self._last_heartbeat is None else time.monotonic() - self._last_heartbeat
        with self._lock:
            model = dict(self._model_fields) if self._model_fields else None
        body: dict[str, Any] = {
            "status": "ok",
            "queue_depth": self._depth,
            "last_heartbeat_age_s": None if age is None else round(age, 3),
            "model": model,
        }
        if not self._is_ready:
            body["status"], body["reason"] = "unavailable", "not ready (model loading or shutting down)"
        elif age is None or age > self.heartbeat_timeout_s:
            body["status"] = "unavailable"
            body["reason"] = f"main loop heartbeat older than {self.heartbeat_timeout_s:g} s"
        return body["status"] == "ok", body

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric."""
        return generate_latest(self.registry)

    # HTTP endpoint ----------------------------------------------------------------------------------
    def start_server(self, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
        """Serve /metrics and /healthz on host:port in a daemon thread; port 0 = any free port.

        The bound port is `server.server_address[1]` (also `self.port`). Raises OSError if the address
        cannot be bound. Note that the config's `metrics_port = 0` means *off*: the caller does not call
        this then.
        """
        if self._server is not None:
            raise RuntimeError("metrics server already running")
        server_cls = _Server6 if ":" in host else _Server
        server = server_cls((host, port), _Handler)
        server.metrics = self
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                  name="metrics-http", daemon=True)
        thread.start()
        self._server, self._thread = server, thread
        log.info("metrics and health check on http://%s:%d/metrics and /healthz",
                 _url_host(host), server.server_address[1])
        return server

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_address[1]

    def stop(self) -> None:
        """Stop the HTTP server if it runs (idempotent)."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    metrics: Metrics


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "fashion-worker"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        metrics = self.server.metrics
        if path == "/metrics":
            self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/health"):
            healthy, body = metrics.health()
            self._send(200 if healthy else 503, json.dumps(body).encode() + b"\n", "application/json")
        else:
            self._send(404, b"not found; try /metrics or /healthz\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("metrics http: " + format, *args)
