"""The step supervisor: one small process per command, so its result outlives the bot.

    python -m bot.supervise STATE_DIR TOKEN

Started by ``bot.jobs.SupervisedExecutor`` in a session of its own (a signal to the
bot's process group does not reach it), it:

  1. creates ``TOKEN.lock`` in STATE_DIR and holds an exclusive ``flock`` on it for as
     long as it lives: whoever can take that lock knows this process is gone;
  2. prints ``ready`` and waits for one job (a JSON line) on stdin; end of input means
     the bot no longer needs it, and it exits having run nothing;
  3. writes ``TOKEN.started`` (the step it runs), then runs the command with
     ``bot.executor.run``: no shell, timeout that kills the process group, output capped
     and masked, ``expect`` evaluated, exactly as before;
  4. writes ``TOKEN.result`` (atomically: a temporary file renamed), then prints the
     result as a JSON line for a bot that is still listening, and exits.

A bot restarted after a crash reads the files: a result is used as if nothing happened;
``started`` without a result (this process was killed too) is an interruption; neither
means the command never started. A job is only ever written to a supervisor that holds
its lock, so "lock free and not started" proves the command will never start.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path


def _write(path: Path, data: dict[str, object]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        json.dump(data, out)
    os.replace(temporary, path)


def main(argv: list[str]) -> int:
    state_dir, token = Path(argv[0]), argv[1]
    # Imported while warm, before `ready`: not on the way from a job to its command.
    from bot import executor

    lock = open(state_dir / f"{token}.lock", "a+b")  # noqa: SIM115 - held until exit
    fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    try:
        os.write(1, b"ready\n")  # unbuffered: nothing is left to flush at exit
    except BrokenPipeError:
        return 0  # the bot is gone before it needed us
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # not needed after all
    job = json.loads(line)
    _write(
        state_dir / f"{token}.started",
        {"step_run_id": job["step_run_id"], "attempt": job["attempt"], "pid": os.getpid()},
    )
    spec = job["spec"]
    try:
        result = executor.run(
            executor.CommandSpec(
                command=spec["command"]
                if isinstance(spec["command"], str)
                else tuple(spec["command"]),
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
        outcome = asdict(result)
    except Exception as exc:
        # TemplateError and spec errors (ValueError) speak to people; anything else is a
        # bug, told without its text (it could hold a secret).
        detail = (
            f"could not run: {exc}"
            if isinstance(exc, ValueError)
            else f"could not run: unexpected {type(exc).__name__} in the step supervisor"
        )
        outcome = {
            "status": "error",
            "exit_code": None,
            "output": "",
            "duration": 0.0,
            "argv": [],
            "matched": None,
            "detail": detail,
        }
    _write(state_dir / f"{token}.result", outcome)
    with contextlib.suppress(BrokenPipeError):  # the bot is gone: it reads the file later
        os.write(1, (json.dumps(outcome) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
