"""kill -9 of the real `runbook-bot` process at random moments, and the count of what broke.

A *world* is one bot process (the installed `runbook-bot` console script) on one SQLite
file, the Slack and PagerDuty stand-ins of tests/fakes on 127.0.0.1, and a workload
driven as PagerDuty and Slack would drive it:

  * PagerDuty delivers one `incident.triggered` per incident, signed, and retries every
    delivery until it gets a 202 (as PagerDuty does while the bot is down);
  * a responder reacts ✅ on each guarded step as soon as its message is in Slack, and
    Slack retries the event (same event id) until the bot answers 200.

Each runbook: an automatic step, a guarded step, an automatic step, every one a real
command that notes its start and, 150 ms later, its end in a marks file (the commands
run under the bot's step supervisors, so they outlive the bot). While the workload runs,
the bot is killed with SIGKILL at random moments and started again on the same file.
The stand-ins answer after a small latency, so kills land mid-post as well as mid-step,
around the 202s and between an approval and its step's start.

At the end every run must have completed, and the counts must be zero:
  steps_run_twice        a step whose command started more than once
  deliveries_lost        an acknowledged delivery whose incident is missing or unfinished
  approvals_lost         an acknowledged ✅ whose step never ran
  duplicate_roots        incidents with more than one thread root in Slack
  steps_posted_twice     outbox rows posted as more than one Slack message (by metadata)
  results_lost           commands that finished but whose step is not recorded as such
  notes_lost/duplicated  PagerDuty write-back notes missing or written twice
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fakes import FakePagerDuty, FakeSlack
from slack_sdk.signature import SignatureVerifier

TOKEN = "xoxb-fault-token"
SIGNING_SECRET = "fault-signing-secret"
PD_SECRET = "fault-webhook-secret"
APPROVER = "UAPPROVER"
STEP_SECONDS = 0.15


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CountingSlack(FakeSlack):
    """The Slack stand-in, also counting requests it is answering right now."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.in_flight = 0
        self._flight = threading.Lock()

    def _dispatch(self, method: str, target: str, headers: dict[str, str], raw: bytes) -> Any:
        with self._flight:
            self.in_flight += 1
        try:
            return super()._dispatch(method, target, headers, raw)
        finally:
            with self._flight:
                self.in_flight -= 1


def write_catalog(root: Path, marks: Path, incidents: list[str]) -> None:
    """One runbook per service (its own channel): check, guard (needs ✅), verify."""
    (root / "actions").mkdir(parents=True)
    (root / "runbooks").mkdir()
    (root / "catalog.yaml").write_text(
        "kind: catalog\nenvironments: [{name: staging}, {name: prod, production: true}]\n"
        f"approvers: {{users: [{APPROVER}]}}\nchannel: CFAULT\n"
        "escalation: {pagerduty: false}\ndefaults: {timeout: 60s, approval_timeout: 3600s}\n"
    )
    program = (
        "import os, sys, time\n"
        "marks, label = sys.argv[1], sys.argv[2]\n"
        "open(marks, 'a').write(f'start {label} {os.getpid()}\\n')\n"
        f"time.sleep({STEP_SECONDS})\n"
        "open(marks, 'a').write(f'end {label} {os.getpid()}\\n')\n"
        "print('OK')\n"
    )
    for name, guarded in (("check", False), ("guard", True), ("verify", False)):
        (root / "actions" / f"{name}.yaml").write_text(
            json.dumps(
                {
                    "id": name,
                    "description": f"{name} (fault trial)",
                    "command": [
                        sys.executable,
                        "-c",
                        program,
                        str(marks),
                        "{{ incident.id }}:" + name,
                    ],
                    "expect": [{"pattern": "OK"}],
                    "safety": {"requires_approval": guarded, "scopes": ["staging"]},
                }
            )
        )
    for n in range(len(incidents)):
        (root / "runbooks" / f"svc{n}.yaml").write_text(
            json.dumps(
                {
                    "kind": "runbook",
                    "id": f"svc{n}",
                    "match": {"services": [f"svc{n}"]},
                    "channel": channel_of(n),
                    "resolve_on_success": True,
                    "steps": [{"action": "check"}, {"action": "guard"}, {"action": "verify"}],
                }
            )
        )


