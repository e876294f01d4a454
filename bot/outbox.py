"""Outbox senders: every effect the engine committed is delivered, in order, paced, once.

Effects sit in the ``outbox`` table in lanes (a Slack channel's thread messages, its
reactions, private notes, one incident's PagerDuty write-back; see ``bot.effects``).
The sender delivers each lane strictly in order, one effect in flight per lane, through
the transport of its target (Slack, the console, PagerDuty), and records what happened:

  * delivered: the row is ``sent`` (with the Slack message's ``ts``). A newer rendering
    of the same message that arrived while it was on its way stays pending as an update;
  * ``Retry`` (429 with ``Retry-After``, 5xx, a timeout, a connection refused): tried
    again later, with back-off, until it succeeds, across restarts and outages. Calls
    that may have reached the other side (a timeout, a 5xx) are marked uncertain, and the
    transport looks before it posts again, so a message is never posted twice;
  * ``Refused`` for good (an invalid message, a channel that does not exist): ``failed``,
    logged and counted; it does not block its lane.

Pacing follows the other side's published limits (``Budgets``): e.g. Slack allows
about one message per second per channel and fifty ``chat.update`` a minute per
workspace. A lane waiting for its budget waits here, in the sender; nothing upstream
(the inbox, a command) ever waits for Slack.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from bot import metrics
from bot.inbox import background
from bot.store import OutboxItem, Store

log = logging.getLogger(__name__)

BACKOFF_FIRST = 1.0
BACKOFF_MAX = 60.0
LOOK_SECONDS = 0.01
_ABOUT_A_MESSAGE = frozenset({"update_step", "react"})


class Retry(Exception):
    """Not delivered this time; try again (after `after` seconds, when the other side
    said how long, e.g. Retry-After). `maybe_sent`: the call may have been applied."""

    def __init__(
        self, reason: str, *, after: float | None = None, maybe_sent: bool = False
    ) -> None:
        super().__init__(reason)
        self.reason = reason
        self.after = after
        self.maybe_sent = maybe_sent


class Refused(Exception):
    """The other side refused this effect for good; retrying cannot help."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Sent:
    ts: str | None = None
    channel: str | None = None


class Transport(Protocol):
    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        """The rate budgets (``Budgets`` names) this delivery spends."""
        ...

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        """Deliver one effect, or raise `Retry` / `Refused`. `maybe_sent`: an earlier
        attempt may have been applied; look before doing it again."""
        ...

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        """Budgets a `Retry` with `after` applies to (e.g. a 429 holds the whole method)."""
        ...


@dataclass
class _Bucket:
    rate: float  # tokens per second
    burst: float
    tokens: float
    at: float
    blocked_until: float = 0.0


@dataclass
class Budgets:
    """Token buckets by name: ``rules`` maps a name, or its prefix before ``:``, to
    (calls per second, burst). Unknown names are not limited."""

    rules: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _bucket(self, name: str, at: float) -> _Bucket | None:
        bucket = self._buckets.get(name)
        if bucket is None:
            rule = self.rules.get(name) or self.rules.get(name.split(":", 1)[0] + ":*")
            if rule is None:
                return None
            rate, burst = rule
            bucket = self._buckets[name] = _Bucket(rate, burst, burst, at)
        return bucket

    def take(self, names: tuple[str, ...], at: float) -> float:
        """Spend one call per name (a name listed twice is two calls) now (0.0), or say
        how long to wait (nothing spent)."""
        with self._lock:
            needs: dict[str, int] = {}
            for name in names:
                needs[name] = needs.get(name, 0) + 1
            spending = [(b, n) for name, n in needs.items() if (b := self._bucket(name, at))]
            wait = 0.0
            for b, n in spending:
                wait = max(wait, b.blocked_until - at)
                if b.rate == float("inf"):
                    continue  # a hold only (no rule): nothing to spend
                b.tokens = min(b.burst, b.tokens + (at - b.at) * b.rate)
                b.at = at
                need = min(float(n), b.burst)
                if b.tokens < need:
                    wait = max(wait, (need - b.tokens) / b.rate if b.rate > 0 else 3600.0)
            if wait > 0:
                return wait
            for b, n in spending:
                if b.rate != float("inf"):
                    b.tokens -= n
            return 0.0

    def hold(self, names: tuple[str, ...], until: float) -> None:
        """Spend nothing from these budgets before `until` (the other side said so), even
        from a budget without a rule (a 429 holds its method when pacing is off too)."""
        with self._lock:
            for name in names:
                bucket = self._bucket(name, until)
                if bucket is None:
                    bucket = self._buckets[name] = _Bucket(float("inf"), 1.0, 1.0, until)
                bucket.blocked_until = max(bucket.blocked_until, until)
                if bucket.rate != float("inf"):
                    bucket.tokens = min(bucket.tokens, 0.0)


