"""Pull runners and the executor choice, with real parts: the bot (BotApp on waitress,
127.0.0.1, the Slack stand-in) and `runbook-bot runner` subprocesses connecting to it.

What the tests look at is what a user would see: the commands' own marks (what ran, how
often), the step rows, the Slack thread, the refusal log and /metrics.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSlack
from runner_harness import POOL, Runner, create_token, marks, wait_for, write_catalog
from slack_harness import CHANNEL, Bot

from bot import signing
from bot.engine import Incident

pytestmark = pytest.mark.slow


def incident(n: int | str, service: str = "edge") -> Incident:
    return Incident(id=f"PR{n}", title="edge trouble", service=service, env="staging")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "catalog"


@pytest.fixture
def bot(root: Path, slack: FakeSlack) -> Iterator[Bot]:
    write_catalog(root)
    started = Bot(root, slack, runner_lease=1.5)
    yield started
    started.stop()


@pytest.fixture
def public_key(bot: Bot, tmp_path: Path) -> Path:
    path = tmp_path / "bot.pub"
    path.write_text(signing.public_pem(bot.app.hub.key))
    return path


@pytest.fixture
def runners(tmp_path: Path) -> Iterator[list[Runner]]:
    started: list[Runner] = []
    yield started
    for runner in started:
        runner.kill()


def start_runner(
    bot: Bot,
    runners: list[Runner],
    public_key: Path,
    tmp_path: Path,
    *,
    name: str = "r1",
    token: str | None = None,
    **options: Any,
) -> Runner:
    token = token or create_token(Path(bot.config.db), name=name)
    runner = Runner(bot.url, token, public_key, tmp_path / f"{name}.db", **options)
    runners.append(runner)
    return runner


def _status(bot: Bot, incident_id: str, step_id: str) -> str:
    runs = [s for s in bot.app.store.step_runs_of(incident_id) if s.step_id == step_id]
    return str(runs[-1].status) if runs else ""


def thread_text(slack: FakeSlack) -> str:
    return "\n".join(
        json.dumps(m.get("blocks", "")) + m.get("text", "") for m in slack.messages(CHANNEL)
    )


def refusals(bot: Bot) -> list[tuple[str, str]]:
    return [(r.side, r.reason) for r in bot.app.store.runner_refusals()]


# --- the round trip --------------------------------------------------------------------


def test_a_runner_runs_a_step_of_its_pool_and_the_bot_records_the_result(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    start_runner(bot, runners, public_key, tmp_path)
    bot.open_incident(incident(1), settle=False)
    wait_for(lambda: _status(bot, "PR1", "remote") == "success", what="the remote step")
    assert marks(root / "marks.txt") == {"PR1:remote": 1}
    done = bot.app.store.step_runs_of("PR1")[-1]
    assert done.output.strip() == "OK"
    assert done.runner.startswith(f"runner:{POOL}:")
    assert bot.app.store.runner_jobs() == []  # its row went once the result was stored
    assert 'runbook_runners_connected{pool="edge"} 1.0' in bot.http.get("/metrics").text


def test_a_step_waits_for_a_runner_says_so_and_runs_once_one_connects(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path, slack: FakeSlack
) -> None:
    bot.open_incident(incident(2))
    assert _status(bot, "PR2", "remote") == "running"
    assert "No runner of pool `edge` is connected" in thread_text(slack)
    assert marks(root / "marks.txt") == {}
    start_runner(bot, runners, public_key, tmp_path)
    wait_for(lambda: _status(bot, "PR2", "remote") == "success", what="the remote step")
    assert marks(root / "marks.txt") == {"PR2:remote": 1}


def test_a_step_no_runner_takes_ends_as_not_run_after_the_action_timeout(
    root: Path, slack: FakeSlack
) -> None:
    write_catalog(root, timeout="1s")
    bot = Bot(root, slack)
    try:
        bot.open_incident(incident(3), settle=False)
        wait_for(lambda: _status(bot, "PR3", "remote") == "error", what="the step to give up")
        bot.settle()
        done = bot.app.store.step_runs_of("PR3")[-1]
        assert "no runner of pool edge took this step within 1s; it did not run" in done.detail
        assert "Escalating" in thread_text(slack)
        assert bot.app.store.runner_jobs() == []
    finally:
        bot.stop()
    assert marks(root / "marks.txt") == {}


def test_a_kubernetes_step_without_a_kubernetes_executor_is_refused_and_escalates(
    bot: Bot, slack: FakeSlack, root: Path
) -> None:
    bot.open_incident(incident(4, "kube"))
    done = bot.app.store.step_runs_of("PR4")[-1]
    assert done.status == "error"
    assert "no Kubernetes executor configured; nothing ran" in done.detail
    text = thread_text(slack)
    assert "no Kubernetes executor configured" in text
    assert "Escalating" in text
    assert bot.app.store.run("PR4") is not None
    assert str(bot.app.store.run("PR4").status) == "escalated"  # type: ignore[union-attr]
    assert marks(root / "marks.txt") == {}


def test_local_and_runner_steps_of_one_runbook_each_run_where_their_action_says(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    start_runner(bot, runners, public_key, tmp_path)
    bot.open_incident(incident(5, "mixed"), settle=False)
    wait_for(lambda: _status(bot, "PR5", "remote") == "success", what="both steps")
    here, remote = bot.app.store.step_runs_of("PR5")
    assert here.runner.startswith("local:") and remote.runner.startswith("runner:edge:")
    assert marks(root / "marks.txt") == {"PR5:here": 1, "PR5:remote": 1}


# --- a runner that disappears, a runner that comes back ---------------------------------


def test_a_runner_killed_mid_step_leaves_it_interrupted_never_run_again(
    root: Path, slack: FakeSlack, runners: list[Runner], tmp_path: Path
) -> None:
    write_catalog(root, pause=30.0)
    bot = Bot(root, slack, runner_lease=1.0)
    try:
        key = tmp_path / "bot.pub"
        key.write_text(signing.public_pem(bot.app.hub.key))
        runner = start_runner(bot, runners, key, tmp_path)
        bot.open_incident(incident(6), settle=False)
        wait_for(lambda: marks(root / "marks.txt")["PR6:remote"] == 1, what="the command")
        runner.kill()
        wait_for(lambda: _status(bot, "PR6", "remote") == "interrupted", what="interrupted")
        bot.settle()
        done = bot.app.store.step_runs_of("PR6")[-1]
        assert "stopped answering" in done.detail and "not re-run" in done.detail
        assert str(bot.app.store.run("PR6").status) == "escalated"  # type: ignore[union-attr]
        # A second runner of the pool gets nothing: the step is not offered again.
        start_runner(bot, runners, key, tmp_path, name="r2")
        bot.open_incident(incident(7), settle=False)
        wait_for(lambda: marks(root / "marks.txt")["PR7:remote"] == 1, what="the next step")
        assert marks(root / "marks.txt")["PR6:remote"] == 1
    finally:
        bot.stop()
