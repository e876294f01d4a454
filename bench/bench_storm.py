"""Alert storm: 1,000 PagerDuty deliveries in 10 seconds against the running bot.

    python bench/bench_storm.py [--runs 3] [--deliveries 1000] [--seconds 10]
                                [--duplicates 0.2] [--services 50] [--workers 8]
                                [--intake-process 1]
                                [--rate-limit-every 25] [--drain last|all|none]
                                [--setups sqlite,pg1,pg2] [--postgres local|URL]

The bot is the real `runbook-bot` process with a generated catalog (one runbook per
service, its own channel; step 1 a safe-for-automation `echo`, step 2 a guarded one that
waits for approval, so its ✅ ❌ ⏸️ are offered), talking to the local Slack and PagerDuty
stand-ins of tests/fakes. Of the deliveries, `--duplicates` are PagerDuty retrying one
(same X-Webhook-Id) or replaying it (same event id, new X-Webhook-Id). The stand-in Slack
answers every Nth new ``chat.postMessage`` with 429 ``Retry-After: 1``.

The reference, in the same run and on the same schedule: a minimal waitress app (its own
process, like the bot) that only verifies the signature and answers 202. The deliveries
are sent, and their answers timed, from a process of their own (64 threads): the stand-ins
serve the bot from this process, and a sender sharing their interpreter lock would count
their work as the bot's.

Setups (`--setups`, measured in turn in every run, each against that run's reference and
with stand-ins of its own): ``sqlite``, one bot on a SQLite file (the default); ``pgN``,
N replicas sharing one PostgreSQL database (bot.replicas), each with its own port and
RUNBOOK_REPLICA_ID, the sender spreading the deliveries over them round-robin as a load
balancer would (so a retry or a replay may reach another replica than its original).
`--postgres` names the server: ``local`` starts a throwaway one (tests/postgres.py);
every setup run gets a fresh database.

Reported, per run and over the runs:
  * acknowledgement latency p50 / p99 / max of both, answers over 5 s (PagerDuty's
    limit), and the bot/minimal p99 ratio (median and range over the runs; aim: <= 2);
  * deliveries lost: events acknowledged with a 202 that the bot's inbox did not apply
    (must be 0; read from the shared inbox on PostgreSQL); duplicates recognised;
  * threads per incident: root messages per incident in the stand-in Slack (must be 1);
  * Slack calls per method, counted by the stand-in over sliding windows, beside Slack's
    documented limits: ``chat.postMessage`` about 1 per second per channel (short bursts
    allowed), Tier 3 methods (``chat.update``, ``reactions.add``, ``conversations.history``,
    ``conversations.replies``, ``conversations.info``) 50 a minute, Tier 2
    (``conversations.list``) 20, Tier 4 (``chat.postEphemeral``) 100; and whether every
    post retried after a 429 waited its ``Retry-After``;
  * drain: when every delivery was applied (inbox), and when everything they caused was
    delivered to Slack (outbox; paced by Slack's limits, so minutes). `--drain` says in
    which runs to wait for the outbox (default: the last one);
  * warnings and errors in the bot's (each replica's) log;
  * at the end, a table with one row per setup.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
from bench_engine import fresh_postgres_database  # noqa: E402
from fakes import FakePagerDuty, FakeSlack, make_alert  # noqa: E402
from fakes.base import Reply, Request  # noqa: E402
from pagerduty_harness import (  # noqa: E402
    OUTSTANDING,
    free_port,
    not_moved,
    query,
    runbook_bot,
)

from bot.replicas import BEAT_SECONDS  # noqa: E402
from bot.store.backend import display, is_postgres  # noqa: E402

SECRET = "bench-webhook-secret"
PD_TOKEN = "bench-pd-token"
PD_FROM = "runbook-bot@example.com"
ACK_LIMIT = 5.0  # seconds PagerDuty waits for an answer
RETRY_AFTER = 1

# Slack's documented limits (https://api.slack.com/docs/rate-limits): calls per window,
# per channel or per workspace. Tiers allow "occasional bursts" above their rate.
TIER_2, TIER_3, TIER_4 = 20, 50, 100
WORKSPACE_LIMITS: dict[str, int] = {
    "chat.update": TIER_3,
    "reactions.add": TIER_3,
    "reactions.remove": TIER_3,
    "conversations.history": TIER_3,
    "conversations.replies": TIER_3,
    "conversations.info": TIER_3,
    "conversations.list": TIER_2,
    "usergroups.users.list": TIER_2,
    "chat.postEphemeral": TIER_4,
    "users.info": TIER_4,
}
POST_PER_CHANNEL_PER_MINUTE = 60  # "1 message per second per channel, short bursts"


# --- the minimal reference handler -----------------------------------------------------------


def serve_minimal(port: int) -> None:
    """Verify X-PagerDuty-Signature and answer 202: nothing else."""
    from waitress import serve

    key = SECRET.encode()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
        expected = ("v1=" + hmac.new(key, body, hashlib.sha256).hexdigest()).encode()
        offered = environ.get("HTTP_X_PAGERDUTY_SIGNATURE", "").split(",")
        ok = any(hmac.compare_digest(expected, s.strip().encode()) for s in offered)
        start_response("202 Accepted" if ok else "401 Unauthorized", [("Content-Length", "0")])
        return [b""]

    serve(app, host="127.0.0.1", port=port, threads=4, _quiet=True)


# --- stand-ins ------------------------------------------------------------------------------


class CountingSlack(FakeSlack):
    """FakeSlack that times every call (for rates over sliding windows), answers every
    `every`-th new post with 429, and times the retries of those posts."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.posts = 0
        self.served = 0  # 429s answered
        self.limited: dict[str, float] = {}  # post key -> when it got its 429
        self.retry_waits: list[float] = []  # seconds from a 429 to the retry of that post
        self.timeline: list[tuple[float, str, str]] = []  # (monotonic, method, channel)

    def handle(self, request: Request) -> Reply:
        name = self.call_name(request)
        params = self.call_params(request)
        now = time.monotonic()
        self.timeline.append((now, name, str(params.get("channel") or "")))
        if name == "chat.postMessage" and self.every > 0:
            key = json.dumps(params, sort_keys=True, default=str)
            if key in self.limited:
                self.retry_waits.append(now - self.limited.pop(key))
            else:
                self.posts += 1
                if self.posts % self.every == 0:
                    self.limited[key] = now
                    self.served += 1
                    return Reply(429, self.error_body(429), {"Retry-After": str(RETRY_AFTER)})
        return super().handle(request)

    def calls_timed(self) -> list[tuple[float, str, str]]:
        with self._cond:  # `handle` appends under the stand-in's lock
            return list(self.timeline)


