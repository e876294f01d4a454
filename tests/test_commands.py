"""`/runbook` end to end: signed slash command requests to a real BotApp on waitress.

A manual run goes through the inbox, engine, policy and audit of a page; the tests look
at the private answer, the thread posted in the channel the command was used in, what
ran, and the rows written.
"""

from __future__ import annotations

import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeSlack, visible_text
from slack_harness import (
    APPROVER,
    GROUPIE,
    OTHER_CHANNEL,
    STRANGER,
    TEAM_ID,
    Bot,
    sign,
    write_catalog,
)

MakeBot = Callable[..., Bot]


@pytest.fixture
def bot(tmp_path: Path, slack: FakeSlack) -> Iterator[Bot]:
    write_catalog(tmp_path)
    started = Bot(tmp_path, slack)
    yield started
    started.stop()


def command_body(
    user: str,
    text: str,
    *,
    channel: str = OTHER_CHANNEL,
    team_id: str = TEAM_ID,
    response_url: str = "https://hooks.slack.com/commands/TFAKE/1/abc",
) -> str:
    """A slash command request as Slack sends it (form-encoded)."""
    return urllib.parse.urlencode(
        {
            "token": "legacy-verification-token",
            "team_id": team_id,
            "team_domain": "fake-workspace",
            "channel_id": channel,
            "channel_name": "ops",
            "user_id": user,
            "user_name": user.lower(),
            "command": "/runbook",
            "text": text,
            "api_app_id": "AFAKEAPP",
            "response_url": response_url,
            "trigger_id": f"{int(time.time())}.1.{uuid.uuid4().hex}",
        }
    )


def send(bot: Bot, body: str, **sign_args: Any) -> httpx.Response:
    headers = {**sign(body, **sign_args), "Content-Type": "application/x-www-form-urlencoded"}
    return bot.post(body, headers)


def answer(bot: Bot, user: str, text: str) -> str:
    response = send(bot, command_body(user, text))
    assert response.status_code == 200
    body = response.json()
    assert body.get("response_type", "ephemeral") == "ephemeral"  # private to the user
    return str(body["text"])


def manual_incidents(bot: Bot) -> list[Any]:
    return [i for i in bot.app.store.incidents() if i.id.startswith("RUN-")]


def test_run_starts_the_runbook_in_a_new_thread_of_this_channel(bot: Bot, slack: FakeSlack) -> None:
    text = answer(bot, APPROVER, 'run api-errors note="disk full; rm -rf /"')
    assert "Starting runbook `api-errors` as RUN-" in text and "in staging" in text
    bot.settle()
    (incident,) = manual_incidents(bot)
    assert incident.channel == OTHER_CHANNEL  # where the command was used
    assert incident.runbook_id == "api-errors" and incident.env == "staging"
    assert incident.started_by == APPROVER
    assert dict(incident.details) == {"note": "disk full; rm -rf /"}  # data, one value
    root = slack.messages(OTHER_CHANNEL)[0]
    assert "Manual run of API elevated errors" in visible_text(root)
    assert bot.status("check") == "success"
    assert bot.status("guarded") == "awaiting_approval"
    # the same engine and policy as a page: the starter may not approve its steps
    bot.click(APPROVER, "runbook_approve")
    bot.settle()
    assert bot.runs() == []
    bot.click(GROUPIE, "runbook_approve")
    bot.settle()
    assert bot.runs() == ["ran"]
    assert ("matched", None, None) in [
        (e["status"], e["step_id"], e["actor"]) for e in bot.app.store.events(incident.id)
    ]


def test_env_cannot_widen_past_the_catalogs_choice(bot: Bot) -> None:
    text = answer(bot, APPROVER, "run api-errors env=prod")
    assert "`env=prod` is not allowed" in text and "env=staging" in text
    assert "Nothing was started" in text
    assert "Starting" in answer(bot, APPROVER, "run api-errors env=staging")
    bot.settle()
    assert len(manual_incidents(bot)) == 1


