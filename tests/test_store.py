"""The repository: schema, state changes checked against bot.states, the inbox, the outbox.

Everything runs on real SQLite files. Concurrency is real too: "another worker" is a
second `Store` on the same file (another thread, as another replica would be).
"""

from __future__ import annotations

import io
import json
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest
import sqlite_utils
from builders import APPROVER, Clock, action, catalog, py, runbook, step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from slack_harness import wait_for

from bot import states
from bot.config import Config
from bot.errors import StoreError
from bot.local import LocalRuntime
from bot.outbox import Retry, Sent
from bot.pagerduty.intake import PagerDutyIntake
from bot.pagerduty.webhook import sign
from bot.states import (
    TRANSITIONS,
    ApprovalStatus,
    Event,
    InboxStatus,
    IncidentStatus,
    OutboxStatus,
    Phase,
    RunStatus,
    StepStatus,
    TransitionError,
)
from bot.store import (
    SCHEMA_VERSION,
    THREAD_LINK_WAIT,
    AlreadyApplied,
    Approval,
    Effect,
    Incident,
    OutboxItem,
    Run,
    StepRun,
    Store,
    _StoreLock,
)
from bot.store.schema import MIGRATIONS

T0 = 1_800_000_000.0
X = TypeVar("X")

# the query from our users' dashboards, exactly as they wrote it
OVERRIDES_QUERY = (
    "select action, count(*) as overrides from automation_events "
    "where status = 'requires_manual' group by action order by overrides desc;"
)


def must(value: X | None) -> X:
    assert value is not None
    return value


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def tables(db: Path) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


# --- small builders over the repository's own methods ----------------------------------------


def open_incident(store: Store, incident_id: str = "P1") -> tuple[Incident, Run]:
    with store.unit(at=T0) as u:
        incident = must(
            u.create_incident(
                {
                    "id": incident_id,
                    "title": "Payments API elevated 5xx",
                    "service": "payments",
                    "env": "staging",
                    "channel": "#incidents",
                    "runbook_id": "payments-5xx",
                    "catalog_commit": "c0ffee123456",
                }
            )
        )
        run = must(u.create_run(incident_id, "payments-5xx", Phase.MAIN, "c0ffee123456"))
    return incident, run


def step_values(run: Run, index: int, status: StepStatus, **extra: Any) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "incident_id": run.incident_id,
        "step_index": index,
        "step_id": f"step-{index}",
        "action": "clear-cache",
        "attempt": 1,
        "status": status,
        **extra,
    }


def awaiting(store: Store, run: Run, index: int = 1) -> tuple[StepRun, Approval]:
    """A guarded step waiting for a decision, with its request (expires at T0 + 600)."""
    with store.unit(at=T0) as u:
        step = must(
            u.create_step_run(
                step_values(run, index, StepStatus.AWAITING_APPROVAL, decision="needs_approval"),
                {
                    "incident_id": run.incident_id,
                    "action": "clear-cache",
                    "approvers": {"users": ["U0LEAD"], "groups": ["S0ONCALL"]},
                    "expires_at": T0 + 600,
                    "fingerprint": "abc123",
                },
            )
        )
        approval = must(u.approval(step.id))
    return step, approval


def running(store: Store, run: Run, index: int = 0) -> StepRun:
    """An automatic step: created claimed (the unique attempt row is the claim)."""
    with store.unit(at=T0) as u:
        return must(
            u.create_step_run(
                step_values(run, index, StepStatus.RUNNING, runner="local:1", started_at=T0)
            )
        )


def put(store: Store, key: str, incident_id: str = "P1", **extra: Any) -> bool:
    values: dict[str, Any] = {
        "source": "pagerduty",
        "key": key,
        "incident_id": incident_id,
        "kind": "incident.acknowledged",
        "payload": {"note": key},
    }
    values.update(extra)
    return store.inbox_put(**values)


def slack(key: str | None, kind: str, n: int = 0, lane: str = "slack:#incidents") -> Effect:
    return Effect(incident_id="P1", target="slack", lane=lane, kind=kind, key=key, payload={"n": n})


def pending(store: Store) -> list[OutboxItem]:
    return store.outbox_items(status=OutboxStatus.PENDING)


# --- schema -------------------------------------------------------------------------------------


def test_a_fresh_database_is_at_the_current_schema_in_wal_mode(db_path: Path) -> None:
    store = Store(db_path)
    assert store.schema_version == SCHEMA_VERSION == 10
    assert store.query_one("PRAGMA journal_mode") == {"journal_mode": "wal"}
    store.close()
    assert {
        "incidents",
        "runs",
        "step_runs",
        "approvals",
        "inbox",
        "outbox",
        "automation_events",
        "meta",
    } <= tables(db_path)
    assert "deliveries" not in tables(db_path)
    assert {
        "ts",
        "incident_id",
        "service",
        "runbook_id",
        "step_id",
        "action",
        "env",
        "status",
        "actor",
        "detail",
        "catalog_commit",
        "origin",
    } <= columns(db_path, "automation_events")
    for table in ("incidents", "runs", "step_runs", "approvals", "inbox", "automation_events"):
        assert "catalog_commit" in columns(db_path, table), table


def test_reopening_keeps_the_data_and_migrates_nothing_twice(db_target: str) -> None:
    first = Store(db_target)
    open_incident(first)
    first.close()
    again = Store(db_target)
    assert must(again.incident("P1")).title == "Payments API elevated 5xx"
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_a_newer_schema_is_refused_with_a_clear_error(db_path: Path) -> None:
    Store(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    expected = rf"schema version 99, newer than this bot \({SCHEMA_VERSION}\)"
    with pytest.raises(StoreError, match=expected) as e:
        Store(db_path)
    assert "upgrade runbook-bot or use another RUNBOOK_DB" in str(e.value)
    with sqlite3.connect(db_path) as conn:  # refused, not touched
        assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "99",
        )


def test_a_file_that_is_not_a_database_is_a_store_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not sqlite" * 200)
    with pytest.raises(StoreError, match=f"cannot open the database {junk}"):
        Store(junk)


def test_the_users_dashboard_query_works_as_written(store: Store) -> None:
    for name, count in (("clear-cache", 3), ("restart", 1), ("vacuum", 2)):
        for _ in range(count):
            store.record_event(
                incident_id="P1", service="payments", action=name, status="requires_manual"
            )
    store.record_event(incident_id="P1", service="payments", action="restart", status="executed")
    assert store.query(OVERRIDES_QUERY) == [
        {"action": "clear-cache", "overrides": 3},
        {"action": "vacuum", "overrides": 2},
        {"action": "restart", "overrides": 1},
    ]


def test_audit_rows_say_where_they_come_from(store: Store) -> None:
    store.record_event(incident_id="P1", status="executed")
    store.record_event(incident_id="SIM-1", status="executed", origin="simulate")
    with pytest.raises(ValueError, match="'laptop' is not a valid Origin"):
        store.record_event(incident_id="P1", status="executed", origin="laptop")
    assert [(e["incident_id"], e["origin"]) for e in store.events()] == [
        ("P1", "bot"),
        ("SIM-1", "simulate"),
    ]


def test_schema_6_marks_the_rows_simulate_left_in_an_older_database(db_path: Path) -> None:
    """Before schema 6, `runbookctl simulate --execute --db` wrote rows like the bot's.
    The migration tells them apart by the incidents simulate opened."""
    old = FirstVersion(db_path, version=5)
    for incident_id in ("PXYZ123", "SIM-0A1B2C3D", "PLAIN-SIM"):
        old.insert(
            "automation_events",
            {"ts": T0, "incident_id": incident_id, "action": "check", "status": "succeeded"},
        )
    # an incident simulate opened under an id of its own choosing
    old.insert(
        "inbox",
        {
            "source": "simulate",
            "key": "simulate:open:PLAIN-SIM",
            "incident_id": "PLAIN-SIM",
            "kind": "incident.triggered",
            "payload": "{}",
            "received_at": T0,
            "status": "done",
        },
    )
    old.close()
    store = Store(db_path)
    assert store.schema_version == SCHEMA_VERSION
    assert {e["incident_id"]: e["origin"] for e in store.events()} == {
        "PXYZ123": "bot",
        "SIM-0A1B2C3D": "simulate",
        "PLAIN-SIM": "simulate",
    }
    # the users' dashboard query reads the migrated table as it always did
    assert store.query(OVERRIDES_QUERY) == []
    store.close()


def test_audit_statuses_are_the_event_vocabulary(store: Store) -> None:
    for status in Event:
        store.record_event(incident_id="P1", status=status)
    with pytest.raises(ValueError, match="unknown audit status 'done'"):
        store.record_event(incident_id="P1", status="done")
    events = store.events("P1")
    assert [e["status"] for e in events] == [str(s) for s in Event]
    assert all(e["ts"] > 0 for e in events)


def test_a_reader_is_not_blocked_by_a_unit_in_progress(db_path: Path) -> None:
    """WAL: `runbookctl report` reads while the bot writes, and sees only commits."""
    store = Store(db_path)
    incident, _run = open_incident(store)
    reader = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    with store.unit() as u:
        u.event(incident, Event.EXECUTED, action="check")
        u.emit(slack(None, "note"))
        assert reader.execute("SELECT count(*) FROM automation_events").fetchone() == (0,)
    assert reader.execute("SELECT count(*) FROM automation_events").fetchone() == (1,)
    assert reader.execute("SELECT count(*) FROM outbox").fetchone() == (1,)
    reader.close()
    store.close()


def test_commits_leave_checkpoints_to_the_background(db_path: Path) -> None:
    """A commit never copies the WAL into the database file (an fsync on the request
    path); `checkpoint()`, run by the bot's housekeeping thread, does."""
    store = Store(db_path)
    size = db_path.stat().st_size
    for n in range(1500):  # a page of WAL each: past SQLite's default limit of 1,000
        store.record_event(incident_id=f"P{n}", status="executed", detail="x" * 4000)
    assert db_path.stat().st_size == size  # everything is still in the WAL only

    pages, copied = store.checkpoint()
    assert copied == pages >= 1500
    assert db_path.stat().st_size > size + 1500 * 4000
    assert store.checkpoint() == (pages, pages)  # nothing new: nothing to do
    store.record_event(incident_id="P-after", status="executed")  # the store still writes
    store.close()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT count(*) FROM automation_events").fetchone() == (1501,)


# --- the transition table -------------------------------------------------------------------


def statuses(enum: type) -> set[StrEnum]:
    return set(cast("type[StrEnum]", enum))


