"""The state machine's own cost: SQL per automatic step, and time per step and incident.

    python bench/bench_engine.py [--runbooks 2000] [--steps 20000] [--incidents 200] [--runs 5]
                                 [--postgres URL|local]

1. SQL per automatic step (the figure of the durable-state-machine issue: at most 20
   statements and 4 write transactions). Every statement the bot's connection executes
   is traced (``sqlite3.Connection.set_trace_callback``) while incidents walk a runbook of
   automatic steps through the bot's real pipeline, threads included: the trigger put in
   the inbox, the dispatcher, the engine's one transaction per item, the executor's
   result put back in the inbox, the outbox sender and its bookkeeping (a transport that
   answers at once stands in for Slack). Counted per step two ways: *marginal* (a runbook
   of 20 steps minus one of 10, per extra step) and *amortized* (everything an incident
   of 10 steps costs, opening and closing included, divided by 10). A write transaction
   is a BEGIN…COMMIT block or a write statement in autocommit; reads are counted apart.
2. Time over a catalog of 2,000 generated runbooks (commands excluded: a no-op runner):
   per incident (match, record, thread, every step, approvals given as a responder would)
   and per step, beside references measured in the same run: ``next_steps`` alone (the
   bare catalog lookup) and the bare ``sqlite3`` rows of one step.

3. With ``--postgres``: part 2 again with the store on PostgreSQL (a fresh database per
   run, created through ``URL``, whose role needs CREATEDB; ``local`` starts a throwaway
   server with tests/postgres.py), and the ratio of the two backends' time per step.

Every figure is the median of ``--runs`` runs, with their range.
"""

from __future__ import annotations

import argparse
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.gen_catalog import generate
from bot import executor
from bot.catalog import load_catalog
from bot.catalog.model import (
    Action,
    Approvers,
    Catalog,
    Environment,
    Location,
    Match,
    Runbook,
    Safety,
    Settings,
    Step,
)
from bot.engine import Engine, Incident, incident_item
from bot.inbox import Inbox
from bot.jobs import InlineExecutor, JobEnd, end_item
from bot.outbox import OutboxSender, Retry, Sent
from bot.states import InboxKind
from bot.store import OutboxItem, Store
from bot.store.backend import display, is_postgres

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
APPROVER = "U0LEAD"


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


class InstantSlack:
    """A transport that answers at once, as if Slack took no time."""

    def __init__(self) -> None:
        self._ts = 0
        self._lock = threading.Lock()

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        return ()

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        return ()

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        if item.kind in ("post_incident", "post_step", "note"):
            with self._lock:
                self._ts += 1
                return Sent(ts=f"{self._ts}.000000", channel="CBENCH")
        return Sent()


