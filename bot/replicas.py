"""Replicas sharing one PostgreSQL database: who is alive, and who does what.

Every replica serves every route (a PagerDuty delivery, a Slack event or a runner's poll
may reach any of them) and records what it receives in the shared inbox, where unique
keys, not memory, make a duplicate or a retry landing elsewhere change nothing. Any
replica may apply any inbox item: writers commit one at a time, and an item is applied
only while it is still queued and the oldest of its incident (`Unit.finish_item`), so a
replica that is slow, cut off or mistaken about its share can never apply an item twice
or out of turn; it only rolls back an attempt. On top of that:

* **Shares.** A replica applies the items of the incidents it is responsible for:
  rendezvous hashing of the incident id over the replicas alive (seen within
  `DEAD_AFTER` seconds). When one dies, its incidents pass to the others at their next
  heartbeat after that; one joining takes a share. Nothing is handed over: the items are
  in the database.
* **Singletons**, each under a lease in the ``leases`` table, renewed every
  `BEAT_SECONDS` for `LEASE_SECONDS`:
    ``outbox``  the one sender of Slack and PagerDuty effects: each channel's posts stay
                in order and paced by one budget, across replicas;
    ``timers``  approval deadlines, bot.guard steps that never reported, and the steps
                of replicas that died (`BotApp.take_over_steps`).
  A lease whose holder stops renewing it lapses, and a survivor takes it at its next
  heartbeat: within `LEASE_SECONDS` + `BEAT_SECONDS`. A holder acts on a lease only
  while it is sure of it (`MARGIN` before it could lapse), so a replica cut off from the
  database stops sending before another may start. Each change of holder increases the
  lease's fence. A replica that stops cleanly gives its leases up at once.

Times compared across replicas are the database server's. A commit that queues inbox
items or effects notifies (``pg_notify``, from a trigger), and each replica listens
(`Wakeups`): an item recorded by one replica is applied by another, and an effect
committed anywhere is sent by the outbox's holder, without waiting for a poll.
"""

from __future__ import annotations

import hashlib
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bot import metrics
from bot.errors import ConfigError
from bot.store import Beat, Store
from bot.store.backend import unreachable

log = logging.getLogger(__name__)

BEAT_SECONDS = 1.0
LEASE_SECONDS = 5.0
DEAD_AFTER = 5.0  # a replica not seen for this long is dead: its share passes on
MARGIN = 1.0  # a holder stops acting this long before its lease could lapse
LEASES = ("outbox", "timers")


def replica_name(configured: str, port: int) -> str:
    """This replica's name: RUNBOOK_REPLICA_ID, else host name and port; only letters,
    digits, ``.``, ``_`` and ``-`` (it names files and log lines)."""
    name = configured or f"{socket.gethostname()}-{port}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", name)[:100]


def responsible(incident_id: str, alive: tuple[str, ...]) -> str:
    """The replica responsible for an incident among `alive` (rendezvous hashing: when
    a replica dies, only its incidents move)."""
    return max(
        alive,
        key=lambda replica: hashlib.blake2b(
            f"{replica}\0{incident_id}".encode(), digest_size=8
        ).digest(),
    )


