"""`POST /pagerduty/webhook`: verify, record in the inbox, acknowledge.

The request thread does only what must happen before PagerDuty gets its answer: it
bounds the body, checks the signature (or the relay's bearer token), parses the
envelope once and puts the event in the inbox, deduplicated on the event id and the
``X-Webhook-Id`` header by unique keys. Then it answers 202. A crash after that loses
nothing: the item is in the database and is applied when the bot is back.

The inbox applies an incident's items in the order they were received, so a resolve
acknowledged before a ✅ always wins. PagerDuty does not promise delivery order: state
changes (triggered, resolved, reopened) older than one already received for the same
incident are skipped as stale by the engine.

Answers: 202 accepted or duplicate; 400 not a V3 envelope (with the reason); 401 bad
or missing signature; 413 body too large; 503 the database could not record it (so
PagerDuty retries: never a 202 for something not stored).
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pagerduty

from bot import metrics
from bot.config import Config
from bot.errors import RunbookBotError
from bot.pagerduty.api import first_alert_details, no_answer, rest_client
from bot.pagerduty.webhook import (
    MAX_ID_CHARS,
    PayloadError,
    event_payload,
    parse_event,
    verify_signature,
)

log = logging.getLogger(__name__)

SOURCE = "pagerduty"
MAX_BODY_BYTES = 256 * 1024  # PagerDuty's V3 payloads are a few kB
# Reading alert details holds up the incident's first Slack post: one retry of a 5xx
# after DETAILS_SLEEP_TIMER * 2 seconds, no retry of a request PagerDuty did not answer.
DETAILS_TIMEOUT = 3.0
DETAILS_SLEEP_TIMER = 0.5
# After PagerDuty did not answer, incidents open without details for this long instead
# of each waiting for a timeout (an outage would otherwise slow every new incident).
DETAILS_PAUSE = 30.0

Put = Callable[..., bool]


class DetailsUnavailable(RunbookBotError):
    """Alert details were not read: PagerDuty did not answer a moment ago."""


def count_delivery(outcome: str) -> None:
    metrics.webhook_deliveries.labels(SOURCE, outcome).inc()


class PagerDutyIntake:
    def __init__(
        self, config: Config, put: Put, *, counted: Callable[[str], None] = count_delivery
    ) -> None:
        """`put` records an item (Inbox.receive); `counted` is told each delivery's
        outcome: accepted, duplicate or rejected (the intake front passes it on to the
        bot, whose /metrics shows it)."""
        self.config = config
        self.put = put
        self.counted = counted
        self.secrets = [
            s.strip() for s in config.pagerduty_webhook_secret.reveal().split(",") if s.strip()
        ]
        self.token = config.pagerduty_webhook_token.reveal()
        if not self.secrets and not self.token:
            log.warning(
                "neither PAGERDUTY_WEBHOOK_SECRET nor PAGERDUTY_WEBHOOK_TOKEN is set: "
                "every PagerDuty webhook will be refused with 401"
            )
        self.api = (
            rest_client(config, retries=1, timeout=DETAILS_TIMEOUT, sleep_timer=DETAILS_SLEEP_TIMER)
            if config.pagerduty_api_token
            else None
        )
        self._details_paused_until = 0.0  # monotonic

    def close(self) -> None:
        if self.api is not None:
            self.api.close()

    def details(self, incident_id: str) -> Mapping[str, Any]:
        """The first alert's custom details (for matching and templating), or {}."""
        if self.api is None:
            return {}
        if time.monotonic() < self._details_paused_until:
            raise DetailsUnavailable(
                "PagerDuty did not answer a moment ago; opening the incident without them"
            )
        try:
            return first_alert_details(self.api, incident_id)
        except pagerduty.Error as exc:
            if no_answer(exc):
                self._details_paused_until = time.monotonic() + DETAILS_PAUSE
            raise

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
            new = self.put(
                source=SOURCE,
                key=f"{SOURCE}:event:{event.id}",
                alt_key=f"{SOURCE}:delivery:{delivery_id}",
                incident_id=event.incident_id,
                kind=event.event_type,
                payload=event_payload(event),
            )
        except Exception as exc:
            log.error(
                "could not record PagerDuty delivery %s: %s (answered 503; PagerDuty retries)",
                delivery_id, exc,
            )  # fmt: skip
            return _json(
                start_response, "503 Service Unavailable", {"error": "could not record it; retry"}
            )
        self.counted("accepted" if new else "duplicate")
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
        self.counted("rejected")
        return _json(start_response, status, {"error": reason})


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


def _too_large() -> str:
    return f"the body is larger than {MAX_BODY_BYTES} bytes"


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
