"""The catalog lives in Git: the running bot reloads it, never serves a broken one, and
decides the environment by one rule. A real BotApp (and the real `runbook-bot` process for
SIGHUP and start-up) on a catalog that is a real Git repository, with the Slack stand-in.
"""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes import FakeSlack
from slack_harness import (
    APPROVER,
    INCIDENT,
    Bot,
    BotProcess,
    click_payload,
    process_env,
    reaction_event,
    wait_for,
    write_catalog,
)

from bot import effects, metrics
from bot.errors import CatalogUnavailable


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def commit(root: Path, message: str) -> str:
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", message)
    return git(root, "rev-parse", "HEAD")[:12]


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    root = tmp_path / "catalog"
    write_catalog(root)
    git(root, "init", "-q")
    git(root, "config", "user.email", "t@example.com")
    git(root, "config", "user.name", "t")
    (root / ".gitignore").write_text("state.db*\nstate-steps/\nran.log\ngate\n")
    commit(root, "first")
    return root


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(usergroups={"S0ONCALL": ["UGROUPIE"]}) as fake:
        yield fake


def set_check_output(root: Path, text: str) -> None:
    """Change what the `check` action prints (and so what its step message shows)."""
    path = root / "actions" / "check.yaml"
    action = json.loads(path.read_text())
    action["command"][-1] = f"print({text!r})"
    action["expect"] = [{"pattern": text}]
    path.write_text(json.dumps(action))


def set_guarded_argument(root: Path, value: str) -> None:
    path = root / "actions" / "guarded.yaml"
    action = json.loads(path.read_text())
    action["command"] = [*action["command"][:4], value]  # [python, -c, code, ran.log, gate]
    path.write_text(json.dumps(action))


def info_commit() -> str:
    for family in metrics.REGISTRY.collect():
        if family.name == "runbook_bot":
            for sample in family.samples:
                return str(sample.labels.get("catalog_commit", ""))
    return ""


def reloads(result: str) -> float:
    value = metrics.REGISTRY.get_sample_value("runbook_catalog_reloads_total", {"result": result})
    return value or 0.0


def test_a_merged_change_is_served_without_a_restart(catalog: Path, slack: FakeSlack) -> None:
    bot = Bot(catalog, slack, catalog_refresh=0.05)
    try:
        first = bot.app.catalog.version
        set_check_output(catalog, "checked-v2")
        second = commit(catalog, "check prints v2")
        wait_for(lambda: bot.app.catalog.version == second, what="the new commit served")
        # runbook_bot_info follows once the new catalog is stored (the reload's last act)
        wait_for(lambda: info_commit() == second, what="runbook_bot_info shows it")
        assert first != second
        bot.open_incident()
        wait_for(lambda: bot.status("check") == "success", what="check ran")
        assert "checked-v2" in bot.step_run("check").output
        assert {e["catalog_commit"] for e in bot.app.store.events()} == {second}
    finally:
        bot.stop()


def test_a_broken_commit_after_a_good_one_is_never_served(catalog: Path, slack: FakeSlack) -> None:
    bot = Bot(catalog, slack, catalog_refresh=0.05)
    try:
        good = bot.app.catalog.version
        failed = reloads("failed")
        (catalog / "runbooks" / "broken.yaml").write_text("kind: runbook\nid: [not, an, id\n")
        commit(catalog, "a broken runbook")
        wait_for(lambda: reloads("failed") > failed, what="the failed reload counted")
        assert bot.app.catalog.version == good  # the last good one keeps serving
        ready = bot.http.get("/readyz")
        assert ready.status_code == 200  # the bot serves
        assert "broken.yaml:" in ready.json()["catalog_not_loaded"]
        bot.open_incident()
        wait_for(lambda: bot.status("check") == "success", what="check ran on the good catalog")
    finally:
        bot.stop()


def test_a_pending_request_is_asked_again_when_a_reload_changes_its_command(
    catalog: Path, slack: FakeSlack
) -> None:
    # Reloaded on request (SIGHUP's path), not by polling: a poll between the edit and the
    # commit would serve the edit as an uncommitted ("-dirty") version first.
    bot = Bot(catalog, slack, catalog_refresh=0)
    try:
        bot.open_incident()
        wait_for(lambda: bot.status("guarded") == "awaiting_approval", what="the request")
        first = bot.step_run("guarded")
        set_guarded_argument(catalog, str(catalog / "other-gate"))
        changed = commit(catalog, "guarded waits for another gate")
        bot.app.source.request_reload()
        wait_for(lambda: bot.step_run("guarded").attempt == 2, what="the request asked again")
        old = bot.app.store.approval(first.id)
        assert old is not None and old.status == "void"
        # ✅ on the old message changes nothing; the new request runs what it shows
        ref = bot.app.store.message_ref(effects.step_key(first.id))
        assert ref is not None
        old_message = reaction_event(APPROVER, "white_check_mark", *ref)
        assert bot.signed(old_message).status_code == 200
        bot.settle()
        assert bot.runs() == []
        (catalog / "other-gate").touch()
        assert bot.react(APPROVER, "white_check_mark").status_code == 200
        bot.settle()
        assert bot.runs() == ["ran"]
        assert bot.app.store.run(INCIDENT.id) is not None
        assert bot.app.store.run(INCIDENT.id).catalog_commit == changed  # type: ignore[union-attr]
    finally:
        bot.stop()