@pytest.mark.parametrize(
    ("user", "text", "expected"),
    [
        (APPROVER, "run api-erors", "There is no runbook `api-erors`. Did you mean `api-errors`?"),
        (STRANGER, "run api-errors", "You may not start `api-errors`"),
        (APPROVER, "run api-errors notkv", "is not a `key=value` argument"),
        (APPROVER, "run api-errors a=1 a=2", "`a` is given twice"),
        (APPROVER, 'run api-errors note="unclosed', "Could not read that command"),
        (APPROVER, "run api-errors x=" + "y" * 10_000, "reads at most 4,000"),
        (APPROVER, "run", "Which runbook?"),
        (APPROVER, "rnu api-errors", "Did you mean `/runbook run`?"),
    ],
)
def test_what_cannot_start_says_why_and_starts_nothing(
    bot: Bot, user: str, text: str, expected: str
) -> None:
    assert expected in answer(bot, user, text)
    bot.settle()
    assert manual_incidents(bot) == [] and bot.runs() == []


def test_quotes_newlines_and_shell_syntax_stay_data(bot: Bot) -> None:
    text = "run api-errors\nwho=$(whoami) pipe='a | b' `tick`=1"
    assert "is not a `key=value` argument" in answer(bot, APPROVER, text)  # `tick` as a key
    assert "Starting" in answer(bot, APPROVER, "run api-errors\nwho=$(whoami) pipe='a | b'")
    bot.settle()
    (incident,) = manual_incidents(bot)
    assert dict(incident.details) == {"who": "$(whoami)", "pipe": "a | b"}


def test_list_status_and_help(bot: Bot) -> None:
    listed = answer(bot, APPROVER, "list")
    assert "`api-errors`" in listed and "`db-errors`" in listed
    only = answer(bot, APPROVER, "list db")
    assert "`db-errors`" in only and "`api-errors`" not in only
    assert "/runbook run RUNBOOK" in answer(bot, APPROVER, "help")
    assert "/runbook run RUNBOOK" in answer(bot, APPROVER, "")
    assert answer(bot, APPROVER, "status") == "No open incident."
    answer(bot, APPROVER, "run api-errors")
    bot.settle()
    (incident,) = manual_incidents(bot)
    assert incident.id in answer(bot, APPROVER, "status")
    shown = answer(bot, APPROVER, f"status {incident.id}")
    assert "check: success" in shown and "guarded: awaiting_approval" in shown
    assert "No incident `PNOPE`" in answer(bot, APPROVER, "status PNOPE")


def test_unsigned_foreign_or_malformed_commands_are_refused(bot: Bot) -> None:
    body = command_body(APPROVER, "run api-errors")
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    assert bot.post(body, form).status_code == 401
    assert send(bot, body, secret="not-the-secret").status_code == 401
    for bad in (
        command_body(APPROVER, "run api-errors", team_id="TOTHER"),
        command_body(APPROVER, "run api-errors", response_url="https://evil.example.com/x"),
        command_body("not a user", "run api-errors"),
    ):
        response = send(bot, bad)
        assert response.status_code == 400 and "Traceback" not in response.text
    bot.settle()
    assert manual_incidents(bot) == []


def test_the_command_over_socket_mode_takes_the_same_path(bot: Bot) -> None:
    """Socket Mode hands the command's payload to the same App (``run_bolt_app``)."""
    from slack_bolt.adapter.socket_mode.internals import run_bolt_app
    from slack_sdk.socket_mode.request import SocketModeRequest

    assert bot.app.slack is not None
    payload = dict(urllib.parse.parse_qsl(command_body(APPROVER, "run api-errors")))
    response = run_bolt_app(
        bot.app.slack.bolt,
        SocketModeRequest(type="slash_commands", envelope_id="env-1", payload=payload),
    )
    assert response.status == 200 and "Starting runbook" in str(response.body)
    bot.settle()
    assert len(manual_incidents(bot)) == 1
