"""The intake front (bot.front): the process that owns the port and answers PagerDuty.

Real `runbook-bot` processes on 127.0.0.1, real signed V3 deliveries, the bot's real
SQLite files read from outside; the front is found as the bot's child process and
killed with SIGKILL like the kernel's OOM killer would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fakes import FakePagerDuty
from pagerduty_harness import (
    BotProcess,
    in_log_only,
    pagerduty_account,
    signed_headers,
    v3_event,
    wait_for,
    write_catalog,
)

from bot.config import Config, Secret

WEBHOOK = "/pagerduty/webhook"


@pytest.fixture
def pd() -> Iterator[FakePagerDuty]:
    with pagerduty_account() as fake:
        yield fake


@pytest.fixture
def bot(tmp_path: Path, pd: FakePagerDuty) -> Iterator[BotProcess]:
    catalog = write_catalog(tmp_path / "catalog")
    process = BotProcess(catalog, tmp_path / "bot.db", pd, None, tmp_path / "bot.log")
    process.start()
    try:
        yield process
    finally:
        process.close()


def fronts(pid: int) -> list[int]:
    """The bot's intake front processes (its children running bot.front)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except FileNotFoundError:
            continue  # the thread ended meanwhile
        for child in map(int, children):
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except FileNotFoundError:
                continue
            if b"bot.front" in cmdline:
                found.append(child)
    return found


def the_front(bot: BotProcess) -> int:
    assert bot.proc is not None
    pid = bot.proc.pid
    return wait_for(lambda: (f := fronts(pid)) and len(f) == 1 and f[0], what="one front")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone but not reaped


def recorded_event_keys(bot: BotProcess) -> list[str]:
    """Keys of PagerDuty items the bot holds: in its inbox or still in its intake log."""
    inbox = [k for (k,) in bot.query("SELECT key FROM inbox WHERE source = 'pagerduty'")]
    return inbox + [k for (k,) in in_log_only(bot.db, "key")]


def deliveries(bot: BotProcess, outcome: str) -> float:
    text = bot.http.get("/metrics").text
    line = f'runbook_webhook_deliveries_total{{outcome="{outcome}",source="pagerduty"}}'
    values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
    return values[0] if values else 0.0


def test_config_comes_back_equal_through_the_environment() -> None:
    config = Config(
        db="/var/lib/bot/state.db",
        port=8080,
        catalog_refresh=2.5,
        slack_bot_token=Secret("xoxb-1"),
        approve_reactions=("white_check_mark", "+1"),
        intake_process=0,
    )
    assert Config.from_env(config.to_env()) == config
    assert Config.from_env(Config().to_env()) == Config()


