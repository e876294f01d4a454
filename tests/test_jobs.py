"""Step supervisors: a command's result outlives the bot.

Real supervisor processes (``bot.supervise``) in a temporary state directory, real
commands. "The bot died" is modelled by what it leaves behind: a supervisor whose
parent stopped reading (its results are in files) or a supervisor killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import py
from slack_harness import wait_for

from bot import executor
from bot.engine import Job
from bot.jobs import JobEnd, SupervisedExecutor, _ForkServer, _Supervisor
from bot.states import StepStatus
from bot.store import StepRun


def job(command: tuple[str, ...], *, step_run_id: int = 1, timeout: float = 30.0) -> Job:
    return Job(
        step_run_id=step_run_id,
        attempt=1,
        incident_id="P1",
        phase="main",
        action_id="act",
        spec=executor.CommandSpec(
            command=command, timeout=timeout, expect=(executor.Expectation("OK"),)
        ),
        context={"incident": {"id": "P1"}},
        output_cap=10_000,
        secret_patterns=(),
    )


def running(token: str, step_run_id: int = 1) -> StepRun:
    return StepRun(
        id=step_run_id,
        run_id=1,
        incident_id="P1",
        step_index=0,
        step_id="act",
        action="act",
        attempt=1,
        status=StepStatus.RUNNING,
        runner=f"local:{token}",
    )


class Ends:
    """A sink that keeps job ends, and lets tests wait for them."""

    def __init__(self) -> None:
        self.ends: list[JobEnd] = []
        self._cond = threading.Condition()

    def __call__(self, end: JobEnd) -> None:
        with self._cond:
            self.ends.append(end)
            self._cond.notify_all()

    def wait(self, count: int = 1, timeout: float = 30.0) -> list[JobEnd]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.ends) >= count, timeout), self.ends
            return list(self.ends)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "steps"


@pytest.fixture
def ends() -> Ends:
    return Ends()


@pytest.fixture
def supervised(state: Path, ends: Ends) -> Iterator[SupervisedExecutor]:
    executor_ = SupervisedExecutor(state, ends)
    executor_.open()
    yield executor_
    executor_.close(grace=10)


@pytest.fixture
def server(state: Path) -> Iterator[_ForkServer]:
    """The supervisors' fork server, as a bot runs it; closing it is the bot going away."""
    state.mkdir(parents=True, exist_ok=True)
    forks = _ForkServer(state, sys.executable)
    yield forks
    forks.close()


def spawn_supervisor(server: _ForkServer, token: str) -> _Supervisor:
    """A supervisor as the bot gets it: forked, holding its lock, called back."""
    supervisor = server.spawn(token)
    assert supervisor is not None
    return supervisor


def gone(state: Path, token: str, timeout: float = 30.0) -> None:
    """Wait until the supervisor of `token` has exited (its lock is free)."""
    executor = SupervisedExecutor(state, lambda end: None)
    wait_for(lambda: not executor._alive(token), timeout, f"supervisor {token} to exit")


