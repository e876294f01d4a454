"""Reports over the audit log, for `runbookctl report` and anyone with the database.

Read-only: a SQLite file is opened with ``mode=ro`` (WAL lets it read while the bot
writes), and a missing file is an error rather than a new empty database; a PostgreSQL
database (``postgresql://…``) in a read-only session. The queries are written in the SQL
both speak (a count of rows matching is ``SUM(CASE WHEN … THEN 1 ELSE 0 END)``).

  overrides   steps that needed a human (``requires_manual``), per action: the users'
              dashboard query, as they wrote it
  actions     outcomes of executed commands per action, with the success rate
  approvals   approval requests per action: how each ended and how long people took
  events      recent audit rows, filtered by incident, action, status and time
  runs        one row per incident the audit log knows (`runbookctl runs list`)
  run         one incident's steps: decision, who approved or rejected, result
              (`runbookctl runs show INCIDENT`)

and one report over the catalog rather than the audit log:

  environments  the environment incidents of each service would act in, and why
                (``bot.catalog.environment``: the rule the bot and simulate use)
"""

from __future__ import annotations

import csv
import io
import json
import re
import sqlite3
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.catalog.model import Catalog
from bot.errors import ConfigError, StoreError
from bot.states import ApprovalStatus, Event
from bot.store.backend import PgConnection, connect_readonly, display, is_postgres

# The dashboards' query, verbatim: if this ever fails, our users' dashboards do too.
OVERRIDES_SQL = (
    "select action, count(*) as overrides from automation_events "
    "where status = 'requires_manual' group by action order by overrides desc;"
)
# The audit events of an executed command's result (a dry run executes nothing).
OUTCOMES = tuple(
    str(e)
    for e in (Event.SUCCEEDED, Event.ALLOWED_FAILURE, Event.FAILED, Event.TIMED_OUT, Event.ERROR)
)
# Every status an approval request can end in (void: what it approved changed before it
# ran), then the requests still waiting.
_APPROVAL_STATUSES = tuple(
    str(s)
    for s in (
        ApprovalStatus.APPROVED,
        ApprovalStatus.REJECTED,
        ApprovalStatus.EXPIRED,
        ApprovalStatus.CANCELLED,
        ApprovalStatus.VOID,
        ApprovalStatus.PENDING,
    )
)
_DECIDED = (str(ApprovalStatus.APPROVED), str(ApprovalStatus.REJECTED))
FORMATS = ("table", "json", "csv")


@dataclass(frozen=True)
class Report:
    title: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    def as_dicts(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, row, strict=True)) for row in self.rows]


Reader = sqlite3.Connection | PgConnection


def connect(path: str | Path) -> Reader:
    """Open the state database read-only; a clear error when it is missing or foreign."""
    if is_postgres(path):
        return _connect_postgres(str(path))
    db = Path(path)
    if not db.is_file():
        raise StoreError(
            f"no database at {db}: pass --db or set RUNBOOK_DB to the bot's state file "
            "(the bot creates it when it starts)"
        )
    try:
        conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{db} is not a readable SQLite database: {exc}") from None
    if "automation_events" not in tables:
        conn.close()
        raise StoreError(f"{db} is not a runbook-bot database (no automation_events table)")
    return conn


def _connect_postgres(url: str) -> PgConnection:
    conn = connect_readonly(url)
    row = conn.execute("SELECT to_regclass('automation_events') IS NOT NULL").fetchone()
    if not (row and row[0]):
        conn.close()
        raise StoreError(
            f"{display(url)} is not a runbook-bot database (no automation_events table)"
        )
    return conn


