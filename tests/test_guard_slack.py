"""bot.guard decorators asking in Slack through the running bot (``bot.guardapi``).

A real BotApp on waitress with the Slack stand-in; the decorated function runs in a
thread of the test (the "program that asked"), the approver clicks in Slack; "ran" is a
file the function writes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeSlack, visible_text
from slack_harness import APPROVER, GROUPIE, STRANGER, Bot, wait_for, write_catalog

from bot import guard
from bot.config import Secret
from bot.engine import GUARD_REPORT_SECONDS
from bot.errors import ApprovalDenied

TOKEN = "guard-test-token"


@pytest.fixture
def bot(tmp_path: Path, slack: FakeSlack) -> Iterator[Bot]:
    write_catalog(tmp_path)
    started = Bot(tmp_path, slack, guard_token=Secret(TOKEN))
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def fresh_guard() -> Iterator[None]:
    guard.reset()
    yield
    guard.reset()


def guarded(marker: Path, *, fail: bool = False) -> Callable[[str], str]:
    @guard.require_confirmation(message="Clear the cache of api?", timeout=60)
    @guard.allowed_envs(["staging"])
    def clear_cache(cmd: str) -> str:
        with marker.open("a") as f:
            f.write(cmd + "\n")
        if fail:
            raise RuntimeError("redis said no")
        return f"ran {cmd}"

    return clear_cache


def call_in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    outcome: list[Any] = []

    def target() -> None:
        try:
            outcome.append(fn())
        except Exception as exc:
            outcome.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    return thread, outcome


def runs(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


def test_a_guarded_call_is_asked_in_slack_and_runs_once_approved(
    bot: Bot, slack: FakeSlack, tmp_path: Path
) -> None:
    marker = tmp_path / "cleared"
    guard.configure(env="staging", bot_url=bot.url, token=TOKEN)
    thread, outcome = call_in_thread(lambda: guarded(marker)("FLUSHDB"))
    channel, ts, _ = bot.button("runbook_approve", "confirm")
    shown = visible_text(slack.message(channel, ts) or {})
    assert "clear_cache" in shown and "needs approval" in shown
    root = visible_text(slack.messages(channel)[0])
    assert "Clear the cache of api?" in root and "staging" in root
    assert runs(marker) == []

    bot.click(STRANGER, "runbook_approve", "confirm")  # not an approver: nothing
    bot.settle()
    assert runs(marker) == [] and thread.is_alive()
    bot.click(APPROVER, "runbook_approve", "confirm")
    thread.join(20)
    assert outcome == ["ran FLUSHDB"] and runs(marker) == ["FLUSHDB"]
    bot.settle()
    wait_for(lambda: bot.status("confirm") == "success", what="the reported result")
    (incident,) = bot.app.store.incidents()
    assert incident.id.startswith("GRD-")
    statuses = [(e["status"], e["actor"]) for e in bot.app.store.events(incident.id)]
    for expected in [
        ("requires_manual", None),
        ("unauthorized", STRANGER),
        ("approved", APPROVER),
        ("executed", APPROVER),
        ("succeeded", None),
    ]:
        assert expected in statuses


def test_rejected_in_slack_the_function_does_not_run(bot: Bot, tmp_path: Path) -> None:
    marker = tmp_path / "cleared"
    guard.configure(env="staging", bot_url=bot.url, token=TOKEN)
    thread, outcome = call_in_thread(lambda: guarded(marker)("FLUSHDB"))
    bot.click(GROUPIE, "runbook_reject", "confirm")
    thread.join(20)
    assert isinstance(outcome[0], ApprovalDenied) and runs(marker) == []
    bot.settle()
    assert bot.status("confirm") == "rejected"


def test_a_function_that_raises_shows_failed_in_the_thread(bot: Bot, tmp_path: Path) -> None:
    marker = tmp_path / "cleared"
    guard.configure(env="staging", bot_url=bot.url, token=TOKEN)
    thread, outcome = call_in_thread(lambda: guarded(marker, fail=True)("FLUSHDB"))
    bot.click(APPROVER, "runbook_approve", "confirm")
    thread.join(20)
    assert isinstance(outcome[0], RuntimeError) and runs(marker) == ["FLUSHDB"]
    wait_for(lambda: bot.status("confirm") == "failed", what="the reported failure")


def test_without_the_token_nobody_may_ask_and_nothing_runs(bot: Bot, tmp_path: Path) -> None:
    marker = tmp_path / "cleared"
    for token in ("", "wrong-token"):
        guard.configure(env="staging", bot_url=bot.url, token=token)
        with pytest.raises(ApprovalDenied):
            guarded(marker)("FLUSHDB")
    assert runs(marker) == [] and bot.app.store.incidents() == []
    body = {"request_id": "abcdefgh", "function": "f", "message": "m", "timeout": 5, "env": ""}
    response = httpx.post(f"{bot.url}/guard/requests", json=body)
    assert response.status_code == 401


def test_deny_by_default_when_the_bot_has_no_token(tmp_path: Path, slack: FakeSlack) -> None:
    write_catalog(tmp_path)
    bot = Bot(tmp_path, slack)  # RUNBOOK_GUARD_TOKEN unset
    try:
        body = {"request_id": "abcdefgh", "function": "f", "message": "m", "timeout": 5, "env": ""}
        for headers in ({}, {"Authorization": "Basic Zm9vOmJhcg=="}, {"Authorization": "Bearer x"}):
            response = httpx.post(f"{bot.url}/guard/requests", json=body, headers=headers)
            assert response.status_code == 401
    finally:
        bot.stop()


def test_malformed_requests_are_refused(bot: Bot) -> None:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    good = {"request_id": "abcdefgh", "function": "m.f", "message": "m", "timeout": 5, "env": ""}
    for bad in (
        {**good, "extra": 1},
        {**good, "timeout": 0},
        {**good, "timeout": True},
        {**good, "request_id": "short"},
        {**good, "function": "rm -rf /"},
        {**good, "message": ""},
        {**good, "env": "prod; drop"},
    ):
        response = httpx.post(f"{bot.url}/guard/requests", json=bad, headers=headers)
        assert response.status_code == 400, bad
    assert httpx.get(f"{bot.url}/guard/requests/PNOTGUARD", headers=headers).status_code == 404
    bot.settle()
    assert bot.app.store.incidents() == []


def test_no_answer_in_time_is_expired_and_nothing_runs(bot: Bot, tmp_path: Path) -> None:
    marker = tmp_path / "cleared"
    now = [0.0]

    def sleep(seconds: float) -> None:
        now[0] += 30.0  # the approvers stay silent: every look is 30 s later

    confirmer = guard.BotConfirmer(bot.url, token=TOKEN, clock=lambda: now[0], sleep=sleep)
    guard.configure(env="staging", confirmer=confirmer)
    with pytest.raises(ApprovalDenied, match="expired"):
        guarded(marker)("FLUSHDB")
    assert runs(marker) == []


def test_the_docs_example_runs_against_the_bot(bot: Bot, tmp_path: Path) -> None:
    """docs/examples/guarded_flush.py as a user runs it: a separate process."""
    import os
    import subprocess
    import sys

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "a.bin").write_text("x")
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "guarded_flush.py"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "RUNBOOK_BOT_URL": bot.url,
        "RUNBOOK_GUARD_TOKEN": TOKEN,
        "RUNBOOK_ENV": "staging",
        "CACHE_DIR": str(cache),
    }
    process = subprocess.Popen(
        [sys.executable, str(example)], env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        bot.click(APPROVER, "runbook_approve", "confirm")
        out, _ = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0 and "flushed 1 cache files" in out
    assert list(cache.iterdir()) == []


def test_a_program_that_dies_after_approval_is_not_waited_for_forever(
    bot: Bot, slack: FakeSlack, request: pytest.FixtureRequest
) -> None:
    """Approved, then no report (the program died): after GUARD_REPORT_SECONDS the step
    is interrupted and escalated by the bot's own timer; a report after that is refused."""
    http = httpx.Client(base_url=bot.url, headers={"Authorization": f"Bearer {TOKEN}"})
    request.addfinalizer(http.close)
    asked = http.post(
        "/guard/requests",
        json={
            "request_id": "dead-program-1",
            "function": "ops.clear_cache",
            "message": "Clear the cache of api?",
            "timeout": 60,
            "env": "staging",
        },
    )
    assert asked.status_code == 202
    channel, _ts, _ = bot.button("runbook_approve", "confirm")
    bot.click(APPROVER, "runbook_approve", "confirm")
    wait_for(lambda: bot.status("confirm") == "running", what="claimed for the program")
    assert bot.app.engine.due_guard_ends() == []  # it may still be running its function
    started = bot.step_run("confirm").started_at or 0.0
    bot.app.engine.clock = lambda: started + GUARD_REPORT_SECONDS + 1  # an hour later
    wait_for(lambda: bot.status("confirm") == "interrupted", what="the housekeeping timer")
    late = http.post("/guard/requests/GRD-dead-program-1/result", json={"ok": True, "detail": ""})
    assert late.status_code == 409
    bot.settle()
    assert bot.status("confirm") == "interrupted"
    run = bot.app.store.run("GRD-dead-program-1")
    assert run is not None and run.status == "escalated"
    assert any("did not report" in visible_text(m) for m in slack.messages(channel)), (
        "the thread says why"
    )
