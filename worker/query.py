"""Read side of the results database: filtered result rows and statistics, as plain dicts.

`results(store, ResultFilter(...))` returns rows newest first (processed_at, then id, descending), each a
dict with the keys in RESULT_KEYS; timestamps are ISO 8601 strings in UTC ("2025-01-31T12:00:00.123456
+00:00"), top3 a list of [label, probability]. `stats(store)` aggregates over every worker writing to
the database. Both only read: on SQLite (WAL) they never block the worker nor wait for it.

Filter semantics:
- category: exact label; an unknown label simply matches nothing.
- status: "ok" or "failed"; anything else is a ConfigError naming the valid values.
- min_confidence / max_confidence: inclusive bounds in [0, 1]; rows without a confidence (failed ones)
  never match a confidence bound.
- since (inclusive) / until (exclusive) bound processed_at. A datetime (naive = UTC) or a string: ISO 8601
  ("2025-01-31", "2025-01-31T12:00", with or without an offset; naive = UTC) or a duration back from now
  ("90s", "15m", "2h", "7d").
- file: case-insensitive. With a `*` or `?` it is a glob over the whole relative name (`*` also matches
  `/`; `[` is literal), e.g. "*.png", "shoes/*"; otherwise a substring anywhere in the name.
- limit: the most rows returned (newest first); 0 or None = all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa

from worker.exceptions import ConfigError
from worker.store import STATUSES, Store, decode_top3, safe_text, utcnow
from worker.store import claims as claims_table
from worker.store import results as results_table
from worker.store import workers as workers_table

RESULT_KEYS = (
    "id", "file", "location", "sha256", "size_bytes", "status", "category", "confidence", "top3", "error",
    "model", "model_id", "duplicate_of", "decode_ms", "inference_ms", "total_ms", "created_at",
    "processed_at", "worker", "host", "ctime_ns",
)
# A readable subset for the table format (JSON and CSV suit all of RESULT_KEYS).
SUMMARY_COLUMNS = ("processed_at", "file", "status", "category", "confidence", "error")
THROUGHPUT_WINDOWS_MIN = (1, 5, 60)
# A duration back from now: "90s", "2h", or "-2h" (a leading minus says the same, "2 hours ago").
_DURATION = re.compile(r"^\s*-?\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
MAX_LIMIT = 2**63 - 1  # the largest LIMIT SQLite and PostgreSQL take


@dataclass
class ResultFilter:
    category: str | None = None
    status: str | None = None
    min_confidence: float | None = None
    max_confidence: float | None = None
    since: datetime | str | None = None
    until: datetime | str | None = None
    file: str | None = None
    limit: int | None = 100


def parse_time(value: datetime | str, *, now: datetime | None = None, name: str = "time") -> datetime:
    """A timezone-aware UTC datetime from a datetime, an ISO 8601 string or a duration back from now."""
    if isinstance(value, datetime):
        parsed = value
    else:
        text = str(value).strip()
        match = _DURATION.match(text)
        try:
            if match:
                amount, unit = float(match.group(1)), match.group(2).lower()
                return (now or utcnow()) - timedelta(**{_UNITS[unit]: amount})
            parsed = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in ("Z", "z") else text)
            return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)
        except OverflowError:  # 9999999d, or 9999-12-31T23:59-12:00 (past year 9999 in UTC)
            raise ConfigError(f"{name} {value!r} is out of range (years 1 to 9999)") from None
        except ValueError:
            raise ConfigError(
                f"{name} {value!r} is not a time; use ISO 8601 (2025-01-31 or 2025-01-31T12:00:00+00:00) "
                "or a duration back from now (90s, 15m, 2h, 7d)"
            ) from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def validate(flt: ResultFilter, *, now: datetime | None = None) -> ResultFilter:
    """Check every value and normalise times; raise ConfigError naming the bad value and valid choices."""
    if flt.status is not None and flt.status not in STATUSES:
        raise ConfigError(f"status must be one of {', '.join(STATUSES)}, got {flt.status!r}")
    for name in ("min_confidence", "max_confidence"):
        value = getattr(flt, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not 0.0 <= value <= 1.0):
            raise ConfigError(f"{name} must be a number from 0 to 1, got {value!r}")
    if (flt.min_confidence is not None and flt.max_confidence is not None
            and flt.min_confidence > flt.max_confidence):
        raise ConfigError(
            f"min_confidence ({flt.min_confidence}) is above max_confidence ({flt.max_confidence})"
        )
    now = now or utcnow()
    since = None if flt.since is None else parse_time(flt.since, now=now, name="since")
    until = None if flt.until is None else parse_time(flt.until, now=now, name="until")
    if since is not None and until is not None and since >= until:
        raise ConfigError(f"since ({since.isoformat()}) must be before until ({until.isoformat()})")
    if flt.limit is not None and (isinstance(flt.limit, bool) or not isinstance(flt.limit, int)
                                  or flt.limit < 0):
        raise ConfigError(f"limit must be a whole number >= 0 (0 = no limit), got {flt.limit!r}")
    if flt.limit is not None and flt.limit > MAX_LIMIT:
        raise ConfigError(f"limit {flt.limit} is too large (at most {MAX_LIMIT}; 0 = no limit)")
    if flt.category is not None and not isinstance(flt.category, str):
        raise ConfigError(f"category must be text, got {flt.category!r}")
    if flt.file is not None and not isinstance(flt.file, str):
        raise ConfigError(f"file must be text, got {flt.file!r}")
    # A name that is not UTF-8 is stored with \\xNN escapes (Store.safe_text): matched the same way.
    return replace(flt, since=since, until=until, file=safe_text(flt.file))


def _like_pattern(text: str) -> str:
    """A LIKE pattern (escape character backslash) for a glob or a substring; see the module doc."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if "*" in text or "?" in text:
        return escaped.replace("*", "%").replace("?", "_")
    return f"%{escaped}%"


def iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def row_dict(row: Any) -> dict[str, Any]:
    """A results row as the dict results() returns (keys in RESULT_KEYS order)."""
    return {
        "id": row["id"],
        "file": row["file"],
        "location": row["location"],
        "sha256": row["sha256"],
        "size_bytes": row["size_bytes"],
        "status": row["status"],
        "category": row["category"],
        "confidence": row["confidence"],
        "top3": [list(pair) for pair in decode_top3(row["top3"])] if row["top3"] else None,
        "error": row["error"],
        "model": row["model_name"],
        "model_id": row["model_id"],
        "duplicate_of": row["duplicate_of"],
        "decode_ms": row["decode_ms"],
        "inference_ms": row["inference_ms"],
        "total_ms": row["total_ms"],
        "created_at": iso(row["created_at"]),
        "processed_at": iso(row["processed_at"]),
        "worker": row["worker"],
        "host": row["host"],
        "ctime_ns": row["ctime_ns"],
    }


def results(store: Store, flt: ResultFilter | None = None) -> list[dict[str, Any]]:
    """Rows matching `flt`, newest first (see the module doc for each filter's meaning)."""
    flt = validate(flt or ResultFilter())
    query = sa.select(results_table)
    if flt.category is not None:
        query = query.where(results_table.c.category == flt.category)
    if flt.status is not None:
        query = query.where(results_table.c.status == flt.status)
    if flt.min_confidence is not None:
        query = query.where(results_table.c.confidence >= float(flt.min_confidence))
    if flt.max_confidence is not None:
        query = query.where(results_table.c.confidence <= float(flt.max_confidence))
    if flt.since is not None:
        query = query.where(results_table.c.processed_at >= flt.since)
    if flt.until is not None:
        query = query.where(results_table.c.processed_at < flt.until)
    if flt.file:
        query = query.where(results_table.c.file.ilike(_like_pattern(flt.file), escape="\\"))
    query = query.order_by(results_table.c.processed_at.desc(), results_table.c.id.desc())
    if flt.limit:
        query = query.limit(flt.limit)
    with store.engine.connect() as conn:
        return [row_dict(row) for row in conn.execute(query).mappings()]


def categories(store: Store) -> list[str]:
    """The categories recorded so far, sorted."""
    query = sa.select(results_table.c.category).where(results_table.c.category.is_not(None)).distinct()
    with store.engine.connect() as conn:
        return sorted(conn.execute(query).scalars())


def resolve_category(name: str, recorded: list[str], labels: list[str]) -> str:
    """`name` as spelt in `recorded` or the model's `labels` (case aside); ConfigError naming the valid ones
    when it is neither (a typo would otherwise look like "no results")."""
    for known in (*recorded, *labels):
        if known.casefold() == name.casefold():
            return known
    valid = sorted(set(recorded) | set(labels))
    raise ConfigError(f"unknown category {name!r}; valid: {', '.join(valid) or 'none recorded yet'}")