def test_the_front_answers_pagerduty_and_passes_everything_else_to_the_bot(
    bot: BotProcess,
) -> None:
    front = the_front(bot)
    event = v3_event("incident.triggered", "P1")
    first = bot.deliver(event)
    again = bot.deliver(event)  # PagerDuty's retry of the same event
    body = json.dumps(v3_event("incident.triggered", "P3")).encode()
    forged = bot.http.post(
        WEBHOOK, content=body, headers={**signed_headers(body), "X-PagerDuty-Signature": "v1=00"}
    )
    assert (first.status_code, first.json()["status"]) == (202, "accepted")
    assert (again.status_code, again.json()["status"]) == (202, "duplicate")
    assert forged.status_code == 401
    # Applied by the bot: the incident opened, once; the forged one changed nothing.
    wait_for(lambda: bot.outstanding() == 0, what="the delivery applied")
    assert bot.query("SELECT id FROM incidents") == [("P1",)]
    assert recorded_event_keys(bot) == [f"pagerduty:event:{event['event']['id']}"]
    # Counted in the bot's /metrics (which the front passes on).
    wait_for(lambda: deliveries(bot, "duplicate") == 1, what="the counts told to the bot")
    assert (deliveries(bot, "accepted"), deliveries(bot, "rejected")) == (1, 1)
    # Every other route is the bot's, as it answers it.
    health = bot.http.get("/healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert bot.http.get("/readyz").json()["status"] == "ready"
    assert bot.http.get(WEBHOOK).status_code == 405
    missing = bot.http.get("/nowhere?x=1")
    assert missing.status_code == 404 and "GET /nowhere" in missing.json()["error"]
    assert bot.http.post("/slack/events", content=b"{}").status_code == 404  # Slack is off
    assert fronts(bot.proc.pid if bot.proc else 0) == [front]


def test_a_front_killed_mid_storm_is_replaced_and_no_acknowledged_delivery_is_lost(
    bot: BotProcess,
) -> None:
    """Deliveries keep coming from 4 senders while the front is killed -9 again and
    again; a delivery answered 202 must be recorded once, whatever was killed when."""
    kills = int(os.environ.get("FRONT_KILLS", "12"))  # the closing note's series: 100
    acknowledged: list[str] = []
    refused = 0  # no answer, or 503: the sender retries; not acknowledged, not counted
    lock = threading.Lock()
    done = threading.Event()

    def send() -> None:
        nonlocal refused
        with httpx.Client(base_url=bot.url, timeout=10) as client:
            while not done.is_set():
                event_id = str(uuid.uuid4())
                body = json.dumps(v3_event("incident.annotated", "P2", event_id=event_id)).encode()
                try:
                    answer = client.post(WEBHOOK, content=body, headers=signed_headers(body))
                except httpx.TransportError:
                    answer = None
                with lock:
                    if answer is not None and answer.status_code == 202:
                        assert answer.json()["status"] == "accepted"
                        acknowledged.append(f"pagerduty:event:{event_id}")
                    else:
                        refused += 1

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    try:
        killed: list[int] = []
        for _ in range(kills):
            with lock:
                before = len(acknowledged)
            wait_for(lambda b=before: len(acknowledged) > b + 5, what="deliveries answered")
            front = the_front(bot)
            os.kill(front, signal.SIGKILL)
            killed.append(front)
            wait_for(lambda f=front: the_front(bot) != f, what="a new front")
    finally:
        done.set()
        for sender in senders:
            sender.join()
    assert len(set(killed)) == kills
    wait_for(lambda: bot.outstanding() == 0, timeout=60, what="every delivery applied")
    recorded = recorded_event_keys(bot)
    lost = set(acknowledged) - set(recorded)
    twice = len(recorded) - len(set(recorded))
    summary = (
        f"{kills} front kills: {len(acknowledged)} acknowledged, {refused} not answered 202, "
        f"{len(lost)} lost, {twice} recorded twice"
    )
    print(summary)
    assert (len(lost), twice) == (0, 0), summary
    assert bot.http.get("/healthz").status_code == 200


def test_the_front_dies_with_the_bot_and_the_port_is_free_again(bot: BotProcess) -> None:
    front = the_front(bot)
    bot.kill()
    wait_for(lambda: not alive(front), what="the front gone with its bot")
    with socket.socket() as sock:  # nothing holds the port any more (as a server binds it)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", bot.port))
        sock.listen()
    bot.start()  # and a new bot serves it, with a front of its own
    assert the_front(bot) != front
    assert bot.deliver(v3_event("incident.triggered", "P1")).status_code == 202


def test_sigterm_stops_front_and_bot(bot: BotProcess) -> None:
    front = the_front(bot)
    assert bot.proc is not None
    bot.proc.terminate()
    assert bot.proc.wait(60) == 0
    wait_for(lambda: not alive(front), what="the front stopped")


def test_with_the_front_off_the_bot_serves_its_port_itself(
    tmp_path: Path, pd: FakePagerDuty
) -> None:
    catalog = write_catalog(tmp_path / "catalog")
    bot = BotProcess(
        catalog, tmp_path / "bot.db", pd, None, tmp_path / "bot.log", RUNBOOK_INTAKE_PROCESS="0"
    )
    bot.start()
    try:
        assert bot.proc is not None and fronts(bot.proc.pid) == []
        assert bot.deliver(v3_event("incident.triggered", "P1")).status_code == 202
        wait_for(lambda: bot.query("SELECT id FROM incidents"), what="the incident opened")
    finally:
        bot.close()
