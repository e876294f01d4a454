"""The intake log: where a request's item is recorded before it is acknowledged.

A PagerDuty delivery or a Slack event is answered once its item is durable. Recording it
straight in the state database made every answer wait for the transaction under way
there (an engine step, an outbox look: milliseconds each, many under a storm), because
SQLite has one writer. So intake writes to a small database of its own beside the state
database, ``<database>-intake``, which nothing else writes, and the inbox consumer moves
what it received into the ``inbox`` table in receipt order (``Store.inbox_receive``).

  * Durable on acknowledgement, power loss included: this file is synced at each commit
    (``synchronous=FULL``), where the state database syncs at checkpoints. Commits are
    grouped: requests that arrive while one commits are recorded together by the next,
    so a burst pays one sync per group rather than one per request, in a queue.
  * Deduplicated by the same keys as the inbox: a key already in the inbox (read from
    the state database, attached read-only) or already in this log is a duplicate. A
    row leaves the log once moved; a duplicate that read the inbox just before its
    original was moved is recorded again, and the inbox's unique keys ignore it when
    it is moved: it changes nothing.
  * One mover: the bot that opened the log holds an exclusive lock on
    ``<database>-lock`` for its lifetime, so a second bot on the same SQLite database
    refuses to start. Its intake front (``bot.front``, a process of the same bot that
    answers PagerDuty) opens the log as a recorder only (``mover=False``): it records,
    and never moves or takes the lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from bot.errors import StoreError

MOVE_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS received (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- receipt order
    source TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    alt_key TEXT UNIQUE,
    incident_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at REAL NOT NULL,
    status TEXT NOT NULL,
    detail TEXT,
    catalog_commit TEXT,
    processed_at REAL
);
"""

COLUMNS = (
    "source",
    "key",
    "alt_key",
    "incident_id",
    "kind",
    "payload",
    "received_at",
    "status",
    "detail",
    "catalog_commit",
    "processed_at",
)


_ROW = "(" + ", ".join("?" for _ in COLUMNS) + ")"
# At most this many requests share one commit (SQLite's limit on bound values).
GROUP_MAX = 32766 // len(COLUMNS) // 2


def row(
    *,
    source: str,
    key: str,
    incident_id: str,
    kind: str,
    payload: Mapping[str, Any],
    received_at: float,
    alt_key: str | None = None,
    catalog_commit: str = "",
    status: str = "queued",
    detail: str = "",
    processed_at: float | None = None,
) -> dict[str, Any]:
    """An item as the log and the inbox store it (COLUMNS)."""
    return {
        "source": source,
        "key": key,
        "alt_key": alt_key,
        "incident_id": incident_id,
        "kind": str(kind),
        "payload": json.dumps(payload, default=str),
        "received_at": received_at,
        "status": str(status),
        "detail": detail or None,
        "catalog_commit": catalog_commit,
        "processed_at": processed_at,
    }


def log_path(database: str) -> str:
    return f"{database}-intake"


def lock_path(database: str) -> str:
    return f"{database}-lock"


