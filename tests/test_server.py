"""The bot's process: one HTTP server with every route, Slack modes, and a real restart."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes import FakeSlack
from slack_harness import (
    APPROVER,
    FAST,
    GROUP,
    GROUPIE,
    SIGNING_SECRET,
    TOKEN,
    Bot,
    reaction_event,
    sign,
    wait_for,
    write_catalog,
)

from bot.config import Config, Secret
from bot.errors import ConfigError
from bot.pagerduty import sign as sign_pagerduty
from bot.server import BotApp, HttpServer


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    with FakeSlack(usergroups={GROUP: [GROUPIE]}) as fake:
        yield fake


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    write_catalog(tmp_path)
    return tmp_path


def serve(app: BotApp) -> tuple[HttpServer, threading.Thread, httpx.Client]:
    server = HttpServer(app.wsgi, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    return server, thread, httpx.Client(base_url=f"http://127.0.0.1:{server.port}")


def test_routes_without_slack(catalog: Path) -> None:
    app = BotApp(Config(catalog=str(catalog), db=str(catalog / "state.db")))
    server, thread, http = serve(app)
    try:
        health = http.get("/healthz")
        assert health.status_code == 200
        assert health.json()["status"] == "ok"
        metrics = http.get("/metrics")
        assert metrics.status_code == 200
        assert "runbook_pending_approvals" in metrics.text
        assert http.get("/nowhere").status_code == 404
        assert http.post("/slack/events", content=b"{}").status_code == 404  # no Slack token
    finally:
        http.close()
        server.stop()
        thread.join(5)
        app.stop(grace=1)
        app.store.close()
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
            handler.close()
    finally:
        http.close()
        server.stop()
        thread.join(5)
        app.stop(grace=1)
        app.store.close()


# --- the real process ---------------------------------------------------------------------


class Process:
    """`runbook-bot` as a subprocess; its log is collected, its port read from the log."""

    def __init__(self, env: dict[str, str]) -> None:
        executable = Path(sys.executable).parent / "runbook-bot"
        self.proc = subprocess.Popen(
            [str(executable)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        found = wait_for(self._port, timeout=20, what="runbook-bot to listen")
        self.url = f"http://127.0.0.1:{found}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError("runbook-bot exited:\n" + "".join(self.log))
        for line in list(self.log):
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                return int(found.group(1))
        return None

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(20)
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code


def test_the_real_process_survives_a_restart_between_post_and_approval(
    catalog: Path, slack: FakeSlack
) -> None:
    # First life: the thread is posted and the step waits for approval.
    first = Bot(catalog, slack)
    first.open_incident()
    step = first.step_run("guarded")
    first.stop()

    # Second life: the installed `runbook-bot` command on the same database.
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "RUNBOOK_CATALOG": str(catalog),
        "RUNBOOK_DB": str(catalog / "state.db"),
        "RUNBOOK_ENV": "staging",
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": slack.api_url,
    }
    bot = Process(env)
    try:
        with httpx.Client(base_url=bot.url, timeout=10) as http:
            assert http.get("/healthz").json()["status"] == "ok"
            body = json.dumps(
                reaction_event(APPROVER, "white_check_mark", step["channel"], step["message_ts"])
            )
            forged = sign(body, secret="forged")
            assert http.post("/slack/events", content=body, headers=forged).status_code == 401
            assert http.post("/slack/events", content=body, headers=sign(body)).status_code == 200
            # the same delivery again, as Slack retries it
            retry = {**sign(body), "X-Slack-Retry-Num": "1"}
            assert http.post("/slack/events", content=body, headers=retry).status_code == 200

            ran = catalog / "ran.log"
            wait_for(
                lambda: (
                    ran.exists()
                    and "succeeded"
                    in (slack.message(step["channel"], step["message_ts"]) or {}).get("text", "")
                ),
                timeout=20,
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
        with sqlite3.connect(db) as conn:  # a backlog, as a long outage would leave
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
        http.close()
        server.stop()
        thread.join(5)
        app.stop(grace=1)
        app.store.close()


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


def test_every_delivery_names_the_catalog_it_was_received_under(
    catalog: Path, slack: FakeSlack
) -> None:
    bot = Bot(catalog, slack, pagerduty_webhook_secret=Secret("pd-secret"))
    try:
        webhook = {
            "event": {
                "id": "EV0001",
                "event_type": "incident.triggered",
                "resource_type": "incident",
                "data": {
                    "id": "PINC001",
                    "type": "incident",
                    "title": "API elevated errors",
                    "service": {"id": "PAPI", "summary": "api"},
                },
            }
        }
        body = json.dumps(webhook).encode()
        headers = {"X-PagerDuty-Signature": sign_pagerduty(body, "pd-secret")}
        assert bot.http.post("/pagerduty/webhook", content=body, headers=headers).status_code == 202
        wait_for(
            lambda: bot.status("guarded") and bot.step_run("guarded")["message_ts"],
            what="the step posted",
        )
        assert bot.react(APPROVER, "white_check_mark").status_code == 200
        bot.settle()
        rows = bot.app.store.query("SELECT source, catalog_commit FROM deliveries ORDER BY rowid")
        version = bot.app.catalog.version
        assert rows == [
            {"source": "pagerduty", "catalog_commit": version},
            {"source": "slack", "catalog_commit": version},
        ]
    finally:
        bot.stop()
