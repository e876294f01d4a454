"""The Slack bot end to end: a real BotApp on waitress, signed requests, the real slack_sdk
client against a local stand-in for the Slack Web API, real commands, a real SQLite file.

Each test asserts what a person would see (the thread, the ephemeral notes), what ran
(the `guarded` step appends a line to ran.log) and what the audit log says.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSlack, visible_text
from slack_harness import (
    APPROVER,
    BOT_USER,
    CHANNEL,
    FAST,
    GROUP,
    GROUPIE,
    INCIDENT,
    SIGNING_SECRET,
    STRANGER,
    TOKEN,
    Bot,
    reaction_event,
    sign,
    wait_for,
    write_catalog,
)
from slack_sdk import WebClient

from bot import messages
from bot.chat.base import MessageRef, StepView
from bot.chat.slack import ChannelPacer, SlackChat, SlackTuning, step_blocks
from bot.engine import Incident

MakeBot = Callable[..., Bot]


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(usergroups={GROUP: [GROUPIE]}) as fake:
        yield fake


@pytest.fixture
def make_bot(tmp_path: Path, slack: FakeSlack) -> Iterator[MakeBot]:
    """Start a bot on tmp_path's catalog and database; a second call is a restart."""
    bots: list[Bot] = []

    def make(approval_timeout: str = "30s", check_prints: str = "'checked'", **config: Any) -> Bot:
        if not (tmp_path / "catalog.yaml").exists():
            write_catalog(tmp_path, approval_timeout=approval_timeout, check_prints=check_prints)
        bot = Bot(tmp_path, slack, **config)
        bots.append(bot)
        return bot

    yield make
    for bot in bots:
        bot.stop()


@pytest.fixture
def bot(make_bot: MakeBot) -> Bot:
    return make_bot()


def thread_of(bot: Bot) -> list[dict[str, Any]]:
    bot.flush()
    incident = bot.app.store.get_incident(INCIDENT.id)
    assert incident is not None
    return bot.slack.thread(incident["channel"], incident["thread_ts"])


def message_of(bot: Bot, step_id: str) -> dict[str, Any]:
    bot.flush()
    step = bot.step_run(step_id)
    message = bot.slack.message(step["channel"], step["message_ts"])
    assert message is not None
    return message


def text_of(bot: Bot, step_id: str) -> str:
    return visible_text(message_of(bot, step_id))


def wait_text(bot: Bot, step_id: str, *needles: str) -> str:
    def shown() -> str | None:
        text = text_of(bot, step_id)
        return text if all(n in text for n in needles) else None

    result: str = wait_for(shown, what=f"{step_id} message showing {needles}")
    return result


def ephemerals_to(slack: FakeSlack, user: str) -> list[dict[str, Any]]:
    return [m for m in slack.ephemerals() if m["user"] == user]


def blocks_text(message: dict[str, Any]) -> str:
    """What the Block Kit blocks show, without the plain-text fallback."""
    return visible_text({**message, "text": ""})


def reactions_by_bot(message: dict[str, Any]) -> list[str]:
    return [r["name"] for r in message.get("reactions", []) if BOT_USER in r["users"]]


# --- the happy path -------------------------------------------------------------------------