def max_in_window(times: list[float], window: float) -> int:
    """The most calls in any `window` seconds (sliding, starting at a call)."""
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


@dataclass
class Rate:
    method: str
    scope: str  # "workspace" or "per channel (worst)"
    calls: int
    max_1s: int
    max_60s: int
    limit_60s: int | None

    @property
    def within(self) -> str:
        if self.limit_60s is None:
            return "(no fixed limit)"
        ratio = self.max_60s / self.limit_60s
        return f"{ratio:.2f}x {'ok' if ratio <= 1.0 else 'OVER'}"


def slack_rates(slack: CountingSlack) -> list[Rate]:
    timeline = slack.calls_timed()
    by_method: defaultdict[str, list[float]] = defaultdict(list)
    by_channel: defaultdict[str, list[float]] = defaultdict(list)
    for at, method, channel in timeline:
        by_method[method].append(at)
        if method == "chat.postMessage":
            by_channel[channel].append(at)
    rates = []
    for method, times in sorted(by_method.items()):
        if method == "chat.postMessage":
            worst = max(by_channel.values(), key=lambda t: max_in_window(t, 60.0))
            rates.append(
                Rate(
                    method,
                    "per channel (worst)",
                    len(worst),
                    max(max_in_window(t, 1.0) for t in by_channel.values()),
                    max_in_window(worst, 60.0),
                    POST_PER_CHANNEL_PER_MINUTE,
                )
            )
        rates.append(
            Rate(
                method,
                "workspace",
                len(times),
                max_in_window(times, 1.0),
                max_in_window(times, 60.0),
                WORKSPACE_LIMITS.get(method),
            )
        )
    return rates


# --- the storm -----------------------------------------------------------------------------


@dataclass
class Send:
    at: float  # seconds after the start
    body: bytes
    webhook_id: str
    event_id: str
    duplicate: bool


@dataclass
class Fired:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)  # accepted / duplicate
    acked_events: set[str] = field(default_factory=set)
    errors: int = 0


def incident_id(n: int) -> str:
    return f"Q{n:04d}"


def channel_of(service: int) -> str:
    return f"CSVC{service:02d}"  # a channel id, as Slack answers with


