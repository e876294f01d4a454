"""The Slack bot end to end: a real BotApp on waitress, signed requests, the real slack_sdk
client against a local stand-in for the Slack Web API, real commands under their step
supervisors, a real SQLite file.

Each test asserts what a person would see (the thread, the ephemeral notes), what ran
(the `guarded` step appends a line to ran.log) and what the audit log says.

What the stand-in (tests/fakes/slack_api.py) models: Slack's Web API methods the bot
calls, answered as Slack does (``{"ok": …}``, message ``ts`` from the clock, threads,
metadata read back only with ``include_all_metadata``), and the failures of a real
Slack: 429 with ``Retry-After``, 5xx, an outage where every call fails or hangs until
the client's timeout, and a call that takes effect while its answer never arrives.
It does not model Slack's own rate limiting (the tests count calls instead), nor the
Events API side: tests post signed events to the bot as Slack would.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import Call, FakeSlack, visible_text
from slack_harness import (
    APPROVER,
    BOT_USER,
    CHANNEL,
    FAST,
    GROUP,
    GROUPIE,
    INCIDENT,
    OTHER_CHANNEL,
    SIGNING_SECRET,
    STRANGER,
    TOKEN,
    Bot,
    BotProcess,
    process_env,
    reaction_event,
    sign,
    wait_for,
    write_catalog,
)
from slack_sdk import WebClient

from bot import effects, messages
from bot.chat.base import StepView
from bot.chat.slack import (
    METADATA_TYPE,
    SLACK_BUDGETS,
    SlackTransport,
    SlackTuning,
    step_blocks,
)
from bot.config import Secret
from bot.engine import Incident
from bot.outbox import Budgets
from bot.pagerduty import sign as sign_pagerduty
from bot.states import Refusal, StepStatus
from bot.store import OutboxItem

MakeBot = Callable[..., Bot]
OTHER = Incident(id="PDB001", title="Database errors", service="db", env="staging")


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


def thread_of(bot: Bot, incident_id: str = INCIDENT.id) -> list[dict[str, Any]]:
    bot.flush()
    incident = bot.app.store.incident(incident_id)
    assert incident is not None and incident.thread_ts
    return bot.slack.thread(incident.channel, incident.thread_ts)


def message_of(bot: Bot, step_id: str, incident_id: str | None = None) -> dict[str, Any]:
    bot.flush()
    channel, ts = bot.message_ref(step_id, incident_id)
    message = bot.slack.message(channel, ts)
    assert message is not None
    return message


def text_of(bot: Bot, step_id: str, incident_id: str | None = None) -> str:
    return visible_text(message_of(bot, step_id, incident_id))


def wait_text(bot: Bot, step_id: str, *needles: str, incident_id: str | None = None) -> str:
    def shown() -> str | None:
        text = text_of(bot, step_id, incident_id)
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


def outbox_id(metadata: Any) -> int | None:
    """The outbox row a message (or a chat.postMessage call) names in its metadata."""
    if isinstance(metadata, str):
        metadata = json.loads(metadata)
    if not isinstance(metadata, dict) or metadata.get("event_type") != METADATA_TYPE:
        return None
    found = (metadata.get("event_payload") or {}).get("outbox_id")
    return int(found) if found is not None else None


def posts_per_row(slack: FakeSlack) -> Counter[int | None]:
    """chat.postMessage calls that took effect, per outbox row (by their metadata)."""
    return Counter(
        outbox_id(c.params.get("metadata"))
        for c in slack.calls_to("chat.postMessage")
        if c.status == 200
    )


def messages_per_row(slack: FakeSlack, channel: str = CHANNEL) -> Counter[int | None]:
    return Counter(outbox_id(m.get("metadata")) for m in slack.messages(channel))


def updates_of(slack: FakeSlack, ts: str) -> list[Call]:
    return [c for c in slack.calls_to("chat.update") if c.params.get("ts") == ts]


def expire_due(bot: Bot) -> None:
    """What the expiry timer does, now: due deadlines into the inbox, then applied."""
    for item in bot.app.engine.due_expiries():
        bot.app.inbox.put(**item)
    bot.settle()


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

    response = bot.react(APPROVER, "white_check_mark::skin-tone-2")
    assert response.status_code == 200
    # Answered once recorded: the reaction is in the inbox, durably, before the 200.
    assert [item.kind for item in bot.deliveries()] == ["step.approve"]

    bot.settle()
    assert bot.status("after") == "success"
    assert bot.runs() == ["ran"]  # the command ran, once
    text = wait_text(bot, "guarded", "succeeded")
    assert f"approved by <@{APPROVER}>" in text
    assert "OK" in text and "s," in text  # output excerpt and duration
    # updated in place: the thread is root, three steps and the closing note, each once
    thread = thread_of(bot)
    assert [visible_text(m).splitlines()[0] for m in thread[1:4]] == [
        "Step 1/3: check — Error rate of the service",
        "Step 2/3: guarded — Clear the cache",
        "Step 3/3: after — Error rate of the service",
    ]
    assert len(thread) == 5 and "Runbook finished" in thread[-1]["text"]
    assert set(messages_per_row(slack).values()) == {1}
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
    _, ts = bot.message_ref("guarded")

    bot.react(APPROVER, "white_check_mark")
    text = wait_text(bot, "guarded", "running", f"approved by <@{APPROVER}>")
    assert "awaiting approval" not in text
    wait_for(lambda: bot.runs() == ["ran"], what="the command to start")

    (bot.root / "gate").touch()
    wait_text(bot, "guarded", "succeeded", "OK")
    assert bot.message_ref("guarded")[1] == ts
    assert len(updates_of(bot.slack, ts)) >= 2  # running, then the result


def test_step_messages_carry_the_latest_rendering(bot: Bot, slack: FakeSlack) -> None:
    """A step that finished before its message could be posted is posted finished: the
    result merges into the pending post instead of following it as an update."""
    slack.down(503)
    bot.open_incident(settle=False)
    wait_for(lambda: bot.status("check") == "success", what="check to run while Slack is down")
    wait_for(bot.idle, what="the bot to have done all it can without Slack")
    slack.up()
    bot.flush()

    check = message_of(bot, "check")
    assert "succeeded" in check["text"] and "checked" in check["text"]
    assert updates_of(slack, check["ts"]) == []  # posted once, finished
    assert posts_per_row(slack)[outbox_id(check["metadata"])] == 1
    assert "awaiting approval" in text_of(bot, "guarded")


def test_updates_of_one_message_coalesce_and_the_last_rendering_wins(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    _, ts = bot.message_ref("guarded")
    slack.down(503)  # five renderings of the message pile up while Slack cannot take them
    for added in (True, False, True, False, True):
        assert bot.react(APPROVER, "double_vertical_bar", added=added).status_code == 200
    wait_for(bot.idle, what="the five decisions applied")
    decisions = [e[0] for e in bot.events() if e[0] in ("paused", "resumed")]
    assert decisions == ["paused", "resumed", "paused", "resumed", "paused"]
    slack.up()
    bot.flush()

    sent = [c for c in updates_of(slack, ts) if c.status == 200]
    assert 1 <= len(sent) < 5  # fewer updates than renderings
    final = message_of(bot, "guarded")
    assert f"paused by <@{APPROVER}>" in final["text"]  # the last rendering won
    assert sent[-1].params["text"] == final["text"]


def test_member_of_an_approver_group_may_approve_and_groups_are_cached(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    bot.react(GROUPIE, "double_vertical_bar")
    bot.settle()
    assert ("paused", "guarded", GROUPIE) in bot.events()

    # A ✅ while ⏸️ stands is refused, and the note says who paused and what to do.
    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    (note,) = ephemerals_to(slack, APPROVER)
    assert note["text"] == (
        f"Your decision on guarded changed nothing: paused by <@{GROUPIE}>; "
        "press Resume (or remove :double_vertical_bar:) first."
    )
    assert bot.status("guarded") == "awaiting_approval" and bot.runs() == []
    assert ("refused", "guarded", APPROVER) in bot.events()

    bot.react(GROUPIE, "double_vertical_bar", added=False)
    bot.settle()
    assert ("resumed", "guarded", GROUPIE) in bot.events()
    bot.react(GROUPIE, "white_check_mark")
    bot.settle()
    assert bot.status("guarded") == "success"
    assert bot.runs() == ["ran"]
    assert ("approved", "guarded", GROUPIE) in bot.events()
    lookups = slack.calls_to("usergroups.users.list")
    assert [c.params["usergroup"] for c in lookups] == [GROUP]  # once, then cached


def test_configured_aliases_approve_and_reject(make_bot: MakeBot) -> None:
    bot = make_bot(approve_reactions=("white_check_mark", "+1"), reject_reactions=("x", "no_entry"))
    bot.open_incident()
    bot.react(APPROVER, "+1::skin-tone-5")
    bot.settle()
    assert bot.status("guarded") == "success"
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
    instructions = "react :+1: to approve, :no_entry: to reject, :hourglass: to pause."
    assert instructions in blocks_text(message)  # Block Kit
    assert instructions in message["text"]  # and the plain-text fallback
    assert ":white_check_mark:" not in visible_text(message)

    bot.react(APPROVER, "hourglass")  # an update re-renders the text: still the same names
    wait_text(bot, "guarded", f"paused by <@{APPROVER}>", instructions)
    bot.react(APPROVER, "hourglass", added=False)  # removing the pause alias resumes
    wait_text(bot, "guarded", "may approve until", instructions)
    bot.react(APPROVER, "white_check_mark")  # a later alias still approves
    bot.settle()
    assert bot.status("guarded") == "success"


# --- reactions that change nothing ------------------------------------------------------------


def test_unauthorized_reaction_runs_nothing_and_tells_the_user_why(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    assert bot.react(STRANGER, "white_check_mark").status_code == 200

    bot.settle()
    (note,) = ephemerals_to(slack, STRANGER)
    assert note["text"].startswith("Your decision on guarded changed nothing: ")
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
    bot.settle()
    assert len(ephemerals_to(slack, STRANGER)) == 1

    assert ephemerals_to(slack, BOT_USER) == []
    assert bot.deliveries()[0].payload["user"] == STRANGER  # the bot's were not even recorded
    assert bot.status("guarded") == "awaiting_approval"
    assert not [e for e in bot.events() if e[2] == BOT_USER]


def test_a_reaction_on_a_decided_step_changes_nothing(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    assert bot.status("guarded") == "success"

    bot.react(GROUPIE, "white_check_mark")
    bot.react(APPROVER, "x")
    bot.settle()
    notes = slack.ephemerals()
    assert len(notes) == 2
    assert all(
        "changed nothing: this step was already decided (success)" in n["text"] for n in notes
    )
    assert bot.runs() == ["ran"]
    assert [e for e in bot.events() if e[0] in ("approved", "rejected")] == [
        ("approved", "guarded", APPROVER)
    ]


def test_other_reactions_and_other_messages_are_ignored(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    incident = bot.app.store.incident(INCIDENT.id)
    assert incident is not None and incident.thread_ts
    assert bot.react(APPROVER, "eyes").status_code == 200
    root_reaction = reaction_event(APPROVER, "white_check_mark", CHANNEL, incident.thread_ts)
    assert bot.signed(root_reaction).status_code == 200
    assert bot.react(APPROVER, "white_check_mark", added=False).status_code == 200
    elsewhere = reaction_event(APPROVER, "white_check_mark", CHANNEL, "1234.5678")
    assert bot.signed(elsewhere).status_code == 200

    # A reaction on a message the bot does not know is kept aside, in case it turns out
    # to be one of the bot's whose post was not recorded yet; it changes nothing.
    assert [(d.payload["ts"], str(d.status)) for d in bot.deliveries()] == [("1234.5678", "parked")]
    bot.settle()
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


class ManualClock:
    """The engine's and the store's clock, moved by the test (deadlines are judged on it)."""

    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


def test_pause_holds_the_deadline_until_the_pause_is_removed(make_bot: MakeBot) -> None:
    bot = make_bot(approval_timeout="30s")
    clock = ManualClock()
    bot.app.engine.clock = clock
    bot.app.store.clock = clock  # receipt times of reactions
    bot.open_incident()
    requested = bot.app.store.approval(bot.step_run("guarded").id)
    assert requested is not None
    deadline = requested.expires_at

    bot.react(APPROVER, "double_vertical_bar")
    bot.settle()
    assert ("paused", "guarded", APPROVER) in bot.events()
    assert f"paused by <@{APPROVER}>" in wait_text(bot, "guarded", "paused by")

    clock.advance(60)  # the original deadline passes while paused
    expire_due(bot)
    assert bot.status("guarded") == "awaiting_approval"

    bot.react(APPROVER, "double_vertical_bar", added=False)
    bot.settle()
    assert ("resumed", "guarded", APPROVER) in bot.events()
    approval = bot.app.store.approval(bot.step_run("guarded").id)
    assert approval is not None
    assert approval.expires_at == pytest.approx(deadline + 60)  # moved by the pause
    wait_text(bot, "guarded", "may approve until")

    clock.advance(25)  # 85 s after the start: before the moved deadline
    expire_due(bot)
    assert bot.status("guarded") == "awaiting_approval"

    clock.advance(10)  # and now after it
    expire_due(bot)
    assert bot.status("guarded") == "expired"
    assert bot.runs() == []


def test_expiry_escalates_and_a_late_reaction_changes_nothing(
    make_bot: MakeBot, slack: FakeSlack
) -> None:
    bot = make_bot(approval_timeout="300ms")
    bot.open_incident()

    wait_for(lambda: bot.status("guarded") == "expired", what="the expiry timer")
    bot.settle()
    assert "approval expired" in text_of(bot, "guarded")
    escalation = next(m for m in thread_of(bot) if "Escalating" in m["text"])
    assert "<!subteam^S0LEADS>" in escalation["text"]
    assert "expired" in escalation["text"]
    assert [e[0] for e in bot.events()][-2:] == ["expired", "escalated"]

    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    (note,) = ephemerals_to(slack, APPROVER)
    assert "already decided (expired)" in note["text"]
    assert bot.runs() == []
    # the run stopped there: the step after it never started
    assert bot.step_runs("after") == []


# --- duplicates and races -------------------------------------------------------------------


def test_duplicate_deliveries_change_nothing_twice(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    channel, ts = bot.message_ref("guarded")
    payload = reaction_event(APPROVER, "white_check_mark", channel, ts)

    assert bot.signed(payload).status_code == 200
    # Slack retries with the same event_id when it thinks we were slow
    for retry in ("1", "2"):
        headers = {"X-Slack-Retry-Num": retry, "X-Slack-Retry-Reason": "http_timeout"}
        assert bot.signed(payload, **headers).status_code == 200

    bot.settle()
    assert bot.status("after") == "success"
    assert bot.runs() == ["ran"]
    assert len(bot.deliveries()) == 1
    assert [e for e in bot.events() if e[0] == "approved"] == [("approved", "guarded", APPROVER)]
    assert slack.ephemerals() == []


def test_racing_approvals_run_the_step_exactly_once(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    channel, ts = bot.message_ref("guarded")
    payloads = [
        reaction_event(user, "white_check_mark", channel, ts)
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
    bot.settle()
    assert len(slack.ephemerals()) == 3  # "already decided" to the three that came later
    assert bot.runs() == ["ran"]
    assert len([e for e in bot.events() if e[0] == "approved"]) == 1
    assert len([e for e in bot.events() if e[:2] == ("executed", "guarded")]) == 1
    assert all("already decided" in n["text"] for n in slack.ephemerals())


# --- restarts ---------------------------------------------------------------------------------


def test_a_reaction_after_a_restart_runs_the_step_once(make_bot: MakeBot, slack: FakeSlack) -> None:
    first = make_bot()
    first.open_incident()
    ref = first.message_ref("guarded")
    first.stop()

    second = make_bot()  # same catalog, same database: a new process
    assert second.react(APPROVER, "white_check_mark").status_code == 200
    second.settle()
    assert second.status("after") == "success"
    assert second.runs() == ["ran"]
    assert second.message_ref("guarded") == ref
    assert "succeeded" in text_of(second, "guarded")
    assert set(messages_per_row(slack).values()) == {1}  # nothing posted twice
    assert slack.ephemerals() == []


def test_pending_expiry_is_rescheduled_after_a_restart(make_bot: MakeBot) -> None:
    first = make_bot(approval_timeout="500ms")
    first.open_incident()
    first.stop()

    second = make_bot()
    wait_for(lambda: second.status("guarded") == "expired", what="expiry after the restart")
    second.settle()
    assert "approval expired" in text_of(second, "guarded")
    assert ("escalated", None, None) in second.events()


def test_a_reaction_acknowledged_but_not_applied_before_a_stop_is_applied_at_start(
    make_bot: MakeBot,
) -> None:
    first = make_bot()
    first.open_incident()
    first.app.inbox.stop()  # the process is going down: nothing takes items any more
    assert first.react(APPROVER, "white_check_mark").status_code == 200
    assert [d.status for d in first.deliveries()] == ["queued"]  # recorded before the 200
    first.stop()
    assert first.runs() == []

    second = make_bot()
    second.settle()
    assert second.status("after") == "success"
    assert second.runs() == ["ran"]
    assert [d.status for d in second.deliveries()] == ["done"]


# --- a Slack that is slow, rate limiting, failing or down --------------------------------------


def test_429_retry_after_is_honoured_per_channel(make_bot: MakeBot, slack: FakeSlack) -> None:
    bot = make_bot(tuning=SlackTuning(usergroup_ttl=60.0))  # Slack's real budgets
    slack.rate_limit("chat.postMessage", times=1, retry_after=1)
    bot.open_incident()

    posts = slack.calls_to("chat.postMessage")
    assert [c.status for c in posts[:2]] == [429, 200]
    assert posts[0].params["text"] == posts[1].params["text"]  # the same post, retried
    assert posts[1].at - posts[0].at >= 1.0  # not before Slack said
    assert len(thread_of(bot)) == 3  # root, check, guarded: nothing lost, nothing doubled
    assert set(posts_per_row(slack).values()) == {1}


def test_429_on_an_update_is_honoured_and_the_last_rendering_is_sent(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    _, ts = bot.message_ref("guarded")
    slack.rate_limit("chat.update", times=1, retry_after=1)
    bot.react(APPROVER, "white_check_mark")
    bot.settle()

    updates = updates_of(slack, ts)
    assert [c.status for c in updates][:2] == [429, 200]
    assert updates[1].at - updates[0].at >= 1.0
    assert "succeeded" in text_of(bot, "guarded")


def test_a_slack_that_is_down_does_not_hold_the_command_back(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    _, ts = bot.message_ref("guarded")
    slack.down(503)
    bot.react(APPROVER, "white_check_mark")
    # The step runs and the run completes while not one update reached Slack.
    wait_for(lambda: bot.status("after") == "success", what="the run to complete")
    assert bot.runs() == ["ran"]
    assert all(c.status == 503 for c in updates_of(slack, ts))
    slack.up()
    wait_text(bot, "guarded", "succeeded")
    assert "Runbook finished" in thread_of(bot)[-1]["text"]


def test_500s_are_retried_looking_before_posting_again(bot: Bot, slack: FakeSlack) -> None:
    slack.fail("chat.postMessage", status=500, times=1)
    bot.open_incident()
    assert len(thread_of(bot)) == 3  # the first post was retried
    assert [c.status for c in slack.calls_to("chat.postMessage")][:2] == [500, 200]
    # a 500 may hide a post that Slack made: the bot looked before posting again
    (lookup,) = slack.calls_to("conversations.history")
    assert lookup.params["include_all_metadata"] in (True, "true", "1")

    # Slack fails the next three posts...
    slack.fail("chat.postMessage", status=500, times=3)
    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    # ...yet the step ran, was recorded, and its message appeared once Slack answered.
    assert bot.runs() == ["ran"]
    assert "succeeded" in text_of(bot, "after")
    assert [c.status for c in slack.calls_to("chat.postMessage")].count(500) == 4
    assert set(posts_per_row(slack).values()) == {1}


@pytest.mark.parametrize("lost", ["timeout", "dropped connection"])
def test_a_post_whose_answer_was_lost_is_found_and_not_posted_again(
    make_bot: MakeBot, slack: FakeSlack, lost: str
) -> None:
    """Slack posted the message, the answer never came: the bot finds the message by its
    metadata (history for the root, the thread's replies for a step) and posts no copy."""
    bot = make_bot(tuning=SlackTuning(usergroup_ttl=60.0, budgets={}, timeout=1))
    delay = 3.0 if lost == "timeout" else None  # longer than the client waits
    slack.lose_answer("chat.postMessage", delay=delay, match=lambda p: not p.get("thread_ts"))
    slack.lose_answer("chat.postMessage", delay=delay, match=lambda p: bool(p.get("thread_ts")))
    bot.open_incident()

    assert [c.answered for c in slack.calls_to("chat.postMessage")][:2] == [False, False]
    root, check, guarded = thread_of(bot)
    assert "Step 1/3: check" in check["text"] and "awaiting approval" in guarded["text"]
    assert set(posts_per_row(slack).values()) == {1}
    assert set(messages_per_row(slack).values()) == {1}
    assert [c.params["channel"] for c in slack.calls_to("conversations.history")] == [CHANNEL]
    assert [c.params["ts"] for c in slack.calls_to("conversations.replies")] == [root["ts"]]
    # and the bot knows them: a reaction on the found step message is applied
    bot.react(APPROVER, "white_check_mark")
    bot.settle()
    assert bot.runs() == ["ran"]


def test_a_post_cut_short_by_a_kill_is_found_after_the_restart(
    tmp_path: Path, slack: FakeSlack
) -> None:
    """kill -9 while Slack posts the root: the next process looks for its lane's head
    before posting it, finds it by its metadata, and goes on from there."""
    write_catalog(tmp_path)
    slack.lose_answer("chat.postMessage", delay=30.0)  # posted; the answer never comes back
    env = process_env(tmp_path, slack, PAGERDUTY_WEBHOOK_SECRET="pd-secret")
    first = BotProcess(env)
    try:
        body = json.dumps(
            {
                "event": {
                    "id": "EVKILL1",
                    "event_type": "incident.triggered",
                    "resource_type": "incident",
                    "data": {
                        "id": INCIDENT.id,
                        "type": "incident",
                        "title": INCIDENT.title,
                        "service": {"id": "PAPI", "summary": "api"},
                    },
                }
            }
        ).encode()
        headers = {"X-PagerDuty-Signature": sign_pagerduty(body, "pd-secret")}
        answer = httpx.post(f"{first.url}/pagerduty/webhook", content=body, headers=headers)
        assert answer.status_code == 202
        slack.wait_for_calls("chat.postMessage", timeout=20)
    finally:
        first.kill()

    second = BotProcess(env)
    try:
        slack.wait_until(lambda: len(slack.messages(CHANNEL)) >= 3, timeout=30)
    finally:
        assert second.terminate() == 0, "".join(second.log)
    assert len(slack.calls_to("conversations.history")) >= 1  # it looked first
    assert set(messages_per_row(slack).values()) == {1}
    assert set(posts_per_row(slack).values()) == {1}
    roots = [m for m in slack.messages(CHANNEL) if m.get("thread_ts") in (None, m["ts"])]
    assert len(roots) == 1


def test_a_lost_post_to_a_channel_named_by_name_is_found_through_its_id(tmp_path: Path) -> None:
    """The catalog names `#inc-api`: Slack answers posts with the channel's id, and the
    lookup (which needs an id) resolves the name once with conversations.list."""
    write_catalog(tmp_path, channel="#inc-api")
    with FakeSlack(channels={"CNAMED": {"name": "inc-api"}}) as slack:
        bot = Bot(tmp_path, slack, tuning=SlackTuning(usergroup_ttl=60.0, budgets={}, timeout=1))
        try:
            slack.lose_answer("chat.postMessage", delay=3.0)  # the root: posted, answer lost
            bot.open_incident()
            assert len(slack.calls_to("conversations.list")) == 1
            assert [c.params["channel"] for c in slack.calls_to("conversations.history")] == [
                "CNAMED"
            ]
            assert len(thread_of(bot)) == 3
            assert set(messages_per_row(slack, "CNAMED").values()) == {1}
            assert bot.react(APPROVER, "white_check_mark").status_code == 200
            bot.settle()
            assert bot.runs() == ["ran"]
        finally:
            bot.stop()


def test_a_bot_started_while_slack_is_down_takes_deliveries_and_catches_up(
    tmp_path: Path, slack: FakeSlack
) -> None:
    """auth.test cannot be answered at start: the bot starts anyway (a restart during a
    Slack outage must not stop PagerDuty deliveries), asks again, and posts once Slack is
    back. A bad token still fails the start (tests/test_server.py)."""
    write_catalog(tmp_path)
    slack.down(503)
    bot = Bot(tmp_path, slack, pagerduty_webhook_secret=Secret("pd-secret"))
    try:
        assert bot.app.slack is not None and not bot.app.slack.identity.known
        assert bot.http.get("/healthz").status_code == 200
        body = json.dumps(
            {
                "event": {
                    "id": "EVDOWN1",
                    "event_type": "incident.triggered",
                    "resource_type": "incident",
                    "data": {
                        "id": INCIDENT.id,
                        "type": "incident",
                        "title": INCIDENT.title,
                        "service": {"id": "PAPI", "summary": "api"},
                    },
                }
            }
        ).encode()
        headers = {"X-PagerDuty-Signature": sign_pagerduty(body, "pd-secret")}
        assert bot.http.post("/pagerduty/webhook", content=body, headers=headers).status_code == 202
        wait_for(lambda: bot.status("guarded") == "awaiting_approval", what="the run to wait")

        slack.up()
        wait_for(lambda: bot.app.slack is not None and bot.app.slack.identity.known, what="auth")
        assert bot.app.slack.bot_user_ids == {BOT_USER, "BBOT"}
        bot.settle()
        assert len(thread_of(bot)) == 3
        assert bot.react(BOT_USER, "white_check_mark").status_code == 200  # its own: ignored
        assert bot.deliveries() == []
        assert bot.react(APPROVER, "white_check_mark").status_code == 200
        bot.settle()
        assert bot.runs() == ["ran"]
    finally:
        bot.stop()


def test_a_post_retried_after_a_restart_is_looked_for_first(
    make_bot: MakeBot, slack: FakeSlack
) -> None:
    slow = make_bot(tuning=SlackTuning(usergroup_ttl=60.0, budgets={}, timeout=1), backoff=(4, 4))
    slack.lose_answer("chat.postMessage", delay=3.0)
    slow.open_incident(settle=False)
    wait_for(
        lambda: any(o.attempts for o in slow.app.store.outbox_items(INCIDENT.id)),
        what="the root post to have failed once",
    )
    slow.stop()  # its retry is due in 3 to 4 s: after the restart

    again = make_bot()
    again.settle()
    assert set(posts_per_row(slack).values()) == {1}


# --- pacing -----------------------------------------------------------------------------------


def test_posts_to_one_channel_are_paced_and_other_channels_are_not_held_up(
    make_bot: MakeBot, slack: FakeSlack
) -> None:
    bot = make_bot(tuning=SlackTuning(usergroup_ttl=60.0, budgets={"chat.postMessage:*": (1, 1)}))
    bot.open_incident(settle=False)
    bot.open_incident(OTHER)
    bot.settle()

    def arrivals(channel: str) -> list[float]:
        return [c.at for c in slack.calls_to("chat.postMessage") if c.params["channel"] == channel]

    busy, other = arrivals(CHANNEL), arrivals(OTHER_CHANNEL)
    assert len(busy) == 3 and len(other) == 3  # root, check, guarded / root, check, note
    # One post a second after a burst of 1: the third went two seconds after the first
    # at the earliest (less the first one's own way there, which the margin allows for).
    assert busy[-1] - busy[0] >= 1.5, busy
    assert other[0] < busy[-1]  # the other channel did not wait behind this one


def test_slack_budgets_allow_a_burst_then_space_posts_per_channel() -> None:
    transport = SlackTransport(WebClient(token=TOKEN, base_url="http://127.0.0.1:9/api/"))

    def post(channel: str) -> tuple[str, ...]:
        item = OutboxItem(
            id=1, incident_id="P1", target="slack", lane=f"slack:{channel}", kind="post_step",
            payload={},
        )  # fmt: skip
        return transport.budgets(item)

    budgets = Budgets(SLACK_BUDGETS)
    waits = [budgets.take(post("C1"), 0.0) for _ in range(4)]
    assert waits == [0.0, 0.0, 0.0, pytest.approx(1.0)]  # a burst of 3, then 1 per second
    assert budgets.take(post("C2"), 0.0) == 0.0  # channels are independent
    assert budgets.take(post("C1"), 10.0) == 0.0  # refilled
    budgets.hold(post("C1")[:1], 15.0)  # a 429 with Retry-After: 5 at t=10
    assert budgets.take(post("C1"), 10.0) == pytest.approx(5.0)
    assert budgets.take(post("C2"), 10.0) == 0.0


def test_slack_tuning_defaults_are_production_values() -> None:
    tuning = SlackTuning()
    assert tuning.budgets is None and tuning.timeout >= 5  # None: Slack's published limits
    assert SLACK_BUDGETS["chat.postMessage:*"][0] <= 1.0  # about one post per second
    assert FAST.budgets == {}
    assert SIGNING_SECRET  # the harness signs with the secret the bot is given


# --- the request itself --------------------------------------------------------------------


def test_forged_or_stale_signatures_are_rejected_and_change_nothing(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    calls_before = len(slack.calls)
    channel, ts = bot.message_ref("guarded")
    body = json.dumps(reaction_event(APPROVER, "white_check_mark", channel, ts))
    rejected = 'runbook_webhook_deliveries_total{outcome="rejected",source="slack"} '

    def rejections() -> float:
        lines = bot.http.get("/metrics").text.splitlines()
        return sum(float(x.split()[-1]) for x in lines if x.startswith(rejected))

    before = rejections()
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
    assert rejections() - before == 4


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
    root = slack.messages(CHANNEL)[0]
    for shown in (
        root["text"],
        *(b.get("text", {}).get("text", "") for b in root["blocks"] if b["type"] != "header"),
    ):
        assert "<!channel>" not in shown and "<https://evil" not in shown
    assert "&lt;!channel&gt; &amp;" in root["text"]


def test_every_message_names_its_outbox_row_in_its_metadata(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    rows = {o.id: o for o in bot.app.store.outbox_items(INCIDENT.id, target="slack")}
    for message in slack.messages(CHANNEL):
        row = rows[outbox_id(message["metadata"]) or 0]
        assert message["metadata"]["event_payload"]["incident"] == INCIDENT.id
        assert row.ts == message["ts"]
    assert effects.root_key(INCIDENT.id) in {o.key for o in rows.values()}


# --- a Slack outage of a minute -----------------------------------------------------------------

OUTAGE_SECONDS = 60.0
B_INCIDENT = Incident(id="PINC777", title="API elevated errors again", service="api", env="staging")


def _outage_trial(root: Path, status: int) -> None:
    """One bot and its own stand-in through a Slack outage answering `status` (0: every
    call hangs until the client's 1 s timeout ends it) for OUTAGE_SECONDS.

    Before: incident A's thread is posted and its guarded step waits. During: A's step is
    approved and A's run finishes; incident B opens, its check runs and its approval is
    requested, none of which Slack can show. After: everything arrives, in order, once;
    B's approval, requested during the outage, is given and runs the step once.
    """
    write_catalog(root, approval_timeout="10m")
    tuning = SlackTuning(usergroup_ttl=60.0, budgets={}, timeout=1)
    with FakeSlack(usergroups={GROUP: [GROUPIE]}) as slack:
        bot = Bot(root, slack, tuning=tuning, backoff=(0.05, 1.0))
        try:
            bot.open_incident()
            slack.down(status)
            began = time.monotonic()
            bot.react(APPROVER, "white_check_mark", incident_id=INCIDENT.id)
            bot.open_incident(B_INCIDENT, settle=False)
            wait_for(lambda: bot.status("after") == "success", what="A's run to finish", timeout=30)
            wait_for(
                lambda: bot.status("guarded") == "awaiting_approval" and bot.idle(),
                what="B to wait for its approval",
                timeout=30,
            )
            assert bot.app.store.message_ref(effects.root_key(B_INCIDENT.id)) is None
            time.sleep(max(0.0, began + OUTAGE_SECONDS - time.monotonic()))  # the outage lasts
            slack.up()

            bot.flush(timeout=60)
            assert (
                bot.react(APPROVER, "white_check_mark", incident_id=B_INCIDENT.id).status_code
                == 200
            )
            bot.settle(timeout=60)

            assert bot.runs() == ["ran", "ran"]  # A's step once, B's step once
            pending = bot.app.store.outbox_items(target="slack", status=None)
            assert {str(o.status) for o in pending} <= {"sent", "cancelled"}, [
                (o.kind, o.status, o.error) for o in pending
            ]
            for incident in (INCIDENT, B_INCIDENT):
                thread = thread_of(bot, incident.id)
                heads = [visible_text(m).splitlines()[0] for m in thread]
                assert len(thread) == 5 and "Runbook finished" in thread[-1]["text"], heads
                assert [h.split(" — ")[0] for h in heads[1:4]] == [
                    "Step 1/3: check", "Step 2/3: guarded", "Step 3/3: after",
                ]  # fmt: skip
                ids = [outbox_id(m["metadata"]) or 0 for m in thread]
                assert 0 not in ids and ids == sorted(ids)  # in the order they were committed
                guarded = thread[2]
                assert "succeeded" in guarded["text"] and f"<@{APPROVER}>" in guarded["text"]
            assert set(messages_per_row(slack).values()) == {1}  # no duplicate message
            assert set(posts_per_row(slack).values()) == {1}  # no duplicate post
            failed = [c for c in slack.calls if c.status == (status or 503)]
            assert failed, "the outage was felt"
        finally:
            bot.stop()


@pytest.mark.slow
def test_a_slack_outage_of_a_minute_loses_nothing(tmp_path: Path) -> None:
    """500, 503 and hanging calls, one bot each, at the same time (a minute in all)."""
    kinds = {"500": 500, "503": 503, "hang": 0}
    errors: dict[str, BaseException] = {}

    def trial(name: str, status: int) -> None:
        try:
            _outage_trial(tmp_path / name, status)
        except BaseException as exc:  # reported below, per kind
            errors[name] = exc

    threads = [
        threading.Thread(target=trial, args=(name, status), name=f"outage-{name}")
        for name, status in kinds.items()
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(OUTAGE_SECONDS + 240)
    assert not any(t.is_alive() for t in threads), "a trial did not finish"
    for name, exc in errors.items():
        raise AssertionError(f"Slack outage {name}: {exc!r}") from exc


def test_every_step_status_and_refusal_has_words_for_the_thread() -> None:
    assert set(messages.STATE_LABELS) == set(StepStatus)
    for refusal in Refusal:
        assert messages.refusal_text(refusal, status="success", reason="why", by="U1")
