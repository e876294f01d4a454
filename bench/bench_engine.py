"""The engine's own overhead, per step and per incident, over a catalog of 2,000 runbooks.

    python bench/bench_engine.py [--runbooks 2000] [--steps 20000] [--incidents 200]

What is measured (commands excluded: the runner returns a successful result at once):
  * per incident: match the runbook among all of them, record the incident, post the
    thread (NullChat), walk every step (decide, claim, record, audit), approve each
    guarded step as a responder would, finish the run;
  * per step: the same total divided by the steps the incidents walked.

References measured in the same run, on the same machine, so the figures are ratios:
  * ``next_steps`` alone: the bare catalog lookup (match over all runbooks);
  * bare SQLite: the rows one step writes (its step run, claim, result, two audit
    events), each in its own transaction as the engine commits them, through the
    ``sqlite3`` module on a WAL database with the store's pragmas.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gen_catalog import generate
from bot import executor
from bot.catalog import load_catalog
from bot.catalog.model import Catalog
from bot.chat.base import NullChat
from bot.engine import Engine, Incident
from bot.store import Store

# Concrete alert titles for the generator's symptom patterns.
TITLES = [
    "elevated 5xx on checkout",
    "503 error rate above SLO",
    "latency p99 above 2s",
    "high memory on pods",
    "container OOMKilled",
    "disk almost full on /var",
    "too many connections to primary",
    "queue depth growing",
    "certificate expires in 3 days",
    "replication lag 40s",
    "error budget burn rate high",
    "crash loop in worker",
]
DETAILS = {"namespace": "payments", "unit": "api.service"}


def noop_runner(spec: executor.CommandSpec, context: Any, **_: Any) -> executor.ExecutionResult:
    return executor.ExecutionResult(
        status="success",
        exit_code=0,
        output="ok 1\n",
        duration=0.0,
        argv=("noop",),
        matched="ok 1",
        detail="matched /ok/",
    )


def incidents(catalog: Catalog, count: int, seed: int = 7) -> list[Incident]:
    """`count` incidents that each match a (random) runbook of the catalog."""
    rng = random.Random(seed)
    chosen: list[Incident] = []
    while len(chosen) < count:
        runbook = rng.choice(catalog.runbooks)
        service = runbook.match.services[0]
        for title in rng.sample(TITLES, len(TITLES)):
            if catalog.match(service, title) is runbook:
                chosen.append(
                    Incident(
                        id=f"BENCH-{len(chosen):05d}",
                        title=title,
                        service=service,
                        urgency="high",
                        env="staging",
                        details=DETAILS,
                    )
                )
                break
    return chosen


def run_engine(catalog: Catalog, cases: list[Incident], db: Path) -> tuple[float, int, list[float]]:
    """Total seconds, steps walked, per-incident seconds."""
    store = Store(db)
    engine = Engine(catalog, store, NullChat(), default_env="staging", runner=noop_runner)
    approver = "U0LEAD"
    per_incident: list[float] = []
    started = time.perf_counter()
    for incident in cases:
        t0 = time.perf_counter()
        engine.open_incident(incident)
        while True:
            pending = store.pending_approvals(incident.id)
            if not pending:
                break
            for approval in pending:
                outcome = engine.approve(approval["step_run_id"], approver)
                if not outcome.ok:
                    raise SystemExit(f"approval refused: {outcome.message}")
        per_incident.append(time.perf_counter() - t0)
    total = time.perf_counter() - started
    steps = store.query_one("SELECT count(*) AS n FROM step_runs")
    statuses = store.query("SELECT status, count(*) AS n FROM step_runs GROUP BY status")
    store.close()
    walked = int(steps["n"]) if steps else 0
    counts = ", ".join(f"{r['status']}={r['n']}" for r in statuses)
    print(f"  step run statuses: {counts}")
    return total, walked, per_incident


def bare_sqlite_per_step(db: Path, steps: int) -> float:
    """Seconds per step for the rows a step writes, with nothing else around them."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE step_runs (id INTEGER PRIMARY KEY, run_id INT, incident_id TEXT, "
        "step_index INT, step_id TEXT, action TEXT, attempt INT, status TEXT, output TEXT, "
        "detail TEXT, started_at REAL, finished_at REAL, catalog_commit TEXT)"
    )
    conn.execute(
        "CREATE TABLE automation_events (id INTEGER PRIMARY KEY, ts REAL, incident_id TEXT, "
        "service TEXT, action TEXT, env TEXT, status TEXT, actor TEXT, detail TEXT, "
        "catalog_commit TEXT)"
    )

    def one(sql: str, params: tuple[Any, ...]) -> int:
        conn.execute("BEGIN IMMEDIATE")
        cursor = conn.execute(sql, params)
        conn.execute("COMMIT")
        return int(cursor.lastrowid or 0)

    started = time.perf_counter()
    for i in range(steps):
        row = one(
            "INSERT INTO step_runs (run_id, incident_id, step_index, step_id, action, attempt, "
            "status, catalog_commit) VALUES (?, ?, ?, ?, ?, 1, 'pending', 'c')",
            (i, f"I{i}", 0, "s", "a"),
        )
        one("UPDATE step_runs SET status = 'running', started_at = ? WHERE id = ?", (1.0, row))
        one(
            "INSERT INTO automation_events (ts, incident_id, status) VALUES (?, ?, ?)",
            (1.0, "I", "executed"),
        )
        one(
            "UPDATE step_runs SET status = 'success', output = ?, finished_at = ? WHERE id = ?",
            ("ok 1\n", 2.0, row),
        )
        one(
            "INSERT INTO automation_events (ts, incident_id, status) VALUES (?, ?, ?)",
            (2.0, "I", "succeeded"),
        )
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed / steps


