"""The repository: durable state, the inbox, the outbox and the audit log, in one database.

Only this package knows tables and SQL. Callers ask for a state change by name and get
typed rows back (``bot.store.rows``):

  * ``Store.unit()`` opens one transaction (``BEGIN IMMEDIATE``, so check-then-write is
    atomic across threads and processes). A ``Unit`` reads the incident's state and
    makes state changes, one method per change (``claim_step``, ``decide_approval``,
    ``move_cursor``, …), each checked against ``bot.states``; it also records the audit
    events and the outbox effects those changes cause. Everything commits together or
    not at all: an inbox item is marked applied in the same transaction as the changes
    it made, so a crash can never apply it twice or half.
  * Intake puts items in the inbox (``inbox_put``: deduplicated by unique keys, not
    memory); the inbox consumer takes them per incident in receipt order.
  * Senders take outbox effects per lane in order (``outbox_heads``) and record what
    happened (``outbox_sent``, ``outbox_retry``, ``outbox_failed``).

Why SQLite: one bot process owns the file, WAL mode lets ``runbookctl report`` read while
the bot writes, and a commit survives the bot being killed. Every row names the catalog
version it was decided under.

PostgreSQL is the second backend (``RUNBOOK_DB=postgresql://…``; ``bot.store.backend``):
the same API, the same SQL text where both speak it, the same schema version. What
differs is plumbing: a connection pool that reconnects, an advisory lock per writing
transaction instead of ``BEGIN IMMEDIATE``, no intake log (a commit is durable when it
returns, and the server takes concurrent writers), and no checkpoints or syncs. Several
bots (replicas) may share it: ``bot.replicas`` says who is alive and who holds each
singleton's lease, and the conditional updates below, one writer at a time, keep any
item from being applied twice or out of turn whichever replica tries.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlite_utils

from bot import states
from bot.errors import StoreError
from bot.states import (
    ApprovalStatus,
    Event,
    InboxStatus,
    IncidentStatus,
    Origin,
    OutboxStatus,
    Phase,
    RunStatus,
    StepStatus,
)
from bot.store import intake
from bot.store.backend import (
    PgConnection,
    display,
    integrity_errors,
    is_postgres,
    unreachable,
)
from bot.store.backend import (
    reason as libpq_reason,
)
from bot.store.intake import COLUMNS as _RECEIVED
from bot.store.intake import IntakeLog
from bot.store.rows import (
    Approval,
    InboxItem,
    Incident,
    OutboxItem,
    Run,
    RunnerJob,
    RunnerRefusal,
    RunnerToken,
    StepRun,
)
from bot.store.schema import MIGRATIONS, SCHEMA_VERSION, postgres_statements

if TYPE_CHECKING:
    from psycopg_pool import ConnectionPool

__all__ = [
    "SCHEMA_VERSION",
    "AlreadyApplied",
    "Approval",
    "Effect",
    "InboxItem",
    "Incident",
    "OutboxItem",
    "Run",
    "RunnerJob",
    "RunnerRefusal",
    "RunnerToken",
    "StepRun",
    "Store",
    "Unit",
    "now",
]

# WAL pages a commit may leave before that commit copies them into the database file
# itself (SQLite's auto-checkpoint, default 1,000 pages). A checkpoint fsyncs, and on the
# request path it was the p99 of acknowledging Slack; `Store.checkpoint()` does the work
# from a background thread instead, and this larger limit only bounds the WAL should that
# thread fall behind.
WAL_AUTOCHECKPOINT_PAGES = 10_000
# Room the database must have to call itself ready: a delivery and what it causes.
MIN_FREE_BYTES = 1024 * 1024
MIN_FREE_PAGES = 64

# Kinds of outbox effects whose later renderings replace earlier ones (same `key`).
_MESSAGE_KINDS = ("post_step", "update_step")
# Effects about a message (its update, the reactions under it) wait for its post.
_ABOUT_A_MESSAGE = ("update_step", "react")
# PagerDuty notes link the incident's Slack thread: while its root message is on its way
# they wait for it (a sender wakes the others when it posts), for this long at most, so
# that a Slack outage does not hold PagerDuty back.
_LINKS_THREAD = ("pd_note", "pd_escalate")
THREAD_LINK_WAIT = 30.0


# A step queued for a runner is handed out only while its incident is open (the last
# check before a command runs), or when it is a follow-up of a resolved incident.
_STILL_WANTED = (
    "(phase = 'on_resolve' OR EXISTS (SELECT 1 FROM incidents WHERE "
    "incidents.id = runner_jobs.incident_id AND incidents.status = 'open'))"
)


# PostgreSQL advisory lock key (any 64-bit number of our own): the lock every writing
# transaction takes first.
WRITE_LOCK = 0x72756E62_6F6F6B02
# Seconds a request waits for a PostgreSQL connection while the server is unreachable.
CONNECT_WAIT = 3.0
# ... and once it is known to be down, until a connection comes back.
DOWN_WAIT = 0.2
# A pooled connection idle this long is checked before it is lent again.
CHECK_IDLE = 1.0


def now() -> float:
    return time.time()


class AlreadyApplied(Exception):
    """Another worker applied this inbox item first, or an older item of its incident is
    still queued; this attempt changed nothing."""


@dataclass(frozen=True)
class Beat:
    """What one heartbeat found (`Store.beat`)."""

    at: float  # the database's time
    held: Mapping[str, int] = field(default_factory=dict)  # lease -> fence
    alive: tuple[str, ...] = ()  # replicas seen lately, this one included
    refused: str = ""  # why this process may not serve as the replica it named


class Effect:
    """One effect to deliver, as the engine asks for it (see ``bot.effects``)."""

    __slots__ = ("incident_id", "key", "kind", "lane", "next_at", "payload", "target")

    def __init__(
        self,
        *,
        incident_id: str,
        target: str,
        lane: str,
        kind: str,
        payload: Mapping[str, Any],
        key: str | None = None,
        next_at: float = 0.0,
    ) -> None:
        self.incident_id = incident_id
        self.target = target
        self.lane = lane
        self.kind = kind
        self.payload = payload
        self.key = key
        self.next_at = next_at


def _dict_rows(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    if cursor.description is None:
        return []
    keys = [column[0] for column in cursor.description]
    return [dict(zip(keys, row, strict=True)) for row in cursor.fetchall()]


def _one(cursor: sqlite3.Cursor) -> dict[str, Any] | None:
    rows = _dict_rows(cursor)
    return rows[0] if rows else None


class _StoreLock:
    """The store's re-entrant lock, with a fast lane.

    Everything that uses the connection takes it. Intake (`inbox_put`: a PagerDuty or
    Slack request waiting for its answer) takes it *urgently*: it goes before every
    non-urgent thread waiting, so an acknowledgement waits at most for the one
    transaction under way, however many inbox items and outbox deliveries queue behind.

    A release hands the lock to exactly one waiter (the first urgent one, else the first
    other one), waking that thread only: under a storm a dozen threads wait here, and
    waking them all for one to win costs every request a trip through the GIL.
    """

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._owner: int | None = None
        self._depth = 0
        self._urgent: deque[tuple[int, threading.Lock]] = deque()
        self._others: deque[tuple[int, threading.Lock]] = deque()

    def acquire(self, urgent: bool = False) -> None:
        me = threading.get_ident()
        with self._mutex:
            if self._owner == me:
                self._depth += 1
                return
            if self._owner is None:
                self._owner, self._depth = me, 1
                return
            gate = threading.Lock()
            gate.acquire()
            (self._urgent if urgent else self._others).append((me, gate))
        gate.acquire()  # released by the holder that hands us the lock

    def release(self) -> None:
        with self._mutex:
            self._depth -= 1
            if self._depth:
                return
            waiting = self._urgent or self._others
            if not waiting:
                self._owner = None
                return
            self._owner, gate = waiting.popleft()
            self._depth = 1
            gate.release()

    def __enter__(self) -> None:
        self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    @contextmanager
    def urgent(self) -> Iterator[None]:
        self.acquire(urgent=True)
        try:
            yield
        finally:
            self.release()


class Unit:
    """One transaction: reads, state changes, audit events and effects, committed at once.

    State-change methods check the move against ``bot.states`` and update conditionally
    on the status read, returning the new row, or None when the row had already moved
    on (another worker or replica was first): the caller re-reads and decides again.
    """

    def __init__(self, conn: Any, at: float, origin: Origin = Origin.BOT, owner: str = "") -> None:
        self.conn = conn
        self.at = at
        self.origin = origin  # what its audit rows come from (promotion counts only the bot's)
        self.owner = owner  # the replica whose claims these are (PostgreSQL), or ""
        self._events: list[tuple[Any, ...]] = []
        self._effects: list[Effect] = []

    # --- reads -----------------------------------------------------------------------------

    def incident(self, incident_id: str) -> Incident | None:
        row = _one(self.conn.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,)))
        return Incident.from_row(row) if row else None

    def incident_with_run(
        self, incident_id: str, phase: Phase
    ) -> tuple[Incident | None, Run | None]:
        """The incident and its run of `phase`, in one query (the hot path of every item)."""
        rows = _dict_rows(
            self.conn.execute(
                "SELECT i.*, r.id AS r_id, r.runbook_id AS r_runbook_id, r.phase AS r_phase, "
                "r.status AS r_status, r.cursor AS r_cursor, r.rollback_of AS r_rollback_of, "
                "r.catalog_commit AS r_catalog_commit, r.started_at AS r_started_at, "
                "r.finished_at AS r_finished_at FROM incidents i "
                "LEFT JOIN runs r ON r.incident_id = i.id AND r.phase = ? WHERE i.id = ?",
                (str(phase), incident_id),
            )
        )
        if not rows:
            return None, None
        row = rows[0]
        run = None
        if row["r_id"] is not None:
            run = Run(
                id=row["r_id"],
                incident_id=incident_id,
                runbook_id=row["r_runbook_id"],
                phase=row["r_phase"],
                status=row["r_status"],
                cursor=row["r_cursor"],
                rollback_of=row["r_rollback_of"],
                catalog_commit=row["r_catalog_commit"] or "",
                started_at=row["r_started_at"] or 0.0,
                finished_at=row["r_finished_at"],
            )
        return Incident.from_row(row), run

    def run(self, incident_id: str, phase: Phase) -> Run | None:
        row = _one(
            self.conn.execute(
                "SELECT * FROM runs WHERE incident_id = ? AND phase = ?", (incident_id, str(phase))
            )
        )
        return Run.from_row(row) if row else None

    def run_by_id(self, run_id: int) -> Run | None:
        row = _one(self.conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)))
        return Run.from_row(row) if row else None

    def set_run_catalog(self, run: Run, version: str) -> Run | None:
        """The run goes on under another catalog (its pending step was asked again there)."""
        row = _one(
            self.conn.execute(
                "UPDATE runs SET catalog_commit = ? WHERE id = ? AND status IN "
                "('running', 'waiting') RETURNING *",
                (version, run.id),
            )
        )
        return Run.from_row(row) if row else None

    def runs_of(self, incident_id: str) -> list[Run]:
        return [
            Run.from_row(r)
            for r in _dict_rows(
                self.conn.execute(
                    "SELECT * FROM runs WHERE incident_id = ? ORDER BY id", (incident_id,)
                )
            )
        ]

    def step_run(self, step_run_id: int) -> StepRun | None:
        row = _one(self.conn.execute("SELECT * FROM step_runs WHERE id = ?", (step_run_id,)))
        return StepRun.from_row(row) if row else None

    def action_usage(self, action: str, since: float) -> tuple[int, int]:
        """Steps of `action` running now, and started at or after `since`, across
        incidents (what its `limits` are checked against)."""
        running, started = self.conn.execute(
            "SELECT (SELECT count(*) FROM step_runs WHERE action = ? AND status = 'running'), "
            "(SELECT count(*) FROM step_runs WHERE action = ? AND started_at >= ?)",
            (action, action, since),
        ).fetchone()
        return int(running), int(started)

    def latest_step_run(self, run_id: int, step_index: int) -> StepRun | None:
        row = _one(
            self.conn.execute(
                "SELECT * FROM step_runs WHERE run_id = ? AND step_index = ? "
                "ORDER BY attempt DESC LIMIT 1",
                (run_id, step_index),
            )
        )
        return StepRun.from_row(row) if row else None

    def step_runs_of(self, incident_id: str, run_id: int | None = None) -> list[StepRun]:
        sql = "SELECT * FROM step_runs WHERE incident_id = ?"
        params: tuple[Any, ...] = (incident_id,)
        if run_id is not None:
            sql += " AND run_id = ?"
            params += (run_id,)
        return [
            StepRun.from_row(r) for r in _dict_rows(self.conn.execute(sql + " ORDER BY id", params))
        ]

    def approval(self, step_run_id: int) -> Approval | None:
        row = _one(
            self.conn.execute("SELECT * FROM approvals WHERE step_run_id = ?", (step_run_id,))
        )
        return Approval.from_row(row) if row else None

    def pending_approvals(self, run_id: int) -> list[tuple[Approval, StepRun]]:
        rows = _dict_rows(
            self.conn.execute(
                "SELECT a.*, s.id AS s_id FROM approvals a JOIN step_runs s "
                "ON s.id = a.step_run_id WHERE s.run_id = ? AND a.status = 'pending' "
                "ORDER BY a.id",
                (run_id,),
            )
        )
        out = []
        for row in rows:
            step = self.step_run(row["s_id"])
            assert step is not None
            out.append((Approval.from_row(row), step))
        return out

    def message_keys(self, incident_id: str) -> set[str]:
        """Keys of the incident's messages that were ever queued for posting."""
        rows = self.conn.execute(
            "SELECT DISTINCT key FROM outbox WHERE incident_id = ? AND key IS NOT NULL "
            "AND (kind IN ('post_incident', 'post_step') OR ts IS NOT NULL)",
            (incident_id,),
        ).fetchall()
        return {str(r[0]) for r in rows}

    # --- incidents -------------------------------------------------------------------------

    def create_incident(self, values: Mapping[str, Any]) -> Incident | None:
        """Insert the incident unless it exists; the new row, or None for a duplicate."""
        row = {
            **values,
            "status": str(IncidentStatus.OPEN),
            "details": json.dumps(values.get("details") or {}, sort_keys=True, default=str),
            "created_at": self.at,
            "updated_at": self.at,
        }
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        found = _one(
            self.conn.execute(
                f"INSERT INTO incidents ({columns}) VALUES ({marks}) "
                "ON CONFLICT DO NOTHING RETURNING *",
                tuple(row.values()),
            )
        )
        return Incident.from_row(found) if found else None

    def set_incident_status(
        self, incident: Incident, new: IncidentStatus, *, state_changed_at: str | None
    ) -> Incident | None:
        states.check(incident.status, new)
        row = _one(
            self.conn.execute(
                "UPDATE incidents SET status = ?, updated_at = ?, resolved_at = ?, "
                "state_changed_at = coalesce(?, state_changed_at) "
                "WHERE id = ? AND status = ? RETURNING *",
                (
                    str(new),
                    self.at,
                    self.at if new is IncidentStatus.RESOLVED else None,
                    state_changed_at,
                    incident.id,
                    str(incident.status),
                ),
            )
        )
        return Incident.from_row(row) if row else None

    def state_changes_seen(self, incident_id: str) -> list[str]:
        """PagerDuty times (occurred_at) of the incident's state changes received so far,
        applied or not: a resolve that came before its trigger still counts."""
        rows = _dict_rows(
            self.conn.execute(
                "SELECT payload FROM inbox WHERE incident_id = ? AND source = 'pagerduty' "
                "AND kind IN ('incident.triggered', 'incident.resolved', 'incident.reopened') "
                "AND status IN ('done', 'ignored')",
                (incident_id,),
            )
        )
        seen = (json.loads(r["payload"] or "{}").get("occurred_at") for r in rows)
        return [str(s) for s in seen if s]

    def note_state_change(self, incident: Incident, state_changed_at: str) -> None:
        """Record PagerDuty's time of a state change that needed no status change."""
        self.conn.execute(
            "UPDATE incidents SET state_changed_at = ? WHERE id = ?",
            (state_changed_at, incident.id),
        )

    # --- runs ------------------------------------------------------------------------------

    def create_run(
        self, incident_id: str, runbook_id: str, phase: Phase, catalog_commit: str
    ) -> Run | None:
        row = _one(
            self.conn.execute(
                "INSERT INTO runs (incident_id, runbook_id, phase, status, cursor, "
                "catalog_commit, started_at) VALUES (?, ?, ?, ?, 0, ?, ?) "
                "ON CONFLICT DO NOTHING RETURNING *",
                (
                    incident_id,
                    runbook_id,
                    str(phase),
                    str(RunStatus.RUNNING),
                    catalog_commit,
                    self.at,
                ),
            )
        )
        return Run.from_row(row) if row else None

    def set_run_status(self, run: Run, new: RunStatus) -> Run | None:
        if new is run.status:
            return run
        states.check(run.status, new)
        finished = None if new.live else self.at
        row = _one(
            self.conn.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE id = ? AND status = ? "
                "RETURNING *",
                (str(new), finished, run.id, str(run.status)),
            )
        )
        return Run.from_row(row) if row else None

    def move_cursor(self, run: Run, to: int) -> Run | None:
        """The next step (also ends a rollback); the run is running again."""
        if run.status is not RunStatus.RUNNING:
            states.check(run.status, RunStatus.RUNNING)
        row = _one(
            self.conn.execute(
                "UPDATE runs SET cursor = ?, rollback_of = NULL, status = 'running' "
                "WHERE id = ? AND cursor = ? AND status = ? RETURNING *",
                (to, run.id, run.cursor, str(run.status)),
            )
        )
        return Run.from_row(row) if row else None

    def start_rollback(self, run: Run) -> Run | None:
        """Run the rollback of the current step (the run is running again)."""
        if run.status is not RunStatus.RUNNING:
            states.check(run.status, RunStatus.RUNNING)
        row = _one(
            self.conn.execute(
                "UPDATE runs SET rollback_of = cursor, status = 'running' WHERE id = ? "
                "AND cursor = ? AND rollback_of IS NULL AND status = ? RETURNING *",
                (run.id, run.cursor, str(run.status)),
            )
        )
        return Run.from_row(row) if row else None

    # --- steps -----------------------------------------------------------------------------

    def create_step_run(
        self, values: Mapping[str, Any], approval: Mapping[str, Any] | None = None
    ) -> StepRun | None:
        """Insert one attempt of a step (None if that attempt exists), with its approval
        request in the same transaction."""
        row = {**values, "status": str(values["status"]), "created_at": self.at}
        if row.get("runner") and self.owner:
            row["owner"] = self.owner
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        found = _one(
            self.conn.execute(
                f"INSERT INTO step_runs ({columns}) VALUES ({marks}) "
                "ON CONFLICT DO NOTHING RETURNING *",
                tuple(row.values()),
            )
        )
        if found is None:
            return None
        step = StepRun.from_row(found)
        if approval is not None:
            data = {
                **approval,
                "step_run_id": step.id,
                "status": str(ApprovalStatus.PENDING),
                "approvers": json.dumps(approval["approvers"]),
                "requested_at": self.at,
                "approved_by": "[]",
            }
            self.conn.execute(
                f"INSERT INTO approvals ({', '.join(data)}) "
                f"VALUES ({', '.join('?' for _ in data)})",
                tuple(data.values()),
            )
        return step

    def set_step(self, step: StepRun, new: StepStatus, **values: Any) -> StepRun | None:
        """Move a step run to `new` (with `values`) if it is still in its read status."""
        states.check(step.status, new)
        if new is StepStatus.RUNNING:
            values.setdefault("started_at", self.at)
            if self.owner:
                values.setdefault("owner", self.owner)
        elif new.terminal:
            values.setdefault("finished_at", self.at)
        sets = ", ".join(f"{k} = ?" for k in ("status", *values))
        row = _one(
            self.conn.execute(
                f"UPDATE step_runs SET {sets} WHERE id = ? AND status = ? RETURNING *",
                (str(new), *values.values(), step.id, str(step.status)),
            )
        )
        return StepRun.from_row(row) if row else None

    def finish_step(
        self, step_run_id: int, attempt: int, new: StepStatus, **values: Any
    ) -> StepRun | None:
        """A running attempt's end (a result or an interruption), in one statement: None
        when that attempt is not running (ended already, or another attempt)."""
        states.check(StepStatus.RUNNING, new)
        values.setdefault("finished_at", self.at)
        sets = ", ".join(f"{k} = ?" for k in ("status", *values))
        row = _one(
            self.conn.execute(
                f"UPDATE step_runs SET {sets} WHERE id = ? AND attempt = ? "
                "AND status = 'running' RETURNING *",
                (str(new), *values.values(), step_run_id, attempt),
            )
        )
        return StepRun.from_row(row) if row else None

    def reassign_runner(self, step: StepRun, runner: str) -> StepRun | None:
        """A running step whose command provably never started gets a new runner."""
        row = _one(
            self.conn.execute(
                "UPDATE step_runs SET runner = ?, owner = ? WHERE id = ? "
                "AND status = 'running' AND coalesce(runner, '') = ? RETURNING *",
                (runner, self.owner or None, step.id, step.runner),
            )
        )
        return StepRun.from_row(row) if row else None

    # --- approvals -------------------------------------------------------------------------

    def decide_approval(
        self, approval: Approval, new: ApprovalStatus, actor: str, at: float
    ) -> Approval | None:
        states.check(approval.status, new)
        approved = list(approval.approved_by)
        if new is ApprovalStatus.APPROVED and actor and actor not in approved:
            approved.append(actor)
        row = _one(
            self.conn.execute(
                "UPDATE approvals SET status = ?, decided_by = ?, decided_at = ?, "
                "approved_by = ? WHERE id = ? AND status = ? RETURNING *",
                (
                    str(new), actor or None, at, json.dumps(approved), approval.id,
                    str(approval.status),
                ),
            )
        )  # fmt: skip
        return Approval.from_row(row) if row else None

    def add_approver(self, approval: Approval, user: str) -> Approval | None:
        """One more of the distinct approvers a request needs (it stays pending)."""
        row = _one(
            self.conn.execute(
                "UPDATE approvals SET approved_by = ? "
                "WHERE id = ? AND status = 'pending' AND approved_by = ? RETURNING *",
                (
                    json.dumps([*approval.approved_by, user]),
                    approval.id,
                    json.dumps(list(approval.approved_by)),
                ),
            )
        )
        return Approval.from_row(row) if row else None

    def pause_approval(self, approval: Approval, user: str, at: float) -> Approval | None:
        row = _one(
            self.conn.execute(
                "UPDATE approvals SET paused_at = ?, paused_by = ? "
                "WHERE id = ? AND status = 'pending' AND paused_at IS NULL RETURNING *",
                (at, user, approval.id),
            )
        )
        return Approval.from_row(row) if row else None

    def resume_approval(self, approval: Approval, expires_at: float) -> Approval | None:
        row = _one(
            self.conn.execute(
                "UPDATE approvals SET paused_at = NULL, paused_by = NULL, expires_at = ? "
                "WHERE id = ? AND status = 'pending' AND paused_at IS NOT NULL RETURNING *",
                (expires_at, approval.id),
            )
        )
        return Approval.from_row(row) if row else None

    # --- the inbox -------------------------------------------------------------------------

    def finish_item(self, item: InboxItem, status: InboxStatus, detail: str = "") -> None:
        """Mark the item applied, in the transaction of what it changed. Raises
        `AlreadyApplied` (rolling all of it back) when another worker or replica applied
        it first, or when an older item of its incident is still queued: items apply in
        receipt order whoever applies them (writers commit one at a time, so what this
        checks holds at the commit)."""
        states.check(item.status, status)
        changed = self.conn.execute(
            "UPDATE inbox SET status = ?, detail = ?, processed_at = ? "
            "WHERE id = ? AND status = 'queued' AND NOT EXISTS (SELECT 1 FROM inbox o "
            "WHERE o.status = 'queued' AND o.incident_id = ? AND o.id < ?)",
            (str(status), detail or None, self.at, item.id, item.incident_id, item.id),
        ).rowcount
        if changed != 1:
            raise AlreadyApplied(item.id)

    # --- audit and effects -----------------------------------------------------------------

    def event(
        self,
        incident: Incident,
        status: Event,
        *,
        step_id: str | None = None,
        action: str | None = None,
        actor: str = "",
        detail: str = "",
    ) -> None:
        self._events.append(
            (
                self.at,
                incident.id,
                incident.service,
                incident.runbook_id,
                step_id,
                action,
                incident.env,
                str(status),
                actor or None,
                detail or None,
                incident.catalog_commit,
                str(self.origin),
            )
        )

    def emit(self, effect: Effect) -> None:
        """Queue an effect. A newer rendering of a message (same `key`) replaces one not
        yet sent, so a message is never sent twice for states it already passed."""
        if effect.kind in _MESSAGE_KINDS and effect.key is not None:
            for pending in self._effects:
                if pending.key == effect.key and pending.kind in _MESSAGE_KINDS:
                    pending.payload = effect.payload
                    return
            if effect.kind == "update_step":
                changed = self.conn.execute(
                    "UPDATE outbox SET payload = ?, version = version + 1 WHERE key = ? "
                    "AND status = 'pending' AND kind IN ('post_step', 'update_step')",
                    (json.dumps(effect.payload, default=str), effect.key),
                ).rowcount
                if changed:
                    return
        self._effects.append(effect)

    def cancel_orphan_updates(self, key: str) -> None:
        """Updates queued for a message that was never posted can never be delivered in
        order: cancelled, before that message is posted (with its latest rendering)."""
        self.conn.execute(
            "UPDATE outbox SET status = 'cancelled' WHERE key = ? AND status = 'pending' "
            "AND kind = 'update_step' AND ts IS NULL AND NOT EXISTS (SELECT 1 FROM outbox p "
            "WHERE p.key = outbox.key AND (p.kind = 'post_step' OR p.ts IS NOT NULL))",
            (key,),
        )

    def cancel_effects(self, key: str) -> None:
        """Drop undelivered effects about one message (e.g. reactions no longer offered),
        committed ones and those queued earlier in this transaction alike."""
        self._effects = [e for e in self._effects if not (e.key == key and e.kind == "react")]
        self.conn.execute(
            "UPDATE outbox SET status = 'cancelled' WHERE key = ? AND status = 'pending' "
            "AND kind = 'react'",
            (key,),
        )

    def _flush(self) -> None:
        if self._events:
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * len(self._events))
            self.conn.execute(
                "INSERT INTO automation_events (ts, incident_id, service, runbook_id, step_id, "
                f"action, env, status, actor, detail, catalog_commit, origin) VALUES {marks}",
                tuple(v for row in self._events for v in row),
            )
            self._events.clear()
        if self._effects:
            marks = ", ".join(["(?, ?, ?, ?, ?, ?, 'pending', ?, ?)"] * len(self._effects))
            self.conn.execute(
                "INSERT INTO outbox (incident_id, target, lane, kind, key, payload, status, "
                f"next_at, created_at) VALUES {marks}",
                tuple(
                    v
                    for e in self._effects
                    for v in (
                        e.incident_id,
                        e.target,
                        e.lane,
                        e.kind,
                        e.key,
                        json.dumps(e.payload, default=str),
                        e.next_at,
                        self.at,
                    )
                ),
            )
            self._effects.clear()


