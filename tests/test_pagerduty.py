"""PagerDuty intake and write-back, end to end with real parts.

A real `BotApp` served by waitress on 127.0.0.1 receives deliveries signed like
PagerDuty signs them (V3 payloads as in PagerDuty's webhook documentation); the real
`pagerduty` client writes back to `FakePagerDuty`, a local HTTPS stand-in. The crash
test runs the real `runbook-bot` process and kills it with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from builders import RecordingChat
from fakes import ANY, FakePagerDuty, make_alert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waitress.server import BaseWSGIServer, create_server

from bot import metrics
from bot.config import Config, Secret
from bot.pagerduty import MAX_BODY_BYTES, PayloadError, parse_event, sign, verify_signature
from bot.pagerduty import intake as intake_module
from bot.pagerduty import writeback as writeback_module
from bot.server import BotApp

SECRET = "whsec-current"
OLD_SECRET = "whsec-previous"
RELAY_TOKEN = "relay-token"
PD_TOKEN = "pd-api-token"
PD_FROM = "runbook-bot@example.com"
WEBHOOK = "/pagerduty/webhook"

CATALOG = {
    "catalog.yaml": """
kind: catalog
environments: [{name: dev}, {name: staging}, {name: prod, production: true}]
approvers: {users: [U0APPROVER]}
channel: "#incidents"
services: {search: dev}
""",
    "runbooks/payments.yaml": """
