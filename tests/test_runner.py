"""Pull runners and the executor choice, with real parts: the bot (BotApp on waitress,
127.0.0.1, the Slack stand-in) and `runbook-bot runner` subprocesses connecting to it.

What the tests look at is what a user would see: the commands' own marks (what ran, how
often), the step rows, the Slack thread, the refusal log and /metrics.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fakes import FakeSlack
from runner_harness import POOL, Runner, create_token, marks, wait_for, write_catalog
from slack_harness import CHANNEL, Bot

from bot import signing
from bot.engine import Incident
from bot.states import InboxKind
from bot.store import RunnerJob, Store
from runbookctl.cli import cli

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


def test_a_step_whose_incident_resolves_before_a_runner_takes_it_never_runs(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    bot.open_incident(incident(9))
    bot.app.inbox.put(
        source="pagerduty",
        key="resolve:PR9",
        incident_id="PR9",
        kind=InboxKind.RESOLVED,
        payload={"actor": "someone", "occurred_at": ""},
    )
    wait_for(lambda: _status(bot, "PR9", "remote") == "error", what="the step to end")
    done = bot.app.store.step_runs_of("PR9")[-1]
    assert "resolved before a runner took this step; it did not run" in done.detail
    start_runner(bot, runners, public_key, tmp_path)
    bot.open_incident(incident(10), settle=False)  # the runner is up and serving
    wait_for(lambda: _status(bot, "PR10", "remote") == "success", what="the next step")
    assert marks(root / "marks.txt") == {"PR10:remote": 1}


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


# --- tampering: nothing runs, each refusal is recorded ----------------------------------
#
# The threat: someone who can write the bot's database (not its signing key) tries to
# make a runner run something else, or something again. Each test tampers with what the
# bot queued, as such a person could, and checks that nothing ran, that the refusal is in
# the refusal log and counted, and that the step ended as not run.


def tamper(bot: Bot, job_id: str, **columns: Any) -> None:
    """Rewrite a queued step's row in the database, outside the bot."""
    conn = sqlite3.connect(bot.config.db, timeout=10)
    try:
        sets = ", ".join(f"{name} = ?" for name in columns)
        with conn:
            conn.execute(
                f"UPDATE runner_jobs SET {sets} WHERE job_id = ?", (*columns.values(), job_id)
            )
    finally:
        conn.close()


def queued(bot: Bot, incident_id: str) -> RunnerJob:
    found = [j for j in bot.app.store.runner_jobs() if j.incident_id == incident_id]
    assert len(found) == 1
    return found[0]


def refused_step(bot: Bot, incident_id: str, step_id: str, reason: str) -> None:
    wait_for(lambda: _status(bot, incident_id, step_id) == "error", what="the refusal")
    done = bot.app.store.step_runs_of(incident_id)[-1]
    assert f"refused this step ({reason}); it did not run" in done.detail


def counted(bot: Bot, side: str, reason: str) -> float:
    line = f'runbook_runner_refusals_total{{reason="{reason}",side="{side}"}} '
    for row in bot.http.get("/metrics").text.splitlines():
        if row.startswith(line):
            return float(row.split()[-1])
    return 0.0


