"""worker/cli.py: exact output of each command, errors as one line, --help with defaults and examples.

Most tests call `main(argv)` in this process (the real code path, output captured by capsys); the error
tests run `python -m worker` as a subprocess to prove no traceback reaches the user.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import LABELS, make_model, unwritable, write_image

from worker.cli import COMMANDS, GLOBAL_FLAGS, database_url, load_config, main
from worker.store import ResultRecord, Store

TS = re.compile(r"\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(\.\d+)?(\+00:00)?")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current folder for the command: a config.toml, a model and an inbox."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text('[model]\npath = "model.onnx"\n[inbox]\nsettle_s = 0.2\n')
    make_model(tmp_path / "model.onnx")
    (tmp_path / "inbox").mkdir()
    return tmp_path


@pytest.fixture
def recorded(site: Path) -> Path:
    """A results database with four known rows (ids 1-4, committed in that order) and one worker."""
    store = Store(f"sqlite:///{site}/data/results.db")
    common = {"model_id": "m" * 64, "model_name": "tiny-test-model", "worker": "host:1", "size_bytes": 100}
    rows = [
        ResultRecord(file="red.jpg", location=f"{site}/processed/red.jpg", status="ok", sha256="a" * 64,
                     category="red", confidence=0.98, top3=[("red", 0.98), ("green", 0.015), ("blue", 0.005)],
                     **common),
        ResultRecord(file="shoes/blue sky.png", location=f"{site}/processed/shoes/blue sky.png", status="ok",
                     sha256="b" * 64, category="blue", confidence=0.61,
                     top3=[("blue", 0.61), ("green", 0.3), ("red", 0.09)], **common),
        ResultRecord(file="bad.jpg", location=f"{site}/failed/bad.jpg", status="failed", sha256="c" * 64,
                     error="not a supported image (expected one of JPEG, PNG, WEBP)", **common),
        ResultRecord(file="red, again.jpg", location=f"{site}/processed/red, again.jpg", status="ok",
                     sha256="a" * 64, category="red", confidence=0.98,
                     top3=[("red", 0.98), ("green", 0.015), ("blue", 0.005)], **common),
    ]
    for row in rows:
        store.add_results([row])
    store.heartbeat("host:1", "host", 1, 4)
    store.close()
    return site


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# classify -------------------------------------------------------------------------------------------------
def test_classify_prints_one_json_line_per_file(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(site / "a.png", (200, 100, 50))
    write_image(site / "b b.png", (10, 240, 30))
    code, out, err = run_cli(capsys, "classify", "a.png", "b b.png")
    assert (code, err) == (0, "")

    def line(file: str, color: tuple[int, int, int]) -> str:
        # the tiny model: softmax of 0.1 x the channel means (a flat PNG: the colour itself), 6 decimals
        logits = 0.1 * np.array(color, dtype=np.float64)
        p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = [(label, round(float(p[i]), 6)) for i, label in sorted(enumerate(LABELS), key=lambda x: -p[x[0]])]
        return json.dumps({"file": file, "status": "ok", "category": top[0][0], "confidence": top[0][1],
                           "top3": top, "model": "tiny-test-model 1"}) + "\n"

    assert out == line("a.png", (200, 100, 50)) + line("b b.png", (10, 240, 30))
    assert '"confidence": 0.999954' in out and '["green", 4.5e-05]' in out  # as the user sees it


def test_classify_reports_bad_files_and_exits_1(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(site / "a.png", (30, 60, 250))
    (site / "notes.jpg").write_text("hello")
    code, out, _ = run_cli(capsys, "classify", "notes.jpg", "a.png", "gone.jpg")
    assert code == 1
    assert [json.loads(line) for line in out.splitlines()] == [
        {"file": "notes.jpg", "status": "failed", "error": "not a supported image (expected one of JPEG, PNG, WEBP)",
         "model": "tiny-test-model 1"},
        {"file": "a.png", "status": "ok", "category": "blue", "confidence": 1.0,
         "top3": [["blue", 1.0], ["green", 0.0], ["red", 0.0]], "model": "tiny-test-model 1"},
        {"file": "gone.jpg", "status": "failed", "error": "no such file", "model": "tiny-test-model 1"},
    ]


# results and stats ----------------------------------------------------------------------------------------
def test_results_table(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "results")
    assert (code, err) == (0, "")
    assert TS.sub("<time>", out) == (
        "processed_at                      file                status  category  confidence"
        "  error\n"
        "--------------------------------  ------------------  ------  --------  ----------"
        "  -------------------------------------------------------\n"
        "<time>  red, again.jpg      ok      red           0.9800\n"
        "<time>  bad.jpg             failed                        "
        "not a supported image (expected one of JPEG, PNG, WEBP)\n"
        "<time>  shoes/blue sky.png  ok      blue          0.6100\n"
        "<time>  red.jpg             ok      red           0.9800\n"
    )


def test_results_json_with_filters(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "results", "--status", "ok", "--min-confidence", "0.9", "--since", "1h",
                           "--format", "json")
    assert code == 0
    rows = json.loads(out)
    for row in rows:
        assert TS.fullmatch(row.pop("processed_at")) and TS.fullmatch(row.pop("created_at"))
    common = {"status": "ok", "category": "red", "confidence": 0.98, "error": None, "model": "tiny-test-model",
              "model_id": "m" * 64, "sha256": "a" * 64, "size_bytes": 100, "worker": "host:1", "host": None,
              "ctime_ns": None, "top3": [["red", 0.98], ["green", 0.015], ["blue", 0.005]], "decode_ms": None,
              "inference_ms": None, "total_ms": None}
    assert rows == [
        {"id": 4, "file": "red, again.jpg", "location": f"{recorded}/processed/red, again.jpg",
         "duplicate_of": 1, **common},
        {"id": 1, "file": "red.jpg", "location": f"{recorded}/processed/red.jpg", "duplicate_of": None, **common},
    ]


def test_results_takes_a_negative_duration_as_a_value(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # argparse would read "-1h" as an unknown option; the rows were recorded a moment ago, so all four match.
    code, out, _ = run_cli(capsys, "results", "--since", "-1h", "--until", "-0s", "--format", "json")
    assert code == 0
    assert [row["file"] for row in json.loads(out)] == [
        "red, again.jpg", "bad.jpg", "shoes/blue sky.png", "red.jpg"]


def test_results_csv_by_category_and_file_glob(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "results", "--category", "red", "--file", "*again*", "--format", "csv")
    assert code == 0
    header, row, end = TS.sub("<time>", out).split("\n")
    assert header == ("id,file,location,sha256,size_bytes,status,category,confidence,top3,error,model,model_id,"
                      "duplicate_of,decode_ms,inference_ms,total_ms,created_at,processed_at,worker,host,ctime_ns")
    assert row == (f'4,"red, again.jpg","{recorded}/processed/red, again.jpg",{"a" * 64},100,ok,red,0.98,'
                   f'"[[""red"", 0.98], [""green"", 0.015], [""blue"", 0.005]]",,tiny-test-model,{"m" * 64},'
                   "1,,,,<time>,<time>,host:1,,")
    assert end == ""


def test_results_category_is_checked_against_what_is_known(recorded: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # recorded: red and blue; the configured model's labels: red, green, blue
    code, out, _ = run_cli(capsys, "results", "--category", "RED", "--format", "csv")
    assert code == 0 and [line.split(",")[0] for line in out.splitlines()] == ["id", "4", "1"]
    code, out, _ = run_cli(capsys, "results", "--category", "green", "--format", "csv")  # a label, no rows
    assert (code, out) == (0, "id,file,location,sha256,size_bytes,status,category,confidence,top3,error,model,"
                              "model_id,duplicate_of,decode_ms,inference_ms,total_ms,created_at,processed_at,"
                              "worker,host,ctime_ns\n")  # the header also when nothing matches
    code, out, err = run_cli(capsys, "results", "--category", "purple")
    assert (code, out) == (2, "")
    assert err == "fashion-worker: error: unknown category 'purple'; valid: blue, green, red\n"


def test_results_time_bounds_and_limit(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(capsys, "results", "--until", "1h", "--format", "json")[1] == "[]\n"
    code, out, _ = run_cli(capsys, "results", "--limit", "1", "--format", "json")
    assert code == 0
    assert [r["file"] for r in json.loads(out)] == ["red, again.jpg"]


def test_stats_text(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "stats")
    assert (code, err) == (0, "")
    assert TS.sub("<time>", out) == (
        f"Database:    sqlite:///{recorded}/data/results.db (schema version 4)\n"
        "Results:     4 total, 3 ok, 1 failed, 1 duplicate\n"
        "Throughput:  4.0/min over 1m, 0.8/min over 5m, 0.1/min over 60m\n"
        "First:       <time>\n"
        "Last:        <time>\n"
        "\n"
        "category  count\n"
        "--------  -----\n"
        "red           2\n"
        "blue          1\n"
        "\n"
        "worker  host  state    heartbeat                         age  processed  rate 5m\n"
        "------  ----  -------  --------------------------------  ---  ---------  -------\n"
        "host:1  host  running  <time>  0s           4  0.8/min\n"
    )


def test_stats_json(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "stats", "--json")
    data = json.loads(out)
    assert code == 0
    assert (data["total"], data["by_status"], data["by_category"], data["duplicates"]) == (
        4, {"ok": 3, "failed": 1}, {"red": 2, "blue": 1}, 1)
    assert [(w["id"], w["state"], w["processed"]) for w in data["workers"]] == [("host:1", "running", 4)]
    again = json.loads(run_cli(capsys, "stats", "--format", "json")[1])  # the same flag as results has

    def without_ages(stats: dict) -> dict:  # a heartbeat's age grows between the two calls
        return {**stats, "workers": [{k: v for k, v in w.items() if k != "heartbeat_age_s"} for w in stats["workers"]]}

    assert without_ages(again) == without_ages(data) and data["workers"][0]["heartbeat_age_s"] >= 0


def test_reading_commands_refuse_a_missing_database(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "stats", "--db", "nothing.db")
    assert (code, out) == (2, "")
    assert err == (f"fashion-worker: error: database {site}/nothing.db does not exist (nothing recorded yet, "
                   "or a wrong --db/--config)\n")
    assert not (site / "nothing.db").exists()


# run --once through the CLI, then results -----------------------------------------------------------------
@pytest.mark.timeout(60)
def test_run_once_polling_then_results(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(site / "inbox" / "red.png", (255, 0, 0))
    (site / "inbox" / "empty.jpg").write_bytes(b"")
    assert main(["run", "--once", "--polling"]) == 0
    assert f"processing inbox {site}/inbox (polling)" in capsys.readouterr().err
    out = run_cli(capsys, "results", "--format", "json")[1]
    rows = sorted(json.loads(out), key=lambda r: r["file"])
    assert [(r["file"], r["status"], r["category"], r["error"], r["location"]) for r in rows] == [
        ("empty.jpg", "failed", None, "empty file (0 bytes)", f"{site}/failed/empty.jpg"),
        ("red.png", "ok", "red", None, f"{site}/processed/red.png"),
    ]



@pytest.mark.timeout(120)
def test_run_once_with_inotify_logs_no_warning_or_error(site: Path) -> None:
    # A real process on the real inotify observer: stopping it used to log watchdog's ERROR
    # "InotifyEmitter.queue_events() called when the thread is inactive" at the end of most runs.
    for attempt in range(3):
        for index, color in enumerate([(255 - attempt, 0, 0), (0, 255 - attempt, 0), (0, 0, 255 - attempt)]):
            write_image(site / "inbox" / f"{attempt}-{index}.png", color)  # new content each time
        proc = subprocess.run([sys.executable, "-m", "worker", "run", "--once"], cwd=site,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stderr.splitlines()
        # Every line is an INFO log line: no WARNING/ERROR, and nothing outside the log (a traceback from a
        # dying thread, a Python warning) either.
        assert lines and all(TS.match(line) and line.split()[2] == "INFO" for line in lines), proc.stderr
        found = re.search(r"(\d+) file\(s\) already there reported, (\d+) more once they settle \(0.2s\)",
                          proc.stderr)
        assert found and int(found[1]) + int(found[2]) == 3, proc.stderr
        assert "done: 3 results recorded (0 failed, 0 duplicates)" in proc.stderr


# doctor ---------------------------------------------------------------------------------------------------
def test_doctor_all_ok(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = sorted(site.rglob("*"))
    code, out, err = run_cli(capsys, "doctor")
    assert (code, err) == (0, "")
    assert sorted(site.rglob("*")) == before  # a check creates nothing: no data/, no database, no lock file
    lines = out.replace(str(site), "<site>").splitlines()
    model_id = hashlib.sha256((site / "model.onnx").read_bytes()).hexdigest()[:12]
    assert lines[:6] == [
        "OK    config: <site>/config.toml",
        "OK    folders: inbox, processed and failed are distinct",
        "OK    inbox: <site>/inbox exists and is writable",
        "OK    processed: <site>/processed does not exist yet; the worker creates it",
        "OK    failed: <site>/failed does not exist yet; the worker creates it",
        f"OK    model: <site>/model.onnx (tiny-test-model 1, 3 labels, input 32x32, id {model_id})",
    ]
    assert lines[6].startswith("OK    providers: using CPUExecutionProvider (available: ")
    assert lines[7] == "OK    decode: on the CPU, 2 thread(s)"
    assert lines[8] == "OK    database: <site>/data/results.db does not exist yet; the worker creates it"
    assert re.fullmatch(r"OK    lock: free \(<site>/data/\.fashion-worker-[0-9a-f]{16}\.lock does not exist yet; "
                        r"the worker creates it\)", lines[9])
    assert re.fullmatch(r"OK    inotify: max_user_watches \d+, max_user_instances \d+; the inbox needs 1 "
                        r"watch\(es\)", lines[10])
    assert len(lines) == 11


def test_doctor_fails_gpu_decoding_without_a_gpu_model(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "config.toml").write_text((site / "config.toml").read_text() + '\n[batch]\ndecode_on = "gpu"\n')
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 1
    assert [line for line in out.splitlines() if line.startswith("FAIL")] == [
        'FAIL  decode: batch.decode_on = "gpu" needs the model on CUDA; it runs on CPUExecutionProvider '
        '(install onnxruntime-gpu, or use "cpu")']


def test_doctor_fails_on_a_bad_model_and_unwritable_folder(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "broken.onnx").write_bytes(b"not onnx")
    (site / "processed").write_text("a file where a folder should be")
    code, out, _ = run_cli(capsys, "doctor", "--model", "broken.onnx")
    assert code == 1
    fails = [line for line in out.replace(str(site), "<site>").splitlines() if line.startswith("FAIL")]
    assert fails[0] == "FAIL  processed: <site>/processed exists but is not a folder"
    assert fails[1].startswith("FAIL  model: model file <site>/broken.onnx cannot be loaded: ")
    assert len(fails) == 2


def test_doctor_fails_on_a_database_it_cannot_write(recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    path = recorded / "data" / "results.db"
    with unwritable(path):
        code, out, _ = run_cli(capsys, "doctor")
    assert code == 1
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert fails == [f"FAIL  database: sqlite:///{path} opens, but its file {path} is not writable by uid "
                     f"{os.geteuid()}: the worker could not record results"]


def test_doctor_reports_a_bad_config_as_a_failed_check(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (site / "config.toml").write_text("[batch]\nmax_batch = 0\n")
    code, out, _ = run_cli(capsys, "doctor")
    assert (code, out) == (1, "FAIL  config: config.toml: batch.max_batch must be at least 1, got 0\n")


# Errors, flags and help -----------------------------------------------------------------------------------
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "config", "message"),
    [
        (["--config", "missing.toml"], None, "config file missing.toml does not exist"),
        ([], "[inbox]\nfolder = 'x'\n", "config.toml: unknown key inbox.folder; valid: path, recursive, polling, "
                                            "poll_interval_s, settle_s, rescan_interval_s, ignore"),
        (["--model", "broken.onnx"], None, "model file {site}/broken.onnx cannot be loaded: "),
    ],
    ids=["missing-config", "unknown-key", "bad-model"],
)
def test_user_mistakes_print_one_line_and_exit_2(tmp_path: Path, args: list[str], config: str | None,
                                                 message: str) -> None:
    (tmp_path / "broken.onnx").write_bytes(b"\x08\x07garbage")
    if config is not None:
        (tmp_path / "config.toml").write_text(config)
    proc = subprocess.run([sys.executable, "-m", "worker", "run", "--once", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (2, "")
    # Before the error, only INFO log lines of the start-up steps that succeeded; then the one line, whole
    # (for the model, its start: onnxruntime's own words follow).
    *logged, error = proc.stderr.splitlines()
    assert all(TS.match(line) and line.split()[2] == "INFO" for line in logged), proc.stderr
    expected = "fashion-worker: error: " + message.format(site=tmp_path)
    assert error.startswith(expected) if message.endswith(": ") else error == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["results", "--format", "xml"],
         "argument --format: invalid choice: 'xml' (choose from 'table', 'json', 'csv')"),
        (["results", "--min-confidence", "2"], "argument --min-confidence: expected a number from 0 to 1, got 2"),
        (["results", "--limit", "-1"], "argument --limit: expected a number of at least 0, got -1"),
        (["results", "--since", "yesterday"], "argument --since: 'yesterday' is not a time; use ISO 8601 "
         "(2025-01-31 or 2025-01-31T12:00:00+00:00) or a duration back from now (90s, 15m, 2h, 7d)"),
        (["results", "--since", "9999999d"], "argument --since: '9999999d' is out of range (years 1 to 9999)"),
        (["results", "--until", "0001-01-01T00:00+01:00"],
         "argument --until: '0001-01-01T00:00+01:00' is out of range (years 1 to 9999)"),
        (["bench", "photos", "--burst", "0"], "argument --burst: expected a number of at least 1, got 0"),
        (["bench", "photos", "--idle-seconds", "0"], "argument --idle-seconds: expected more than 0 seconds, got 0"),
        (["bench", "photos", "--decode-threads", "-1"],
         "argument --decode-threads: expected a number of at least 1, got -1"),
        (["bench", "photos", "--batch-sizes", "a,b"],
         "argument --batch-sizes: expected comma-separated whole numbers, got 'a,b'"),
        (["bench", "photos", "--batch-sizes", "8,100000000"],  # a traceback from numpy: 18.4 TiB
         "argument --batch-sizes: expected numbers from 1 to 4096, got '8,100000000'"),
        (["run", "--log-level", "loud"],
         "argument --log-level: invalid level 'loud'; valid: DEBUG, INFO, WARNING, ERROR"),
        (["run", "--instance", "01"],
         "argument --instance: expected a worker number 1, 2, ... without leading zeros, got '01'"),
        (["doctor", "--instance", "0"],
         "argument --instance: expected a worker number 1, 2, ... without leading zeros, got '0'"),
        (["install-service", "--instances", "0"], "argument --instances: expected a number of at least 1, got 0"),
    ],
    ids=["choice", "confidence", "limit", "since", "since-overflow", "until-overflow", "burst", "idle", "threads",
         "batch-sizes", "batch-sizes-huge", "level",
         "instance-zero-padded", "instance-zero", "instances-zero"],
)
def test_a_bad_flag_is_one_line_naming_the_flag(site: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                                message: str) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    command = f"fashion-worker {argv[0]}"
    assert capsys.readouterr().err == f"{command}: error: {message} (see {command} --help)\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["bench", "config.toml"], "image folder config.toml is not a folder"),
        (["bench", "inbox", "--int8-model", "none.onnx"], "--int8-model none.onnx does not exist"),
        (["bench", "inbox", "--json", "nowhere/bench.json"],
         "--json nowhere/bench.json: its folder does not exist or is not writable"),
        (["bench", "inbox", "--workers", "2"], "--workers 2 needs --database URL: several workers share an inbox "
         "through PostgreSQL only, e.g. --database postgresql+psycopg://user@host/dbname"),
        (["bench", "inbox", "--workers", "3", "--database", "sqlite:///x.db"],
         "--database sqlite:///x.db: --workers 3 needs a PostgreSQL URL (postgresql+psycopg://user@host/dbname)"),
        (["bench", "inbox", "--workers", "65", "--database", "postgresql+psycopg://u:secret@h/d"],
         "--workers must be 1 to 64, got 65"),
    ],
    ids=["images-a-file", "int8-model", "json-folder", "workers-no-database", "workers-sqlite", "workers-many"],
)
def test_bench_checks_its_paths_before_it_starts(site: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                                 message: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (2, "")
    assert err == f"fashion-worker: error: {message.format(site=site)}\n"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out == f"fashion-worker {version('fashion-worker')}\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["stats", "--db", ""], "--db must not be empty"),
        (["run", "--once", "--inbox", " "], "--inbox must not be empty"),
        (["run", "--once", "--inbox", "config.toml"], "{site}/config.toml is not a folder"),
    ],
    ids=["db", "inbox", "inbox-a-file"],
)
def test_bad_paths_are_one_line(site: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                message: str) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert (code, out) == (2, "")
    *logged, error = err.splitlines()  # INFO lines of the start-up steps before the check, then the error
    assert all(TS.match(line) and line.split()[2] == "INFO" for line in logged), err
    assert error == f"fashion-worker: error: {message.format(site=site)}"


def test_a_missing_inbox_is_created_and_said_so(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--once", "--polling", "--inbox", "typo"]) == 0
    assert (site / "typo").is_dir()
    assert f"INFO worker.daemon: created the inbox {site}/typo (it did not exist)\n" in capsys.readouterr().err


@pytest.mark.parametrize("command", [name for name, _, _ in COMMANDS])
def test_every_command_has_help_with_defaults_and_examples(command: str,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:\n  " in text and "fashion-worker " + command.split("-")[0] in text
    text = " ".join(text.split())
    shared = {"--config": "--config FILE", "--inbox": "--inbox DIR", "--db": "--db URL|FILE",
              "--model": "--model FILE", "--log-level": "--log-level LEVEL"}
    for flag, usage in shared.items():  # only the shared flags the command uses: none is silently ignored
        assert (usage in text) == (flag in GLOBAL_FLAGS[command]), flag
    if command == "install-service":  # the config the service will run with
        assert "--config FILE the service's config file (default: /etc/fashion-worker/config.toml" in \
            text.replace("fashion- worker", "fashion-worker")  # argparse may wrap the line at the hyphen
    elif "--config" in GLOBAL_FLAGS[command]:
        assert "default: ./config.toml if it exists, else built-in defaults" in text


def test_a_shared_flag_a_command_does_not_use_is_refused(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_image(site / "a.png", (200, 0, 0))
    with pytest.raises(SystemExit) as info:
        main(["classify", "--db", "other.db", "a.png"])  # classify records nothing: --db would do nothing
    assert info.value.code == 2
    assert capsys.readouterr().err == ("fashion-worker classify: error: unrecognized arguments: --db "
                                       "(see fashion-worker classify --help)\n")


def test_a_shared_flag_before_the_command_says_where_it_goes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--config", "config.toml", "classify", "a.png"])
    assert info.value.code == 2
    assert capsys.readouterr().err == ("fashion-worker: error: --config goes after the command: fashion-worker "
                                       "COMMAND --config … (see fashion-worker --help)\n")


def test_results_help_shows_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["results", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--limit N newest N rows; 0 = all (default: 100)" in text
    assert "--format {table,json,csv} output format (default: table)" in text


def test_flag_paths_resolve_against_the_current_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf = tmp_path / "etc" / "config.toml"
    conf.parent.mkdir()
    conf.write_text('[inbox]\npath = "in"\n')
    monkeypatch.chdir(tmp_path)
    parser_args = ["run", "--config", str(conf)]
    from worker.cli import build_parser

    cfg = load_config(build_parser().parse_args(parser_args))
    assert cfg.inbox_path == conf.parent / "in"  # from the file: relative to the file
    cfg = load_config(build_parser().parse_args([*parser_args, "--inbox", "drop", "--db", "r.db"]))
    assert cfg.inbox_path == tmp_path / "drop"  # from a flag: relative to the current folder
    assert cfg.database_url == f"sqlite:///{tmp_path}/r.db"
    assert database_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"


def test_install_service_dry_run_prints_the_plan_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "service.toml"
    code, out, _ = run_cli(capsys, "install-service", "--dry-run", "--config", str(config), "--no-start")
    assert code == 0
    assert f"# write the default config {config}\n" in out
    assert "systemctl enable fashion-worker.service\n" in out
    assert "systemctl restart" not in out
    assert not config.exists()
    code, out, _ = run_cli(capsys, "uninstall-service", "--dry-run")
    assert code == 0 and "systemctl disable --now fashion-worker.service\n" in out


def test_bench_workers_with_a_database_it_cannot_reach_stop_before_measuring(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--workers checks its database first (a real connection attempt to a closed loopback port), so a
    wrong URL costs seconds, not the minutes of the other measurements, and ends in one line."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql+psycopg://fw:secret@127.0.0.1:{port}/bench"
    code, out, err = run_cli(capsys, "bench", "inbox", "--workers", "2", "--database", url)
    assert (code, out) == (2, "")
    assert err.startswith(f"fashion-worker: error: --database postgresql+psycopg://fw:***@127.0.0.1:{port}/bench: "
                          "cannot connect: ")
    assert len(err.splitlines()) == 1 and "secret" not in err
