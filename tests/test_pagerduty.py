"""PagerDuty intake and write-back, end to end with real parts.

A real `BotApp` served by waitress on 127.0.0.1 (tests/pagerduty_harness.py) receives
deliveries signed like PagerDuty signs them (V3 payloads as in PagerDuty's webhook
documentation); deliveries go into the durable inbox, the engine applies them, and the
outbox writes back to `FakePagerDuty` (a local HTTPS stand-in) through the real
`pagerduty` client and posts to `FakeSlack` through slack_sdk. The crash and outage tests
run the real `runbook-bot` process and kill it with SIGKILL.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakePagerDuty, FakeSlack, visible_text
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pagerduty_harness import (
    CHANNELS,
    OLD_SECRET,
    RELAY_TOKEN,
    SECRET,
    WEBHOOK,
    Bot,
    BotProcess,
    outage_with_kill,
    pagerduty_account,
    signed_headers,
    thread_texts,
    v3_event,
    wait_for,
    write_catalog,
    writeback_calls,
)

from bot import metrics
from bot.config import Secret
from bot.pagerduty import MAX_BODY_BYTES, PayloadError, parse_event, sign, verify_signature

# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def catalog_dir(tmp_path: Path) -> Path:
    return write_catalog(tmp_path / "catalog")


@pytest.fixture
def pd() -> Iterator[FakePagerDuty]:
    with pagerduty_account() as fake:
        yield fake


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack() as fake:
        yield fake


@pytest.fixture
def start_bot(
    catalog_dir: Path,
    db_path: Path,
    pd: FakePagerDuty,
    slack: FakeSlack,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Callable[..., Bot]]:
    """Start a bot on `db_path` wired to `pd` and `slack`; keyword arguments override its
    settings. Calling it again after `bot.stop()` is a restart on the same database."""
    monkeypatch.setenv("SSL_CERT_FILE", str(pd.ca_file))
    bots: list[Bot] = []

    def start(**overrides: Any) -> Bot:
        bots.append(Bot(catalog_dir, db_path, pd, slack, **overrides))
        return bots[-1]

    yield start
    for bot in bots:
        bot.stop()
    assert not pd.errors and not slack.errors  # the stand-ins did not break


@pytest.fixture
def bot(start_bot: Callable[..., Bot]) -> Bot:
    return start_bot()


def writebacks(pd: FakePagerDuty, incident_id: str) -> list[str]:
    """What PagerDuty applied to one incident, in order: "note", "resolve", "level N"."""
    return [what for who, what in writeback_calls(pd) if who == incident_id]


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
    bot: Bot, pd: FakePagerDuty, slack: FakeSlack
) -> None:
    response = bot.deliver(v3_event("incident.triggered", "P1"))
    assert response.status_code == 202
    assert response.json()["status"] == "accepted"
    assert response.elapsed.total_seconds() < 1.0
    bot.settle()

    incident = bot.app.store.incident("P1")
    assert incident is not None
    assert (incident.title, incident.service, incident.service_id) == (
        "Payments API elevated 5xx",
        "payments",
        "PSVCPAY",
    )
    assert (incident.urgency, incident.priority, incident.env) == ("high", "P1", "staging")
    assert incident.link == "https://acme.pagerduty.test/incidents/P1"
    assert incident.details == {
        "symptom": "elevated 5xx",
        "namespace": "shop",
        "resource": "deploy/payments",
    }
    root = slack.messages("#inc-payments")[0]
    assert "Payments API elevated 5xx" in visible_text(root)
    assert incident.thread_ts == root["ts"]
    steps = {s.step_id: s for s in bot.app.store.step_runs_of("P1")}
    assert steps["check-namespace"].status == "success"
    assert "namespace=shop" in steps["check-namespace"].output  # templated from the alert
    assert steps["clear-cache"].status == "awaiting_approval"
    assert [c.name for c in pd.calls] == ["GET /incidents/P1/alerts"]


def test_details_carried_by_the_delivery_are_not_fetched(bot: Bot, pd: FakePagerDuty) -> None:
    carried = v3_event("incident.triggered", "P1", body={"details": {"namespace": "shop"}})
    assert bot.deliver(carried).status_code == 202
    bot.settle()

    incident = bot.app.store.incident("P1")
    assert incident is not None and incident.details == {"namespace": "shop"}
    assert not pd.calls_to("GET /incidents/P1/alerts")


def test_secret_rotation_accepts_either_secret(start_bot: Callable[..., Bot]) -> None:
    bot = start_bot(pagerduty_webhook_secret=Secret(f"{OLD_SECRET}, {SECRET}"))
    old = bot.deliver(v3_event("incident.triggered", "P2"), secrets=(OLD_SECRET,))
    new = bot.deliver(v3_event("incident.acknowledged", "P2"), secrets=(SECRET,))
    both = bot.deliver(v3_event("incident.reassigned", "P2"), secrets=("unknown", SECRET))
    assert [r.status_code for r in (old, new, both)] == [202, 202, 202]
    bot.settle()
    assert bot.inbox() == [
        ("incident.triggered", "done"),
        ("incident.acknowledged", "done"),
        ("incident.reassigned", "done"),
    ]


def test_a_relay_may_use_the_bearer_token(start_bot: Callable[..., Bot]) -> None:
    bot = start_bot(pagerduty_webhook_token=Secret(RELAY_TOKEN))
    body = json.dumps(v3_event("incident.triggered", "P2")).encode()
    headers = {"Content-Type": "application/json"}
    assert bot.post(body, {**headers, "Authorization": "Bearer nope"}).status_code == 401
    assert bot.post(body, {**headers, "Authorization": f"Bearer {RELAY_TOKEN}"}).status_code == 202


def test_forged_and_unsigned_deliveries_are_refused_and_change_nothing(
    bot: Bot, slack: FakeSlack
) -> None:
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
    # The request thread stores before it answers: nothing can arrive later.
    assert bot.app.store.inbox_items() == []
    assert bot.app.store.incident("P1") is None
    assert bot.outstanding() == 0
    assert slack.calls_to("chat.postMessage") == []
    assert deliveries_metric("rejected") - before == len(attempts)


def test_duplicates_and_replays_are_recorded_once_even_across_a_restart(
    start_bot: Callable[..., Bot], slack: FakeSlack
) -> None:
    bot = start_bot()
    before = deliveries_metric("duplicate")
    triggered = v3_event("incident.triggered", "P1", event_id="E-trigger")
    assert bot.deliver(triggered, webhook_id="W1").json()["status"] == "accepted"
    assert bot.deliver(triggered, webhook_id="W1").json()["status"] == "duplicate"
    bot.settle()
    # PagerDuty retrying with a new delivery id: the same event id.
    replay = bot.deliver(triggered, webhook_id="W2")
    assert (replay.status_code, replay.json()["status"]) == (202, "duplicate")
    bot.stop()

    bot = start_bot()  # a new process on the same database remembers
    assert bot.deliver(triggered, webhook_id="W3").json()["status"] == "duplicate"
    renumbered = v3_event("incident.triggered", "P1", event_id="E-other")
    assert bot.deliver(renumbered, webhook_id="W1").json()["status"] == "duplicate"
    # A new event for an incident already open: accepted, but nothing runs twice.
    again = v3_event("incident.triggered", "P1", event_id="E-trigger-2")
    assert bot.deliver(again).json()["status"] == "accepted"
    bot.settle()

    assert bot.executed("P1") == ["check-namespace"]
    roots = [m for m in slack.messages("#inc-payments") if m.get("thread_ts") in (None, m["ts"])]
    assert len(roots) == 1
    items = bot.app.store.inbox_items(source="pagerduty")
    assert [(i.payload["event_id"], str(i.status), i.detail) for i in items] == [
        ("E-trigger", "done", ""),
        ("E-trigger-2", "ignored", "incident already open"),
    ]
    assert deliveries_metric("duplicate") - before == 4


def test_events_of_one_incident_apply_in_arrival_order(bot: Bot, slack: FakeSlack) -> None:
    # Sent back to back: the acknowledgement must not overtake the incident it notes.
    for event_type in ("incident.triggered", "incident.acknowledged", "incident.reassigned"):
        assert bot.deliver(v3_event(event_type, "P2")).status_code == 202
    prankster = v3_event("incident.acknowledged", "P2")
    prankster["event"]["agent"]["summary"] = "<!channel> Eve"
    bot.deliver(prankster)
    bot.settle()

    thread = thread_texts(slack, CHANNELS["search"])
    assert "Search latency high" in thread[0]
    notes = [t for t in thread if "in PagerDuty" in t]
    assert notes == [
        "Acknowledged in PagerDuty by Jane Doe.",
        "Reassigned in PagerDuty to Sam Roe by Jane Doe.",
        "Acknowledged in PagerDuty by !channel Eve.",  # no mention of the whole channel
    ]
    assert [kind for kind, status in bot.inbox() if status == "done"] == [
        "incident.triggered",
        "incident.acknowledged",
        "incident.reassigned",
        "incident.acknowledged",
    ]


def test_out_of_order_state_changes_and_unknown_event_types(bot: Bot, slack: FakeSlack) -> None:
    # P1 resolved before its trigger arrived: the late trigger opens nothing.
    resolved = v3_event(
        "incident.resolved", "P1", occurred_at="2024-05-01T10:05:00Z", status="resolved"
    )
    triggered = v3_event("incident.triggered", "P1", occurred_at="2024-05-01T10:00:00Z")
    assert bot.deliver(resolved).status_code == 202
    assert bot.deliver(triggered).status_code == 202
    # P4 triggered at 10:00, resolved at 10:10, reopened at 10:20; a copy of the resolve
    # arrives again last.
    bot.deliver(v3_event("incident.triggered", "P4", occurred_at="2024-05-01T10:00:00Z"))
    late = v3_event("incident.resolved", "P4", occurred_at="2024-05-01T10:10:00Z")
    bot.deliver(late)
    bot.deliver(v3_event("incident.reopened", "P4", occurred_at="2024-05-01T10:20:00Z"))
    late["event"]["id"] = "E-resolve-copy"
    bot.deliver(late)
    # Types the bot does not act on, an incident note and PagerDuty's ping included.
    bot.deliver(v3_event("incident.priority_updated", "P4"))
    note = v3_event("incident.annotated", "P4")
    note["event"]["data"] = {
        "id": "N1",
        "type": "incident_note",
        "content": "hi",
        "incident": {"id": "P4", "type": "incident_reference"},
    }
    bot.deliver(note)
    ping = v3_event("pagey.ping")
    ping["event"].update(resource_type="pagey", data={"message": "Hello", "type": "ping"})
    bot.deliver(ping)
    bot.settle()

    assert bot.app.store.incident("P1") is None
    incident = bot.app.store.incident("P4")
    assert incident is not None and incident.status == "open"
    assert bot.inbox() == [
        ("incident.resolved", "ignored"),  # nothing to resolve yet
        ("incident.triggered", "ignored"),  # stale
        ("incident.triggered", "done"),
        ("incident.resolved", "done"),
        ("incident.reopened", "done"),
        ("incident.resolved", "ignored"),  # stale
        ("incident.priority_updated", "ignored"),
        ("incident.annotated", "ignored"),
        ("pagey.ping", "ignored"),
    ]
    assert slack.messages("#inc-payments") == []
    assert "reopened" in " ".join(thread_texts(slack, CHANNELS["inventory"])).lower()


def test_a_late_resolve_does_not_close_an_incident_reopened_since(bot: Bot) -> None:
    # PagerDuty: triggered 10:00, resolved 10:10, reopened 10:20. Delivered: the trigger,
    # the reopen, and the resolve last (PagerDuty does not promise order).
    bot.deliver(v3_event("incident.triggered", "P4", occurred_at="2024-05-01T10:00:00Z"))
    bot.deliver(v3_event("incident.reopened", "P4", occurred_at="2024-05-01T10:20:00Z"))
    bot.deliver(v3_event("incident.resolved", "P4", occurred_at="2024-05-01T10:10:00Z"))
    bot.settle()

    incident = bot.app.store.incident("P4")
    assert incident is not None and incident.status == "open"
    assert bot.inbox()[-1] == ("incident.resolved", "ignored")


def test_oversized_and_malformed_bodies(bot: Bot) -> None:
    def signed(body: bytes) -> dict[str, str]:
        return signed_headers(body, (SECRET,), None)

    big = json.dumps(v3_event("incident.triggered", "P1", padding="x" * MAX_BODY_BYTES)).encode()
    too_large = bot.post(big, signed(big))
    assert too_large.status_code == 413
    assert str(MAX_BODY_BYTES) in too_large.json()["error"]

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(big), 65536):
            yield big[start : start + 65536]

    chunked = bot.http.post(WEBHOOK, content=chunks(), headers=signed(big))
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
    assert bot.app.store.inbox_items() == []


def test_a_database_that_cannot_record_gets_503_never_a_202(bot: Bot, slack: FakeSlack) -> None:
    # SQLite's own limit on a file's size: every write needing a new page fails with
    # SQLITE_FULL ("database or disk is full"), exactly as on a full disk. Both files
    # the bot writes are capped, as a full disk would: the state database and the intake
    # log beside it (settings of the bot's own connections).
    store = bot.app.store
    assert store.intake is not None
    connections = [store.conn, store.intake.conn]
    for conn in connections:
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {pages}")
    answers: dict[str, int] = {}
    for n in range(40):
        document = v3_event("incident.triggered", f"PX{n}", event_id=f"E-full-{n}")
        document["event"]["data"]["title"] = f"Search latency high {'x' * 2000}"
        document["event"]["data"]["service"]["summary"] = "search"
        answers[f"E-full-{n}"] = bot.deliver(document).status_code
    assert set(answers.values()) <= {202, 503}
    assert 503 in answers.values()

    for conn in connections:  # the disk has room again
        conn.execute("PRAGMA max_page_count = 1073741823")
    # What was acknowledged is exactly what was stored (in the log or the inbox: listing
    # the inbox moves the log's items first; nothing was delivered since the 503s).
    stored = {i.payload["event_id"] for i in store.inbox_items(source="pagerduty")}
    assert {e for e, status in answers.items() if status == 202} == stored  # 202 = stored
    for event_id, status in answers.items():
        if status == 503:  # PagerDuty retries
            n = int(event_id.removeprefix("E-full-"))
            document = v3_event("incident.triggered", f"PX{n}", event_id=event_id)
            document["event"]["data"]["service"]["summary"] = "search"
            assert bot.deliver(document).json()["status"] == "accepted"
    bot.settle(60)
    assert len(bot.app.store.incidents()) == 40
    roots = [m for m in slack.messages(CHANNELS["search"]) if m.get("thread_ts") in (None, m["ts"])]
    assert len(roots) == 40


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
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(body=BODIES, signed=st.booleans())
def test_arbitrary_bodies_never_give_a_5xx(bot: Bot, body: bytes, signed: bool) -> None:
    before = len(bot.app.store.inbox_items())
    headers = signed_headers(body, (SECRET,) if signed else (), None)
    response = bot.post(body, headers)
    after = len(bot.app.store.inbox_items())
    if not signed:
        assert response.status_code == 401
        assert after == before
    else:
        assert response.status_code in (202, 400)
        assert after == before + (response.status_code == 202)


@PROPERTY
@given(envelope=ENVELOPES)
def test_signed_envelopes_of_any_shape_never_break_processing(
    bot: Bot, envelope: dict[str, Any]
) -> None:
    response = bot.deliver(envelope)
    assert response.status_code in (202, 400), response.text
    bot.settle()
    assert not [i for i in bot.app.store.inbox_items() if i.status == "failed"]
    assert bot.http.get("/healthz").status_code == 200


# --- resolve and write-back ------------------------------------------------------------------


def test_resolve_while_an_approval_is_pending(
    bot: Bot, pd: FakePagerDuty, slack: FakeSlack
) -> None:
    bot.deliver(v3_event("incident.triggered", "P1"))
    bot.settle()
    (pending,) = bot.app.store.pending_approvals("P1")
    assert pending.action == "clear-cache"

    bot.deliver(v3_event("incident.resolved", "P1", status="resolved"))
    bot.settle()

    approval = bot.app.store.approval(pending.step_run_id)
    assert approval is not None
    assert (approval.status, approval.decided_by) == ("cancelled", "pagerduty")
    step_message = next(m for m in slack.messages("#inc-payments") if "clear-cache" in m["text"])
    assert "cancelled" in visible_text(step_message).lower()  # it no longer asks
    assert bot.executed("P1") == ["check-namespace", "final-check"]  # the follow-up ran
    assert any(t.startswith("Incident resolved.") for t in thread_texts(slack, "#inc-payments"))
    incident = bot.app.store.incident("P1")
    assert incident is not None and incident.status == "resolved"
    (note,) = pd.notes("P1")  # the follow-ups' run; PagerDuty resolved it already
    assert "follow-ups on resolve" in note["content"]
    assert "final-check: success" in note["content"]
    assert pd.updates == []


def test_writeback_notes_the_run_then_resolves_on_success(bot: Bot, pd: FakePagerDuty) -> None:
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    incident = bot.app.store.incident("P2")
    assert incident is not None and incident.env == "dev"  # the catalog maps search to dev
    (note,) = pd.notes("P2")
    assert note["user"]["summary"] == "runbook-bot@example.com"
    content = note["content"]
    assert "search-latency (steps) finished" in content
    assert "quick-check: success" in content
    assert f"Slack thread: channel {incident.channel}, message {incident.thread_ts}" in content
    assert writeback_calls(pd) == [("P2", "note"), ("P2", "resolve")]
    assert bot.writeback() == [("P2", "pd_note", "sent"), ("P2", "pd_resolve", "sent")]


def test_a_resolve_pagerduty_refuses_as_already_resolved_is_done(
    bot: Bot, pd: FakePagerDuty
) -> None:
    pd.add_incident("P2", title="Search latency high", status="resolved")  # a human was faster
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    assert [c.status for c in pd.calls_to("PUT /incidents/P2")] == [400]
    assert bot.writeback() == [("P2", "pd_note", "sent"), ("P2", "pd_resolve", "sent")]


def test_a_failed_step_escalates_to_the_next_level_when_the_runbook_asks(
    bot: Bot, pd: FakePagerDuty
) -> None:
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


def test_a_refused_note_does_not_hold_back_the_resolve(bot: Bot, pd: FakePagerDuty) -> None:
    pd.fail("POST /incidents/P2/notes", status=400)  # not retried: it will not get better
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    assert [c.status for c in pd.calls_to("POST /incidents/P2/notes")] == [400]
    assert pd.incident("P2")["status"] == "resolved"
    assert bot.writeback() == [("P2", "pd_note", "failed"), ("P2", "pd_resolve", "sent")]


def test_pagerduty_errors_are_retried_until_it_answers(bot: Bot, pd: FakePagerDuty) -> None:
    pd.fail("GET /incidents/P2/alerts", status=502)  # details: the client tries once more
    pd.fail("POST /incidents/P2/notes", status=500, times=3)
    pd.fail("PUT /incidents/P2", status=503, times=2)
    pd.rate_limit("PUT /incidents/P3", times=3, retry_after=1)
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.deliver(v3_event("incident.triggered", "P3"))
    bot.settle()

    assert [c.status for c in pd.calls_to("GET /incidents/P2/alerts")] == [502, 200]
    assert [c.status for c in pd.calls_to("POST /incidents/P2/notes")] == [500, 500, 500, 201]
    assert [c.status for c in pd.calls_to("PUT /incidents/P2")] == [503, 503, 200]
    assert [c.status for c in pd.calls_to("PUT /incidents/P3")] == [429, 429, 429, 200]
    assert writebacks(pd, "P2") == ["note", "resolve"]
    assert writebacks(pd, "P3") == ["note", "level 2", "escalation note"]
    assert pd.incident("P2")["status"] == "resolved"


@pytest.mark.parametrize("outage", [500, 503, 0], ids=["500", "503", "hanging"])
def test_pagerduty_down_then_back_delivers_every_writeback_once_in_order(
    start_bot: Callable[..., Bot], pd: FakePagerDuty, slack: FakeSlack, outage: int
) -> None:
    bot = start_bot(pd_timeout=0.5)
    pd.down(outage)  # 0: every call hangs until the client gives up
    for incident_id in ("P2", "P3", "P4", "P5"):
        assert bot.deliver(v3_event("incident.triggered", incident_id)).status_code == 202
    # The runs finish and their threads say so while PagerDuty is down.
    wait_for(
        lambda: all(
            any(
                t.startswith(("Runbook finished.", "Runbook stopped:"))
                for t in thread_texts(slack, channel)
            )
            for channel in (
                CHANNELS["search"],
                CHANNELS["orders"],
                CHANNELS["inventory"],
                CHANNELS["billing"],
            )
        ),
        15,
        "every thread to say how its run ended",
    )
    wait_for(
        lambda: all(
            r.attempts >= 2
            for r in bot.app.store.outbox_items("P2", target="pagerduty")
            if r.kind == "pd_note"
        ),
        15,
        "the note to be tried twice",
    )
    assert pd.notes("P2") == [] and pd.updates == []
    pd.up()
    bot.settle(30)

    assert writebacks(pd, "P2") == ["note", "resolve"]
    assert writebacks(pd, "P3") == ["note", "level 2", "escalation note"]
    assert writebacks(pd, "P4") == ["note"]
    assert writebacks(pd, "P5") == ["note"]
    assert pd.incident("P3")["escalation_level"] == 2
    assert {s for _, _, s in bot.writeback()} == {"sent"}


LOSSES = ["timeout", "dropped", "502"]


def lose_next(pd: FakePagerDuty, name: str, how: str) -> None:
    """The next call to `name` takes effect in PagerDuty, and its caller cannot know:
    the answer is held until the client gives up, the connection is dropped, or a
    gateway answers 502."""
    if how == "502":
        pd.fail_after_applying(name, status=502)
    else:
        pd.lose_answer(name, delay=3.0 if how == "timeout" else None)


def lost(pd: FakePagerDuty) -> list[str]:
    return [c.name for c in pd.calls if not c.answered] + pd.applied_then_failed


@pytest.mark.parametrize("how", LOSSES)
def test_a_note_whose_answer_was_lost_is_not_written_twice(
    bot: Bot, pd: FakePagerDuty, how: str
) -> None:
    lose_next(pd, "POST /incidents/P2/notes", how)
    bot.deliver(v3_event("incident.triggered", "P2"))
    bot.settle()

    assert lost(pd) == ["POST /incidents/P2/notes"]
    assert len(pd.notes("P2")) == 1
    assert len(pd.calls_to("GET /incidents/P2/notes")) == 1  # looked before posting again
    assert [u["changes"] for u in pd.updates] == [{"status": "resolved"}]  # after the note


@pytest.mark.parametrize("how", LOSSES)
def test_an_escalation_retried_after_an_unknown_outcome_goes_up_one_level(
    bot: Bot, pd: FakePagerDuty, how: str
) -> None:
    lose_next(pd, "POST /incidents/P3/notes", how)  # the run's note
    lose_next(pd, "PUT /incidents/P3", how)  # the escalation itself
    bot.deliver(v3_event("incident.triggered", "P3"))
    bot.settle()

    assert lost(pd) == ["POST /incidents/P3/notes", "PUT /incidents/P3"]
    assert pd.incident("P3")["escalation_level"] == 2  # not 3
    assert [u["changes"] for u in pd.updates] == [{"escalation_level": 2}]
    run_note, escalation_note = (n["content"] for n in pd.notes("P3"))
    assert "orders-broken (steps) stopped" in run_note
    assert "escalated this incident to level 2" in escalation_note


def test_writeback_survives_a_restart(
    start_bot: Callable[..., Bot], pd: FakePagerDuty, slack: FakeSlack
) -> None:
    bot = start_bot()
    pd.down(503)
    for incident_id in ("P2", "P3"):
        bot.deliver(v3_event("incident.triggered", incident_id))
    wait_for(
        lambda: (
            len(bot.writeback("pending")) == 4
            and all(
                r.attempts > 0
                for r in bot.app.store.outbox_items(target="pagerduty")
                if r.kind == "pd_note"
            )
        ),
        15,
        "the write-backs to be pending and tried",
    )
    bot.stop()  # what was pending is in the database, not in memory
    pd.up()

    restarted = start_bot()
    restarted.settle()
    assert writebacks(pd, "P2") == ["note", "resolve"]
    assert writebacks(pd, "P3") == ["note", "level 2", "escalation note"]
    assert restarted.executed("P2") == ["quick-check"]  # nothing ran again


def test_pagerduty_hanging_never_holds_up_the_slack_thread(
    start_bot: Callable[..., Bot], pd: FakePagerDuty, slack: FakeSlack
) -> None:
    bot = start_bot(pd_timeout=1.5)
    pd.down(0)  # every call hangs until the client gives up
    try:
        for incident_id in ("P2", "P3", "P4", "P5"):
            bot.deliver(v3_event("incident.triggered", incident_id))
        # The first triggers wait for alert details (one timeout); then PagerDuty write-back
        # of their runs hangs, retried, while more incidents arrive. Those open without
        # details (PagerDuty did not answer a moment ago) and their threads do not wait.
        wait_for(lambda: bot.writeback("pending"), 10, "write-back to be pending")
        for incident_id in ("S-1", "S-2", "S-3"):
            pd.add_incident(incident_id)
            bot.deliver(v3_event("incident.triggered", incident_id))
        wait_for(
            lambda: (
                sum(
                    t.startswith("Runbook finished.")
                    for t in thread_texts(slack, CHANNELS["search"])
                )
                == 4
            ),
            1.0,
            "the later threads, while PagerDuty hangs",
        )
    finally:
        pd.up()
    bot.settle(30)
    assert writebacks(pd, "S-3") == ["note", "resolve"]


# --- real processes, killed -----------------------------------------------------------------


@pytest.mark.slow
def test_a_crash_after_the_202_loses_nothing_and_repeats_nothing(
    catalog_dir: Path, tmp_path: Path, pd: FakePagerDuty
) -> None:
    db = tmp_path / "bot.db"
    bot = BotProcess(catalog_dir, db, pd, None, tmp_path / "bot.log")
    # Applying P2's trigger waits on PagerDuty for its alert details: the kill lands
    # before anything of it is applied.
    pd.set_latency(60, "GET /incidents/P2/alerts")
    try:
        bot.start()
        assert bot.deliver(v3_event("incident.triggered", "P2")).status_code == 202
        assert bot.deliver(v3_event("incident.acknowledged", "P2")).status_code == 202
        bot.kill()
        assert bot.received() == [  # both acknowledged, both kept
            ("incident.triggered", "queued"),
            ("incident.acknowledged", "queued"),
        ]
        assert bot.query("SELECT count(*) FROM incidents") == [(0,)]

        pd.set_latency(0, "GET /incidents/P2/alerts")
        bot.start()
        wait_for(lambda: bot.outstanding() == 0, 30, "the bot to catch up")
        pagerduty_items = "SELECT kind, status FROM inbox WHERE source = 'pagerduty' ORDER BY id"
        assert bot.query(pagerduty_items) == [
            ("incident.triggered", "done"),
            ("incident.acknowledged", "done"),
        ]
        assert bot.query("SELECT count(*) FROM incidents") == [(1,)]
        executed = "SELECT step_id FROM automation_events WHERE status = 'executed'"
        assert bot.query(executed) == [("quick-check",)]
        assert writebacks(pd, "P2") == ["note", "resolve"]
    finally:
        bot.close()


@pytest.mark.slow
def test_pagerduty_down_with_a_kill_9_in_the_middle_loses_nothing(tmp_path: Path) -> None:
    """The issue's five-minute outage, short (bench/fault_pagerduty.py runs the long one)."""
    report = outage_with_kill(tmp_path, outage=6.0, batches=2)
    assert report.pending_at_kill > 0  # the kill did land in the middle of write-back
    assert report.failed_calls > 0
    assert not report.lost, report.lines()
    assert not report.duplicated, report.lines()
    assert report.ok, report.lines()


@pytest.mark.parametrize(
    "url",
    [
        "/incidents/P1/alerts",
        "/incidents/PABC123/notes",
        "/incidents/P%2F1",
        "https://api.pagerduty.test/incidents/P1/alerts?limit=1",
        "https://api.pagerduty.test/incidents/P1",
        "/incidents",
        "/incidents/P1/responder_requests",
        "/escalation_policies/E1",
        "/users/U1/contact_methods",
    ],
)
def test_the_clients_fast_canonical_path_agrees_with_the_librarys(url: str) -> None:
    import pagerduty

    from bot.pagerduty.api import RestClient

    ours = RestClient("token", base_url="https://api.pagerduty.test")
    theirs = pagerduty.RestApiV2Client("token", base_url="https://api.pagerduty.test")
    assert ours.canonical_path(url) == theirs.canonical_path(url)
