"""Stand-in for the PagerDuty REST API v2, served over HTTPS.

The real ``pagerduty.RestApiV2Client`` only accepts ``https://`` base URLs, so this
stand-in speaks TLS with a throwaway self-signed certificate for 127.0.0.1. Point the
client at it either explicitly::

    with FakePagerDuty(incidents={"P1": {"title": "Payments 5xx"}}) as pd:
        client = RestApiV2Client("pd-token", default_from="bot@example.com",
                                 base_url=pd.url, verify=pd.client_ssl_context())

or, as a bot process would be started, through the environment:
``PAGERDUTY_API_URL=pd.url`` and ``SSL_CERT_FILE=pd.ca_file`` (httpx honours it).

Errors use PagerDuty's shape ``{"error": {"message": ..., "code": ...}}``; the messages
are the stand-in's own approximation. Queued faults answer 429 (with ``Retry-After``)
or 5xx without doing anything. Calls that take effect but whose answer is lost: the
base's `lose_answer` (held back until the client gives up, or the connection dropped),
and `fail_after_applying` here (a 5xx from a gateway after PagerDuty stored the note).
Note the client sleeps
``sleep_timer`` (1.5 s) doubling per 429 and ignores ``Retry-After``: lower
``client.sleep_timer`` in tests.
"""

from __future__ import annotations

import copy
import re
import socketserver
import ssl
import sys
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from .base import FakeServer, Reply, Request

Json = dict[str, Any]

STATUSES = ("triggered", "acknowledged", "resolved")


def make_incident(incident_id: str, **fields: Any) -> Json:
    """A realistic incident object; ``fields`` override the defaults."""
    return {
        "id": incident_id,
        "type": "incident",
        "incident_number": 1,
        "title": f"Incident {incident_id}",
        "summary": f"[#1] Incident {incident_id}",
        "status": "triggered",
        "urgency": "high",
        "created_at": "2024-01-01T00:00:00Z",
        "html_url": f"https://fake.pagerduty.test/incidents/{incident_id}",
        "service": {"id": "PSERVICE", "type": "service_reference", "summary": "payments"},
        "escalation_policy": {
            "id": "PPOLICY",
            "type": "escalation_policy_reference",
            "summary": "Payments on-call",
        },
        "assignments": [],
        "escalation_level": 1,
        **fields,
    }


def make_alert(
    alert_id: str,
    incident_id: str,
    *,
    details: Mapping[str, Any] | None = None,
    summary: str = "Alert",
    severity: str = "critical",
    **fields: Any,
) -> Json:
    """A realistic alert; ``details`` are the Events API ``custom_details``."""
    custom = dict(details or {})
    return {
        "id": alert_id,
        "type": "alert",
        "summary": summary,
        "severity": severity,
        "status": "triggered",
        "created_at": "2024-01-01T00:00:00Z",
        "incident": {"id": incident_id, "type": "incident_reference"},
        "body": {
            "type": "alert_body",
            "contexts": [],
            "details": custom,
            "cef_details": {"summary": summary, "severity": severity, "details": custom},
        },
        **fields,
    }


class FakePagerDuty(FakeServer):
    """A PagerDuty account with a few incidents, recording notes and status changes.

    ``token``: if given, the only accepted API key; otherwise any non-empty
    ``Authorization: Token token=...`` (or ``Bearer ...``) is accepted. None -> 401.
    ``incidents``: incident id -> fields over `make_incident` defaults.
    ``alerts``: incident id -> list of alerts (use `make_alert`; id and incident are filled).
    ``escalation_policies``: policy id -> fields over a minimal policy.
    ``require_from``: POST/PUT without a ``From`` header get 400, as with an account key.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        incidents: Mapping[str, Mapping[str, Any]] | None = None,
        alerts: Mapping[str, list[Mapping[str, Any]]] | None = None,
        escalation_policies: Mapping[str, Mapping[str, Any]] | None = None,
        require_from: bool = True,
        latency: float = 0.0,
        tls: bool = True,
    ) -> None:
        super().__init__(latency=latency, tls=tls)
        self._httpd.handle_error = self._handle_error  # type: ignore[method-assign]
        self.token = token
        self.require_from = require_from
        self._incidents: dict[str, Json] = {}
        self._alerts: dict[str, list[Json]] = {}
        self._notes: dict[str, list[Json]] = {}
        self._updates: list[Json] = []
        self._fail_after: dict[str, list[int]] = {}
        self.applied_then_failed: list[str] = []  # calls done, answered with a 5xx
        self._policies = {pid: dict(fields) for pid, fields in (escalation_policies or {}).items()}
        for incident_id, fields in (incidents or {}).items():
            self.add_incident(incident_id, **fields)
        for incident_id, items in (alerts or {}).items():
            self.add_alerts(incident_id, items)
        self._routes: list[tuple[str, re.Pattern[str], Callable[..., Reply]]] = [
            ("GET", re.compile(r"/incidents/([^/]+)"), self._get_incident),
            ("PUT", re.compile(r"/incidents/([^/]+)"), self._put_incident),
            ("PUT", re.compile(r"/incidents"), self._put_incidents),
            ("GET", re.compile(r"/incidents/([^/]+)/alerts"), self._get_alerts),
            ("GET", re.compile(r"/incidents/([^/]+)/notes"), self._get_notes),
            ("POST", re.compile(r"/incidents/([^/]+)/notes"), self._post_note),
            ("GET", re.compile(r"/escalation_policies/([^/]+)"), self._get_policy),
        ]

    # -- set-up and assertions ------------------------------------------------------------

    def add_incident(self, incident_id: str, **fields: Any) -> None:
        with self._cond:
            self._incidents[incident_id] = make_incident(incident_id, **fields)

    def add_alerts(self, incident_id: str, alerts: list[Mapping[str, Any]]) -> None:
        with self._cond:
            target = self._alerts.setdefault(incident_id, [])
            for n, alert in enumerate(alerts, start=len(target) + 1):
                filled = make_alert(str(alert.get("id", f"A{incident_id}{n}")), incident_id)
                target.append({**filled, **alert})

    def fail_after_applying(self, name: str, *, status: int = 502, times: int = 1) -> None:
        """Do the next ``times`` calls to ``name``, then answer ``status`` anyway (a
        gateway's error after PagerDuty stored the change): the caller cannot know."""
        with self._cond:
            self._fail_after.setdefault(name, []).extend([status] * times)

    def incident(self, incident_id: str) -> Json:
        """The incident as it is now (status, escalation_level after updates)."""
        with self._cond:
            return copy.deepcopy(self._incidents[incident_id])

    def notes(self, incident_id: str) -> list[Json]:
        """Notes posted to the incident, oldest first (``content``, ``user.summary``...)."""
        with self._cond:
            return copy.deepcopy(self._notes.get(incident_id, []))

    @property
    def updates(self) -> list[Json]:
        """Every accepted incident change: ``{"id", "changes", "from"}``, in order."""
        with self._cond:
            return copy.deepcopy(self._updates)

    def _handle_error(self, request: Any, client_address: Any) -> None:
        """A client that gave up before its answer (a timeout during an outage or a held
        answer) is part of the scenario, not a bug worth a traceback (over TLS, writing to
        it raises SSL errors, which the base does not expect)."""
        if isinstance(sys.exc_info()[1], BrokenPipeError | ConnectionError | ssl.SSLError):
            return
        socketserver.BaseServer.handle_error(self._httpd, request, client_address)

    # -- FakeServer hooks -----------------------------------------------------------------

    def call_name(self, request: Request) -> str:
        return f"{request.method} {request.path}"

    def error_body(self, status: int) -> Any:
        if status == 429:
            return _error("Rate Limit Exceeded", 2020)
        return _error("Internal Server Error", 2000 if status == 500 else status)

    def handle(self, request: Request) -> Reply:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        key = key.removeprefix("token=") if scheme == "Token" else key
        if scheme not in ("Token", "Bearer") or not key or self.token not in (None, key):
            return Reply(401, _error("Authentication failed", 2006))
        writes = request.method in ("POST", "PUT")
        if writes and self.require_from and not request.headers.get("from"):
            return Reply(400, _error("Invalid Input Provided", 2001, "From header missing"))
        for method, pattern, route in self._routes:
            match = pattern.fullmatch(request.path)
            if method == request.method and match:
                return self._maybe_failed(request, route(request, *match.groups()))
        return _not_found()

    def _maybe_failed(self, request: Request, reply: Reply) -> Reply:
        name = self.call_name(request)
        queued = self._fail_after.get(name)
        if not queued or reply.status >= 400:
            return reply
        self.applied_then_failed.append(name)
        status = queued.pop(0)
        return Reply(status, self.error_body(status))

    # -- routes ---------------------------------------------------------------------------

    def _get_incident(self, request: Request, incident_id: str) -> Reply:
        if incident_id not in self._incidents:
            return _not_found()
        return Reply(200, {"incident": copy.deepcopy(self._incidents[incident_id])})

    def _get_alerts(self, request: Request, incident_id: str) -> Reply:
        if incident_id not in self._incidents:
            return _not_found()
        alerts = self._alerts.get(incident_id, [])
        page = _page(request, len(alerts))
        shown = alerts[page["offset"] : page["offset"] + page["limit"]]
        return Reply(200, {"alerts": copy.deepcopy(shown), **page})

    def _get_notes(self, request: Request, incident_id: str) -> Reply:
        if incident_id not in self._incidents:
            return _not_found()
        return Reply(200, {"notes": copy.deepcopy(self._notes.get(incident_id, []))})

    def _post_note(self, request: Request, incident_id: str) -> Reply:
        if incident_id not in self._incidents:
            return _not_found()
        content = ((request.json or {}).get("note") or {}).get("content")
        if not content:
            return Reply(400, _error("Invalid Input Provided", 2001, "Content cannot be empty"))
        notes = self._notes.setdefault(incident_id, [])
        note = {
            "id": f"N{incident_id}{len(notes) + 1}",
            "type": "annotate_log_entry",
            "user": {"id": "PUSER", "type": "user_reference", "summary": _from(request)},
            "channel": {"summary": "The PagerDuty website or APIs"},
            "content": content,
            "created_at": _now(),
        }
        notes.append(note)
        return Reply(201, {"note": copy.deepcopy(note)})

    def _put_incident(self, request: Request, incident_id: str) -> Reply:
        changes = (request.json or {}).get("incident")
        if not isinstance(changes, dict):
            return Reply(400, _error("Invalid Input Provided", 2001, "incident is required"))
        return self._apply(request, incident_id, changes, wrapper="incident")

    def _put_incidents(self, request: Request) -> Reply:
        items = (request.json or {}).get("incidents")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return Reply(400, _error("Invalid Input Provided", 2001, "incidents is required"))
        for item in items:  # validate everything first: the bulk call is all or nothing
            error = self._invalid(str(item.get("id")), item)
            if error is not None:
                return error
        updated = [self._apply(request, str(item["id"]), item).body for item in items]
        return Reply(200, {"incidents": updated})

    def _apply(self, request: Request, incident_id: str, changes: Json, wrapper: str = "") -> Reply:
        error = self._invalid(incident_id, changes)
        if error is not None:
            return error
        incident = self._incidents[incident_id]
        accepted = {k: v for k, v in changes.items() if k not in ("id", "type")}
        incident.update(accepted)
        self._updates.append({"id": incident_id, "changes": accepted, "from": _from(request)})
        body = copy.deepcopy(incident)
        return Reply(200, {wrapper: body} if wrapper else body)

    def _invalid(self, incident_id: str, changes: Json) -> Reply | None:
        if incident_id not in self._incidents:
            return _not_found()
        status = changes.get("status")
        if status is not None and status not in STATUSES:
            return Reply(400, _error("Invalid Input Provided", 2001, f"bad status {status!r}"))
        if status == "resolved" and self._incidents[incident_id]["status"] == "resolved":
            return Reply(400, _error("Invalid Input Provided", 2001, "Incident Already Resolved"))
        return None

    def _get_policy(self, request: Request, policy_id: str) -> Reply:
        if policy_id not in self._policies:
            return _not_found()
        policy = {
            "id": policy_id,
            "type": "escalation_policy",
            "name": f"Policy {policy_id}",
            "num_loops": 0,
            "escalation_rules": [],
            **self._policies[policy_id],
        }
        return Reply(200, {"escalation_policy": copy.deepcopy(policy)})


def _page(request: Request, count: int) -> Json:
    """Classic offset pagination fields, as ``iter_all`` expects them."""
    offset = int(request.query.get("offset", 0))
    limit = int(request.query.get("limit", 25))
    wants_total = request.query.get("total") == "true"
    return {
        "offset": offset,
        "limit": limit,
        "more": offset + limit < count,
        "total": count if wants_total else None,
    }


def _error(message: str, code: int, *errors: str) -> Json:
    body: Json = {"message": message, "code": code}
    if errors:
        body["errors"] = list(errors)
    return {"error": body}


def _not_found() -> Reply:
    return Reply(404, _error("Not Found", 2100))


def _from(request: Request) -> str:
    return request.headers.get("from", "")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