def storm_schedule(
    deliveries: int, seconds: float, duplicates: float, services: int, seed: int = 5
) -> list[Send]:
    rng = random.Random(seed)
    unique = round(deliveries * (1 - duplicates))
    sends: list[Send] = []
    for n in range(unique):
        service = f"svc-{n % services:02d}"
        event_id = str(uuid.UUID(int=rng.getrandbits(128)))
        document = {
            "event": {
                "id": event_id,
                "event_type": "incident.triggered",
                "resource_type": "incident",
                "occurred_at": "2024-05-01T10:00:00.000Z",
                "agent": {"id": "PAGENT", "summary": "Monitoring", "type": "service_reference"},
                "client": {"name": "Prometheus"},
                "data": {
                    "id": incident_id(n),
                    "type": "incident",
                    "self": f"https://api.pagerduty.test/incidents/{incident_id(n)}",
                    "html_url": f"https://acme.pagerduty.test/incidents/{incident_id(n)}",
                    "number": n + 1,
                    "status": "triggered",
                    "incident_key": f"key-{n}",
                    "created_at": "2024-05-01T10:00:00Z",
                    "title": f"{service} elevated errors [{incident_id(n)}]",
                    "service": {
                        "id": f"PSVC{n % services:02d}",
                        "summary": service,
                        "type": "service_reference",
                        "html_url": "https://acme.pagerduty.test/services/x",
                        "self": "https://api.pagerduty.test/services/x",
                    },
                    "assignees": [],
                    "escalation_policy": {"id": "PPOL", "summary": "Default"},
                    "teams": [],
                    "priority": {"id": "PPRIO", "summary": "P2"},
                    "urgency": "high",
                    "conference_bridge": None,
                    "resolve_reason": None,
                },
            }
        }
        at = seconds * n / unique
        body = json.dumps(document).encode()
        sends.append(Send(at, body, str(uuid.UUID(int=rng.getrandbits(128))), event_id, False))
    for original in rng.sample(sends[:], deliveries - unique):
        # Half are PagerDuty retrying the same delivery, half replays under a new id.
        webhook_id = (
            original.webhook_id if rng.random() < 0.5 else str(uuid.UUID(int=rng.getrandbits(128)))
        )
        at = min(original.at + rng.uniform(0.05, 2.0), seconds - 0.001)
        sends.append(Send(at, original.body, webhook_id, original.event_id, True))
    return sorted(sends, key=lambda s: s.at)


def fire_apart(urls: list[str], schedule: list[Send], work: Path) -> Fired:
    """`fire` in a process of its own: the stand-ins of Slack and PagerDuty serve the
    bot from this process's threads, and a sender sharing their interpreter lock would
    time their work into the bot's answers (the reference has no such load)."""
    plan = work / "schedule.json"
    plan.write_text(
        json.dumps(
            [[s.at, s.body.decode(), s.webhook_id, s.event_id, s.duplicate] for s in schedule]
        )
    )
    out = subprocess.run(
        [sys.executable, __file__, "--fire", ",".join(urls), "--schedule", str(plan)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    data = json.loads(out)
    return Fired(
        latencies=data["latencies"],
        statuses=Counter({int(k): v for k, v in data["statuses"].items()}),
        answers=Counter(data["answers"]),
        acked_events=set(data["acked_events"]),
        errors=data["errors"],
    )


def fire_main(urls: str, plan: Path) -> None:
    """The sender process: the schedule from `plan`, the outcome as JSON on stdout."""
    schedule = [
        Send(at, body.encode(), w, e, d) for at, body, w, e, d in json.loads(plan.read_text())
    ]
    result = fire(urls.split(","), schedule)
    json.dump(
        {
            "latencies": result.latencies,
            "statuses": result.statuses,
            "answers": result.answers,
            "acked_events": sorted(result.acked_events),
            "errors": result.errors,
        },
        sys.stdout,
    )


def fire(urls: list[str], schedule: list[Send], senders: int = 64) -> Fired:
    """Send `schedule` on time, the n-th delivery to ``urls[n % len(urls)]`` (round-robin,
    as a load balancer would: a retry may reach another replica than its original)."""
    result = Fired()
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=senders, max_keepalive_connections=senders)
    with httpx.Client(timeout=30, limits=limits) as client:
        start = time.perf_counter() + 0.2

        def send(n: int, item: Send) -> None:
            delay = start + item.at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            headers = {
                "Content-Type": "application/json",
                "X-Webhook-Id": item.webhook_id,
                "X-PagerDuty-Signature": "v1="
                + hmac.new(SECRET.encode(), item.body, hashlib.sha256).hexdigest(),
            }
            began = time.perf_counter()
            try:
                response = client.post(urls[n % len(urls)], content=item.body, headers=headers)
            except httpx.HTTPError:
                with lock:
                    result.errors += 1
                return
            took = time.perf_counter() - began
            with lock:
                result.latencies.append(took)
                result.statuses[response.status_code] += 1
                if response.status_code == 202:
                    result.acked_events.add(item.event_id)
                    with contextlib.suppress(ValueError):
                        result.answers[str(response.json().get("status"))] += 1

        with ThreadPoolExecutor(max_workers=senders) as pool:
            list(pool.map(send, range(len(schedule)), schedule))
    return result


# --- set-up --------------------------------------------------------------------------------


def write_catalog(root: Path, services: int) -> None:
    (root / "runbooks").mkdir(parents=True)
    (root / "catalog.yaml").write_text(
        "kind: catalog\n"
        "environments: [{name: dev}, {name: staging}, {name: prod, production: true}]\n"
        "approvers: {groups: [S0ONCALL]}\n"
        "channel: CINCIDENTS\n"
    )
    for n in range(services):
        service = f"svc-{n:02d}"
        (root / "runbooks" / f"{service}.yaml").write_text(
            f"kind: runbook\nid: {service}-errors\nmatch: {{services: [{service}]}}\n"
            f"channel: {channel_of(n)}\n"
            "steps:\n"
            "  - id: check\n"
            '    command: ["echo", "checked {{ incident.service }}"]\n'
            '    expect: [{pattern: "checked"}]\n'
            "    safety: {requires_approval: false, scopes: [dev, staging]}\n"
            "  - id: restart\n"
            '    command: ["echo", "restarted"]\n'
            '    expect: [{pattern: "restarted"}]\n'
            # Nobody approves in the storm: a deadline beyond the drain keeps expiries
            # (their notes, updates and escalations) out of what is measured.
            "    safety: {requires_approval: true, scopes: [dev, staging], "
            "approval_timeout: 2h}\n"
        )


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url} exited with {proc.returncode} before answering")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(url, timeout=1)
            return
        time.sleep(0.1)
    raise SystemExit(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def process(argv: list[str], env: dict[str, str], health: str, log: Path) -> Iterator[None]:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=out)
        try:
            wait_healthy(health, proc)
            yield
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def roots_per_incident(slack: FakeSlack, services: int) -> Counter[str]:
    found: Counter[str] = Counter()
    for n in range(services):
        for message in slack.messages(channel_of(n)):
            is_root = message.get("thread_ts") in (None, message["ts"])
            match = re.search(r"\[(Q\d{4})\]", message.get("text", ""))
            if is_root and match:
                found[match.group(1)] += 1
    return found


