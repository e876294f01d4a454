"""Durable state and the audit log, in one SQLite file (sqlite-utils).

Why SQLite: one bot process owns the file (see README: one replica), WAL mode lets
`runbookctl report` read while the bot writes, and a crash loses nothing that was
committed. Every row names the catalog version it was decided under.

Tables (schema version in ``meta``; migrations run on open):
  incidents          one row per PagerDuty incident (or simulated one)
  runs               a runbook run of an incident: phase 'main' or 'on_resolve'
  step_runs          one attempt of one step; claimed atomically before it runs
  approvals          one approval request per guarded step run, with its deadline
  deliveries         inbound webhook deliveries: dedupe keys and the durable work queue
  automation_events  the audit log: one row per thing that happened to a step

At-most-once: a step run moves to ``running`` only through ``claim_step``, a single
conditional UPDATE, so two workers, a retried delivery or a restart can never both run
it. A step found ``running`` when the bot starts was interrupted by a crash: it is
marked ``interrupted`` and surfaced to a human, never re-run silently.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlite_utils

from bot.errors import StoreError

SCHEMA_VERSION = 3

# WAL pages a commit may leave before that commit copies them into the database file
# itself (SQLite's auto-checkpoint, default 1,000 pages). A checkpoint fsyncs, and on the
# request path it was the p99 of acknowledging Slack; `Store.checkpoint()` does the work
# from a background thread instead, and this larger limit (about 40 MB of 4 KiB pages)
# only bounds the WAL should that thread fall behind.
WAL_AUTOCHECKPOINT_PAGES = 10_000

# Statuses a step run can be in. Terminal ones never change again.
STEP_PENDING = "pending"
STEP_AWAITING = "awaiting_approval"
STEP_APPROVED = "approved"
STEP_RUNNING = "running"
TERMINAL_STEP_STATUSES = frozenset(
    {
        "success",
        "allowed_failure",
        "failed",
        "timeout",
        "error",
        "blocked",
        "rejected",
        "expired",
        "skipped",
        "interrupted",
        "cancelled",
        "dry_run",
    }
)

# automation_events.status values (the audit vocabulary our users query)
EVENT_STATUSES = frozenset(
    {
        "matched",
        "no_runbook",
        "executed",
        "succeeded",
        "failed",
        "allowed_failure",
        "timed_out",
        "error",
        "blocked",
        "requires_manual",
        "approved",
        "rejected",
        "expired",
        "paused",
        "resumed",
        "unauthorized",
        "skipped",
        "interrupted",
        "cancelled",
        "escalated",
        "resolved",
        "reopened",
        "dry_run",
    }
)


def now() -> float:
    return time.time()


@dataclass(frozen=True)
class Claim:
    step_run_id: int
    claimed: bool


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("incidents").create(
        {
            "id": str,
            "title": str,
            "service": str,
            "service_id": str,
            "urgency": str,
            "priority": str,
            "env": str,
            "details": str,  # JSON
            "link": str,
            "status": str,  # open | resolved
            "runbook_id": str,
            "catalog_commit": str,
            "channel": str,
            "thread_ts": str,
            "created_at": float,
            "updated_at": float,
            "resolved_at": float,
        },
        pk="id",
        not_null={"id", "status"},
    )
    db.table("runs").create(
        {
            "id": int,
            "incident_id": str,
            "runbook_id": str,
            "phase": str,  # main | on_resolve
            "status": str,  # running | waiting | completed | failed | escalated | cancelled
            "cursor": int,
            "rollback_of": int,  # index of the failed step whose rollback is running
            "catalog_commit": str,
            "started_at": float,
            "finished_at": float,
        },
        pk="id",
        foreign_keys=[("incident_id", "incidents", "id")],
    )
    db.table("runs").create_index(["incident_id", "phase"], unique=True)
    db.table("step_runs").create(
        {
            "id": int,
            "run_id": int,
            "incident_id": str,
            "step_index": int,
            "step_id": str,
            "action": str,
            "attempt": int,
            "status": str,
            "decision": str,  # auto | needs_approval | blocked
            "reason": str,
            "command": str,
            "exit_code": int,
            "output": str,
            "detail": str,
            "channel": str,
            "message_ts": str,
            "claimed_by": str,
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "duration": float,
            "catalog_commit": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id"), ("incident_id", "incidents", "id")],
    )
    db.table("step_runs").create_index(["run_id", "step_index", "attempt"], unique=True)
    db.table("step_runs").create_index(["message_ts"])
    db.table("step_runs").create_index(["status"])
    db.table("approvals").create(
        {
            "id": int,
            "step_run_id": int,
            "incident_id": str,
            "action": str,
            "status": str,  # pending | approved | rejected | expired | cancelled
            "approvers": str,  # JSON {"users": [...], "groups": [...]}
            "requested_at": float,
            "expires_at": float,
            "paused_at": float,
            "paused_by": str,
            "decided_by": str,
            "decided_at": float,
            "channel": str,
            "message_ts": str,
            "catalog_commit": str,
        },
        pk="id",
        foreign_keys=[("step_run_id", "step_runs", "id")],
    )
    db.table("approvals").create_index(["step_run_id"], unique=True)
    db.table("approvals").create_index(["status", "expires_at"])
    db.table("deliveries").create(
        {
            "id": str,  # source:delivery id (dedupe key)
            "source": str,
            "event_id": str,
            "event_type": str,
            "incident_id": str,
            "payload": str,
            "status": str,  # queued | processing | done | failed | ignored
            "attempts": int,
            "error": str,
            "received_at": float,
            "processed_at": float,
        },
        pk="id",
    )
    db.table("deliveries").create_index(["source", "event_id"], unique=True)
    db.table("deliveries").create_index(["status", "received_at"])
    db.table("automation_events").create(
        {
            "id": int,
            "ts": float,
            "incident_id": str,
            "service": str,
            "runbook_id": str,
            "step_id": str,
            "action": str,
            "env": str,
            "status": str,
            "actor": str,
            "detail": str,
            "catalog_commit": str,
        },
        pk="id",
    )
    db.table("automation_events").create_index(["status", "action"])
    db.table("automation_events").create_index(["incident_id"])
    db.table("automation_events").create_index(["ts"])


def _migration_2(db: sqlite_utils.Database) -> None:
    # `claim_next_delivery` checks, per queued delivery, its incident's other deliveries:
    # without this index each claim scanned the whole queue (86 ms at 600 queued, under
    # the store's lock, so webhook answers waited behind it during a storm).
    db.table("deliveries").create_index(["source", "incident_id", "status"])


def _migration_3(db: sqlite_utils.Database) -> None:
    # Every row names the catalog version it was decided under; deliveries lacked it.
    # Rows recorded before this version keep NULL: which catalog was running is unknown.
    db.execute("ALTER TABLE deliveries ADD COLUMN catalog_commit TEXT")


MIGRATIONS = {1: _migration_1, 2: _migration_2, 3: _migration_3}


class Store:
    """Thread-safe access to the state database. One connection, serialized by a lock."""

    def __init__(self, path: str | os.PathLike[str], *, worker: str | None = None) -> None:
        self.path = str(path)
        self.worker = worker or f"{os.uname().nodename}:{os.getpid()}"
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self.path, check_same_thread=False, isolation_level=None, timeout=30.0
        )
        conn.execute("PRAGMA journal_mode=WAL")
        # In WAL mode, NORMAL syncs at checkpoints, not at each commit: a commit survives
        # the bot crashing or being killed (it is in the WAL file, which the next open
        # replays), and only a power loss or an OS crash can take back the last ones.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        self.db = sqlite_utils.Database(conn)
        self._lock = threading.RLock()
        self._checkpointer: sqlite3.Connection | None = None  # its own, see checkpoint()
        self._checkpoint_lock = threading.Lock()
        self._migrate()

    def close(self) -> None:
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
        with self._lock:
            self.db.conn.close()

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL pages into the database file; (pages in the WAL, copied).

        For a background thread (BotApp calls it every second). It uses a connection
        of its own and not the store's lock, and PASSIVE never waits for readers or the
        writer, so requests go on committing while it fsyncs.
        """
        if self.path == ":memory:":
            return 0, 0
        with self._checkpoint_lock:
            if self._checkpointer is None:
                self._checkpointer = sqlite3.connect(
                    self.path, check_same_thread=False, isolation_level=None, timeout=30.0
                )
                self._checkpointer.execute("PRAGMA synchronous=NORMAL")
            _busy, pages, copied = self._checkpointer.execute(
                "PRAGMA wal_checkpoint(PASSIVE)"
            ).fetchone()
        return int(pages), int(copied)

    # --- plumbing ----------------------------------------------------------------------

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE: take the write lock up front, so check-then-write is atomic
        across processes too."""
        with self._lock:
            conn = self.db.conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {current}, newer than this bot "
                    f"({SCHEMA_VERSION}): upgrade runbook-bot or use another RUNBOOK_DB"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[version](self.db)
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)",
                (str(SCHEMA_VERSION),),
            )

    @property
    def schema_version(self) -> int:
        row = self.query_one("SELECT value FROM meta WHERE key='schema_version'")
        return int(row["value"]) if row else 0

    def query(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        # Straight to the connection: sqlite-utils' query() wraps every read in a
        # savepoint (three statements instead of one), a third of a step's SQL time.
        with self._lock:
            cursor = self.db.conn.execute(sql, params)
            if cursor.description is None:
                return []
            keys = [column[0] for column in cursor.description]
            return [dict(zip(keys, row, strict=True)) for row in cursor.fetchall()]

    def query_one(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def execute(self, sql: str, params: Any = ()) -> int:
        """Run one statement in its own transaction; returns the rows changed."""
        with self.transaction() as conn:
            return conn.execute(sql, params).rowcount

    def insert(self, table: str, row: Mapping[str, Any]) -> int:
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self.transaction() as conn:
            cursor = conn.execute(
                f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(row.values())
            )
            return int(cursor.lastrowid or 0)

    def update(self, table: str, pk: Any, values: Mapping[str, Any]) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        self.execute(f"UPDATE {table} SET {sets} WHERE id = ?", (*values.values(), pk))

    # --- incidents -----------------------------------------------------------------------

    def get_incident(self, incident_id: str) -> dict[str, Any] | None:
        row = self.query_one("SELECT * FROM incidents WHERE id = ?", (incident_id,))
        if row is not None:
            row["details"] = json.loads(row["details"] or "{}")
        return row

    def create_incident(self, row: Mapping[str, Any]) -> bool:
        """Insert the incident unless it exists; True when this call created it."""
        values = {**row, "details": json.dumps(row.get("details") or {}, sort_keys=True)}
        with self.transaction() as conn:
            columns = ", ".join(values)
            marks = ", ".join("?" for _ in values)
            cursor = conn.execute(
                f"INSERT OR IGNORE INTO incidents ({columns}) VALUES ({marks})",
                tuple(values.values()),
            )
            return cursor.rowcount == 1

    # --- runs and steps ------------------------------------------------------------------

    def get_run(self, incident_id: str, phase: str = "main") -> dict[str, Any] | None:
        return self.query_one(
            "SELECT * FROM runs WHERE incident_id = ? AND phase = ?", (incident_id, phase)
        )

    def create_run(self, row: Mapping[str, Any]) -> tuple[int, bool]:
        """Insert the run unless one exists for (incident, phase); returns (id, created)."""
        with self.transaction() as conn:
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            cursor = conn.execute(
                f"INSERT OR IGNORE INTO runs ({columns}) VALUES ({marks})", tuple(row.values())
            )
            created = cursor.rowcount == 1
            found = conn.execute(
                "SELECT id FROM runs WHERE incident_id = ? AND phase = ?",
                (row["incident_id"], row["phase"]),
            ).fetchone()
            return int(found[0]), created

    def latest_step_run(self, run_id: int, step_index: int) -> dict[str, Any] | None:
        return self.query_one(
            "SELECT * FROM step_runs WHERE run_id = ? AND step_index = ? "
            "ORDER BY attempt DESC LIMIT 1",
            (run_id, step_index),
        )

    def create_step_run(
        self, row: Mapping[str, Any], approval: Mapping[str, Any] | None = None
    ) -> tuple[int, bool]:
        """Insert attempt `row['attempt']` of a step unless it exists; (id, created).

        `approval` (without `step_run_id`) is inserted in the same transaction, so a
        crash can never leave a step awaiting an approval that does not exist.
        """
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
            return step_run_id, created

    def get_step_run(self, step_run_id: int) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM step_runs WHERE id = ?", (step_run_id,))

    def step_run_by_message(self, channel: str, ts: str) -> dict[str, Any] | None:
        return self.query_one(
            "SELECT * FROM step_runs WHERE message_ts = ? AND (channel = ? OR ? = '') "
            "ORDER BY id DESC LIMIT 1",
            (ts, channel, channel),
        )

    def claim_step(self, step_run_id: int, from_statuses: tuple[str, ...]) -> bool:
        """Atomically move a step run to `running`. True for exactly one caller, ever."""
        marks = ", ".join("?" for _ in from_statuses)
        changed = self.execute(
            f"UPDATE step_runs SET status = 'running', claimed_by = ?, started_at = ? "
            f"WHERE id = ? AND status IN ({marks})",
            (self.worker, now(), step_run_id, *from_statuses),
        )
        return changed == 1

    def transition_step(
        self, step_run_id: int, from_statuses: tuple[str, ...], values: Mapping[str, Any]
    ) -> bool:
        """Conditional update: only when the step run is still in one of `from_statuses`."""
        sets = ", ".join(f"{k} = ?" for k in values)
        marks = ", ".join("?" for _ in from_statuses)
        changed = self.execute(
            f"UPDATE step_runs SET {sets} WHERE id = ? AND status IN ({marks})",
            (*values.values(), step_run_id, *from_statuses),
        )
        return changed == 1

    def step_runs_of(self, incident_id: str) -> list[dict[str, Any]]:
        return self.query(
            "SELECT step_runs.*, runs.phase FROM step_runs JOIN runs ON runs.id = step_runs.run_id "
            "WHERE step_runs.incident_id = ? ORDER BY step_runs.id",
            (incident_id,),
        )

    def running_step_runs(self) -> list[dict[str, Any]]:
        return self.query("SELECT * FROM step_runs WHERE status = 'running' ORDER BY id")

    # --- approvals -----------------------------------------------------------------------

    def get_approval(self, step_run_id: int) -> dict[str, Any] | None:
        return self.query_one("SELECT * FROM approvals WHERE step_run_id = ?", (step_run_id,))

    def create_approval(self, row: Mapping[str, Any]) -> int:
        with self.transaction() as conn:
            columns = ", ".join(row)
            marks = ", ".join("?" for _ in row)
            conn.execute(
                f"INSERT OR IGNORE INTO approvals ({columns}) VALUES ({marks})",
                tuple(row.values()),
            )
            found = conn.execute(
                "SELECT id FROM approvals WHERE step_run_id = ?", (row["step_run_id"],)
            ).fetchone()
            return int(found[0])

    def decide_approval(
        self, step_run_id: int, status: str, actor: str, at: float | None = None
    ) -> bool:
        """Move a pending approval to a decision; True for exactly one caller."""
        return (
            self.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ? "
                "WHERE step_run_id = ? AND status = 'pending'",
                (status, actor, at if at is not None else now(), step_run_id),
            )
            == 1
        )

    def pending_approvals(self, incident_id: str | None = None) -> list[dict[str, Any]]:
        if incident_id is None:
            return self.query("SELECT * FROM approvals WHERE status = 'pending' ORDER BY id")
        return self.query(
            "SELECT * FROM approvals WHERE status = 'pending' AND incident_id = ? ORDER BY id",
            (incident_id,),
        )

    def count_pending_approvals(self) -> int:
        """How many approval requests wait for a human (for /metrics: one indexed count,
        not every row read at each scrape)."""
        row = self.query_one("SELECT count(*) AS pending FROM approvals WHERE status = 'pending'")
        return int(row["pending"]) if row else 0

    def due_approvals(self, at: float) -> list[dict[str, Any]]:
        return self.query(
            "SELECT * FROM approvals WHERE status = 'pending' AND paused_at IS NULL "
            "AND expires_at <= ? ORDER BY expires_at",
            (at,),
        )

    def next_deadline(self) -> float | None:
        row = self.query_one(
            "SELECT min(expires_at) AS deadline FROM approvals "
            "WHERE status = 'pending' AND paused_at IS NULL"
        )
        return float(row["deadline"]) if row and row["deadline"] is not None else None

    # --- audit ---------------------------------------------------------------------------

    def record_event(self, **values: Any) -> None:
        status = values.get("status")
        if status not in EVENT_STATUSES:
            raise ValueError(f"unknown audit status {status!r}")
        values.setdefault("ts", now())
        self.insert("automation_events", values)

    def events(self, incident_id: str | None = None) -> list[dict[str, Any]]:
        if incident_id is None:
            return self.query("SELECT * FROM automation_events ORDER BY id")
        return self.query(
            "SELECT * FROM automation_events WHERE incident_id = ? ORDER BY id", (incident_id,)
        )

    # --- deliveries: dedupe and the durable intake queue ----------------------------------

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
    ) -> bool:
        """Record a delivery unless its delivery id or event id was seen; True if new.

        `catalog_commit` is the version of the catalog the bot runs as it receives it.

        Committed before the sender gets its 2xx, so a crash after the answer loses
        nothing: the queue is drained on the next start.
        """
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
                    now(),
                    catalog_commit,
                ),
            )
            return True

    def claim_next_delivery(self, source: str, busy_incidents: set[str]) -> dict[str, Any] | None:
        """The oldest queued delivery whose incident has no delivery in progress.

        Deliveries of one incident are taken strictly in arrival order, one at a time,
        so its events are processed in order even with several workers.
        """
        with self.transaction() as conn:
            conn.row_factory = sqlite3.Row
            try:
                rows = conn.execute(
                    "SELECT * FROM deliveries d WHERE d.source = ? AND d.status = 'queued' "
                    "AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.source = d.source "
                    "AND p.incident_id = d.incident_id AND p.status = 'processing') "
                    "AND NOT EXISTS (SELECT 1 FROM deliveries e WHERE e.source = d.source "
                    "AND e.incident_id = d.incident_id AND e.status = 'queued' "
                    "AND e.rowid < d.rowid) "
                    "ORDER BY d.rowid LIMIT 50",
                    (source,),
                ).fetchall()
            finally:
                conn.row_factory = None
            for row in rows:
                if row["incident_id"] in busy_incidents:
                    continue
                conn.execute(
                    "UPDATE deliveries SET status = 'processing', attempts = attempts + 1 "
                    "WHERE id = ?",
                    (row["id"],),
                )
                return dict(row)
            return None

    def finish_delivery(self, delivery_id: str, status: str, error: str = "") -> None:
        self.execute(
            "UPDATE deliveries SET status = ?, error = ?, processed_at = ? WHERE id = ?",
            (status, error, now(), delivery_id),
        )

    def requeue_interrupted_deliveries(self, source: str) -> int:
        """Deliveries left `processing` by a crash go back to the queue (handlers are
        idempotent: incident creation and step claims are guarded by the database)."""
        return self.execute(
            "UPDATE deliveries SET status = 'queued' WHERE source = ? AND status = 'processing'",
            (source,),
        )