def channel_of(n: int) -> str:
    return f"CF{n:04d}"


def v3_trigger(incident_id: str, service: str, event_id: str) -> bytes:
    return json.dumps(
        {
            "event": {
                "id": event_id,
                "event_type": "incident.triggered",
                "resource_type": "incident",
                "occurred_at": "2026-12-01T10:00:00.000Z",
                "agent": None,
                "client": None,
                "data": {
                    "id": incident_id,
                    "type": "incident",
                    "self": f"https://api.pagerduty.com/incidents/{incident_id}",
                    "html_url": f"https://example.pagerduty.com/incidents/{incident_id}",
                    "number": 1,
                    "status": "triggered",
                    "incident_key": incident_id,
                    "created_at": "2026-12-01T10:00:00Z",
                    "title": f"{service} is failing",
                    "service": {
                        "html_url": "https://example.pagerduty.com/services/PSVC",
                        "id": f"P{service.upper()}",
                        "self": "https://api.pagerduty.com/services/PSVC",
                        "summary": service,
                        "type": "service_reference",
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


@dataclass
class Counts:
    worlds: int = 0
    kills: int = 0
    moments: Counter[str] = field(default_factory=Counter)
    steps_run_twice: int = 0
    deliveries_lost: int = 0
    approvals_lost: int = 0
    duplicate_roots: int = 0
    steps_posted_twice: int = 0
    results_lost: int = 0
    notes_lost: int = 0
    notes_duplicated: int = 0
    interrupted: int = 0  # steps honestly reported as interrupted (must stay 0 here)
    steps_run: int = 0  # commands started
    deliveries_acked: int = 0
    approvals_acked: int = 0
    unfinished: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in (
            "worlds",
            "kills",
            "steps_run_twice",
            "deliveries_lost",
            "approvals_lost",
            "duplicate_roots",
            "steps_posted_twice",
            "results_lost",
            "notes_lost",
            "notes_duplicated",
            "interrupted",
            "steps_run",
            "deliveries_acked",
            "approvals_acked",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.moments.update(other.moments)
        self.unfinished.extend(other.unfinished)

    @property
    def broken(self) -> int:
        return (
            self.steps_run_twice
            + self.deliveries_lost
            + self.approvals_lost
            + self.duplicate_roots
            + self.steps_posted_twice
            + self.results_lost
            + self.notes_lost
            + self.notes_duplicated
            + len(self.unfinished)
        )

    def summary(self) -> str:
        return (
            f"{self.kills} kills in {self.worlds} worlds: steps run twice {self.steps_run_twice}, "
            f"deliveries lost {self.deliveries_lost}, approvals lost {self.approvals_lost}, "
            f"duplicate roots {self.duplicate_roots}, steps posted twice "
            f"{self.steps_posted_twice}, results lost {self.results_lost}, PagerDuty notes lost "
            f"{self.notes_lost} / duplicated {self.notes_duplicated}, interrupted "
            f"{self.interrupted}, unfinished {len(self.unfinished)}; kills landed: "
            + ", ".join(f"{k} {v}" for k, v in sorted(self.moments.items()))
        )


C = TypeVar("C", bound=Counts)


class Workload:
    """The workload and its stand-ins, for bots a subclass runs: PagerDuty's deliveries
    and a responder's ✅ go to `target()`, and `verify` counts what broke."""

    def __init__(self, root: Path, incidents: int, rng: random.Random, prefix: str) -> None:
        self.root = root
        self.rng = rng
        self.ids = [f"{prefix}{uuid.uuid4().hex[:6].upper()}{n}" for n in range(incidents)]
        self.marks = root / "marks.txt"
        self.catalog = root / "catalog"
        write_catalog(self.catalog, self.marks, self.ids)
        self.slack = CountingSlack(latency=0.02)
        self.pd = FakePagerDuty(latency=0.02)  # HTTPS, as the client requires
        for incident_id in self.ids:
            self.pd.add_incident(incident_id)
        self.acked: set[str] = set()
        self.approved: set[str] = set()
        self.stop = threading.Event()
        self.http = httpx.Client(timeout=2.0)
        self.webhooks_in_flight = 0
        self._posting = threading.Lock()

    def target(self) -> str:
        """The base URL the next request goes to."""
        raise NotImplementedError

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Read the bots' database (SQL with ``?`` placeholders)."""
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        """A bot's environment, but for its database and port."""
        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLACK_", "PAGERDUTY_", "RUNBOOK_"))
        }
        return {
            **keep,
            "RUNBOOK_CATALOG": str(self.catalog),
            "RUNBOOK_ENV": "staging",
            "RUNBOOK_WORKERS": "4",
            "RUNBOOK_LOG_LEVEL": "WARNING",
            "RUNBOOK_SLACK_PACING": "off",
            "HOST": "127.0.0.1",
            "SLACK_BOT_TOKEN": TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.slack.api_url,
            "PAGERDUTY_WEBHOOK_SECRET": PD_SECRET,
            "PAGERDUTY_API_TOKEN": "fault-pd-token",
            "PAGERDUTY_FROM": "bot@example.com",
            "PAGERDUTY_API_URL": self.pd.url,
            "SSL_CERT_FILE": str(self.pd.ca_file),
        }

    def close(self) -> None:
        self.stop.set()
        self.http.close()
        self.slack.stop()
        self.pd.stop()
        # commands are supervised in their own sessions: none may outlive the workload
        for line in self.marks.read_text().splitlines() if self.marks.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(line.split()[2]), signal.SIGKILL)

    # --- PagerDuty and Slack, retrying as they do ------------------------------------------

    def deliver_all(self, every: float = 0.4) -> None:
        """Each incident's trigger in its own thread, one `every` seconds."""
        threads = [
            threading.Thread(target=self.deliver, args=(n, every * n), daemon=True)
            for n in range(len(self.ids))
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    def deliver(self, n: int, after: float) -> None:
        if self.stop.wait(after):
            return
        incident_id = self.ids[n]
        body = v3_trigger(incident_id, f"svc{n}", f"EV-{incident_id}")
        signature = hmac.new(PD_SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "Content-Type": "application/json",
            "X-PagerDuty-Signature": f"v1={signature}",
            "X-Webhook-Id": f"WH-{incident_id}",
        }
        while not self.stop.is_set():
            with self._posting:
                self.webhooks_in_flight += 1
            try:
                answer = self.http.post(
                    self.target() + "/pagerduty/webhook", content=body, headers=headers
                )
                if answer.status_code == 202:
                    self.acked.add(incident_id)
                    return
            except httpx.TransportError:
                pass
            finally:
                with self._posting:
                    self.webhooks_in_flight -= 1
            time.sleep(0.02)

    def approve_all(self) -> None:
        while not self.stop.is_set() and len(self.approved) < len(self.ids):
            for n, incident_id in enumerate(self.ids):
                if incident_id in self.approved:
                    continue
                message = self.guard_message(n)
                if message is None:
                    continue
                event = reaction_event(APPROVER, channel_of(n), message["ts"], f"Ev-{incident_id}")
                body = json.dumps(event)
                ts = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    "X-Slack-Request-Timestamp": ts,
                    "X-Slack-Signature": str(
                        SignatureVerifier(SIGNING_SECRET).generate_signature(
                            timestamp=ts, body=body
                        )
                    ),
                }
                try:
                    if (
                        self.http.post(
                            self.target() + "/slack/events", content=body, headers=headers
                        ).status_code
                        == 200
                    ):
                        self.approved.add(incident_id)
                except httpx.TransportError:
                    pass
            time.sleep(0.02)

    def guard_message(self, n: int) -> dict[str, Any] | None:
        for message in self.slack.messages(channel_of(n)):
            if "Step 2/3: guard" in str(message.get("text", "")):
                return message
        return None

    # --- reading the outcome -----------------------------------------------------------------

    def finished(self) -> bool:
        done = self.query("SELECT count(*) FROM runs WHERE phase = 'main' AND status = 'completed'")
        pending = self.query("SELECT count(*) FROM outbox WHERE status = 'pending'")
        return bool(done and done[0][0] == len(self.ids) and pending and pending[0][0] == 0)

    def verify(self, counts: C) -> C:
        """`counts` with what broke (and what was done) filled in."""
        marks = self.marks.read_text().splitlines() if self.marks.exists() else []
        starts = Counter(line.split()[1] for line in marks if line.startswith("start"))
        ends = Counter(line.split()[1] for line in marks if line.startswith("end"))
        counts.steps_run = sum(starts.values())
        counts.steps_run_twice = sum(c - 1 for c in starts.values() if c > 1)
        counts.deliveries_acked = len(self.acked)
        counts.approvals_acked = len(self.approved)
        statuses = {
            f"{incident}:{step}": status
            for incident, step, status in self.query(
                "SELECT incident_id, step_id, status FROM step_runs"
            )
        }
        counts.interrupted = sum(1 for s in statuses.values() if s == "interrupted")
        counts.results_lost = sum(1 for label in ends if statuses.get(label) != "success")
        for n, incident_id in enumerate(self.ids):
            runs = self.query(
                "SELECT status FROM runs WHERE incident_id = ? AND phase = 'main'", (incident_id,)
            )
            if incident_id in self.acked and not runs:
                counts.deliveries_lost += 1
            if not runs or runs[0][0] != "completed":
                counts.unfinished.append(f"{incident_id}: {runs[0][0] if runs else 'no run'}")
            if incident_id in self.approved and starts[f"{incident_id}:guard"] == 0:
                counts.approvals_lost += 1
            messages = self.slack.messages(channel_of(n))
            roots = [m for m in messages if m.get("thread_ts") in (None, m["ts"])]
            counts.duplicate_roots += max(0, len(roots) - 1)
            posted = Counter(
                (m.get("metadata") or {}).get("event_payload", {}).get("outbox_id")
                for m in messages
            )
            counts.steps_posted_twice += sum(c - 1 for key, c in posted.items() if key and c > 1)
            notes = [
                x for x in self.pd.notes(incident_id) if "runbook-bot: runbook" in x["content"]
            ]
            counts.notes_lost += 1 if not notes else 0
            counts.notes_duplicated += max(0, len(notes) - 1)
        return counts


class World(Workload):
    """One bot process on one SQLite file, killed and started again."""

    def __init__(self, root: Path, incidents: int, rng: random.Random) -> None:
        super().__init__(root, incidents, rng, "F")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = root / "bot.db"
        self.log = root / "bot.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_start = 0

    def target(self) -> str:
        return self.url

    def env(self) -> dict[str, str]:
        return {**super().env(), "RUNBOOK_DB": str(self.db), "PORT": str(self.port)}

    def start(self) -> None:
        exe = shutil.which("runbook-bot", path=os.path.dirname(sys.executable)) or "runbook-bot"
        self._log_start = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([exe], env=self.env(), stdout=log, stderr=log)

    def _lost_its_port(self) -> bool:
        """The bot, restarted, found its port taken: while it was down the kernel gave
        the number to a socket of another world running beside this one."""
        with self.log.open("rb") as log:
            log.seek(self._log_start)
            return b"Address already in use" in log.read()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None and self._lost_its_port():
                self.port = free_port()  # the senders read `url` at each try
                self.url = f"http://127.0.0.1:{self.port}"
                self.start()
                continue
            assert self.proc.poll() is None, self.log.read_text()
            with contextlib.suppress(httpx.TransportError):
                if self.http.get(self.url + "/healthz").status_code == 200:
                    return
            time.sleep(0.01)
        raise AssertionError("the bot did not answer /healthz")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def close(self) -> None:
        self.stop.set()
        self.terminate()
        super().close()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.db.exists():
            return []
        with contextlib.closing(
            sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        ) as conn:
            try:
                return conn.execute(sql, params).fetchall()
            except sqlite3.OperationalError:
                return []

    def moment(self) -> str:
        """Where the workload was when the kill landed (roughly; several can hold)."""
        marks = self.marks.read_text().splitlines() if self.marks.exists() else []
        started = {line.split()[1] for line in marks if line.startswith("start")}
        ended = {line.split()[1] for line in marks if line.startswith("end")}
        if self.webhooks_in_flight:
            return "around a 202"
        if self.slack.in_flight:
            return "mid-post"
        if started - ended:
            return "mid-step"
        if any(f"{i}:guard" not in started for i in self.approved):
            return "between approval and start"
        return "between steps"


def reaction_event(user: str, channel: str, ts: str, event_id: str) -> dict[str, Any]:
    return {
        "token": "legacy",
        "team_id": "TFAKE",
        "api_app_id": "AFAULT",
        "type": "event_callback",
        "event_id": event_id,
        "event_time": int(time.time()),
        "event": {
            "type": "reaction_added",
            "user": user,
            "reaction": "white_check_mark",
            "item_user": "UBOT",
            "item": {"type": "message", "channel": channel, "ts": ts},
            "event_ts": f"{time.time():.6f}",
        },
    }


def run_world(
    root: Path,
    *,
    incidents: int = 4,
    kills: int = 3,
    seed: int = 0,
    window: float = 1.5,
    timeout: float = 120.0,
) -> Counts:
    """One world: start, drive, kill -9 `kills` times at random moments, finish, count."""
    rng = random.Random(seed)
    world = World(root, incidents, rng)
    counts = Counts()
    try:
        world.start()
        drivers = [
            threading.Thread(target=world.deliver_all, daemon=True),
            threading.Thread(target=world.approve_all, daemon=True),
        ]
        for driver in drivers:
            driver.start()
        for _ in range(kills):
            # A random moment of a running bot: the workload is spread over ~2 s after
            # each start, so kills land in every phase of it.
            world.wait_healthy()
            time.sleep(rng.uniform(0.0, window))
            counts.moments[world.moment()] += 1
            world.kill()
            counts.kills += 1
            world.start()
        deadline = time.monotonic() + timeout
        while not world.finished() and time.monotonic() < deadline:
            time.sleep(0.05)
        world.stop.set()
        for driver in drivers:
            driver.join(10)
        world.terminate()
        result = world.verify(Counts(worlds=1))
        result.kills, result.moments = counts.kills, counts.moments
        if result.broken and world.log.exists():
            tail = world.log.read_text(errors="replace").splitlines()[-15:]
            result.unfinished.append("bot log: " + " | ".join(tail))
            keep = os.environ.get("RUNBOOK_FAULT_KEEP")
            if keep:  # for a post-mortem: the database, the log, the marks
                shutil.copytree(root, Path(keep) / root.name, dirs_exist_ok=True)
        return result
    finally:
        world.close()


def run_worlds(
    base: Path, worlds: int, *, parallel: int = 3, seed: int = 0, **options: Any
) -> Counts:
    total = Counts()
    lock = threading.Lock()
    queue = list(range(worlds))
    FakePagerDuty(tls=True).stop()  # the stand-ins' one TLS certificate, made before threads

    def work() -> None:
        while True:
            with lock:
                if not queue:
                    return
                n = queue.pop(0)
            counts = run_world(base / f"world{n}", seed=seed * 1000 + n, **options)
            with lock:
                total.add(counts)

    threads = [threading.Thread(target=work) for _ in range(parallel)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return total


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kills", type=int, default=102, help="kill -9 in all (default 102)")
    parser.add_argument("--per-world", type=int, default=3, help="kills per world (default 3)")
    parser.add_argument("--parallel", type=int, default=3)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    worlds = -(-args.kills // args.per_world)
    with tempfile.TemporaryDirectory(prefix="runbook-fault-") as tmp:
        counts = run_worlds(
            Path(tmp), worlds, parallel=args.parallel, seed=args.seed, kills=args.per_world
        )
    print(f"seed {args.seed}: {counts.summary()}")
    for line in counts.unfinished:
        print("  ", line)
    return 1 if counts.broken else 0


Check = Callable[[], bool]

if __name__ == "__main__":
    sys.exit(main())
