"""The bot's process: one HTTP server with every route, Slack modes, liveness and readiness,
a full database, and a real restart.

Slack is the stand-in of tests/fakes (see tests/test_slack.py for what it models);
PagerDuty deliveries are signed V3 webhooks posted to the bot as PagerDuty posts them.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fakes import FakeSlack
from slack_harness import (
    APPROVER,
    FAST,
    INCIDENT,
    SIGNING_SECRET,
    TOKEN,
    Bot,
    BotProcess,
    process_env,
    reaction_event,
    sign,
    wait_for,
    write_catalog,
)

from bot.config import Config, Secret
from bot.errors import ConfigError
from bot.pagerduty import sign as sign_pagerduty
from bot.server import READY_PROBE_SECONDS, BotApp
from bot.web import HttpServer

PD_SECRET = "pd-secret"


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    write_catalog(tmp_path)
    return tmp_path


def serve(app: BotApp) -> tuple[HttpServer, threading.Thread, httpx.Client]:
    server = HttpServer(app.wsgi, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return server, thread, httpx.Client(base_url=f"http://127.0.0.1:{server.port}")


def shut(app: BotApp, server: HttpServer, thread: threading.Thread, http: httpx.Client) -> None:
    http.close()
    server.stop()
    thread.join(5)
    app.stop(grace=1)
    app.store.close()


def triggered(incident_id: str, *, details_bytes: int = 0) -> bytes:
    """A signed-to-be V3 `incident.triggered` body for service `api`."""
    data: dict[str, Any] = {
        "id": incident_id,
        "type": "incident",
        "title": "API elevated errors",
        "service": {"id": "PAPI", "summary": "api"},
    }
    if details_bytes:
        data["custom_details"] = {"dump": "x" * details_bytes}
    event = {
        "id": f"EV{incident_id}",
        "event_type": "incident.triggered",
        "resource_type": "incident",
        "data": data,
    }
    return json.dumps({"event": event}).encode()


def deliver(http: httpx.Client, body: bytes) -> httpx.Response:
    headers = {"X-PagerDuty-Signature": sign_pagerduty(body, PD_SECRET)}
    return http.post("/pagerduty/webhook", content=body, headers=headers)


def test_routes_without_slack(catalog: Path) -> None:
    app = BotApp(Config(catalog=str(catalog), db=str(catalog / "state.db")))
    app.repair()
    server, thread, http = serve(app)
    app.start()
    try:
        health = http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        ready = http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready" and ready.json()["reason"] == ""
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        for name in ("runbook_pending_approvals", "runbook_inbox_queued", "runbook_outbox_pending"):
            assert name in metrics.text
        assert http.get("/nowhere").status_code == 404
        assert http.post("/slack/events", content=b"{}").status_code == 404  # no Slack token
        assert http.get("/pagerduty/webhook").status_code == 405
    finally:
        shut(app, server, thread, http)
    assert not thread.is_alive()  # stop() ends serve() promptly


def test_slack_events_route_takes_only_post(catalog: Path, slack: FakeSlack) -> None:
    bot = Bot(catalog, slack)
    try:
        assert bot.http.get("/slack/events").status_code == 405
        assert bot.http.get("/healthz").json()["status"] == "ok"
    finally:
        bot.stop()


def test_http_mode_needs_a_signing_secret(catalog: Path, slack: FakeSlack) -> None:
    config = Config(
        catalog=str(catalog),
        db=str(catalog / "state.db"),
        slack_bot_token=Secret(TOKEN),
        slack_api_url=slack.api_url,
    )
    with pytest.raises(ConfigError, match="SLACK_SIGNING_SECRET"):
        BotApp(config)


def test_a_bad_token_fails_at_start_with_advice_and_without_the_token(
    catalog: Path,
) -> None:
    with FakeSlack(token="xoxb-the-right-one") as slack:
        config = Config(
            catalog=str(catalog),
            db=str(catalog / "state.db"),
            slack_bot_token=Secret("xoxb-wrong-token"),
            slack_signing_secret=Secret(SIGNING_SECRET),
            slack_api_url=slack.api_url,
        )
        with pytest.raises(ConfigError) as raised:
            BotApp(config, slack_tuning=FAST)
    message = str(raised.value)
    assert "invalid_auth" in message and "SLACK_BOT_TOKEN" in message
    assert "xoxb-wrong-token" not in message


def test_socket_mode_serves_no_events_route(catalog: Path, slack: FakeSlack) -> None:
    config = Config(
        catalog=str(catalog),
        db=str(catalog / "state.db"),
        slack_bot_token=Secret(TOKEN),
        slack_app_token=Secret("xapp-1-test"),
        slack_api_url=slack.api_url,
    )
    app = BotApp(config, slack_tuning=FAST)  # no signing secret needed in Socket Mode
    server, thread, http = serve(app)
    try:
        assert http.post("/slack/events", content=b"{}").status_code == 404
        assert app.slack is not None
        handler = app.slack.socket_mode_handler()  # what start() connects
        try:
            assert handler.app is app.slack.bolt
            assert handler.app_token == "xapp-1-test"
        finally:
            handler.close()  # type: ignore[no-untyped-call]
    finally:
        shut(app, server, thread, http)


# --- liveness, readiness, start order ---------------------------------------------------------


def test_healthz_and_readyz_answer_before_work_resumes(catalog: Path, slack: FakeSlack) -> None:
    """Start order: repair, serve, then resume work. Between serving and resuming, the bot
    is alive and ready, and an acknowledged delivery waits in the inbox, applied once work
    resumes."""
    config = Config(
        catalog=str(catalog),
        db=str(catalog / "state.db"),
        env="staging",
        slack_bot_token=Secret(TOKEN),
        slack_signing_secret=Secret(SIGNING_SECRET),
        slack_api_url=slack.api_url,
        pagerduty_webhook_secret=Secret(PD_SECRET),
    )
    app = BotApp(config, slack_tuning=FAST, outbox_backoff=(0.05, 1.0))
    app.repair()
    server, thread, http = serve(app)
    try:
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").json() == {
            "status": "ready",
            "reason": "",
            "catalog": app.catalog.version,
            "inbox_queued": 0,
        }
        assert deliver(http, triggered(INCIDENT.id)).status_code == 202
        assert http.get("/readyz").json()["inbox_queued"] == 1
        assert app.store.incident(INCIDENT.id) is None  # not applied: work has not resumed
        assert slack.calls_to("chat.postMessage") == []

        app.start()
        wait_for(lambda: app.store.incident(INCIDENT.id), what="the delivery to be applied")
        slack.wait_for_calls("chat.postMessage", 3, timeout=15)
    finally:
        shut(app, server, thread, http)


def test_a_step_claimed_but_never_started_is_started_only_once_the_bot_serves(
    catalog: Path, slack: FakeSlack
) -> None:
    """The state a kill between a claim and its start leaves: the step is `running` with
    a runner whose supervisor never got the job. The next start repairs, serves, and
    only then starts it (same attempt), exactly once."""
    first = Bot(catalog, slack)
    first.open_incident()
    step = first.step_run("guarded")
    first.stop()
    with contextlib.closing(sqlite3.connect(catalog / "state.db")) as conn, conn:
        conn.execute(
            "UPDATE step_runs SET status = 'running', runner = 'local:0123456789abcdef', "
            "started_at = created_at WHERE id = ?",
            (step.id,),
        )
        conn.execute(
            "UPDATE approvals SET status = 'approved', decided_by = ? WHERE step_run_id = ?",
            (APPROVER, step.id),
        )

    config = Config(
        catalog=str(catalog),
        db=str(catalog / "state.db"),
        env="staging",
        slack_bot_token=Secret(TOKEN),
        slack_signing_secret=Secret(SIGNING_SECRET),
        slack_api_url=slack.api_url,
    )
    app = BotApp(config, slack_tuning=FAST, outbox_backoff=(0.05, 1.0))
    assert app.repair()["restarted"] == 1
    server, thread, http = serve(app)
    try:
        assert http.get("/healthz").status_code == 200
        assert not (catalog / "ran.log").exists()  # repaired, serving, and nothing ran yet
        app.start()
        wait_for(lambda: app.store.step_run(step.id).status == "success", what="the step")  # type: ignore[union-attr]
        assert (catalog / "ran.log").read_text().splitlines() == ["ran"]
        assert app.store.step_run(step.id).attempt == step.attempt  # type: ignore[union-attr]
    finally:
        shut(app, server, thread, http)


def test_healthz_says_stopping_once_a_stop_began(catalog: Path) -> None:
    app = BotApp(Config(catalog=str(catalog), db=str(catalog / "state.db")))
    app.repair()
    server, thread, http = serve(app)
    app.start()
    try:
        app.stop(grace=1)
        health = http.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        assert http.get("/readyz").json()["reason"] == "stopping"
    finally:
        http.close()
        server.stop()
        thread.join(5)
        app.store.close()


def _fill_until_refused(bot: Bot, prefix: str) -> tuple[list[str], str]:
    """Deliver incidents with large alert details until one is refused; (the accepted
    ones, the refused one)."""
    accepted: list[str] = []
    for n in range(200):
        incident_id = f"{prefix}{n:03d}"
        answer = deliver(bot.http, triggered(incident_id, details_bytes=20_000))
        if answer.status_code == 503:
            return accepted, incident_id
        assert answer.status_code == 202, answer.text
        accepted.append(incident_id)
    raise AssertionError("the database never filled up")


def _accepted_ones_are_stored(bot: Bot, accepted: list[str], refused: str) -> None:
    keys = {item.incident_id for item in bot.app.store.inbox_items(source="pagerduty")}
    assert set(accepted) <= keys  # every 202 was for something stored
    assert refused not in keys  # and the 503 for something that was not


@pytest.fixture
def full_bot(catalog: Path, slack: FakeSlack) -> Iterator[Bot]:
    bot = Bot(catalog, slack, pagerduty_webhook_secret=Secret(PD_SECRET))
    yield bot
    bot.stop()


def _cap_database(bot: Bot, *, intake_log: bool = True) -> None:
    """A full disk, simulated at SQLite's level: `PRAGMA max_page_count` caps a database
    at its current number of pages, so every write that needs one more page fails with
    SQLITE_FULL ("database or disk is full"), the error SQLite gives on a full disk.
    Both files the bot writes (the state database and, beside it, the intake log) are
    capped, as a full disk would; `intake_log=False` fills the state database only.
    Raising the caps again is the disk freed."""
    for conn in _connections(bot, intake_log):
        (pages,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {int(pages)}")


def _uncap_database(bot: Bot) -> None:
    for conn in _connections(bot, intake_log=True):
        conn.execute("PRAGMA max_page_count = 4294967294")


def _connections(bot: Bot, intake_log: bool) -> list[sqlite3.Connection]:
    store = bot.app.store
    assert store.intake is not None  # the bot's store records intake in its log
    return [store.conn, store.intake.conn] if intake_log else [store.conn]


def test_pagerduty_gets_503_never_202_while_the_database_cannot_record(full_bot: Bot) -> None:
    bot = full_bot
    _cap_database(bot)
    accepted, refused = _fill_until_refused(bot, "PFULL")
    assert "retry" in deliver(bot.http, triggered(refused, details_bytes=20_000)).text
    _accepted_ones_are_stored(bot, accepted, refused)
    assert bot.http.get("/healthz").status_code == 200  # alive all along

    _uncap_database(bot)  # the disk has room again: the same delivery, retried, is taken
    assert deliver(bot.http, triggered(refused, details_bytes=20_000)).status_code == 202
    wait_for(lambda: bot.app.store.incident(refused), what="the retried delivery applied")


def test_a_full_state_database_keeps_what_the_intake_log_acknowledged(full_bot: Bot) -> None:
    """Only the state database is full: deliveries are still recorded in the intake log
    and acknowledged, /readyz says why the bot is not ready, and once there is room
    every acknowledged delivery is applied, none lost."""
    bot = full_bot
    _cap_database(bot, intake_log=False)
    accepted = [f"PLOG{n:03d}" for n in range(20)]
    for incident_id in accepted:
        assert deliver(bot.http, triggered(incident_id, details_bytes=20_000)).status_code == 202
    not_ready = wait_for(
        lambda: (r := bot.http.get("/readyz")).status_code == 503 and r,
        timeout=READY_PROBE_SECONDS * 5,
        what="/readyz to say not ready",
    )
    assert "database or disk is full" in not_ready.json()["reason"]
    assert bot.app.store.count_queued() >= 1  # waiting in the log, not dropped
    _uncap_database(bot)
    wait_for(
        lambda: all(bot.app.store.incident(i) for i in accepted), what="every delivery applied"
    )
    wait_for(lambda: bot.http.get("/readyz").status_code == 200, what="/readyz ready again")


def test_readyz_says_why_while_the_database_is_full_and_recovers_by_itself(
    full_bot: Bot,
) -> None:
    bot = full_bot
    _cap_database(bot)
    _fill_until_refused(bot, "PREADY")
    not_ready = wait_for(
        lambda: (r := bot.http.get("/readyz")).status_code == 503 and r,
        timeout=READY_PROBE_SECONDS * 5,
        what="/readyz to say not ready",
    )
    assert "database or disk is full" in not_ready.json()["reason"]
    _uncap_database(bot)
    wait_for(lambda: bot.http.get("/readyz").status_code == 200, what="/readyz ready again")


TMPFS_BYTES = 4 * 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB tmpfs (root only): its disk fills up for real."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; the max_page_count tests cover a full disk")
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill_disk(path: Path) -> None:
    """Write to `path` until the disk refuses one more byte."""
    with contextlib.suppress(OSError), path.open("wb") as junk:
        while True:
            junk.write(b"\0" * 65536)
            junk.flush()
    with contextlib.suppress(OSError), path.open("ab") as junk:
        while True:
            junk.write(b"\0")
            junk.flush()


def test_a_real_full_disk_is_not_ready_refuses_deliveries_and_recovers(
    catalog: Path, slack: FakeSlack, small_disk: Path
) -> None:
    bot = Bot(
        catalog,
        slack,
        db=str(small_disk / "state.db"),
        pagerduty_webhook_secret=Secret(PD_SECRET),
    )
    try:
        bot.open_incident()
        channel, ts = bot.message_ref("guarded")
        junk = small_disk / "junk"
        _fill_disk(junk)
        accepted, refused = _fill_until_refused(bot, "PDISK")
        _accepted_ones_are_stored(bot, accepted, refused)
        reaction = reaction_event(APPROVER, "white_check_mark", channel, ts)
        assert bot.signed(reaction).status_code == 500  # not recorded: Slack retries it
        not_ready = wait_for(
            lambda: (r := bot.http.get("/readyz")).status_code == 503 and r,
            what="/readyz to say not ready",
        )
        assert "cannot be written" in not_ready.json()["reason"]
        reason = not_ready.json()["reason"]
        assert "database or disk is full" in reason or "bytes are free on the disk" in reason
        assert bot.http.get("/healthz").status_code == 200

        junk.unlink()  # an operator frees the disk; nobody restarts the bot
        wait_for(lambda: bot.http.get("/readyz").status_code == 200, what="ready again")
        assert deliver(bot.http, triggered(refused)).status_code == 202
        wait_for(lambda: bot.app.store.incident(refused), what="the retried delivery applied")
        retry = {"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_error"}
        assert bot.signed(reaction, **retry).status_code == 200
        bot.settle()
        assert bot.step_run("guarded", INCIDENT.id).status == "success"
    finally:
        bot.stop()


# --- the real process ---------------------------------------------------------------------


def test_the_real_process_survives_a_restart_between_post_and_approval(
    catalog: Path, slack: FakeSlack
) -> None:
    # First life: the thread is posted and the step waits for approval.
    first = Bot(catalog, slack)
    first.open_incident()
    channel, ts = first.message_ref("guarded")
    first.stop()

    # Second life: the installed `runbook-bot` command on the same database.
    bot = BotProcess(process_env(catalog, slack))
    ran = catalog / "ran.log"
    try:
        with httpx.Client(base_url=bot.url, timeout=10) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            body = json.dumps(reaction_event(APPROVER, "white_check_mark", channel, ts))
            forged = sign(body, secret="forged")
            assert http.post("/slack/events", content=body, headers=forged).status_code == 401
            assert http.post("/slack/events", content=body, headers=sign(body)).status_code == 200
            # the same delivery again, as Slack retries it
            retry = {**sign(body), "X-Slack-Retry-Num": "1"}
            assert http.post("/slack/events", content=body, headers=retry).status_code == 200

            wait_for(
                lambda: (
                    ran.exists()
                    and "succeeded" in (slack.message(channel, ts) or {}).get("text", "")
                ),
                timeout=30,
                what="the step to run in the new process",
            )
    finally:
        code = bot.terminate()
    assert code == 0, "".join(bot.log)
    assert ran.read_text().splitlines() == ["ran"]  # exactly once
    assert any("stopped" in line for line in bot.log)


def test_the_database_is_checkpointed_in_the_background(catalog: Path) -> None:
    db = catalog / "state.db"
    app = BotApp(Config(catalog=str(catalog), db=str(db)))
    app.checkpoint_seconds = 0.05
    app.repair()
    app.start()
    try:
        size = db.stat().st_size
        for n in range(20):  # far below SQLite's own checkpoint limit
            app.store.record_event(incident_id=f"P{n}", status="executed", detail="x" * 4000)
        wait_for(
            lambda: db.stat().st_size > size + 20 * 4000,
            what="the housekeeping thread to copy the WAL into the database file",
        )
    finally:
        app.stop(grace=1)
        app.store.close()


def test_pending_approvals_are_counted_at_scrape_without_reading_them(catalog: Path) -> None:
    db = catalog / "state.db"
    app = BotApp(Config(catalog=str(catalog), db=str(db)))
    server, thread, http = serve(app)
    try:
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            # a backlog, as a long outage would leave
            conn.executemany(
                "INSERT INTO approvals (step_run_id, incident_id, action, status, approvers, "
                "expires_at) VALUES (?, ?, 'guarded', ?, ?, 0)",
                [
                    (n, f"P{n}", "pending" if n % 4 else "approved", '{"users": ["U1"]}' * 20)
                    for n in range(20_000)
                ],
            )
        tracemalloc.start()
        try:
            scraped = http.get("/metrics")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert "runbook_pending_approvals 15000.0" in scraped.text
        assert peak < 4_000_000  # reading the 15,000 rows took tens of MB at each scrape
    finally:
        shut(app, server, thread, http)


# Posts a file's bytes, in its own process so that the bot's memory is measured alone.
POST_FILE = """
import json, sys, httpx
url, path, headers, chunked = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
body = open(path, "rb").read()
content = iter([body[i : i + 65536] for i in range(0, len(body), 65536)]) if chunked else body
print(httpx.post(url, content=content, headers=headers, timeout=10).status_code)
"""


def test_an_oversized_body_is_refused_before_the_bot_reads_it(
    catalog: Path, slack: FakeSlack
) -> None:
    bot = Bot(catalog, slack)
    try:
        envelope = reaction_event(APPROVER, "white_check_mark", "CINC", "1.0")
        text = json.dumps({**envelope, "padding": "x" * (2 * 1024 * 1024)})
        big = catalog / "big.json"
        big.write_text(text)
        headers = json.dumps(sign(text))  # signed: only its size is wrong

        def post(chunked: bool) -> tuple[str, int]:
            url = f"{bot.url}/slack/events"
            argv = [sys.executable, "-c", POST_FILE, url, str(big), headers, chunked * "chunked"]
            tracemalloc.start()
            try:
                done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert done.returncode == 0, done.stderr
            return done.stdout.strip(), peak

        status, peak = post(chunked=False)
        assert status == "413"  # from waitress, at the Content-Length: no route saw it
        assert peak < 512 * 1024  # nor was the body read (8 MB by the time bolt had it)
        status, peak = post(chunked=True)
        assert status == "413"  # without a length: refused once past the limit
        assert peak < 2 * 1024 * 1024  # read up to the limit, not all of it

        assert bot.http.get("/healthz").json()["status"] == "ok"
        bot.open_incident()  # and it still takes reactions
        assert bot.react(APPROVER, "white_check_mark").status_code == 200
        wait_for(lambda: bot.status("guarded") == "success", what="the approved step to run")
    finally:
        bot.stop()


def test_every_inbox_item_names_the_catalog_it_was_received_under(
    catalog: Path, slack: FakeSlack
) -> None:
    bot = Bot(catalog, slack, pagerduty_webhook_secret=Secret(PD_SECRET))
    try:
        assert deliver(bot.http, triggered(INCIDENT.id)).status_code == 202
        assert bot.react(APPROVER, "white_check_mark").status_code == 200
        bot.settle()
        version = bot.app.catalog.version
        received = [
            (item.source, item.catalog_commit)
            for item in bot.app.store.inbox_items(INCIDENT.id)
            if item.source in ("pagerduty", "slack")
        ]
        assert received == [("pagerduty", version), ("slack", version)]
        assert {item.catalog_commit for item in bot.app.store.inbox_items()} == {version}
    finally:
        bot.stop()


def test_a_delivery_id_is_unique_across_restarts(catalog: Path, slack: FakeSlack) -> None:
    """A PagerDuty retry after a restart is a duplicate: the inbox, not memory, knows it."""
    body = triggered(f"P{uuid.uuid4().hex[:8].upper()}")
    first = Bot(catalog, slack, pagerduty_webhook_secret=Secret(PD_SECRET))
    try:
        assert deliver(first.http, body).json()["status"] == "accepted"
    finally:
        first.stop()
    second = Bot(catalog, slack, pagerduty_webhook_secret=Secret(PD_SECRET))
    try:
        assert deliver(second.http, body).json()["status"] == "duplicate"
        assert len(second.app.store.inbox_items(source="pagerduty")) == 1
    finally:
        second.stop()