# --- setups and the bot's database ---------------------------------------------------------


@dataclass(frozen=True)
class Setup:
    name: str  # as `--setups` spells it
    replicas: int  # 0: one bot on a SQLite file; N: N replicas on PostgreSQL

    @property
    def postgres(self) -> bool:
        return self.replicas > 0

    @property
    def label(self) -> str:
        if not self.postgres:
            return "1 bot, SQLite"
        return f"{self.replicas} replica{'s' if self.replicas > 1 else ''}, PostgreSQL"

    @property
    def bot_label(self) -> str:
        """The bot's row in a run's report (the SQLite bot's as it always was)."""
        return "runbook-bot" if not self.postgres else f"runbook-bot {self.name}"


def parse_setups(text: str) -> list[Setup]:
    setups = []
    for name in text.split(","):
        replicas = re.fullmatch(r"pg([1-9][0-9]*)", name.strip())
        if name.strip() == "sqlite":
            setups.append(Setup("sqlite", 0))
        elif replicas:
            setups.append(Setup(name.strip(), int(replicas.group(1))))
        else:
            raise argparse.ArgumentTypeError(
                f"unknown setup {name!r}: use sqlite or pgN (N replicas on PostgreSQL), "
                "comma-separated, e.g. sqlite,pg1,pg2"
            )
    if len({s.name for s in setups}) != len(setups):
        raise argparse.ArgumentTypeError(f"a setup named twice in {text!r}")
    return setups


QUEUED = "SELECT count(*) FROM inbox WHERE source = 'pagerduty' AND status = 'queued'"


