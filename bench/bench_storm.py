"""Alert storm: 1,000 PagerDuty deliveries in 10 seconds against the running bot.

    python bench/bench_storm.py [--deliveries 1000] [--seconds 10] [--duplicates 0.2]
                                [--services 50] [--workers 8] [--rate-limit-every 25]

The bot is the real `runbook-bot` process with a generated catalog (one runbook per
service, its own channel; step 1 a safe-for-automation `echo`, step 2 a guarded one that
waits for approval), talking to the local Slack and PagerDuty stand-ins of tests/fakes.
The stand-in Slack answers every Nth ``chat.postMessage`` with 429 ``Retry-After: 1``.

The reference, in the same run and on the same schedule: a minimal waitress app that
only verifies the signature and answers 202 (a separate process, like the bot).

Reported:
  * acknowledgement latency p50 / p99 / max of both, and how many answers took over 5 s
    (PagerDuty's limit);
  * deliveries lost: events acknowledged with a 202 whose delivery the bot did not
    process (must be 0); duplicates recognised;
  * threads per incident: root messages per incident in the stand-in Slack (must be 1);
  * Slack 429s: how many were served, and how many of the retried posts waited at
    least the ``Retry-After`` the stand-in asked for;
  * how long the bot took to work through the storm (paced to about one post per
    second per channel, as Slack asks).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import os
import random
import re
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
from fakes import FakePagerDuty, FakeSlack, make_alert  # noqa: E402
from fakes.base import Reply, Request  # noqa: E402

SECRET = "bench-webhook-secret"
PD_TOKEN = "bench-pd-token"
PD_FROM = "runbook-bot@example.com"
ACK_LIMIT = 5.0  # seconds PagerDuty waits for an answer
RETRY_AFTER = 1


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


class RateLimitingSlack(FakeSlack):
    """FakeSlack answering every `every`-th new post with 429, and timing the retries."""

    def __init__(self, every: int) -> None:
        super().__init__()
        self.every = every
        self.posts = 0
        self.served = 0  # 429s answered
        self.limited: dict[str, float] = {}  # post key -> when it got its 429
        self.retry_waits: list[float] = []  # seconds from a 429 to the retry of that post

    def handle(self, request: Request) -> Reply:
        if self.call_name(request) == "chat.postMessage" and self.every > 0:
            key = json.dumps(self.call_params(request), sort_keys=True, default=str)
            now = time.monotonic()
            if key in self.limited:
                self.retry_waits.append(now - self.limited.pop(key))
            else:
                self.posts += 1
                if self.posts % self.every == 0:
                    self.limited[key] = now
                    self.served += 1
                    return Reply(429, self.error_body(429), {"Retry-After": str(RETRY_AFTER)})
        return super().handle(request)


# --- the storm -----------------------------------------------------------------------------


@dataclass
class Send:
    at: float  # seconds after the start
    body: bytes
    webhook_id: str
    event_id: str
    duplicate: bool


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)  # accepted / duplicate
    acked_events: set[str] = field(default_factory=set)
    errors: int = 0


def incident_id(n: int) -> str:
    return f"Q{n:04d}"


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


def fire(url: str, schedule: list[Send], senders: int = 64) -> Result:
    result = Result()
    lock = threading.Lock()
    limits = httpx.Limits(max_connections=senders, max_keepalive_connections=senders)
    with httpx.Client(timeout=30, limits=limits) as client:
        start = time.perf_counter() + 0.2

        def send(item: Send) -> None:
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
                response = client.post(url, content=item.body, headers=headers)
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
            list(pool.map(send, schedule))
    return result


# --- set-up --------------------------------------------------------------------------------


def write_catalog(root: Path, services: int) -> None:
    (root / "runbooks").mkdir(parents=True)
    (root / "catalog.yaml").write_text(
        "kind: catalog\n"
        "environments: [{name: dev}, {name: staging}, {name: prod, production: true}]\n"
        "approvers: {groups: [S0ONCALL]}\n"
        'channel: "#incidents"\n'
    )
    for n in range(services):
        service = f"svc-{n:02d}"
        (root / "runbooks" / f"{service}.yaml").write_text(
            f"kind: runbook\nid: {service}-errors\nmatch: {{services: [{service}]}}\n"
            f'channel: "#inc-{service}"\n'
            "steps:\n"
            "  - id: check\n"
            '    command: ["echo", "checked {{ incident.service }}"]\n'
            '    expect: [{pattern: "checked"}]\n'
            "    safety: {requires_approval: false, scopes: [dev, staging]}\n"
            "  - id: restart\n"
            '    command: ["echo", "restarted"]\n'
            '    expect: [{pattern: "restarted"}]\n'
            "    safety: {requires_approval: true, scopes: [dev, staging]}\n"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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


def query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return conn.execute(sql).fetchall()


def roots_per_incident(slack: FakeSlack, services: int) -> Counter[str]:
    found: Counter[str] = Counter()
    for n in range(services):
        for message in slack.messages(f"#inc-svc-{n:02d}"):
            is_root = message.get("thread_ts") in (None, message["ts"])
            match = re.search(r"\[(Q\d{4})\]", message.get("text", ""))
            if is_root and match:
                found[match.group(1)] += 1
    return found


# --- report ---------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


def latency_row(name: str, result: Result) -> str:
    lat = result.latencies
    over = sum(1 for v in lat if v > ACK_LIMIT)
    return (
        f"  {name:<16} p50 {ms(statistics.median(lat)):>9}   p99 {ms(percentile(lat, 0.99)):>9}"
        f"   max {ms(max(lat)):>9}   over {ACK_LIMIT:.0f} s: {over}   "
        f"answers {dict(sorted(result.statuses.items()))}   errors {result.errors}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--duplicates", type=float, default=0.2)
    parser.add_argument("--services", type=int, default=50)
    parser.add_argument("--workers", type=int, default=8, help="RUNBOOK_WORKERS of the bot")
    parser.add_argument(
        "--rate-limit-every",
        type=int,
        default=25,
        metavar="N",
        help="the stand-in Slack answers every Nth post with 429",
    )
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--minimal-server", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.minimal_server:
        serve_minimal(args.minimal_server)
        return

    schedule = storm_schedule(args.deliveries, args.seconds, args.duplicates, args.services)
    incidents = {json.loads(s.body)["event"]["data"]["id"] for s in schedule}
    print(
        f"storm: {len(schedule)} deliveries in {args.seconds:.0f} s, "
        f"{sum(s.duplicate for s in schedule)} duplicates, {len(incidents)} incidents, "
        f"{args.services} services; Slack 429 on every {args.rate_limit_every}th post"
    )
    with (
        tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp,
        RateLimitingSlack(args.rate_limit_every) as slack,
        FakePagerDuty(token=PD_TOKEN) as pd,
    ):
        work = Path(tmp)
        write_catalog(work / "catalog", args.services)
        for name in sorted(incidents):
            pd.add_incident(name)
            pd.add_alerts(name, [make_alert(f"A{name}", name, details={"namespace": "shop"})])
        base_env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLACK_", "PAGERDUTY_", "RUNBOOK_"))
        }

        # 1. the reference: verify and answer, nothing else
        port = free_port()
        with process(
            [sys.executable, __file__, "--minimal-server", str(port)],
            base_env,
            f"http://127.0.0.1:{port}/",
            work / "minimal.log",
        ):
            minimal = fire(f"http://127.0.0.1:{port}/pagerduty/webhook", schedule)

        # 2. the bot
        port = free_port()
        db = work / "bot.db"
        env = {
            **base_env,
            "RUNBOOK_CATALOG": str(work / "catalog"),
            "RUNBOOK_DB": str(db),
            "RUNBOOK_ENV": "staging",
            "RUNBOOK_WORKERS": str(args.workers),
            "RUNBOOK_LOG_LEVEL": "WARNING",
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "SLACK_BOT_TOKEN": "xoxb-bench",
            "SLACK_SIGNING_SECRET": "bench-signing-secret",
            "SLACK_API_URL": slack.api_url,
            "PAGERDUTY_WEBHOOK_SECRET": SECRET,
            "PAGERDUTY_API_TOKEN": PD_TOKEN,
            "PAGERDUTY_FROM": PD_FROM,
            "PAGERDUTY_API_URL": pd.url,
            "SSL_CERT_FILE": str(pd.ca_file),
        }
        bot_bin = str(Path(sys.executable).with_name("runbook-bot"))
        with process([bot_bin], env, f"http://127.0.0.1:{port}/healthz", work / "bot.log"):
            started = time.monotonic()
            bot = fire(f"http://127.0.0.1:{port}/pagerduty/webhook", schedule)
            fired = time.monotonic() - started
            deadline = started + args.drain_timeout
            while time.monotonic() < deadline:
                busy = query(
                    db,
                    "SELECT count(*) FROM deliveries WHERE source = 'pagerduty' "
                    "AND status IN ('queued', 'processing')",
                )[0][0]
                if not busy:
                    break
                time.sleep(0.5)
            drained = time.monotonic() - started
            done = {
                row[0]
                for row in query(
                    db,
                    "SELECT event_id FROM deliveries WHERE source = 'pagerduty' "
                    "AND status = 'done'",
                )
            }
            opened = query(db, "SELECT count(*) FROM incidents")[0][0]
            roots = roots_per_incident(slack, args.services)
        if (work / "bot.log").stat().st_size:
            tail = (work / "bot.log").read_text(errors="replace").splitlines()[-5:]
            print("bot log (last lines):", *tail, sep="\n  ")

    lost = bot.acked_events - done
    threads = Counter(roots.get(i, 0) for i in incidents)
    waits = slack.retry_waits
    honoured = sum(1 for w in waits if w >= RETRY_AFTER)
    print("\nacknowledgement latency (send to answer, loopback):")
    print(latency_row("minimal handler", minimal))
    print(latency_row("runbook-bot", bot))
    p50 = statistics.median(bot.latencies) / statistics.median(minimal.latencies)
    p99 = percentile(bot.latencies, 0.99) / percentile(minimal.latencies, 0.99)
    print(f"  ratio bot/minimal: p50 {p50:.2f}x   p99 {p99:.2f}x")
    print("\nrunbook-bot:")
    print(f"  answers: {dict(bot.answers)} (duplicates sent: {sum(s.duplicate for s in schedule)})")
    print(
        f"  deliveries lost: {len(lost)} (acknowledged events {len(bot.acked_events)}, "
        f"processed {len(done)}; incidents opened {opened} of {len(incidents)})"
    )
    print(f"  threads per incident: {dict(sorted(threads.items()))}  (roots per incident: count)")
    print(
        f"  Slack 429s served: {slack.served}; retried posts "
        f"{len(waits)}, after >= Retry-After ({RETRY_AFTER} s): {honoured}"
        + (f", shortest wait {min(waits):.2f} s" if waits else "")
    )
    print(f"  storm sent in {fired:.1f} s; queue drained {drained:.1f} s after the first delivery")
    ok = not lost and set(threads) == {1} and honoured == len(waits) and not bot.errors
    print("\nOK" if ok else "\nFAILED: see above")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