def stats(store: Store, *, now: datetime | None = None, stale_after_s: float = 120.0) -> dict[str, Any]:
    """Aggregates over all workers.

    Returns {"database", "schema_version", "total", "by_status" {status: n} (both statuses, 0 when none),
    "by_category" {label: n} (rows that have a category, largest first), "duplicates" (rows recorded as
    a duplicate of earlier content), "throughput" {"1m", "5m", "60m": images/min}, "first_activity",
    "last_activity" (ISO 8601 or None), "workers": [...]}.

    Throughput over the last N minutes = rows committed (processed_at) in (now - N min, now] divided by
    N: the average rate over the whole window, so a worker that started 2 minutes ago is diluted in the
    60-minute figure, and an idle one decays to 0. Activity = the first and last processed_at.

    Each worker: {"id", "host", "pid", "started_at", "heartbeat_at", "heartbeat_age_s", "processed"
    (its own count since it started), "state" ("running"; "stale" when no heartbeat for stale_after_s;
    "stopped" after a clean shutdown), "throughput_5m" (its rows per minute over the last 5 minutes),
    "claims" (files it holds claims on now; always 0 on SQLite)}; the most recent heartbeat first.

    "claims" (several workers on PostgreSQL, worker.claims): {"enabled" (PostgreSQL), "held" (claims
    whose lease runs), "lapsed" (claims whose workers stopped renewing them: taken over by the next worker
    that sees the file, or purged an hour later when no worker sees it any more, its file having been
    moved), "takeovers" (how often the claims still kept were taken over)}.
    """
    now = (now or utcnow()).astimezone(UTC)
    windows = {f"{n}m": now - timedelta(minutes=n) for n in THROUGHPUT_WINDOWS_MIN}
    five_min_ago = windows["5m"]
    col = results_table.c
    in_window = {
        key: sa.func.coalesce(sa.func.sum(sa.case(
            (sa.and_(col.processed_at > start, col.processed_at <= now), 1), else_=0)), 0)
        for key, start in windows.items()
    }
    with store.engine.connect() as conn:
        totals = conn.execute(sa.select(
            sa.func.count(), sa.func.count(results_table.c.duplicate_of),
            sa.func.min(results_table.c.processed_at), sa.func.max(results_table.c.processed_at),
            *[expr.label(key) for key, expr in in_window.items()],
        )).one()
        by_status = dict.fromkeys(STATUSES, 0)
        for status, count in conn.execute(
                sa.select(results_table.c.status, sa.func.count()).group_by(results_table.c.status)):
            by_status[status] = int(count)
        by_category = [
            (category, int(count)) for category, count in conn.execute(
                sa.select(col.category, sa.func.count()).where(col.category.is_not(None))
                .group_by(col.category))
        ]
        recent = dict(conn.execute(
            sa.select(results_table.c.worker, sa.func.count())
            .where(results_table.c.processed_at > five_min_ago, results_table.c.processed_at <= now)
            .group_by(results_table.c.worker)
        ).all())
        worker_rows = conn.execute(
            sa.select(workers_table).order_by(workers_table.c.heartbeat_at.desc(), workers_table.c.worker_id)
        ).mappings().all()
        cc = claims_table.c
        active = sa.and_(cc.done_at.is_(None), cc.lease_until > now)
        held_by = dict(conn.execute(sa.select(cc.worker_id, sa.func.count()).where(active)
                                    .group_by(cc.worker_id)).all())
        lapsed, takeovers = conn.execute(sa.select(
            sa.func.coalesce(sa.func.sum(sa.case((sa.and_(cc.done_at.is_(None), cc.lease_until <= now), 1),
                                                 else_=0)), 0),
            sa.func.coalesce(sa.func.sum(cc.takeovers), 0),
        )).one()
    total, duplicates, first, last = totals[0], totals[1], totals[2], totals[3]
    throughput = {key: round(int(totals[4 + i]) / n, 3)
                  for i, (key, n) in enumerate(zip(windows, THROUGHPUT_WINDOWS_MIN, strict=True))}
    worker_list = []
    for row in worker_rows:
        age = max(0.0, (now - row["heartbeat_at"]).total_seconds())
        state = "stopped" if row["stopped_at"] else ("stale" if age > stale_after_s else "running")
        worker_list.append({
            "id": row["worker_id"], "host": row["host"], "pid": row["pid"],
            "started_at": iso(row["started_at"]), "heartbeat_at": iso(row["heartbeat_at"]),
            "heartbeat_age_s": round(age, 1), "processed": int(row["processed"]), "state": state,
            "throughput_5m": round(int(recent.get(row["worker_id"], 0)) / 5, 3),
            "claims": int(held_by.get(row["worker_id"], 0)),
        })
    return {
        "database": store.url,
        "schema_version": store.schema_version,
        "total": int(total),
        "by_status": by_status,
        "by_category": dict(sorted(by_category, key=lambda item: (-item[1], item[0]))),
        "duplicates": int(duplicates),
        "throughput": throughput,
        "first_activity": iso(first),
        "last_activity": iso(last),
        "workers": worker_list,
        "claims": {"enabled": store.dialect == "postgresql", "held": int(sum(held_by.values())),
                   "lapsed": int(lapsed), "takeovers": int(takeovers)},
    }
