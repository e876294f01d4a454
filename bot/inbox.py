"""The inbox's consumer: items applied per incident, in the order they were received.

Intake (PagerDuty deliveries, Slack reactions, approval deadlines, command results)
puts items in the ``inbox`` table and wakes the dispatcher; nothing else queues work in
memory. The dispatcher hands each incident with queued items to one worker at a time,
and that worker applies the incident's items oldest first until none is left, so
different incidents proceed in parallel and one incident's items never overtake each
other. Queues only wake; the durable row is the truth: a restart simply finds the
queued items again.

An item whose application raises is retried (after a pause for its incident, so later
items wait rather than overtake it) and, after ``max_attempts``, kept as ``failed`` for
a human. An unusable database (a full disk, an I/O error) is not the item's fault: no
attempt is counted and the incident is retried until the database recovers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bot import metrics
from bot.states import InboxStatus
from bot.store import InboxItem, Store

log = logging.getLogger(__name__)

RETRY_PAUSE = 1.0  # seconds an incident waits after an item failed to apply
# A reaction on a message the bot does not know waits this long for it to turn out to be
# one of the bot's (posted just before a crash); then it is about someone else's message.
PARKED_SECONDS = 3600.0
UNPARK_SECONDS = 1.0  # how often parked items are checked against recorded messages
MAX_PAUSE = 30.0


BACKGROUND_NICE = 10


def background() -> None:
    """Called by a thread of the bot's own work (applying items, delivering the outbox):
    when the CPUs are busy, the kernel runs the intake front, which answers PagerDuty,
    first (Linux: a thread's nice value is its own)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BACKGROUND_NICE)


def database_unusable(exc: BaseException) -> bool:
    """A fault of the database rather than of the item (retried without counting)."""
    return isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError) and not isinstance(
        exc, sqlite3.IntegrityError
    )