kind: runbook
id: payments-5xx
match: {services: [payments], symptoms: ["5xx"]}
channel: "#inc-payments"
steps:
  - id: check-namespace
    command: ["echo", "namespace={{ incident.details.namespace }}"]
    expect: [{pattern: "namespace=shop"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
  - id: clear-cache
    command: ["echo", "OK"]
    expect: [{pattern: "OK"}]
    safety: {requires_approval: true, scopes: [dev, staging]}
on_resolve:
  - id: final-check
    command: ["echo", "final"]
    expect: [{pattern: "final"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/search.yaml": """
kind: runbook
id: search-latency
match: {services: [search]}
resolve_on_success: true
steps:
  - id: quick-check
    command: ["echo", "latency ok"]
    expect: [{pattern: "ok"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/orders.yaml": """
kind: runbook
id: orders-broken
match: {services: [orders]}
steps:
  - id: failing-check
    command: ["false"]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/inventory.yaml": """
kind: runbook
id: inventory-broken
match: {services: [inventory]}
escalation: {pagerduty: false}
steps:
  - id: failing-check
    command: ["false"]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
}

SERVICES = {
    "P1": ("PSVCPAY", "payments", "Payments API elevated 5xx"),
    "P2": ("PSVCSRC", "search", "Search latency high"),
    "P3": ("PSVCORD", "orders", "Orders failing"),
    "P4": ("PSVCINV", "inventory", "Inventory failing"),
}


# --- payloads, as PagerDuty sends them --------------------------------------------------------


def v3_event(
    event_type: str,
    incident_id: str = "P1",
    *,
    event_id: str | None = None,
    occurred_at: str = "2024-05-01T10:00:00.123Z",
    status: str = "triggered",
    **data: Any,
) -> dict[str, Any]:
    """A V3 webhook body (shape from PagerDuty's V3 webhook overview)."""
    service_id, service, title = SERVICES.get(incident_id, ("PSVCX", "unknown", "Something"))
    base = "https://acme.pagerduty.test"
    incident = {
        "id": incident_id,
        "type": "incident",
        "self": f"https://api.pagerduty.test/incidents/{incident_id}",
        "html_url": f"{base}/incidents/{incident_id}",
        "number": 2,
        "status": status,
        "incident_key": f"key-{incident_id}",
        "created_at": "2024-05-01T10:00:00Z",
        "title": title,
        "service": {
            "html_url": f"{base}/services/{service_id}",
            "id": service_id,
            "self": f"https://api.pagerduty.test/services/{service_id}",
            "summary": service,
            "type": "service_reference",
        },
        "assignees": [{"id": "PUSER1", "summary": "Sam Roe", "type": "user_reference"}],
        "escalation_policy": {
            "id": "PPOLICY",
            "summary": "Default",
            "type": "escalation_policy_reference",
        },
        "teams": [{"id": "PTEAM", "summary": "Engineering", "type": "team_reference"}],
        "priority": {"id": "PPRIO1", "summary": "P1", "type": "priority_reference"},
        "urgency": "high",
        "conference_bridge": {
            "conference_number": "+1 555",
            "conference_url": "https://example.com",
        },
        "resolve_reason": None,
        **data,
    }
    return {
        "event": {
            "id": event_id or str(uuid.uuid4()),
            "event_type": event_type,
            "resource_type": "incident",
            "occurred_at": occurred_at,
            "agent": {"id": "PAGENT", "summary": "Jane Doe", "type": "user_reference"},
            "client": {"name": "Monitoring"},
            "data": incident,
        }
    }


def signed_headers(body: bytes, secrets: tuple[str, ...], webhook_id: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Webhook-Id": webhook_id or str(uuid.uuid4())}
    if secrets:
        headers["X-PagerDuty-Signature"] = ",".join(sign(body, s) for s in secrets)
    return headers


# --- a running bot ----------------------------------------------------------------------------


@dataclass
class RunningBot:
    app: BotApp
    url: str
    chat: RecordingChat
    http: httpx.Client

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.post(self.url + WEBHOOK, content=body, headers=headers)

    def deliver(
        self,
        document: dict[str, Any],
        *,
        secrets: tuple[str, ...] = (SECRET,),
        webhook_id: str | None = None,
    ) -> httpx.Response:
        body = json.dumps(document).encode()
        return self.post(body, signed_headers(body, secrets, webhook_id))

    def deliveries(self) -> list[dict[str, Any]]:
        return self.app.store.query("SELECT * FROM deliveries ORDER BY rowid")

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until every delivery was processed and every write-back ran."""
        wait_until(
            lambda: not any(d["status"] in ("queued", "processing") for d in self.deliveries()),
            timeout,
        )
        writeback = self.app.intake.writeback
        assert writeback is None or writeback.wait_idle(timeout)

    def executed(self, incident_id: str) -> list[str]:
        return [
            e["step_id"] for e in self.app.store.events(incident_id) if e["status"] == "executed"
        ]


def wait_until(condition: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


@contextlib.contextmanager
def running_bot(config: Config) -> Iterator[RunningBot]:
    app = BotApp(config)
    chat = RecordingChat()
    app.engine.chat = chat
    server = create_server(app.wsgi, host="127.0.0.1", port=0, threads=4)
    assert isinstance(server, BaseWSGIServer) and server.socket is not None  # one socket
    port = server.socket.getsockname()[1]

    def serve() -> None:
        with contextlib.suppress(OSError):  # the socket closes under it at the end
            server.run()

    thread = threading.Thread(target=serve, daemon=True)
    app.start()
    thread.start()
    try:
        with httpx.Client(timeout=10) as http:
            yield RunningBot(app, f"http://127.0.0.1:{port}", chat, http)
    finally:
        server.close()
        thread.join(5)
        app.stop(grace=10)
        app.store.close()


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    for name, text in CATALOG.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def pd() -> Iterator[FakePagerDuty]:
    details = {"symptom": "elevated 5xx", "namespace": "shop", "resource": "deploy/payments"}
    with FakePagerDuty(
        token=PD_TOKEN,
        incidents={i: {"title": title} for i, (_, _, title) in SERVICES.items()},
        alerts={"P1": [make_alert("A1", "P1", details=details)], "P2": [make_alert("A2", "P2")]},
    ) as fake:
        yield fake


@pytest.fixture
def start_bot(
    catalog_dir: Path, db_path: Path, pd: FakePagerDuty, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., RunningBot]]:
    """Start a bot wired to `pd`; keyword arguments override its settings."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pd.ca_file))
    monkeypatch.setattr(writeback_module, "SLEEP_TIMER", 0.01)
    monkeypatch.setattr(intake_module, "DETAILS_SLEEP_TIMER", 0.01)
    with contextlib.ExitStack() as stack:

        def start(**overrides: Any) -> RunningBot:
            values: dict[str, Any] = {
                "catalog": str(catalog_dir),
                "db": str(db_path),
                "env": "staging",
                "pagerduty_webhook_secret": Secret(SECRET),
                "pagerduty_api_token": Secret(PD_TOKEN),
                "pagerduty_from": PD_FROM,
                "pagerduty_api_url": pd.url,
                "workers": 4,
                **overrides,
            }
            return stack.enter_context(running_bot(Config(**values)))

        yield start


@pytest.fixture
def bot(start_bot: Callable[..., RunningBot]) -> RunningBot:
    return start_bot()


def deliveries_metric(outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "runbook_webhook_deliveries_total", {"source": "pagerduty", "outcome": outcome}
    )
    return value or 0.0


# --- signatures and envelopes (pure) ----------------------------------------------------------


def test_signature_matches_any_secret_during_rotation() -> None:
    body = b'{"event": {}}'
    both = f"{sign(body, OLD_SECRET)},{sign(body, SECRET)}"
    assert verify_signature(body, both, [SECRET])
    assert verify_signature(body, both, [OLD_SECRET])
    assert verify_signature(body, sign(body, OLD_SECRET), [SECRET, OLD_SECRET])
    assert verify_signature(body, " " + sign(body, SECRET).upper().replace("V1=", "v1="), [SECRET])
    assert not verify_signature(body, sign(body, "other"), [SECRET, OLD_SECRET])
    assert not verify_signature(body + b" ", sign(body, SECRET), [SECRET])
    assert not verify_signature(body, sign(body, SECRET).replace("v1=", "v0="), [SECRET])
    assert not verify_signature(body, "", [SECRET])
    assert not verify_signature(body, sign(body, SECRET), [])
    assert not verify_signature(body, "v1=é,v1=\x00", [SECRET])


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"messages": [{"event": "incident.trigger"}]}', "V3"),
        (b'{"event": {"event_type": "incident.triggered", "data": {}}}', "event.id"),
        (b'{"event": {"id": "E1", "data": {}}}', "event.event_type"),
        (b'{"event": {"id": "E1", "event_type": "incident.triggered", "data": []}}', "data"),
        (
            b'{"event": {"id": "E1", "event_type": "incident.resolved", '
            b'"resource_type": "incident", "data": {"type": "incident"}}}',
            "event.data.id",
        ),
        (b"[" * 100_000, "not JSON"),
    ],
)
def test_malformed_envelopes_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(PayloadError) as raised:
        parse_event(body)
    assert reason in raised.value.reason


def test_parse_reads_the_documented_incident_payload() -> None:
    document = v3_event("incident.triggered", "P1")
    event = parse_event(json.dumps(document).encode())
    assert (event.event_type, event.incident_id, event.agent) == (
        "incident.triggered",
        "P1",
        "Jane Doe",
    )
    assert (event.title, event.service, event.service_id) == (
        "Payments API elevated 5xx",
        "payments",
        "PSVCPAY",
    )
    assert (event.urgency, event.priority, event.assignees) == ("high", "P1", ("Sam Roe",))
    assert event.link == "https://acme.pagerduty.test/incidents/P1"
    ping = {
        "event": {
            "id": "E2",
            "event_type": "pagey.ping",
            "resource_type": "pagey",
            "occurred_at": None,
            "agent": None,
            "client": None,
            "data": {"message": "Hello from your friend Pagey!", "type": "ping"},
        }
    }
    parsed = parse_event(json.dumps(ping).encode())
    assert (parsed.incident_id, parsed.handled) == ("", False)


# --- intake over HTTP --------------------------------------------------------------------------


def test_triggered_opens_the_incident_with_the_first_alerts_details(
    bot: RunningBot, pd: FakePagerDuty
) -> None:
    response = bot.deliver(v3_event("incident.triggered", "P1"))
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"
    assert response.elapsed.total_seconds() < 1.0
    bot.settle()

    row = bot.app.store.get_incident("P1")
    assert row is not None
    assert (row["title"], row["service"], row["service_id"]) == (
        "Payments API elevated 5xx",
        "payments",
        "PSVCPAY",
    )
    assert (row["urgency"], row["priority"], row["env"]) == ("high", "P1", "staging")
    assert row["link"] == "https://acme.pagerduty.test/incidents/P1"
    assert row["details"] == {
        "symptom": "elevated 5xx",
        "namespace": "shop",
        "resource": "deploy/payments",
    }
    assert [v.title for v in bot.chat.incidents] == ["Payments API elevated 5xx"]
    steps = {s["step_id"]: s for s in bot.app.store.step_runs_of("P1")}
    assert steps["check-namespace"]["status"] == "success"
    assert "namespace=shop" in steps["check-namespace"]["output"]  # templated from the alert
    assert steps["clear-cache"]["status"] == "awaiting_approval"
    assert [c.name for c in pd.calls] == ["GET /incidents/P1/alerts"]


def test_secret_rotation_accepts_either_secret(start_bot: Callable[..., RunningBot]) -> None:
    bot = start_bot(pagerduty_webhook_secret=Secret(f"{OLD_SECRET}, {SECRET}"))
    assert (
        bot.deliver(v3_event("incident.triggered", "P2"), secrets=(OLD_SECRET,)).status_code == 202
    )
    assert (
        bot.deliver(v3_event("incident.acknowledged", "P2"), secrets=(SECRET,)).status_code == 202
    )
    both = bot.deliver(v3_event("incident.reassigned", "P2"), secrets=("unknown", SECRET))
    assert both.status_code == 202
    bot.settle()
    assert [d["status"] for d in bot.deliveries()] == ["done", "done", "done"]


def test_a_relay_may_use_the_bearer_token(start_bot: Callable[..., RunningBot]) -> None:
    bot = start_bot(pagerduty_webhook_token=Secret(RELAY_TOKEN))
    body = json.dumps(v3_event("incident.triggered", "P2")).encode()
    headers = {"Content-Type": "application/json"}
    assert bot.post(body, {**headers, "Authorization": "Bearer nope"}).status_code == 401
    assert bot.post(body, {**headers, "Authorization": f"Bearer {RELAY_TOKEN}"}).status_code == 202


def test_forged_and_unsigned_deliveries_are_refused_and_change_nothing(bot: RunningBot) -> None:
    before = deliveries_metric("rejected")
    body = json.dumps(v3_event("incident.triggered", "P1")).encode()
    other = json.dumps(v3_event("incident.triggered", "P2")).encode()
    attempts = [
        {},  # unsigned
        {"X-PagerDuty-Signature": sign(body, "guessed-secret")},
        {"X-PagerDuty-Signature": sign(other, SECRET)},  # replayed signature, new body
        {"X-PagerDuty-Signature": sign(body, SECRET).replace("v1=", "v2=")},
        {"X-PagerDuty-Signature": "v1="},
        {"Authorization": f"Bearer {SECRET}"},  # no token is configured
    ]
    for extra in attempts:
        response = bot.post(body, {"Content-Type": "application/json", **extra})
        assert response.status_code == 401, extra
        assert "X-PagerDuty-Signature" in response.json()["error"]
    time.sleep(0.2)
    assert bot.deliveries() == []
    assert bot.app.store.get_incident("P1") is None
    assert bot.chat.incidents == []
    assert deliveries_metric("rejected") - before == len(attempts)


def test_duplicates_and_replays_are_processed_once(bot: RunningBot) -> None:
    before = deliveries_metric("duplicate")
    triggered = v3_event("incident.triggered", "P1", event_id="E-trigger")
    assert bot.deliver(triggered, webhook_id="W1").json()["status"] == "accepted"
    assert bot.deliver(triggered, webhook_id="W1").json()["status"] == "duplicate"
    bot.settle()
    # PagerDuty retrying with a new delivery id, and a replay long after: same event id.
    replay = bot.deliver(triggered, webhook_id="W2")
    assert (replay.status_code, replay.json()["status"]) == (202, "duplicate")
    # A new event id for an incident already open: accepted, but nothing runs twice.
    again = v3_event("incident.triggered", "P1", event_id="E-trigger-2")
    assert bot.deliver(again).json()["status"] == "accepted"
    bot.settle()

    assert len(bot.chat.incidents) == 1
    assert bot.executed("P1") == ["check-namespace"]
    assert [(d["event_id"], d["status"]) for d in bot.deliveries()] == [
        ("E-trigger", "done"),
        ("E-trigger-2", "done"),
    ]
    assert deliveries_metric("duplicate") - before == 2


def test_events_of_one_incident_apply_in_arrival_order(bot: RunningBot) -> None:
    # Sent back to back: the acknowledgement must not overtake the incident it notes.
    for event_type in ("incident.triggered", "incident.acknowledged", "incident.reassigned"):
        assert bot.deliver(v3_event(event_type, "P2")).status_code == 202
    prankster = v3_event("incident.acknowledged", "P2")
    prankster["event"]["agent"]["summary"] = "<!channel> Eve"
    bot.deliver(prankster)
    bot.settle()
    notes = [n for n in bot.chat.notes if "PagerDuty" in n]
    assert notes == [
        "Acknowledged in PagerDuty by Jane Doe.",
        "Reassigned in PagerDuty to Sam Roe by Jane Doe.",
        "Acknowledged in PagerDuty by !channel Eve.",  # no mention of the whole channel
    ]


def test_out_of_order_state_changes_and_unknown_event_types(bot: RunningBot) -> None:
    # P1 resolved before its trigger arrived: the late trigger opens nothing.
    resolved = v3_event(
        "incident.resolved", "P1", occurred_at="2024-05-01T10:05:00Z", status="resolved"
    )
    triggered = v3_event("incident.triggered", "P1", occurred_at="2024-05-01T10:00:00Z")
    assert bot.deliver(resolved).status_code == 202
    assert bot.deliver(triggered).status_code == 202
    # P2 triggered, resolved at 10:10, reopened at 10:20: the resolve arrives last.
    bot.deliver(v3_event("incident.triggered", "P2", occurred_at="2024-05-01T10:00:00Z"))
    bot.settle()
    bot.deliver(v3_event("incident.reopened", "P2", occurred_at="2024-05-01T10:20:00Z"))
    bot.deliver(v3_event("incident.resolved", "P2", occurred_at="2024-05-01T10:10:00Z"))
    # Types the bot does not act on, an incident note and PagerDuty's ping included.
    bot.deliver(v3_event("incident.priority_updated", "P2"))
    note = v3_event("incident.annotated", "P2")
    note["event"]["data"] = {
        "id": "N1",
        "type": "incident_note",
        "content": "hi",
        "incident": {"id": "P2", "type": "incident_reference"},
    }
    bot.deliver(note)
    ping = v3_event("pagey.ping")
    ping["event"].update(resource_type="pagey", data={"message": "Hello", "type": "ping"})
    bot.deliver(ping)
    bot.settle()

    assert bot.app.store.get_incident("P1") is None
    incident = bot.app.store.get_incident("P2")
    assert incident is not None and incident["status"] == "open"
    statuses = [(d["event_type"], d["status"]) for d in bot.deliveries()]
    assert statuses == [
        ("incident.resolved", "done"),  # nothing to resolve yet
        ("incident.triggered", "ignored"),  # stale
        ("incident.triggered", "done"),
        ("incident.reopened", "done"),
        ("incident.resolved", "ignored"),  # stale
        ("incident.priority_updated", "ignored"),
        ("incident.annotated", "ignored"),
        ("pagey.ping", "ignored"),
    ]
    assert [v.incident_id for v in bot.chat.incidents] == ["P2"]


def test_oversized_and_malformed_bodies(bot: RunningBot) -> None:
    def signed(body: bytes) -> dict[str, str]:
        return signed_headers(body, (SECRET,), None)

    big = json.dumps(v3_event("incident.triggered", "P1", padding="x" * MAX_BODY_BYTES)).encode()
    assert bot.post(big, signed(big)).status_code == 413

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    chunked = bot.http.post(bot.url + WEBHOOK, content=chunks(), headers=signed(big))
    assert chunked.status_code == 413
    for body, reason in [
        (b"{oops", "not JSON"),
        (b'{"messages": []}', "V3"),
        (
            json.dumps(
                {"event": {"id": "E", "event_type": "incident.triggered", "data": {}}}
            ).encode(),
            "resource_type",
        ),
    ]:
        response = bot.post(body, signed(body))
        assert response.status_code == 400
        assert reason in response.json()["error"]
    assert bot.deliveries() == []


# --- properties: nothing a sender sends gives a 5xx or changes state unless signed -----------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)
BODIES = st.binary(max_size=2048) | JSON.map(lambda v: json.dumps(v).encode())
EVENT_TYPES = st.sampled_from(
    [
        "incident.triggered",
        "incident.acknowledged",
        "incident.reassigned",
        "incident.resolved",
        "incident.reopened",
        "incident.escalated",
        "pagey.ping",
    ]
) | st.text(min_size=1, max_size=30)
ENVELOPES = st.fixed_dictionaries(
    {
        "event": st.fixed_dictionaries(
            {
                "id": st.text(min_size=1, max_size=40),
                "event_type": EVENT_TYPES,
                "resource_type": st.sampled_from(["incident", "pagey"]) | JSON,
                "occurred_at": st.sampled_from(["2024-05-01T10:00:00Z", "yesterday"]) | JSON,
                "agent": JSON,
                "data": st.fixed_dictionaries(
                    {
                        "id": st.sampled_from(["P1", "P2", "Pfuzz"]) | JSON,
                        "type": st.sampled_from(["incident", "incident_note"]) | JSON,
                        "title": JSON,
                        "service": st.fixed_dictionaries({"id": JSON, "summary": JSON}) | JSON,
                        "urgency": JSON,
                        "priority": JSON,
                        "assignees": JSON,
                        "html_url": JSON,
                        "body": st.fixed_dictionaries({"details": JSON}) | JSON,
                    }
                ),
            }
        )
    }
)
PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(body=BODIES, signed=st.booleans())
def test_arbitrary_bodies_never_give_a_5xx(bot: RunningBot, body: bytes, signed: bool) -> None:
    before = len(bot.deliveries())
    headers = signed_headers(body, (SECRET,) if signed else (), None)
    response = bot.post(body, headers)
    if not signed:
        assert response.status_code == 401
        assert len(bot.deliveries()) == before
    else:
        assert response.status_code in (202, 400)
        assert len(bot.deliveries()) == before + (response.status_code == 202)


@PROPERTY
@given(envelope=ENVELOPES)
def test_signed_envelopes_of_any_shape_never_break_processing(
    bot: RunningBot, envelope: dict[str, Any]
) -> None:
    response = bot.deliver(envelope)
    assert response.status_code in (202, 400), response.text
    bot.settle()
    assert not [d for d in bot.deliveries() if d["status"] == "failed"]
    assert bot.http.get(bot.url + "/healthz").status_code == 200


# --- resolve, write-back ---------------------------------------------------------------------


def test_resolve_while_an_approval_is_pending(bot: RunningBot, pd: FakePagerDuty) -> None:
    bot.deliver(v3_event("incident.triggered", "P1"))
    bot.settle()
    (pending,) = bot.app.store.pending_approvals("P1")
    assert pending["action"] == "clear-cache"

    bot.deliver(v3_event("incident.resolved", "P1", status="resolved"))
    bot.settle()

    approval = bot.app.store.get_approval(pending["step_run_id"])
    assert approval is not None
    assert (approval["status"], approval["decided_by"]) == ("cancelled", "pagerduty")
    updated = [v for v in bot.chat.updates if v.step_id == "clear-cache"]
    assert updated[-1].state == "cancelled"  # the approval message no longer asks
    assert bot.executed("P1") == ["check-namespace", "final-check"]  # follow-up ran
    assert any(n.startswith("Incident resolved.") for n in bot.chat.notes)
    assert bot.app.store.get_incident("P1")["status"] == "resolved"  # type: ignore[index]
    (note,) = pd.notes("P1")  # the follow-ups' run; PagerDuty resolved it already
    assert "follow-ups on resolve" in note["content"]
    assert "final-check: success" in note["content"]
    assert pd.updates == []


def test_writeback_notes_the_run_and_resolves_on_success(
    bot: RunningBot, pd: FakePagerDuty
) -> None:
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    row = bot.app.store.get_incident("P2")
    assert row is not None and row["env"] == "dev"  # the catalog maps service search to dev
    (note,) = pd.notes("P2")
    assert note["user"]["summary"] == PD_FROM
    content = note["content"]
    assert "search-latency (steps) finished" in content
    assert "quick-check: success" in content
    assert f"Slack thread: channel {row['channel']}, message {row['thread_ts']}" in content
    assert [(u["id"], u["changes"]["status"]) for u in pd.updates] == [("P2", "resolved")]
    assert [c.name for c in pd.calls][-2:] == ["POST /incidents/P2/notes", "PUT /incidents/P2"]


def test_a_failed_step_escalates_when_the_runbook_asks(bot: RunningBot, pd: FakePagerDuty) -> None:
    bot.deliver(v3_event("incident.triggered", "P3"))
    bot.deliver(v3_event("incident.triggered", "P4"))  # escalation: {pagerduty: false}
    bot.settle()

    assert pd.incident("P3")["escalation_level"] == 2
    run_note, escalation_note = (n["content"] for n in pd.notes("P3"))
    assert "orders-broken (steps) stopped" in run_note
    assert "failing-check: failed" in run_note
    assert "escalated this incident to level 2: failing-check ended failed" in escalation_note
    assert pd.incident("P4")["escalation_level"] == 1
    assert len(pd.notes("P4")) == 1  # the run's note only
    assert [u["id"] for u in pd.updates] == ["P3"]


def test_pagerduty_500s_are_retried_until_it_answers(bot: RunningBot, pd: FakePagerDuty) -> None:
    pd.fail("GET /incidents/P2/alerts", status=502)
    pd.fail("POST /incidents/P2/notes", status=500, times=3)
    pd.fail("PUT /incidents/P2", status=503, times=2)
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    assert [c.status for c in pd.calls_to("GET /incidents/P2/alerts")] == [502, 200]
    assert [c.status for c in pd.calls_to("POST /incidents/P2/notes")] == [500, 500, 500, 201]
    assert [c.status for c in pd.calls_to("PUT /incidents/P2")] == [503, 503, 200]
    assert len(pd.notes("P2")) == 1
    assert pd.incident("P2")["status"] == "resolved"


def test_a_refused_note_does_not_keep_the_incident_open(bot: RunningBot, pd: FakePagerDuty) -> None:
    pd.fail("POST /incidents/P2/notes", status=400)  # not retried: it will not get better
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    assert [c.status for c in pd.calls_to("POST /incidents/P2/notes")] == [400]
    assert pd.incident("P2")["status"] == "resolved"


def test_pagerduty_down_never_blocks_the_slack_thread(
    start_bot: Callable[..., RunningBot], pd: FakePagerDuty, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(writeback_module, "SLEEP_TIMER", 0.1)  # 3 s of back-off per call
    bot = start_bot()
    pd.fail(ANY, status=500, times=10_000)
    started = time.monotonic()
    assert bot.deliver(v3_event("incident.triggered", "P2")).status_code == 202
    wait_until(lambda: any(n.startswith("Runbook finished.") for n in bot.chat.notes), 5.0)
    assert time.monotonic() - started < 3.0
    assert bot.app.intake.writeback is not None
    assert not bot.app.intake.writeback.wait_idle(0.1)  # PagerDuty is still being retried
    # Another incident goes through meanwhile.
    bot.deliver(v3_event("incident.triggered", "P4"))
    wait_until(lambda: len(bot.chat.incidents) == 2, 3.0)

    assert bot.app.intake.writeback.wait_idle(20)
    notes = pd.calls_to("POST /incidents/P2/notes")
    assert [c.status for c in notes] == [500] * (writeback_module.RETRIES + 1)  # then gave up
    assert pd.notes("P2") == []
    assert pd.incident("P2")["status"] == "triggered"
    assert bot.app.store.get_incident("P2")["status"] == "open"  # type: ignore[index]


# --- a crash between the 202 and the processing ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _runbook_bot() -> str:
    return str(Path(sys.executable).with_name("runbook-bot"))


def _query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


@pytest.mark.slow
def test_a_crash_after_the_202_loses_nothing_and_repeats_nothing(
    catalog_dir: Path, tmp_path: Path, pd: FakePagerDuty
) -> None:
    db = tmp_path / "bot.db"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **os.environ,
        "RUNBOOK_CATALOG": str(catalog_dir),
        "RUNBOOK_DB": str(db),
        "RUNBOOK_ENV": "staging",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "PAGERDUTY_WEBHOOK_SECRET": SECRET,
        "PAGERDUTY_API_TOKEN": PD_TOKEN,
        "PAGERDUTY_FROM": PD_FROM,
        "PAGERDUTY_API_URL": pd.url,
        "SSL_CERT_FILE": str(pd.ca_file),
    }
    log = (tmp_path / "bot.log").open("ab")

    def start() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([_runbook_bot()], env=env, stdout=log, stderr=log)

        def healthy() -> bool:
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                assert proc.poll() is None, (tmp_path / "bot.log").read_text()
                return False

        wait_until(healthy, 20)
        return proc

    def deliver(document: dict[str, Any]) -> httpx.Response:
        body = json.dumps(document).encode()
        return httpx.post(
            url + WEBHOOK, content=body, headers=signed_headers(body, (SECRET,), None)
        )

    # Processing of P2's trigger hangs on reading its alert details from PagerDuty.
    pd.set_latency(60, "GET /incidents/P2/alerts")
    proc = start()
    try:
        assert deliver(v3_event("incident.triggered", "P2")).status_code == 202
        wait_until(lambda: _query(db, "SELECT status FROM deliveries") == [("processing",)], 10)
        assert deliver(v3_event("incident.acknowledged", "P2")).status_code == 202  # queued
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert _query(db, "SELECT status FROM deliveries ORDER BY rowid") == [
            ("processing",),
            ("queued",),
        ]
        assert _query(db, "SELECT count(*) FROM incidents") == [(0,)]

        pd.set_latency(0, "GET /incidents/P2/alerts")
        proc = start()
        wait_until(lambda: pd.notes("P2") and pd.incident("P2")["status"] == "resolved", 20)
        wait_until(
            lambda: (
                _query(db, "SELECT status FROM deliveries ORDER BY rowid") == [("done",), ("done",)]
            ),
            10,
        )
        time.sleep(0.5)  # anything repeated would show by now
        assert _query(db, "SELECT count(*) FROM incidents") == [(1,)]
        executed = "SELECT step_id FROM automation_events WHERE status = 'executed'"
        assert _query(db, executed) == [("quick-check",)]
        assert len(pd.notes("P2")) == 1
        assert [u["changes"] for u in pd.updates] == [{"status": "resolved"}]
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(20)
        log.close()
