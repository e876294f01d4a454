"""Crashes and races with real processes and a real SQLite file.

A worker process (tests/crash_worker.py) is killed with SIGKILL in the middle of a
step; a new engine on the same database recovers: nothing runs twice, nothing pending
is lost. Several processes race to approve one step or open one incident: it runs once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import APPROVER
from crash_worker import build_catalog

from bot.engine import Engine, Incident
from bot.store import Store

WORKER = Path(__file__).resolve().parent / "crash_worker.py"
pytestmark = pytest.mark.slow


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def spawn(db: Path, marks: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(WORKER), str(db), str(marks), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate: object, seconds: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


@pytest.fixture
def marks(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "marks"
    folder.mkdir()
    yield folder
    # the killed worker's command lives in its own process group: stop it too
    for line in lines(folder / "slow.txt"):
        pid = int(line.split()[1])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


def test_kill_9_mid_step_then_restart(tmp_path: Path, marks: Path) -> None:
    db = tmp_path / "state.db"
    worker = spawn(db, marks, "crash")
    wait_until(lambda: lines(marks / "slow.txt"))  # the slow command has started
    observer = Store(db)
    (before,) = observer.pending_approvals()
    assert observer.running_step_runs()[0]["step_id"] == "slow-step"
    observer.close()

    worker.send_signal(signal.SIGKILL)
    assert worker.wait(10) == -signal.SIGKILL
    assert worker.stdout is not None and worker.stderr is not None
    worker.stdout.close()
    worker.stderr.close()

    store = Store(db)
    restarted = Engine(build_catalog(marks), store, default_env="staging")
    assert restarted.recover() == {"interrupted": 1, "runs_resumed": 2}

    # the interrupted step is surfaced, not re-run, and the run escalates to a human
    slow = next(s for s in store.step_runs_of("SLOW") if s["step_id"] == "slow-step")
    assert slow["status"] == "interrupted"
    assert "not re-run" in slow["detail"]
    statuses = [e["status"] for e in store.events("SLOW")]
    assert "interrupted" in statuses and statuses[-1] == "escalated"
    assert store.get_run("SLOW")["status"] == "escalated"  # type: ignore[index]
    time.sleep(0.3)
    assert len(lines(marks / "slow.txt")) == 1
    assert lines(marks / "after.txt") == []

    # the approval requested before the crash is still pending, deadline unchanged
    (after,) = store.pending_approvals()
    assert after == before
    assert after["expires_at"] > time.time()

    # approving it after the restart runs it exactly once, even approved twice and
    # recovered again
    assert restarted.approve(after["step_run_id"], APPROVER).ok
    assert not restarted.approve(after["step_run_id"], APPROVER).ok
    restarted.recover()
    Engine(build_catalog(marks), store, default_env="staging").recover()
    assert len(lines(marks / "guarded.txt")) == 1
    assert store.get_run("GUARDED")["status"] == "completed"  # type: ignore[index]
    store.close()


def _race(db: Path, marks: Path, processes: int, *args: str) -> list[str]:
    workers = [spawn(db, marks, *args) for _ in range(processes)]
    time.sleep(0.5)  # let them all start and open the database
    (marks / "go").touch()
    outputs = []
    for w in workers:
        out, err = w.communicate(timeout=60)
        assert w.returncode == 0, err
        outputs.append(out.strip())
    return outputs


def test_processes_racing_to_approve_one_step_run_it_once(tmp_path: Path, marks: Path) -> None:
    db = tmp_path / "state.db"
    store = Store(db)
    Engine(build_catalog(marks), store, default_env="staging").open_incident(
        Incident(id="GUARDED", title="orders down", service="orders")
    )
    (approval,) = store.pending_approvals()
    outputs = _race(db, marks, 6, "approve", str(approval["step_run_id"]))
    assert outputs.count("ok") == 1, outputs
    assert len(lines(marks / "guarded.txt")) == 1
    executed = [e for e in store.events("GUARDED") if e["status"] == "executed"]
    assert len(executed) == 1
    store.close()


def test_processes_racing_on_one_incident_open_it_once(tmp_path: Path, marks: Path) -> None:
    db = tmp_path / "state.db"
    Store(db).close()
    outputs = _race(db, marks, 6, "open", "SEARCH-1")
    assert outputs == ["ok"] * 6
    assert len(lines(marks / "once.txt")) == 1
    store = Store(db)
    assert [e["status"] for e in store.events("SEARCH-1")].count("matched") == 1
    assert store.get_run("SEARCH-1")["status"] == "completed"  # type: ignore[index]
    store.close()