def test_incident_to_executed_step_by_reaction(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()

    root, check, guarded = thread_of(bot)
    root_text = visible_text(root)
    for shown in (
        "API elevated errors",
        "api",
        "high",
        "staging",
        "https://example.pagerduty.com/incidents/PINC001",
        "api-errors",
        "Catalog",
    ):
        assert shown in root_text
    assert root["blocks"] and root["text"]  # Block Kit with a plain-text fallback

    check_text = visible_text(check)
    assert "Step 1/3: check" in check_text
    assert "succeeded" in check_text and "checked" in check_text  # automatic: ran at once

    text = visible_text(guarded)
    assert "Step 2/3: guarded" in text
    assert "Clear the cache" in text
    assert "requires approval; scopes: staging" in text
    assert "/OK/" in text  # expected output
    assert "awaiting approval" in text
    assert f"<@{APPROVER}>" in text and f"<!subteam^{GROUP}>" in text  # who may approve
    assert "may approve until" in text and "UTC" in text  # and until when
    assert "```" in text  # the command in a code block
    assert guarded["blocks"] and "awaiting approval" in guarded["text"]
    assert reactions_by_bot(guarded) == ["white_check_mark", "x", "double_vertical_bar"]
    assert bot.runs() == []

    started = time.monotonic()
    response = bot.react(APPROVER, "white_check_mark::skin-tone-2")
    assert response.status_code == 200
    assert time.monotonic() - started < 3  # Slack's deadline, with a wide margin

    bot.settle()
    assert bot.status("after") == "success"
    assert bot.runs() == ["ran"]  # the command ran, once
    text = wait_text(bot, "guarded", "succeeded")
    assert f"approved by <@{APPROVER}>" in text
    assert "OK" in text and "s," in text  # output excerpt and duration
    # updated in place: still the same message, no second one for the step
    assert [m["ts"] for m in thread_of(bot)].count(bot.step_run("guarded")["message_ts"]) == 1
    assert "Runbook finished" in visible_text(
        wait_for(
            lambda: next((m for m in thread_of(bot) if "Runbook finished" in m["text"]), None),
            what="the closing note",
        )
    )
    assert slack.ephemerals() == []

    assert bot.events() == [
        ("matched", None, None),
        ("executed", "check", None),
        ("succeeded", "check", None),
        ("requires_manual", "guarded", None),
        ("approved", "guarded", APPROVER),
        ("executed", "guarded", APPROVER),
        ("succeeded", "guarded", None),
        ("executed", "after", None),
        ("succeeded", "after", None),
    ]


def test_each_step_message_shows_the_decision_and_why(bot: Bot) -> None:
    bot.open_incident()
    auto = "auto-run (safe for automation: runs without approval)"
    guarded = "needs approval (requires approval by an authorized responder)"
    for step_id, decision in (("check", auto), ("guarded", guarded)):
        message = message_of(bot, step_id)
        assert f"Decision: {decision}" in message["text"]  # the plain-text fallback
        assert f"*Decision:* {decision}" in blocks_text(message)  # Block Kit

    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    message = message_of(bot, "guarded")  # decided and run: the decision stays on record
    assert "succeeded" in message["text"] and f"Decision: {guarded}" in message["text"]
    assert f"Decision: {auto}" in message_of(bot, "after")["text"]


def test_a_blocked_step_says_why_once(bot: Bot) -> None:
    bot.open_incident(
        Incident(id="PINC003", title="API elevated errors", service="api", env="prod")
    )
    message = message_of(bot, "check")
    why = "check is not allowed in prod (scopes: dev, staging). To allow it: runbookctl promote"
    assert f"Decision: blocked: {why}" in message["text"]
    assert f"*Decision:* blocked: {why}" in blocks_text(message)
    assert message["text"].count("is not allowed in prod") == 1  # the status line: ⛔ blocked
    assert "⛔ blocked" in blocks_text(message)


def test_blocked_at_the_last_check_shows_that_checks_reason() -> None:
    # Offered as automatic, then a reloaded catalog took the scope away before it ran.
    view = StepView(
        incident_id="P1",
        step_run_id=1,
        step_id="check",
        action_id="check",
        index=1,
        total=1,
        name="Check",
        description="",
        command="true",
        shell=False,
        requires_approval=False,
        scopes=("staging",),
        env="prod",
        expect=(),
        state="blocked",
        reason="safe for automation: runs without approval",
        decision="auto",
        detail="check is not allowed in prod (scopes: staging)",
    )
    text = messages.step_text(view, messages.DEFAULT_REACTIONS)
    assert "Decision: auto-run (safe for automation: runs without approval)" in text
    assert "⛔ blocked: check is not allowed in prod (scopes: staging)" in text
    blocks = visible_text({"text": "", "blocks": step_blocks(view, messages.DEFAULT_REACTIONS)})
    assert "⛔ blocked: check is not allowed in prod" in blocks


def test_without_a_runbook_the_thread_says_how_to_add_one(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident(
        Incident(id="PINC009", title="Disk full on batch-7", service="batch", env="staging")
    )
    bot.flush()
    (root,) = slack.messages(CHANNEL)  # the catalog's default channel; no steps follow
    text = visible_text(root)
    assert "Disk full on batch-7" in text
    assert "No runbook matches this incident" in text
    assert "match.services: [batch]" in text and "runbookctl simulate" in text
    assert bot.events() == [("no_runbook", None, None)]


def test_output_in_the_thread_is_masked_and_capped(make_bot: MakeBot) -> None:
    bot = make_bot(check_prints="'checked ' + 'x' * 20000 + ' token xoxb-1234567890-abcdefghij'")
    bot.open_incident()
    message = message_of(bot, "check")
    text = visible_text(message)
    assert "succeeded" in text
    assert "token " in text and "xoxb-1234567890" not in text  # the end, token masked
    assert len(message["text"]) < 6000  # an excerpt, not 20 kB
    assert all(len(b.get("text", {}).get("text", "")) <= 3000 for b in message["blocks"])


def test_message_is_updated_in_place_while_the_step_runs(bot: Bot) -> None:
    (bot.root / "gate").unlink()  # the command waits for the gate
    bot.open_incident()
    ts = bot.step_run("guarded")["message_ts"]

    bot.react(APPROVER, "white_check_mark")
    text = wait_text(bot, "guarded", "running", f"approved by <@{APPROVER}>")
    assert "awaiting approval" not in text
    wait_for(lambda: bot.runs() == ["ran"], what="the command to start")

    (bot.root / "gate").touch()
    wait_text(bot, "guarded", "succeeded", "OK")
    assert bot.step_run("guarded")["message_ts"] == ts
    updates = [c for c in bot.slack.calls_to("chat.update") if c.params["ts"] == ts]
    assert len(updates) >= 2  # running, then the result


def test_member_of_an_approver_group_may_approve_and_groups_are_cached(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    bot.react(GROUPIE, "double_vertical_bar")
    wait_for(lambda: ("paused", "guarded", GROUPIE) in bot.events(), what="the pause")
    bot.react(GROUPIE, "white_check_mark")
    wait_for(lambda: bot.status("guarded") == "success", what="the step to run")
    assert bot.runs() == ["ran"]
    assert ("approved", "guarded", GROUPIE) in bot.events()
    lookups = slack.calls_to("usergroups.users.list")
    assert [c.params["usergroup"] for c in lookups] == [GROUP]  # once, then cached


def test_configured_aliases_approve_and_reject(make_bot: MakeBot) -> None:
    bot = make_bot(approve_reactions=("white_check_mark", "+1"), reject_reactions=("x", "no_entry"))
    bot.open_incident()
    bot.react(APPROVER, "+1::skin-tone-5")
    wait_for(lambda: bot.status("guarded") == "success", what="approval by an alias")
    assert bot.runs() == ["ran"]


def test_the_step_text_names_the_reactions_the_bot_added(make_bot: MakeBot) -> None:
    bot = make_bot(
        approve_reactions=("+1", "white_check_mark"),
        reject_reactions=("no_entry", "x"),
        pause_reactions=("hourglass",),
    )
    bot.open_incident()
    message = message_of(bot, "guarded")
    assert reactions_by_bot(message) == ["+1", "no_entry", "hourglass"]
    instructions = "React :+1: to approve, :no_entry: to reject, :hourglass: to pause."
    assert instructions in blocks_text(message)  # Block Kit
    assert instructions in message["text"]  # and the plain-text fallback
    assert ":white_check_mark:" not in visible_text(message)

    bot.react(APPROVER, "hourglass")  # an update re-renders the text: still the same names
    wait_text(bot, "guarded", f"paused by <@{APPROVER}>", instructions)
    bot.react(APPROVER, "white_check_mark")  # a later alias still approves
    wait_for(lambda: bot.status("guarded") == "success", what="approval by the second alias")


# --- reactions that change nothing ------------------------------------------------------------


def test_unauthorized_reaction_runs_nothing_and_tells_the_user_why(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    assert bot.react(STRANGER, "white_check_mark").status_code == 200

    note = wait_for(lambda: ephemerals_to(slack, STRANGER), what="the ephemeral note")[0]
    assert "changed nothing" in note["text"]
    assert f"<@{STRANGER}> is not among the approvers" in note["text"]
    assert note["channel"] == CHANNEL
    assert note["thread_ts"] == thread_of(bot)[0]["ts"]  # shown in the incident thread
    assert bot.status("guarded") == "awaiting_approval"
    assert bot.runs() == []
    assert ("unauthorized", "guarded", STRANGER) in bot.events()
    assert "awaiting approval" in text_of(bot, "guarded")


def test_the_bots_own_reactions_are_ignored_silently(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    for reaction in ("white_check_mark", "x", "double_vertical_bar"):
        assert bot.react(BOT_USER, reaction).status_code == 200
    bot.react(STRANGER, "x")  # something that does answer, to know the others were handled
    wait_for(lambda: ephemerals_to(slack, STRANGER), what="the stranger's note")

    assert ephemerals_to(slack, BOT_USER) == []
    assert bot.status("guarded") == "awaiting_approval"
    assert not [e for e in bot.events() if e[2] == BOT_USER]


def test_a_reaction_on_a_decided_step_changes_nothing(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    bot.react(APPROVER, "white_check_mark")
    wait_for(lambda: bot.status("guarded") == "success", what="the step to run")

    bot.react(GROUPIE, "white_check_mark")
    bot.react(APPROVER, "x")
    notes = wait_for(lambda: len(slack.ephemerals()) == 2 and slack.ephemerals(), what="2 notes")
    assert all("already decided (success)" in n["text"] for n in notes)
    assert bot.runs() == ["ran"]
    assert [e for e in bot.events() if e[0] in ("approved", "rejected")] == [
        ("approved", "guarded", APPROVER)
    ]


def test_other_reactions_and_other_messages_are_ignored(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    incident = bot.app.store.get_incident(INCIDENT.id)
    assert incident is not None
    assert bot.react(APPROVER, "eyes").status_code == 200
    root_reaction = reaction_event(APPROVER, "white_check_mark", CHANNEL, incident["thread_ts"])
    assert bot.signed(root_reaction).status_code == 200
    assert bot.react(APPROVER, "white_check_mark", added=False).status_code == 200

    assert bot.deliveries() == []
    assert slack.ephemerals() == []
    assert bot.status("guarded") == "awaiting_approval"


# --- reject, pause, expiry ------------------------------------------------------------------


def test_reject_skips_the_step_and_the_runbook_follows_on_failure(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    bot.react(APPROVER, "x")

    bot.settle()
    assert bot.status("after") == "success"  # on_failure: continue
    assert bot.status("guarded") == "rejected"
    assert bot.runs() == []
    assert f"rejected by <@{APPROVER}>" in wait_text(bot, "guarded", "rejected")
    statuses = [(s, step) for s, step, _ in bot.events() if step == "guarded"]
    assert statuses == [("requires_manual", "guarded"), ("rejected", "guarded")]
    assert slack.ephemerals() == []


def test_pause_holds_the_deadline_until_the_pause_is_removed(make_bot: MakeBot) -> None:
    bot = make_bot(approval_timeout="30s")
    clock = [time.time()]
    bot.app.engine.clock = lambda: clock[0]
    bot.open_incident()
    requested = bot.app.store.get_approval(bot.step_run("guarded")["id"])
    assert requested is not None
    deadline = requested["expires_at"]

    bot.react(APPROVER, "double_vertical_bar")
    wait_for(lambda: ("paused", "guarded", APPROVER) in bot.events(), what="the pause")
    assert f"paused by <@{APPROVER}>" in wait_text(bot, "guarded", "paused by")

    clock[0] += 60  # the original deadline passes while paused
    bot.app.engine.expire_due()
    assert bot.status("guarded") == "awaiting_approval"

    bot.react(APPROVER, "double_vertical_bar", added=False)
    wait_for(lambda: ("resumed", "guarded", APPROVER) in bot.events(), what="the resume")
    approval = bot.app.store.get_approval(bot.step_run("guarded")["id"])
    assert approval is not None
    assert approval["expires_at"] == pytest.approx(deadline + 60)  # moved by the pause
    wait_text(bot, "guarded", "may approve until")

    clock[0] += 25  # 85 s after the start: before the moved deadline
    bot.app.engine.expire_due()
    assert bot.status("guarded") == "awaiting_approval"

    clock[0] += 10  # and now after it
    bot.app.engine.expire_due()
    assert bot.status("guarded") == "expired"
    assert bot.runs() == []


def test_expiry_escalates_and_a_late_reaction_changes_nothing(
    make_bot: MakeBot, slack: FakeSlack
) -> None:
    bot = make_bot(approval_timeout="300ms")
    bot.open_incident()

    wait_for(lambda: bot.status("guarded") == "expired", what="the expiry timer")
    wait_text(bot, "guarded", "approval expired")
    escalation = wait_for(
        lambda: next((m for m in thread_of(bot) if "Escalating" in m["text"]), None),
        what="the escalation note",
    )
    assert "<!subteam^S0LEADS>" in escalation["text"]
    assert "expired" in escalation["text"]
    assert [e[0] for e in bot.events()][-2:] == ["expired", "escalated"]

    bot.react(APPROVER, "white_check_mark")
    note = wait_for(lambda: ephemerals_to(slack, APPROVER), what="the late note")[0]
    assert "already decided (expired)" in note["text"]
    assert bot.runs() == []
    # the run stopped there: the step after it never started
    assert not bot.app.store.query("SELECT 1 FROM step_runs WHERE step_id = 'after'")


# --- duplicates and races -------------------------------------------------------------------


def test_duplicate_deliveries_change_nothing_twice(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    step = bot.step_run("guarded")
    payload = reaction_event(APPROVER, "white_check_mark", step["channel"], step["message_ts"])

    assert bot.signed(payload).status_code == 200
    # Slack retries with the same event_id when it thinks we were slow
    assert (
        bot.signed(
            payload, **{"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"}
        ).status_code
        == 200
    )
    assert (
        bot.signed(
            payload, **{"X-Slack-Retry-Num": "2", "X-Slack-Retry-Reason": "http_timeout"}
        ).status_code
        == 200
    )

    bot.settle()
    assert bot.status("after") == "success"
    assert bot.runs() == ["ran"]
    assert len(bot.deliveries()) == 1
    assert [e for e in bot.events() if e[0] == "approved"] == [("approved", "guarded", APPROVER)]
    assert slack.ephemerals() == []


def test_racing_approvals_run_the_step_exactly_once(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    step = bot.step_run("guarded")
    payloads = [
        reaction_event(user, "white_check_mark", step["channel"], step["message_ts"])
        for user in (APPROVER, GROUPIE, APPROVER, GROUPIE)
    ]
    statuses: list[int] = []
    start = threading.Barrier(len(payloads))

    def send(payload: dict[str, Any]) -> None:
        start.wait()
        statuses.append(bot.signed(payload).status_code)

    threads = [threading.Thread(target=send, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert statuses == [200] * 4
    wait_for(lambda: len(slack.ephemerals()) == 3, what="three 'already decided' notes")
    assert bot.runs() == ["ran"]
    assert len([e for e in bot.events() if e[0] == "approved"]) == 1
    assert len([e for e in bot.events() if e[:2] == ("executed", "guarded")]) == 1
    assert all("already decided" in n["text"] for n in slack.ephemerals())


# --- restarts ---------------------------------------------------------------------------------


def test_a_reaction_after_a_restart_runs_the_step_once(make_bot: MakeBot, slack: FakeSlack) -> None:
    first = make_bot()
    first.open_incident()
    ts = first.step_run("guarded")["message_ts"]
    first.stop()

    second = make_bot()  # same catalog, same database: a new process
    assert second.react(APPROVER, "white_check_mark").status_code == 200
    second.settle()
    assert second.status("after") == "success"
    assert second.runs() == ["ran"]
    assert second.step_run("guarded")["message_ts"] == ts
    assert "succeeded" in text_of(second, "guarded")
    assert len([m for m in slack.messages(CHANNEL) if m.get("thread_ts") == ts]) == 0
    assert slack.ephemerals() == []


def test_pending_expiry_is_rescheduled_after_a_restart(make_bot: MakeBot) -> None:
    first = make_bot(approval_timeout="500ms")
    first.open_incident()
    first.stop()

    second = make_bot()
    assert second.status("guarded") in ("awaiting_approval", "expired")
    wait_for(lambda: second.status("guarded") == "expired", what="expiry after the restart")
    wait_text(second, "guarded", "approval expired")
    wait_for(lambda: ("escalated", None, None) in second.events(), what="the escalation")


def test_a_reaction_acknowledged_but_not_handled_before_a_stop_is_handled_at_start(
    make_bot: MakeBot, slack: FakeSlack
) -> None:
    first = make_bot()
    first.open_incident()
    first.app.pool.shutdown(0)  # the process is going down: no worker will take it
    assert first.react(APPROVER, "white_check_mark").status_code == 200
    assert [d["status"] for d in first.deliveries()] == ["queued"]  # recorded before the 200
    first.stop()
    assert first.runs() == []

    second = make_bot()
    second.settle()
    assert second.status("after") == "success"
    assert second.runs() == ["ran"]
    assert [d["status"] for d in second.deliveries()] == ["done"]


# --- a Slack that is slow, rate limiting or failing -------------------------------------------


def test_429_retry_after_is_honoured(bot: Bot, slack: FakeSlack) -> None:
    slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    started = time.monotonic()
    bot.open_incident()
    assert time.monotonic() - started >= 1.0  # waited as long as Slack asked

    posts = slack.calls_to("chat.postMessage")
    assert [c.status for c in posts[:2]] == [429, 200]
    assert posts[0].params["text"] == posts[1].params["text"]  # the same post, retried
    assert len(thread_of(bot)) == 3  # root, check, guarded: nothing lost, nothing doubled


def test_a_rate_limited_update_does_not_delay_the_command(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    slack.rate_limit("chat.update", times=1, retry_after=1)
    started = time.monotonic()
    bot.react(APPROVER, "white_check_mark")
    wait_for(lambda: bot.runs(), what="the command to start")
    assert time.monotonic() - started < 1.0  # the update waits; the command does not
    wait_text(bot, "guarded", "succeeded")


def test_500s_are_retried_and_a_failing_slack_loses_no_state(bot: Bot, slack: FakeSlack) -> None:
    slack.fail("chat.postMessage", status=500, times=1)
    bot.open_incident()
    assert len(thread_of(bot)) == 3  # the first post was retried
    assert [c.status for c in slack.calls_to("chat.postMessage")][:2] == [500, 200]

    # Slack fails every attempt (with retries) to post the next step...
    slack.fail("chat.postMessage", status=500, times=3)
    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    # ...yet the step ran, was recorded, and its message appeared once Slack answered.
    assert bot.runs() == ["ran"]
    assert "succeeded" in wait_text(bot, "after", "succeeded")
    assert [c.status for c in slack.calls_to("chat.postMessage")].count(500) == 4


# --- the request itself --------------------------------------------------------------------


def test_forged_or_stale_signatures_are_rejected_and_change_nothing(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    bot.flush()
    calls_before = len(slack.calls)
    step = bot.step_run("guarded")
    body = json.dumps(
        reaction_event(APPROVER, "white_check_mark", step["channel"], step["message_ts"])
    )

    forged = sign(body, secret="not-the-secret")
    stale = sign(body, timestamp=int(time.time()) - 10 * 60)
    tampered = {**sign(body), "X-Slack-Signature": sign(body)["X-Slack-Signature"][:-2] + "00"}
    unsigned = {"Content-Type": "application/json"}
    for headers in (forged, stale, tampered, unsigned):
        assert bot.post(body, headers).status_code == 401

    assert bot.deliveries() == []
    assert bot.status("guarded") == "awaiting_approval"
    assert bot.runs() == []
    assert len(slack.calls) == calls_before
    metrics = bot.http.get("/metrics").text
    assert 'runbook_webhook_deliveries_total{outcome="rejected",source="slack"} 4.0' in metrics


def test_url_verification_is_answered(bot: Bot) -> None:
    response = bot.signed({"token": "t", "challenge": "ch4ll3nge", "type": "url_verification"})
    assert response.status_code == 200
    assert "ch4ll3nge" in response.text


def test_titles_and_outputs_cannot_mention_or_link(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident(
        Incident(
            id="PINC002",
            title="errors elevated errors <!channel> & <https://evil|click>",
            service="api",
            env="staging",
        )
    )
    bot.flush()
    root = slack.messages(CHANNEL)[0]
    for shown in (
        root["text"],
        *(b.get("text", {}).get("text", "") for b in root["blocks"] if b["type"] != "header"),
    ):
        assert "<!channel>" not in shown and "<https://evil" not in shown
    assert "&lt;!channel&gt; &amp;" in root["text"]


# --- pacing -----------------------------------------------------------------------------------


def test_posts_to_one_channel_are_paced(slack: FakeSlack) -> None:
    client = WebClient(token=TOKEN, base_url=slack.api_url)
    chat = SlackChat(client, pacer=ChannelPacer(0.05, burst=2))
    try:
        thread = MessageRef("CPACED", "1.0")
        started = time.monotonic()
        for i in range(6):
            chat.post_note(thread, f"note {i}")
        chat.post_note(MessageRef("COTHER", "1.0"), "another channel is not held up")
        elapsed = time.monotonic() - started
    finally:
        chat.close()
    assert elapsed >= 4 * 0.05 * 0.9  # 2 at once, then 4 spaced by the interval
    assert [m["text"] for m in slack.messages("CPACED")] == [f"note {i}" for i in range(6)]


def test_pacer_allows_a_burst_then_spaces_posts() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)

    pacer = ChannelPacer(1.0, burst=3, clock=lambda: now[0], sleep=sleep)
    waits = [pacer.wait("C1") for _ in range(5)]
    assert waits == [0.0, 0.0, 0.0, 1.0, 2.0]  # the 4th and 5th queue up behind the burst
    assert pacer.wait("C2") == 0.0  # channels are independent
    now[0] += 10
    assert pacer.wait("C1") == 0.0  # refilled


def test_slack_tuning_defaults_are_production_values() -> None:
    tuning = SlackTuning()
    assert tuning.pacing_interval == 1.0 and tuning.pacing_burst >= 1
    assert tuning.rate_limit_retries >= 1 and tuning.server_error_retries >= 1
    assert FAST.pacing_interval == 0.0
    assert SIGNING_SECRET  # the harness signs with the secret the bot is given
