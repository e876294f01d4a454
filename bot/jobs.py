"""Executors: where a claimed step's command runs, and how its end comes back.

The engine claims a step in a transaction (recording which runner has it), then hands
the job to an executor once that transaction commits. The executor never touches the
state: it reports the job's end to a sink, which puts it in the inbox (a
``step.finished`` or ``step.interrupted`` item, one per attempt), where it is applied in
order like everything else.

  SupervisedExecutor   the bot's: each command runs under a small supervisor process
                       (``bot.supervise``) that records the result in the state
                       directory, so a result survives the bot being killed mid-step;
                       after a restart, ``recover`` reads what the supervisors left.
  InlineExecutor       runs the command in the caller's thread (``runbookctl simulate
                       --execute``, tests of the engine alone): nothing survives a crash.
  DryRunExecutor       runs nothing: every step ends ``dry_run`` (``runbookctl simulate``).

Supervisors are kept warm (started ahead, their lock taken, waiting for a job), so a
step starts in a few milliseconds rather than a Python start-up.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot import executor, messages
from bot.catalog.model import LOCAL, Placement
from bot.engine import Job
from bot.states import InboxKind
from bot.store import StepRun
from bot.supervise import socket_address

log = logging.getLogger(__name__)

RUNNER_PREFIX = "local:"
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
_SUPERVISOR = (
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from bot.supervise import main; sys.exit(main(sys.argv[1:]))"
)


@dataclass(frozen=True)
class JobEnd:
    """How a job ended: a result, or an interruption (its outcome cannot be known)."""

    step_run_id: int
    attempt: int
    incident_id: str
    phase: str
    result: dict[str, Any] | None  # ExecutionResult fields; None: interrupted
    detail: str = ""
    message: str = ""  # interrupted: the whole text the thread shows, instead of the bot's


Sink = Callable[[JobEnd], None]


def end_item(end: JobEnd) -> dict[str, Any]:
    """The inbox item that reports a job's end (one per attempt: its key is unique)."""
    payload: dict[str, Any] = {
        "step_run_id": end.step_run_id,
        "attempt": end.attempt,
        "phase": end.phase,
        **(end.result or {}),
    }
    if end.result is None and end.message:
        payload["detail"] = end.message
    elif end.result is None:
        # Not only a bot that stopped: a Kubernetes Job's pod can be lost with its node.
        payload["detail"] = (
            f"this step's result could not be known ({end.detail}); it was not re-run. "
            "Check its effect and continue by hand."
        )
    return {
        "source": "executor",
        "key": f"step:{end.step_run_id}:{end.attempt}:end",
        "incident_id": end.incident_id,
        "kind": InboxKind.FINISHED if end.result is not None else InboxKind.INTERRUPTED,
        "payload": payload,
    }


def _end(
    job: Job, result: executor.ExecutionResult | dict[str, Any] | None, detail: str = ""
) -> JobEnd:
    values = dataclasses.asdict(result) if isinstance(result, executor.ExecutionResult) else result
    return JobEnd(job.step_run_id, job.attempt, job.incident_id, job.phase, values, detail)


def _error(detail: str) -> executor.ExecutionResult:
    return executor.ExecutionResult(
        status="error",
        exit_code=None,
        output="",
        duration=0.0,
        argv=(),
        matched=None,
        detail=detail,
    )


def run_job(
    job: Job, runner: Callable[..., executor.ExecutionResult] = executor.run
) -> executor.ExecutionResult:
    """Run a job in this process; a spec error or a crash of the runner is an `error`."""
    try:
        return runner(
            job.spec, job.context, output_cap=job.output_cap, secret_patterns=job.secret_patterns
        )
    except ValueError as exc:  # TemplateError and spec errors speak to people
        return _error(f"could not run: {exc}")
    except Exception:
        log.exception("runner failed for %s", job.action_id)
        return _error("could not run: unexpected error in the bot (see its log)")


