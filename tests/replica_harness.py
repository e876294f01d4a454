"""Chaos with replicas: kill -9 of random `runbook-bot` replicas sharing one PostgreSQL.

A *fleet* is N replica processes (the installed `runbook-bot` console script, each with
its own port, RUNBOOK_REPLICA_ID and state directory) on one PostgreSQL database, the
Slack and PagerDuty stand-ins of tests/fakes on 127.0.0.1, and the workload of
tests/fault_harness.py, spread over the whole run and sent to random replicas:

  * PagerDuty delivers one `incident.triggered` per incident, signed, to a random
    replica, and retries (to another random replica) until it gets a 202;
  * a responder reacts ✅ on each guarded step as soon as its message is in Slack, sent to
    a random replica, retried with the same event id until one answers 200.

Each runbook: an automatic step, a guarded step, an automatic step; every command notes
its start and, 150 ms later, its end in a marks file. While the workload runs, a random
replica is killed with SIGKILL every `interval` seconds (a random moment within it) and
started again at once under the same name and state directory.

Counted at the end (all must be 0, every run completed): steps run twice, acknowledged
deliveries lost, acknowledged approvals lost, duplicate thread roots, step messages
posted twice, finished commands whose result was not recorded, PagerDuty notes lost or
duplicated. Measured: for each kill of a replica that held a singleton's lease (outbox,
timers), the time until another process held it (`takeovers`).
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
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fakes import FakePagerDuty
from fault_harness import (
    APPROVER,
    PD_SECRET,
    SIGNING_SECRET,
    TOKEN,
    CountingSlack,
    channel_of,
    free_port,
    reaction_event,
    v3_trigger,
    write_catalog,
)
from slack_sdk.signature import SignatureVerifier


@dataclass
class ChaosCounts:
    replicas: int = 0
    incidents: int = 0
    kills: int = 0
    steps_run: int = 0
    steps_run_twice: int = 0
    deliveries_acked: int = 0
    deliveries_lost: int = 0
    approvals_acked: int = 0
    approvals_lost: int = 0
    duplicate_roots: int = 0
    steps_posted_twice: int = 0
    results_lost: int = 0
    notes_lost: int = 0
    notes_duplicated: int = 0
    interrupted: int = 0
    takeovers: list[float] = field(default_factory=list)
    unfinished: list[str] = field(default_factory=list)

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
        takeovers = sorted(self.takeovers)
        spread = (
            f"{len(takeovers)} lease takeovers, median {takeovers[len(takeovers) // 2]:.1f} s, "
            f"max {takeovers[-1]:.1f} s"
            if takeovers
            else "no lease takeovers"
        )
        return (
            f"{self.kills} kills of {self.replicas} replicas, {self.incidents} incidents "
            f"({self.steps_run} commands run): steps run twice {self.steps_run_twice}, "
            f"deliveries lost {self.deliveries_lost} of {self.deliveries_acked} acknowledged, "
            f"approvals lost {self.approvals_lost} of {self.approvals_acked}, duplicate roots "
            f"{self.duplicate_roots}, steps posted twice {self.steps_posted_twice}, results "
            f"lost {self.results_lost}, PagerDuty notes lost {self.notes_lost} / duplicated "
            f"{self.notes_duplicated}, interrupted {self.interrupted}, unfinished "
            f"{len(self.unfinished)}; {spread}"
        )


class Replica:
    """One `runbook-bot` process of the fleet, started again under the same name."""

    def __init__(self, fleet: Fleet, n: int) -> None:
        self.fleet = fleet
        self.name = f"r{n}"
        self.port = free_port()
        self.log = fleet.root / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        exe = shutil.which("runbook-bot", path=os.path.dirname(sys.executable)) or "runbook-bot"
        env = {**self.fleet.env(), "PORT": str(self.port), "RUNBOOK_REPLICA_ID": self.name}
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([exe], env=env, stdout=log, stderr=log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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


class Fleet:
    def __init__(self, root: Path, db: str, *, replicas: int, incidents: int, seed: int) -> None:
        self.root = root
        self.db = db
        self.rng = random.Random(seed)
        self.ids = [f"C{uuid.uuid4().hex[:6].upper()}{n}" for n in range(incidents)]
        self.marks = root / "marks.txt"
        self.catalog = root / "catalog"
        write_catalog(self.catalog, self.marks, self.ids)
        self.slack = CountingSlack(latency=0.02)
        self.pd = FakePagerDuty(latency=0.02)
        for incident_id in self.ids:
            self.pd.add_incident(incident_id)
        self.replicas = [Replica(self, n) for n in range(replicas)]
        self.acked: set[str] = set()
        self.approved: set[str] = set()
        self.stop = threading.Event()
        self.http = httpx.Client(timeout=2.0)
        self.takeovers: list[float] = []
        self._watchers: list[threading.Thread] = []

    def env(self) -> dict[str, str]:
        keep = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLACK_", "PAGERDUTY_", "RUNBOOK_"))
        }
        return {
            **keep,
            "RUNBOOK_CATALOG": str(self.catalog),
            "RUNBOOK_DB": self.db,
            "RUNBOOK_STATE_DIR": str(self.root / "state"),
            "RUNBOOK_ENV": "staging",
            "RUNBOOK_WORKERS": "4",
            "RUNBOOK_LOG_LEVEL": "WARNING",
            "RUNBOOK_SLACK_PACING": "off",
            "HOST": "127.0.0.1",
            "SLACK_BOT_TOKEN": TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "SLACK_API_URL": self.slack.api_url,
            "PAGERDUTY_WEBHOOK_SECRET": PD_SECRET,
            "PAGERDUTY_API_TOKEN": "chaos-pd-token",
            "PAGERDUTY_FROM": "bot@example.com",
            "PAGERDUTY_API_URL": self.pd.url,
            "SSL_CERT_FILE": str(self.pd.ca_file),
        }

    # --- the replicas ----------------------------------------------------------------------

    def start(self) -> None:
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            self.wait_healthy(replica)

    def wait_healthy(self, replica: Replica, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not replica.alive():
                if b"Address already in use" in replica.log.read_bytes():
                    replica.port = free_port()  # the kernel gave its number away meanwhile
                    replica.start()
                    continue
                raise AssertionError(replica.log.read_text(errors="replace")[-3000:])
            with contextlib.suppress(httpx.TransportError):
                if self.http.get(replica.url + "/healthz").status_code == 200:
                    return
            time.sleep(0.02)
        raise AssertionError(f"replica {replica.name} did not answer /healthz")

    def kill_and_restart(self, replica: Replica) -> None:
        held = self.leases_of(replica.name)
        replica.kill()
        killed_at = time.monotonic()
        for name, holder in held.items():
            watcher = threading.Thread(
                target=self._watch_takeover, args=(name, holder, killed_at), daemon=True
            )
            watcher.start()
            self._watchers.append(watcher)
        replica.start()

    def leases_of(self, replica: str) -> dict[str, str]:
        return {
            name: holder
            for name, holder in self.query("SELECT name, holder FROM leases")
            if str(holder).startswith(replica + "#")
        }

    def _watch_takeover(self, lease: str, holder: str, since: float) -> None:
        """Time until a live process holds `lease` in place of the killed `holder`."""
        deadline = since + 60.0
        while time.monotonic() < deadline:
            rows = self.query(
                "SELECT holder FROM leases WHERE name = %s AND "
                "expires_at > EXTRACT(EPOCH FROM clock_timestamp())",
                (lease,),
            )
            if rows and rows[0][0] != holder:
                self.takeovers.append(time.monotonic() - since)
                return
            time.sleep(0.05)
        self.takeovers.append(float("inf"))

    def close(self) -> None:
        self.stop.set()
        for replica in self.replicas:
            replica.terminate()
        self.http.close()
        self.slack.stop()
        self.pd.stop()
        for line in self.marks.read_text().splitlines() if self.marks.exists() else []:
            with contextlib.suppress(ProcessLookupError, ValueError, PermissionError):
                os.killpg(int(line.split()[2]), signal.SIGKILL)

    # --- PagerDuty and Slack, at random replicas -----------------------------------------

    def _random_url(self) -> str:
        return self.rng.choice(self.replicas).url

    def deliver_all(self, spread: float) -> None:
        step = spread / max(1, len(self.ids))
        threads = [
            threading.Thread(target=self.deliver, args=(n, step * n), daemon=True)
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
            with contextlib.suppress(httpx.TransportError):
                answer = self.http.post(
                    self._random_url() + "/pagerduty/webhook", content=body, headers=headers
                )
                if answer.status_code == 202:
                    self.acked.add(incident_id)
                    return
            time.sleep(0.02)

    def approve_all(self) -> None:
        verifier = SignatureVerifier(SIGNING_SECRET)
        while not self.stop.is_set() and len(self.approved) < len(self.ids):
            for n, incident_id in enumerate(self.ids):
                if incident_id in self.approved:
                    continue
                message = next(
                    (
                        m
                        for m in self.slack.messages(channel_of(n))
                        if "Step 2/3: guard" in str(m.get("text", ""))
                    ),
                    None,
                )
                if message is None:
                    continue
                body = json.dumps(
                    reaction_event(APPROVER, channel_of(n), message["ts"], f"Ev-{incident_id}")
                )
                ts = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    "X-Slack-Request-Timestamp": ts,
                    "X-Slack-Signature": verifier.generate_signature(timestamp=ts, body=body),
                }
                with contextlib.suppress(httpx.TransportError):
                    url = self._random_url() + "/slack/events"
                    if self.http.post(url, content=body, headers=headers).status_code == 200:
                        self.approved.add(incident_id)
            time.sleep(0.05)

    # --- the outcome -----------------------------------------------------------------------

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with psycopg.connect(self.db, autocommit=True, connect_timeout=5) as conn:
                return conn.execute(sql, params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []

    def finished(self) -> bool:
        done = self.query("SELECT count(*) FROM runs WHERE phase = 'main' AND status = 'completed'")
        pending = self.query("SELECT count(*) FROM outbox WHERE status = 'pending'")
        return bool(done and done[0][0] == len(self.ids) and pending and pending[0][0] == 0)

    def verify(self) -> ChaosCounts:
        counts = ChaosCounts(replicas=len(self.replicas), incidents=len(self.ids))
        marks = self.marks.read_text().splitlines() if self.marks.exists() else []
        starts = Counter(line.split()[1] for line in marks if line.startswith("start"))
        ends = Counter(line.split()[1] for line in marks if line.startswith("end"))
        counts.steps_run = sum(starts.values())
        counts.steps_run_twice = sum(c - 1 for c in starts.values() if c > 1)
        statuses = {
            f"{incident}:{step}": status
            for incident, step, status in self.query(
                "SELECT incident_id, step_id, status FROM step_runs"
            )
        }
        counts.interrupted = sum(1 for s in statuses.values() if s == "interrupted")
        counts.results_lost = sum(1 for label in ends if statuses.get(label) != "success")
        counts.deliveries_acked = len(self.acked)
        counts.approvals_acked = len(self.approved)
        for n, incident_id in enumerate(self.ids):
            runs = self.query(
                "SELECT status FROM runs WHERE incident_id = %s AND phase = 'main'",
                (incident_id,),
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
        counts.takeovers = list(self.takeovers)
        return counts


def run_chaos(
    root: Path,
    db: str,
    *,
    replicas: int = 3,
    incidents: int = 40,
    kills: int = 100,
    interval: float = 1.2,
    seed: int = 0,
    timeout: float = 180.0,
) -> ChaosCounts:
    """Start the fleet, drive the workload over the kills, kill -9 a random replica at a
    random moment of every `interval` seconds and start it again, then wait for every
    run to complete and count."""
    root.mkdir(parents=True, exist_ok=True)
    fleet = Fleet(root, db, replicas=replicas, incidents=incidents, seed=seed)
    kills_done = 0
    try:
        fleet.start()
        drivers = [
            threading.Thread(target=fleet.deliver_all, args=(0.8 * kills * interval,), daemon=True),
            threading.Thread(target=fleet.approve_all, daemon=True),
        ]
        for driver in drivers:
            driver.start()
        for _ in range(kills):
            time.sleep(fleet.rng.uniform(0.5, 1.5) * interval)
            victim = fleet.rng.choice(fleet.replicas)
            if not victim.alive():
                fleet.wait_healthy(victim)
            fleet.kill_and_restart(victim)
            kills_done += 1
        for replica in fleet.replicas:
            fleet.wait_healthy(replica)
        deadline = time.monotonic() + timeout
        while not fleet.finished() and time.monotonic() < deadline:
            time.sleep(0.1)
        fleet.stop.set()
        for driver in drivers:
            driver.join(10)
        for watcher in fleet._watchers:
            watcher.join(60)
        counts = fleet.verify()
        counts.kills = kills_done
        if counts.broken:
            for replica in fleet.replicas:
                tail = replica.log.read_text(errors="replace").splitlines()[-10:]
                counts.unfinished.append(f"{replica.name} log: " + " | ".join(tail))
        return counts
    finally:
        fleet.close()
