"""PagerDuty V3 webhooks as data: signature check and envelope parsing, no I/O.

Everything a sender controls passes through here before anything else looks at it, so
these functions never raise anything but `PayloadError` (with a reason a sender can
act on) and hand the rest of the bot plain, typed values.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bot.errors import RunbookBotError

SIGNATURE_VERSION = "v1="
MAX_ID_CHARS = 200  # PagerDuty ids are short; a longer one is not from PagerDuty

INCIDENT_TRIGGERED = "incident.triggered"
INCIDENT_ACKNOWLEDGED = "incident.acknowledged"
INCIDENT_REASSIGNED = "incident.reassigned"
INCIDENT_RESOLVED = "incident.resolved"
INCIDENT_REOPENED = "incident.reopened"
HANDLED_EVENT_TYPES = frozenset(
    {
        INCIDENT_TRIGGERED,
        INCIDENT_ACKNOWLEDGED,
        INCIDENT_REASSIGNED,
        INCIDENT_RESOLVED,
        INCIDENT_REOPENED,
    }
)
# Events that change whether the incident is open: applied only in occurred_at order.
STATE_EVENT_TYPES = frozenset({INCIDENT_TRIGGERED, INCIDENT_RESOLVED, INCIDENT_REOPENED})


class PayloadError(RunbookBotError):
    """The body is not a V3 webhook envelope; ``reason`` says what is wrong."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class WebhookEvent:
    """One V3 outbound event, reduced to what the bot uses (all strings are safe to show)."""

    id: str
    event_type: str
    resource_type: str
    occurred_at: str
    incident_id: str  # "" when the event is not about an incident (e.g. pagey.ping)
    agent: str = ""  # who did it ("Jane Doe"), when PagerDuty says
    title: str = ""
    status: str = ""
    service: str = ""
    service_id: str = ""
    urgency: str = ""
    priority: str = ""
    link: str = ""
    assignees: tuple[str, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)  # alert details, when carried

    @property
    def handled(self) -> bool:
        return self.event_type in HANDLED_EVENT_TYPES

    @property
    def occurred(self) -> datetime | None:
        """`occurred_at` as an aware datetime, or None when absent or unreadable."""
        try:
            when = datetime.fromisoformat(self.occurred_at)
        except ValueError:
            return None
        return when if when.tzinfo is not None else None


def verify_signature(body: bytes, header: str, secrets: Iterable[str]) -> bool:
    """True when one of the ``v1=`` signatures in `header` is the HMAC-SHA256 of `body`
    under one of `secrets` (several of each during a secret rotation).

    Every pair is compared in constant time, and all pairs are compared, so the time
    taken says nothing about which part matched.
    """
    offered = [
        part.strip()[len(SIGNATURE_VERSION) :].lower().encode("utf-8", "replace")
        for part in header.split(",")
        if part.strip().startswith(SIGNATURE_VERSION)
    ]
    expected = [
        hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest().encode()
        for secret in secrets
        if secret
    ]
    matched = False
    for candidate in offered:
        for digest in expected:
            matched |= hmac.compare_digest(candidate, digest)
    return matched


def sign(body: bytes, secret: str) -> str:
    """The header value PagerDuty sends for `body` signed with `secret`."""
    return SIGNATURE_VERSION + hmac.new(secret.encode("utf-8"), body, hashlib.sha256).hexdigest()