class InlineExecutor:
    """Runs each command in the calling thread, at once. Nothing survives a crash.

    Only actions that run on the local host (`executor: local`), unless `everywhere`
    (runbook tests, whose scripted runner stands in for every executor and starts
    nothing): a runner or Kubernetes action is not run on this machine instead.
    """

    dry_run = False

    def __init__(
        self,
        sink: Sink,
        runner: Callable[..., executor.ExecutionResult] = executor.run,
        *,
        everywhere: bool = False,
        where: str = "runbookctl simulate",
    ) -> None:
        self.sink = sink
        self.runner = runner
        self.everywhere = everywhere
        self.where = where

    def reserve(self, placement: Placement = LOCAL) -> str:
        return "inline"

    def release(self, runner: str) -> None:
        return None

    def start(self, runner: str, job: Job) -> None:
        if job.placement.kind != "local" and not self.everywhere:
            detail = messages.executor_unavailable(job.placement, self.where)
            self.sink(_end(job, _error(detail)))
            return
        self.sink(_end(job, run_job(job, self.runner)))


class DryRunExecutor:
    """Runs nothing: each step ends `dry_run`, showing the path a real run would take."""

    dry_run = True

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    def reserve(self, placement: Placement = LOCAL) -> str:
        return "dry-run"

    def release(self, runner: str) -> None:
        return None

    def start(self, runner: str, job: Job) -> None:
        self.sink(
            JobEnd(
                job.step_run_id,
                job.attempt,
                job.incident_id,
                job.phase,
                {
                    "status": "dry_run",
                    "exit_code": None,
                    "output": "",
                    "duration": 0.0,
                    "argv": [],
                    "detail": "not executed (use --execute to run it)",
                },
            )
        )


@dataclass(frozen=True)
class Recovery:
    """What a restarted bot found of a step left running."""

    step: StepRun
    result: dict[str, Any] | None = None  # its command finished: use this
    interrupted: bool = False  # started, and its outcome is lost
    not_started: bool = False  # never started: safe to start now
    attached: bool = False  # still running under its supervisor: its end will come


class _Supervisor:
    """A supervisor that holds its lock and waits for its job on `conn`."""

    def __init__(self, conn: socket.socket, token: str) -> None:
        self.conn = conn
        self.token = token
        self.reader = conn.makefile("rb")

    def send(self, job: Job, record: str = "") -> None:
        self.conn.sendall((json.dumps(_job_message(job, record)) + "\n").encode())

    def result_line(self) -> str:
        """The result it sends when the command ends ("" if it died first)."""
        try:
            return self.reader.readline().decode("utf-8", "replace")
        except OSError:
            return ""

    def stored(self) -> None:
        """Its result is in the inbox: it need not record it itself (replicas)."""
        with contextlib.suppress(OSError):
            self.conn.sendall(b"stored\n")

    def dismiss(self) -> None:
        """End of the connection: an idle supervisor exits having run nothing."""
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.conn.close()


