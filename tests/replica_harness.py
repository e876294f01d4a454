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
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from fault_harness import Counts, Workload, free_port

from bot.store.backend import translate


@dataclass
class ChaosCounts(Counts):
    """`fault_harness.Counts`, with the fleet and the lease takeovers measured."""

    replicas: int = 0
    incidents: int = 0
    takeovers: list[float] = field(default_factory=list)

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


class Fleet(Workload):
    """Replicas on one PostgreSQL database; requests go to a random one."""

    def __init__(self, root: Path, db: str, *, replicas: int, incidents: int, seed: int) -> None:
        super().__init__(root, incidents, random.Random(seed), "C")
        self.db = db
        self.replicas = [Replica(self, n) for n in range(replicas)]
        self.takeovers: list[float] = []
        self._watchers: list[threading.Thread] = []

    def env(self) -> dict[str, str]:
        return {
            **super().env(),
            "RUNBOOK_DB": self.db,
            "RUNBOOK_STATE_DIR": str(self.root / "state"),
        }

    def target(self) -> str:
        return self.rng.choice(self.replicas).url

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            with psycopg.connect(self.db, autocommit=True, connect_timeout=5) as conn:
                return conn.execute(translate(sql), params).fetchall()
        except psycopg.errors.UndefinedTable:
            return []

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
                "SELECT holder FROM leases WHERE name = ? AND "
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
        super().close()


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
            threading.Thread(
                target=fleet.deliver_all, args=(0.8 * kills * interval / incidents,), daemon=True
            ),
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
        counts = fleet.verify(ChaosCounts(replicas=replicas, incidents=incidents))
        counts.kills = kills_done
        counts.takeovers = list(fleet.takeovers)
        if counts.broken:
            for replica in fleet.replicas:
                tail = replica.log.read_text(errors="replace").splitlines()[-10:]
                counts.unfinished.append(f"{replica.name} log: " + " | ".join(tail))
        return counts
    finally:
        fleet.close()