class Replicas:
    """This process as one replica: its heartbeat, its leases, its share of incidents."""

    def __init__(
        self,
        store: Store,
        replica: str,
        *,
        on_lease: Callable[[str, bool], None] = lambda name, held: None,
        beat_seconds: float = BEAT_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
        dead_after: float = DEAD_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.id = replica
        self.holder = f"{replica}#{secrets.token_hex(4)}"  # this process, as this replica
        self.host = socket.gethostname()
        self.on_lease = on_lease
        self.beat_seconds = beat_seconds
        self.lease_seconds = lease_seconds
        self.dead_after = dead_after
        self.clock = clock
        self._lock = threading.Lock()
        self._sure_until: dict[str, float] = {}  # lease -> (clock) until when it is ours
        self._alive: tuple[str, ...] = (replica,)
        self._seen = float("-inf")  # (clock) the last heartbeat that reached the database
        self._conn: Any = None  # the heartbeat's own connection (PostgreSQL)
        self.refused = ""  # why the last heartbeat was refused (another process, same name)

    def join(self) -> None:
        """The first heartbeat. Another process seen lately under this name may be this
        replica's previous life, killed a moment ago: its row is waited for until it
        counts as dead; one still beating after that raises `ConfigError` (two processes
        must not serve as one replica)."""
        deadline = self.clock() + self.dead_after + self.beat_seconds
        while (beat := self._beat()).refused and self.clock() < deadline:
            time.sleep(self.beat_seconds / 4)
        if beat.refused:
            raise ConfigError(f"RUNBOOK_REPLICA_ID: {beat.refused}; give each replica its own name")

    def beat(self) -> None:
        """One heartbeat (the loop calls it every `beat_seconds`)."""
        try:
            beat = self._beat()
        except Exception as exc:  # the database is away: the leases run out on their own
            log.warning("replica %s: heartbeat failed: %s", self.id, exc)
            self._forget_lapsed()
            return
        self.refused = beat.refused
        if beat.refused:
            log.error("replica %s: %s; this process stops sharing work", self.id, beat.refused)
            self._forget_lapsed(everything=True)

    def _beat(self) -> Beat:
        asked = self.clock()
        beat = self.store.beat(
            self.id,
            self.holder,
            host=self.host,
            leases=LEASES,
            ttl=self.lease_seconds,
            dead_after=self.dead_after,
            conn=self._connection(),
        )
        if beat.refused:
            return beat
        changes: list[tuple[str, bool]] = []
        with self._lock:
            self._seen = asked
            self._alive = beat.alive or (self.id,)
            for name in LEASES:
                had = self._sure_until.get(name, 0.0) > asked
                if name in beat.held:
                    self._sure_until[name] = asked + self.lease_seconds - MARGIN
                    if not had:
                        changes.append((name, True))
                elif had:
                    self._sure_until.pop(name, None)
                    changes.append((name, False))
        metrics.replicas_alive.set(len(beat.alive))
        for name, held in changes:
            self._changed(name, held, beat.held.get(name))
        return beat

    def _connection(self) -> Any:
        """The heartbeat's own connection (PostgreSQL), made again after a lost one: the
        heartbeat never waits behind this process's work on the store."""
        if not self.store.postgres:
            return None
        import psycopg

        if self._conn is not None and not self._conn.closed and not self._conn.broken:
            return self._conn
        if self._conn is not None:
            self._conn.close()
        self._conn = None
        try:
            self._conn = psycopg.connect(self.store.url, autocommit=True, connect_timeout=3)
        except psycopg.Error as exc:
            raise unreachable(self.store.url, exc) from None
        return self._conn

    def _forget_lapsed(self, everything: bool = False, given_up: bool = False) -> None:
        now = self.clock()
        with self._lock:
            lapsed = [
                name for name, until in self._sure_until.items() if everything or until <= now
            ]
            for name in lapsed:
                del self._sure_until[name]
            if everything:
                self._alive = ()
        for name in lapsed:
            self._changed(name, False, None, given_up)

    def _changed(self, name: str, held: bool, fence: int | None, given_up: bool = False) -> None:
        metrics.replica_leases.labels(name).set(1 if held else 0)
        if held:
            metrics.lease_takeovers.labels(name).inc()
            log.info("replica %s now holds the %s lease (fence %s)", self.id, name, fence)
        elif given_up:
            log.info("replica %s gives up the %s lease", self.id, name)
        else:
            log.warning("replica %s no longer holds the %s lease", self.id, name)
        try:
            self.on_lease(name, held)
        except Exception:
            log.exception("reacting to the %s lease failed", name)

    def holds(self, lease: str) -> bool:
        """Is this replica sure to hold `lease` now?"""
        with self._lock:
            return self._sure_until.get(lease, 0.0) > self.clock()

    def mine(self, incident_id: str) -> bool:
        """Is this replica responsible for the incident's items?"""
        with self._lock:
            alive = self._alive
        return bool(alive) and responsible(incident_id, alive) == self.id

    def alone(self) -> bool:
        """Was this replica the only one alive at its last heartbeat?"""
        with self._lock:
            return self._alive == (self.id,)

    def dead(self, replica: str) -> bool:
        """Is `replica` known to be dead (this one's own view being fresh)?"""
        with self._lock:
            fresh = self.clock() - self._seen < self.dead_after
            return fresh and replica != self.id and replica not in self._alive

    def run(self, stopping: threading.Event) -> None:
        while not stopping.wait(self.beat_seconds):
            self.beat()

    def leave(self) -> None:
        """Stop cleanly: give up the leases and the share now, so survivors take over at
        their next heartbeat rather than when the leases lapse."""
        self._forget_lapsed(everything=True, given_up=True)
        try:
            self.store.leave(self.id, self.holder)
        except Exception as exc:
            log.warning("replica %s could not give up its leases: %s", self.id, exc)
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class Wakeups:
    """LISTEN on the channels the database notifies when inbox items or effects are
    queued, and call each channel's callback (``runbook_inbox``, ``runbook_outbox``).

    On its own connection, taken again after a lost one; every callback is called after
    each (re)connection, for what was queued while nobody listened.
    """

    def __init__(self, url: str, callbacks: Mapping[str, Callable[[], None]]) -> None:
        self.url = url
        self.callbacks = dict(callbacks)

    def run(self, stopping: threading.Event) -> None:
        import psycopg

        while not stopping.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
                    for channel in self.callbacks:
                        conn.execute(f"LISTEN {channel}")
                    for callback in self.callbacks.values():
                        callback()
                    while not stopping.is_set():
                        for note in conn.notifies(timeout=1.0):
                            self.callbacks[note.channel]()
            except psycopg.Error as exc:
                log.warning("listening for other replicas' commits failed: %s", exc)
                stopping.wait(BEAT_SECONDS)