# What rows are created with (bot.states' docstring): every other status must be reachable.
START: dict[type, set[StrEnum]] = {
    IncidentStatus: {IncidentStatus.OPEN},
    RunStatus: {RunStatus.RUNNING},
    StepStatus: {
        StepStatus.AWAITING_APPROVAL,
        StepStatus.RUNNING,  # automatic: created claimed
        StepStatus.BLOCKED,
        StepStatus.SKIPPED,
        StepStatus.ERROR,
    },
    ApprovalStatus: {ApprovalStatus.PENDING},
    InboxStatus: {InboxStatus.QUEUED, InboxStatus.PARKED},
    OutboxStatus: {OutboxStatus.PENDING},
}
# Where a row's life ends: no move out of these, and out of every other status some move.
FINAL: dict[type, set[StrEnum]] = {
    IncidentStatus: set(),
    RunStatus: {s for s in RunStatus if not s.live},
    StepStatus: {s for s in StepStatus if s.terminal},
    ApprovalStatus: statuses(ApprovalStatus) - {ApprovalStatus.PENDING, ApprovalStatus.APPROVED},
    InboxStatus: {InboxStatus.DONE, InboxStatus.IGNORED, InboxStatus.FAILED},
    OutboxStatus: {OutboxStatus.SENT, OutboxStatus.FAILED, OutboxStatus.CANCELLED},
}


def test_the_transition_table_is_closed() -> None:
    assert set(TRANSITIONS) == set(START)
    for enum, table in TRANSITIONS.items():
        members = statuses(enum)
        targets = {t for ts in table.values() for t in ts}
        assert set(table) <= members and targets <= members, enum.__name__
        assert all(type(s) is enum for s in (*table, *targets)), enum.__name__
        unreachable = members - targets - START[enum]
        assert not unreachable, f"{enum.__name__}: {sorted(unreachable)} can never be entered"
        from_start = set(START[enum])
        frontier = set(from_start)
        while frontier:  # every status is reachable from a start state through the table
            frontier = {t for s in frontier for t in table.get(s, ())} - from_start
            from_start |= frontier
        assert from_start == members, enum.__name__
        moving = members - FINAL[enum]  # e.g. a step is live while it can move on
        assert set(table) == moving, (
            f"{enum.__name__}: the table lists no move out of {sorted(moving - set(table))} "
            f"and moves out of final {sorted(set(table) - moving)}"
        )


def test_check_refuses_every_move_the_table_does_not_list() -> None:
    for enum, table in TRANSITIONS.items():
        for current in statuses(enum):
            for new in statuses(enum):
                listed = new in table.get(current, frozenset())
                assert states.allowed(current, new) is listed  # type: ignore[type-var]
                if listed:
                    states.check(current, new)  # type: ignore[type-var]
                else:
                    with pytest.raises(TransitionError, match=f"{current} -> {new}"):
                        states.check(current, new)  # type: ignore[type-var]


def test_sources_are_the_inverse_of_the_table() -> None:
    for enum, table in TRANSITIONS.items():
        for new in statuses(enum):
            sources = set(states.sources(new))  # type: ignore[type-var]
            assert sources == {s for s, ts in table.items() if new in ts}


# --- incidents and runs -------------------------------------------------------------------------


def test_an_incident_is_created_once_and_reads_back_typed(store: Store) -> None:
    with store.unit(at=T0) as u:
        created = must(
            u.create_incident(
                {"id": "P1", "title": "t", "service": "payments", "details": {"pod": "api-1"}}
            )
        )
        assert u.create_incident({"id": "P1", "title": "other", "service": "x"}) is None
    assert created.status is IncidentStatus.OPEN and created.open
    assert created.details == {"pod": "api-1"} and created.created_at == T0
    assert store.incident("P1") == created
    assert [i.id for i in store.incidents(IncidentStatus.OPEN)] == ["P1"]
    assert store.incidents(IncidentStatus.RESOLVED) == []


def test_incident_status_changes_are_checked_and_conditional(store: Store) -> None:
    opened, _run = open_incident(store)
    with store.unit(at=T0 + 5) as u:
        resolved = must(
            u.set_incident_status(
                opened, IncidentStatus.RESOLVED, state_changed_at="2026-01-01T10:00:00Z"
            )
        )
    assert (resolved.status, resolved.resolved_at) == (IncidentStatus.RESOLVED, T0 + 5)
    assert resolved.state_changed_at == "2026-01-01T10:00:00Z"
    with store.unit() as u:  # a worker that read it open: the row moved on
        assert u.set_incident_status(opened, IncidentStatus.RESOLVED, state_changed_at=None) is None
        with pytest.raises(TransitionError):
            u.set_incident_status(resolved, IncidentStatus.RESOLVED, state_changed_at=None)
        reopened = must(u.set_incident_status(resolved, IncidentStatus.OPEN, state_changed_at=None))
    assert reopened.resolved_at is None
    assert reopened.state_changed_at == "2026-01-01T10:00:00Z"  # kept when not given
    with store.unit() as u:
        u.note_state_change(reopened, "2026-01-01T11:00:00Z")
    assert must(store.incident("P1")).state_changed_at == "2026-01-01T11:00:00Z"


def test_state_changes_seen_are_pagerdutys_times_of_items_received(store: Store) -> None:
    times = {"e1": "2026-01-01T10:00:00Z", "e2": "2026-01-01T10:05:00Z"}
    put(store, "e1", kind="incident.resolved", payload={"occurred_at": times["e1"]})
    put(store, "e2", kind="incident.triggered", payload={"occurred_at": times["e2"]})
    put(store, "e3", kind="incident.acknowledged", payload={"occurred_at": "2026-01-02"})
    for item in store.inbox_items():
        with store.unit() as u:
            u.finish_item(item, InboxStatus.IGNORED)
    put(store, "e4", kind="incident.reopened", payload={"occurred_at": "2026-01-03"})  # queued
    with store.unit() as u:
        assert sorted(u.state_changes_seen("P1")) == [times["e1"], times["e2"]]
        assert u.state_changes_seen("P2") == []


def test_a_run_is_created_once_per_phase(store: Store) -> None:
    _incident, run = open_incident(store)
    assert (run.status, run.phase, run.cursor, run.started_at) == (
        RunStatus.RUNNING,
        Phase.MAIN,
        0,
        T0,
    )
    with store.unit() as u:
        assert u.create_run("P1", "payments-5xx", Phase.MAIN, "other") is None
        follow_up = must(u.create_run("P1", "payments-5xx", Phase.ON_RESOLVE, "c0ffee123456"))
        assert [r.id for r in u.runs_of("P1")] == [run.id, follow_up.id]
        assert u.run("P1", Phase.ON_RESOLVE) == follow_up == u.run_by_id(follow_up.id)
        incident, main = u.incident_with_run("P1", Phase.MAIN)
        assert must(incident).id == "P1" and main == run
        assert u.incident_with_run("P9", Phase.MAIN) == (None, None)
    assert store.run("P1") == run
    assert [r.id for r in store.live_runs()] == [run.id, follow_up.id]


def test_run_status_changes_are_checked_and_conditional(store: Store) -> None:
    _incident, run = open_incident(store)
    with store.unit(at=T0 + 1) as u:
        assert u.set_run_status(run, RunStatus.RUNNING) == run  # no change, no write
        waiting = must(u.set_run_status(run, RunStatus.WAITING))
        assert waiting.finished_at is None
        assert u.set_run_status(run, RunStatus.COMPLETED) is None  # read running: moved on
        escalated = must(u.set_run_status(waiting, RunStatus.ESCALATED))
        assert escalated.finished_at == T0 + 1
        with pytest.raises(TransitionError, match="escalated -> running"):
            u.set_run_status(escalated, RunStatus.RUNNING)


def test_moving_the_cursor_resumes_a_waiting_run_and_ends_a_rollback(store: Store) -> None:
    _incident, run = open_incident(store)
    with store.unit() as u:
        rolling = must(u.start_rollback(run))
        assert rolling.rollback_of == 0
        waiting = must(u.set_run_status(rolling, RunStatus.WAITING))
        moved = must(u.move_cursor(waiting, 1))
        assert (moved.cursor, moved.rollback_of, moved.status) == (1, None, RunStatus.RUNNING)
        assert u.move_cursor(waiting, 5) is None  # another worker moved it first
        done = must(u.set_run_status(moved, RunStatus.COMPLETED))
        with pytest.raises(TransitionError):
            u.move_cursor(done, 2)


def test_a_rollback_starts_once_and_never_revives_a_finished_run(store: Store) -> None:
    _incident, run = open_incident(store)
    with store.unit() as u:
        rolling = must(u.start_rollback(run))
        assert u.start_rollback(rolling) is None  # already rolling back
        cancelled = must(u.set_run_status(rolling, RunStatus.CANCELLED))
        with pytest.raises(TransitionError, match="cancelled -> running"):
            u.start_rollback(cancelled)
    assert must(store.run("P1")).status is RunStatus.CANCELLED


# --- steps and approvals ----------------------------------------------------------------------


def test_a_step_and_its_approval_are_created_together_once(store: Store) -> None:
    _incident, run = open_incident(store)
    step, approval = awaiting(store, run)
    assert step.status is StepStatus.AWAITING_APPROVAL and step.created_at == T0
    assert (approval.status, approval.requested_at, approval.expires_at) == (
        ApprovalStatus.PENDING,
        T0,
        T0 + 600,
    )
    assert approval.approver_users == ("U0LEAD",) and approval.approver_groups == ("S0ONCALL",)
    with store.unit() as u:
        again = u.create_step_run(
            step_values(run, 1, StepStatus.AWAITING_APPROVAL),
            {"incident_id": "P1", "action": "clear-cache", "approvers": {}, "expires_at": 1.0},
        )
        assert again is None
        assert u.latest_step_run(run.id, 1) == step
        retry = must(u.create_step_run(step_values(run, 1, StepStatus.BLOCKED, attempt=2)))
        assert u.latest_step_run(run.id, 1) == retry
        assert [s.id for s in u.step_runs_of("P1", run.id)] == [step.id, retry.id]
    assert store.pending_approvals("P1") == [approval]
    assert store.count_pending_approvals() == 1


def test_step_changes_follow_the_table_and_record_their_times(store: Store) -> None:
    _incident, run = open_incident(store)
    step, _approval = awaiting(store, run)
    with store.unit(at=T0 + 10) as u:
        approved = must(u.set_step(step, StepStatus.APPROVED))
        assert u.set_step(step, StepStatus.REJECTED) is None  # read awaiting: moved on
        claimed = must(u.set_step(approved, StepStatus.RUNNING, runner="local:7"))
        assert (claimed.started_at, claimed.runner, claimed.finished_at) == (
            T0 + 10,
            "local:7",
            None,
        )
    with store.unit(at=T0 + 12) as u:
        done = must(
            u.set_step(claimed, StepStatus.SUCCESS, exit_code=0, output="OK\n", duration=2.0)
        )
        assert (done.finished_at, done.exit_code, done.output) == (T0 + 12, 0, "OK\n")
        with pytest.raises(TransitionError, match="success -> running"):
            u.set_step(done, StepStatus.RUNNING)
        with pytest.raises(TransitionError, match="awaiting_approval -> running"):
            u.set_step(step, StepStatus.RUNNING)  # a guarded step is never claimed unapproved
    assert store.running_steps() == []


