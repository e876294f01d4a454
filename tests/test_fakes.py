"""The stand-ins answer the real clients the way Slack and PagerDuty do."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pagerduty
import pytest
from fakes import FakePagerDuty, FakeSlack, make_alert, visible_text
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_handlers import RateLimitErrorRetryHandler

TOKEN = "xoxb-test-token"
PD_KEY = "pd-test-key"
PD_FROM = "runbook-bot@example.com"


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(
        users={"U1": {"name": "alice"}},
        channels={"C1": {"name": "inc-payments"}},
        usergroups={"S1": ["U1", "U2"]},
    ) as fake:
        yield fake


@pytest.fixture
def client(slack: FakeSlack) -> WebClient:
    return WebClient(token=TOKEN, base_url=slack.api_url)


# -- Slack ---------------------------------------------------------------------------------


def test_web_client_reaches_the_fake_at_api_url(slack: FakeSlack, client: WebClient) -> None:
    assert slack.api_url == slack.url + "/api/"
    response = client.auth_test()
    assert (response["user_id"], response["bot_id"]) == ("UBOT", "BBOT")
    (call,) = slack.calls
    assert (call.method, call.path, call.name) == ("POST", "/api/auth.test", "auth.test")
    assert call.headers["authorization"] == f"Bearer {TOKEN}"


def test_root_url_with_slash_works_too(slack: FakeSlack) -> None:
    assert WebClient(token=TOKEN, base_url=slack.url + "/").auth_test()["user_id"] == "UBOT"


def test_messages_threads_updates_and_reactions(slack: FakeSlack, client: WebClient) -> None:
    root = client.chat_postMessage(channel="C1", text="Payments 5xx")
    reply = client.chat_postMessage(channel="C1", text="step 1 ok", thread_ts=root["ts"])
    assert float(root["ts"]) == pytest.approx(time.time(), abs=60)
    assert reply["ts"] > root["ts"]
    assert reply["message"]["thread_ts"] == root["ts"]
    assert reply["channel"] == "C1"

    client.chat_update(
        channel="C1",
        ts=root["ts"],
        text="Payments 5xx (resolved)",
        blocks=[{"type": "section", "text": {"type": "mrkdwn", "text": "*resolved*"}}],
    )
    client.reactions_add(channel="C1", timestamp=reply["ts"], name="white_check_mark")
    client.reactions_add(channel="C1", timestamp=reply["ts"], name="x")
    client.reactions_remove(channel="C1", timestamp=reply["ts"], name="x")

    first = slack.message("C1", root["ts"])
    assert first is not None
    assert visible_text(first) == "Payments 5xx (resolved)\n*resolved*"
    assert first["reply_count"] == 1
    assert [m["text"] for m in slack.thread("C1", root["ts"])] == [
        "Payments 5xx (resolved)",
        "step 1 ok",
    ]
    assert slack.thread("C1", root["ts"])[1]["reactions"] == [
        {"name": "white_check_mark", "users": ["UBOT"], "count": 1}
    ]
    assert len(slack.messages("C1")) == 2
    assert slack.messages("C2") == []


def test_json_and_form_bodies_are_both_parsed(slack: FakeSlack, client: WebClient) -> None:
    ts = client.chat_postMessage(channel="C1", text="hi")["ts"]  # JSON body
    client.reactions_add(channel="C1", timestamp=ts, name="eyes")  # form body
    post, react = slack.calls
    assert post.json == {"channel": "C1", "text": "hi"}
    assert react.json is None
    assert react.params == {"channel": "C1", "timestamp": ts, "name": "eyes"}


def test_a_channel_name_is_resolved_to_its_id(slack: FakeSlack, client: WebClient) -> None:
    posted = client.chat_postMessage(channel="#inc-payments", text="by name")
    assert posted["channel"] == "C1"
    assert [m["text"] for m in slack.messages("C1")] == ["by name"]
    assert client.chat_postMessage(channel="#elsewhere", text="unknown")["channel"] == "#elsewhere"
    listed = client.conversations_list()["channels"]
    assert [(c["id"], c["name"]) for c in listed] == [("C1", "inc-payments")]


def test_ephemeral_messages_are_not_in_the_channel(slack: FakeSlack, client: WebClient) -> None:
    response = client.chat_postEphemeral(channel="C1", user="U1", text="only you")
    assert response["message_ts"]
    assert slack.messages("C1") == []
    assert [(m["user"], m["text"]) for m in slack.ephemerals("C1")] == [("U1", "only you")]


def test_lookups(client: WebClient) -> None:
    assert client.usergroups_users_list(usergroup="S1")["users"] == ["U1", "U2"]
    assert client.users_info(user="U1")["user"]["name"] == "alice"
    assert client.conversations_info(channel="C1")["channel"]["name"] == "inc-payments"


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda c: c.users_info(user="U404"), "user_not_found"),
        (lambda c: c.conversations_info(channel="C404"), "channel_not_found"),
        (lambda c: c.usergroups_users_list(usergroup="S404"), "no_such_subteam"),
        (lambda c: c.chat_update(channel="C1", ts="1.2", text="x"), "message_not_found"),
        (lambda c: c.api_call("bogus.method"), "unknown_method"),
    ],
)
def test_errors_are_ok_false(
    client: WebClient, call: Callable[[WebClient], object], error: str
) -> None:
    with pytest.raises(SlackApiError) as raised:
        call(client)
    assert raised.value.response.status_code == 200
    assert raised.value.response["error"] == error


def test_token_is_required(slack: FakeSlack) -> None:
    with pytest.raises(SlackApiError) as raised:
        WebClient(base_url=slack.api_url).auth_test()
    assert raised.value.response["error"] == "not_authed"


def test_a_configured_token_must_match() -> None:
    with FakeSlack(token="xoxb-right") as slack, pytest.raises(SlackApiError) as raised:
        WebClient(token="xoxb-wrong", base_url=slack.api_url).auth_test()
    assert raised.value.response["error"] == "invalid_auth"


def test_rate_limit_is_retried_after_retry_after(slack: FakeSlack) -> None:
    retrying = WebClient(
        token=TOKEN,
        base_url=slack.api_url,
        retry_handlers=[RateLimitErrorRetryHandler(max_retry_count=1)],
    )
    slack.rate_limit("chat.postMessage", retry_after=1)
    started = time.monotonic()
    assert retrying.chat_postMessage(channel="C1", text="hello")["ok"]
    assert time.monotonic() - started >= 1
    calls = slack.calls_to("chat.postMessage")
    assert [c.status for c in calls] == [429, 200]
    assert calls[0].response == {"ok": False, "error": "ratelimited"}
    assert [m["text"] for m in slack.messages("C1")] == ["hello"]


def test_server_error_surfaces_as_slack_api_error(slack: FakeSlack, client: WebClient) -> None:
    slack.fail("chat.postMessage")
    with pytest.raises(SlackApiError) as raised:
        client.chat_postMessage(channel="C1", text="hello")
    assert raised.value.response.status_code == 500
    assert client.chat_postMessage(channel="C1", text="again")["ok"]  # only one fault queued


def test_wait_for_a_call_made_in_the_background(slack: FakeSlack, client: WebClient) -> None:
    timer = threading.Timer(0.1, lambda: client.chat_postMessage(channel="C1", text="late"))
    timer.start()
    call = slack.wait_for(lambda c: c.name == "chat.postMessage", timeout=5)
    timer.join()
    assert call.params["text"] == "late"
    assert slack.wait_until(lambda: slack.messages("C1"))[0]["text"] == "late"
    with pytest.raises(AssertionError, match=r"chat\.postMessage->200"):
        slack.wait_for_calls("chat.update", timeout=0.1)


def test_a_lost_answer_took_effect_but_the_client_cannot_know(slack: FakeSlack) -> None:
    impatient = WebClient(token=TOKEN, base_url=slack.api_url, timeout=1)
    slack.lose_answer("chat.postMessage", delay=3)
    with pytest.raises(TimeoutError):
        impatient.chat_postMessage(channel="C1", text="posted, answer lost")
    (call,) = slack.calls_to("chat.postMessage")
    assert (call.status, call.answered) == (200, False)
    assert [m["text"] for m in slack.messages("C1")] == ["posted, answer lost"]
    assert impatient.chat_postMessage(channel="C1", text="next")["ok"]  # only one was lost


def test_a_dropped_connection_loses_the_answer_too(slack: FakeSlack) -> None:
    # No retry handlers: slack_sdk's default one would post "second" again by itself.
    client = WebClient(token=TOKEN, base_url=slack.api_url, retry_handlers=[])
    slack.lose_answer("chat.postMessage", match=lambda params: params.get("text") == "second")
    client.chat_postMessage(channel="C1", text="first")  # does not match: answered
    with pytest.raises(OSError):
        client.chat_postMessage(channel="C1", text="second")
    assert [m["text"] for m in slack.messages("C1")] == ["first", "second"]
    assert [c.answered for c in slack.calls_to("chat.postMessage")] == [True, False]


@pytest.mark.parametrize("status", [500, 503])
def test_an_outage_fails_every_call_until_it_ends(
    slack: FakeSlack, client: WebClient, status: int
) -> None:
    slack.down(status)
    for _ in range(2):
        with pytest.raises(SlackApiError) as raised:
            client.chat_postMessage(channel="C1", text="lost")
        assert raised.value.response.status_code == status
    slack.up()
    assert client.chat_postMessage(channel="C1", text="back")["ok"]
    assert [m["text"] for m in slack.messages("C1")] == ["back"]
    assert [c.status for c in slack.calls_to("chat.postMessage")] == [status, status, 200]


def test_a_hanging_outage_ends_each_call_by_the_clients_timeout(slack: FakeSlack) -> None:
    impatient = WebClient(token=TOKEN, base_url=slack.api_url, timeout=1)
    slack.down(0)
    with pytest.raises(TimeoutError):
        impatient.chat_postMessage(channel="C1", text="hangs")
    slack.up()  # the hanging call is answered 503, long after its client gave up
    slack.wait_until(lambda: slack.calls_to("chat.postMessage"))
    assert slack.messages("C1") == []
    assert impatient.auth_test()["ok"]


def test_calls_note_when_they_were_answered(slack: FakeSlack, client: WebClient) -> None:
    before = time.monotonic()
    client.auth_test()
    client.auth_test()
    first, second = slack.calls
    assert before <= first.at <= second.at <= time.monotonic()


def test_metadata_is_read_back_only_when_asked_for(slack: FakeSlack, client: WebClient) -> None:
    metadata = {"event_type": "runbook_bot_message", "event_payload": {"outbox_id": 7}}
    root = client.chat_postMessage(channel="C1", text="root", metadata=metadata)
    client.chat_postMessage(channel="C1", text="reply", thread_ts=root["ts"], metadata=metadata)
    plain = client.conversations_history(channel="C1")["messages"]
    assert [m.get("metadata") for m in plain] == [None]
    history = client.conversations_history(channel="C1", include_all_metadata=True)
    assert [m["metadata"] for m in history["messages"]] == [metadata]  # roots only
    replies = client.conversations_replies(channel="C1", ts=root["ts"], include_all_metadata=True)
    assert [m["text"] for m in replies["messages"]] == ["root", "reply"]
    assert replies["messages"][1]["metadata"] == metadata


def test_latency_delays_answers(slack: FakeSlack, client: WebClient) -> None:
    slack.set_latency(0.2, "auth.test")
    started = time.monotonic()
    client.auth_test()
    assert time.monotonic() - started >= 0.2


# -- PagerDuty -----------------------------------------------------------------------------


def _status(error: pagerduty.HttpError) -> int:
    assert error.response is not None
    return int(error.response.status_code)


def _body(error: pagerduty.HttpError) -> Any:
    assert error.response is not None
    return error.response.json()


@pytest.fixture
def pd() -> Iterator[FakePagerDuty]:
    alerts = [make_alert("A1", "P1", details={"service": "payments", "error_rate": "7%"})]
    with FakePagerDuty(
        incidents={"P1": {"title": "Payments API elevated 5xx"}},
        alerts={"P1": [*alerts, {"id": "A2", "summary": "second"}]},
        escalation_policies={"PPOLICY": {"name": "Payments on-call"}},
    ) as fake:
        yield fake


@pytest.fixture
def pd_client(pd: FakePagerDuty) -> Iterator[pagerduty.RestApiV2Client]:
    client = pagerduty.RestApiV2Client(
        PD_KEY, default_from=PD_FROM, base_url=pd.url, verify=pd.client_ssl_context()
    )
    client.sleep_timer = 0.01  # the client ignores Retry-After and backs off from this
    with client:
        yield client


def test_get_incident(pd: FakePagerDuty, pd_client: pagerduty.RestApiV2Client) -> None:
    incident = pd_client.rget("/incidents/P1")
    assert (incident["id"], incident["title"]) == ("P1", "Payments API elevated 5xx")
    (call,) = pd.calls
    assert call.name == "GET /incidents/P1"
    assert call.headers["authorization"] == f"Token token={PD_KEY}"
    assert call.headers["from"] == PD_FROM


def test_list_alerts_with_details(pd_client: pagerduty.RestApiV2Client) -> None:
    alerts = pd_client.rget("/incidents/P1/alerts")
    assert alerts[0]["body"]["details"] == {"service": "payments", "error_rate": "7%"}
    paged = pd_client.list_all("/incidents/P1/alerts", page_size=1)
    assert [a["id"] for a in paged] == ["A1", "A2"]
    assert paged[1]["incident"]["id"] == "P1"


def test_post_note(pd: FakePagerDuty, pd_client: pagerduty.RestApiV2Client) -> None:
    note = pd_client.rpost("/incidents/P1/notes", json={"content": "cache cleared"})
    assert note["content"] == "cache cleared"
    assert [(n["content"], n["user"]["summary"]) for n in pd.notes("P1")] == [
        ("cache cleared", PD_FROM)
    ]


def test_put_incident_status(pd: FakePagerDuty, pd_client: pagerduty.RestApiV2Client) -> None:
    body = {"type": "incident_reference", "escalation_level": 2}
    assert pd_client.rput("/incidents/P1", json=body)["escalation_level"] == 2
    body = {"type": "incident_reference", "status": "resolved"}
    assert pd_client.rput("/incidents/P1", json=body)["status"] == "resolved"
    assert pd.incident("P1")["status"] == "resolved"
    assert [u["changes"] for u in pd.updates] == [{"escalation_level": 2}, {"status": "resolved"}]
    with pytest.raises(pagerduty.HttpError) as raised:
        pd_client.rput("/incidents/P1", json=body)
    assert _status(raised.value) == 400


def test_bulk_put_incidents(pd: FakePagerDuty, pd_client: pagerduty.RestApiV2Client) -> None:
    changes = [{"id": "P1", "type": "incident_reference", "status": "acknowledged"}]
    assert pd_client.rput("/incidents", json=changes)[0]["status"] == "acknowledged"
    assert pd.incident("P1")["status"] == "acknowledged"


def test_escalation_policy_and_not_found(pd_client: pagerduty.RestApiV2Client) -> None:
    assert pd_client.rget("/escalation_policies/PPOLICY")["name"] == "Payments on-call"
    with pytest.raises(pagerduty.HttpError) as raised:
        pd_client.rget("/incidents/P404")
    assert _body(raised.value) == {"error": {"message": "Not Found", "code": 2100}}


def test_server_error_surfaces(pd: FakePagerDuty, pd_client: pagerduty.RestApiV2Client) -> None:
    pd.fail("POST /incidents/P1/notes")
    with pytest.raises(pagerduty.ServerHttpError) as raised:
        pd_client.rpost("/incidents/P1/notes", json={"content": "x"})
    assert _status(raised.value) == 500
    assert pd.notes("P1") == []


def test_rate_limit_is_retried(pd: FakePagerDuty, pd_client: pagerduty.RestApiV2Client) -> None:
    pd.rate_limit("GET /incidents/P1", retry_after=1)
    assert pd_client.rget("/incidents/P1")["id"] == "P1"
    assert [c.status for c in pd.calls] == [429, 200]


@pytest.mark.parametrize("key", ["", "wrong-key"])
def test_bad_api_key_is_401(key: str) -> None:
    with FakePagerDuty(token=PD_KEY, incidents={"P1": {}}) as pd:
        client = pagerduty.RestApiV2Client(key, base_url=pd.url, verify=pd.client_ssl_context())
        with client, pytest.raises(pagerduty.HttpError) as raised:
            client.rget("/incidents/P1")
    assert _status(raised.value) == 401
    assert _body(raised.value)["error"]["code"] == 2006


def test_writes_need_a_from_header(pd: FakePagerDuty) -> None:
    client = pagerduty.RestApiV2Client(PD_KEY, base_url=pd.url, verify=pd.client_ssl_context())
    with client, pytest.raises(pagerduty.HttpError) as raised:
        client.rpost("/incidents/P1/notes", json={"content": "x"})
    assert _status(raised.value) == 400


def test_trusted_through_ssl_cert_file(pd: FakePagerDuty, monkeypatch: pytest.MonkeyPatch) -> None:
    """How a bot process reaches it: only PAGERDUTY_API_URL and SSL_CERT_FILE change."""
    assert pd.url.startswith("https://127.0.0.1:")
    monkeypatch.setenv("SSL_CERT_FILE", str(pd.ca_file))
    with pagerduty.RestApiV2Client(PD_KEY, default_from=PD_FROM, base_url=pd.url) as client:
        assert client.rget("/incidents/P1")["status"] == "triggered"