def test_a_click_on_a_request_made_void_by_a_reload_changes_nothing(
    catalog: Path, slack: FakeSlack
) -> None:
    """What was shown is what runs: the old message's Approve names the old rendering."""
    bot = Bot(catalog, slack, catalog_refresh=0)
    try:
        bot.open_incident()
        channel, ts, value = bot.button("runbook_approve")
        set_guarded_argument(catalog, str(catalog / "other-gate"))
        commit(catalog, "guarded waits for another gate")
        bot.app.source.request_reload()
        wait_for(lambda: bot.step_run("guarded").attempt == 2, what="the request asked again")
        old = click_payload(APPROVER, "runbook_approve", channel, ts, value)
        assert bot.post_click(old).status_code == 200
        bot.settle()
        assert bot.runs() == [] and bot.status("guarded") == "awaiting_approval"
        (catalog / "other-gate").touch()
        _, new_ts, new_value = bot.button("runbook_approve")
        assert new_ts != ts and new_value != value  # a new message, a new fingerprint
        assert bot.click(APPROVER, "runbook_approve").status_code == 200
        bot.settle()
        assert bot.runs() == ["ran"]
    finally:
        bot.stop()


def test_start_with_the_last_good_catalog_when_the_directory_is_broken(
    catalog: Path, slack: FakeSlack
) -> None:
    first = Bot(catalog, slack)
    good = first.app.catalog.version
    first.stop()
    (catalog / "runbooks" / "broken.yaml").write_text("kind: runbook\nid: [broken\n")
    commit(catalog, "broken")
    bot = Bot(catalog, slack)  # the database remembers the good catalog
    try:
        assert bot.app.catalog.version == good
        assert "broken.yaml:" in bot.http.get("/readyz").json()["catalog_not_loaded"]
        bot.open_incident()
        wait_for(lambda: bot.status("check") == "success", what="check ran")
    finally:
        bot.stop()


def test_a_broken_catalog_and_nothing_stored_refuses_to_start(
    catalog: Path, slack: FakeSlack
) -> None:
    (catalog / "runbooks" / "broken.yaml").write_text("kind: runbook\nid: [broken\n")
    with pytest.raises(CatalogUnavailable, match=r"broken\.yaml:"):
        Bot(catalog, slack)
    env = process_env(catalog, slack, RUNBOOK_DB=str(catalog / "other.db"))
    done = subprocess.run(
        [str(Path(__import__("sys").executable).parent / "runbook-bot")],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "broken.yaml:" in done.stderr and "Traceback" not in done.stderr


def test_sighup_reloads_at_once(catalog: Path, slack: FakeSlack) -> None:
    bot = BotProcess(process_env(catalog, slack, RUNBOOK_CATALOG_REFRESH="0"))
    try:

        def served() -> str:
            text = httpx.get(bot.url + "/metrics").text
            line = next(x for x in text.splitlines() if x.startswith("runbook_bot_info{"))
            return line.split('catalog_commit="')[1].split('"')[0]

        first = served()
        set_check_output(catalog, "checked-v3")
        third = commit(catalog, "v3")
        time.sleep(0.2)  # refresh is off: nothing may change without the signal
        assert served() == first
        for _ in range(20):  # a storm of SIGHUPs: at most one reload at a time
            bot.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: served() == third, what="the reload after SIGHUP")
    finally:
        assert bot.terminate() == 0


def test_the_environment_is_one_rule_and_unmapped_services_are_said_loudly(
    catalog: Path, slack: FakeSlack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    bot = Bot(catalog, slack, env="")  # no RUNBOOK_ENV, and `api` is not mapped
    try:
        assert any("api" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        bot.open_incident(dataclass_replace(INCIDENT, env=""))
        wait_for(lambda: bot.status("check") == "blocked", what="the step blocked")
        assert "no environment" in bot.step_run("check").reason
    finally:
        bot.stop()


def dataclass_replace(value: object, **changes: object) -> object:
    import dataclasses

    return dataclasses.replace(value, **changes)  # type: ignore[type-var]