def test_tampered_argv_is_refused(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    bot.open_incident(incident(11))
    job = queued(bot, "PR11")
    message = json.loads(job.payload)
    message["payload"]["argv"] = ["touch", str(root / "evil")]
    tamper(bot, job.job_id, payload=json.dumps(message))
    start_runner(bot, runners, public_key, tmp_path)
    refused_step(bot, "PR11", "remote", "bad_signature")
    assert refusals(bot) == [("runner", "bad_signature")]
    assert counted(bot, "runner", "bad_signature") >= 1
    assert not (root / "evil").exists() and marks(root / "marks.txt") == {}
    shown = CliRunner().invoke(cli, ["runner", "refusals", "--db", bot.config.db])
    assert f"\trunner\tbad_signature\t{POOL}\t{job.job_id}\t" in shown.output


def test_an_expired_payload_is_refused(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    bot.open_incident(incident(12))
    job = queued(bot, "PR12")
    old = json.loads(job.payload)["payload"]
    old["expires_at"] = time.time() - 60  # a genuine payload, signed long ago
    tamper(bot, job.job_id, payload=json.dumps(signing.sign(bot.app.hub.key, old)))
    start_runner(bot, runners, public_key, tmp_path)
    refused_step(bot, "PR12", "remote", "expired")
    assert refusals(bot) == [("runner", "expired")]
    assert marks(root / "marks.txt") == {}


def test_a_replayed_payload_is_refused(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    bot.open_incident(incident(13))
    ran = queued(bot, "PR13")
    start_runner(bot, runners, public_key, tmp_path)
    wait_for(lambda: _status(bot, "PR13", "remote") == "success", what="the first run")
    # The same signed payload, queued again for a new step of another incident.
    bot.open_incident(incident(14, "other"))
    again = queued(bot, "PR14")
    tamper(bot, again.job_id, payload=ran.payload, action="remote")
    refused_step(bot, "PR14", "remote-other", "replayed")
    assert refusals(bot) == [("runner", "replayed")]
    assert marks(root / "marks.txt") == {"PR13:remote": 1}


def test_a_payload_signed_by_another_key_is_refused(
    bot: Bot, runners: list[Runner], tmp_path: Path, root: Path
) -> None:
    other = tmp_path / "other.pub"
    other.write_text(signing.public_pem(Ed25519PrivateKey.generate()))
    bot.open_incident(incident(15))
    start_runner(bot, runners, other, tmp_path)
    refused_step(bot, "PR15", "remote", "bad_signature")
    assert refusals(bot) == [("runner", "bad_signature")]
    assert marks(root / "marks.txt") == {}


def test_an_action_off_the_allowlist_is_refused(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    # The row says `remote` (on the allowlist), the signed payload is `remote-other`.
    bot.open_incident(incident(16, "other"))
    job = queued(bot, "PR16")
    tamper(bot, job.job_id, action="remote")
    start_runner(bot, runners, public_key, tmp_path, allow=("remote",))
    refused_step(bot, "PR16", "remote-other", "not_allowed")
    assert refusals(bot) == [("runner", "not_allowed")]
    assert marks(root / "marks.txt") == {}


def test_a_revoked_token_is_refused_and_the_runner_stops(
    bot: Bot, runners: list[Runner], public_key: Path, tmp_path: Path, root: Path
) -> None:
    token = create_token(Path(bot.config.db), name="gone")
    revoked = CliRunner().invoke(
        cli,
        ["runner", "token", "revoke", "--pool", POOL, "--name", "gone", "--db", bot.config.db],
    )
    assert revoked.exit_code == 0, revoked.output
    bot.open_incident(incident(17))
    runner = start_runner(bot, runners, public_key, tmp_path, token=token)
    wait_for(lambda: runner.exited() is not None, what="the runner to stop")
    assert runner.exited() == 1
    assert "revoked" in "".join(runner.log)
    assert refusals(bot) == [("bot", "revoked_token")]
    assert counted(bot, "bot", "revoked_token") >= 1
    assert _status(bot, "PR17", "remote") == "running"  # still waiting for a runner
    assert marks(root / "marks.txt") == {}


def test_an_unknown_token_is_refused_and_recorded(bot: Bot) -> None:
    answer = bot.http.post(
        "/runner/poll",
        json={"pool": POOL, "allow": ["remote"], "wait": 0},
        headers={"Authorization": "Bearer rbr_not-a-token"},
    )
    assert answer.status_code == 401
    assert refusals(bot) == [("bot", "unknown_token")]
    assert counted(bot, "bot", "unknown_token") >= 1


# --- tokens and keys from runbookctl ------------------------------------------------------


def test_runner_tokens_are_created_listed_revoked_and_stored_hashed(tmp_path: Path) -> None:
    db = str(tmp_path / "state.db")
    created = CliRunner().invoke(
        cli, ["runner", "token", "create", "--pool", POOL, "--name", "r9", "--db", db]
    )
    assert created.exit_code == 0, created.output
    token = created.output.strip()
    assert token.startswith("rbr_") and len(token) > 40
    listed = CliRunner().invoke(cli, ["runner", "token", "list", "--db", db])
    assert listed.output.startswith(f"{POOL}\tr9\tcreated ") and "active" in listed.output
    assert token not in listed.output
    again = CliRunner().invoke(
        cli, ["runner", "token", "create", "--pool", POOL, "--name", "r9", "--db", db]
    )
    assert again.exit_code == 1 and "already has a token named r9" in again.output
    revoked = CliRunner().invoke(
        cli, ["runner", "token", "revoke", "--pool", POOL, "--name", "r9", "--db", db]
    )
    assert revoked.exit_code == 0
    assert "revoked 20" in CliRunner().invoke(cli, ["runner", "token", "list", "--db", db]).output
    for path in tmp_path.glob("state.db*"):
        assert token.encode() not in path.read_bytes()


def test_the_public_key_runbookctl_prints_verifies_what_the_bot_signs(
    bot: Bot, tmp_path: Path
) -> None:
    key_file = Path(bot.config.state_directory) / "signing.key"
    printed = CliRunner().invoke(cli, ["runner", "public-key", "--key", str(key_file)])
    assert printed.exit_code == 0
    (tmp_path / "printed.pub").write_text(printed.output)
    public = signing.load_public_key(tmp_path / "printed.pub")
    message = signing.sign(bot.app.hub.key, {name: 1 for name in signing.FIELDS})
    assert signing.verify(public, message)["job_id"] == 1


# --- simulate runs only what runs here ----------------------------------------------------


def test_simulate_execute_does_not_run_a_runner_action_here(root: Path, tmp_path: Path) -> None:
    from bot.catalog import load_catalog
    from bot.local import LocalRuntime

    markfile = write_catalog(root)
    store = Store(tmp_path / "simulate.db")
    try:
        runtime = LocalRuntime(load_catalog(root), store, default_env="staging")
        runtime.open(incident(20, "mixed"))
        here, remote = store.step_runs_of("PR20")
        assert str(here.status) == "success"
        assert str(remote.status) == "error"
        assert "runbookctl simulate does not reach; nothing ran" in remote.detail
    finally:
        store.close()
    assert marks(markfile) == {"PR20:here": 1}