def _enter_wal(conn: sqlite3.Connection, busy_timeout: float) -> None:
    """Put the database in WAL mode. Processes racing to create the same file can get
    "database is locked" from the mode change without SQLite's busy handler ever waiting
    (it refuses rather than risk a deadlock): retry it for up to `busy_timeout` seconds."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.005)


# `Store._unpark` on PostgreSQL: jsonb where SQLite has json_set/json_extract.
_UNPARK_POSTGRES = (
    "UPDATE inbox SET status = 'queued', incident_id = o.incident_id, "
    "payload = jsonb_set(inbox.payload::jsonb, '{step_run_id}', "
    "to_jsonb(CAST(substr(o.key, 6) AS BIGINT)))::text FROM outbox AS o "
    "WHERE inbox.status = 'parked' AND o.key LIKE 'step:%' AND o.ts IS NOT NULL "
    "AND o.ts = inbox.payload::jsonb ->> 'ts' "
    "AND o.posted_channel = inbox.payload::jsonb ->> 'channel'"
)


class Store:
    """Thread-safe access to the state database, SQLite or PostgreSQL.

    Everything that touches the database takes the store's lock, so one thread at a time
    works on it and a unit reads what it wrote itself. SQLite: one connection. PostgreSQL:
    a pool (``psycopg_pool``) that replaces connections lost with the server, so the
    store works again by itself once the server does; each state change's transaction
    first takes a transaction-level advisory lock, the PostgreSQL counterpart of SQLite's
    ``BEGIN IMMEDIATE``: writers, in this process or another (``runbookctl``), commit one
    at a time, and every conditional update sees the status it checks committed.
    """

    db: sqlite_utils.Database  # SQLite only (its migrations use sqlite-utils)

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], float] = now,
        busy_timeout: float = 30.0,
        intake_log: bool = False,
    ) -> None:
        """Open (creating it if need be) and migrate the database at `path`: a SQLite
        file, or a ``postgresql://`` URL.

        `busy_timeout`: seconds a write waits for another connection's write lock (another
        process on the same file, e.g. `runbookctl`) before it fails; on PostgreSQL, also
        how long a request waits for a connection while the server is unreachable.
        `intake_log`: the bot's own store. SQLite: intake records in the intake log
        (``bot.store.intake``), whose leftovers are moved into the inbox now, and no
        other bot may open the file while this one has it. PostgreSQL: none of that;
        any number of replicas share the database (``bot.replicas``).
        """
        self.clock = clock
        self.url = ""
        # The replica this store's claims are made for (`bot.replicas`; PostgreSQL): each
        # step it starts records it, so a survivor knows whose steps a dead one left.
        self.owner = ""
        self._pool: ConnectionPool | None = None
        self._active: PgConnection | None = None  # PostgreSQL: the lock holder's connection
        self._down = ""  # PostgreSQL: why the server could not be reached, while it cannot
        self._used: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._lock = _StoreLock()
        self._parked = True  # may a parked inbox item exist? (checked at the first unpark)
        self._checkpointer: sqlite3.Connection | None = None  # its own, see checkpoint()
        self._checkpoint_lock = threading.Lock()
        self._intake: IntakeLog | None = None
        self._receiving = threading.Lock()
        if is_postgres(path):
            self.url = str(path)
            self.path = display(self.url)
            self._open_postgres(busy_timeout)
            return
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the database {self.path}: {exc}") from None
        try:
            _enter_wal(conn, busy_timeout)
            # In WAL mode, NORMAL syncs at checkpoints, not at each commit: a commit survives
            # the bot crashing or being killed (it is in the WAL file, which the next open
            # replays), and only a power loss or an OS crash can take back the last ones.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open the database {self.path}: {exc}") from None
        self.db = sqlite_utils.Database(conn)
        self._sqlite = conn
        try:
            self._migrate()
            if intake_log and self.path != ":memory:":
                self._intake = IntakeLog(self.path)
                self.inbox_receive()
        except BaseException:
            if self._intake is not None:
                self._intake.close()
            conn.close()
            raise

    def _open_postgres(self, timeout: float) -> None:
        import psycopg
        from psycopg_pool import ConnectionPool

        try:  # one connection first: its failure says why (the pool's would only time out)
            psycopg.connect(self.url, autocommit=True, connect_timeout=10).close()
        except psycopg.Error as exc:
            raise unreachable(self.url, exc) from None
        # Only a lost server makes a request wait for a connection (the store's lock
        # lends one at a time): fail fast then, so the request gets its 503 in time.
        self._pool_timeout = min(timeout, CONNECT_WAIT)
        self._pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=4,
            kwargs={"autocommit": True},
            # A connection is checked as it leaves the pool when it sat idle, or while
            # the server is known to have gone: one the server dropped (a restart, a
            # failover) is replaced instead of failing the request it was for.
            check=self._check_connection,
            timeout=self._pool_timeout,
            name="runbook-bot",
            open=False,
        )
        try:
            self._pool.open(wait=True, timeout=timeout)
            self._migrate()
        except psycopg.Error as exc:
            self.close()
            raise StoreError(
                f"cannot prepare the database {self.path}: {libpq_reason(exc)}"
            ) from None
        except BaseException:
            self.close()
            raise

    def _check_connection(self, conn: Any) -> None:
        """The pool's check, skipped for a connection in use a moment ago: a round trip
        per session halved the engine's throughput, and a connection that just worked
        is very likely still there (if not, that one session fails, and the next ones,
        with the server marked down, are checked)."""
        from psycopg_pool import ConnectionPool

        if self._down or time.monotonic() - self._used.get(conn, 0.0) >= CHECK_IDLE:
            ConnectionPool.check_connection(conn)

    @property
    def postgres(self) -> bool:
        return self._pool is not None

    @property
    def conn(self) -> Any:
        """The connection of the thread holding the store's lock (SQLite: the one)."""
        if self._pool is None:
            return self._sqlite
        if self._active is None:
            raise StoreError("the store's PostgreSQL connection is only lent inside a session")
        return self._active

    @property
    def intake(self) -> IntakeLog | None:
        """The intake log of the bot's store (None for others)."""
        return self._intake

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            return
        if self._intake is not None:
            self._intake.close()
        with self._checkpoint_lock:
            if self._checkpointer is not None:
                self._checkpointer.close()
                self._checkpointer = None
        with self._lock:
            self._sqlite.close()

    def checkpoint(self) -> tuple[int, int]:
        """Copy committed WAL pages into the database file; (pages in the WAL, copied).

        For a background thread. It uses a connection of its own and not the store's
        lock, and PASSIVE never waits for readers or the writer.
        """
        if self._pool is not None:
            return 0, 0  # nothing to copy: the server checkpoints
        if self.path == ":memory:":
            return 0, 0
        if self._intake is not None:
            self._intake.checkpoint()
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
    def _session(self, urgent: bool = False) -> Iterator[Any]:
        """The store's lock (`urgent`: its fast lane) and the connection to use under it.

        PostgreSQL: a pooled connection, lent for the outermost session of the thread
        holding the lock (nested ones share it, so a unit reads its own writes). A lost
        server is a `StoreError` naming it, and the pool reconnects by itself.
        """
        self._lock.acquire(urgent)
        try:
            if self._pool is None:
                yield self._sqlite
            elif self._active is not None:
                yield self._active
            else:
                yield from self._lend()
        finally:
            self._lock.release()

    def _lend(self) -> Iterator[PgConnection]:
        import psycopg
        from psycopg_pool import PoolTimeout

        assert self._pool is not None
        # While the server is known to be down, a session waits briefly for the pool
        # (which keeps reconnecting in the background): every thread queued on the
        # store's lock would otherwise wait in turn, and a request behind them for long.
        wait = DOWN_WAIT if self._down else self._pool_timeout
        try:
            with self._pool.connection(timeout=wait) as raw:
                self._down = ""
                self._active = PgConnection(raw)
                try:
                    yield self._active
                finally:
                    self._active = None
                    self._used[raw] = time.monotonic()
        except PoolTimeout:
            self._down = self._down or self._why_unreachable()
            raise StoreError(f"cannot reach the database {self.path}: {self._down}") from None
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:
            self._down = libpq_reason(exc)
            raise unreachable(self.url, exc) from None

    def _why_unreachable(self) -> str:
        """The pool only says it timed out: one direct attempt gives libpq's reason."""
        import psycopg

        try:
            psycopg.connect(self.url, connect_timeout=2).close()
        except psycopg.Error as exc:
            return libpq_reason(exc)
        return "no connection came back in time"

    @contextmanager
    def _transaction(self) -> Iterator[Any]:
        """BEGIN IMMEDIATE … COMMIT, rolled back on any error, a failed COMMIT included
        (a full disk can refuse it): the connection is never left inside a transaction,
        so the store works again by itself once the disk does.

        PostgreSQL: BEGIN, then the write lock (see the class), … COMMIT."""
        with self._session() as conn:
            if self._pool is not None:
                with conn.raw.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(?)", (WRITE_LOCK,))
                    yield conn
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    @contextmanager
    def unit(self, at: float | None = None, origin: Origin = Origin.BOT) -> Iterator[Unit]:
        """One transaction; commits the unit's changes, events and effects together.

        `origin`: what its audit rows come from (the bot, simulate or runbook tests)."""
        with self._transaction() as conn:
            unit = Unit(conn, self.clock() if at is None else at, origin, self.owner)
            yield unit
            unit._flush()

    def _migrate(self) -> None:
        with self._transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            current = int(row[0]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} has schema version {current}, newer than this bot "
                    f"({SCHEMA_VERSION}): upgrade runbook-bot or use another RUNBOOK_DB"
                )
            if current == SCHEMA_VERSION:
                return
            if self._pool is not None:
                for statement in postgres_statements(current):
                    conn.execute(statement)
            else:
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    MIGRATIONS[version](self.db)
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )

    @property
    def schema_version(self) -> int:
        row = self.query_one("SELECT value FROM meta WHERE key='schema_version'")
        return int(row["value"]) if row else 0

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Read-only diagnostics (reports, tests). State changes go through `unit()`."""
        with self._session() as conn:
            return _dict_rows(conn.execute(sql, params))

    def query_one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self.query(sql, params)
        return rows[0] if rows else None

    def probe_write(self) -> None:
        """Raise unless the database can take writes now (for /readyz).

        Rewriting a small row needs no new page, so it succeeds on a full disk: the probe
        also asks for room to grow (free space on the file system, and pages below
        SQLite's own limit), which every new delivery needs. PostgreSQL: a committed
        write.
        """
        if self._pool is None:
            self._probe_room()
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('write_probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(self.clock()),),
            )

    def _probe_room(self) -> None:
        if self.path != ":memory:":
            stats = os.statvfs(Path(self.path).parent)
            free = stats.f_bavail * stats.f_frsize
            if free < MIN_FREE_BYTES:
                raise StoreError(
                    f"database or disk is full: only {free} bytes are free on the disk of "
                    f"{self.path}"
                )
        with self._lock:
            pages = self._sqlite.execute("PRAGMA page_count").fetchone()[0]
            limit = self._sqlite.execute("PRAGMA max_page_count").fetchone()[0]
            spare = self._sqlite.execute("PRAGMA freelist_count").fetchone()[0]
        if limit - pages + spare < MIN_FREE_PAGES:
            raise StoreError(
                f"database or disk is full: {self.path} is at its size limit "
                f"({pages} of {limit} pages)"
            )

    # --- reads -----------------------------------------------------------------------------

    def incident(self, incident_id: str) -> Incident | None:
        row = self.query_one("SELECT * FROM incidents WHERE id = ?", (incident_id,))
        return Incident.from_row(row) if row else None

    def incidents(self, status: IncidentStatus | None = None) -> list[Incident]:
        if status is None:
            rows = self.query("SELECT * FROM incidents ORDER BY created_at, id")
        else:
            rows = self.query(
                "SELECT * FROM incidents WHERE status = ? ORDER BY created_at, id", (str(status),)
            )
        return [Incident.from_row(r) for r in rows]

    def run(self, incident_id: str, phase: Phase | str = Phase.MAIN) -> Run | None:
        row = self.query_one(
            "SELECT * FROM runs WHERE incident_id = ? AND phase = ?", (incident_id, str(phase))
        )
        return Run.from_row(row) if row else None

    def live_runs(self) -> list[Run]:
        return [
            Run.from_row(r)
            for r in self.query("SELECT * FROM runs WHERE status IN ('running', 'waiting')")
        ]

    def step_run(self, step_run_id: int) -> StepRun | None:
        row = self.query_one("SELECT * FROM step_runs WHERE id = ?", (step_run_id,))
        return StepRun.from_row(row) if row else None

    def step_runs_of(self, incident_id: str) -> list[StepRun]:
        return [
            StepRun.from_row(r)
            for r in self.query(
                "SELECT * FROM step_runs WHERE incident_id = ? ORDER BY id", (incident_id,)
            )
        ]

    def running_steps(
        self, *, runner: str | None = None, started_before: float | None = None
    ) -> list[StepRun]:
        """Steps running (claimed by `runner`, started before `started_before`)."""
        sql, params = "SELECT * FROM step_runs WHERE status = 'running'", list[Any]()
        if runner is not None:
            sql, params = sql + " AND runner = ?", [*params, runner]
        if started_before is not None:
            sql, params = sql + " AND started_at < ?", [*params, started_before]
        return [StepRun.from_row(r) for r in self.query(sql + " ORDER BY id", tuple(params))]

    def approval(self, step_run_id: int) -> Approval | None:
        row = self.query_one("SELECT * FROM approvals WHERE step_run_id = ?", (step_run_id,))
        return Approval.from_row(row) if row else None

    def pending_approvals(self, incident_id: str | None = None) -> list[Approval]:
        if incident_id is None:
            rows = self.query("SELECT * FROM approvals WHERE status = 'pending' ORDER BY id")
        else:
            rows = self.query(
                "SELECT * FROM approvals WHERE status = 'pending' AND incident_id = ? ORDER BY id",
                (incident_id,),
            )
        return [Approval.from_row(r) for r in rows]

    def count_pending_approvals(self) -> int:
        row = self.query_one("SELECT count(*) AS pending FROM approvals WHERE status = 'pending'")
        return int(row["pending"]) if row else 0

    def due_approvals(self, at: float) -> list[Approval]:
        return [
            Approval.from_row(r)
            for r in self.query(
                "SELECT * FROM approvals WHERE status = 'pending' AND paused_at IS NULL "
                "AND expires_at <= ? ORDER BY expires_at",
                (at,),
            )
        ]

    def next_deadline(self) -> float | None:
        row = self.query_one(
            "SELECT min(expires_at) AS deadline FROM approvals "
            "WHERE status = 'pending' AND paused_at IS NULL"
        )
        return float(row["deadline"]) if row and row["deadline"] is not None else None

    def events(self, incident_id: str | None = None) -> list[dict[str, Any]]:
        if incident_id is None:
            return self.query("SELECT * FROM automation_events ORDER BY id")
        return self.query(
            "SELECT * FROM automation_events WHERE incident_id = ? ORDER BY id", (incident_id,)
        )

    def record_event(self, **values: Any) -> None:
        """An audit row from outside the state machine (``bot.guard``'s decorators)."""
        status = values.get("status")
        if status not in {str(e) for e in Event}:
            raise ValueError(f"unknown audit status {status!r}")
        values["origin"] = str(Origin(values.get("origin", Origin.BOT)))
        values.setdefault("ts", self.clock())
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._session():
            self.conn.execute(
                f"INSERT INTO automation_events ({columns}) VALUES ({marks})",
                tuple(values.values()),
            )

    # --- catalogs --------------------------------------------------------------------------

    def save_catalog(self, version: str, snapshot: bytes, *, keep: int = 20) -> None:
        """Remember a good catalog the bot serves; the oldest beyond `keep` are dropped,
        except those a live run still uses."""
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO catalogs (version, snapshot, loaded_at) VALUES (?, ?, ?) "
                "ON CONFLICT (version) DO UPDATE SET loaded_at = excluded.loaded_at",
                (version, snapshot, self.clock()),
            )
            conn.execute(
                "DELETE FROM catalogs WHERE version NOT IN (SELECT version FROM catalogs "
                "ORDER BY loaded_at DESC LIMIT ?) AND version NOT IN (SELECT catalog_commit "
                "FROM runs WHERE status IN ('running', 'waiting'))",
                (keep,),
            )

    def catalog_snapshot(self, version: str | None = None) -> bytes | None:
        """The stored snapshot of `version`, or of the newest good catalog."""
        if version is None:
            row = self.query_one("SELECT snapshot FROM catalogs ORDER BY loaded_at DESC LIMIT 1")
        else:
            row = self.query_one("SELECT snapshot FROM catalogs WHERE version = ?", (version,))
        return bytes(row["snapshot"]) if row else None

    def incidents_waiting_for_approval(self) -> list[str]:
        """Incidents with an approval request still open (a reload re-checks them)."""
        rows = self.query(
            "SELECT DISTINCT incident_id FROM approvals WHERE status = 'pending' ORDER BY 1"
        )
        return [str(r["incident_id"]) for r in rows]

    # --- the inbox -------------------------------------------------------------------------

    def inbox_put(
        self,
        *,
        source: str,
        key: str,
        incident_id: str,
        kind: str,
        payload: Mapping[str, Any],
        received_at: float | None = None,
        alt_key: str | None = None,
        catalog_commit: str = "",
        status: InboxStatus = InboxStatus.QUEUED,
        detail: str = "",
        waiting: bool = False,
    ) -> bool:
        """Record an item unless one of its keys was seen; True if it is new.

        Committed before the sender gets its answer, so an acknowledged item survives a
        crash. A unique constraint, not memory, makes a second delivery change nothing.

        `waiting`: a sender waits for the answer (a PagerDuty delivery, a Slack event).
        The bot's store records such an item in its intake log, which nothing else
        writes (the inbox consumer moves it here: `inbox_receive`). Other items (a step's
        result, a deadline) go straight into the inbox, after what the log received
        before them: receipt order holds across both ways in.
        """
        values = intake.row(
            source=source,
            key=key,
            alt_key=alt_key,
            incident_id=incident_id,
            kind=kind,
            payload=payload,
            received_at=self.clock() if received_at is None else received_at,
            status=status,
            detail=detail,
            catalog_commit=catalog_commit,
            processed_at=(
                None if status in (InboxStatus.QUEUED, InboxStatus.PARKED) else self.clock()
            ),
        )
        if self._intake is not None and waiting:
            return self._intake.record(values)
        # `_receiving` orders the intake log's moves and direct puts; without a log
        # (PostgreSQL) a request's put must not queue behind a step result's in it: it
        # goes straight to the store's fast lane.
        with self._receiving if self._intake is not None else nullcontext():
            if self._intake is not None:
                self._move_received(catalog_commit)
            with self._session(urgent=waiting):
                new = self._insert_received([tuple(values[c] for c in _RECEIVED)]) == 1
                if new and status is InboxStatus.PARKED:
                    # Its message may have been recorded between the caller's lookup and
                    # this insert: then it joins its incident now. A parked item left by a
                    # crash right here is released by the next `inbox_unpark`.
                    self._parked = True
                    self._unpark()
                return new

    def inbox_receive(self, catalog_commit: str = "") -> int:
        """Move what the intake log received into the inbox, in receipt order; how many.

        One transaction per batch. A crash after it and before the log learns it is
        moved moves it again, which the inbox's unique keys ignore. Items recorded by
        the intake front (which does not load the catalog) get `catalog_commit`, the
        catalog served when they are moved.
        """
        if self._intake is None:
            return 0
        with self._receiving:  # one mover: receipt order is the order of moving
            return self._move_received(catalog_commit)

    def _move_received(self, catalog_commit: str = "") -> int:
        """`inbox_receive()`, for a caller that holds `_receiving`."""
        assert self._intake is not None
        moved = 0
        stamp = 1 + _RECEIVED.index("catalog_commit")
        while rows := self._intake.pending():
            with self._transaction():
                self._insert_received(
                    [
                        (*row[1:stamp], row[stamp] or catalog_commit, *row[stamp + 1 :])
                        for row in rows
                    ]
                )
                if any(row[1 + _RECEIVED.index("status")] == "parked" for row in rows):
                    self._parked = True
                    self._unpark()
            self.sync()
            self._intake.moved(int(rows[-1][0]))
            moved += len(rows)
        return moved

    def sync(self) -> None:
        """Put what was committed on disk. Commits are not synced one by one (WAL with
        synchronous=NORMAL survives a crash, not a power loss), so this comes before
        what must not be undone: the intake log letting go of a moved batch (else a
        power loss could take an item from both), a step's command starting (else its
        claim could be lost and the step run again)."""
        if self.path == ":memory:" or self._pool is not None:
            return  # PostgreSQL: a commit is durable once it returns
        try:
            fd = os.open(f"{self.path}-wal", os.O_RDONLY)
        except FileNotFoundError:
            return  # checkpointed and removed: the database file itself was synced
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _insert_received(self, rows: Sequence[Sequence[Any]]) -> int:
        """Insert intake rows (values in `_RECEIVED` order) into the inbox, ignoring
        those whose key was seen; how many were new. Call with the lock held."""
        new = 0
        for row in rows:
            new += self.conn.execute(
                f"INSERT INTO inbox ({', '.join(_RECEIVED)}) "
                f"VALUES ({', '.join('?' for _ in _RECEIVED)}) ON CONFLICT DO NOTHING",
                row,
            ).rowcount
        return new

    def _unpark(self) -> int:
        """Parked items whose message is now recorded join its incident, about its step,
        in their place of receipt (their `id`). Call with the lock held."""
        if self._pool is not None:
            return int(self.conn.execute(_UNPARK_POSTGRES).rowcount)
        released = self.conn.execute(
            "UPDATE inbox SET status = 'queued', incident_id = o.incident_id, "
            "payload = json_set(inbox.payload, '$.step_run_id', "
            "CAST(substr(o.key, 6) AS INTEGER)) FROM outbox AS o "
            "WHERE inbox.status = 'parked' AND o.key LIKE 'step:%' AND o.ts IS NOT NULL "
            "AND o.ts = json_extract(inbox.payload, '$.ts') "
            "AND o.posted_channel = json_extract(inbox.payload, '$.channel')"
        ).rowcount
        return int(released)

    def inbox_unpark(self) -> int:
        """Release parked items whose message is known (the inbox calls it every second:
        another process, or a crash, may have recorded the message)."""
        with self._session():
            released = self._unpark()
            self._parked = (
                self.conn.execute("SELECT 1 FROM inbox WHERE status = 'parked' LIMIT 1").fetchone()
                is not None
            )
            return released

    def inbox_expire_parked(self, before: float) -> int:
        """Parked items received before `before` were about someone else's message."""
        with self._session():
            if not self._parked:
                return 0
            return int(
                self.conn.execute(
                    "UPDATE inbox SET status = 'ignored', processed_at = ?, "
                    "detail = 'not about a message of the bot' "
                    "WHERE status = 'parked' AND received_at < ?",
                    (self.clock(), before),
                ).rowcount
            )

    def inbox_ready(
        self,
        limit: int,
        exclude: Iterable[str] = (),
        accept: Callable[[str], bool] | None = None,
    ) -> list[InboxItem]:
        """The oldest queued item of each incident, oldest first (skipping `exclude`, and
        incidents `accept` declines: another replica's)."""
        skip = set(exclude)
        # With `accept`, about one incident in as many replicas as there are is taken: the
        # heads are read a page at a time until enough are accepted or none is left.
        page = (limit + len(skip)) * (1 if accept is None else 8)
        found: list[InboxItem] = []
        after = 0
        while True:
            rows = self.query(
                "SELECT * FROM inbox WHERE id IN (SELECT min(id) FROM inbox "
                "WHERE status = 'queued' GROUP BY incident_id) AND id > ? ORDER BY id LIMIT ?",
                (after, page),
            )
            found += [
                InboxItem.from_row(r)
                for r in rows
                if r["incident_id"] not in skip and (accept is None or accept(r["incident_id"]))
            ]
            if len(found) >= limit or len(rows) < page or accept is None:
                return found[:limit]
            after = int(rows[-1]["id"])

    def inbox_next(self, incident_id: str) -> InboxItem | None:
        row = self.query_one(
            "SELECT * FROM inbox WHERE status = 'queued' AND incident_id = ? ORDER BY id LIMIT 1",
            (incident_id,),
        )
        return InboxItem.from_row(row) if row else None

    def inbox_attempt_failed(self, item: InboxItem, detail: str, *, give_up: bool) -> None:
        """Applying `item` raised: count the attempt; after the last, keep it as failed."""
        with self._session():
            self.conn.execute(
                "UPDATE inbox SET attempts = attempts + 1, detail = ?, status = ?, "
                "processed_at = ? WHERE id = ? AND status = 'queued'",
                (
                    detail[:1000],
                    str(InboxStatus.FAILED if give_up else InboxStatus.QUEUED),
                    self.clock() if give_up else None,
                    item.id,
                ),
            )

    def inbox_items(
        self, incident_id: str | None = None, source: str | None = None
    ) -> list[InboxItem]:
        """Items received, oldest first (those still in the intake log are moved first)."""
        self.inbox_receive()
        sql, params = "SELECT * FROM inbox WHERE 1 = 1", []
        if incident_id is not None:
            sql += " AND incident_id = ?"
            params.append(incident_id)
        if source is not None:
            sql += " AND source = ?"
            params.append(source)
        return [InboxItem.from_row(r) for r in self.query(sql + " ORDER BY id", params)]

    def count_queued(self) -> int:
        """Items waiting to be applied, those still in the intake log included (counted
        first: an item moves from there to the inbox, so it cannot slip between)."""
        pending = self._intake.count_pending() if self._intake is not None else 0
        row = self.query_one("SELECT count(*) AS queued FROM inbox WHERE status = 'queued'")
        return (int(row["queued"]) if row else 0) + pending

    def has_item(self, key: str) -> bool:
        return self.query_one("SELECT 1 AS found FROM inbox WHERE key = ?", (key,)) is not None

    # --- replicas (bot.replicas) ----------------------------------------------------------

    def beat(
        self,
        replica: str,
        holder: str,
        *,
        host: str,
        leases: Iterable[str],
        ttl: float,
        dead_after: float,
        conn: Any = None,
    ) -> Beat:
        """One heartbeat of `holder`, the process serving as `replica`, in one transaction:
        its row in ``replicas``, each of `leases` renewed or taken when free or lapsed
        (for `ttl` seconds), and who is alive (seen within `dead_after` seconds).

        Times are the database's (PostgreSQL: the server's clock, which every replica
        shares). A replica's row held by another process seen lately is not taken
        (`Beat.refused`): two processes must not serve as one replica.

        `conn`: a psycopg connection of the caller's own (PostgreSQL), so that a heartbeat
        never waits behind this process's other work on the store.
        """
        with self._beat_transaction(conn) as conn:
            at = self._database_now(conn)
            lock = " FOR UPDATE" if self._pool is not None else ""
            row = conn.execute(
                f"SELECT holder, host, seen_at FROM replicas WHERE id = ?{lock}", (replica,)
            ).fetchone()
            if row is not None and row[0] != holder and row[2] > at - dead_after:
                return Beat(at, refused=f"{replica} is served by a process on {row[1]}")
            conn.execute(
                "INSERT INTO replicas (id, holder, host, pid, started_at, seen_at) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "holder = excluded.holder, host = excluded.host, pid = excluded.pid, "
                "started_at = CASE WHEN replicas.holder = excluded.holder "
                "THEN replicas.started_at ELSE excluded.started_at END, seen_at = excluded.seen_at",
                (replica, holder, host, os.getpid(), at, at),
            )
            held: dict[str, int] = {}
            for name in leases:
                fence = self._lease(conn, name, holder, at, ttl)
                if fence is not None:
                    held[name] = fence
            alive = [
                str(r[0])
                for r in conn.execute(
                    "SELECT id FROM replicas WHERE seen_at > ? ORDER BY id", (at - dead_after,)
                ).fetchall()
            ]
            return Beat(at, held=held, alive=tuple(alive))

    @contextmanager
    def _beat_transaction(self, raw: Any = None) -> Iterator[Any]:
        """A heartbeat's transaction. PostgreSQL: without the write lock (its statements
        are atomic on their own), on the caller's connection when it has one, so that a
        busy replica's heartbeat never waits behind the engine's transactions and its
        leases lapse only when it is really gone."""
        if self._pool is None:
            with self._transaction() as conn:
                yield conn
        elif raw is not None:
            with raw.transaction():
                yield PgConnection(raw)
        else:
            with self._session(urgent=True) as conn, conn.raw.transaction():
                yield conn

    @staticmethod
    def _lease(conn: Any, name: str, holder: str, at: float, ttl: float) -> int | None:
        """Renew or take lease `name` for `holder`, in one statement: its fence (a counter
        that grows at each change of holder), or None when another holder's lease runs."""
        row = conn.execute(
            "INSERT INTO leases (name, holder, expires_at, fence) VALUES (?, ?, ?, 1) "
            "ON CONFLICT (name) DO UPDATE SET expires_at = excluded.expires_at, "
            "fence = CASE WHEN leases.holder = excluded.holder THEN leases.fence "
            "ELSE leases.fence + 1 END, holder = excluded.holder "
            "WHERE leases.holder = excluded.holder OR leases.expires_at <= ? RETURNING fence",
            (name, holder, at + ttl, at),
        ).fetchone()
        return int(row[0]) if row is not None else None

    def leave(self, replica: str, holder: str) -> None:
        """`holder` stops serving: its leases and its place among the living are free now
        (a survivor takes over at its next heartbeat rather than after the lease lapses)."""
        with self._transaction() as conn:
            conn.execute("UPDATE leases SET expires_at = 0 WHERE holder = ?", (holder,))
            conn.execute(
                "UPDATE replicas SET seen_at = 0 WHERE id = ? AND holder = ?", (replica, holder)
            )

    def leases(self) -> list[dict[str, Any]]:
        """Every lease: name, holder, expires_at (database time), fence."""
        return self.query("SELECT * FROM leases ORDER BY name")

    def _database_now(self, conn: Any) -> float:
        if self._pool is None:
            return self.clock()
        return float(conn.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()[0])

    # --- the outbox ------------------------------------------------------------------------

    def outbox_heads(
        self, at: float, limit: int = 100, exclude: Iterable[str] = ()
    ) -> tuple[list[OutboxItem], float | None]:
        """The first pending effect of each lane that is due, and when the next one is.

        Effects of a lane are delivered strictly in order, so only a lane's head can have
        been on its way when a sender stopped: the others were never attempted.

        Two steps, because this runs often while effects pile up (Slack paces them): the
        heads alone (one index scan), then where their messages and threads are, for
        the due heads of lanes not excluded only.
        """
        skip = set(exclude)
        with self._session():
            heads = self.conn.execute(
                "SELECT o.id, o.lane, o.next_at FROM outbox o WHERE o.id IN (SELECT min(id) "
                "FROM outbox WHERE status = 'pending' GROUP BY lane) ORDER BY o.next_at, o.id"
            ).fetchall()
            candidates: list[int] = []
            later: float | None = None
            for head_id, lane, next_at in heads:
                if lane in skip:
                    continue
                if next_at > at:
                    later = next_at if later is None else min(later, next_at)
                else:
                    candidates.append(int(head_id))
            # A head about a message still on its way cannot go, so `limit` counts the
            # heads that can: details are read a chunk at a time until it is reached.
            due: list[OutboxItem] = []
            step = max(limit, 64)
            for first in range(0, len(candidates), step):
                chunk = candidates[first : first + step]
                due.extend(self._outbox_ready(chunk, at))
                if len(due) >= limit:
                    break
        return due[:limit], later

    def outbox_lane_head(self, lane: str, at: float) -> OutboxItem | None:
        """The first pending effect of `lane` if it can be sent at `at` (a sender that
        just delivered the one before it goes on with it, without another look)."""
        with self._session():
            head = self.conn.execute(
                "SELECT id, next_at FROM outbox WHERE status = 'pending' AND lane = ? "
                "ORDER BY id LIMIT 1",
                (lane,),
            ).fetchone()
            if head is None or head[1] > at:
                return None
            ready = self._outbox_ready([int(head[0])], at)
        return ready[0] if ready else None

    def _outbox_ready(self, ids: list[int], at: float) -> list[OutboxItem]:
        """Those of the outbox rows `ids` that can be sent at `at`, with where their
        message and thread are, in order."""
        rows = _dict_rows(
            self.conn.execute(
                "SELECT o.*, "
                "(SELECT t.ts FROM outbox t WHERE t.key = o.key AND t.ts IS NOT NULL "
                "LIMIT 1) AS target_ts, "
                "(SELECT t.posted_channel FROM outbox t WHERE t.key = o.key "
                "AND t.ts IS NOT NULL LIMIT 1) AS target_channel, "
                "(o.key IS NOT NULL AND (EXISTS (SELECT 1 FROM outbox t WHERE t.key = o.key "
                "AND t.kind = 'post_step' AND t.status IN ('failed', 'cancelled')) "
                "OR NOT EXISTS (SELECT 1 FROM outbox t WHERE t.key = o.key "
                "AND (t.kind = 'post_step' OR t.ts IS NOT NULL)))) AS target_failed, "
                "(SELECT r.ts FROM outbox r WHERE r.key = 'root:' || o.incident_id "
                "AND r.ts IS NOT NULL LIMIT 1) AS thread_ts, "
                "(SELECT r.posted_channel FROM outbox r WHERE r.key = 'root:' || o.incident_id "
                "AND r.ts IS NOT NULL LIMIT 1) AS thread_channel, "
                "EXISTS (SELECT 1 FROM outbox r WHERE r.key = 'root:' || o.incident_id "
                "AND r.status = 'pending') AS root_pending "
                f"FROM outbox o WHERE o.id IN ({', '.join('?' for _ in ids)}) "
                "ORDER BY o.next_at, o.id",
                ids,
            )
        )
        return [
            OutboxItem.from_row(row)
            for row in rows
            # an update or reaction whose message is still on its way: a send wakes us
            if not (
                row["kind"] in _ABOUT_A_MESSAGE
                and row["target_ts"] is None
                and not row["target_failed"]
            )
            and not (
                row["kind"] in _LINKS_THREAD
                and row["root_pending"]
                and row["thread_ts"] is None
                and at - row["created_at"] < THREAD_LINK_WAIT
            )
        ]

    def outbox_sent(
        self, item: OutboxItem, *, ts: str | None = None, channel: str | None = None
    ) -> bool:
        """Record a delivery. False when a newer rendering arrived meanwhile: the row stays
        pending as an update of the message just posted, so that rendering is sent too.

        One statement in the common case: this runs once per message on the hot path.
        """
        with self._session():
            conn = self.conn
            changed = conn.execute(
                "UPDATE outbox SET status = 'sent', ts = coalesce(?, ts), "
                "posted_channel = coalesce(?, posted_channel), sent_at = ?, "
                "attempts = attempts + 1 WHERE id = ? AND version = ? AND status = 'pending'",
                (ts, channel, self.clock(), item.id, item.version),
            ).rowcount
            if changed and item.kind == "post_incident" and ts:
                conn.execute(
                    "UPDATE incidents SET thread_ts = ?, channel = ? WHERE id = ?",
                    (ts, channel or item.payload.get("channel"), item.incident_id),
                )
            if not changed and item.kind == "post_step" and ts:
                # Posted, and a newer rendering is waiting: it goes out as an update.
                conn.execute(
                    "UPDATE outbox SET kind = 'update_step', ts = ?, posted_channel = ? "
                    "WHERE id = ? AND status = 'pending'",
                    (ts, channel, item.id),
                )
            if item.kind == "post_step" and ts and self._parked:
                self._unpark()
            return bool(changed)

    def outbox_retry(
        self, item: OutboxItem, next_at: float, error: str, *, attempted: bool = True
    ) -> None:
        """Deliver it again at `next_at`. `attempted`: the call may have reached the other
        side (counted: a later try looks before posting again)."""
        with self._session():
            self.conn.execute(
                "UPDATE outbox SET attempts = attempts + ?, next_at = ?, error = ? "
                "WHERE id = ? AND status = 'pending'",
                (1 if attempted else 0, next_at, error[:500], item.id),
            )

    def outbox_failed(self, item: OutboxItem, error: str) -> None:
        with self._session():
            self.conn.execute(
                "UPDATE outbox SET status = 'failed', attempts = attempts + 1, error = ? "
                "WHERE id = ? AND status = 'pending'",
                (error[:500], item.id),
            )

    def outbox_set_payload(self, item: OutboxItem, payload: Mapping[str, Any]) -> None:
        """Remember a decision the sender made before a call whose outcome may be unknown
        (e.g. the escalation level it asks for), so a retry asks for the same."""
        with self._session():
            self.conn.execute(
                "UPDATE outbox SET payload = ? WHERE id = ?", (json.dumps(payload), item.id)
            )

    def outbox_items(
        self,
        incident_id: str | None = None,
        *,
        target: str | None = None,
        status: OutboxStatus | None = None,
    ) -> list[OutboxItem]:
        sql, params = "SELECT * FROM outbox WHERE 1 = 1", []
        for column, value in (("incident_id", incident_id), ("target", target)):
            if value is not None:
                sql += f" AND {column} = ?"
                params.append(value)
        if status is not None:
            sql += " AND status = ?"
            params.append(str(status))
        return [OutboxItem.from_row(r) for r in self.query(sql + " ORDER BY id", params)]

    def count_outbox_pending(self) -> int:
        row = self.query_one("SELECT count(*) AS pending FROM outbox WHERE status = 'pending'")
        return int(row["pending"]) if row else 0

    def message_at(self, channel: str, ts: str) -> tuple[str, str] | None:
        """(message key, incident id) of the bot's message at (channel, ts), if any. On the
        way to answering Slack: it takes the store's fast lane, as `inbox_put` does."""
        with self._session(urgent=True):
            row = _one(
                self.conn.execute(
                    "SELECT key, incident_id FROM outbox WHERE ts = ? AND key IS NOT NULL "
                    "AND (posted_channel = ? OR ? = '') ORDER BY id DESC LIMIT 1",
                    (ts, channel, channel),
                )
            )
        return (str(row["key"]), str(row["incident_id"])) if row else None

    def message_ref(self, key: str) -> tuple[str, str] | None:
        """(channel id, ts) of the bot's message `key`, once posted."""
        row = self.query_one(
            "SELECT posted_channel, ts FROM outbox WHERE key = ? AND ts IS NOT NULL LIMIT 1",
            (key,),
        )
        return (str(row["posted_channel"]), str(row["ts"])) if row else None

    # --- pull runners (bot.hub) ------------------------------------------------------------

    def runner_token_create(self, pool: str, name: str, token_sha256: str) -> RunnerToken:
        """A new token for `pool` (`name` unique in the pool; its sha256 only is kept)."""
        try:
            with self._transaction() as conn:
                row = _one(
                    conn.execute(
                        "INSERT INTO runner_tokens (pool, name, token_sha256, created_at) "
                        "VALUES (?, ?, ?, ?) RETURNING *",
                        (pool, name, token_sha256, self.clock()),
                    )
                )
        except integrity_errors():
            raise StoreError(
                f"pool {pool} already has a token named {name}: choose another --name, or "
                "revoke that one first"
            ) from None
        assert row is not None
        return RunnerToken.from_row(row)

    def runner_token_revoke(self, pool: str, name: str) -> RunnerToken | None:
        """Revoke the token `name` of `pool` (None: no such token, or already revoked)."""
        with self._transaction() as conn:
            revoked = conn.execute(
                "UPDATE runner_tokens SET revoked_at = ? WHERE pool = ? AND name = ? "
                "AND revoked_at IS NULL",
                (self.clock(), pool, name),
            ).rowcount
            if revoked == 0:
                return None
            row = _one(
                conn.execute(
                    "SELECT * FROM runner_tokens WHERE pool = ? AND name = ?", (pool, name)
                )
            )
        return RunnerToken.from_row(row) if row else None

    def runner_tokens(self, pool: str | None = None) -> list[RunnerToken]:
        if pool is None:
            rows = self.query("SELECT * FROM runner_tokens ORDER BY pool, name")
        else:
            rows = self.query("SELECT * FROM runner_tokens WHERE pool = ? ORDER BY name", (pool,))
        return [RunnerToken.from_row(r) for r in rows]

    def runner_token_by_hash(self, token_sha256: str) -> RunnerToken | None:
        row = self.query_one("SELECT * FROM runner_tokens WHERE token_sha256 = ?", (token_sha256,))
        return RunnerToken.from_row(row) if row else None

    def runner_job_queue(self, job: RunnerJob) -> None:
        """Queue a claimed step for its pool (again after a restart: kept as it is)."""
        values = {f: getattr(job, f) for f in RunnerJob.__dataclass_fields__}
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        with self._transaction() as conn:
            conn.execute(
                f"INSERT INTO runner_jobs ({columns}) VALUES ({marks}) ON CONFLICT DO NOTHING",
                tuple(values.values()),
            )

    def runner_job_lease(
        self, pool: str, actions: Sequence[str], token_id: int, lease_until: float
    ) -> RunnerJob | None:
        """The oldest queued step of `pool` for one of `actions`, leased to `token_id`
        (atomically: two runners never get the same step)."""
        if not actions:
            return None
        marks = ", ".join("?" for _ in actions)
        with self._transaction() as conn:
            row = _one(
                conn.execute(
                    "SELECT * FROM runner_jobs WHERE pool = ? AND state = 'queued' "
                    f"AND wait_until > ? AND action IN ({marks}) AND {_STILL_WANTED} "
                    "ORDER BY queued_at, job_id LIMIT 1",
                    (pool, self.clock(), *actions),
                )
            )
            if row is None:
                return None
            conn.execute(
                "UPDATE runner_jobs SET state = 'leased', token_id = ?, lease_until = ? "
                "WHERE job_id = ?",
                (token_id, lease_until, row["job_id"]),
            )
        return RunnerJob.from_row(
            {**row, "state": "leased", "token_id": token_id, "lease_until": lease_until}
        )

    def runner_job_extend(
        self, job_ids: Sequence[str], token_id: int, lease_until: float
    ) -> list[str]:
        """Extend the leases `token_id` holds on `job_ids`; the ids it still holds."""
        held: list[str] = []
        with self._transaction() as conn:
            for job_id in job_ids:
                if conn.execute(
                    "UPDATE runner_jobs SET lease_until = ? WHERE job_id = ? "
                    "AND state = 'leased' AND token_id = ?",
                    (lease_until, job_id, token_id),
                ).rowcount:
                    held.append(job_id)
        return held

    def runner_jobs_renew_leases(self, lease_until: float) -> int:
        """Give every leased step `lease_until` (a bot starting again: the time it was
        down is not its runners' silence)."""
        with self._transaction() as conn:
            # CASE, not max(): SQLite's two-argument max() is min()'s twin in no other SQL
            return int(
                conn.execute(
                    "UPDATE runner_jobs SET lease_until = CASE WHEN lease_until > ? "
                    "THEN lease_until ELSE ? END WHERE state = 'leased'",
                    (lease_until, lease_until),
                ).rowcount
            )

    def runner_job(self, job_id: str) -> RunnerJob | None:
        row = self.query_one("SELECT * FROM runner_jobs WHERE job_id = ?", (job_id,))
        return RunnerJob.from_row(row) if row else None

    def runner_jobs(self, pool: str | None = None) -> list[RunnerJob]:
        if pool is None:
            rows = self.query("SELECT * FROM runner_jobs ORDER BY queued_at, job_id")
        else:
            rows = self.query(
                "SELECT * FROM runner_jobs WHERE pool = ? ORDER BY queued_at, job_id", (pool,)
            )
        return [RunnerJob.from_row(r) for r in rows]

    def runner_job_take(self, job_id: str, token_id: int | None = None) -> RunnerJob | None:
        """Remove the step's row (its end is in the inbox); with `token_id`, only while
        that runner holds it. None: not there (already ended) or held by another."""
        with self._transaction() as conn:
            row = _one(conn.execute("SELECT * FROM runner_jobs WHERE job_id = ?", (job_id,)))
            if row is None or (token_id is not None and row["token_id"] != token_id):
                return None
            conn.execute("DELETE FROM runner_jobs WHERE job_id = ?", (job_id,))
        return RunnerJob.from_row(row)

    def runner_jobs_overdue(
        self,
    ) -> tuple[list[RunnerJob], list[RunnerJob], list[RunnerJob]]:
        """(leased steps whose lease lapsed, queued steps no runner took in time, queued
        steps whose incident resolved before a runner took them)."""
        at = self.clock()
        lapsed = self.query(
            "SELECT * FROM runner_jobs WHERE state = 'leased' AND lease_until < ?", (at,)
        )
        unclaimed = self.query(
            "SELECT * FROM runner_jobs WHERE state = 'queued' AND wait_until <= ?", (at,)
        )
        closed = self.query(
            f"SELECT * FROM runner_jobs WHERE state = 'queued' AND NOT {_STILL_WANTED}"
        )
        return (
            [RunnerJob.from_row(r) for r in lapsed],
            [RunnerJob.from_row(r) for r in unclaimed],
            [RunnerJob.from_row(r) for r in closed],
        )

    def runner_job_take_overdue(self, job: RunnerJob) -> bool:
        """Remove `job` only if it is still as overdue as it was read (a runner's result
        or heartbeat in between wins)."""
        with self._transaction() as conn:
            if job.state == "leased":
                cursor = conn.execute(
                    "DELETE FROM runner_jobs WHERE job_id = ? AND state = 'leased' "
                    "AND lease_until < ?",
                    (job.job_id, self.clock()),
                )
            else:
                cursor = conn.execute(
                    "DELETE FROM runner_jobs WHERE job_id = ? AND state = 'queued'",
                    (job.job_id,),
                )
            return bool(cursor.rowcount)

    def record_runner_refusal(
        self,
        side: str,
        reason: str,
        *,
        pool: str = "",
        token_id: int | None = None,
        job_id: str = "",
        detail: str = "",
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT INTO runner_refusals (at, side, reason, pool, token_id, job_id, detail) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (self.clock(), side, reason, pool, token_id, job_id, detail),
            )

    def runner_refusals(self) -> list[RunnerRefusal]:
        return [
            RunnerRefusal.from_row(r)
            for r in self.query("SELECT * FROM runner_refusals ORDER BY id")
        ]
