"""Pull runners for tests: `runbook-bot runner` subprocesses against a real bot.

The bot is the in-process one of tests/slack_harness.py (BotApp served by waitress on
127.0.0.1, talking to the Slack stand-in) or a `runbook-bot` subprocess; each runner is
the installed console script, started with a token created through the store (as
`runbookctl runner token create` does) and the bot's public key, each with its own state
file. Commands note their start and end (with their pid) in a marks file, so tests count
what ran, and how often.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from slack_harness import APPROVER, CHANNEL, wait_for

from bot.hub import new_token, token_digest
from bot.store import Store

POOL = "edge"

# Notes "start LABEL PID", sleeps, notes "end LABEL PID", prints OK. A shell script with
# its values as positional arguments (never part of the script): it starts in a
# millisecond, where Python would take tens, 500 times over in the fault test.
MARKING = 'echo "start $2 $$" >> "$1"; sleep "$3"; echo "end $2 $$" >> "$1"; echo OK'


def write_catalog(root: Path, *, pause: float = 0.0, timeout: str = "20s") -> Path:
    """Actions: `remote` and `remote-other` on pool `edge`, `in-cluster` in Kubernetes,
    `here` on the bot's host; runbooks `edge` (remote), `kube` (in-cluster), `mixed`
    (here, then remote) and `other` (remote-other). Returns the marks file."""
    marks = root / "marks.txt"
    (root / "actions").mkdir(parents=True, exist_ok=True)
    (root / "runbooks").mkdir(exist_ok=True)
    (root / "catalog.yaml").write_text(
        "kind: catalog\n"
        "environments: [{name: staging}, {name: prod, production: true}]\n"
        f"approvers: {{users: [{APPROVER}]}}\n"
        f"channel: '{CHANNEL}'\n"
        "escalation: {pagerduty: false}\n"
        f"defaults: {{timeout: {timeout}, approval_timeout: 30s}}\n"
        f"runner_pools: [{{name: {POOL}}}]\n"
        "kubernetes: {service_accounts: [{namespace: jobs, name: reader}]}\n"
    )

    def action(name: str, executor: Any) -> dict[str, Any]:
        return {
            "id": name,
            "description": f"{name} (runner tests)",
            "command": [
                "/bin/sh",
                "-c",
                MARKING,
                "sh",
                str(marks),
                "{{ incident.id }}:" + name,
                str(pause),
            ],
            "expect": [{"pattern": "OK"}],
            "executor": executor,
            "safety": {"requires_approval": False, "scopes": ["staging"]},
        }

    actions = {
        "remote": action("remote", {"runner": POOL}),
        "remote-other": action("remote-other", {"runner": POOL}),
        "in-cluster": action(
            "in-cluster",
            {
                "kubernetes": {
                    "namespace": "jobs",
                    "image": "python:3.12",
                    "service_account": "reader",
                }
            },
        ),
        "here": action("here", "local"),
    }
    for name, body in actions.items():
        (root / "actions" / f"{name}.yaml").write_text(json.dumps(body))
    for runbook, steps in (
        ("edge", ["remote"]),
        ("kube", ["in-cluster"]),
        ("mixed", ["here", "remote"]),
        ("other", ["remote-other"]),
    ):
        (root / "runbooks" / f"{runbook}.yaml").write_text(
            json.dumps(
                {
                    "kind": "runbook",
                    "id": runbook,
                    "match": {"services": [runbook]},
                    "channel": CHANNEL,
                    "steps": [{"action": step} for step in steps],
                }
            )
        )
    return marks


def create_token(db: Path, pool: str = POOL, name: str = "r1") -> str:
    """A runner token, created as `runbookctl runner token create` creates one."""
    store = Store(db)
    try:
        token = new_token()
        store.runner_token_create(pool, name, token_digest(token))
        return token
    finally:
        store.close()


class Runner:
    """`runbook-bot runner` as a subprocess; its log is collected."""

    def __init__(
        self,
        url: str,
        token: str,
        public_key: Path,
        state: Path,
        *,
        pool: str = POOL,
        allow: tuple[str, ...] = ("remote",),
        parallel: int = 1,
        heartbeat: float = 0.2,
        poll_wait: float = 2.0,
    ) -> None:
        executable = Path(sys.executable).parent / "runbook-bot"
        args = [str(executable), "runner", "--url", url, "--pool", pool]
        for name in allow:
            args += ["--allow", name]
        args += [
            "--public-key",
            str(public_key),
            "--state",
            str(state),
            "--parallel",
            str(parallel),
            "--heartbeat",
            str(heartbeat),
            "--poll-wait",
            str(poll_wait),
        ]
        env = {
            "PATH": os.environ.get("PATH", ""),
            "RUNBOOK_RUNNER_TOKEN": token,
            "RUNBOOK_LOG_LEVEL": "INFO",
        }
        self.proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def kill(self) -> None:
        """kill -9: no goodbye, no report."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(30)
        self._close()
        return code

    def exited(self) -> int | None:
        return self.proc.poll()


def marks(path: Path) -> Counter[str]:
    """How often each command (incident:action) started."""
    if not path.exists():
        return Counter()
    return Counter(
        line.split()[1] for line in path.read_text().splitlines() if line.startswith("start ")
    )


def finished(path: Path) -> Counter[str]:
    if not path.exists():
        return Counter()
    return Counter(
        line.split()[1] for line in path.read_text().splitlines() if line.startswith("end ")
    )


__all__ = ["POOL", "Runner", "create_token", "finished", "marks", "wait_for", "write_catalog"]
