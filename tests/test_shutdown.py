"""Graceful shutdown of the real `runbook-bot` process on SIGTERM, and the next start.

On SIGTERM the bot stops taking new work, lets running steps finish up to its grace
period (RUNBOOK_SHUTDOWN_GRACE) and leaves everything else pending in the database for
the next start. A step still running after the grace period goes on under its step
supervisor (its own process session); the next start finds it, still running or
finished, and records its real result.
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


def _catalog(root: Path, marks: Path, gate: Path) -> Path:
    """One runbook whose only step is safe for automation and runs until `gate` exists.

    The command notes its pid, then `start`, waits for the gate, then notes `end`.
    """
    code = (
        "import os, sys, time; open(sys.argv[1] + '.pids', 'a').write(f'{os.getpid()}\\n'); "
        "marks = open(sys.argv[1], 'a'); marks.write('start\\n'); marks.flush()\n"
        "while not os.path.exists(sys.argv[2]): time.sleep(0.01)\n"
        "marks.write('end\\n'); marks.flush(); print('done')"
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
                "command": [sys.executable, "-c", code, str(marks), str(gate)],
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

    def terminate(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(60)

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
    for pid in _pids(tmp_path / "marks.txt"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _marks(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def _pids(marks: Path) -> list[int]:
    pids = marks.with_name(marks.name + ".pids")
    return [int(p) for p in pids.read_text().split()] if pids.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _steps(db: Path) -> list[tuple[Any, ...]]:
    return _rows(db, "SELECT incident_id, step_id, status FROM step_runs ORDER BY id")


def _audit(db: Path) -> list[str]:
    return [s for (s,) in _rows(db, "SELECT status FROM automation_events ORDER BY id")]


def test_sigterm_lets_the_running_step_finish_and_refuses_new_work(
    tmp_path: Path, bots: list[Bot]
) -> None:
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    bot = Bot(tmp_path, _catalog(tmp_path / "catalog", marks, gate), grace=30)
    bots.append(bot)
    bot.start()
    assert bot.deliver("P1").status_code == 202
    _wait(lambda: _marks(marks) == ["start"], 15, "the step to start")

    assert bot.proc is not None
    bot.proc.send_signal(signal.SIGTERM)
    # No new work: the listening socket closes at once, while the step still runs.
    _wait(lambda: not _answers(bot.url), 5, "the bot to stop listening")
    assert _marks(marks) == ["start"]
    gate.touch()  # the step ends within the grace period
    code = bot.proc.wait(30)

    assert code == 0, bot.log_path.read_text()
    assert _marks(marks) == ["start", "end"]
    # Its result is recorded durably (applied at once, or queued in the inbox for the
    # next start); either way the next start shows it as it was, without running it again.
    again = Bot(tmp_path, tmp_path / "catalog", grace=30)
    bots.append(again)
    again.start()
    _wait(lambda: _steps(again.db) == [("P1", "slow-check", "success")], 15, "the result")
    assert _marks(marks) == ["start", "end"]
    assert _audit(again.db).count("executed") == 1 and "interrupted" not in _audit(again.db)


def test_past_the_grace_period_the_step_goes_on_and_the_next_start_takes_its_result(
    tmp_path: Path, bots: list[Bot]
) -> None:
    """The step outlives the bot under its supervisor; the next start, while the step
    still runs, answers /healthz and /readyz at once, watches the step, and records its
    real result when it ends: not "interrupted", not run again."""
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    catalog = _catalog(tmp_path / "catalog", marks, gate)
    bot = Bot(tmp_path, catalog, grace=1.0)
    bots.append(bot)
    bot.start()
    assert bot.deliver("P1").status_code == 202
    _wait(lambda: _marks(marks) == ["start"], 15, "the step to start")

    code = bot.terminate()  # returns although the step runs on: the grace is 1 s
    assert code == 0, bot.log_path.read_text()
    assert _steps(bot.db) == [("P1", "slow-check", "running")]
    (pid,) = _pids(marks)
    assert _alive(pid), "the command went on after the bot stopped"

    again = Bot(tmp_path, catalog, grace=30)
    bots.append(again)
    again.start()  # returns once /healthz answers: recovery did not hold serving back
    assert httpx.get(again.url + "/readyz", timeout=5).status_code == 200
    assert _marks(marks) == ["start"] and _alive(pid)  # still running, watched, not re-run

    gate.touch()
    _wait(lambda: _steps(again.db) == [("P1", "slow-check", "success")], 20, "its real result")
    assert _marks(marks) == ["start", "end"]
    audit = _audit(again.db)
    assert audit.count("executed") == 1 and "succeeded" in audit and "interrupted" not in audit


def test_a_step_that_ended_while_no_bot_ran_gets_its_result_at_the_next_start(
    tmp_path: Path, bots: list[Bot]
) -> None:
    marks, gate = tmp_path / "marks.txt", tmp_path / "gate"
    catalog = _catalog(tmp_path / "catalog", marks, gate)
    bot = Bot(tmp_path, catalog, grace=0.5)
    bots.append(bot)
    bot.start()
    assert bot.deliver("P1").status_code == 202
    _wait(lambda: _marks(marks) == ["start"], 15, "the step to start")
    code = bot.terminate()
    assert code == 0, bot.log_path.read_text()

    gate.touch()  # the command finishes with no bot around: its supervisor keeps the result
    (pid,) = _pids(marks)
    _wait(lambda: not _alive(pid) and _marks(marks) == ["start", "end"], 15, "the command's end")
    assert _steps(bot.db) == [("P1", "slow-check", "running")]

    again = Bot(tmp_path, catalog, grace=30)
    bots.append(again)
    again.start()
    _wait(lambda: _steps(again.db) == [("P1", "slow-check", "success")], 15, "its real result")
    output = _rows(again.db, "SELECT output FROM step_runs")
    assert output == [("done\n",)]
    assert _marks(marks) == ["start", "end"]
    assert "interrupted" not in _audit(again.db)


def _answers(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=0.5)
    except httpx.TransportError:
        return False
    return True
