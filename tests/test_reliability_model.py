"""Reliability 7: model faults. A missing, truncated, garbage or wrong-contract model file stops start-up
with exit status 2 and exactly one error line on stderr that names the file and the problem (before it,
only the INFO lines of the start-up steps that succeeded), no traceback; the images waiting in the inbox
are left untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import make_model
from onnx import TensorProto
from workerproc import Site, image_bytes, report

ERROR = "fashion-worker: error: "
NOT_LOADED = ERROR + "model file <model> cannot be loaded: [ONNXRuntimeError] : "  # then onnxruntime's words
# name -> (how the model file is made, the one error line: whole, or its start where onnxruntime's own words
# follow, which change between its versions). <model> stands for the model file's path.
CASES = {
    "missing": (lambda p: None, ERROR + "model file <model> does not exist"),
    "empty": (lambda p: p.write_bytes(b""), NOT_LOADED),
    "truncated": (lambda p: p.write_bytes(make_model(p).read_bytes()[:300]), NOT_LOADED),
    "garbage": (lambda p: p.write_bytes(b"\x00\x01not an onnx model" * 50), NOT_LOADED),
    "a folder": (lambda p: p.mkdir(), ERROR + "cannot read model file <model>: Is a directory"),
    "float input": (lambda p: make_model(p, input_dtype=TensorProto.FLOAT),
                    ERROR + "model <model>: input 'images' is tensor(float) ['N', 32, 32, 3]; the contract needs "
                            "tensor(uint8) [N, H, W, 3]"),
    "labels not JSON": (lambda p: make_model(p, metadata={"labels": "red,green,blue"}),
                        ERROR + "model <model>: metadata 'labels' is not a JSON list: 'red,green,blue'"),
    "labels count": (lambda p: make_model(p, metadata={"labels": json.dumps(["a", "b"])}),
                     ERROR + "model <model>: output 'probabilities' is ['N', 3], expected [N, 2]"),
    "input size mismatch": (lambda p: make_model(p, metadata={"input_size": "[64, 64]"}),
                            ERROR + "model <model>: input is 32x32 but metadata input_size says 64x64"),
    "unknown resize": (lambda p: make_model(p, metadata={"resize": "crop-and-pray"}),
                       ERROR + "model <model>: resize policy 'crop-and-pray' is not supported; supported: squash"),
}


def start_with(site_root: Path, case: str) -> tuple[str, int, str, str, float, bool]:
    site = Site(site_root)
    model = site.root / "model.onnx"
    model.unlink()
    make, _ = CASES[case]
    make(model)
    waiting = site.inbox / "waiting-red.jpg"
    waiting.write_bytes(image_bytes("red", 1))
    before = waiting.read_bytes()
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "worker", "run"], cwd=site.root, capture_output=True, text=True,
                          timeout=60)
    seconds = time.monotonic() - started
    untouched = waiting.read_bytes() == before and not any(site.processed.glob("*")) and \
        not any(site.failed.glob("*")) and not site.db.exists()  # no database made for nothing either
    return case, done.returncode, done.stdout, done.stderr, seconds, untouched


@pytest.mark.timeout(120)
def test_bad_model_files_stop_start_up_with_one_clear_line(tmp_path: Path, capsys) -> None:
    with ThreadPoolExecutor(4) as pool:  # each is a process start: run a few at a time
        results = list(pool.map(lambda case: start_with(tmp_path / case.replace(" ", "-"), case), CASES))
    problems = []
    for case, code, stdout, stderr, _, untouched in results:
        # stderr is also the log stream of `run`: INFO lines (the database opening) may come first.
        lines = [line for line in stderr.splitlines() if " INFO " not in line]
        model = str(tmp_path / case.replace(" ", "-") / "model.onnx")
        expected = CASES[case][1]
        if code != 2 or len(lines) != 1 or "Traceback" in stderr or not untouched:
            problems.append(f"{case}: exit {code}, untouched={untouched}, stderr={stderr!r}, stdout={stdout!r}")
        elif not (lines[0].replace(model, "<model>").startswith(expected) if expected == NOT_LOADED
                  else lines[0].replace(model, "<model>") == expected):
            problems.append(f"{case}: expected {expected!r}, got {lines[0]!r}")
    line = report(capsys, "model faults", cases=len(results), exit_2_one_line=len(results) - len(problems),
                  slowest_exit_s=round(max(r[4] for r in results), 2),
                  messages=" | ".join(f"{r[0]}: ...{r[3].strip().split('model.onnx', 1)[-1][:70]}" for r in results))
    assert not problems, f"{line}\n" + "\n".join(problems)