def test_a_step_runs_under_its_supervisor_and_its_result_comes_back(
    supervised: SupervisedExecutor, ends: Ends, state: Path
) -> None:
    runner = supervised.reserve()
    supervised.start(runner, job(py("print('OK')")))
    (end,) = ends.wait()
    assert end.result is not None
    assert (end.result["status"], end.result["exit_code"]) == ("success", 0)
    assert end.result["output"].strip() == "OK"
    # the files are gone once the sink has the result
    deadline = time.monotonic() + 10
    while list(state.glob(runner.removeprefix("local:") + ".*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert list(state.glob(runner.removeprefix("local:") + ".*")) == []


def test_a_cold_runner_starts_its_supervisor_after_the_claim(state: Path, ends: Ends) -> None:
    cold = SupervisedExecutor(state, ends, warm=0)
    cold.open()
    try:
        runner = cold.reserve()  # nothing warm: a token only, no process yet
        assert not (state / f"{runner.removeprefix('local:')}.lock").exists()
        cold.start(runner, job(py("print('OK')")))
        (end,) = ends.wait()
        assert end.result is not None and end.result["status"] == "success"
    finally:
        cold.close(grace=10)


def test_a_released_runner_runs_nothing(supervised: SupervisedExecutor, ends: Ends) -> None:
    runner = supervised.reserve()
    supervised.release(runner)  # the claim did not commit
    assert supervised.reserve() == runner  # the warm supervisor is reused
    supervised.start(runner, job(py("print('OK')")))
    assert len(ends.wait()) == 1


def test_a_result_written_while_the_bot_was_gone_is_recovered(
    state: Path, ends: Ends, server: _ForkServer
) -> None:
    supervisor = spawn_supervisor(server, "t1")
    supervisor.send(job(py("print('OK')")))
    supervisor.dismiss()  # the bot is gone: nobody reads the result it sends
    gone(state, "t1")
    recovered = SupervisedExecutor(state, ends)
    (found,) = recovered.recover([running("t1")], lambda step: None, lambda step: None)
    assert found.result is not None and found.result["status"] == "success"
    assert not (found.interrupted or found.not_started or found.attached)


def test_a_step_whose_supervisor_was_killed_mid_command_is_interrupted(
    state: Path, ends: Ends, tmp_path: Path, server: _ForkServer
) -> None:
    pidfile = tmp_path / "pid"
    supervisor = spawn_supervisor(server, "t2")
    sleeper = py(
        f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpgrp())); "
        "time.sleep(60); print('OK')"
    )
    supervisor.send(job(sleeper))
    deadline = time.monotonic() + 30
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    started = json.loads((state / "t2.started").read_text())
    os.kill(started["pid"], signal.SIGKILL)
    supervisor.dismiss()
    gone(state, "t2")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(int(pidfile.read_text()), signal.SIGKILL)
    (found,) = SupervisedExecutor(state, ends).recover(
        [running("t2")], lambda step: None, lambda step: None
    )
    assert found.interrupted and found.result is None


def test_a_supervisor_that_never_got_its_job_proves_the_step_never_started(
    state: Path, ends: Ends, server: _ForkServer
) -> None:
    supervisor = spawn_supervisor(server, "t3")
    supervisor.dismiss()  # the bot died before handing over the job
    gone(state, "t3")
    executor_ = SupervisedExecutor(state, ends)
    found = executor_.recover(
        [running("t3"), running("never-spawned", step_run_id=2)], lambda s: None, lambda s: None
    )
    assert [f.not_started for f in found] == [True, True]


def test_a_step_still_running_after_a_restart_is_watched_until_its_result(
    state: Path, ends: Ends, tmp_path: Path, server: _ForkServer
) -> None:
    gate = tmp_path / "gate"
    supervisor = spawn_supervisor(server, "t4")
    waiting = py(
        f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\nprint('OK')"
    )
    supervisor.send(job(waiting))
    supervisor.dismiss()  # the bot that started it is gone
    executor_ = SupervisedExecutor(state, ends)
    restarted: list[int] = []
    (found,) = executor_.recover(
        [running("t4")], lambda step: job(waiting), lambda step: restarted.append(step.id)
    )
    assert found.attached
    assert ends.ends == []
    gate.touch()
    (end,) = ends.wait()
    assert end.result is not None and end.result["status"] == "success"
    assert restarted == []


def test_stale_files_of_finished_supervisors_are_swept(
    state: Path, ends: Ends, server: _ForkServer
) -> None:
    supervisor = spawn_supervisor(server, "orphan")
    supervisor.send(job(py("print('OK')")))
    supervisor.dismiss()
    gone(state, "orphan")
    assert (state / "orphan.result").exists()
    SupervisedExecutor(state, ends).recover([], lambda s: None, lambda s: None)
    assert list(state.glob("orphan.*")) == []


def test_the_supervisor_survives_a_signal_to_the_bots_process_group(
    supervised: SupervisedExecutor, ends: Ends, tmp_path: Path
) -> None:
    """Ctrl-C in a terminal signals the foreground group: commands must not die of it."""
    gate = tmp_path / "gate"
    runner = supervised.reserve()
    token = runner.removeprefix("local:")
    waiting = f"import os, time\nwhile not os.path.exists({str(gate)!r}): time.sleep(0.01)\n"
    supervised.start(runner, job(py(waiting + "print('OK')")))
    lock: Any = state_file(supervised, token, "started")
    deadline = time.monotonic() + 30
    while not lock.exists():
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert os.getpgid(int(json.loads(lock.read_text())["pid"])) != os.getpgrp()
    gate.touch()
    (end,) = ends.wait()
    assert end.result is not None and end.result["status"] == "success"


def state_file(executor_: SupervisedExecutor, token: str, suffix: str) -> Path:
    return executor_.state_dir / f"{token}.{suffix}"
