"""worker.query on a real SQLite file: every filter, ordering, row dicts and stats."""

from __future__ import annotations

import os
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from worker.exceptions import ConfigError
from worker.query import RESULT_KEYS, ResultFilter, parse_time, results, stats
from worker.store import ResultRecord, Store

T0 = datetime(2025, 1, 31, 12, 0, tzinfo=UTC)
MODEL = "m" * 64


def rec(file: str, sha: str, category: str | None, confidence: float | None, *, worker: str = "host:1",
        error: str | None = None) -> ResultRecord:
    return ResultRecord(
        file=file, location=f"/srv/inbox/{file}", sha256=sha, status="failed" if error else "ok",
        category=category, confidence=confidence, error=error, model_id=MODEL, model_name="tiny-v1",
        worker=worker, top3=None if error else [(category, confidence), ("other", 0.01)],
    )


# (file, sha, category, confidence, error); row i is processed at T0 + i hours.
ROWS = [
    ("shirt.jpg", "1", "shirt", 0.91, None),
    ("shoes/left.PNG", "2", "shoes", 0.55, None),
    ("shoes/right.png", "3", "shoes", 0.75, None),
    ("broken.jpg", "4", None, None, "not an image"),
    ("100%_off.jpg", "5", "dress", 0.99, None),
    ("100 off.jpg", "1", "shirt", 0.91, None),  # same content as shirt.jpg: a duplicate
]


@pytest.fixture
def store(tmp_path: Path):
    path = tmp_path / "results.db"
    with Store(f"sqlite:///{path}") as opened:
        opened.add_results([rec(f, sha * 64, c, p, error=e) for f, sha, c, p, e in ROWS])
        # Spread processed_at over hours so that time filters and ordering can be checked exactly.
        with sqlite3.connect(path) as conn:
            for i in range(len(ROWS)):
                stamp = (T0 + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M:%S.%f")
                conn.execute("UPDATE results SET processed_at = ? WHERE id = ?", (stamp, i + 1))
        yield opened


def files(store: Store, **kwargs: object) -> list[str]:
    return [row["file"] for row in results(store, ResultFilter(**kwargs))]  # type: ignore[arg-type]


def test_rows_are_newest_first_with_every_key(store: Store) -> None:
    rows = results(store)
    assert [r["file"] for r in rows] == [r[0] for r in reversed(ROWS)]
    assert tuple(rows[0]) == RESULT_KEYS
    newest = rows[0]
    assert newest["processed_at"] == "2025-01-31T17:00:00+00:00"
    assert (newest["model"], newest["model_id"], newest["worker"]) == ("tiny-v1", MODEL, "host:1")
    assert (newest["duplicate_of"], newest["location"]) == (1, "/srv/inbox/100 off.jpg")
    assert newest["top3"] == [["shirt", 0.91], ["other", 0.01]]
    assert datetime.fromisoformat(newest["created_at"]).tzinfo is not None
    broken = next(r for r in rows if r["file"] == "broken.jpg")
    assert (broken["status"], broken["error"], broken["category"], broken["top3"]) == (
        "failed", "not an image", None, None)


def test_category_filter(store: Store) -> None:
    assert files(store, category="shoes") == ["shoes/right.png", "shoes/left.PNG"]
    assert files(store, category="no-such-label") == []


def test_status_filter(store: Store) -> None:
    assert files(store, status="failed") == ["broken.jpg"]
    assert len(files(store, status="ok")) == 5
    with pytest.raises(ConfigError, match="status must be one of ok, failed, got 'done'"):
        results(store, ResultFilter(status="done"))


def test_confidence_filters(store: Store) -> None:
    assert files(store, min_confidence=0.9) == ["100 off.jpg", "100%_off.jpg", "shirt.jpg"]
    assert files(store, max_confidence=0.75) == ["shoes/right.png", "shoes/left.PNG"]  # inclusive
    assert files(store, min_confidence=0.6, max_confidence=0.95) == ["100 off.jpg", "shoes/right.png",
                                                                     "shirt.jpg"]
    for bad in ({"min_confidence": 1.5}, {"max_confidence": -0.1}, {"min_confidence": "high"}):
        with pytest.raises(ConfigError, match="must be a number from 0 to 1"):
            results(store, ResultFilter(**bad))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="above max_confidence"):
        results(store, ResultFilter(min_confidence=0.8, max_confidence=0.2))


def test_time_filters(store: Store) -> None:
    # since is inclusive, until exclusive; datetimes, ISO strings, naive = UTC, offsets converted.
    assert files(store, since=T0 + timedelta(hours=4)) == ["100 off.jpg", "100%_off.jpg"]
    assert files(store, until="2025-01-31T14:00:00") == ["shoes/left.PNG", "shirt.jpg"]
    assert files(store, since="2025-01-31T14:00+01:00", until="2025-01-31T15:00:00Z") == [
        "shoes/right.png", "shoes/left.PNG"]  # 13:00 and 14:00 UTC
    assert files(store, since="2025-02-01") == []
    assert len(files(store, since="36500d")) == 6  # a duration back from now (a century: the rows are of 2025)
    with pytest.raises(ConfigError, match="since 'yesterday' is not a time"):
        results(store, ResultFilter(since="yesterday"))
    with pytest.raises(ConfigError, match="must be before until"):
        results(store, ResultFilter(since=T0, until=T0))


