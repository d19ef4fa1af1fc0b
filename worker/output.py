"""Render result rows (a list of dicts) as a table, JSON or CSV, and stats for humans.

- table: aligned plain text like sqlite-utils' default: a header line, a line of dashes under each
  column, two spaces between columns; numbers right-aligned, text left-aligned; floats with 4 decimals;
  None as an empty cell; lists as compact JSON. Control characters (a newline in a file name) are shown
  escaped (\\n) so one row stays one line; JSON and CSV carry the exact text.
- json: a list of objects, indent 2, UTF-8 text as is (not \\u-escaped).
- csv: a header row and one row per dict, RFC 4180 quoting (fields with quotes, commas or newlines are
  quoted, quotes doubled), "\\n" line ends; None as an empty field, lists as JSON text, floats as Python
  prints them (round-trip exact).
"""

from __future__ import annotations

import csv
import io
import json
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

FORMATS = ("table", "json", "csv")


def _columns(rows: Sequence[Mapping[str, Any]], columns: Iterable[str] | None) -> list[str]:
    if columns is not None:
        return list(columns)
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def render(
    rows: Sequence[Mapping[str, Any]], fmt: str = "table", columns: Iterable[str] | None = None
) -> str:
    """`rows` as text in `fmt` (table, json or csv), restricted to `columns` in that order (default: every
    key, in first-seen order). Missing keys render as empty/null. The text ends with a newline unless it
    is empty (a table or CSV with no columns)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; valid: {', '.join(FORMATS)}")
    cols = _columns(rows, columns)
    if fmt == "json":
        data = [{col: row.get(col) for col in cols} for row in rows]
        return json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n"
    if not cols:
        return ""
    if fmt == "csv":
        return _csv(rows, cols)
    return table([[row.get(col) for col in cols] for row in rows], cols)


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, list | tuple | dict):
        return json.dumps(value, ensure_ascii=False)
    return value


def _csv(rows: Sequence[Mapping[str, Any]], cols: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(cols)
    for row in rows:
        writer.writerow([_csv_cell(row.get(col)) for col in cols])
    return buffer.getvalue()


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple | dict):
        value = json.dumps(value, ensure_ascii=False)
    text = str(value)
    if any(unicodedata.category(ch)[0] == "C" for ch in text):  # control, format, surrogate...
        text = "".join(ch if unicodedata.category(ch)[0] != "C" else repr(ch)[1:-1] for ch in text)
    return text


def _width(text: str) -> int:
    """Display width in a terminal: East Asian wide characters take two cells, combining marks none."""
    return sum(0 if unicodedata.combining(ch) else 2 if unicodedata.east_asian_width(ch) in "WF" else 1
               for ch in text)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def table(values: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """Aligned plain text: header, dashes, rows; numeric columns right-aligned; no trailing spaces."""
    cells = [[_cell(v) for v in row] for row in values]
    right = [bool(values) and all(_numeric(row[i]) or row[i] is None for row in values)
             and any(_numeric(row[i]) for row in values) for i in range(len(headers))]
    widths = [max([_width(h)] + [_width(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(items: Sequence[str]) -> str:
        parts = []
        for i, text in enumerate(items):
            pad = " " * (widths[i] - _width(text))
            parts.append(pad + text if right[i] else text + pad)
        return "  ".join(parts).rstrip()

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out) + "\n"


def _rate(value: float) -> str:
    return f"{value:.1f}/min"


def render_stats(stats: Mapping[str, Any]) -> str:
    """A human summary of worker.query.stats()."""
    by_status = stats.get("by_status", {})
    throughput = stats.get("throughput", {})
    lines = [
        f"Database:    {stats.get('database')} (schema version {stats.get('schema_version')})",
        f"Results:     {stats.get('total', 0)} total, "
        + ", ".join(f"{count} {status}" for status, count in by_status.items())
        + f", {stats.get('duplicates', 0)} duplicate{'' if stats.get('duplicates', 0) == 1 else 's'}",
        "Throughput:  " + ", ".join(f"{_rate(rate)} over {window}" for window, rate in throughput.items()),
        f"First:       {stats.get('first_activity') or '-'}",
        f"Last:        {stats.get('last_activity') or '-'}",
    ]
    claims = stats.get("claims") or {}
    if claims.get("enabled"):  # several workers on PostgreSQL
        lines.append(f"Claims:      {claims.get('held', 0)} held, {claims.get('lapsed', 0)} lapsed "
                     "(their workers stopped renewing them)")
    categories = stats.get("by_category") or {}
    lines.append("")
    if categories:
        lines.append(table([[name, count] for name, count in categories.items()], ["category", "count"])
                     .rstrip("\n"))
    else:
        lines.append("No classified images yet.")
    worker_rows = stats.get("workers") or []
    lines.append("")
    if worker_rows:
        headers = ["worker", "host", "state", "heartbeat", "age", "processed", "rate 5m"]
        values = [[w["id"], w.get("host"), w["state"], w["heartbeat_at"], f"{w['heartbeat_age_s']:.0f}s",
                   w["processed"], _rate(w["throughput_5m"])] for w in worker_rows]
        if claims.get("enabled"):
            headers.append("claims")
            for row, w in zip(values, worker_rows, strict=True):
                row.append(w.get("claims", 0))
        lines.append(table(values, headers).rstrip("\n"))
    else:
        lines.append("No workers have reported yet.")
    return "\n".join(lines) + "\n"