class Pipeline:
    """The bot's pipeline without HTTP: inbox and outbox threads, engine, executor."""

    def __init__(self, catalog: Catalog, db: str | Path, workers: int = 4) -> None:
        self.store = Store(db, intake_log=True)  # as the bot's
        self.inbox = Inbox(self.store, self._apply, workers=workers)
        self.executor = InlineExecutor(self._ended, noop_runner)
        self.outbox = OutboxSender(self.store, {"slack": InstantSlack()}, workers=workers)
        self.engine = Engine(catalog, self.store, self.executor, default_env="staging")

    def _apply(self, item: Any) -> None:
        self.engine.apply(item)
        self.outbox.wake()

    def _ended(self, end: JobEnd) -> None:
        self.inbox.put(**end_item(end))

    def start(self) -> None:
        self.inbox.start()
        self.outbox.start()

    def stop(self) -> None:
        self.inbox.stop()
        self.outbox.stop()
        self.store.close()

    def settled(self) -> bool:
        return self.inbox.idle() and self.store.count_outbox_pending() == 0

    def wait(self, condition: Callable[[], bool], timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit("the pipeline did not settle")
            time.sleep(0.001)


class Trace:
    """Statements executed on one connection, and the write transactions among them."""

    def __init__(self) -> None:
        self.statements = 0
        self.reads = 0
        self.transactions = 0
        self._open = False
        self._lock = threading.Lock()

    def __call__(self, sql: str) -> None:
        verb = sql.lstrip().split(None, 1)[0].upper() if sql.strip() else ""
        with self._lock:
            self.statements += 1
            if verb == "BEGIN":
                self._open = True
            elif verb in ("COMMIT", "ROLLBACK"):
                self._open = False
                self.transactions += 1
            elif verb in ("SELECT", "WITH", "PRAGMA"):
                self.reads += 1
            elif not self._open:
                self.transactions += 1  # a write in autocommit


def automatic_catalog(steps: int) -> Catalog:
    here = Location("bench.yaml")
    action = Action(
        id="check",
        command=("noop",),
        location=here,
        safety=Safety(requires_approval=False, scopes=("staging",)),
    )
    runbook = Runbook(
        id="auto",
        match=Match(services=("api",)),
        steps=tuple(Step(id=f"s{i}", action=action, location=here) for i in range(steps)),
        location=here,
    )
    settings = Settings(environments=(Environment("staging"),), approvers=Approvers((APPROVER,)))
    return Catalog(
        settings=settings,
        actions={"check": action},
        runbooks=(runbook,),
        root="bench",
        commit="bench",
    )


def sql_for(steps: int, incidents: int, db: Path) -> tuple[float, float, float]:
    """(statements, write transactions, reads) per incident of `steps` automatic steps."""
    pipeline = Pipeline(automatic_catalog(steps), db)
    connections = [pipeline.store.conn]  # the state database's, and the intake log's
    if pipeline.store.intake is not None:
        connections.append(pipeline.store.intake.conn)
    traces = [Trace() for _ in connections]  # one each: a transaction is per connection
    for conn, trace in zip(connections, traces, strict=True):
        conn.set_trace_callback(trace)
    pipeline.start()
    for n in range(incidents):
        pipeline.inbox.receive(
            **incident_item(Incident(id=f"I{n}", title="x", service="api"), source="pagerduty")
        )
    pipeline.wait(
        lambda: (
            pipeline.settled()
            and pipeline.store.query_one(
                "SELECT count(*) AS n FROM runs WHERE status = 'completed'"
            )["n"]  # type: ignore[index]
            == incidents
        )
    )
    for conn in connections:
        conn.set_trace_callback(None)
    pipeline.stop()
    return (
        sum(t.statements for t in traces) / incidents,
        sum(t.transactions for t in traces) / incidents,
        sum(t.reads for t in traces) / incidents,
    )


def incidents_for(catalog: Catalog, count: int, seed: int = 7) -> list[Incident]:
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


def run_engine(catalog: Catalog, cases: list[Incident], db: str | Path) -> tuple[float, int]:
    """Seconds for all incidents (each walked to its end, approvals given), steps walked."""
    pipeline = Pipeline(catalog, db)
    store = pipeline.store
    pipeline.start()
    started = time.perf_counter()
    for incident in cases:
        pipeline.inbox.receive(**incident_item(incident, source="pagerduty"))
    decided: set[int] = set()
    while True:
        pending = [a for a in store.pending_approvals() if a.step_run_id not in decided]
        for approval in pending:
            decided.add(approval.step_run_id)
            pipeline.inbox.receive(
                source="slack",
                key=f"slack:event:{approval.step_run_id}",
                incident_id=approval.incident_id,
                kind=InboxKind.APPROVE,
                payload={"step_run_id": approval.step_run_id, "user": APPROVER, "channel": ""},
            )
        live = store.query_one(
            "SELECT count(*) AS n FROM runs WHERE status IN ('running', 'waiting')"
        )
        if not pending and pipeline.settled() and live is not None and live["n"] == 0:
            opened = store.query_one("SELECT count(*) AS n FROM incidents")
            if opened is not None and opened["n"] == len(cases):
                break
        # The driver looks every 10 ms: looking every millisecond, its own three queries
        # took the store from the workers often enough to cost a third of the time.
        time.sleep(0.01)
    total = time.perf_counter() - started
    steps = store.query_one("SELECT count(*) AS n FROM step_runs")
    pipeline.stop()
    return total, int(steps["n"]) if steps else 0


def bare_sqlite_per_step(db: Path, steps: int) -> float:
    """Seconds per step for the rows a step writes (its row, its result, two audit rows),
    in one transaction, with nothing else around them."""
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
    started = time.perf_counter()
    for i in range(steps):
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "INSERT INTO step_runs (run_id, incident_id, step_index, step_id, action, attempt, "
            "status, started_at, catalog_commit) VALUES (?, ?, ?, ?, ?, 1, 'running', ?, 'c')",
            (i, f"I{i}", 0, "s", "a", 1.0),
        ).lastrowid
        conn.execute(
            "INSERT INTO automation_events (ts, incident_id, status) VALUES (?, ?, ?)",
            (1.0, "I", "executed"),
        )
        conn.execute("COMMIT")
        conn.execute("BEGIN IMMEDIATE")
        conn.execute(
            "UPDATE step_runs SET status = 'success', output = ?, finished_at = ? WHERE id = ?",
            ("ok 1\n", 2.0, row),
        )
        conn.execute(
            "INSERT INTO automation_events (ts, incident_id, status) VALUES (?, ?, ?)",
            (2.0, "I", "succeeded"),
        )
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - started
    conn.close()
    return elapsed / steps