class BotDatabase:
    """The bot's database read from outside, as an operator would: a SQLite file (with
    its intake log beside it) or the PostgreSQL database its replicas share (no intake
    log there: each replica records straight into the inbox)."""

    def __init__(self, location: str) -> None:
        self.location = location
        self.postgres = is_postgres(location)

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.postgres:
            return query(Path(self.location), sql)
        import psycopg

        with psycopg.connect(self.location, autocommit=True, connect_timeout=10) as conn:
            return list(conn.execute(sql).fetchall())

    def count(self, sql: str) -> int:
        return int(self.query(sql)[0][0])

    def in_intake_log(self) -> int:
        return 0 if self.postgres else not_moved(Path(self.location))

    def deliveries_queued(self) -> int:
        """Deliveries acknowledged and not applied yet."""
        return self.in_intake_log() + self.count(QUEUED)

    def outstanding(self) -> int:
        """Work not done yet (see `Bot.outstanding`): the outbox included."""
        return self.in_intake_log() + self.count(OUTSTANDING)

    def applied_events(self) -> set[str]:
        event_id = (
            "payload::json ->> 'event_id'"
            if self.postgres
            else "json_extract(payload, '$.event_id')"
        )
        rows = self.query(
            f"SELECT {event_id} FROM inbox "
            "WHERE source = 'pagerduty' AND status IN ('done', 'ignored')"
        )
        return {str(row[0]) for row in rows}

    def incidents(self) -> int:
        return self.count("SELECT count(*) FROM incidents")


def drop_database(server: str, url: str) -> None:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{urlsplit(url).path.lstrip("/")}" WITH (FORCE)')


LEVELS = ("WARNING", "ERROR", "CRITICAL")


def log_findings(logs: list[Path]) -> Counter[str]:
    """Warnings, errors and tracebacks in the bot's logs, by kind: level, logger and
    message with its numbers and ids blurred (``r1: 12 items`` and ``r0: 7 items`` are one
    kind), prefixed with the log's name when there are several."""
    found: Counter[str] = Counter()
    for log in logs:
        prefix = f"{log.stem}: " if len(logs) > 1 else ""
        for line in log.read_text(errors="replace").splitlines() if log.exists() else []:
            parts = line.split(" ", 3)
            if len(parts) == 4 and parts[2] in LEVELS:
                kind = re.sub(r"[0-9a-f]{8,}|[0-9]+(\.[0-9]+)?", "#", parts[3])[:160]
                found[f"{prefix}{parts[2]} {kind}"] += 1
            elif line.startswith("Traceback"):
                found[f"{prefix}Traceback"] += 1
    return found


# --- one run -------------------------------------------------------------------------------


@dataclass
class Run:
    setup: Setup
    minimal: Fired  # the run's reference, shared by its setups
    bot: Fired
    lost: int
    applied: int
    opened: int
    threads: Counter[int]  # roots per incident: how many incidents
    inbox_drained: float  # seconds after the first delivery
    outbox_drained: float | None  # None: not waited for
    rates: list[Rate]
    retry_waits: list[float]
    served_429: int
    findings: Counter[str]  # warnings and errors in the logs, by kind

    @property
    def p99_ratio(self) -> float:
        return percentile(self.bot.latencies, 0.99) / percentile(self.minimal.latencies, 0.99)


def base_environment() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLACK_", "PAGERDUTY_", "RUNBOOK_"))
    }


def measure_minimal(schedule: list[Send]) -> Fired:
    """The reference: verify and answer, nothing else."""
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        work = Path(tmp)
        port = free_port()
        with process(
            [sys.executable, __file__, "--minimal-server", str(port)],
            base_environment(),
            f"http://127.0.0.1:{port}/",
            work / "minimal.log",
        ):
            return fire_apart([f"http://127.0.0.1:{port}/pagerduty/webhook"], schedule, work)


def wait_for_replicas(db: BotDatabase, count: int, timeout: float = 30.0) -> None:
    """Until every replica has a heartbeat, and each has beaten once since: then each
    knows the others, and the storm meets the fleet's shares, not a replica alone."""
    deadline = time.monotonic() + timeout
    while db.count("SELECT count(*) FROM replicas") < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} replicas did not all beat within {timeout:.0f} s")
        time.sleep(0.1)
    time.sleep(1.5 * BEAT_SECONDS)


