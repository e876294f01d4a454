"""`runbookctl report`: the audit log read back, as a user runs it."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from builders import APPROVER, Clock, action, catalog, py, runbook, step
from click.testing import CliRunner

from bot import report
from bot.engine import Incident
from bot.errors import ConfigError, StoreError
from bot.local import LocalRuntime
from bot.states import ApprovalStatus
from bot.store import Store
from bot.store.backend import is_postgres
from runbookctl.cli import cli


@pytest.fixture
def audit_db(db_target: str) -> str:
    """A database filled by the real state machine: approvals decided, commands run and
    failed, a request expired (everything enters the inbox as the bot's intake puts it).
    On each backend: a SQLite file, a PostgreSQL URL."""
    db = db_target
    store = Store(db)
    clock = Clock(t=1_800_000_000.0)
    ok = action("check-error-rate", py("print('rate => 0.1')"), expect=[("=>", False)])
    flaky = action("flaky", py("raise SystemExit(1)"))
    flush = action("clear-cache", py("print('OK')"), approval=True, approval_timeout=600)
    restart = action("restart", py("print('OK')"), approval=True, approval_timeout=600)
    cat = catalog(
        runbook(
            "payments",
            [
                step(ok),
                step(flush),
                step(restart),
                step(flaky, on_failure="continue"),
            ],
        )
    )
    runtime = LocalRuntime(cat, store, clock=clock, default_env="staging")
    waits = {"P1": (30, 60), "P2": (90, 10), "P3": (5, None)}
    for incident_id, (first_wait, second_wait) in waits.items():
        runtime.open(Incident(id=incident_id, title="5xx", service="payments"))
        (pending,) = store.pending_approvals(incident_id)
        clock.advance(first_wait)
        if incident_id == "P2":
            runtime.decide(pending.step_run_id, APPROVER, "reject")
            continue
        runtime.decide(pending.step_run_id, APPROVER)
        (pending,) = store.pending_approvals(incident_id)
        if second_wait is None:
            clock.advance(601)
            runtime.expire_due()
        else:
            clock.advance(second_wait)
            runtime.decide(pending.step_run_id, APPROVER)
    assert store.count_queued() == 0
    store.close()
    return db


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)


def test_overrides_is_the_users_query(audit_db: str) -> None:
    result = invoke("overrides", "--db", str(audit_db), "--format", "json")
    assert result.exit_code == 0, result.output
    # clear-cache asked three times, restart twice (P2 stopped at the rejection)
    assert json.loads(result.output) == [
        {"action": "clear-cache", "overrides": 3},
        {"action": "restart", "overrides": 2},
    ]


def test_overrides_table(audit_db: str) -> None:
    result = invoke("overrides", "--db", str(audit_db))
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[1].split() == ["action", "overrides"]
    assert lines[3].split() == ["clear-cache", "3"]
    assert lines[4].split() == ["restart", "2"]


def test_success_rate_per_action(audit_db: str) -> None:
    result = invoke("actions", "--db", str(audit_db), "--format", "json")
    assert result.exit_code == 0, result.output
    rows = {r["action"]: r for r in json.loads(result.output)}
    assert rows["check-error-rate"]["runs"] == 3
    assert rows["check-error-rate"]["success_rate_pct"] == 100.0
    assert rows["clear-cache"]["succeeded"] == 2
    assert rows["restart"]["runs"] == 1
    assert rows["flaky"]["failed"] == 1 and rows["flaky"]["success_rate_pct"] == 0.0
    only = invoke("actions", "--db", str(audit_db), "--format", "json", "--action", "flaky")
    assert [r["action"] for r in json.loads(only.output)] == ["flaky"]


def test_approval_wait_times(audit_db: str) -> None:
    result = invoke("approvals", "--db", str(audit_db), "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = {r["action"]: r for r in csv.DictReader(io.StringIO(result.output))}
    flush = rows["clear-cache"]
    assert (flush["requests"], flush["approved"], flush["rejected"]) == ("3", "2", "1")
    assert flush["wait_p50_s"] == "30.0" and flush["wait_max_s"] == "90.0"
    restart = rows["restart"]
    assert (restart["approved"], restart["expired"]) == ("1", "1")
    assert restart["wait_max_s"] == "60.0"  # the expiry is not a decision time


def test_a_request_voided_by_a_changed_command_is_counted_as_void(tmp_path: Path) -> None:
    """An approval approves what was shown: when the command changes before it runs,
    the request is void and a new one is asked; the report counts both."""
    db = tmp_path / "void.db"
    store = Store(db)
    clock = Clock(t=1_800_000_000.0)
    before = action("clear-cache", py("print('OK')"), approval=True)
    runtime = LocalRuntime(
        catalog(runbook("payments", [step(before)])), store, clock=clock, default_env="staging"
    )
    runtime.open(Incident(id="P1", title="5xx", service="payments"))
    (asked,) = store.pending_approvals("P1")
    after = action("clear-cache", py("print('OK, flushed')"), approval=True)
    runtime.engine.use_catalog(catalog(runbook("payments", [step(after)])))  # a reload
    clock.advance(20)
    runtime.decide(asked.step_run_id, APPROVER)
    store.close()
    result = invoke("approvals", "--db", str(db), "--format", "json")
    assert result.exit_code == 0, result.output
    (row,) = json.loads(result.output)
    assert {s: row[s] for s in ApprovalStatus} == {
        "approved": 0,
        "rejected": 0,
        "expired": 0,
        "cancelled": 0,
        "void": 1,
        "pending": 1,
    }
    assert row["requests"] == 2 and row["wait_p50_s"] is None


def test_events_filters(audit_db: str) -> None:
    result = invoke("events", "--db", str(audit_db), "--incident", "P2", "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert {r["incident_id"] for r in rows} == {"P2"}
    assert rows[0]["status"] == "escalated"  # newest first
    assert rows[0]["ts"].startswith("2027-01-15T")
    rejected = invoke(
        "events",
        "--db",
        str(audit_db),
        "--action",
        "clear-cache",
        "--status",
        "rejected",
        "--format",
        "json",
    )
    assert [(r["incident_id"], r["actor"]) for r in json.loads(rejected.output)] == [
        ("P2", APPROVER)
    ]
    limited = invoke("events", "--db", str(audit_db), "--limit", "2", "--format", "json")
    assert len(json.loads(limited.output)) == 2
    since = invoke("events", "--db", str(audit_db), "--since", "2030-01-01", "--format", "json")
    assert json.loads(since.output) == []


def test_db_from_the_environment(audit_db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNBOOK_DB", str(audit_db))
    result = invoke("overrides", "--format", "csv")
    assert result.exit_code == 0
    assert result.output.splitlines()[:2] == ["action,overrides", "clear-cache,3"]


def test_a_missing_database_is_an_error_not_a_new_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.db"
    result = CliRunner().invoke(cli, ["report", "overrides", "--db", str(missing)])
    assert result.exit_code == 1
    assert f"no database at {missing}" in result.output
    assert "RUNBOOK_DB" in result.output
    assert not missing.exists()


def test_a_foreign_database_is_an_error(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    other.write_bytes(b"not sqlite at all" * 100)
    result = CliRunner().invoke(cli, ["report", "actions", "--db", str(other)])
    assert result.exit_code == 1 and "not a readable SQLite database" in result.output
    import sqlite3

    with sqlite3.connect(tmp_path / "empty.db") as conn:
        conn.execute("CREATE TABLE t (x)")
    with pytest.raises(StoreError, match="not a runbook-bot database"):
        report.connect(tmp_path / "empty.db")


def test_reading_never_writes(audit_db: str) -> None:
    snapshot = b"" if is_postgres(audit_db) else Path(audit_db).read_bytes()
    conn = report.connect(audit_db)
    before = report.events(conn, limit=1000).rows
    with pytest.raises(Exception, match=r"readonly|read-only"):
        conn.execute("DELETE FROM automation_events")
    conn.close()
    conn = report.connect(audit_db)
    assert report.events(conn, limit=1000).rows == before
    conn.close()
    if snapshot:
        assert Path(audit_db).read_bytes() == snapshot


def test_empty_reports_say_so(tmp_path: Path) -> None:
    Store(tmp_path / "fresh.db").close()
    result = invoke("overrides", "--db", str(tmp_path / "fresh.db"))
    assert result.output == "Steps that needed a human, per action: nothing recorded yet.\n"
    result = invoke("approvals", "--db", str(tmp_path / "fresh.db"), "--format", "json")
    assert result.output == "[]\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", 1000.0 - 1800),
        ("24h", 1000.0 - 86400),
        ("1.5h", 1000.0 - 5400),
        ("2d", 1000.0 - 172800),
    ],
)
def test_parse_since_durations(text: str, expected: float) -> None:
    assert report.parse_since(text, now=1000.0) == expected


def test_parse_since_dates() -> None:
    assert report.parse_since("1970-01-02") == 86400.0
    assert report.parse_since("1970-01-01T01:00:00+01:00") == 0.0
    with pytest.raises(ConfigError, match="use a duration"):
        report.parse_since("last tuesday")
    result = CliRunner().invoke(cli, ["report", "events", "--db", "x.db", "--since", "soon"])
    assert result.exit_code == 1


def test_long_cells_are_cut_in_tables() -> None:
    rendered = report.render(report.Report("T", ("detail",), [("x" * 500,)]))
    assert max(len(line) for line in rendered.splitlines()) <= 80