def bare_lookup_seconds(catalog: Catalog, cases: list[Incident]) -> float:
    started = time.perf_counter()
    for incident in cases:
        catalog.next_steps(incident.service, incident.title)
    return (time.perf_counter() - started) / len(cases)


def spread(values: list[float], scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    scaled = [v * scale for v in values]
    return (
        f"{fmt.format(statistics.median(scaled))} "
        f"({fmt.format(min(scaled))}–{fmt.format(max(scaled))})"
    )


def fresh_postgres_database(url: str) -> str:
    """A new empty database on the server of `url`; its URL."""
    import uuid
    from urllib.parse import urlsplit

    import psycopg

    name = f"bench_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    fresh = urlsplit(url)._replace(path=f"/{name}").geturl()  # a URL: RUNBOOK_DB's form
    assert is_postgres(fresh), fresh
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runbooks", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=20000)
    parser.add_argument("--incidents", type=int, default=200)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument(
        "--postgres",
        metavar="URL|local",
        help="also time the engine on PostgreSQL: a server's URL, or `local` (a throwaway one)",
    )
    args = parser.parse_args()
    cluster = None
    if args.postgres == "local":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from postgres import started_cluster

        cluster = started_cluster()
        if cluster is None:
            parser.error("--postgres local: PostgreSQL is not installed")
        args.postgres = cluster.url()
    try:
        bench(args)
    finally:
        if cluster is not None:
            cluster.stop()


def bench(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as scratch:
        root = Path(scratch)
        print("1. SQL per automatic step (traced on the bot's connection)")
        marginal_s, marginal_t, amortized_s, amortized_t, reads = [], [], [], [], []
        for run in range(args.runs):
            s10, t10, r10 = sql_for(10, 50, root / f"sql10-{run}.db")
            s20, t20, _ = sql_for(20, 50, root / f"sql20-{run}.db")
            marginal_s.append((s20 - s10) / 10)
            marginal_t.append((t20 - t10) / 10)
            amortized_s.append(s10 / 10)
            amortized_t.append(t10 / 10)
            reads.append(r10 / 10)
        target = "target: <= 20 statements, <= 4 transactions"
        print(f"   marginal   statements {spread(marginal_s)}", end="")
        print(f"   write transactions {spread(marginal_t)}")
        print(f"   amortized  statements {spread(amortized_s)}", end="")
        print(f"   write transactions {spread(amortized_t)}")
        print(f"   of which reads (amortized) {spread(reads)}   {target}")

        generate(root / "catalog", args.runbooks, args.steps)
        catalog = load_catalog(root / "catalog", commit="bench")
        cases = incidents_for(catalog, args.incidents)
        print(
            f"\n2. time: {len(cases)} incidents over {len(catalog.runbooks)} runbooks, "
            "no-op runner, real SQLite file"
        )
        per_step, per_incident, lookups, bares = [], [], [], []
        for run in range(args.runs):
            total, steps = run_engine(catalog, cases, root / f"time-{run}.db")
            per_step.append(total / max(steps, 1))
            per_incident.append(total / len(cases))
            lookups.append(bare_lookup_seconds(catalog, cases))
            bares.append(bare_sqlite_per_step(root / f"bare-{run}.db", max(steps, 1)))
        print(f"   per incident  {spread(per_incident, 1e3, '{:.2f}')} ms")
        print(f"   per step      {spread(per_step, 1e6, '{:.0f}')} µs")
        print(f"   reference: next_steps lookup   {spread(lookups, 1e6, '{:.0f}')} µs")
        bare = spread(bares, 1e6, "{:.0f}")
        print(f"   reference: bare sqlite3 rows of one step (2 transactions)  {bare} µs")
        step_ratio = spread([a / b for a, b in zip(per_step, bares, strict=True)])
        incident_ratio = spread([a / b for a, b in zip(per_incident, lookups, strict=True)])
        print(f"   ratio  per step / bare rows           {step_ratio}x")
        print(f"   ratio  per incident / next_steps      {incident_ratio}x")
        if not args.postgres:
            return
        where = display(args.postgres)
        print(f"\n3. time again, the store on PostgreSQL ({where}), a database per run")
        pg_step, pg_incident = [], []
        for _run in range(args.runs):
            database = fresh_postgres_database(args.postgres)
            total, steps = run_engine(catalog, cases, database)
            pg_step.append(total / max(steps, 1))
            pg_incident.append(total / len(cases))
        print(f"   per incident  {spread(pg_incident, 1e3, '{:.2f}')} ms")
        print(f"   per step      {spread(pg_step, 1e6, '{:.0f}')} µs")
        backend_ratio = spread([a / b for a, b in zip(pg_step, per_step, strict=True)])
        print(f"   ratio  per step PostgreSQL / SQLite   {backend_ratio}x")


if __name__ == "__main__":
    main()