_AGO = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str, now: float | None = None) -> float:
    """``24h``, ``7d``, ``30m`` (ago) or an ISO date/time (UTC unless it says) -> epoch."""
    now = time.time() if now is None else now
    found = _AGO.match(text.strip())
    if found:
        return now - float(found.group(1)) * _UNIT_SECONDS[found.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigError(
            f"--since {text!r}: use a duration such as 24h, 7d, 30m or a date such as 2026-11-01"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _where(clauses: list[str], params: list[Any], column: str, value: Any, op: str = "=") -> None:
    if value is not None:
        clauses.append(f"{column} {op} ?")
        params.append(value)


def overrides(conn: Reader, since: float | None = None) -> Report:
    if since is None:
        rows = conn.execute(OVERRIDES_SQL).fetchall()
    else:
        rows = conn.execute(
            "select action, count(*) as overrides from automation_events "
            "where status = 'requires_manual' and ts >= ? group by action "
            "order by overrides desc, action",
            (since,),
        ).fetchall()
    return Report("Steps that needed a human, per action", ("action", "overrides"), rows)


def actions(conn: Reader, since: float | None = None, action: str | None = None) -> Report:
    clauses = [f"status IN ({', '.join('?' for _ in OUTCOMES)})", "action IS NOT NULL"]
    params: list[Any] = list(OUTCOMES)
    _where(clauses, params, "ts", since, ">=")
    _where(clauses, params, "action", action)
    sums = ", ".join(_count_if(f"status = '{s}'") for s in OUTCOMES)
    rows = conn.execute(
        f"SELECT action, count(*), {sums} FROM automation_events "
        f"WHERE {' AND '.join(clauses)} GROUP BY action ORDER BY count(*) DESC, action",
        params,
    ).fetchall()
    out = []
    for name, total, succeeded, allowed, failed, timed_out, errors in rows:
        rate = round(100.0 * succeeded / total, 1) if total else 0.0
        out.append((name, total, succeeded, allowed, failed, timed_out, errors, rate))
    return Report(
        "Outcomes of executed commands, per action",
        (
            "action",
            "runs",
            "succeeded",
            "allowed_failure",
            "failed",
            "timed_out",
            "error",
            "success_rate_pct",
        ),
        out,
    )


def approvals(conn: Reader, since: float | None = None, action: str | None = None) -> Report:
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    _where(clauses, params, "requested_at", since, ">=")
    _where(clauses, params, "action", action)
    grouped: dict[str, list[tuple[str, float | None]]] = {}
    for name, status, requested, decided in conn.execute(
        "SELECT action, status, requested_at, decided_at FROM approvals "
        f"WHERE {' AND '.join(clauses)} ORDER BY action, id",
        params,
    ):
        wait = decided - requested if decided is not None and requested is not None else None
        grouped.setdefault(name, []).append((status, wait))
    out = []
    for name, items in sorted(grouped.items(), key=lambda kv: (-len(kv[1]), kv[0])):
        # how long people took to decide; expiries are the deadline, not a decision
        waits = [w for s, w in items if s in _DECIDED and w is not None]
        counts = {s: sum(1 for st, _ in items if st == s) for s in _APPROVAL_STATUSES}
        out.append(
            (
                name,
                len(items),
                *counts.values(),
                _seconds(statistics.median(waits)) if waits else None,
                _seconds(_percentile(waits, 0.9)) if waits else None,
                _seconds(max(waits)) if waits else None,
            )
        )
    return Report(
        "Approval requests per action (wait: seconds from request to decision)",
        ("action", "requests", *_APPROVAL_STATUSES, "wait_p50_s", "wait_p90_s", "wait_max_s"),
        out,
    )


def _count_if(condition: str) -> str:
    return f"SUM(CASE WHEN {condition} THEN 1 ELSE 0 END)"


_APPROVED = _count_if("status = 'approved'")
_SUCCEEDED = _count_if("status IN ('succeeded', 'allowed_failure')")
_FAILED = _count_if("status IN ('failed', 'timed_out', 'error')")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


def _seconds(value: float) -> float:
    return round(value, 1)


def events(
    conn: Reader,
    *,
    incident: str | None = None,
    action: str | None = None,
    status: str | None = None,
    since: float | None = None,
    limit: int = 100,
) -> Report:
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    _where(clauses, params, "incident_id", incident)
    _where(clauses, params, "action", action)
    _where(clauses, params, "status", status)
    _where(clauses, params, "ts", since, ">=")
    columns = (
        "ts",
        "incident_id",
        "service",
        "action",
        "env",
        "status",
        "actor",
        "detail",
        "catalog_commit",
    )
    rows = conn.execute(
        f"SELECT {', '.join(columns)} FROM automation_events WHERE {' AND '.join(clauses)} "
        "ORDER BY ts DESC, id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    shown = [(_iso(row[0]), *row[1:]) for row in rows]
    return Report("Audit events, newest first", columns, shown)


# Audit statuses that end a step (its result, or why it never ran).
_STEP_ENDS = (
    *OUTCOMES,
    *(
        str(e)
        for e in (
            Event.DRY_RUN, Event.BLOCKED, Event.REJECTED, Event.EXPIRED, Event.SKIPPED,
            Event.INTERRUPTED, Event.CANCELLED, Event.SUPERSEDED,
        )
    ),
)  # fmt: skip
# Audit statuses that end an incident's story (the last one shown in `runs list`).
_RUN_ENDS = (str(Event.ESCALATED), str(Event.RESOLVED), str(Event.REOPENED))


def runs(conn: Reader, *, since: float | None = None, limit: int = 100) -> Report:
    """One row per incident the audit log knows, newest first."""
    clauses: list[str] = ["1 = 1"]
    params: list[Any] = []
    _where(clauses, params, "ts", since, ">=")
    rows = conn.execute(
        "SELECT incident_id, MIN(ts), MAX(ts), MAX(service), MAX(runbook_id), MAX(env), "
        "COUNT(DISTINCT step_id), "
        f"{_APPROVED}, {_SUCCEEDED}, {_FAILED}, "
        "(SELECT e2.status FROM automation_events e2 WHERE e2.incident_id = e.incident_id "
        " ORDER BY e2.ts DESC, e2.id DESC LIMIT 1) "
        f"FROM automation_events e WHERE {' AND '.join(clauses)} "
        "GROUP BY incident_id ORDER BY MIN(ts) DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    columns = (
        "incident_id", "started", "last_event", "service", "runbook", "env", "steps",
        "approvals", "succeeded", "failed", "last_status",
    )  # fmt: skip
    shown = [(r[0], _iso(r[1]), _iso(r[2]), *r[3:]) for r in rows]
    return Report("Runs, newest first (`runbookctl runs show INCIDENT` for one)", columns, shown)


def run(conn: Reader, incident: str) -> Report:
    """One incident's steps from the audit log: what was decided, by whom, and the result."""
    rows = conn.execute(
        "SELECT ts, step_id, action, env, status, actor, detail FROM automation_events "
        "WHERE incident_id = ? ORDER BY ts, id",
        (incident,),
    ).fetchall()
    if not rows:
        raise StoreError(
            f"no audit rows for incident {incident!r}: `runbookctl runs list` shows the "
            "incidents the audit log knows"
        )
    steps: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    for ts, step_id, action, env, status, actor, detail in rows:
        if not step_id:
            notes.append(f"{_iso(ts)} {status}" + (f": {detail}" if detail else ""))
            continue
        step = steps.setdefault(
            step_id,
            {
                "step": step_id, "action": action or "", "env": env or "",
                "decision": "automatic", "approved_by": [], "rejected_by": "",
                "result": "", "detail": "", "started": _iso(ts), "ended": "",
            },
        )  # fmt: skip
        if status == Event.REQUIRES_MANUAL:
            step["decision"] = "needs approval"
        elif status == Event.APPROVED and actor and actor not in step["approved_by"]:
            step["approved_by"].append(actor)
        elif status == Event.REJECTED:
            step["rejected_by"] = actor or ""
        if status in _STEP_ENDS:
            step["result"], step["detail"], step["ended"] = status, detail or "", _iso(ts)
        elif status == Event.EXECUTED and not step["result"]:
            step["result"] = "running"
    if not steps and not notes:
        notes.append("no steps")
    columns = (
        "step", "action", "env", "decision", "approved_by", "rejected_by", "result",
        "detail", "started", "ended",
    )  # fmt: skip
    shown = [
        tuple(", ".join(s[c]) if c == "approved_by" else s[c] for c in columns)
        for s in steps.values()
    ]
    title = f"Incident {incident}" + (" — " + "; ".join(notes) if notes else "")
    return Report(title, columns, shown)


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def environments(catalog: Catalog, default_env: str | None = "") -> Report:
    """Every service the runbooks or the `services` mapping name, with its environment.

    A last row stands for services only a catch-all (``*``) runbook matches: they get
    RUNBOOK_ENV or nothing.
    """
    from bot.catalog.environment import catch_all_runbooks, resolve_environment
    from bot.catalog.matcher import ANY_SERVICE, service_key

    named: dict[str, tuple[str, list[str]]] = {}  # key -> (service as first written, runbooks)
    for runbook in catalog.runbooks:
        for service in runbook.match.services:
            if service_key(service) != ANY_SERVICE:
                named.setdefault(service_key(service), (service, []))[1].append(runbook.id)
    for service in catalog.settings.services:
        named.setdefault(service_key(service), (service, []))
    rows: list[tuple[Any, ...]] = []
    for key in sorted(named):
        service, runbook_ids = named[key]
        choice = resolve_environment(catalog, service, default_env=default_env)
        rows.append(
            (service, choice.env or "unknown", choice.source, ", ".join(runbook_ids) or "-")
        )
    catch_all = catch_all_runbooks(catalog)
    if catch_all:
        other = "(any other service)"
        env = default_env or "unknown"
        source = "RUNBOOK_ENV" if default_env else "none"
        rows.append((other, env, source, ", ".join(catch_all)))
    return Report(
        "Environment of each service's incidents (services mapping, else RUNBOOK_ENV)",
        ("service", "environment", "source", "runbooks"),
        rows,
    )


# --- output --------------------------------------------------------------------------------


def render(report: Report, fmt: str = "table") -> str:
    if fmt == "json":
        return json.dumps(report.as_dicts(), indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(report.columns)
        writer.writerows(["" if v is None else v for v in row] for row in report.rows)
        return buffer.getvalue()
    if fmt != "table":
        raise ConfigError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    return _table(report)


def _cell(value: Any, width: int = 80) -> str:
    text = "" if value is None else str(value)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def _table(report: Report) -> str:
    if not report.rows:
        return f"{report.title}: nothing recorded yet.\n"
    cells = [[_cell(v) for v in row] for row in report.rows]
    widths = [
        max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(report.columns)
    ]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in report.rows)
        for i in range(len(report.columns))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    out = [report.title, line(report.columns), line(["-" * w for w in widths])]
    out.extend(line(row) for row in cells)
    return "\n".join(out) + "\n"