def run_setup(
    args: argparse.Namespace, setup: Setup, schedule: list[Send], minimal: Fired, drain: bool
) -> Run:
    incidents = {json.loads(s.body)["event"]["data"]["id"] for s in schedule}
    with (
        tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp,
        CountingSlack(args.rate_limit_every) as slack,
        FakePagerDuty(token=PD_TOKEN) as pd,
    ):
        work = Path(tmp)
        write_catalog(work / "catalog", args.services)
        for name in sorted(incidents):
            pd.add_incident(name)
            pd.add_alerts(name, [make_alert(f"A{name}", name, details={"namespace": "shop"})])
        location = (
            fresh_postgres_database(args.postgres) if setup.postgres else str(work / "bot.db")
        )
        db = BotDatabase(location)
        env = {
            **base_environment(),
            "RUNBOOK_CATALOG": str(work / "catalog"),
            "RUNBOOK_DB": location,
            "RUNBOOK_ENV": "staging",
            "RUNBOOK_WORKERS": str(args.workers),
            "RUNBOOK_INTAKE_PROCESS": str(args.intake_process),  # ignored on PostgreSQL
            "RUNBOOK_LOG_LEVEL": "WARNING",
            "HOST": "127.0.0.1",
            "SLACK_BOT_TOKEN": "xoxb-bench",
            "SLACK_SIGNING_SECRET": "bench-signing-secret",
            "SLACK_API_URL": slack.api_url,
            "PAGERDUTY_WEBHOOK_SECRET": SECRET,
            "PAGERDUTY_API_TOKEN": PD_TOKEN,
            "PAGERDUTY_FROM": PD_FROM,
            "PAGERDUTY_API_URL": pd.url,
            "SSL_CERT_FILE": str(pd.ca_file),
        }
        if setup.postgres:
            env["RUNBOOK_STATE_DIR"] = str(work / "state")  # a directory per replica in it
        names = [f"r{n}" for n in range(setup.replicas)] if setup.postgres else ["bot"]
        logs = [work / f"{name}.log" for name in names]
        outbox_drained: float | None = None
        try:
            with contextlib.ExitStack() as bots:
                urls = []
                for name, log in zip(names, logs, strict=True):
                    port = free_port()
                    replica = {"PORT": str(port)}
                    if setup.postgres:
                        replica["RUNBOOK_REPLICA_ID"] = name
                    bots.enter_context(
                        process(
                            [runbook_bot()],
                            {**env, **replica},
                            f"http://127.0.0.1:{port}/healthz",
                            log,
                        )
                    )
                    urls.append(f"http://127.0.0.1:{port}/pagerduty/webhook")
                if setup.postgres:
                    wait_for_replicas(db, setup.replicas)
                started = time.monotonic()
                bot = fire_apart(urls, schedule, work)
                deadline = started + args.drain_timeout
                while db.deliveries_queued() and time.monotonic() < deadline:
                    time.sleep(0.2)
                inbox_drained = time.monotonic() - started
                if drain:
                    while db.outstanding() and time.monotonic() < deadline:
                        time.sleep(0.5)
                    outbox_drained = time.monotonic() - started
                applied = db.applied_events()
                opened = db.incidents()
                roots = roots_per_incident(slack, args.services)
        finally:
            if setup.postgres:
                drop_database(args.postgres, location)
        for log in logs:
            if log.stat().st_size:
                tail = log.read_text(errors="replace").splitlines()[-5:]
                print(f"  {log.stem} log (last lines):", *tail, sep="\n    ")
        return Run(
            setup=setup,
            minimal=minimal,
            bot=bot,
            lost=len(bot.acked_events - applied),
            applied=len(applied),
            opened=opened,
            threads=Counter(roots.get(i, 0) for i in incidents),
            inbox_drained=inbox_drained,
            outbox_drained=outbox_drained,
            rates=slack_rates(slack),
            retry_waits=list(slack.retry_waits),
            served_429=slack.served,
            findings=log_findings(logs),
        )


# --- report ---------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def latency_row(name: str, result: Fired) -> str:
    lat = result.latencies or [float("nan")]
    over = sum(1 for v in lat if v > ACK_LIMIT)
    return (
        f"    {name:<16} p50 {ms(statistics.median(lat)):>9}   p99 {ms(percentile(lat, 0.99)):>9}"
        f"   max {ms(max(lat)):>9}   over {ACK_LIMIT:.0f} s: {over}   "
        f"answers {dict(sorted(result.statuses.items()))}   errors {result.errors}"
    )


def report_run(run: Run, schedule: list[Send], *, named: bool) -> None:
    """One setup's lines of a run, printed as soon as it was measured (a long series
    shows its numbers as it goes)."""
    if named:
        print(f"  {run.setup.label}:")
    print(latency_row(run.setup.bot_label, run.bot), flush=True)
    print(f"    ratio bot/minimal p99: {run.p99_ratio:.2f}x")
    duplicates = sum(s.duplicate for s in schedule)
    print(
        f"    answers {dict(run.bot.answers)} (duplicates sent {duplicates}); lost {run.lost} "
        f"(acknowledged {len(run.bot.acked_events)}, applied {run.applied}); "
        f"incidents opened {run.opened}"
    )
    print(f"    threads per incident {{roots: incidents}}: {dict(sorted(run.threads.items()))}")
    drained = f"{run.outbox_drained:.1f} s" if run.outbox_drained is not None else "not waited for"
    print(f"    drained: inbox {run.inbox_drained:.1f} s, outbox (Slack, PagerDuty) {drained}")
    if run.findings:
        print(f"    log: {sum(run.findings.values())} warnings/errors, by kind:")
        for kind, count in run.findings.most_common(8):
            print(f"      {count:>5}  {kind}")
    sys.stdout.flush()


