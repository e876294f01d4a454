"""`POST /pagerduty/webhook`: verify, record, acknowledge; process later, in order.

The request thread does only what must happen before PagerDuty gets its answer: it
bounds the body, checks the signature (or the relay's bearer token), parses the
envelope and commits the delivery to the ``deliveries`` table, deduplicated on the
``X-Webhook-Id`` header and the event id. Then it answers 202. A crash after that
loses nothing: the next start puts interrupted deliveries back in the queue.

A dispatcher thread takes queued deliveries (the store hands out one per incident at a
time, oldest first, so an incident's events apply in arrival order) and runs each on
the bot's worker pool. State changes (triggered, resolved, reopened) older than one
already applied to the same incident are stale and skipped, since PagerDuty does not
promise delivery order.

Answers: 202 accepted or duplicate; 400 not a V3 envelope (with the reason); 401 bad
or missing signature; 413 body too large; 503 the database could not record it (so
PagerDuty retries).
"""

from __future__ import annotations

import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from bot import metrics
from bot.catalog.model import Catalog
from bot.config import Config
from bot.engine import Engine, EngineListener, Incident
from bot.pagerduty.api import first_alert_details, rest_client
from bot.pagerduty.webhook import (
    INCIDENT_ACKNOWLEDGED,
    INCIDENT_REASSIGNED,
    INCIDENT_REOPENED,
    INCIDENT_RESOLVED,
    INCIDENT_TRIGGERED,
    MAX_ID_CHARS,
    STATE_EVENT_TYPES,
    PayloadError,
    WebhookEvent,
    parse_event,
    verify_signature,
)
from bot.pagerduty.writeback import PagerDutyWriteBack
from bot.store import Store

log = logging.getLogger(__name__)

SOURCE = "pagerduty"
MAX_BODY_BYTES = 256 * 1024  # PagerDuty's V3 payloads are a few kB
MAX_ATTEMPTS = 3  # a delivery whose processing raised is retried this many times in all
POLL_SECONDS = 1.0
DETAILS_SLEEP_TIMER = 0.5  # back-off before the one retry of reading alert details

# Texts posted in the incident's Slack thread.
NOTE_ACKNOWLEDGED = "Acknowledged in PagerDuty{by}."
NOTE_REASSIGNED = "Reassigned in PagerDuty to {who}{by}."
UNTITLED = "PagerDuty incident {id}"


class Pool(Protocol):
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class App(Protocol):
    """What the intake needs of `bot.server.BotApp`."""

    @property
    def catalog(self) -> Catalog: ...

    @property
    def engine(self) -> Engine: ...

    @property
    def store(self) -> Store: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def listeners(self) -> list[EngineListener]: ...