class _ForkServer:
    """The process supervisors are forked from (``bot.supervise``), and the socket they
    call back on. Forking a warm process costs a millisecond or two; starting Python
    costs tens, which a storm of automatic steps would pay hundreds of times."""

    def __init__(self, state_dir: Path, python: str) -> None:
        self.state_dir = state_dir
        self.python = python
        self.address = f"@runbook-bot-{os.getpid()}-{secrets.token_hex(6)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(socket_address(self.address))
        self.listener.listen(64)
        self._arrived: dict[str, socket.socket] = {}
        self._cond = threading.Condition()
        self._lock = threading.Lock()  # one writer to the server's stdin
        self._process: subprocess.Popen[bytes] | None = None
        self._closed = False
        threading.Thread(target=self._accept, name="supervisor-calls", daemon=True).start()

    def _start(self) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [
                self.python,
                "-I",
                "-c",
                _SUPERVISOR,
                _PACKAGE_ROOT,
                str(self.state_dir),
                self.address,
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,  # a signal to the bot's process group does not stop it
        )
        assert process.stdout is not None
        if process.stdout.readline().strip() != b"ready":
            process.wait()
            raise OSError(f"the step supervisor server exited (exit {process.returncode})")
        return process

    def spawn(self, token: str, timeout: float = 30.0) -> _Supervisor | None:
        """Fork a supervisor and wait until it holds its lock and has called back."""
        with self._lock:
            for _ in range(2):  # the server died (killed, OOM): start another, once
                try:
                    if self._process is None or self._process.poll() is not None:
                        self._process = self._start()
                    assert self._process.stdin is not None
                    self._process.stdin.write(token.encode("ascii") + b"\n")
                    self._process.stdin.flush()
                    break
                except OSError as exc:
                    log.error("the step supervisor server is not answering: %s", exc)
                    self._process = None
            else:
                return None
        with self._cond:
            if not self._cond.wait_for(lambda: token in self._arrived, timeout):
                log.error("a step supervisor did not call back within %.0fs", timeout)
                return None
            return _Supervisor(self._arrived.pop(token), token)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._hello, args=(conn,), daemon=True).start()

    def _hello(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            line = b""
            while not line.endswith(b"\n") and len(line) < 100:
                chunk = conn.recv(1)
                if not chunk:
                    break
                line += chunk
        except OSError:
            line = b""
        conn.settimeout(None)
        words = line.decode("ascii", "replace").split()
        if len(words) != 2 or words[0] != "ready":
            conn.close()
            return
        with self._cond:
            self._arrived[words[1]] = conn
            self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.listener.close()
        with self._lock:
            process, self._process = self._process, None
        if process is not None:
            for pipe in (process.stdin, process.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()  # end of its input: it exits, its supervisors go on
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(5)


class SupervisedExecutor:
    """Each command under its own supervisor process; results written to `state_dir`."""

    dry_run = False

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        sink: Sink,
        *,
        warm: int = 2,
        python: str = sys.executable,
        record: str = "",
    ) -> None:
        self.state_dir = Path(state_dir)
        # Replicas (a postgresql:// URL): each supervisor also records its result in the
        # shared inbox itself, so it counts even when this replica dies and never returns
        # (its files are then on a disk no survivor reads).
        self.record = record
        self.sink = sink
        self.warm = warm
        self.python = python
        self._server: _ForkServer | None = None
        self._ready: list[_Supervisor] = []
        self._reserved: dict[str, _Supervisor] = {}
        self._lock = threading.Condition()
        self._running: dict[str, threading.Thread] = {}
        self._closed = False
        self._refill = threading.Event()
        self._refiller: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Create the state directory, start the supervisors' server and keep supervisors
        warm (one is ready when this returns: the first step after a start starts at once)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)  # results hold command output
        self._server = _ForkServer(self.state_dir, self.python)
        if self.warm > 0:
            first = self._spawn(secrets.token_hex(8))
            if first is not None:
                with self._lock:
                    self._ready.append(first)
        self._refiller = threading.Thread(
            target=self._keep_warm, name="supervisor-pool", daemon=True
        )
        self._refiller.start()
        self._refill.set()

    def close(self, grace: float = 0.0) -> bool:
        """Stop warm supervisors; wait up to `grace` for running jobs. True if none runs."""
        with self._lock:
            self._closed = True
            idle, self._ready = self._ready, []
        self._refill.set()
        for supervisor in idle:
            supervisor.dismiss()
        with self._lock:
            idle_now = self._lock.wait_for(lambda: not self._running, grace)
        if self._server is not None:
            self._server.close()
        return idle_now

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    # --- Executor --------------------------------------------------------------------------

    def reserve(self, placement: Placement = LOCAL) -> str:
        with self._lock:
            if self._ready:
                supervisor = self._ready.pop()
                self._refill.set()
                self._reserved[supervisor.token] = supervisor
                return RUNNER_PREFIX + supervisor.token
        # None warm: one is forked in `start`, after the claim commits.
        return RUNNER_PREFIX + secrets.token_hex(8)

    def release(self, runner: str) -> None:
        token = runner.removeprefix(RUNNER_PREFIX)
        with self._lock:
            supervisor = self._reserved.pop(token, None)
            if supervisor is not None and not self._closed:
                self._ready.append(supervisor)
                return
        if supervisor is not None:
            supervisor.dismiss()

    def start(self, runner: str, job: Job) -> None:
        token = runner.removeprefix(RUNNER_PREFIX)
        with self._lock:
            supervisor = self._reserved.pop(token, None)
        thread = threading.Thread(
            target=self._run,
            args=(token, supervisor, job),
            name=f"step-{job.step_run_id}",
            daemon=True,
        )
        with self._lock:
            self._running[token] = thread
        thread.start()

    # --- a job's life ----------------------------------------------------------------------

    def _spawn(self, token: str) -> _Supervisor | None:
        """A supervisor for `token`, holding its lock (None: none could be started)."""
        if self._server is None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._server = _ForkServer(self.state_dir, self.python)
        try:
            return self._server.spawn(token)
        except OSError as exc:
            log.error("could not start a step supervisor: %s", exc)
            return None

    def _keep_warm(self) -> None:
        while True:
            self._refill.wait()
            self._refill.clear()
            while True:
                with self._lock:
                    if self._closed or len(self._ready) >= self.warm:
                        break
                supervisor = self._spawn(secrets.token_hex(8))
                if supervisor is None:
                    break
                with self._lock:
                    closed = self._closed
                    if not closed:
                        self._ready.append(supervisor)
                if closed:
                    supervisor.dismiss()
                    break
            with self._lock:
                if self._closed:
                    return

    def _run(self, token: str, supervisor: _Supervisor | None, job: Job) -> None:
        try:
            if supervisor is None:
                supervisor = self._spawn(token)
            if supervisor is None:
                self._deliver(token, _end(job, _error("could not start: no step supervisor")))
                return
            # Only now, with the supervisor holding its lock, may the job reach it.
            with contextlib.suppress(OSError):  # it died: the files below say what happened
                supervisor.send(job, self.record)
            result = _parse(supervisor.result_line())
            if result is not None:
                self._deliver(token, _end(job, result))
                supervisor.stored()
                supervisor.dismiss()
                return
            supervisor.dismiss()
            result = self._read(token, "result")
            if result is not None:
                self._deliver(token, _end(job, result))
            elif self._read(token, "started") is not None:
                if self._alive(token):  # still running: wait for its lock, then read
                    self._wait_gone(token)
                    result = self._read(token, "result")
                if result is not None:
                    self._deliver(token, _end(job, result))
                else:
                    self._deliver(token, _end(job, None, "its supervisor process died"))
            else:
                self._deliver(
                    token,
                    _end(job, _error("could not start: its supervisor process exited first")),
                )
        finally:
            with self._lock:
                self._running.pop(token, None)
                self._lock.notify_all()

    def _wait_gone(self, token: str) -> None:
        fd = os.open(self.state_dir / f"{token}.lock", os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # returns when the supervisor is gone
        finally:
            os.close(fd)

    def _deliver(self, token: str, end: JobEnd) -> None:
        """Hand the end to the sink (which stores it durably), then forget the files."""
        self.sink(end)
        for suffix in ("result", "started", "lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / f"{token}.{suffix}").unlink()

    def _read(self, token: str, what: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.state_dir / f"{token}.{what}").read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # --- after a restart -------------------------------------------------------------------

    def recover(
        self,
        steps: Iterable[StepRun],
        job_of: Callable[[StepRun], Job | None],
        restart: Callable[[StepRun], None],
    ) -> list[Recovery]:
        """What became of steps the last run of the bot left running.

        Still running (its supervisor holds its lock): watched, its end comes to the sink.
        Else its files tell: a result, an interruption, or a command that never started.
        `restart` is called for a watched step whose supervisor exits without starting it.
        """
        self.state_dir.mkdir(parents=True, exist_ok=True)
        found: list[Recovery] = []
        referenced: set[str] = set()
        for step in steps:
            if not step.runner.startswith(RUNNER_PREFIX):
                found.append(Recovery(step, interrupted=True))
                continue
            token = step.runner.removeprefix(RUNNER_PREFIX)
            referenced.add(token)
            if self._alive(token):
                job = job_of(step)
                if job is None:
                    found.append(Recovery(step, interrupted=True))
                    continue
                self._attach(token, job, functools.partial(restart, step))
                found.append(Recovery(step, attached=True))
                continue
            found.append(self._examine(token, step))
        self._sweep(referenced)
        return found

    def _examine(self, token: str, step: StepRun) -> Recovery:
        result = self._read(token, "result")
        if result is not None:
            return Recovery(step, result=result)
        if self._read(token, "started") is not None:
            return Recovery(step, interrupted=True)
        return Recovery(step, not_started=True)

    def forget(self, runner: str) -> None:
        """The end of a recovered step is stored: its files are no longer needed."""
        token = runner.removeprefix(RUNNER_PREFIX)
        for suffix in ("result", "started", "lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.state_dir / f"{token}.{suffix}").unlink()

    def _alive(self, token: str) -> bool:
        try:
            fd = os.open(self.state_dir / f"{token}.lock", os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return True
            raise
        finally:
            os.close(fd)
        return False

    def _attach(self, token: str, job: Job, restart: Callable[[], None]) -> None:
        def watch() -> None:
            try:
                fd = os.open(self.state_dir / f"{token}.lock", os.O_RDWR)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX)  # returns when the supervisor is gone
                finally:
                    os.close(fd)
                result = self._read(token, "result")
                if result is not None:
                    self._deliver(token, _end(job, result))
                elif self._read(token, "started") is not None:
                    self._deliver(token, _end(job, None, "its supervisor process died"))
                else:
                    self.forget(RUNNER_PREFIX + token)
                    restart()  # it never started: start it now
            finally:
                with self._lock:
                    self._running.pop(token, None)
                    self._lock.notify_all()

        thread = threading.Thread(
            target=watch, name=f"step-{job.step_run_id}-attached", daemon=True
        )
        with self._lock:
            self._running[token] = thread
        thread.start()

    def _sweep(self, referenced: set[str]) -> None:
        """Remove files of supervisors that are gone and no step refers to."""
        for path in self.state_dir.glob("*.lock"):
            token = path.name.removesuffix(".lock")
            if token in referenced or self._alive(token):
                continue
            for suffix in ("result", "started", "lock"):
                with contextlib.suppress(FileNotFoundError):
                    (self.state_dir / f"{token}.{suffix}").unlink()


def _job_message(job: Job, record: str = "") -> dict[str, Any]:
    spec = job.spec
    message: dict[str, Any] = {
        "step_run_id": job.step_run_id,
        "attempt": job.attempt,
        "spec": {
            "command": spec.command if isinstance(spec.command, str) else list(spec.command),
            "shell": spec.shell,
            "timeout": spec.timeout,
            "env": dict(spec.env),
            "secret_env": list(spec.secret_env),
            "expect": [dataclasses.asdict(e) for e in spec.expect],
        },
        "context": job.context,
        "output_cap": job.output_cap,
        "secret_patterns": [p if isinstance(p, str) else p.pattern for p in job.secret_patterns],
    }
    if record:
        # The inbox item of the job's end (`end_item`) but for its result, which the
        # supervisor adds: the same key as the bot's own report, so only one counts.
        item = end_item(JobEnd(job.step_run_id, job.attempt, job.incident_id, job.phase, {}))
        message["record"] = {"db": record, "item": item}
    return message


def _parse(line: str) -> dict[str, Any] | None:
    try:
        data = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return data if isinstance(data, dict) else None