class IntakeLog:
    def __init__(self, database: str, *, mover: bool = True) -> None:
        """`mover`: the bot's own log (takes the one-bot lock); False for its intake
        front, which only records."""
        self.database = database
        self.path = log_path(database)
        self._lock = threading.Lock()  # the connection
        self._turn = threading.Condition()  # whose group commits next
        self._queue: list[_Ticket] = []
        self._committing = False
        self._owner = _take_lock(database) if mover else -1
        try:
            conn = sqlite3.connect(
                f"file:{quote(self.path)}",
                uri=True,
                check_same_thread=False,
                isolation_level=None,
                timeout=30.0,
            )
        except sqlite3.Error as exc:
            self._release()
            raise StoreError(f"cannot open the intake log {self.path}: {exc}") from None
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")  # an acknowledged item survives power loss
            conn.executescript(_SCHEMA)
            conn.execute(
                "ATTACH DATABASE ? AS bot", (f"file:{quote(os.path.abspath(database))}?mode=ro",)
            )
        except sqlite3.Error as exc:
            conn.close()
            self._release()
            raise StoreError(f"cannot open the intake log {self.path}: {exc}") from None
        self.conn = conn

    def close(self) -> None:
        with self._lock:
            self.conn.close()
        self._release()

    def _release(self) -> None:
        if self._owner >= 0:
            with contextlib.suppress(OSError):
                os.close(self._owner)
            self._owner = -1

    def record(self, values: Mapping[str, Any]) -> bool:
        """Record one item unless its key (or alt_key) was seen; True if it is new.
        Returns once the item is committed and synced; raises when it could not be.

        The caller that finds no commit under way commits, for itself and for every
        caller queued until then (a group); the others wait for their group's outcome.
        """
        ticket = _Ticket(values)
        with self._turn:
            self._queue.append(ticket)
        while True:
            with self._turn:
                while not ticket.done and self._committing:
                    self._turn.wait()
                if ticket.done:
                    return ticket.outcome()
                self._committing = True
                group, self._queue = self._queue[:GROUP_MAX], self._queue[GROUP_MAX:]
            try:
                self._commit(group)
            finally:
                with self._turn:
                    self._committing = False
                    self._turn.notify_all()

    def _commit(self, group: list[_Ticket]) -> None:
        """Record a group in one statement: under a storm the interpreter lock is busy,
        and each call into SQLite gives it up and waits to get it back."""
        with self._lock:
            conn = self.conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                inserted = self._insert_all([ticket.values for ticket in group])
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                for ticket in group:
                    ticket.error = exc
                    ticket.done = True
                return
            for ticket in group:  # of two with one key in a group, the first is new
                key = ticket.values["key"]
                ticket.new = key in inserted
                inserted.discard(key)
                ticket.done = True

    def _insert_all(self, rows: list[Mapping[str, Any]]) -> set[str]:
        """Insert the rows whose keys are neither in the inbox nor in this log, in order;
        the keys inserted."""
        values = ", ".join([_ROW] * len(rows))
        cursor = self.conn.execute(
            f"WITH v({', '.join(COLUMNS)}) AS (VALUES {values}) "
            f"INSERT INTO received ({', '.join(COLUMNS)}) SELECT * FROM v WHERE NOT EXISTS "
            "(SELECT 1 FROM bot.inbox WHERE key = v.key UNION ALL "
            " SELECT 1 FROM bot.inbox WHERE alt_key = v.alt_key) "
            "ON CONFLICT DO NOTHING RETURNING key",
            [row[column] for row in rows for column in COLUMNS],
        )
        return {key for (key,) in cursor.fetchall()}

    def pending(self, limit: int = MOVE_BATCH) -> list[tuple[Any, ...]]:
        """(id, *COLUMNS) of items not moved yet, oldest first."""
        with self._lock:
            return self.conn.execute(
                f"SELECT id, {', '.join(COLUMNS)} FROM received ORDER BY id LIMIT ?", (limit,)
            ).fetchall()

    def moved(self, last_id: int) -> None:
        """Items up to `last_id` are in the inbox."""
        with self._lock:
            self.conn.execute("DELETE FROM received WHERE id <= ?", (last_id,))

    def count_pending(self) -> int:
        with self._lock:
            row = self.conn.execute("SELECT count(*) FROM received").fetchone()
        return int(row[0])

    def checkpoint(self) -> None:
        with self._lock:
            self.conn.execute("PRAGMA main.wal_checkpoint(PASSIVE)")


class _Ticket:
    """One item waiting in a commit group, and its outcome."""

    __slots__ = ("done", "error", "new", "values")

    def __init__(self, values: Mapping[str, Any]) -> None:
        self.values = values
        self.done = False
        self.new = False
        self.error: BaseException | None = None

    def outcome(self) -> bool:
        if self.error is not None:
            raise self.error
        return self.new


def _take_lock(database: str) -> int:
    path = lock_path(database)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreError(
            f"another runbook-bot (pid {holder}) is using {database}: one bot per SQLite database"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd
