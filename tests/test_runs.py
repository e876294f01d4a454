"""`runbookctl runs list|show`: runs followed from the audit log, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from builders import APPROVER, Clock, action, catalog, py, runbook, step
from click.testing import CliRunner

from bot.engine import Incident
from bot.local import LocalRuntime
from bot.store import Store
from runbookctl.cli import cli

OTHER = "UOTHER"


@pytest.fixture
def audit_db(db_target: str) -> str:
    """Two incidents through the real state machine: one approved and run, one rejected
    (on each backend: a SQLite file, a PostgreSQL URL)."""
    db = db_target
    store = Store(db)
    clock = Clock(t=1_800_000_000.0)
    check = action("check", py("print('fine')"))
    flush = action("clear-cache", py("print('OK')"), approval=True, approval_timeout=600)
    cat = catalog(runbook("payments", [step(check), step(flush)]))
    runtime = LocalRuntime(cat, store, clock=clock, default_env="staging")
    runtime.open(Incident(id="P1", title="5xx", service="payments"))
    (pending,) = store.pending_approvals("P1")
    clock.advance(30)
    runtime.decide(pending.step_run_id, APPROVER)
    clock.advance(60)
    runtime.open(Incident(id="P2", title="5xx", service="payments"))
    (pending,) = store.pending_approvals("P2")
    runtime.decide(pending.step_run_id, APPROVER, "reject")
    store.close()
    return db


def invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["runs", *args], catch_exceptions=False)


def test_list_shows_every_incident_newest_first(audit_db: str) -> None:
    result = invoke("list", "--db", str(audit_db), "--format", "json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["incident_id"] for r in rows] == ["P2", "P1"]
    p2, p1 = rows
    assert (p1["runbook"], p1["steps"], p1["approvals"], p1["succeeded"]) == ("payments", 2, 1, 2)
    assert p1["env"] == "staging" and p2["approvals"] == 0
    text = invoke("list", "--db", str(audit_db)).output
    assert text.startswith("Runs, newest first") and "P1" in text and "P2" in text


def test_show_gives_each_steps_decision_approver_and_result(audit_db: str) -> None:
    result = invoke("show", "P1", "--db", str(audit_db), "--format", "json")
    assert result.exit_code == 0, result.output
    check, flush = json.loads(result.output)
    assert (check["step"], check["decision"]) == ("check", "automatic")
    assert check["result"] == "succeeded"
    assert (flush["decision"], flush["approved_by"], flush["result"]) == (
        "needs approval",
        APPROVER,
        "succeeded",
    )
    rejected = json.loads(invoke("show", "P2", "--db", str(audit_db), "--format", "json").output)
    assert rejected[1]["rejected_by"] == APPROVER and rejected[1]["result"] == "rejected"
    text = invoke("show", "P1", "--db", str(audit_db)).output
    assert text.startswith("Incident P1") and "needs approval" in text and APPROVER in text


def test_an_unknown_incident_or_database_is_a_clear_error(audit_db: str, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["runs", "show", "PNOPE", "--db", str(audit_db)])
    assert result.exit_code == 1
    assert "no audit rows for incident 'PNOPE'" in result.output and "runs list" in result.output
    missing = CliRunner().invoke(cli, ["runs", "list", "--db", str(tmp_path / "none.db")])
    assert missing.exit_code == 1 and "no database at" in missing.output