def bare_lookup_seconds(catalog: Catalog, cases: list[Incident], rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        for incident in cases:
            catalog.next_steps(incident.service, incident.title)
        best = min(best, (time.perf_counter() - started) / len(cases))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runbooks", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--incidents", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        root = Path(scratch)
        generate(root / "catalog", args.runbooks, args.steps)
        t0 = time.perf_counter()
        catalog = load_catalog(root / "catalog", commit="bench")
        load = time.perf_counter() - t0
        cases = incidents(catalog, args.incidents)
        print(
            f"catalog: {len(catalog.runbooks)} runbooks, {len(catalog.actions)} actions, "
            f"loaded in {load:.2f} s (not counted below)"
        )
        print(f"engine: {len(cases)} incidents through a real SQLite file, no-op runner")
        total, steps, per_incident = run_engine(catalog, cases, root / "state.db")
        lookup = bare_lookup_seconds(catalog, cases)
        bare_step = bare_sqlite_per_step(root / "bare.db", max(steps, 1))
    per_step = total / max(steps, 1)
    mean_incident = total / len(cases)
    print()
    print(
        f"per incident  mean {mean_incident * 1e3:8.2f} ms   "
        f"p50 {statistics.median(per_incident) * 1e3:.2f} ms   "
        f"max {max(per_incident) * 1e3:.2f} ms   ({steps / len(cases):.1f} steps each)"
    )
    print(f"per step      {per_step * 1e6:8.0f} µs   (incident total / steps walked)")
    runbooks = len(catalog.runbooks)
    print(f"reference: next_steps lookup over {runbooks} runbooks  {lookup * 1e6:8.0f} µs")
    print(f"reference: bare sqlite3 rows of one step (5 transactions)  {bare_step * 1e6:8.0f} µs")
    print()
    print(f"ratio  per step / bare sqlite3 rows        {per_step / bare_step:6.1f}x")
    print(f"ratio  per incident / next_steps lookup    {mean_incident / lookup:6.1f}x")
    print(f"share  of the lookup in an incident        {100 * lookup / mean_incident:6.1f} %")


if __name__ == "__main__":
    main()