class Inbox:
    def __init__(
        self,
        store: Store,
        apply: Callable[[InboxItem], None],
        *,
        workers: int = 4,
        max_attempts: int = 3,
        catalog_commit: Callable[[], str] = lambda: "",
        clock: Callable[[], float] = time.monotonic,
        mine: Callable[[str], bool] | None = None,
    ) -> None:
        self.store = store
        # Replicas: the incidents this one applies items of (`bot.replicas`); None: all.
        self.mine = mine
        self.apply = apply
        self.workers = max(1, workers)
        self.max_attempts = max_attempts
        self.catalog_commit = catalog_commit
        self.clock = clock
        self._busy: set[str] = set()
        self._paused: dict[str, float] = {}  # incident -> not before (monotonic)
        self._failures: dict[str, int] = {}
        self._lock = threading.Condition()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool: ThreadPoolExecutor | None = None
        self._dispatcher: threading.Thread | None = None

    # --- intake ----------------------------------------------------------------------------

    def put(
        self,
        *,
        source: str,
        key: str,
        incident_id: str,
        kind: str,
        payload: Mapping[str, Any],
        alt_key: str | None = None,
        received_at: float | None = None,
        waiting_for: tuple[str, str] | None = None,
        waiting: bool = False,
    ) -> bool:
        """Record an item durably (deduplicated); True when new. Raises when the database
        cannot record it: the caller must then not acknowledge it.

        `waiting_for`: (channel, ts) of a Slack message the item is about whose step is
        not known yet: the item is parked until that message's post is recorded (then it
        joins its incident, keeping its place in receipt order), or until it is too old.
        `waiting`: a sender waits for the answer (see `receive`).
        """
        new = self.store.inbox_put(
            source=source,
            key=key,
            alt_key=alt_key,
            incident_id=incident_id,
            kind=kind,
            payload=payload,
            received_at=received_at,
            catalog_commit=self.catalog_commit(),
            status=InboxStatus.QUEUED if waiting_for is None else InboxStatus.PARKED,
            waiting=waiting,
        )
        if new:
            log.info(
                "incident %s: %s received from %s",
                incident_id or "(not known yet)", kind, source,
                extra={"incident": incident_id, "kind": str(kind), "source": source},
            )  # fmt: skip
            self.wake()  # to move it into the inbox (a parked one waits there)
        return new

    def receive(self, **item: Any) -> bool:
        """`put` for a request whose sender waits for the answer (a PagerDuty delivery, a
        Slack event): recorded without waiting for the bot's work (the intake log)."""
        return self.put(**item, waiting=True)

    def wake(self) -> None:
        self._wake.set()

    # --- threads ---------------------------------------------------------------------------

    def start(self) -> None:
        self._stopping.clear()
        self._pool = ThreadPoolExecutor(
            max_workers=self.workers, thread_name_prefix="inbox", initializer=background
        )
        self._dispatcher = threading.Thread(target=self._dispatch, name="inbox", daemon=True)
        self._dispatcher.start()
        self.wake()

    def stop(self, timeout: float = 10.0) -> bool:
        """Take no new item; wait up to `timeout` for items being applied. True if idle."""
        self._stopping.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(timeout)
        with self._lock:
            idle = self._lock.wait_for(lambda: not self._busy, timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=idle)
        return idle

    def _dispatch(self) -> None:
        next_sweep = 0.0
        while not self._stopping.is_set():
            self._wake.clear()
            wait = 1.0
            try:
                self.store.inbox_receive(self.catalog_commit())
                if self.clock() >= next_sweep:
                    self.store.inbox_unpark()
                    self.store.inbox_expire_parked(self.store.clock() - PARKED_SECONDS)
                    next_sweep = self.clock() + UNPARK_SECONDS
                wait = min(self._dispatch_once(), max(0.0, next_sweep - self.clock()))
            except Exception as exc:
                level = logging.WARNING if database_unusable(exc) else logging.ERROR
                log.log(level, "could not read the inbox: %s", exc)
            self._wake.wait(wait)

    def _dispatch_once(self) -> float:
        with self._lock:
            free = self.workers - len(self._busy)
            now = self.clock()
            for incident, until in list(self._paused.items()):
                if until <= now:
                    del self._paused[incident]
            skip = self._busy | set(self._paused)
            next_pause = min(self._paused.values(), default=now + 1.0) - now
        if free <= 0:
            return 1.0
        assert self._pool is not None
        for item in self.store.inbox_ready(free, exclude=skip, accept=self.mine):
            with self._lock:
                if item.incident_id in self._busy:
                    continue
                self._busy.add(item.incident_id)
            self._pool.submit(self._work, item.incident_id, item)
        return max(0.01, min(1.0, next_pause))

    def _work(self, incident_id: str, first: InboxItem | None) -> None:
        try:
            item = first
            while item is not None and not self._stopping.is_set():
                if not self._apply(item):
                    return
                if self.mine is not None and not self.mine(incident_id):
                    return  # it passed to another replica
                item = self.store.inbox_next(incident_id)
        except Exception as exc:
            log.warning("inbox of incident %s: %s", incident_id, exc)
            self._pause(incident_id)
        finally:
            with self._lock:
                self._busy.discard(incident_id)
                self._lock.notify_all()
            self._wake.set()

    def _apply(self, item: InboxItem) -> bool:
        """Apply one item; False when the incident must pause (the item stays queued)."""
        try:
            self.apply(item)
        except Exception as exc:
            if database_unusable(exc):
                log.error(
                    "could not apply %s of incident %s: the database is unusable (%s); "
                    "retrying when it recovers",
                    item.kind, item.incident_id, exc,
                )  # fmt: skip
                self._pause(item.incident_id)
                return False
            give_up = item.attempts + 1 >= self.max_attempts
            log.exception(
                "applying %s of incident %s failed (attempt %d of %d)",
                item.kind, item.incident_id, item.attempts + 1, self.max_attempts,
            )  # fmt: skip
            detail = f"{type(exc).__name__}: {exc}"
            try:
                self.store.inbox_attempt_failed(item, detail, give_up=give_up)
            except Exception as inner:
                log.error("could not record the failed attempt: %s", inner)
            metrics.inbox_failures.labels(item.source).inc()
            if not give_up:
                self._pause(item.incident_id)
                return False
            return True
        with self._lock:
            self._failures.pop(item.incident_id, None)
        return True

    def _pause(self, incident_id: str) -> None:
        with self._lock:
            failures = self._failures[incident_id] = self._failures.get(incident_id, 0) + 1
            self._paused[incident_id] = self.clock() + min(
                MAX_PAUSE, RETRY_PAUSE * 2 ** (failures - 1)
            )

    # --- in the caller's thread ------------------------------------------------------------

    def drain(self, limit: int = 100_000) -> int:
        """Apply every queued item here and now (simulate, tests); returns how many."""
        applied = 0
        while applied < limit:
            self.store.inbox_receive(self.catalog_commit())
            ready = self.store.inbox_ready(1)
            if not ready:
                return applied
            item = ready[0]
            try:
                self.apply(item)
            except Exception as exc:
                if database_unusable(exc):
                    raise
                log.exception("applying %s of incident %s failed", item.kind, item.incident_id)
                self.store.inbox_attempt_failed(
                    item,
                    f"{type(exc).__name__}: {exc}",
                    give_up=item.attempts + 1 >= self.max_attempts,
                )
            applied += 1
        return applied

    def idle(self) -> bool:
        with self._lock:
            busy = bool(self._busy)
        return not busy and self.store.count_queued() == 0