def report_rates(run: Run) -> None:
    print("\nSlack calls counted by the stand-in (sliding windows) beside Slack's limits:")
    print(
        f"    {'method':<24}{'scope':<22}{'calls':>7}{'max/1s':>8}{'max/60s':>9}"
        f"{'limit/60s':>11}  observed/limit"
    )
    for r in run.rates:
        limit = str(r.limit_60s) if r.limit_60s is not None else "-"
        print(
            f"    {r.method:<24}{r.scope:<22}{r.calls:>7}{r.max_1s:>8}{r.max_60s:>9}"
            f"{limit:>11}  {r.within}"
        )
    waits = run.retry_waits
    honoured = sum(1 for w in waits if w >= RETRY_AFTER)
    print(
        f"    429s served {run.served_429}; posts retried {len(waits)}, after >= Retry-After "
        f"({RETRY_AFTER} s): {honoured}" + (f", shortest wait {min(waits):.2f} s" if waits else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--duplicates", type=float, default=0.2)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8, help="RUNBOOK_WORKERS of the bot")
    parser.add_argument(
        "--intake-process",
        type=int,
        choices=(0, 1),
        default=1,
        help="RUNBOOK_INTAKE_PROCESS of the bot (0: answered in the bot's own process)",
    )
    parser.add_argument(
        "--rate-limit-every",
        type=int,
        default=25,
        metavar="N",
        help="the stand-in Slack answers every Nth post with 429",
    )
    parser.add_argument(
        "--drain",
        choices=("last", "all", "none"),
        default="last",
        help="runs that wait until everything is delivered to Slack (paced: minutes)",
    )
    parser.add_argument("--drain-timeout", type=float, default=3600.0)
    parser.add_argument(
        "--setups",
        type=parse_setups,
        default=[Setup("sqlite", 0)],
        metavar="sqlite,pg1,pg2",
        help="what to measure in every run, in turn: sqlite (one bot on a SQLite file) "
        "and pgN (N replicas sharing one PostgreSQL database); default sqlite",
    )
    parser.add_argument(
        "--postgres",
        metavar="local|URL",
        help="the PostgreSQL server of the pgN setups (a fresh database per setup run): a "
        "URL, or local for a throwaway one (tests/postgres.py)",
    )
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--fire", metavar="URL", help=argparse.SUPPRESS)
    parser.add_argument("--schedule", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minimal_server:
        serve_minimal(args.minimal_server)
        return
    if args.fire:
        fire_main(args.fire, args.schedule)
        return

    # SIGTERM as Ctrl-C: the bots, the stand-ins and a local PostgreSQL are stopped on the
    # way out rather than left running.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    cluster = None
    if any(setup.postgres for setup in args.setups):
        if not args.postgres:
            parser.error("--setups with pgN: --postgres local or --postgres URL")
        if args.postgres == "local":
            from postgres import started_cluster

            cluster = started_cluster()
            if cluster is None:
                parser.error("--postgres local: PostgreSQL is not installed")
            args.postgres = cluster.url()
    try:
        ok = storm(args)
    finally:
        if cluster is not None:
            cluster.stop()
    sys.exit(0 if ok else 1)


def storm(args: argparse.Namespace) -> bool:
    """Every run: the reference, then each setup against it. True when all passed."""
    schedule = storm_schedule(args.deliveries, args.seconds, args.duplicates, args.services)
    incidents = {json.loads(s.body)["event"]["data"]["id"] for s in schedule}
    setups: list[Setup] = args.setups
    print(
        f"storm: {len(schedule)} deliveries in {args.seconds:.0f} s, "
        f"{sum(s.duplicate for s in schedule)} duplicates, {len(incidents)} incidents, "
        f"{args.services} services; Slack 429 on every {args.rate_limit_every}th post; "
        f"{args.runs} runs"
        + (f"; setups {', '.join(s.name for s in setups)}" if len(setups) > 1 else "")
        + (f"; PostgreSQL {display(args.postgres)}" if args.postgres else "")
    )
    by_setup: dict[Setup, list[Run]] = {setup: [] for setup in setups}
    for n in range(1, args.runs + 1):
        drain = args.drain == "all" or (args.drain == "last" and n == args.runs)
        minimal = measure_minimal(schedule)
        print(f"\nrun {n}:")
        print(latency_row("minimal handler", minimal), flush=True)
        for setup in setups:
            run = run_setup(args, setup, schedule, minimal, drain)
            by_setup[setup].append(run)
            report_run(run, schedule, named=len(setups) > 1)

    ok = True
    for setup, runs in by_setup.items():
        ok = report_setup(setup, runs, named=len(setups) > 1) and ok
    report_summary(by_setup)
    print("\nOK" if ok else "\nFAILED: see above")
    return ok


def report_setup(setup: Setup, runs: list[Run], *, named: bool) -> bool:
    """The setup's lines over its runs (for the SQLite bot alone, as they always were);
    True when it passed."""
    ratios = [r.p99_ratio for r in runs]
    drained = [r for r in runs if r.outbox_drained is not None]
    print(
        ("\n" + setup.label + ": " if named else "\n")
        + f"ack p99 bot/minimal over {len(runs)} runs: median {statistics.median(ratios):.2f}x, "
        f"range {min(ratios):.2f}x to {max(ratios):.2f}x (aim: <= 2x); "
        f"over {ACK_LIMIT:.0f} s: {sum(1 for r in runs for v in r.bot.latencies if v > ACK_LIMIT)}"
    )
    print(f"lost: {[r.lost for r in runs]}")
    if drained:
        report_rates(drained[-1])
    rates_ok = all(
        r.limit_60s is None or r.max_60s <= r.limit_60s for run in drained for r in run.rates
    )
    return (
        all(r.lost == 0 and not r.bot.errors for r in runs)
        and all(set(r.threads) == {1} for r in drained)
        and all(max(r.threads) <= 1 for r in runs)
        and all(all(w >= RETRY_AFTER for w in r.retry_waits) for r in runs)
        and statistics.median(ratios) <= 2.0
        and rates_ok
    )


def spread(values: list[float], fmt: str = "{:.1f}", unit: str = "") -> str:
    """Median (min-max) of `values`, or the one value."""
    if not values:
        return "-"
    if len(values) == 1:
        return fmt.format(values[0]) + unit
    low, mid, high = (fmt.format(v) for v in (min(values), statistics.median(values), max(values)))
    return f"{mid}{unit} ({low}-{high})"


SUMMARY_COLUMNS = (  # (title, width): each column right-aligned, two spaces apart
    ("ack p50", 20),
    ("ack p99", 22),
    ("ack max", 22),
    ("p99/ref", 22),
    (">5 s", 5),
    ("lost", 5),
    ("roots/incident", 14),
    ("inbox drain", 20),
    ("outbox drain", 20),
    ("log warn/err", 12),
)


def summary_row(label: str, cells: list[str]) -> str:
    padded = [f"{c:>{w}}" for c, (_, w) in zip(cells, SUMMARY_COLUMNS, strict=False)]
    return f"  {label:<24}" + "".join("  " + c for c in padded)


def report_summary(by_setup: dict[Setup, list[Run]]) -> None:
    """One row per setup (and the reference's): medians over the runs, (min-max) range;
    roots per incident: the counts seen (1 alone once the outbox drained)."""
    print(
        "\nsummary, median over the runs (min-max); ack times in ms, drains in s after the "
        "first delivery:"
    )
    print(summary_row("setup", [title for title, _ in SUMMARY_COLUMNS]))
    first = next(iter(by_setup.values()))
    rows: list[tuple[str, list[Fired], list[Run]]] = [
        ("minimal reference", [r.minimal for r in first], [])
    ]
    rows += [(setup.label, [r.bot for r in runs], runs) for setup, runs in by_setup.items()]
    for label, fired, runs in rows:
        answered = [f.latencies for f in fired if f.latencies]
        cells = [
            spread([statistics.median(lat) * 1e3 for lat in answered]),
            spread([percentile(lat, 0.99) * 1e3 for lat in answered]),
            spread([max(lat) * 1e3 for lat in answered]),
        ]
        over = str(sum(1 for lat in answered for v in lat if v > ACK_LIMIT))
        if not runs:
            print(summary_row(label, [*cells, "1x", over]))
            continue
        outbox = [r.outbox_drained for r in runs if r.outbox_drained is not None]
        cells += [
            spread([r.p99_ratio for r in runs], "{:.2f}", "x"),
            over,
            str(sum(r.lost for r in runs)),
            ",".join(str(k) for k in sorted({k for r in runs for k in r.threads})),
            spread([r.inbox_drained for r in runs]),
            spread(outbox),
            str(sum(sum(r.findings.values()) for r in runs)),
        ]
        print(summary_row(label, cells))


if __name__ == "__main__":
    main()
