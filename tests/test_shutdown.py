"""Graceful shutdown of the real `runbook-bot` process on SIGTERM.

On SIGTERM the bot stops taking new work, lets running steps finish up to its grace
period (RUNBOOK_SHUTDOWN_GRACE) and leaves everything else pending in the database for
the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

SECRET = "whsec-shutdown"
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def _catalog(root: Path, marks: Path, seconds: float) -> Path:
    """One runbook whose only step is safe for automation and takes `seconds`."""
    code = (
        "import os, sys, time; open(sys.argv[1] + '.pids', 'a').write(f'{os.getpid()}\\n'); "
        "marks = open(sys.argv[1], 'a'); "
        "marks.write('start\\n'); marks.flush(); time.sleep(float(sys.argv[2])); "
        "marks.write('end\\n'); print('done')"
    )
    (root / "actions").mkdir(parents=True)
    (root / "runbooks").mkdir()
    (root / "catalog.yaml").write_text(
        "kind: catalog\nenvironments:\n  - name: staging\n  - name: prod\n    production: true\n"
    )
    (root / "actions" / "slow.yaml").write_text(
        json.dumps(
            {
                "id": "slow-check",
                "command": [sys.executable, "-c", code, str(marks), str(seconds)],
                "timeout": 120,
                "expect": [{"pattern": "done"}],
                "safety": {"requires_approval": False, "scopes": ["staging"]},
            }
        )
    )
    (root / "runbooks" / "slow.yaml").write_text(
        json.dumps(
            {
                "kind": "runbook",
                "id": "slow",
                "match": {"services": ["api"]},
                "steps": [{"action": "slow-check"}],
            }
        )
    )
    return root


def _event(incident_id: str) -> bytes:
    return json.dumps(
        {
            "event": {
                "id": f"EV-{incident_id}",
                "event_type": "incident.triggered",
                "resource_type": "incident",
                "occurred_at": "2026-11-23T10:00:00Z",
                "agent": None,
                "client": None,
                "data": {
                    "id": incident_id,
                    "type": "incident",
                    "self": f"https://api.pagerduty.invalid/incidents/{incident_id}",
                    "html_url": f"https://example.pagerduty.invalid/incidents/{incident_id}",
                    "number": 1,
                    "status": "triggered",
                    "incident_key": incident_id,
                    "created_at": "2026-11-23T10:00:00Z",
                    "title": "API latency high",
                    "service": {
                        "id": "PAPI",
                        "summary": "api",
                        "type": "service_reference",
                        "self": "https://api.pagerduty.invalid/services/PAPI",
                        "html_url": "https://example.pagerduty.invalid/services/PAPI",
                    },
                    "assignees": [],
                    "escalation_policy": None,
                    "teams": [],
                    "priority": None,
                    "urgency": "high",
                    "conference_bridge": None,
                    "resolve_reason": None,
                },
            }
        }
    ).encode()


class Bot:
    def __init__(self, tmp: Path, catalog: Path, grace: float) -> None:
        self.db = tmp / "bot.db"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "bot.log"
        self.env = {
            **os.environ,
            "RUNBOOK_CATALOG": str(catalog),
            "RUNBOOK_DB": str(self.db),
            "RUNBOOK_ENV": "staging",
            "RUNBOOK_WORKERS": "1",
            "RUNBOOK_SHUTDOWN_GRACE": str(grace),
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PAGERDUTY_WEBHOOK_SECRET": SECRET,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        exe = shutil.which("runbook-bot", path=os.path.dirname(sys.executable)) or "runbook-bot"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([exe], env=self.env, stdout=log, stderr=log)
        _wait(self.healthy, 20, "the bot to answer /healthz")

    def healthy(self) -> bool:
        assert self.proc is not None
        try:
            return httpx.get(self.url + "/healthz", timeout=1).status_code == 200
        except httpx.TransportError:
            assert self.proc.poll() is None, self.log_path.read_text()
            return False

    def deliver(self, incident_id: str) -> httpx.Response:
        body = _event(incident_id)
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        return httpx.post(
            self.url + "/pagerduty/webhook",
            content=body,
            headers={
                "Content-Type": "application/json",
                "X-PagerDuty-Signature": f"v1={signature}",
                "X-Webhook-Id": f"WH-{incident_id}",
            },
        )

    def terminate(self) -> tuple[int, float]:
        assert self.proc is not None
        began = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(60)
        return code, time.monotonic() - began

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def bots(tmp_path: Path) -> Iterator[list[Bot]]:
    started: list[Bot] = []
    yield started
    for bot in started:
        bot.kill()
    # A command left running past the grace period outlives the bot by design.
    pids = tmp_path / "marks.txt.pids"
    for pid in pids.read_text().split() if pids.exists() else []:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def _marks(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigterm_lets_the_running_step_finish_and_refuses_new_work(
    tmp_path: Path, bots: list[Bot]
) -> None:
    marks = tmp_path / "marks.txt"
    bot = Bot(tmp_path, _catalog(tmp_path / "catalog", marks, seconds=2.0), grace=30)
    bots.append(bot)
    bot.start()
    assert bot.deliver("P1").status_code == 202
    _wait(lambda: _marks(marks) == ["start"], 15, "the step to start")

    assert bot.proc is not None
    bot.proc.send_signal(signal.SIGTERM)
    # No new work: the listening socket closes at once, while the step still runs.
    _wait(lambda: not _answers(bot.url), 5, "the bot to stop listening")
    assert _marks(marks) == ["start"]
    code = bot.proc.wait(30)

    assert code == 0, bot.log_path.read_text()
    assert _marks(marks) == ["start", "end"]
    assert _rows(bot.db, "SELECT step_id, status FROM step_runs") == [("slow-check", "success")]


def test_past_the_grace_period_the_step_is_left_for_a_human_and_queued_work_waits(
    tmp_path: Path, bots: list[Bot]
) -> None:
    marks = tmp_path / "marks.txt"
    catalog = _catalog(tmp_path / "catalog", marks, seconds=30.0)
    bot = Bot(tmp_path, catalog, grace=1.0)
    bots.append(bot)
    bot.start()
    assert bot.deliver("P1").status_code == 202
    _wait(lambda: _marks(marks) == ["start"], 15, "the first step to start")
    # The only worker is busy: the second incident waits in the durable queue.
    assert bot.deliver("P2").status_code == 202

    code, took = bot.terminate()
    assert took < 15, f"shutdown took {took:.1f}s with a 1s grace period"
    assert code == 0, bot.log_path.read_text()
    # Left as it was: running in the database, not re-run, not marked done.
    assert _rows(bot.db, "SELECT status FROM step_runs") == [("running",)]
    assert _marks(marks) == ["start"]
    assert ("P2",) not in _rows(bot.db, "SELECT id FROM incidents")

    # The next start surfaces the interrupted step without re-running it and takes up
    # the queued incident.
    (catalog / "actions" / "slow.yaml").write_text(
        (catalog / "actions" / "slow.yaml").read_text().replace('"30.0"', '"0.1"')
    )
    again = Bot(tmp_path, catalog, grace=30)  # same database, new port
    bots.append(again)
    again.start()
    _wait(
        lambda: (
            sorted(_rows(again.db, "SELECT incident_id, status FROM step_runs"))
            == [("P1", "interrupted"), ("P2", "success")]
        ),
        20,
        "P1 interrupted and P2 processed",
    )
    assert _marks(marks) == ["start", "start", "end"]  # P1 once (interrupted), P2 once
    statuses = [
        s
        for (s,) in _rows(again.db, "SELECT status FROM automation_events WHERE incident_id = 'P1'")
    ]
    assert "interrupted" in statuses and statuses.count("executed") == 1


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=0.5)
    except httpx.TransportError:
        return False
    return True