class OutboxSender:
    def __init__(
        self,
        store: Store,
        transports: Mapping[str, Transport],
        *,
        budgets: Budgets | None = None,
        workers: int = 4,
        clock: Callable[[], float] = time.time,
        backoff_first: float = BACKOFF_FIRST,
        backoff_max: float = BACKOFF_MAX,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self.store = store
        # Replicas: send only while this replica holds the outbox lease (`bot.replicas`),
        # so one sender keeps each lane in order and paced; None: always.
        self.gate = gate
        self.transports = dict(transports)
        self.budgets = budgets or Budgets()
        self.workers = max(1, workers)
        self.clock = clock
        self.backoff_first = backoff_first
        self.backoff_max = backoff_max
        self._busy: set[str] = set()
        self._paced: dict[str, float] = {}  # lane -> when its budget may allow it
        self._uncertain: set[int] = set()
        self._first_look = True
        self._lock = threading.Condition()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pools: dict[str, ThreadPoolExecutor] = {}  # one per target: a PagerDuty
        # outage never holds Slack posts behind its calls, nor the other way round
        self._thread: threading.Thread | None = None

    def wake(self) -> None:
        self._wake.set()

    def start(self) -> None:
        self._stopping.clear()
        self._pools = {
            target: ThreadPoolExecutor(
                max_workers=self.workers,
                thread_name_prefix=f"outbox-{target}",
                initializer=background,
            )
            for target in self.transports
        }
        self._thread = threading.Thread(target=self._loop, name="outbox", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Send nothing new; wait up to `timeout` for sends under way. True if none is."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._lock:
            idle = self._lock.wait_for(lambda: not self._busy, timeout)
        for pool in self._pools.values():
            pool.shutdown(wait=idle)
        return idle

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until nothing due is pending (tests, shutdown): True if so."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            heads, later = self.store.outbox_heads(self.clock(), 1)
            with self._lock:
                busy = bool(self._busy)
            if not heads and not busy and (later is None or self._stuck_only(later)):
                return True
            self._wake.set()
            time.sleep(0.005)
        return False

    def _stuck_only(self, later: float) -> bool:
        return later - self.clock() > 5.0  # only back-offs far away are left

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            began = time.monotonic()
            try:
                wait = self._send_due()
            except Exception as exc:
                log.warning("could not read the outbox: %s", exc)
                wait = 1.0
            self._wake.wait(max(0.005, min(wait, 1.0)))
            # Look again at most every LOOK_SECONDS, however often effects arrive: each
            # look reads the outbox, and intake must never queue behind a crowd of them.
            self._stopping.wait(max(0.0, began + LOOK_SECONDS - time.monotonic()))

    def _allowed(self) -> bool:
        return self.gate is None or self.gate()

    def _send_due(self) -> float:
        if not self._allowed():
            # When the lease comes (back) to us, the heads may have been on their way from
            # the replica that had it: they are looked for before they are sent again.
            self._first_look = True
            return 1.0
        at = self.clock()
        with self._lock:
            busy = set(self._busy)
        # Lanes waiting for a budget are not read again before it allows them.
        with self._lock:
            self._paced = {lane: t for lane, t in self._paced.items() if t > at}
            paced = set(self._paced)
        heads, later = self.store.outbox_heads(at, 100, exclude=busy | paced)
        if self._first_look:
            # A lane is delivered one effect at a time, so only its head can have been on
            # its way when the last run stopped: those are looked for before re-posting.
            self._uncertain.update(item.id for item in heads)
            self._first_look = False
        wait = (later - at) if later is not None else 1.0
        for item in heads:
            transport = self.transports.get(item.target)
            if transport is None:
                continue
            pause = self._take(item, transport, at)
            if pause > 0:
                wait = min(wait, pause)
                continue
            with self._lock:
                self._busy.add(item.lane)
            self._pools[item.target].submit(self._send, item, transport)
        return wait

    def _take(self, item: OutboxItem, transport: Transport, at: float) -> float:
        """Take the budgets `item` needs; 0, or how long its lane must wait for them."""
        pause = self.budgets.take(transport.budgets(item), at)
        if pause > 0:
            with self._lock:
                self._paced[item.lane] = at + pause
        return pause

    def _send(self, item: OutboxItem, transport: Transport) -> None:
        """Deliver `item`, then the effects queued behind it in its lane while they are
        due and their budgets allow: a lane's backlog drains at the pace of its calls,
        not of the sender's looks."""
        try:
            next_item: OutboxItem | None = item
            while next_item is not None and not self._stopping.is_set() and self._allowed():
                self.deliver(next_item, transport)
                at = self.clock()
                next_item = self.store.outbox_lane_head(item.lane, at)
                if next_item is not None and self._take(next_item, transport, at) > 0:
                    next_item = None
        finally:
            with self._lock:
                self._busy.discard(item.lane)
                self._lock.notify_all()
            self._wake.set()

    def deliver(self, item: OutboxItem, transport: Transport) -> None:
        """Deliver one effect and record the outcome (also used directly by `drain`)."""
        if item.kind in _ABOUT_A_MESSAGE and item.target_ts is None:
            # Heads wait for their message; one only comes here once it failed for good.
            self.store.outbox_failed(item, "its message was never posted")
            return
        # Uncertain: its call may have reached the other side (a timeout, a 5xx) in this
        # process, or in an earlier one (any earlier attempt, or a lane head at start).
        maybe_sent = item.id in self._uncertain or item.attempts > 0
        try:
            sent = transport.deliver(item, maybe_sent=maybe_sent)
        except Retry as retry:
            if retry.maybe_sent:
                self._uncertain.add(item.id)
            delay = retry.after if retry.after is not None else self._backoff(item.attempts)
            if retry.after is not None:
                self.budgets.hold(transport.penalize(item, retry), self.clock() + retry.after)
            # Told to wait (a 429): the call did nothing, so it is not an attempt that may
            # have been applied; anything else counts.
            self.store.outbox_retry(
                item, self.clock() + delay, retry.reason, attempted=retry.after is None
            )
            metrics.outbox_sends.labels(item.target, "retry").inc()
            log.warning(
                "%s %s of incident %s not delivered (%s); retrying in %.1fs",
                item.target, item.kind, item.incident_id, retry.reason, delay,
            )  # fmt: skip
            return
        except Refused as refused:
            self.store.outbox_failed(item, refused.reason)
            metrics.outbox_sends.labels(item.target, "failed").inc()
            log.error(
                "%s refused %s of incident %s for good: %s",
                item.target, item.kind, item.incident_id, refused.reason,
            )  # fmt: skip
            return
        except Exception:
            self._uncertain.add(item.id)
            log.exception("delivering %s of incident %s failed", item.kind, item.incident_id)
            self.store.outbox_retry(
                item, self.clock() + self._backoff(item.attempts), "unexpected error (see the log)"
            )
            metrics.outbox_sends.labels(item.target, "retry").inc()
            return
        self._uncertain.discard(item.id)
        self.store.outbox_sent(item, ts=sent.ts, channel=sent.channel)
        metrics.outbox_sends.labels(item.target, "sent").inc()
        if item.target == "pagerduty":
            log.info(
                "incident %s: write-back %s delivered to PagerDuty", item.incident_id, item.kind,
                extra={"incident": item.incident_id, "kind": item.kind},
            )  # fmt: skip

    def _backoff(self, attempts: int) -> float:
        base = min(self.backoff_max, self.backoff_first * 2.0 ** min(attempts, 16))
        return float(base * random.uniform(0.8, 1.0))

    # --- in the caller's thread ------------------------------------------------------------

    def drain(self, limit: int = 100_000) -> int:
        """Deliver everything due here and now, unpaced (simulate, tests)."""
        sent = 0
        while sent < limit:
            heads, _later = self.store.outbox_heads(self.clock(), 100)
            heads = [h for h in heads if h.target in self.transports]
            if not heads:
                return sent
            for item in heads:
                self.deliver(item, self.transports[item.target])
                sent += 1
        return sent