def test_exactly_one_of_many_workers_claims_a_step(db_target: str) -> None:
    first = Store(db_target)
    _incident, run = open_incident(first)
    step, _approval = awaiting(first, run)
    with first.unit() as u:
        approved = must(u.set_step(step, StepStatus.APPROVED))
    first.close()
    workers = [Store(db_target) for _ in range(8)]
    barrier = threading.Barrier(len(workers))
    claims: list[StepRun] = []

    def claim(store: Store, name: str) -> None:
        barrier.wait()
        with store.unit() as u:  # each worker read `approved` before any of them wrote
            claimed = u.set_step(approved, StepStatus.RUNNING, runner=name)
        if claimed is not None:
            claims.append(claimed)

    threads = [threading.Thread(target=claim, args=(s, f"w{i}")) for i, s in enumerate(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (won,) = claims
    assert must(workers[0].step_run(step.id)).runner == won.runner
    for s in workers:
        s.close()


def test_a_runner_is_reassigned_only_from_the_runner_read(store: Store) -> None:
    _incident, run = open_incident(store)
    step = running(store, run)
    with store.unit() as u:
        moved = must(u.reassign_runner(step, "local:2"))
        assert moved.runner == "local:2"
        assert u.reassign_runner(step, "local:3") is None  # read local:1: someone was first
        finished = must(u.set_step(moved, StepStatus.FAILED))
        assert u.reassign_runner(finished, "local:4") is None


def test_an_approval_is_decided_once_and_only_as_the_table_allows(store: Store) -> None:
    _incident, run = open_incident(store)
    _step, approval = awaiting(store, run)
    with store.unit() as u:
        approved = must(u.decide_approval(approval, ApprovalStatus.APPROVED, "U0LEAD", T0 + 30))
        assert u.decide_approval(approval, ApprovalStatus.REJECTED, "U0OTHER", T0 + 31) is None
        with pytest.raises(TransitionError, match="approved -> rejected"):
            u.decide_approval(approved, ApprovalStatus.REJECTED, "U0OTHER", T0 + 31)
        void = must(u.decide_approval(approved, ApprovalStatus.VOID, "", T0 + 40))
    assert (approved.decided_by, approved.decided_at) == ("U0LEAD", T0 + 30)
    assert void.status is ApprovalStatus.VOID and void.decided_by is None
    assert store.pending_approvals() == []


def test_a_pause_holds_a_pending_request_until_it_is_resumed(store: Store) -> None:
    _incident, run = open_incident(store)
    _step, approval = awaiting(store, run)
    with store.unit() as u:
        paused = must(u.pause_approval(approval, "U0LEAD", T0 + 100))
        assert u.pause_approval(paused, "U0OTHER", T0 + 101) is None  # already paused
        assert paused.paused_by == "U0LEAD" and paused.paused_at == T0 + 100
    assert store.due_approvals(T0 + 10_000) == []  # a paused request never expires
    assert store.next_deadline() is None
    with store.unit() as u:
        resumed = must(u.resume_approval(paused, T0 + 900))
        assert u.resume_approval(resumed, T0 + 999) is None  # not paused any more
    assert (resumed.paused_at, resumed.paused_by, resumed.expires_at) == (None, None, T0 + 900)
    assert store.next_deadline() == T0 + 900
    assert store.due_approvals(T0 + 900) == [resumed]
    with store.unit() as u:
        decided = must(u.decide_approval(resumed, ApprovalStatus.REJECTED, "U0LEAD", T0))
        assert u.pause_approval(decided, "U0LEAD", T0) is None  # nothing left to hold


def test_pending_approvals_of_a_run_come_with_their_steps(store: Store) -> None:
    _incident, run = open_incident(store)
    first, first_request = awaiting(store, run, 1)
    second, second_request = awaiting(store, run, 2)
    with store.unit() as u:
        u.decide_approval(first_request, ApprovalStatus.APPROVED, "U0LEAD", T0)
        assert u.pending_approvals(run.id) == [(second_request, second)]
    assert first.id != second.id


# --- one transaction: all or nothing ------------------------------------------------------------


def test_a_unit_that_raises_commits_nothing(store: Store) -> None:
    incident, run = open_incident(store)
    step, approval = awaiting(store, run)
    put(store, "e1")
    (item,) = store.inbox_ready(10)
    with pytest.raises(RuntimeError, match="boom"), store.unit() as u:
        u.set_step(step, StepStatus.APPROVED)
        u.decide_approval(approval, ApprovalStatus.APPROVED, "U0LEAD", T0)
        u.set_run_status(run, RunStatus.WAITING)
        u.event(incident, Event.APPROVED, action="clear-cache", actor="U0LEAD")
        u.emit(slack("step:1", "update_step"))
        u.finish_item(item, InboxStatus.DONE)
        raise RuntimeError("boom")
    assert must(store.step_run(step.id)).status is StepStatus.AWAITING_APPROVAL
    assert must(store.approval(step.id)).status is ApprovalStatus.PENDING
    assert must(store.run("P1")).status is RunStatus.RUNNING
    assert store.events() == [] and store.outbox_items() == []
    assert [i.key for i in store.inbox_ready(10)] == ["e1"]
    with store.unit() as u:  # and the store goes on working
        u.event(incident, Event.RESOLVED)
    assert [e["status"] for e in store.events()] == ["resolved"]


def test_events_and_effects_commit_with_the_change(store: Store) -> None:
    incident, _run = open_incident(store)
    with store.unit(at=T0 + 3) as u:
        u.event(incident, Event.EXECUTED, step_id="check", action="check", actor="U0LEAD")
        u.emit(slack(None, "note", 1))
    (event,) = store.events("P1")
    assert {k: event[k] for k in ("ts", "service", "runbook_id", "env", "status", "actor")} == {
        "ts": T0 + 3,
        "service": "payments",
        "runbook_id": "payments-5xx",
        "env": "staging",
        "status": "executed",
        "actor": "U0LEAD",
    }
    assert event["catalog_commit"] == "c0ffee123456"
    (note,) = store.outbox_items("P1")
    assert (note.kind, note.payload, note.created_at, note.status) == (
        "note",
        {"n": 1},
        T0 + 3,
        OutboxStatus.PENDING,
    )


def test_an_item_applied_by_another_worker_raises_already_applied(db_target: str) -> None:
    mine, theirs = Store(db_target), Store(db_target)
    incident, _run = open_incident(mine)
    put(mine, "e1")
    (item,) = mine.inbox_ready(10)
    (same,) = theirs.inbox_ready(10)
    with theirs.unit() as u:
        u.event(incident, Event.RESOLVED, actor="them")
        u.finish_item(same, InboxStatus.DONE)
    with pytest.raises(AlreadyApplied), mine.unit() as u:
        u.event(incident, Event.RESOLVED, actor="me")
        u.emit(slack(None, "note"))
        u.finish_item(item, InboxStatus.DONE)
    assert [e["actor"] for e in mine.events()] == ["them"]  # mine rolled back, all of it
    assert mine.outbox_items() == []
    (applied,) = mine.inbox_items()
    assert applied.status is InboxStatus.DONE and applied.processed_at is not None
    with mine.unit() as u, pytest.raises(TransitionError):
        u.finish_item(applied, InboxStatus.IGNORED)  # the table: done is final
    with mine.unit() as u, pytest.raises(TransitionError):
        u.finish_item(item, InboxStatus.QUEUED)
    mine.close()
    theirs.close()


# --- the inbox ----------------------------------------------------------------------------------


def test_the_bots_store_records_intake_in_its_log_and_moves_it_in_receipt_order(
    db_path: Path,
) -> None:
    store = Store(db_path, intake_log=True)
    assert Path(f"{db_path}-intake").exists()

    def request(key: str, incident_id: str = "P1", **extra: Any) -> bool:
        return put(store, key, incident_id, waiting=True, **extra)

    assert request("e1", alt_key="d1") and request("e2", "P2") and request("e3")
    assert not request("e1") and not request("other", alt_key="d1")  # seen in the log
    assert store.count_queued() == 3  # waiting in the log count as queued
    assert store.query("SELECT * FROM inbox") == []  # nothing in the inbox until moved
    assert store.inbox_receive() == 3 and store.inbox_receive() == 0
    assert [(i.key, i.incident_id) for i in store.inbox_ready(10)] == [("e1", "P1"), ("e2", "P2")]
    assert not request("e2") and not request("x", alt_key="d1")  # seen in the inbox
    assert store.count_queued() == 3
    store.close()


def test_an_item_of_the_bot_itself_comes_after_what_the_log_received_before_it(
    db_path: Path,
) -> None:
    store = Store(db_path, intake_log=True)
    put(store, "resolve", waiting=True)  # acknowledged: in the log
    put(store, "step:1:1:end", source="executor")  # a step's result, straight in the inbox
    assert [i.key for i in store.inbox_items()] == ["resolve", "step:1:1:end"]
    store.close()


def test_concurrent_intake_commits_in_groups_and_dedupes_within_them(db_path: Path) -> None:
    store = Store(db_path, intake_log=True)
    results: dict[str, list[bool]] = {"unique": [], "same": []}
    start = threading.Barrier(40)

    def deliver(n: int) -> None:
        start.wait()
        same = n % 2 == 0
        new = put(store, "same-event" if same else f"event-{n}", f"P{n}", waiting=True)
        results["same" if same else "unique"].append(new)

    threads = [threading.Thread(target=deliver, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results["unique"] == [True] * 20
    assert sorted(results["same"]) == [False] * 19 + [True]  # one of the twenty is new
    assert store.count_queued() == 21
    store.close()


def test_a_group_with_one_key_twice_records_it_once_and_keeps_receipt_order(
    db_path: Path,
) -> None:
    store = Store(db_path, intake_log=True)
    assert store.intake is not None
    blocker = sqlite3.connect(f"{db_path}-intake", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer: the first commit waits for it
    results: dict[str, bool] = {}

    def deliver(name: str, key: str, **extra: Any) -> None:
        results[name] = put(store, key, f"P-{key}", waiting=True, **extra)

    leader = threading.Thread(target=deliver, args=("leader", "first"))
    leader.start()
    wait_for(lambda: store.intake is not None and store.intake._committing)  # the leader
    queued = [
        threading.Thread(target=deliver, args=args, kwargs=kwargs)
        for args, kwargs in [
            (("dup-1", "dup"), {}),
            (("alt-1", "a1"), {"alt_key": "same-delivery"}),
            (("dup-2", "dup"), {}),
            (("alt-2", "a2"), {"alt_key": "same-delivery"}),
        ]
    ]
    log = store.intake
    for n, thread in enumerate(queued, 1):
        thread.start()  # one at a time into the next group, so that its order is known
        wait_for(lambda n=n: len(log._queue) == n)  # type: ignore[misc]
    blocker.execute("COMMIT")
    for thread in [leader, *queued]:
        thread.join(30)
    assert results == {"leader": True, "dup-1": True, "alt-1": True, "dup-2": False, "alt-2": False}
    assert store.inbox_receive() == 3
    assert [i.key for i in store.inbox_items()] == ["first", "dup", "a1"]
    blocker.close()
    store.close()


def test_a_group_that_cannot_be_committed_is_refused_whole(db_path: Path) -> None:
    store = Store(db_path, intake_log=True)
    assert store.intake is not None
    (pages,) = store.intake.conn.execute("PRAGMA page_count").fetchone()
    store.intake.conn.execute(f"PRAGMA max_page_count = {pages}")  # its disk is full
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for n in range(100):
            put(store, f"e{n}", payload={"blob": "x" * 20_000}, waiting=True)
    assert store.intake.count_pending() == n  # what was acknowledged, and not the rest
    store.intake.conn.execute("PRAGMA max_page_count = 1073741823")
    assert put(store, f"e{n}", waiting=True)  # the refused one, retried
    store.close()


def test_the_intake_log_syncs_each_acknowledged_item_to_disk(db_path: Path) -> None:
    store = Store(db_path, intake_log=True)
    assert store.intake is not None
    (level,) = store.intake.conn.execute("PRAGMA synchronous").fetchone()
    assert level == 2  # FULL: an acknowledged item survives a power loss, not just a crash
    store.close()


def test_leftovers_in_the_intake_log_are_moved_when_the_bot_opens_the_store(
    db_path: Path,
) -> None:
    first = Store(db_path, intake_log=True)
    put(first, "e1", waiting=True)
    put(first, "e2", waiting=True)
    first.close()  # stopped before moving them (as a kill would)
    assert Store(db_path).inbox_items() == []  # others see the inbox only
    second = Store(db_path, intake_log=True)
    assert [i.key for i in second.inbox_items()] == ["e1", "e2"]
    second.close()


def test_a_move_repeated_after_a_crash_changes_nothing(db_path: Path) -> None:
    store = Store(db_path, intake_log=True)
    put(store, "e1", waiting=True)
    put(store, "e2", waiting=True)
    assert store.intake is not None
    rows = store.intake.pending()
    with store._transaction():  # moved, and killed before the log learnt it
        store._insert_received([row[1:] for row in rows[:1]])
    put(store, "e3", waiting=True)
    assert store.inbox_receive() == 3
    assert [i.key for i in store.inbox_items()] == ["e1", "e2", "e3"]  # once each, in order
    store.close()


def test_one_bot_per_sqlite_database(db_path: Path) -> None:
    first = Store(db_path, intake_log=True)
    with pytest.raises(StoreError, match=r"another runbook-bot \(pid \d+\) is using"):
        Store(db_path, intake_log=True)
    reader = Store(db_path)  # runbookctl and reports still open it
    reader.close()
    first.close()
    Store(db_path, intake_log=True).close()  # free again once the first let go


def test_the_inbox_dedupes_by_key_and_alt_key_across_reopening(db_target: str) -> None:
    store = Store(db_target)
    assert put(store, "pagerduty:event:E1", alt_key="pagerduty:delivery:D1")
    assert not put(store, "pagerduty:event:E1", alt_key="pagerduty:delivery:D2")  # same event
    assert not put(store, "pagerduty:event:E2", alt_key="pagerduty:delivery:D1")  # a retry
    store.close()
    reopened = Store(db_target)
    assert not put(reopened, "pagerduty:event:E1")
    assert not put(reopened, "pagerduty:event:E3", alt_key="pagerduty:delivery:D1")
    assert put(reopened, "pagerduty:event:E3", alt_key="pagerduty:delivery:D3")
    assert put(reopened, "slack:event:Ev1")  # no alt key: many may have none
    assert put(reopened, "slack:event:Ev2")
    assert [i.key for i in reopened.inbox_items()] == [
        "pagerduty:event:E1",
        "pagerduty:event:E3",
        "slack:event:Ev1",
        "slack:event:Ev2",
    ]
    assert reopened.has_item("slack:event:Ev1") and not reopened.has_item("nope")
    reopened.close()


def test_inbox_ready_gives_each_incidents_oldest_item_in_receipt_order(store: Store) -> None:
    for key, incident in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("c1", "C"), ("b2", "B")]:
        put(store, key, incident, received_at=T0)  # same receipt time: receipt order rules
    assert [i.key for i in store.inbox_ready(10)] == ["a1", "b1", "c1"]
    assert [i.key for i in store.inbox_ready(2)] == ["a1", "b1"]
    assert [i.key for i in store.inbox_ready(10, exclude={"A"})] == ["b1", "c1"]
    assert [i.key for i in store.inbox_ready(1, exclude={"A", "B"})] == ["c1"]
    a1 = store.inbox_ready(1)[0]
    with store.unit() as u:
        u.finish_item(a1, InboxStatus.DONE)
    assert [i.key for i in store.inbox_ready(10)] == ["b1", "a2", "c1"]
    assert store.count_queued() == 4


def test_inbox_next_follows_one_incident_in_receipt_order(store: Store) -> None:
    put(store, "resolve", received_at=T0 + 5)
    put(store, "approve", received_at=T0 + 1)  # stamped earlier, received later
    put(store, "other", "P2")
    order = []
    while (item := store.inbox_next("P1")) is not None:
        order.append(item.key)
        with store.unit() as u:
            u.finish_item(item, InboxStatus.DONE)
    assert order == ["resolve", "approve"]
    assert [i.key for i in store.inbox_items(incident_id="P2")] == ["other"]
    assert store.inbox_items(source="slack") == []


def test_a_failed_attempt_is_counted_and_the_last_is_kept_for_a_human(store: Store) -> None:
    put(store, "first")
    put(store, "second")
    item = must(store.inbox_next("P1"))
    store.inbox_attempt_failed(item, "KeyError: 'x'", give_up=False)
    again = must(store.inbox_next("P1"))
    assert (again.key, again.attempts, again.detail) == ("first", 1, "KeyError: 'x'")
    store.inbox_attempt_failed(again, "KeyError: 'x'" * 200, give_up=True)
    (kept,) = [i for i in store.inbox_items() if i.key == "first"]
    assert kept.status is InboxStatus.FAILED and kept.attempts == 2
    assert len(kept.detail) == 1000 and kept.processed_at is not None
    assert must(store.inbox_next("P1")).key == "second"  # it no longer holds the incident


def test_an_item_recorded_as_handled_is_never_ready(store: Store) -> None:
    put(store, "dup", status=InboxStatus.IGNORED, detail="a duplicate seen at the edge")
    (item,) = store.inbox_items()
    assert item.status is InboxStatus.IGNORED and item.processed_at is not None
    assert store.inbox_ready(10) == [] and store.count_queued() == 0
    assert not put(store, "dup")


def park(store: Store, key: str, ts: str, received_at: float = T0) -> bool:
    """A ✅ on a message whose ts is not recorded yet (as the Slack intake parks it)."""
    return store.inbox_put(
        source="slack",
        key=key,
        incident_id="",
        kind="step.approve",
        payload={"user": "U0LEAD", "channel": "C0INC", "ts": ts, "reaction": "white_check_mark"},
        received_at=received_at,
        status=InboxStatus.PARKED,
    )


def test_a_reaction_parked_for_its_message_joins_the_incident_once_it_is_posted(
    store: Store,
) -> None:
    with store.unit() as u:
        u.emit(slack("step:7", "post_step", 1))
    assert park(store, "slack:event:Ev1", "100.7")
    assert not park(store, "slack:event:Ev1", "100.7")  # deduplicated like any item
    (parked,) = store.inbox_items()
    assert parked.status is InboxStatus.PARKED and parked.processed_at is None
    assert store.inbox_ready(10) == [] and store.count_queued() == 0
    (post,), _ = store.outbox_heads(T0)
    assert store.outbox_sent(post, ts="100.7", channel="C0INC")
    (released,) = store.inbox_ready(10)
    assert (released.id, released.incident_id, released.status) == (
        parked.id,
        "P1",
        InboxStatus.QUEUED,
    )
    assert released.payload["step_run_id"] == 7 and released.payload["user"] == "U0LEAD"
    # once the message is recorded, a reaction on it is queued at once
    assert park(store, "slack:event:Ev2", "100.7")
    assert [i.key for i in store.inbox_items("P1")] == ["slack:event:Ev1", "slack:event:Ev2"]


def test_parked_items_about_no_message_of_the_bot_expire(store: Store) -> None:
    park(store, "slack:event:old", "999.1", received_at=T0 - 7200)
    park(store, "slack:event:new", "999.2", received_at=T0)
    assert store.inbox_expire_parked(T0 - 3600) == 1
    expired, waiting = store.inbox_items()
    assert (expired.key, expired.status) == ("slack:event:old", InboxStatus.IGNORED)
    assert expired.processed_at is not None and "not about a message" in expired.detail
    assert waiting.status is InboxStatus.PARKED


# --- the outbox ---------------------------------------------------------------------------------


def test_a_newer_rendering_of_a_pending_message_replaces_it(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack("step:1", "post_step", 1))
        u.emit(slack("step:1", "update_step", 2))  # same transaction: one row
        u.emit(slack(None, "note", 0))
        u.emit(slack("step:2", "post_step", 1))
    with store.unit() as u:
        u.emit(slack("step:1", "update_step", 3))  # later: still one row, a new version
    post, note, other = store.outbox_items()
    assert (post.kind, post.key, post.payload, post.version) == ("post_step", "step:1", {"n": 3}, 2)
    assert (note.kind, other.payload, other.version) == ("note", {"n": 1}, 1)
    assert store.count_outbox_pending() == 3


def test_a_stale_send_keeps_the_newer_rendering_pending_as_an_update(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack("step:1", "post_step", 1))
    (in_flight,), _ = store.outbox_heads(T0)
    with store.unit() as u:  # the step finished while its post was on its way
        u.emit(slack("step:1", "update_step", 2))
    assert not store.outbox_sent(in_flight, ts="100.1", channel="C0INC")
    (row,) = store.outbox_items()
    assert (row.status, row.kind, row.ts, row.payload) == (
        OutboxStatus.PENDING,
        "update_step",
        "100.1",
        {"n": 2},
    )
    assert store.message_ref("step:1") == ("C0INC", "100.1")  # reactions find it already
    (update,), _ = store.outbox_heads(T0)
    assert (update.target_ts, update.target_channel) == ("100.1", "C0INC")
    assert store.outbox_sent(update)
    (sent,) = store.outbox_items()
    assert (sent.status, sent.ts, sent.payload) == (OutboxStatus.SENT, "100.1", {"n": 2})


def test_a_stale_update_stays_pending_with_the_newer_rendering(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack("step:1", "post_step", 1))
    (post,), _ = store.outbox_heads(T0)
    assert store.outbox_sent(post, ts="100.1", channel="C0INC")
    with store.unit() as u:
        u.emit(slack("step:1", "update_step", 2))  # the message is out: a new row
    (update,), _ = store.outbox_heads(T0)
    with store.unit() as u:
        u.emit(slack("step:1", "update_step", 3))
    assert not store.outbox_sent(update)
    (again,), _ = store.outbox_heads(T0)
    assert (again.id, again.kind, again.payload, again.version) == (
        update.id,
        "update_step",
        {"n": 3},
        2,
    )
    assert store.outbox_sent(again)
    assert pending(store) == []


def test_an_update_of_a_message_never_queued_does_not_hold_up_its_lane(store: Store) -> None:
    """An update can only wait for a post that exists: one about a message that was never
    queued (an earlier version lost it; a repair item posts it again) fails at once."""
    with store.unit() as u:
        u.emit(slack("step:9", "update_step", 4))
        u.emit(slack(None, "note", 5))
    (head,), _ = store.outbox_heads(T0)
    assert (head.kind, head.key, head.target_failed) == ("update_step", "step:9", True)
    store.outbox_failed(head, "its message was never posted")
    (note,), _ = store.outbox_heads(T0)
    assert note.kind == "note"


def test_posting_the_root_records_the_thread_on_the_incident(store: Store) -> None:
    open_incident(store)
    with store.unit() as u:
        u.emit(
            Effect(
                incident_id="P1",
                target="slack",
                lane="slack:#incidents",
                kind="post_incident",
                key="root:P1",
                payload={"channel": "#incidents"},
            )
        )
        u.emit(slack(None, "note", 1))
    (root,), _ = store.outbox_heads(T0)
    assert root.thread_ts is None
    assert store.outbox_sent(root, ts="100.1", channel="C0INC")
    incident = must(store.incident("P1"))
    assert (incident.thread_ts, incident.channel) == ("100.1", "C0INC")
    (note,), _ = store.outbox_heads(T0)
    assert (note.thread_ts, note.thread_channel) == ("100.1", "C0INC")
    assert store.message_at("C0INC", "100.1") == ("root:P1", "P1")


def test_outbox_heads_give_one_head_per_lane_in_lane_order(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack(None, "note", 1, lane="slack:A"))
        u.emit(slack(None, "note", 2, lane="slack:A"))
        u.emit(slack(None, "note", 3, lane="slack:B"))
        u.emit(
            Effect(
                incident_id="P1",
                target="pagerduty",
                lane="pagerduty:P1",
                kind="pd_note",
                payload={"text": "x"},
            )
        )
    heads, later = store.outbox_heads(T0)
    assert [(h.lane, h.payload.get("n")) for h in heads] == [
        ("slack:A", 1),
        ("slack:B", 3),
        ("pagerduty:P1", None),
    ]
    assert later is None
    assert len(store.outbox_heads(T0, limit=1)[0]) == 1
    first = heads[0]
    assert store.outbox_sent(first)
    assert [h.payload.get("n") for h in store.outbox_heads(T0)[0] if h.lane == "slack:A"] == [2]


def test_effects_about_a_message_wait_for_its_post(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack(None, "note", 0))  # ahead of the step in its thread
        u.emit(slack("step:1", "post_step", 1))
        u.emit(slack("step:1", "react", lane="slack-react:#incidents"))
    heads, later = store.outbox_heads(T0)
    assert [h.kind for h in heads] == ["note"]  # the reactions wait; no timer wakes them
    assert later is None
    assert store.outbox_sent(heads[0], ts="100.1", channel="C0INC")
    (post,), _ = store.outbox_heads(T0)
    assert post.kind == "post_step"
    assert store.outbox_sent(post, ts="100.2", channel="C0INC")
    (react,), _ = store.outbox_heads(T0)
    assert (react.kind, react.target_ts, react.target_channel) == ("react", "100.2", "C0INC")


def test_a_pagerduty_note_waits_a_while_for_the_thread_it_links(store: Store) -> None:
    open_incident(store)
    root = Effect(
        incident_id="P1",
        target="slack",
        lane="slack:#incidents",
        kind="post_incident",
        key="root:P1",
        payload={"channel": "#incidents"},
    )
    note = Effect(
        incident_id="P1", target="pagerduty", lane="pagerduty:P1", kind="pd_note", payload={}
    )
    with store.unit(at=T0) as u:
        u.emit(root)
        u.emit(note)
    (head,), _ = store.outbox_heads(T0 + 1)
    assert head.kind == "post_incident"  # the note waits for the root it links
    late = T0 + THREAD_LINK_WAIT  # Slack is down: PagerDuty is not held back for long
    assert [(h.kind, h.thread_ts) for h in store.outbox_heads(late)[0]] == [
        ("post_incident", None),
        ("pd_note", None),
    ]
    assert store.outbox_sent(head, ts="100.1", channel="C0INC")
    (posted,), _ = store.outbox_heads(T0 + 1)
    assert (posted.kind, posted.thread_ts, posted.thread_channel) == ("pd_note", "100.1", "C0INC")


def test_effects_about_a_refused_message_are_released(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack("step:1", "post_step", 1))
        u.emit(slack("step:1", "react", lane="slack-react:#incidents"))
    (post,), _ = store.outbox_heads(T0)
    store.outbox_failed(post, "invalid_blocks")
    (react,), _ = store.outbox_heads(T0)
    assert react.kind == "react" and react.target_failed and react.target_ts is None
    failed = store.outbox_items(status=OutboxStatus.FAILED)
    assert [(f.kind, f.error, f.attempts) for f in failed] == [("post_step", "invalid_blocks", 1)]


def test_heads_skip_busy_lanes_and_say_when_the_next_is_due(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack(None, "note", 1, lane="slack:A"))
        u.emit(slack(None, "note", 2, lane="slack:B"))
        u.emit(slack(None, "note", 3, lane="slack:C"))
    a, b, c = store.outbox_heads(T0)[0]
    assert [h.lane for h in store.outbox_heads(T0, exclude={"slack:A"})[0]] == [
        "slack:B",
        "slack:C",
    ]
    store.outbox_retry(b, T0 + 30, "ratelimited")  # Retry-After: 30
    store.outbox_retry(c, T0 + 5, "HTTP 503")
    heads, later = store.outbox_heads(T0)
    assert [h.lane for h in heads] == ["slack:A"] and later == T0 + 5
    assert [h.lane for h in store.outbox_heads(T0 + 5)[0]] == ["slack:A", "slack:C"]
    (retried,) = [h for h in store.outbox_heads(T0 + 30)[0] if h.lane == "slack:B"]
    assert (retried.attempts, retried.error, retried.next_at) == (1, "ratelimited", T0 + 30)
    assert a.lane == "slack:A"


def test_cancelled_reactions_are_never_delivered(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack("step:1", "post_step", 1))
        u.emit(slack("step:1", "react", lane="slack-react:#incidents"))
    with store.unit() as u:
        u.emit(slack("step:2", "post_step", 1))
        u.emit(slack("step:2", "react", lane="slack-react:#incidents"))
        u.cancel_effects("step:2")  # decided in the same transaction: never offered
        u.cancel_effects("step:1")  # decided later: the committed offer is cancelled
    rows = {(r.key, r.kind): r.status for r in store.outbox_items()}
    assert rows == {
        ("step:1", "post_step"): OutboxStatus.PENDING,
        ("step:1", "react"): OutboxStatus.CANCELLED,
        ("step:2", "post_step"): OutboxStatus.PENDING,
    }


def test_a_payload_decided_by_the_sender_is_kept_for_its_retry(store: Store) -> None:
    with store.unit() as u:
        u.emit(
            Effect(
                incident_id="P1",
                target="pagerduty",
                lane="pagerduty:P1",
                kind="pd_escalate",
                payload={"reason": "x"},
            )
        )
    (item,), _ = store.outbox_heads(T0)
    store.outbox_set_payload(item, {"reason": "x", "level": 2})
    (again,), _ = store.outbox_heads(T0)
    assert again.payload == {"reason": "x", "level": 2}
    assert store.outbox_items("P1", target="pagerduty") == [again]
    assert store.outbox_items("P1", target="slack") == []


def test_message_at_and_message_ref_find_the_bots_messages(store: Store) -> None:
    with store.unit() as u:
        u.emit(slack("step:1", "post_step", 1))
        u.emit(slack(None, "note", 1))
    assert store.message_at("C0INC", "100.1") is None and store.message_ref("step:1") is None
    for ts in ("100.1", "100.2"):  # the step, then the note
        (head,), _ = store.outbox_heads(T0)
        assert store.outbox_sent(head, ts=ts, channel="C0INC")
    assert store.message_at("C0INC", "100.1") == ("step:1", "P1")
    assert store.message_at("", "100.1") == ("step:1", "P1")  # a channel Slack left out
    assert store.message_at("C0OTHER", "100.1") is None
    assert store.message_at("C0INC", "100.2") is None  # a note is about no step
    assert store.message_ref("step:1") == ("C0INC", "100.1")


class _Slack:
    """A model of Slack for the property below: messages by ts, what each key showed."""

    def __init__(self) -> None:
        self.messages: dict[str, int] = {}
        self.posts: dict[str, int] = {}
        self.shown: dict[str, list[int]] = {}

    def deliver(self, item: OutboxItem) -> str | None:
        n = int(item.payload["n"])
        key = must(item.key)
        if item.kind == "post_step":
            ts = f"{len(self.messages) + 1}.0"
            self.posts[key] = self.posts.get(key, 0) + 1
        else:
            assert item.kind == "update_step"
            ts = must(item.target_ts)
            assert ts in self.messages  # an update always finds its message
        self.messages[ts] = n
        self.shown.setdefault(key, []).append(n)
        return ts if item.kind == "post_step" else None


_KEYS = ("step:1", "step:2", "step:3")
_operation = st.one_of(
    st.tuples(st.just("emit"), st.sampled_from(_KEYS), st.integers(1, 2)),
    st.tuples(st.just("take"), st.sampled_from(("slack:A", "slack:B")), st.just(0)),
    st.tuples(st.just("send"), st.sampled_from(("slack:A", "slack:B")), st.booleans()),
)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(_operation, max_size=40))
def test_any_interleaving_of_renderings_and_sends_shows_the_latest_last(
    operations: list[tuple[str, str, Any]],
) -> None:
    """One message per key is posted once, its renderings never go back in time, and
    the latest rendering is what it shows at the end: however emits (one or two per
    transaction) interleave with sends (one in flight per lane, some failing)."""
    with tempfile.TemporaryDirectory() as scratch:
        store = Store(Path(scratch) / "state.db")
        chat = _Slack()
        latest: dict[str, int] = {}
        in_flight: dict[str, OutboxItem] = {}

        def lane_of(key: str) -> str:
            return "slack:A" if key != "step:2" else "slack:B"

        def take(lane: str) -> None:
            if lane in in_flight:
                return
            heads, _later = store.outbox_heads(T0, exclude=set(in_flight))
            for head in heads:
                if head.lane == lane:
                    in_flight[lane] = head

        def send(lane: str, ok: bool) -> None:
            item = in_flight.pop(lane, None)
            if item is None:
                return
            if not ok:  # not delivered (a 503): tried again later
                store.outbox_retry(item, T0, "HTTP 503")
                return
            ts = chat.deliver(item)
            store.outbox_sent(item, ts=ts, channel=lane.removeprefix("slack:"))

        for op, target, arg in operations:
            if op == "emit":
                with store.unit() as u:
                    for _ in range(int(arg)):
                        n = latest[target] = latest.get(target, 0) + 1
                        kind = "post_step" if n == 1 else "update_step"
                        u.emit(slack(target, kind, n, lane=lane_of(target)))
            elif op == "take":
                take(target)
            else:
                send(target, bool(arg))
        for _ in range(4 * len(operations) + 4):  # then the senders catch up
            for lane in ("slack:A", "slack:B"):
                take(lane)
                send(lane, True)
        assert pending(store) == []
        store.close()
    for key, n in latest.items():
        assert chat.posts[key] == 1, key
        assert chat.shown[key][-1] == n, key
        assert chat.shown[key] == sorted(set(chat.shown[key])), key


# --- health ----------------------------------------------------------------------------------


def test_probe_write_commits_and_fails_while_another_writer_holds_the_lock(db_path: Path) -> None:
    store = Store(db_path, clock=lambda: T0, busy_timeout=0.2)
    store.probe_write()
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("SELECT value FROM meta WHERE key = 'write_probe'").fetchone() == (
            str(T0),
        )
    other = sqlite3.connect(db_path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. a second bot started on the same file
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store.probe_write()
    other.execute("ROLLBACK")
    other.close()
    store.probe_write()  # works again by itself
    open_incident(store)
    store.close()


def test_a_full_disk_fails_the_unit_and_the_store_recovers_by_itself(db_path: Path) -> None:
    store = Store(db_path)
    incident, _run = open_incident(store)
    pages = store.query_one("PRAGMA page_count")
    assert pages is not None
    store.conn.execute(f"PRAGMA max_page_count = {pages['page_count']}")  # the disk is full
    with pytest.raises(sqlite3.OperationalError, match="full"), store.unit() as u:
        for n in range(50):
            u.event(incident, Event.EXECUTED, detail="x" * 4000 + str(n))
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.record_event(incident_id="P1", status="executed", detail="y" * 300_000)
    assert not store.conn.in_transaction
    store.conn.execute("PRAGMA max_page_count = 1073741823")  # space again
    store.probe_write()
    with store.unit() as u:
        u.event(incident, Event.EXECUTED)
    assert [e["detail"] for e in store.events()] == [None]
    store.close()


# --- the first version's database (schema 3) -------------------------------------------------

# --- the first version's database (schema 3) -------------------------------------------------
#
# `FirstVersion` writes exactly what the first version's store wrote: its schema (the
# migrations 1 to 3 kept in bot.store.schema) and its statements, copied from
# `git show 547ac31:bot/store.py` (only `received_at`, which it took from time.time(),
# is given here). The data is what its engine and intakes left behind.


class FirstVersion:
    def __init__(self, path: Path, version: int = 3) -> None:
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        self.conn = conn
        self.db = sqlite_utils.Database(conn)
        with self.transaction() as c:
            c.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            for number in range(1, version + 1):
                MIGRATIONS[number](self.db)
            c.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(version),),
            )

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    def execute(self, sql: str, params: Any = ()) -> int:
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def insert(self, table: str, row: dict[str, Any]) -> int:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.transaction() as conn:
            cursor = conn.execute(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
            )
            return int(cursor.lastrowid or 0)

    def update(self, table: str, pk: Any, values: dict[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*values.values(), pk))

    def create_incident(self, row: dict[str, Any]) -> bool:
        values = {**row, "details": json.dumps(row.get("details") or {}, sort_keys=True)}
        with self.transaction() as conn:
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cursor = conn.execute(
                f"INSERT OR IGNORE INTO incidents ({columns}) VALUES ({marks})",
                tuple(values.values()),
            )
            return cursor.rowcount == 1

    def create_run(self, row: dict[str, Any]) -> int:
        with self.transaction() as conn:
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            conn.execute(
                f"INSERT OR IGNORE INTO runs ({columns}) VALUES ({marks})", tuple(row.values())
            )
            found = conn.execute(
                "SELECT id FROM runs WHERE incident_id = ? AND phase = ?",
                (row["incident_id"], row["phase"]),
            ).fetchone()
            return int(found[0])

    def create_step_run(self, row: dict[str, Any], approval: dict[str, Any] | None = None) -> int:
        with self.transaction() as conn:
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            cursor = conn.execute(
                f"INSERT OR IGNORE INTO step_runs ({columns}) VALUES ({marks})",
                tuple(row.values()),
            )
            created = cursor.rowcount == 1
            found = conn.execute(
                "SELECT id FROM step_runs WHERE run_id = ? AND step_index = ? AND attempt = ?",
                (row["run_id"], row["step_index"], row["attempt"]),
            ).fetchone()
            step_run_id = int(found[0])
            if created and approval is not None:
                values = {**approval, "step_run_id": step_run_id}
                conn.execute(
                    f"INSERT INTO approvals ({', '.join(values)}) "
                    f"VALUES ({', '.join('?' for _ in values)})",
                    tuple(values.values()),
                )
            return step_run_id

    def claim_step(self, step_run_id: int, worker: str, at: float) -> bool:
        return (
            self.execute(
                "UPDATE step_runs SET status = 'running', claimed_by = ?, started_at = ? "
                "WHERE id = ? AND status IN (?, ?)",
                (worker, at, step_run_id, "pending", "approved"),
            )
            == 1
        )

    def transition_step(
        self, step_run_id: int, from_statuses: tuple[str, ...], values: dict[str, Any]
    ) -> bool:
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" for _ in from_statuses)
        changed = self.execute(
            f"UPDATE step_runs SET {sets} WHERE id = ? AND status IN ({marks})",
            (*values.values(), step_run_id, *from_statuses),
        )
        return changed == 1

    def decide_approval(self, step_run_id: int, status: str, actor: str, at: float) -> bool:
        changed = self.execute(
            "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? "
            "WHERE step_run_id = ? AND status = 'pending'",
            (status, actor, at, step_run_id),
        )
        return changed == 1

    def record_event(self, **values: Any) -> None:
        self.insert("automation_events", values)

    def enqueue_delivery(
        self,
        *,
        source: str,
        delivery_id: str,
        event_id: str,
        event_type: str,
        incident_id: str,
        payload: str,
        catalog_commit: str,
        received_at: float,
    ) -> bool:
        with self.transaction() as conn:
            seen = conn.execute(
                "SELECT 1 FROM deliveries WHERE id = ? OR (source = ? AND event_id = ?)",
                (f"{source}:{delivery_id}", source, event_id),
            ).fetchone()
            if seen:
                return False
            conn.execute(
                "INSERT INTO deliveries (id, source, event_id, event_type, incident_id, "
                "payload, status, attempts, received_at, catalog_commit) "
                "VALUES (?, ?, ?, ?, ?, ?, 'queued', 0, ?, ?)",
                (
                    f"{source}:{delivery_id}",
                    source,
                    event_id,
                    event_type,
                    incident_id,
                    payload,
                    received_at,
                    catalog_commit,
                ),
            )
            return True

    def claim_delivery(self, delivery_id: str) -> None:
        """What `claim_next_delivery` did to the delivery it handed to a worker."""
        self.execute(
            "UPDATE deliveries SET status = 'processing', attempts = attempts + 1 WHERE id = ?",
            (delivery_id,),
        )

    def finish_delivery(self, delivery_id: str, status: str, at: float) -> None:
        self.execute(
            "UPDATE deliveries SET status = ?, error = ?, processed_at = ? WHERE id = ?",
            (status, "", at, delivery_id),
        )


OLD_COMMIT = "c0ffee123456"  # the catalog the first version ran (the builders' catalog)
CHANNEL_ID = "C0INC"  # what Slack answered for #incidents


def v3_body(event_type: str, incident_id: str, event_id: str, occurred_at: str) -> str:
    """A PagerDuty V3 webhook body, as the first version stored it (the raw text)."""
    return json.dumps(
        {
            "event": {
                "id": event_id,
                "event_type": event_type,
                "resource_type": "incident",
                "occurred_at": occurred_at,
                "agent": {"id": "PAGENT", "summary": "Jane Doe", "type": "user_reference"},
                "data": {
                    "id": incident_id,
                    "type": "incident",
                    "html_url": f"https://acme.pagerduty.test/incidents/{incident_id}",
                    "status": "resolved" if event_type == "incident.resolved" else "triggered",
                    "title": f"Payments API elevated 5xx ({incident_id})",
                    "service": {
                        "id": "PSVCPAY",
                        "summary": "payments",
                        "type": "service_reference",
                    },
                    "urgency": "high",
                    "priority": {"id": "PPRIO1", "summary": "P1", "type": "priority_reference"},
                },
            }
        }
    )


def ts(n: int) -> str:
    return f"{int(T0)}.{n:06d}"


class OldEngine:
    """The first version's engine, as far as the rows it wrote go (547ac31:bot/engine.py)."""

    def __init__(self, v3: FirstVersion) -> None:
        self.v3 = v3
        self.steps = 0

    def pagerduty(
        self, incident_id: str, event: str, delivery: str, at: float, status: str = "queued"
    ) -> None:
        self.v3.enqueue_delivery(
            source="pagerduty",
            delivery_id=delivery,
            event_id=f"E-{delivery}",
            event_type=event,
            incident_id=incident_id,
            payload=v3_body(event, incident_id, f"E-{delivery}", "2027-01-15T08:00:00Z"),
            catalog_commit=OLD_COMMIT,
            received_at=at,
        )
        if status != "queued":
            self.v3.claim_delivery(f"pagerduty:{delivery}")
        if status == "done":
            self.v3.finish_delivery(f"pagerduty:{delivery}", "done", at + 0.5)

    def reaction(
        self, incident_id: str, step_run_id: int, message: str, event: str, at: float
    ) -> None:
        payload = {
            "verb": "approve",
            "user": APPROVER,
            "reaction": "white_check_mark",
            "channel": CHANNEL_ID,
            "ts": message,
            "step_run_id": step_run_id,
        }
        self.v3.enqueue_delivery(
            source="slack",
            delivery_id=event,
            event_id=event,
            event_type="reaction_added",
            incident_id=incident_id,
            payload=json.dumps(payload),
            catalog_commit=OLD_COMMIT,
            received_at=at,
        )

    def open(self, incident_id: str, at: float, root: str) -> int:
        self.pagerduty(incident_id, "incident.triggered", f"D-{incident_id}", at, "done")
        self.v3.create_incident(
            {
                "id": incident_id,
                "title": f"Payments API elevated 5xx ({incident_id})",
                "service": "payments",
                "service_id": "PSVCPAY",
                "urgency": "high",
                "priority": "P1",
                "env": "staging",
                "details": {},
                "link": "",
                "status": "open",
                "runbook_id": "payments-5xx",
                "catalog_commit": OLD_COMMIT,
                "channel": "#incidents",
                "created_at": at,
                "updated_at": at,
            }
        )
        self.event(incident_id, at, "matched", detail="runbook payments-5xx")
        self.v3.update("incidents", incident_id, {"channel": CHANNEL_ID, "thread_ts": root})
        return self.v3.create_run(
            {
                "incident_id": incident_id,
                "runbook_id": "payments-5xx",
                "phase": "main",
                "status": "running",
                "cursor": 0,
                "catalog_commit": OLD_COMMIT,
                "started_at": at,
            }
        )

    def step(self, incident_id: str, run_id: int, index: int, at: float, status: str) -> int:
        action = ("check", "clear-cache")[index]
        approval = None
        if status == "awaiting_approval":
            approval = {
                "incident_id": incident_id,
                "action": action,
                "status": "pending",
                "approvers": json.dumps({"users": [APPROVER], "groups": []}),
                "requested_at": at,
                "expires_at": at + 600,
                "channel": CHANNEL_ID,
                "catalog_commit": OLD_COMMIT,
            }
        self.steps += 1
        return self.v3.create_step_run(
            {
                "run_id": run_id,
                "incident_id": incident_id,
                "step_index": index,
                "step_id": action,
                "action": action,
                "attempt": 1,
                "created_at": at,
                "catalog_commit": OLD_COMMIT,
                "channel": CHANNEL_ID,
                "status": status,
                "decision": "needs_approval" if approval else "auto",
                "reason": "requires approval" if approval else "safe for automation",
            },
            approval,
        )

    def posted(self, step_run_id: int, message: str) -> None:
        self.v3.update("step_runs", step_run_id, {"message_ts": message, "channel": CHANNEL_ID})
        self.v3.execute(
            "UPDATE approvals SET message_ts = ?, channel = ? WHERE step_run_id = ?",
            (message, CHANNEL_ID, step_run_id),
        )

    def ran(self, incident_id: str, step_run_id: int, at: float) -> None:
        assert self.v3.claim_step(step_run_id, "old-host:4242", at)
        self.event(incident_id, at, "executed", action="check")
        assert self.v3.transition_step(
            step_run_id,
            ("running",),
            {"status": "success", "exit_code": 0, "output": "OK\n", "finished_at": at + 1},
        )
        self.event(incident_id, at + 1, "succeeded", action="check")

    def event(
        self, incident_id: str, at: float, status: str, action: str | None = None, **kw: Any
    ) -> None:
        self.v3.record_event(
            ts=at,
            incident_id=incident_id,
            service="payments",
            runbook_id="payments-5xx",
            step_id=action,
            action=action,
            env="staging",
            status=status,
            catalog_commit=OLD_COMMIT,
            **kw,
        )

    def waiting_for_approval(self, incident_id: str, at: float, first: int) -> tuple[int, int]:
        """Step 1 ran; step 2 waits for a ✅ (root, step messages at ts(first), +1, +2)."""
        run_id = self.open(incident_id, at, ts(first))
        check = self.step(incident_id, run_id, 0, at, "pending")
        self.posted(check, ts(first + 1))
        self.ran(incident_id, check, at)
        self.v3.update("runs", run_id, {"cursor": 1})
        flush = self.step(incident_id, run_id, 1, at + 2, "awaiting_approval")
        self.posted(flush, ts(first + 2))
        self.v3.update("runs", run_id, {"status": "waiting"})
        self.event(incident_id, at + 2, "requires_manual", action="clear-cache")
        return check, flush


@dataclass
class Scenario:
    db: Path
    marks: Path
    p1_flush: int
    p2_flush: int
    p5_check: int
    counts: dict[str, int]


@pytest.fixture
def first_version(tmp_path: Path) -> Scenario:
    """What an upgrade finds: incidents in every state the first version could leave."""
    db = tmp_path / "state.db"
    v3 = FirstVersion(db)
    old = OldEngine(v3)
    # P1: step 2 waits; a ✅ is queued. P2: same, but a resolve was received before its ✅.
    _, p1_flush = old.waiting_for_approval("P1", T0, 100)
    _, p2_flush = old.waiting_for_approval("P2", T0 + 1, 200)
    # P5: the bot died between creating its automatic step and claiming it.
    p5_run = old.open("P5", T0 + 2, ts(500))
    p5_check = old.step("P5", p5_run, 0, T0 + 2, "pending")
    # still in the queues: P4's trigger was being applied (processing) when the bot stopped
    old.pagerduty("P4", "incident.triggered", "D-P4", T0 + 20, "processing")
    old.reaction("P1", p1_flush, ts(102), "Ev-P1-approve", T0 + 30)
    old.pagerduty("P2", "incident.resolved", "D-P2-resolve", T0 + 40)
    old.reaction("P2", p2_flush, ts(202), "Ev-P2-approve", T0 + 41)
    old.pagerduty("P3", "incident.triggered", "D-P3", T0 + 50)
    counts = {
        table: int(v3.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        for table in ("incidents", "runs", "step_runs", "approvals", "automation_events")
    }
    v3.close()
    return Scenario(db, tmp_path / "marks.txt", p1_flush, p2_flush, p5_check, counts)


def upgraded_catalog(marks: Path) -> Any:
    mark = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n'); print('OK')"
    check = action("check", (*py(mark), str(marks), "check"))
    flush = action("clear-cache", (*py(mark), str(marks), "flush"), approval=True)
    return catalog(runbook("payments-5xx", [step(check), step(flush)]))


@dataclass
class Thread:
    """A Slack transport that records where each effect went (ts of the message, thread)."""

    delivered: list[tuple[str, str, str | None, str | None, str | None, str]] = field(
        default_factory=list
    )
    _ts: int = 0

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        return ()

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        return ()

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        what = str(item.payload.get("state") or item.payload.get("text") or "")
        self.delivered.append(
            (item.incident_id, item.kind, item.key, item.target_ts, item.thread_ts, what)
        )
        if item.kind in ("post_incident", "post_step", "note"):
            self._ts += 1
            return Sent(ts=f"{int(T0) + 1}.{self._ts:06d}", channel=CHANNEL_ID)
        return Sent()

    def of(self, incident_id: str) -> list[tuple[str, str | None, str | None, str | None, str]]:
        return [d[1:] for d in self.delivered if d[0] == incident_id]


def test_a_first_version_database_is_upgraded_with_nothing_lost(first_version: Scenario) -> None:
    store = Store(first_version.db)
    assert store.schema_version == SCHEMA_VERSION
    store.close()
    assert "deliveries" not in tables(first_version.db)
    assert not {"message_ts", "channel", "claimed_by"} & columns(first_version.db, "step_runs")
    assert not {"message_ts", "channel"} & columns(first_version.db, "approvals")
    with sqlite3.connect(first_version.db) as conn:
        for table, count in first_version.counts.items():
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone() == (count,), table
    store = Store(first_version.db)  # opening again migrates nothing
    # every delivery is an inbox item; those not applied yet are queued, in receipt order
    items = [(i.key, i.alt_key, i.kind, i.status) for i in store.inbox_items(source="pagerduty")]
    assert items == [
        ("pagerduty:event:E-D-P1", "pagerduty:delivery:D-P1", "incident.triggered", "done"),
        ("pagerduty:event:E-D-P2", "pagerduty:delivery:D-P2", "incident.triggered", "done"),
        ("pagerduty:event:E-D-P5", "pagerduty:delivery:D-P5", "incident.triggered", "done"),
        ("pagerduty:event:E-D-P4", "pagerduty:delivery:D-P4", "incident.triggered", "queued"),
        (
            "pagerduty:event:E-D-P2-resolve",
            "pagerduty:delivery:D-P2-resolve",
            "incident.resolved",
            "queued",
        ),
        ("pagerduty:event:E-D-P3", "pagerduty:delivery:D-P3", "incident.triggered", "queued"),
    ]
    queued = [(i.incident_id, i.kind) for i in store.inbox_items() if i.status == "queued"]
    assert queued == [
        ("P5", "step.interrupted"),  # the step never started: see the test below
        ("P4", "incident.triggered"),
        ("P1", "step.approve"),
        ("P2", "incident.resolved"),
        ("P2", "step.approve"),
        ("P3", "incident.triggered"),
        ("P5", "incident.repair"),  # its step message was never posted: it will be
    ]
    (approve,) = [i for i in store.inbox_items("P1") if i.kind == "step.approve"]
    assert approve.key == "slack:event:Ev-P1-approve" and approve.received_at == T0 + 30
    assert approve.payload == {
        "step_run_id": first_version.p1_flush,
        "user": APPROVER,
        "channel": CHANNEL_ID,
        "reaction": "white_check_mark",
    }
    (p3,) = store.inbox_items("P3")
    assert p3.payload["title"] == "Payments API elevated 5xx (P3)"
    assert p3.payload["service"] == "payments" and p3.catalog_commit == OLD_COMMIT
    # the messages the first version posted: reactions and updates still find them
    assert store.message_at(CHANNEL_ID, ts(102)) == (f"step:{first_version.p1_flush}", "P1")
    assert store.message_at(CHANNEL_ID, ts(100)) == ("root:P1", "P1")
    assert store.message_ref(f"step:{first_version.p2_flush}") == (CHANNEL_ID, ts(202))
    assert store.outbox_items(status=OutboxStatus.PENDING) == []  # nothing is posted again
    store.close()


def test_upgraded_deduplication_keys_still_deduplicate(first_version: Scenario) -> None:
    """A PagerDuty retry of a delivery the first version recorded is a duplicate (202),
    by event id and by delivery id, and so is a Slack event it recorded."""
    store = Store(first_version.db)
    runtime = LocalRuntime(upgraded_catalog(first_version.marks), store)
    intake = PagerDutyIntake(
        Config.from_env({"PAGERDUTY_WEBHOOK_SECRET": "s3cret"}), runtime.inbox.put
    )
    try:
        for delivery, event in [("D-P1", "E-D-P1"), ("D-new", "E-D-P3"), ("D-P4", "E-new")]:
            body = v3_body("incident.triggered", "P9", event, "2027-01-15T09:00:00Z").encode()
            status, answer = webhook(intake, body, delivery, "s3cret")
            assert (status, answer["status"]) == ("202 Accepted", "duplicate"), delivery
        body = v3_body("incident.triggered", "P9", "E-fresh", "2027-01-15T09:00:00Z").encode()
        assert webhook(intake, body, "D-fresh", "s3cret")[1]["status"] == "accepted"
    finally:
        intake.close()
    # Slack's retry of an event the first version recorded; a new ✅ on its old message
    fresh = []
    for event_id in ("Ev-P1-approve", "Ev-P1-later"):
        key, incident_id = must(store.message_at(CHANNEL_ID, ts(102)))  # as the intake looks
        fresh.append(
            runtime.inbox.put(
                source="slack",
                key=f"slack:event:{event_id}",
                incident_id=incident_id,
                kind="step.approve",
                payload={"step_run_id": int(key.removeprefix("step:")), "user": APPROVER},
            )
        )
    assert fresh == [False, True]
    assert [i.key for i in store.inbox_items("P1", source="slack")] == [
        "slack:event:Ev-P1-approve",
        "slack:event:Ev-P1-later",
    ]
    assert [i.incident_id for i in store.inbox_items() if i.key.endswith("E-fresh")] == ["P9"]
    store.close()


def test_queued_deliveries_are_applied_after_the_upgrade_in_receipt_order(
    first_version: Scenario,
) -> None:
    store = Store(first_version.db)
    thread = Thread()
    runtime = LocalRuntime(
        upgraded_catalog(first_version.marks),
        store,
        transports={"slack": thread},
        clock=Clock(T0 + 60),
        default_env="staging",
    )
    runtime.settle()
    assert store.count_queued() == 0
    assert sorted(first_version.marks.read_text().split()) == ["check", "check", "flush"]
    # P1: the ✅ received before the upgrade (within its deadline) ran the step, and the
    # thread the first version started shows it, in the message it posted
    assert {s.step_id: str(s.status) for s in store.step_runs_of("P1")} == {
        "check": "success",
        "clear-cache": "success",
    }
    assert must(store.run("P1")).status is RunStatus.COMPLETED
    flush_key = f"step:{first_version.p1_flush}"
    updates = [d for d in thread.of("P1") if d[1] == flush_key]
    assert updates and all(d[:3] == ("update_step", flush_key, ts(102)) for d in updates)
    assert updates[-1][4] == "success"
    assert {d[3] for d in thread.of("P1")} == {ts(100)}  # all in the old thread
    # P2: the resolve was received before the ✅: it wins, nothing runs
    assert {s.step_id: str(s.status) for s in store.step_runs_of("P2")} == {
        "check": "success",
        "clear-cache": "cancelled",
    }
    assert must(store.incident("P2")).status is IncidentStatus.RESOLVED
    (late,) = [i for i in store.inbox_items("P2") if i.kind == "step.approve"]
    assert late.status is InboxStatus.IGNORED
    # P3 and P4 (the delivery a crash left processing) open, in new threads
    for incident_id in ("P3", "P4"):
        incident = must(store.incident(incident_id))
        assert incident.runbook_id == "payments-5xx" and incident.thread_ts is not None
        assert [str(s.status) for s in store.step_runs_of(incident_id)] == [
            "success",
            "awaiting_approval",
        ]
    assert {e["catalog_commit"] for e in store.events("P3")} == {OLD_COMMIT}
    store.close()


def test_a_step_the_first_version_never_started_is_interrupted_not_run(
    first_version: Scenario,
) -> None:
    store = Store(first_version.db)
    step_before = must(store.step_run(first_version.p5_check))
    assert step_before.status is StepStatus.RUNNING and step_before.runner == ""
    thread = Thread()
    runtime = LocalRuntime(
        upgraded_catalog(first_version.marks),
        store,
        transports={"slack": thread},
        clock=Clock(T0 + 60),
        default_env="staging",
    )
    runtime.settle()
    step_after = must(store.step_run(first_version.p5_check))
    assert step_after.status is StepStatus.INTERRUPTED
    assert "before this step started; it was not run" in step_after.detail
    assert must(store.run("P5")).status is RunStatus.ESCALATED
    assert [e["status"] for e in store.events("P5")][-2:] == ["interrupted", "escalated"]
    # its message was never posted by the first version: it is posted now, in the thread
    (post,) = [d for d in thread.of("P5") if d[1] == f"step:{first_version.p5_check}"]
    assert post[0] == "post_step" and post[3] == ts(500) and post[4] == "interrupted"
    assert any("Escalating" in d[4] for d in thread.of("P5"))
    assert first_version.marks.read_text().split().count("check") == 2  # P3's and P4's only
    # the bot's own start-up repair reports such a step under the same key: once only
    assert not store.inbox_put(
        source="executor",
        key=f"step:{first_version.p5_check}:1:end",
        incident_id="P5",
        kind="step.interrupted",
        payload={},
    )
    store.close()


def webhook(
    intake: PagerDutyIntake, body: bytes, delivery: str, secret: str
) -> tuple[str, dict[str, Any]]:
    answer: list[str] = []
    environ = {
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "HTTP_X_PAGERDUTY_SIGNATURE": sign(body, secret),
        "HTTP_X_WEBHOOK_ID": delivery,
    }
    chunks = intake.wsgi(environ, lambda status, headers: answer.append(status))
    return answer[0], json.loads(b"".join(chunks))


def test_a_version_2_database_is_upgraded_through_version_3(db_path: Path) -> None:
    """Before schema 3, deliveries named no catalog: their items name none either."""
    v2 = FirstVersion(db_path, version=2)
    assert "catalog_commit" not in columns(db_path, "deliveries")
    v2.execute(
        "INSERT INTO deliveries (id, source, event_id, event_type, incident_id, payload, "
        "status, attempts, received_at) VALUES ('pagerduty:D1', 'pagerduty', 'E1', "
        "'incident.triggered', 'P1', ?, 'queued', 0, ?)",
        (v3_body("incident.triggered", "P1", "E1", "2027-01-15T08:00:00Z"), T0),
    )
    v2.close()
    store = Store(db_path)
    (item,) = store.inbox_items()
    assert (item.key, item.alt_key, item.status, item.catalog_commit) == (
        "pagerduty:event:E1",
        "pagerduty:delivery:D1",
        InboxStatus.QUEUED,
        "",
    )
    assert item.payload["title"] == "Payments API elevated 5xx (P1)"
    store.close()


def test_a_queued_delivery_that_cannot_be_read_is_kept_as_failed(db_path: Path) -> None:
    v3 = FirstVersion(db_path)
    v3.enqueue_delivery(
        source="pagerduty",
        delivery_id="D1",
        event_id="E1",
        event_type="incident.triggered",
        incident_id="P1",
        payload='{"messages": []}',  # a V2 body the first version let through
        catalog_commit=OLD_COMMIT,
        received_at=T0,
    )
    v3.close()
    store = Store(db_path)
    (item,) = store.inbox_items()
    assert item.status is InboxStatus.FAILED and "V3" in item.detail
    assert store.inbox_ready(10) == []
    store.close()


def test_steps_approved_but_never_started_are_interrupted_not_run(db_path: Path) -> None:
    """The first version committed an approval, then the step's status, then its claim:
    a crash between them left a step approved (or still awaiting, with its approval
    approved) that never started. After the upgrade neither runs; both escalate."""
    marks = db_path.parent / "marks.txt"
    old = OldEngine(FirstVersion(db_path))
    _, approved = old.waiting_for_approval("P6", T0, 600)
    assert old.v3.decide_approval(approved, "approved", APPROVER, T0 + 10)
    assert old.v3.transition_step(approved, ("awaiting_approval",), {"status": "approved"})
    _, half = old.waiting_for_approval("P7", T0, 700)
    assert old.v3.decide_approval(half, "approved", APPROVER, T0 + 10)  # then the crash
    old.v3.close()
    store = Store(db_path)
    runtime = LocalRuntime(
        upgraded_catalog(marks), store, clock=Clock(T0 + 60), default_env="staging"
    )
    runtime.settle()
    for incident_id, step_run_id in (("P6", approved), ("P7", half)):
        step_run = must(store.step_run(step_run_id))
        assert step_run.status is StepStatus.INTERRUPTED, incident_id
        assert "it was not run" in step_run.detail
        assert must(store.run(incident_id)).status is RunStatus.ESCALATED
    assert not marks.exists()  # nothing ran
    store.close()


def test_the_store_lock_goes_to_urgent_waiters_first_then_in_arrival_order() -> None:
    lock = _StoreLock()
    order: list[str] = []
    lock.acquire()

    def take(name: str, urgent: bool) -> None:
        lock.acquire(urgent)
        order.append(name)
        lock.release()

    threads = []
    for name, urgent in (("first", False), ("second", False), ("intake", True)):
        thread = threading.Thread(target=take, args=(name, urgent))
        thread.start()
        threads.append(thread)
        wait_for(lambda: len(lock._urgent) + len(lock._others) == len(threads), what="queued")
    lock.acquire()  # re-entrant: the holder takes it again
    lock.release()
    assert order == []  # still held once
    lock.release()
    for thread in threads:
        thread.join(10)
    assert order == ["intake", "first", "second"]
    lock.acquire()  # free again: taken at once
    lock.release()


# --- pull runners' tables and catalog snapshots ---------------------------------------------


def test_runner_tokens_jobs_and_refusals_behave_alike_on_each_backend(db_target: str) -> None:
    from bot.store import RunnerJob

    now = [T0]
    store = Store(db_target, clock=lambda: now[0])
    token = store.runner_token_create("linux", "web-1", "a" * 64)
    with pytest.raises(StoreError, match="already has a token named web-1"):
        store.runner_token_create("linux", "web-1", "b" * 64)
    assert store.runner_token_by_hash("a" * 64) == token
    open_incident(store)
    job = RunnerJob(
        job_id="J1", pool="linux", action="flush", step_run_id=1, attempt=1,
        incident_id="P1", phase="main", payload="{}", state="queued",
        queued_at=T0, wait_until=T0 + 60,
    )  # fmt: skip
    store.runner_job_queue(job)
    store.runner_job_queue(job)  # again after a restart: kept as it is
    assert store.runner_job_lease("linux", ["other"], token.id, T0 + 30) is None
    leased = must(store.runner_job_lease("linux", ["flush"], token.id, T0 + 30))
    assert (leased.state, leased.token_id) == ("leased", token.id)
    assert store.runner_job_lease("linux", ["flush"], token.id, T0 + 30) is None  # once
    assert store.runner_job_extend(["J1", "J2"], token.id, T0 + 40) == ["J1"]
    assert store.runner_jobs_renew_leases(T0 + 35) == 1
    assert must(store.runner_job("J1")).lease_until == T0 + 40  # never shortened
    assert store.runner_jobs_renew_leases(T0 + 50) == 1
    assert must(store.runner_job("J1")).lease_until == T0 + 50
    now[0] = T0 + 51
    lapsed, unclaimed, closed = store.runner_jobs_overdue()
    assert [j.job_id for j in lapsed] == ["J1"] and unclaimed == closed == []
    assert store.runner_job_take_overdue(lapsed[0])
    assert not store.runner_job_take_overdue(lapsed[0])  # gone already
    assert must(store.runner_token_revoke("linux", "web-1")).revoked_at == T0 + 51
    assert store.runner_token_revoke("linux", "web-1") is None
    store.record_runner_refusal("bot", "revoked", pool="linux", token_id=token.id)
    (refusal,) = store.runner_refusals()
    assert (refusal.reason, refusal.token_id) == ("revoked", token.id)
    store.save_catalog("v1", b"\x00snapshot one")
    now[0] += 1
    store.save_catalog("v2", b"snapshot two")
    assert store.catalog_snapshot() == b"snapshot two"
    assert store.catalog_snapshot("v1") == b"\x00snapshot one"
    store.close()


def test_a_queued_runner_step_is_leased_once_however_many_stores_race(db_target: str) -> None:
    """`runner_job_lease` reads, then writes: only the write lock every transaction takes
    first (BEGIN IMMEDIATE; PostgreSQL's transaction advisory lock) keeps two stores, as
    two processes would be, from leasing the same step."""
    from bot.store import RunnerJob

    first = Store(db_target, clock=lambda: T0)
    open_incident(first)
    token = first.runner_token_create("linux", "web-1", "c" * 64)
    for n in range(4):
        first.runner_job_queue(
            RunnerJob(
                job_id=f"J{n}", pool="linux", action="flush", step_run_id=n + 1, attempt=1,
                incident_id="P1", phase="main", payload="{}", state="queued",
                queued_at=T0 + n, wait_until=T0 + 60,
            )
        )  # fmt: skip
    first.close()
    stores = [Store(db_target, clock=lambda: T0) for _ in range(8)]
    barrier = threading.Barrier(len(stores))
    leased: list[str] = []

    def lease(store: Store) -> None:
        barrier.wait()
        job = store.runner_job_lease("linux", ["flush"], token.id, T0 + 30)
        if job is not None:
            leased.append(job.job_id)

    threads = [threading.Thread(target=lease, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(leased) == ["J0", "J1", "J2", "J3"]  # each once, none twice
    for s in stores:
        s.close()