def parse_event(body: bytes) -> WebhookEvent:
    """The event of a V3 webhook body, or `PayloadError` saying why it is not one."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError("the body is not UTF-8 text") from None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        raise PayloadError("the body is not JSON") from None
    if not isinstance(document, dict):
        raise PayloadError("expected a JSON object with an `event` (PagerDuty V3 webhook)")
    event = document.get("event")
    if not isinstance(event, dict):
        raise PayloadError("no `event` object: only PagerDuty V3 webhooks are accepted")
    event_id = _id(event.get("id"), "event.id")
    event_type = _required_text(event.get("event_type"), "event.event_type")
    data = event.get("data")
    if not isinstance(data, dict):
        raise PayloadError("`event.data` must be an object")
    resource_type = _text(event.get("resource_type"))
    incident_id = _incident_id(resource_type, data)
    if event_type in HANDLED_EVENT_TYPES:
        if resource_type != "incident" or data.get("type") != "incident":
            raise PayloadError(
                f"{event_type} needs `event.resource_type` and `event.data.type` 'incident'"
            )
        incident_id = _id(data.get("id"), "event.data.id")
    is_incident = data.get("type") == "incident"
    return WebhookEvent(
        id=event_id,
        event_type=event_type,
        resource_type=resource_type,
        occurred_at=_text(event.get("occurred_at")),
        incident_id=incident_id,
        agent=_summary(event.get("agent")),
        title=_text(data.get("title")) if is_incident else "",
        status=_text(data.get("status")) if is_incident else "",
        service=_summary(data.get("service")) if is_incident else "",
        service_id=_text(_field(data.get("service"), "id")) if is_incident else "",
        urgency=_text(data.get("urgency")) if is_incident else "",
        priority=_summary(data.get("priority")) if is_incident else "",
        link=_text(data.get("html_url")) if is_incident else "",
        assignees=_summaries(data.get("assignees")) if is_incident else (),
        details=_details(data) if is_incident else {},
    )


# Texts posted in the incident's Slack thread for events that only inform.
NOTE_ACKNOWLEDGED = "Acknowledged in PagerDuty{by}."
NOTE_REASSIGNED = "Reassigned in PagerDuty to {who}{by}."
UNTITLED = "PagerDuty incident {id}"


def event_payload(event: WebhookEvent) -> dict[str, Any]:
    """The inbox payload of an event: plain values, parsed once, here at the edge."""
    by = f" by {_name(event.agent)}" if event.agent else ""
    note = ""
    if event.event_type == INCIDENT_ACKNOWLEDGED:
        note = NOTE_ACKNOWLEDGED.format(by=by)
    elif event.event_type == INCIDENT_REASSIGNED:
        who = ", ".join(_name(a) for a in event.assignees) or "someone else"
        note = NOTE_REASSIGNED.format(who=who, by=by)
    return {
        "event_id": event.id,
        "occurred_at": event.occurred_at if event.occurred is not None else "",
        "actor": "pagerduty",
        "title": event.title or UNTITLED.format(id=event.incident_id),
        "service": event.service,
        "service_id": event.service_id,
        "urgency": event.urgency,
        "priority": event.priority,
        "link": event.link,
        "details": dict(event.details),
        "note": note,
    }


def _name(name: str) -> str:
    """A PagerDuty user's name for a thread note: no Slack markup (`<!channel>`, links)."""
    return name.replace("<", "").replace(">", "")[:100]


# --- helpers: sender data in, plain values out ---------------------------------------------


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _required_text(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise PayloadError(f"`{name}` must be a non-empty string")
    return value


def _id(value: Any, name: str) -> str:
    text = _required_text(value, name)
    if len(text) > MAX_ID_CHARS:
        raise PayloadError(f"`{name}` is longer than {MAX_ID_CHARS} characters")
    return text


def _field(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, dict) else None


def _summary(reference: Any) -> str:
    """PagerDuty references carry a human-readable `summary`."""
    return _text(_field(reference, "summary"))


def _summaries(references: Any) -> tuple[str, ...]:
    if not isinstance(references, list):
        return ()
    return tuple(s for s in (_summary(r) for r in references) if s)


def _incident_id(resource_type: str, data: dict[str, Any]) -> str:
    """Incident events carry the incident as `data`; notes and responders refer to it."""
    if resource_type == "incident" and data.get("type") == "incident":
        value = data.get("id")
    else:
        value = _field(data.get("incident"), "id")
    text = _text(value)
    return text if len(text) <= MAX_ID_CHARS else ""


def _details(data: dict[str, Any]) -> dict[str, Any]:
    """Alert details, when a relay or a custom payload carries them (V3 does not)."""
    for candidate in (_field(data.get("body"), "details"), data.get("custom_details")):
        if isinstance(candidate, dict) and candidate:
            return candidate
    return {}
