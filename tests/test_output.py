"""worker.output: each format asserted as an exact string; CSV round-trips hostile names."""

from __future__ import annotations

import csv
import io
import json

import pytest

from worker.output import render, render_stats

ROWS = [
    {"file": "a.jpg", "category": "shirt", "confidence": 0.9123, "duplicate_of": None,
     "top3": [["shirt", 0.9]]},
    {"file": "shoes/long name.png", "category": None, "confidence": None, "duplicate_of": 1, "top3": None},
]


def test_table() -> None:
    assert render(ROWS, "table") == (
        "file                 category  confidence  duplicate_of  top3\n"
        "-------------------  --------  ----------  ------------  ----------------\n"
        "a.jpg                shirt         0.9123                [[\"shirt\", 0.9]]\n"
        "shoes/long name.png                                   1\n"
    )


def test_table_with_chosen_columns_and_escaped_control_characters() -> None:
    rows = [{"file": "new\nline.jpg", "size": 12}, {"file": "tab\there", "size": 3456}]
    assert render(rows, "table", ["size", "file"]) == (
        "size  file\n"
        "----  -------------\n"
        "  12  new\\nline.jpg\n"
        "3456  tab\\there\n"
    )


def test_table_aligns_wide_characters() -> None:
    rows = [{"file": "画像.jpg", "n": 1}, {"file": "ab.jpg", "n": 2}]
    assert render(rows, "table") == (
        "file      n\n"
        "--------  -\n"
        "画像.jpg  1\n"
        "ab.jpg    2\n"
    )


def test_table_without_rows_keeps_the_header() -> None:
    assert render([], "table", ["file", "status"]) == "file  status\n----  ------\n"
    assert render([], "table") == ""


def test_json() -> None:
    assert render(ROWS[1:], "json", ["file", "confidence", "duplicate_of"]) == (
        "[\n"
        "  {\n"
        '    "file": "shoes/long name.png",\n'
        '    "confidence": null,\n'
        '    "duplicate_of": 1\n'
        "  }\n"
        "]\n"
    )
    assert render([], "json") == "[]\n"
    text = render([{"file": 'ü "q"\n.jpg', "top3": [["a", 0.5]]}], "json")
    assert json.loads(text) == [{"file": 'ü "q"\n.jpg', "top3": [["a", 0.5]]}]
    assert "ü" in text  # not \u-escaped


def test_csv() -> None:
    assert render(ROWS, "csv") == (
        "file,category,confidence,duplicate_of,top3\n"
        'a.jpg,shirt,0.9123,,"[[""shirt"", 0.9]]"\n'
        "shoes/long name.png,,,1,\n"
    )
    assert render([], "csv", ["file"]) == "file\n"


def test_csv_round_trips_a_name_with_quote_comma_and_newline() -> None:
    name = 'he said "hi", then\nleft.jpg'
    text = render([{"file": name, "confidence": 0.1 + 0.2}], "csv")
    assert text == 'file,confidence\n"he said ""hi"", then\nleft.jpg",0.30000000000000004\n'
    parsed = list(csv.reader(io.StringIO(text, newline="")))
    assert parsed == [["file", "confidence"], [name, "0.30000000000000004"]]
    assert float(parsed[1][1]) == 0.1 + 0.2


def test_unknown_format_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown output format 'xml'; valid: table, json, csv"):
        render(ROWS, "xml")


def test_render_stats() -> None:
    stats = {
        "database": "sqlite:////srv/data/results.db", "schema_version": 1, "total": 12,
        "by_status": {"ok": 10, "failed": 2}, "by_category": {"shirt": 7, "dress": 3}, "duplicates": 1,
        "throughput": {"1m": 2.0, "5m": 1.25, "60m": 0.2},
        "first_activity": "2025-01-31T12:00:00+00:00", "last_activity": "2025-01-31T13:00:00+00:00",
        "workers": [{"id": "web1:42", "host": "web1", "pid": 42, "started_at": "2025-01-31T11:00:00+00:00",
                     "heartbeat_at": "2025-01-31T13:00:05+00:00", "heartbeat_age_s": 4.6, "processed": 12,
                     "state": "running", "throughput_5m": 1.25}],
    }
    assert render_stats(stats) == (
        "Database:    sqlite:////srv/data/results.db (schema version 1)\n"
        "Results:     12 total, 10 ok, 2 failed, 1 duplicate\n"
        "Throughput:  2.0/min over 1m, 1.2/min over 5m, 0.2/min over 60m\n"
        "First:       2025-01-31T12:00:00+00:00\n"
        "Last:        2025-01-31T13:00:00+00:00\n"
        "\n"
        "category  count\n"
        "--------  -----\n"
        "shirt         7\n"
        "dress         3\n"
        "\n"
        "worker   host  state    heartbeat                  age  processed  rate 5m\n"
        "-------  ----  -------  -------------------------  ---  ---------  -------\n"
        "web1:42  web1  running  2025-01-31T13:00:05+00:00  5s          12  1.2/min\n"
    )


def test_render_stats_of_an_empty_database() -> None:
    stats = {"database": "sqlite:///x.db", "schema_version": 1, "total": 0,
             "by_status": {"ok": 0, "failed": 0},
             "by_category": {}, "duplicates": 0, "throughput": {"1m": 0.0, "5m": 0.0, "60m": 0.0},
             "first_activity": None, "last_activity": None, "workers": []}
    assert render_stats(stats) == (
        "Database:    sqlite:///x.db (schema version 1)\n"
        "Results:     0 total, 0 ok, 0 failed, 0 duplicates\n"
        "Throughput:  0.0/min over 1m, 0.0/min over 5m, 0.0/min over 60m\n"
        "First:       -\n"
        "Last:        -\n"
        "\n"
        "No classified images yet.\n"
        "\n"
        "No workers have reported yet.\n"
    )


def test_render_stats_of_workers_sharing_a_postgresql_database() -> None:
    worker = {"started_at": "2025-01-31T11:00:00+00:00", "heartbeat_age_s": 2.0, "state": "running"}
    stats = {
        "database": "postgresql+psycopg://fw@db/results", "schema_version": 2, "total": 30,
        "by_status": {"ok": 30, "failed": 0}, "by_category": {"shirt": 30}, "duplicates": 0,
        "throughput": {"1m": 30.0, "5m": 6.0, "60m": 0.5},
        "first_activity": "2025-01-31T12:59:00+00:00", "last_activity": "2025-01-31T13:00:00+00:00",
        "workers": [
            {**worker, "id": "web1:42", "host": "web1", "pid": 42, "heartbeat_at": "2025-01-31T13:00:05+00:00",
             "processed": 20, "throughput_5m": 4.0, "claims": 16},
            {**worker, "id": "gpu", "host": "web2", "pid": 7, "heartbeat_at": "2025-01-31T13:00:04+00:00",
             "processed": 10, "throughput_5m": 2.0, "claims": 0},
        ],
        "claims": {"enabled": True, "held": 16, "lapsed": 3, "takeovers": 1},
    }
    assert render_stats(stats).split("\n\n")[0].splitlines()[-1] == (
        "Claims:      16 held, 3 lapsed (their workers stopped renewing them)")
    assert render_stats(stats).split("\n\n")[2] == (
        "worker   host  state    heartbeat                  age  processed  rate 5m  claims\n"
        "-------  ----  -------  -------------------------  ---  ---------  -------  ------\n"
        "web1:42  web1  running  2025-01-31T13:00:05+00:00  2s          20  4.0/min      16\n"
        "gpu      web2  running  2025-01-31T13:00:04+00:00  2s          10  2.0/min       0\n"
    )
