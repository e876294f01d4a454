"""Approve / Reject / Pause / Resume buttons on step messages, end to end.

A real BotApp on waitress, clicks posted as Slack posts them (form-encoded, signed
``block_actions`` payloads), the real slack_sdk client against the Slack stand-in. Clicks
enter the same inbox as reactions, so every rule of reactions holds for them; these tests
check what a person sees (the buttons, who decided, the private notes), what ran and
what the audit log says.
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
    GROUPIE,
    INCIDENT,
    STRANGER,
    Bot,
    click_payload,
    form_body,
    sign,
    wait_for,
    write_catalog,
)
from slack_sdk.socket_mode.request import SocketModeRequest

from bot import messages
from bot.chat.base import StepView
from bot.chat.slack import ButtonValue, step_blocks
from bot.engine import Incident

MakeBot = Callable[..., Bot]
ACTION_IDS = ["runbook_approve", "runbook_reject", "runbook_pause"]


@pytest.fixture
def make_bot(tmp_path: Path, slack: FakeSlack) -> Iterator[MakeBot]:
    bots: list[Bot] = []

    def make(**config: Any) -> Bot:
        if not (tmp_path / "catalog.yaml").exists():
            write_catalog(tmp_path)
        bot = Bot(tmp_path, slack, **config)
        bots.append(bot)
        return bot

    yield make
    for bot in bots:
        bot.stop()


@pytest.fixture
def bot(make_bot: MakeBot) -> Bot:
    return make_bot()


def message_of(bot: Bot, step_id: str = "guarded") -> dict[str, Any]:
    bot.flush()
    channel, ts = bot.message_ref(step_id)
    message = bot.slack.message(channel, ts)
    assert message is not None
    return message


def buttons_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        element
        for block in message.get("blocks") or ()
        if block.get("type") == "actions"
        for element in block.get("elements") or ()
    ]


def ephemerals_to(slack: FakeSlack, user: str) -> list[dict[str, Any]]:
    return [m for m in slack.ephemerals() if m["user"] == user]


def approvals(bot: Bot) -> list[dict[str, Any]]:
    return [e for e in bot.app.store.events() if e["status"] == "approved"]


# --- what the step message offers ----------------------------------------------------------


def test_a_click_on_approve_runs_the_step_once_and_the_buttons_give_way(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    message = message_of(bot)
    buttons = buttons_of(message)
    assert [b["action_id"] for b in buttons] == ACTION_IDS
    assert all("confirm" not in b for b in buttons)  # staging: no confirmation
    step_run = bot.step_run("guarded")
    value = ButtonValue.decode(buttons[0]["value"])
    approval = bot.app.store.approval(step_run.id)
    assert approval is not None
    assert value == ButtonValue(INCIDENT.id, step_run.id, approval.fingerprint)
    text = visible_text(message)
    assert f"Fingerprint `{approval.fingerprint}`" in text  # what an approval applies to
    assert "Use the buttons, or react :white_check_mark:" in text
    assert buttons_of(message_of(bot, "check")) == []  # automatic steps have none

    response = bot.click(APPROVER, "runbook_approve")
    assert response.status_code == 200
    # Answered once recorded: the click is in the inbox, durably, before the 200.
    assert [item.kind for item in bot.deliveries()] == ["step.approve"]

    bot.settle()
    assert bot.runs() == ["ran"] and bot.status("after") == "success"
    decided = message_of(bot)
    assert buttons_of(decided) == []  # replaced by who decided, and when
    assert f"approved by <@{APPROVER}> at " in visible_text(decided)
    assert "UTC" in visible_text(decided)
    (approved,) = approvals(bot)
    assert (approved["actor"], approved["detail"]) == (APPROVER, "by button")
    assert slack.ephemerals() == []


def test_reject_by_button_shows_who_rejected(bot: Bot) -> None:
    bot.open_incident()
    assert bot.click(GROUPIE, "runbook_reject").status_code == 200
    bot.settle()
    assert bot.runs() == [] and bot.status("guarded") == "rejected"
    text = visible_text(message_of(bot))
    assert f"rejected by <@{GROUPIE}> at " in text and buttons_of(message_of(bot)) == []


def test_approve_on_a_production_step_asks_for_confirmation() -> None:
    view = StepView(
        incident_id="P1",
        step_run_id=7,
        step_id="restart",
        action_id="restart",
        index=1,
        total=1,
        name="Restart",
        description="",
        command="kubectl rollout restart deploy/api",
        shell=False,
        requires_approval=True,
        scopes=("prod",),
        env="prod",
        expect=(),
        state="awaiting_approval",
        reason="",
        fingerprint="0123456789ab",
        production=True,
    )
    approve, reject, pause = buttons_of({"blocks": step_blocks(view, messages.DEFAULT_REACTIONS)})
    confirm = approve["confirm"]
    assert set(confirm) >= {"title", "text", "confirm", "deny"}
    assert "prod" in confirm["text"]["text"] and "0123456789ab" in confirm["text"]["text"]
    assert len(confirm["text"]["text"]) <= 300  # Slack's limit for a confirm's text
    assert "confirm" not in reject and "confirm" not in pause


# --- the same rules as reactions ------------------------------------------------------------


def test_pause_button_holds_and_resume_reopens(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    assert bot.click(GROUPIE, "runbook_pause").status_code == 200
    bot.settle()
    shown = [b["action_id"] for b in buttons_of(message_of(bot))]
    assert shown == ["runbook_approve", "runbook_reject", "runbook_resume"]

    bot.click(APPROVER, "runbook_approve")  # refused: a pause is a hold
    bot.settle()
    (note,) = ephemerals_to(slack, APPROVER)
    assert f"paused by <@{GROUPIE}>; press Resume" in note["text"]
    assert bot.status("guarded") == "awaiting_approval" and bot.runs() == []

    bot.click(APPROVER, "runbook_resume")
    bot.settle()
    assert [b["action_id"] for b in buttons_of(message_of(bot))] == ACTION_IDS
    bot.click(APPROVER, "runbook_approve")
    bot.settle()
    assert bot.runs() == ["ran"]
    assert [e[0] for e in bot.events() if e[1] == "guarded"][:5] == [
        "requires_manual",
        "paused",
        "refused",
        "resumed",
        "approved",
    ]


def test_double_clicks_two_approvers_and_a_reaction_at_once_run_the_step_once(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    channel, ts, value = bot.button("runbook_approve")
    (bot.root / "gate").unlink()  # hold the command, so all of them arrive while it runs
    bodies = [
        form_body(click_payload(user, "runbook_approve", channel, ts, value))
        for user in (APPROVER, APPROVER, GROUPIE)
    ]
    start = threading.Barrier(len(bodies) + 1)
    codes: list[int] = []

    def send(body: str) -> None:
        start.wait()
        headers = {**sign(body), "Content-Type": "application/x-www-form-urlencoded"}
        codes.append(bot.post(body, headers).status_code)

    def react() -> None:
        start.wait()
        codes.append(bot.react(GROUPIE, "white_check_mark").status_code)

    threads = [threading.Thread(target=send, args=(b,)) for b in bodies]
    threads.append(threading.Thread(target=react))
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert codes == [200] * 4
    wait_for(lambda: bot.runs() == ["ran"], what="the command to start")
    (bot.root / "gate").touch()
    bot.settle()
    assert bot.runs() == ["ran"]
    assert len(approvals(bot)) == 1
    # the three that came second were each told, privately, that it was already decided
    notes = [m["text"] for m in slack.ephemerals()]
    assert len(notes) == 3 and all("already decided" in n for n in notes)


def test_a_click_by_someone_not_allowed_changes_nothing_and_says_why(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    assert bot.click(STRANGER, "runbook_approve").status_code == 200
    bot.settle()
    (note,) = ephemerals_to(slack, STRANGER)
    assert "is not among the approvers of this step" in note["text"]
    assert bot.status("guarded") == "awaiting_approval" and bot.runs() == []
    assert ("unauthorized", "guarded", STRANGER) in bot.events()
    assert [b["action_id"] for b in buttons_of(message_of(bot))] == ACTION_IDS


def test_the_bots_own_clicks_never_count(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    assert bot.click(BOT_USER, "runbook_approve").status_code == 200
    bot.settle()
    assert bot.deliveries() == [] and slack.ephemerals() == []
    assert bot.status("guarded") == "awaiting_approval" and bot.runs() == []


def test_a_click_naming_another_step_incident_or_rendering_changes_nothing(
    bot: Bot, slack: FakeSlack
) -> None:
    bot.open_incident()
    channel, ts, value = bot.button("runbook_approve")
    real = json.loads(value)
    check = bot.step_run("check")
    forged = [
        {**real, "step": check.id},  # another step
        {**real, "incident": "POTHER"},  # another incident
        {**real, "fingerprint": "0" * 12},  # a command other than the one shown
    ]
    for each in forged:
        payload = click_payload(APPROVER, "runbook_approve", channel, ts, json.dumps(each))
        assert bot.post_click(payload).status_code == 200
    bot.settle()
    assert bot.status("guarded") == "awaiting_approval" and bot.runs() == []
    assert approvals(bot) == []
    notes = [m["text"] for m in ephemerals_to(slack, APPROVER)]
    assert len(notes) == 3 and all("belongs to another step" in n for n in notes)


# --- what is refused at the door -----------------------------------------------------------


def test_unsigned_or_stale_clicks_are_rejected_and_change_nothing(bot: Bot) -> None:
    bot.open_incident()
    channel, ts, value = bot.button("runbook_approve")
    body = form_body(click_payload(APPROVER, "runbook_approve", channel, ts, value))
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert bot.post(body, form).status_code == 401  # unsigned
    forged = {**sign(body, secret="not-the-secret"), **form}
    assert bot.post(body, forged).status_code == 401
    stale = {**sign(body, timestamp=int(time.time()) - 600), **form}
    assert bot.post(body, stale).status_code == 401
    bot.settle()
    assert bot.deliveries() == [] and bot.runs() == []


def _broken(payload: dict[str, Any], path: tuple[str, ...], value: Any) -> dict[str, Any]:
    copy = json.loads(json.dumps(payload))
    target = copy
    for key in path[:-1]:
        target = target[key] if not isinstance(target, list) else target[int(key)]
    if value is _DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


_DELETE = object()


def test_malformed_foreign_or_forged_click_payloads_are_refused(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident()
    channel, ts, value = bot.button("runbook_approve")
    good = click_payload(APPROVER, "runbook_approve", channel, ts, value)
    action = ("actions", "0")
    cases = [
        _broken(good, ("team", "id"), "TOTHERTEAM"),  # another workspace
        _broken(good, ("response_url",), "https://evil.example.com/hooks.slack.com/x"),
        _broken(good, ("response_url",), "http://hooks.slack.com/actions/x"),  # not https
        _broken(good, ("response_url",), _DELETE),
        _broken(good, ("user",), _DELETE),
        _broken(good, ("container",), _DELETE),
        _broken(good, ("channel", "id"), "COTHER"),  # says two different channels
        _broken(good, (*action, "value"), _DELETE),
        _broken(good, (*action, "value"), "not json"),
        _broken(good, (*action, "value"), json.dumps({**json.loads(value), "extra": 1})),
        _broken(good, (*action, "value"), json.dumps({"incident": INCIDENT.id})),
        _broken(good, (*action, "value"), "x" * 10_000),
        _broken(good, ("actions",), [good["actions"][0], good["actions"][0]]),
        _broken(good, ("actions",), []),
        _broken(good, ("type",), "view_submission"),
        _broken(good, ("trigger_id",), _DELETE),
    ]
    for payload in cases:
        response = bot.post_click(payload)
        assert response.status_code in (400, 404), payload
        assert "Traceback" not in response.text
    bot.settle()
    assert bot.deliveries() == [] and slack.ephemerals() == [] and bot.runs() == []
    assert bot.status("guarded") == "awaiting_approval"
    for message in slack.messages(channel):
        assert "Traceback" not in json.dumps(message)
    # and the real one still works
    assert bot.post_click(good).status_code == 200
    bot.settle()
    assert bot.runs() == ["ran"]


def test_clicks_delivered_over_socket_mode_take_the_same_path(bot: Bot) -> None:
    """In Socket Mode, bolt's SocketModeHandler hands each envelope's payload to the same
    App (``run_bolt_app``): the click listener and its checks are the ones HTTP uses."""
    from slack_bolt.adapter.socket_mode.internals import run_bolt_app

    assert bot.app.slack is not None
    bot.open_incident()
    channel, ts, value = bot.button("runbook_approve")
    request = SocketModeRequest(
        type="interactive",
        envelope_id="env-1",
        payload=click_payload(APPROVER, "runbook_approve", channel, ts, value),
    )
    response = run_bolt_app(bot.app.slack.bolt, request)
    assert response.status == 200
    foreign = click_payload(APPROVER, "runbook_approve", channel, ts, value, team_id="TOTHER")
    refused = run_bolt_app(
        bot.app.slack.bolt,
        SocketModeRequest(type="interactive", envelope_id="env-2", payload=foreign),
    )
    assert refused.status == 400
    bot.settle()
    assert bot.runs() == ["ran"] and len(approvals(bot)) == 1


def test_a_click_on_a_message_not_yet_recorded_waits_for_it(bot: Bot) -> None:
    """A click can beat the recording of its message's ts by an instant: it is parked,
    then applied in its place, like a reaction."""
    incident = Incident(id="PINC777", title="API elevated errors", service="api", env="staging")
    bot.open_incident(incident)
    step_run = bot.step_run("guarded", incident.id)
    approval = bot.app.store.approval(step_run.id)
    assert approval is not None
    value = ButtonValue(incident.id, step_run.id, approval.fingerprint).encode()
    channel, ts = bot.message_ref("guarded", incident.id)
    payload = click_payload(APPROVER, "runbook_approve", channel, ts, value)
    assert bot.post_click(payload).status_code == 200
    bot.settle()
    assert bot.status("after") == "success"


# --- the two-person rule, no self-approval ---------------------------------------------------


def set_guarded_safety(root: Path, **safety: Any) -> None:
    path = root / "actions" / "guarded.yaml"
    action = json.loads(path.read_text())
    action["safety"].update(safety)
    path.write_text(json.dumps(action))


def test_two_person_rule_needs_two_different_approvers(
    tmp_path: Path, make_bot: MakeBot, slack: FakeSlack
) -> None:
    write_catalog(tmp_path)
    set_guarded_safety(tmp_path, approvals=2)
    bot = make_bot()
    bot.open_incident()
    assert "needs 2 different approvers; approved so far by nobody yet (0 of 2)" in (
        visible_text(message_of(bot))
    )

    bot.click(APPROVER, "runbook_approve")
    bot.settle()
    assert bot.runs() == [] and bot.status("guarded") == "awaiting_approval"
    text = visible_text(message_of(bot))
    assert f"approved so far by <@{APPROVER}> (1 of 2)" in text  # the thread shows who
    assert [b["action_id"] for b in buttons_of(message_of(bot))] == ACTION_IDS

    bot.react(APPROVER, "white_check_mark")  # the same person again does not count
    bot.settle()
    (note,) = ephemerals_to(slack, APPROVER)
    assert "you already approved this step; it needs another approver" in note["text"]
    assert bot.runs() == []

    bot.click(GROUPIE, "runbook_approve")
    bot.settle()
    assert bot.runs() == ["ran"]
    assert f"approved by <@{APPROVER}> and <@{GROUPIE}> at " in visible_text(message_of(bot))
    assert [(e["actor"], e["detail"]) for e in approvals(bot)] == [
        (APPROVER, "1 of 2 approvals by button"),
        (GROUPIE, "2 of 2 approvals by button"),
    ]


def test_a_rejection_by_either_approver_stops_a_two_person_request(
    tmp_path: Path, make_bot: MakeBot
) -> None:
    write_catalog(tmp_path)
    set_guarded_safety(tmp_path, approvals=2)
    bot = make_bot()
    bot.open_incident()
    bot.click(APPROVER, "runbook_approve")
    bot.click(GROUPIE, "runbook_reject")
    bot.settle()
    assert bot.runs() == [] and bot.status("guarded") == "rejected"
    assert f"rejected by <@{GROUPIE}> at " in visible_text(message_of(bot))


STARTED = Incident(
    id="PMANUAL1",
    title="API elevated errors",
    service="api",
    env="staging",
    started_by=APPROVER,
)


def test_the_starter_of_a_manual_run_may_not_approve_it(bot: Bot, slack: FakeSlack) -> None:
    bot.open_incident(STARTED)
    bot.click(APPROVER, "runbook_approve")
    bot.settle()
    (note,) = ephemerals_to(slack, APPROVER)
    assert "you started this run, so another approver must approve" in note["text"]
    assert "self_approval: true" in note["text"]
    assert bot.runs() == [] and ("refused", "guarded", APPROVER) in bot.events()
    bot.react(GROUPIE, "white_check_mark")
    bot.settle()
    assert bot.runs() == ["ran"]


def test_self_approval_true_lets_the_starter_approve(tmp_path: Path, make_bot: MakeBot) -> None:
    write_catalog(tmp_path)
    set_guarded_safety(tmp_path, self_approval=True)
    bot = make_bot()
    bot.open_incident(STARTED)
    bot.click(APPROVER, "runbook_approve")
    bot.settle()
    assert bot.runs() == ["ran"]
