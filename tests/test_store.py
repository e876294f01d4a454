"""The state database: schema, WAL, migrations, atomic claims, the audit log."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

import bot.store
from bot.errors import StoreError
from bot.store import EVENT_STATUSES, SCHEMA_VERSION, Store

# the query from our users' dashboards, exactly as they wrote it
OVERRIDES_QUERY = (
    "select action, count(*) as overrides from automation_events "
    "where status = 'requires_manual' group by action order by overrides desc;"
)
ISSUE_STATUSES = {
    "executed",
    "succeeded",
    "failed",
    "allowed_failure",
    "timed_out",
    "blocked",
    "requires_manual",
    "approved",
    "rejected",
    "expired",
}


def columns(db: Path, table: str) -> set[str]:
    with sqlite3.connect(db) as conn:
        return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def seed(store: Store, incident_id: str = "P1") -> tuple[int, int]:
    """An incident with a run and one step run; returns (run id, step run id)."""
    store.create_incident(
        {"id": incident_id, "title": "t", "service": "payments", "status": "open"}
    )
    run_id, _ = store.create_run(
        {
            "incident_id": incident_id,
            "runbook_id": "rb",
            "phase": "main",
            "status": "running",
            "cursor": 0,
        }
    )
    step_run_id, _ = store.create_step_run(
        {
            "run_id": run_id,
            "incident_id": incident_id,
            "step_index": 0,
            "step_id": "s",
            "action": "a",
            "attempt": 1,
            "status": "pending",
        }
    )
    return run_id, step_run_id


def test_fresh_database_has_the_schema_in_wal_mode(db_path: Path) -> None:
    store = Store(db_path)
    assert store.schema_version == SCHEMA_VERSION
    assert store.query_one("PRAGMA journal_mode") == {"journal_mode": "wal"}
    store.close()
    for table in ("incidents", "runs", "step_runs", "approvals", "deliveries", "automation_events"):
        assert columns(db_path, table), table
    assert {
        "ts",
        "incident_id",
        "service",
        "action",
        "env",
        "status",
        "actor",
        "detail",
        "catalog_commit",
    } <= columns(db_path, "automation_events")
    for table in (
        "incidents",
        "runs",
        "step_runs",
        "approvals",
        "deliveries",
        "automation_events",
    ):
        assert "catalog_commit" in columns(db_path, table), table


def test_reopening_keeps_data_and_does_not_migrate_twice(db_path: Path) -> None:
    first = Store(db_path)
    seed(first)
    first.close()
    again = Store(db_path)
    assert again.get_incident("P1") is not None
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_a_newer_schema_is_refused_with_a_clear_error(db_path: Path) -> None:
    Store(db_path).close()
    with sqlite3.connect(db_path) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99, newer than this bot"):
        Store(db_path)


def test_the_users_dashboard_query_works_as_written(store: Any) -> None:
    for action, count in (("clear-cache", 3), ("restart", 1), ("vacuum", 2)):
        for _ in range(count):
            store.record_event(
                incident_id="P1", service="payments", action=action, status="requires_manual"
            )
    store.record_event(incident_id="P1", service="payments", action="restart", status="executed")
    rows = store.query(OVERRIDES_QUERY)
    assert rows == [
        {"action": "clear-cache", "overrides": 3},
        {"action": "vacuum", "overrides": 2},
        {"action": "restart", "overrides": 1},
    ]


def test_audit_statuses(store: Any) -> None:
    assert ISSUE_STATUSES <= EVENT_STATUSES
    for status in sorted(EVENT_STATUSES):
        store.record_event(incident_id="P1", status=status)
    with pytest.raises(ValueError, match="unknown audit status 'done'"):
        store.record_event(incident_id="P1", status="done")
    events = store.events("P1")
    assert len(events) == len(EVENT_STATUSES)
    assert all(e["ts"] > 0 for e in events)


def test_incidents_and_runs_are_created_once(store: Any) -> None:
    row = {"id": "P1", "title": "t", "service": "s", "status": "open", "details": {"a": 1}}
    assert store.create_incident(row) is True
    assert store.create_incident({**row, "title": "other"}) is False
    incident = store.get_incident("P1")
    assert incident["title"] == "t" and incident["details"] == {"a": 1}
    run = {
        "incident_id": "P1",
        "runbook_id": "rb",
        "phase": "main",
        "status": "running",
        "cursor": 0,
    }
    first = store.create_run(run)
    assert first[1] is True
    assert store.create_run(run) == (first[0], False)


def test_a_step_run_and_its_approval_are_created_together_once(store: Any) -> None:
    run_id, _ = seed(store)
    row = {
        "run_id": run_id,
        "incident_id": "P1",
        "step_index": 1,
        "step_id": "guarded",
        "action": "a",
        "attempt": 1,
        "status": "awaiting_approval",
    }
    approval = {"incident_id": "P1", "action": "a", "status": "pending", "expires_at": 50.0}
    step_run_id, created = store.create_step_run(row, approval)
    assert created
    assert store.get_approval(step_run_id)["expires_at"] == 50.0
    assert store.create_step_run(row, {**approval, "expires_at": 99.0}) == (step_run_id, False)
    assert len(store.query("SELECT * FROM approvals")) == 1


def test_claim_is_true_for_exactly_one_of_many_connections(db_path: Path) -> None:
    _, step_run_id = seed(Store(db_path))
    stores = [Store(db_path, worker=f"w{i}") for i in range(8)]
    barrier = threading.Barrier(len(stores))
    wins: list[str] = []

    def claim(store: Store) -> None:
        barrier.wait()
        if store.claim_step(step_run_id, ("pending", "approved")):
            wins.append(store.worker)

    threads = [threading.Thread(target=claim, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    row = stores[0].get_step_run(step_run_id)
    assert row is not None
    assert row["status"] == "running" and row["claimed_by"] == wins[0]
    assert not stores[0].claim_step(step_run_id, ("pending", "approved"))
    for s in stores:
        s.close()


def test_transitions_are_conditional(store: Any) -> None:
    _, step_run_id = seed(store)
    assert not store.transition_step(step_run_id, ("running",), {"status": "success"})
    assert store.claim_step(step_run_id, ("pending",))
    assert store.transition_step(step_run_id, ("running",), {"status": "success"})
    assert not store.transition_step(step_run_id, ("running",), {"status": "failed"})
    assert store.get_step_run(step_run_id)["status"] == "success"


def test_an_approval_is_decided_once(store: Any) -> None:
    run_id, _ = seed(store)
    step_run_id, _ = store.create_step_run(
        {
            "run_id": run_id,
            "incident_id": "P1",
            "step_index": 1,
            "step_id": "g",
            "attempt": 1,
            "status": "awaiting_approval",
        },
        {"incident_id": "P1", "action": "a", "status": "pending", "expires_at": 100.0},
    )
    assert store.decide_approval(step_run_id, "approved", "U1", 10.0)
    assert not store.decide_approval(step_run_id, "rejected", "U2", 11.0)
    approval = store.get_approval(step_run_id)
    assert (approval["status"], approval["decided_by"], approval["decided_at"]) == (
        "approved",
        "U1",
        10.0,
    )


def test_due_approvals_and_the_next_deadline_skip_paused_ones(store: Any) -> None:
    run_id, _ = seed(store)
    ids = []
    for index, (expires, paused) in enumerate([(100.0, None), (50.0, 10.0), (200.0, None)]):
        step_run_id, _ = store.create_step_run(
            {
                "run_id": run_id,
                "incident_id": "P1",
                "step_index": index + 1,
                "step_id": f"g{index}",
                "attempt": 1,
                "status": "awaiting_approval",
            },
            {
                "incident_id": "P1",
                "action": "a",
                "status": "pending",
                "expires_at": expires,
                "paused_at": paused,
            },
        )
        ids.append(step_run_id)
    assert store.next_deadline() == 100.0
    assert [a["step_run_id"] for a in store.due_approvals(150.0)] == [ids[0]]
    assert len(store.pending_approvals("P1")) == 3
    assert store.pending_approvals("P2") == []


def test_deliveries_are_deduplicated_and_queued_in_order(store: Any) -> None:
    def enqueue(delivery: str, event: str, incident: str) -> bool:
        return bool(
            store.enqueue_delivery(
                source="pagerduty",
                delivery_id=delivery,
                event_id=event,
                event_type="incident.triggered",
                incident_id=incident,
                payload="{}",
                catalog_commit="abc123def456",
            )
        )

    assert enqueue("d1", "e1", "P1")
    assert not enqueue("d1", "e9", "P1")  # retried delivery
    assert not enqueue("d2", "e1", "P1")  # same event, new delivery id
    assert enqueue("d3", "e3", "P1")
    assert enqueue("d4", "e4", "P2")
    first = store.claim_next_delivery("pagerduty", set())
    assert first["id"] == "pagerduty:d1"
    second = store.claim_next_delivery("pagerduty", set())
    assert second["id"] == "pagerduty:d4"  # P1's next waits for d1 to finish
    assert store.claim_next_delivery("pagerduty", set()) is None
    store.finish_delivery("pagerduty:d1", "done")
    assert store.claim_next_delivery("pagerduty", set())["id"] == "pagerduty:d3"
    assert store.requeue_interrupted_deliveries("pagerduty") == 2
    commits = store.query("SELECT DISTINCT catalog_commit FROM deliveries")
    assert commits == [{"catalog_commit": "abc123def456"}]


def test_the_database_survives_a_reader_during_writes(db_path: Path) -> None:
    """WAL: a report can read while the bot writes."""
    writer = Store(db_path)
    writer.record_event(incident_id="P1", status="executed")
    reader = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    with writer.transaction() as conn:
        conn.execute(
            "INSERT INTO automation_events (ts, incident_id, status) VALUES (1, 'P1', 'failed')"
        )
        # the reader is not blocked by the open write transaction and sees committed rows
        assert reader.execute("SELECT count(*) FROM automation_events").fetchone() == (1,)
    assert reader.execute("SELECT count(*) FROM automation_events").fetchone() == (2,)
    reader.close()
    writer.close()


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


def test_deliveries_gain_their_catalog_commit_from_a_version_2_database(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as old_bot:  # the bot before schema 3: migrations 1 and 2
        old_bot.setattr(bot.store, "SCHEMA_VERSION", 2)
        old = Store(db_path)
        assert old.schema_version == 2
        assert "catalog_commit" not in columns(db_path, "deliveries")
        old.execute(
            "INSERT INTO deliveries (id, source, event_id, event_type, incident_id, payload, "
            "status, attempts, received_at) VALUES ('pagerduty:d1', 'pagerduty', 'e1', "
            "'incident.triggered', 'P1', '{}', 'queued', 0, 1.0)"
        )
        seed(old)
        old.close()

    store = Store(db_path)
    assert store.schema_version == SCHEMA_VERSION == 3
    (kept,) = store.query("SELECT * FROM deliveries")
    assert (kept["id"], kept["status"], kept["payload"]) == ("pagerduty:d1", "queued", "{}")
    assert kept["catalog_commit"] is None  # recorded before the column: unknown
    assert store.get_incident("P1") is not None  # other tables untouched
    assert store.enqueue_delivery(
        source="slack",
        delivery_id="Ev1",
        event_id="Ev1",
        event_type="reaction_added",
        incident_id="P1",
        payload="{}",
        catalog_commit="abc123def456",
    )
    rows = store.query("SELECT id, catalog_commit FROM deliveries ORDER BY rowid")
    assert rows == [
        {"id": "pagerduty:d1", "catalog_commit": None},
        {"id": "slack:Ev1", "catalog_commit": "abc123def456"},
    ]
    assert store.claim_next_delivery("pagerduty", set())["id"] == "pagerduty:d1"  # still queued
    store.close()
