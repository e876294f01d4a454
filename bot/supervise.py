"""Step supervisors: one small process per command, so its result outlives the bot.

    python -I -c <bot.jobs._SUPERVISOR> ROOT STATE_DIR ADDRESS

starts the **fork server** of ``bot.jobs.SupervisedExecutor``: a process in a session of
its own (a signal to the bot's process group does not reach it) that imports the executor
once, then forks one supervisor per token the bot writes to its stdin. Forking a warm
process costs a millisecond or two, where starting Python costs tens. At the end of its
input (the bot stopped or died) it exits; the supervisors it forked go on.

Each supervisor:

  1. starts a session of its own, and takes an exclusive ``flock`` on ``TOKEN.lock`` in
     STATE_DIR, held for as long as it lives: whoever can take that lock knows this
     process is gone;
  2. connects to the bot's socket (ADDRESS) and says ``ready TOKEN``, then waits for one
     job (a JSON line); the end of the connection means the bot no longer needs it, and
     it exits having run nothing;
  3. writes ``TOKEN.started`` (the step it runs), then runs the command with
     ``bot.executor.run``: no shell, timeout that kills the process group, output capped
     and masked, ``expect`` evaluated, exactly as in the bot;
  4. writes ``TOKEN.result`` (atomically: a temporary file renamed), sends the result as
     a JSON line to a bot that is still listening;
  5. with replicas on PostgreSQL, waits for the bot to say it stored the result; without
     that word (the bot died, or took over 30 s) it puts the result in the shared inbox
     itself, under the key of the bot's own report (one counts), so a result outlives a
     replica that never comes back; then exits.

A bot restarted after a crash reads the files: a result is used as if nothing happened;
``started`` without a result (this process was killed too) is an interruption; neither
means the command never started. A job is only ever sent to a supervisor that holds its
lock, so "lock free and not started" proves the command will never start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


def _write(path: Path, data: dict[str, object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(temporary, path)


def socket_address(address: str) -> str:
    """`@name` is Linux's abstract socket namespace (no file to clean up)."""
    return "\0" + address[1:] if address.startswith("@") else address


def main(argv: list[str]) -> int:
    """The fork server: one supervisor forked per token read from stdin."""
    state_dir, address = Path(argv[0]), argv[1]
    # Imported once, here: every supervisor starts with it loaded.
    from bot import executor  # noqa: F401

    signal.signal(signal.SIGCHLD, _reap)
    try:
        os.write(1, b"ready\n")  # unbuffered: nothing is left to flush at exit
    except BrokenPipeError:
        return 0
    while line := sys.stdin.buffer.readline():
        token = line.strip().decode("ascii", "replace")
        if not token:
            continue
        if os.fork() == 0:
            code = 1
            try:
                code = _supervise(state_dir, address, token)
            finally:
                os._exit(code)
    return 0  # the bot is gone: the supervisors go on without us


def _reap(signum: int, frame: Any) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _supervise(state_dir: Path, address: str, token: str) -> int:
    # Our command's exit status is Popen's to collect, not a fork server's handler's.
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setsid()
    quiet = os.open(os.devnull, os.O_RDWR)
    os.dup2(quiet, 0)  # the fork server's pipes are the bot's business, not ours
    os.dup2(quiet, 1)
    lock = open(state_dir / f"{token}.lock", "a+b")  # noqa: SIM115 - held until exit
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        bot = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bot.connect(socket_address(address))
        bot.sendall(f"ready {token}\n".encode())
        reader = bot.makefile("rb")
        line = reader.readline()
    except OSError:
        return 0  # the bot is gone before it needed us
    if not line.strip():
        return 0  # not needed after all
    job = json.loads(line)
    _write(
        state_dir / f"{token}.started",
        {"step_run_id": job["step_run_id"], "attempt": job["attempt"], "pid": os.getpid()},
    )
    outcome = _run(job)
    _write(state_dir / f"{token}.result", outcome)
    stored = False
    with contextlib.suppress(OSError):  # the bot is gone: it reads the file later
        bot.sendall((json.dumps(outcome) + "\n").encode())
        if job.get("record"):
            bot.settimeout(RECORD_ACK_SECONDS)
            stored = reader.readline().strip() == b"stored"
    if job.get("record") and not stored:
        _record(job["record"], outcome)
    return 0


RECORD_ACK_SECONDS = 30.0  # how long the bot may take to say it stored the result
RECORD_TRIES = 8


def _record(record: dict[str, Any], outcome: dict[str, Any]) -> None:
    """Put the job's end in the shared inbox (replicas on PostgreSQL): under the key the
    bot's own report has, so whichever comes first counts and the other changes nothing.
    Retried while the database is away (about two minutes); the result file stays."""
    import psycopg

    from bot.store import intake

    item = record["item"]
    values = intake.row(
        source=item["source"],
        key=item["key"],
        incident_id=item["incident_id"],
        kind=item["kind"],
        payload={**item["payload"], **outcome},
        received_at=time.time(),
    )
    columns = intake.COLUMNS
    sql = (
        f"INSERT INTO inbox ({', '.join(columns)}) "
        f"VALUES ({', '.join('%s' for _ in columns)}) ON CONFLICT DO NOTHING"
    )
    for attempt in range(RECORD_TRIES):
        if attempt:
            time.sleep(min(30.0, 2.0**attempt))
        try:
            with psycopg.connect(record["db"], autocommit=True, connect_timeout=5) as conn:
                conn.execute(sql, [values[c] for c in columns])
            return
        except psycopg.Error:
            continue


def _run(job: dict[str, Any]) -> dict[str, Any]:
    from bot import executor

    spec = job["spec"]
    command = spec["command"]
    try:
        result = executor.run(
            executor.CommandSpec(
                command=command if isinstance(command, str) else tuple(command),
                shell=spec["shell"],
                timeout=spec["timeout"],
                env=spec["env"],
                secret_env=tuple(spec["secret_env"]),
                expect=tuple(executor.Expectation(**e) for e in spec["expect"]),
            ),
            job["context"],
            output_cap=job["output_cap"],
            secret_patterns=tuple(job["secret_patterns"]),
        )
        return asdict(result)
    except Exception as exc:
        # TemplateError and spec errors (ValueError) speak to people; anything else is a
        # bug, told without its text (it could hold a secret).
        detail = (
            f"could not run: {exc}"
            if isinstance(exc, ValueError)
            else f"could not run: unexpected {type(exc).__name__} in the step supervisor"
        )
        return executor.not_run(detail)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