def test_parse_time() -> None:
    now = datetime(2025, 6, 1, 0, 0, tzinfo=UTC)
    assert parse_time("90s", now=now) == now - timedelta(seconds=90)
    assert parse_time("2h", now=now) == now - timedelta(hours=2)
    assert parse_time("-2h", now=now) == now - timedelta(hours=2)  # a leading minus says "ago" too
    assert parse_time("1.5d", now=now) == now - timedelta(hours=36)
    assert parse_time("2025-01-31") == datetime(2025, 1, 31, tzinfo=UTC)
    assert parse_time(datetime(2025, 1, 31, 13, 0, tzinfo=UTC).astimezone()) == datetime(
        2025, 1, 31, 13, 0, tzinfo=UTC)


def test_file_filter_substring_and_glob(store: Store) -> None:
    assert files(store, file="shoes/") == ["shoes/right.png", "shoes/left.PNG"]  # substring
    assert files(store, file="SHIRT") == ["shirt.jpg"]  # case-insensitive
    assert files(store, file="*.png") == ["shoes/right.png", "shoes/left.PNG"]  # glob, whole name
    assert files(store, file="shoes/????.png") == ["shoes/left.PNG"]
    assert files(store, file="png") == ["shoes/right.png", "shoes/left.PNG"]
    assert files(store, file="%_") == ["100%_off.jpg"]  # LIKE wildcards are literal characters
    assert files(store, file="100_*") == []
    assert files(store, file="nothing*") == []


def test_limit(store: Store) -> None:
    assert files(store, limit=2) == ["100 off.jpg", "100%_off.jpg"]
    assert len(files(store, limit=0)) == 6
    assert len(files(store, limit=None)) == 6
    with pytest.raises(ConfigError, match="limit must be a whole number"):
        results(store, ResultFilter(limit=-1))
    with pytest.raises(ConfigError, match=r"limit 9223372036854775808 is too large \(at most 9223372036854775807; "
                                          r"0 = no limit\)"):  # a traceback from the driver before
        results(store, ResultFilter(limit=2**63))


def test_a_name_that_is_not_utf8_is_found_as_typed(store: Store) -> None:
    # Stored with \xNN escapes (Store.safe_text); `--file $'caf\xe9'` used to end in UnicodeEncodeError.
    name = os.fsdecode(b"caf\xe9.jpg")
    store.add_results([rec(name, "7" * 64, "shirt", 0.9)])
    assert files(store, file=os.fsdecode(b"caf\xe9")) == ["caf\\xe9.jpg"]


def test_filters_combine(store: Store) -> None:
    assert files(store, category="shoes", min_confidence=0.7, file="*.png") == ["shoes/right.png"]


def test_stats(store: Store) -> None:
    now = T0 + timedelta(hours=5, seconds=30)  # 30 s after the newest row
    store.heartbeat("host:1", "host", 1, 6)
    store.heartbeat("host:2", "host", 2, 0)
    store.heartbeat("host:2", "host", 2, 0, stopped=True)
    out = stats(store, now=now)
    assert out["database"] == store.url and out["schema_version"] == store.schema_version
    assert out["total"] == 6
    assert out["by_status"] == {"ok": 5, "failed": 1}
    assert out["by_category"] == {"shirt": 2, "shoes": 2, "dress": 1}
    assert list(out["by_category"]) == ["shirt", "shoes", "dress"]  # largest first, then by name
    assert out["duplicates"] == 1
    # The newest row (30 s back) is in every window; the one before (60.5 min back) in none.
    assert out["throughput"] == {"1m": 1.0, "5m": 0.2, "60m": round(1 / 60, 3)}
    assert stats(store, now=now + timedelta(minutes=2))["throughput"] == {"1m": 0.0, "5m": 0.2, "60m": 0.017}
    assert out["first_activity"] == "2025-01-31T12:00:00+00:00"
    assert out["last_activity"] == "2025-01-31T17:00:00+00:00"
    by_id = {w["id"]: w for w in out["workers"]}
    assert by_id["host:2"]["state"] == "stopped"
    # The heartbeats are real (now), which is long after `now` here: age clamps at 0, state by age.
    assert by_id["host:1"]["state"] == "running" and by_id["host:1"]["processed"] == 6
    assert by_id["host:1"]["throughput_5m"] == 0.2 and by_id["host:2"]["throughput_5m"] == 0.0
    later = stats(store, now=datetime.now(UTC) + timedelta(minutes=10))
    assert {w["id"]: w["state"] for w in later["workers"]} == {"host:1": "stale", "host:2": "stopped"}
    assert later["throughput"] == {"1m": 0.0, "5m": 0.0, "60m": 0.0}
    assert by_id["host:1"]["heartbeat_at"].endswith("+00:00")


def test_stats_of_an_empty_database(tmp_path: Path) -> None:
    with Store(f"sqlite:///{tmp_path / 'empty.db'}") as store:
        out = stats(store)
    assert (out["total"], out["by_status"], out["by_category"], out["duplicates"]) == (
        0, {"ok": 0, "failed": 0}, {}, 0)
    assert (out["first_activity"], out["last_activity"], out["workers"]) == (None, None, [])
    assert out["throughput"] == {"1m": 0.0, "5m": 0.0, "60m": 0.0}