class PagerDutyIntake:
    def __init__(self, config: Config, app: App) -> None:
        self.config = config
        self.app = app
        self.secrets = [
            s.strip() for s in config.pagerduty_webhook_secret.reveal().split(",") if s.strip()
        ]
        self.token = config.pagerduty_webhook_token.reveal()
        if not self.secrets and not self.token:
            log.warning(
                "neither PAGERDUTY_WEBHOOK_SECRET nor PAGERDUTY_WEBHOOK_TOKEN is set: "
                "every PagerDuty webhook will be refused with 401"
            )
        # Reading alert details sits on the way to the first Slack post: few retries.
        self.api = (
            rest_client(config, retries=1, timeout=5, sleep_timer=DETAILS_SLEEP_TIMER)
            if config.pagerduty_api_token
            else None
        )
        self.writeback = (
            PagerDutyWriteBack(config, app.catalog) if config.pagerduty_writeback else None
        )
        if self.writeback is not None:
            app.listeners.append(self.writeback)
            # The engine keeps its own copy of the list it was built with.
            if self.writeback not in app.engine.listeners:
                app.engine.listeners.append(self.writeback)
        self._capacity = max(1, config.workers)  # deliveries processed at once
        self._slots = threading.BoundedSemaphore(self._capacity)
        self._busy: set[str] = set()
        self._busy_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._dispatcher: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        requeued = self.app.store.requeue_interrupted_deliveries(SOURCE)
        if requeued:
            log.info("requeued %d PagerDuty deliveries interrupted by the last stop", requeued)
        if self.writeback is not None:
            self.writeback.start()
        self._dispatcher = threading.Thread(
            target=self._dispatch_loop, name="pagerduty-intake", daemon=True
        )
        self._dispatcher.start()

    def stop(self) -> None:
        """Stop taking deliveries off the queue; queued ones wait for the next start.

        Deliveries in flight get the shutdown grace period to finish, so the write-backs
        they queue are sent before the write-back lanes stop.
        """
        self._stopping.set()
        self._wake.set()
        if self._dispatcher is not None:
            self._dispatcher.join(5.0)
        deadline = time.monotonic() + self.config.shutdown_grace
        idle = all(
            self._slots.acquire(timeout=max(0.0, deadline - time.monotonic()))
            for _ in range(self._capacity)
        )
        if not idle:
            log.warning("PagerDuty deliveries still running at the end of the grace period")
        if self.writeback is not None:
            self.writeback.stop()
        if idle and self.api is not None:
            self.api.close()

    # --- HTTP ------------------------------------------------------------------------------

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = environ.get("CONTENT_LENGTH") or ""
        if length and not length.isdigit():
            return self._reject(start_response, "400 Bad Request", "invalid Content-Length")
        if length and int(length) > MAX_BODY_BYTES:
            return self._reject(start_response, "413 Content Too Large", _too_large())
        body = _read(environ.get("wsgi.input"), int(length) if length else None)
        if len(body) > MAX_BODY_BYTES:
            return self._reject(start_response, "413 Content Too Large", _too_large())
        if not self._authentic(body, environ):
            return self._reject(
                start_response, "401 Unauthorized", "missing or invalid X-PagerDuty-Signature"
            )
        try:
            event = parse_event(body)
        except PayloadError as exc:
            return self._reject(start_response, "400 Bad Request", exc.reason)
        delivery_id = environ.get("HTTP_X_WEBHOOK_ID") or event.id
        if len(delivery_id) > MAX_ID_CHARS:
            return self._reject(start_response, "400 Bad Request", "X-Webhook-Id is too long")
        try:
            new = self.app.store.enqueue_delivery(
                source=SOURCE,
                delivery_id=delivery_id,
                event_id=event.id,
                event_type=event.event_type,
                incident_id=event.incident_id,
                payload=body.decode("utf-8"),
                catalog_commit=self.app.engine.catalog.version,
            )
        except Exception:
            log.exception("could not record PagerDuty delivery %s", delivery_id)
            return _json(
                start_response, "503 Service Unavailable", {"error": "could not record it; retry"}
            )
        metrics.webhook_deliveries.labels(SOURCE, "accepted" if new else "duplicate").inc()
        if new:
            self._wake.set()
        return _json(
            start_response,
            "202 Accepted",
            {"status": "accepted" if new else "duplicate", "event_id": event.id},
        )

    def _authentic(self, body: bytes, environ: dict[str, Any]) -> bool:
        signature = environ.get("HTTP_X_PAGERDUTY_SIGNATURE") or ""
        if signature and self.secrets and verify_signature(body, signature, self.secrets):
            return True
        scheme, _, credential = (environ.get("HTTP_AUTHORIZATION") or "").partition(" ")
        return bool(
            self.token
            and scheme.lower() == "bearer"
            and hmac.compare_digest(
                credential.strip().encode("utf-8", "replace"), self.token.encode("utf-8")
            )
        )

    def _reject(self, start_response: Callable[..., Any], status: str, reason: str) -> list[bytes]:
        metrics.webhook_deliveries.labels(SOURCE, "rejected").inc()
        return _json(start_response, status, {"error": reason})

    # --- the queue -------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if not self._slots.acquire(timeout=POLL_SECONDS):
                continue
            try:
                with self._busy_lock:
                    busy = set(self._busy)
                delivery = self.app.store.claim_next_delivery(SOURCE, busy)
            except Exception:
                log.exception("could not take a PagerDuty delivery off the queue")
                delivery = None
            if delivery is None:
                self._slots.release()
                self._wake.wait(POLL_SECONDS)
                continue
            with self._busy_lock:
                self._busy.add(delivery["incident_id"])
            if self.app.pool.submit(self._process, delivery) is None:
                self._requeue(delivery, "the worker pool was full")
                self._finished(delivery)
                self._stopping.wait(POLL_SECONDS)

    def _process(self, delivery: dict[str, Any]) -> None:
        try:
            status, detail = self._apply(parse_event(delivery["payload"].encode("utf-8")))
            self.app.store.finish_delivery(delivery["id"], status, detail)
        except Exception as exc:
            log.exception("processing PagerDuty delivery %s failed", delivery["id"])
            reason = f"{type(exc).__name__}: {exc}"[:500]
            if delivery["attempts"] + 1 < MAX_ATTEMPTS:
                self._requeue(delivery, reason)
            else:
                self.app.store.finish_delivery(delivery["id"], "failed", reason)
        finally:
            self._finished(delivery)

    def _requeue(self, delivery: dict[str, Any], reason: str) -> None:
        self.app.store.execute(
            "UPDATE deliveries SET status = 'queued', error = ? "
            "WHERE id = ? AND status = 'processing'",
            (reason, delivery["id"]),
        )

    def _finished(self, delivery: dict[str, Any]) -> None:
        with self._busy_lock:
            self._busy.discard(delivery["incident_id"])
        self._slots.release()
        self._wake.set()

    # --- what each event does --------------------------------------------------------------

    def _apply(self, event: WebhookEvent) -> tuple[str, str]:
        """Act on one event; returns the delivery's final status and a note on it."""
        if not event.handled:
            return "ignored", f"event type {event.event_type} is not acted on"
        if self._stale(event):
            return "ignored", "stale: a later change of this incident was already applied"
        engine = self.app.engine
        incident_id = event.incident_id
        by = f" by {_name(event.agent)}" if event.agent else ""
        if event.event_type == INCIDENT_TRIGGERED:
            if self.app.store.get_incident(incident_id) is not None:
                return "done", "incident already open"
            engine.open_incident(self._incident(event))
            return "done", ""
        if event.event_type == INCIDENT_ACKNOWLEDGED:
            engine.note(incident_id, NOTE_ACKNOWLEDGED.format(by=by))
            return "done", ""
        if event.event_type == INCIDENT_REASSIGNED:
            who = ", ".join(_name(a) for a in event.assignees) or "someone else"
            engine.note(incident_id, NOTE_REASSIGNED.format(who=who, by=by))
            return "done", ""
        if event.event_type == INCIDENT_RESOLVED:
            outcome = engine.resolve_incident(incident_id, actor=SOURCE)
        else:
            assert event.event_type == INCIDENT_REOPENED
            outcome = engine.reopen_incident(incident_id, actor=SOURCE)
        return "done", "" if outcome.ok else outcome.message

    def _incident(self, event: WebhookEvent) -> Incident:
        details = dict(event.details)
        if not details and self.api is not None:
            try:
                details = first_alert_details(self.api, event.incident_id)
            except Exception as exc:  # details help matching; the incident goes on without
                log.warning(
                    "could not read the alert details of incident %s: %s", event.incident_id, exc
                )
        return Incident(
            id=event.incident_id,
            title=event.title or UNTITLED.format(id=event.incident_id),
            service=event.service,
            service_id=event.service_id,
            urgency=event.urgency,
            priority=event.priority,
            details=details,
            link=event.link,
        )

    def _stale(self, event: WebhookEvent) -> bool:
        """A state change older than one already applied to the incident."""
        when = event.occurred
        if event.event_type not in STATE_EVENT_TYPES or when is None:
            return False
        marks = ", ".join("?" for _ in STATE_EVENT_TYPES)
        for row in self.app.store.query(
            f"SELECT payload FROM deliveries WHERE source = ? AND incident_id = ? "
            f"AND status = 'done' AND event_type IN ({marks})",
            (SOURCE, event.incident_id, *sorted(STATE_EVENT_TYPES)),
        ):
            try:
                applied = parse_event(row["payload"].encode("utf-8")).occurred
            except PayloadError:
                continue
            if applied is not None and applied > when:
                return True
        return False


def _read(stream: Any, length: int | None) -> bytes:
    """At most MAX_BODY_BYTES + 1 bytes: enough to tell a body is too large."""
    if stream is None:
        return b""
    limit = MAX_BODY_BYTES + 1 if length is None else min(length, MAX_BODY_BYTES + 1)
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = stream.read(min(65536, limit - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _name(name: str) -> str:
    """A PagerDuty user's name for a thread note: no Slack markup (`<!channel>`, links)."""
    return name.replace("<", "").replace(">", "")[:100]


def _too_large() -> str:
    return f"the body is larger than {MAX_BODY_BYTES} bytes"


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
