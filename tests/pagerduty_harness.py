"""A real bot for PagerDuty tests: signed V3 deliveries in, write-back to FakePagerDuty.

Two ways to run the bot, both on real sockets and a real SQLite file:

  * `Bot`: `BotApp` served by waitress in this process (fast to start; its parts can be
    looked at), talking to `FakeSlack` through slack_sdk and to `FakePagerDuty` through
    the real `pagerduty` client;
  * `BotProcess`: the `runbook-bot` console script in its own process, configured by
    environment variables like an operator would, so it can be killed with SIGKILL.

`outage_with_kill` is the fault scenario "PagerDuty down, the bot killed -9 in the
middle, restarted, PagerDuty back", shared by tests/test_pagerduty.py (a short outage)
and bench/fault_pagerduty.py (the five-minute one).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fakes import FakePagerDuty, FakeSlack, make_alert

from bot.chat.slack import SlackTuning
from bot.config import Config, Secret
from bot.pagerduty import sign
from bot.pagerduty.api import set_timeout
from bot.server import BotApp
from bot.web import HttpServer

SECRET = "whsec-current"
OLD_SECRET = "whsec-previous"
RELAY_TOKEN = "relay-token"
PD_TOKEN = "pd-api-token"
PD_FROM = "runbook-bot@example.com"
SLACK_TOKEN = "xoxb-test-token"
SLACK_SIGNING_SECRET = "test-signing-secret"
WEBHOOK = "/pagerduty/webhook"

CATALOG = {
    "catalog.yaml": """
kind: catalog
environments: [{name: dev}, {name: staging}, {name: prod, production: true}]
approvers: {users: [U0APPROVER]}
channel: "#incidents"
services: {search: dev}
""",
    "runbooks/payments.yaml": """
kind: runbook
id: payments-5xx
match: {services: [payments], symptoms: ["5xx"]}
channel: "#inc-payments"
steps:
  - id: check-namespace
    command: ["echo", "namespace={{ incident.details.namespace }}"]
    expect: [{pattern: "namespace=shop"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
  - id: clear-cache
    command: ["echo", "OK"]
    expect: [{pattern: "OK"}]
    safety: {requires_approval: true, scopes: [dev, staging]}
on_resolve:
  - id: final-check
    command: ["echo", "final"]
    expect: [{pattern: "final"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/search.yaml": """
kind: runbook
id: search-latency
match: {services: [search]}
channel: CSEARCH
resolve_on_success: true
steps:
  - id: quick-check
    command: ["echo", "latency ok"]
    expect: [{pattern: "ok"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/orders.yaml": """
kind: runbook
id: orders-broken
match: {services: [orders]}
channel: CORDERS
steps:
  - id: failing-check
    command: ["false"]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/inventory.yaml": """
kind: runbook
id: inventory-broken
match: {services: [inventory]}
channel: CINVENTORY
escalation: {pagerduty: false}
steps:
  - id: failing-check
    command: ["false"]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
    "runbooks/billing.yaml": """
kind: runbook
id: billing-check
match: {services: [billing]}
channel: CBILLING
steps:
  - id: look
    command: ["echo", "looked"]
    expect: [{pattern: "looked"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
on_resolve:
  - id: tidy-up
    command: ["echo", "tidied"]
    expect: [{pattern: "tidied"}]
    safety: {requires_approval: false, scopes: [dev, staging]}
""",
}

# Incident id -> (service id, service, title). Other ids: see `service_of`.
SERVICES = {
    "P1": ("PSVCPAY", "payments", "Payments API elevated 5xx"),
    "P2": ("PSVCSRC", "search", "Search latency high"),
    "P3": ("PSVCORD", "orders", "Orders failing"),
    "P4": ("PSVCINV", "inventory", "Inventory failing"),
    "P5": ("PSVCBIL", "billing", "Billing slow"),
}
# Channels by name (as DESIGN.md's examples) and by id (as Slack answers, so a restarted
# bot needs no conversations.list to look for a message it may have posted).
CHANNELS = {
    "payments": "#inc-payments",
    "search": "CSEARCH",
    "orders": "CORDERS",
    "inventory": "CINVENTORY",
    "billing": "CBILLING",
}

T = TypeVar("T")

# Work a bot has not done yet, in one consistent read: queued inbox items, running steps
# (their results come back as inbox items) and undelivered effects.
# Items still in the intake log are read first: an item moves from there to the inbox,
# so between the two reads it is counted once or twice, never missed.
# What the intake log holds that the inbox does not: a batch is deleted from the log just
# after it is committed to the inbox, so a kill can leave it in both (the next start drops
# the log's copy; the inbox's unique keys would ignore it anyway).
NOT_MOVED = "FROM received WHERE key NOT IN (SELECT key FROM bot.inbox)"
OUTSTANDING = (
    "SELECT (SELECT count(*) FROM inbox WHERE status = 'queued') "
    "+ (SELECT count(*) FROM step_runs WHERE status = 'running') "
    "+ (SELECT count(*) FROM outbox WHERE status = 'pending') AS n"
)


def write_catalog(root: Path) -> Path:
    for name, text in CATALOG.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def service_of(incident_id: str) -> tuple[str, str, str]:
    """(service id, service, title): P1…P5 as in SERVICES; "S-<n>" (search), "O-<n>"
    (orders), "B-<n>" (billing) for as many more as a scenario needs."""
    if incident_id in SERVICES:
        return SERVICES[incident_id]
    base = {"S": "P2", "O": "P3", "B": "P5"}.get(incident_id.split("-")[0], "")
    if base:
        service_id, service, title = SERVICES[base]
        return service_id, service, f"{title} ({incident_id})"
    return "PSVCX", "unknown", "Something"


def wait_for(condition: Callable[[], T | None], timeout: float = 15.0, what: str = "") -> T:
    """Poll `condition` until truthy and return it; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.01)


# --- payloads, as PagerDuty sends them --------------------------------------------------------


def v3_event(
    event_type: str,
    incident_id: str = "P1",
    *,
    event_id: str | None = None,
    occurred_at: str = "2024-05-01T10:00:00.123Z",
    status: str = "triggered",
    **data: Any,
) -> dict[str, Any]:
    """A V3 webhook body (shape from PagerDuty's V3 webhook overview)."""
    service_id, service, title = service_of(incident_id)
    base = "https://acme.pagerduty.test"
    incident = {
        "id": incident_id,
        "type": "incident",
        "self": f"https://api.pagerduty.test/incidents/{incident_id}",
        "html_url": f"{base}/incidents/{incident_id}",
        "number": 2,
        "status": status,
        "incident_key": f"key-{incident_id}",
        "created_at": "2024-05-01T10:00:00Z",
        "title": title,
        "service": {
            "html_url": f"{base}/services/{service_id}",
            "id": service_id,
            "self": f"https://api.pagerduty.test/services/{service_id}",
            "summary": service,
            "type": "service_reference",
        },
        "assignees": [{"id": "PUSER1", "summary": "Sam Roe", "type": "user_reference"}],
        "escalation_policy": {
            "id": "PPOLICY",
            "summary": "Default",
            "type": "escalation_policy_reference",
        },
        "teams": [{"id": "PTEAM", "summary": "Engineering", "type": "team_reference"}],
        "priority": {"id": "PPRIO1", "summary": "P1", "type": "priority_reference"},
        "urgency": "high",
        "conference_bridge": {
            "conference_number": "+1 555",
            "conference_url": "https://example.com",
        },
        "resolve_reason": None,
        **data,
    }
    return {
        "event": {
            "id": event_id or str(uuid.uuid4()),
            "event_type": event_type,
            "resource_type": "incident",
            "occurred_at": occurred_at,
            "agent": {"id": "PAGENT", "summary": "Jane Doe", "type": "user_reference"},
            "client": {"name": "Monitoring"},
            "data": incident,
        }
    }


def signed_headers(
    body: bytes, secrets: tuple[str, ...] = (SECRET,), webhook_id: str | None = None
) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Webhook-Id": webhook_id or str(uuid.uuid4())}
    if secrets:
        headers["X-PagerDuty-Signature"] = ",".join(sign(body, s) for s in secrets)
    return headers


def pagerduty_account(incident_ids: list[str] | None = None) -> FakePagerDuty:
    """FakePagerDuty with the incidents of SERVICES (and `incident_ids`); P1's and P2's
    first alerts carry custom details."""
    details = {"symptom": "elevated 5xx", "namespace": "shop", "resource": "deploy/payments"}
    ids = [*SERVICES, *(incident_ids or [])]
    return FakePagerDuty(
        token=PD_TOKEN,
        incidents={i: {"title": service_of(i)[2]} for i in ids},
        alerts={"P1": [make_alert("A1", "P1", details=details)], "P2": [make_alert("A2", "P2")]},
    )


# --- what PagerDuty and Slack show --------------------------------------------------------


def writeback_calls(pd: FakePagerDuty) -> list[tuple[str, str]]:
    """(incident, what) of every write PagerDuty answered as done, in order: "note",
    "escalation note", "resolve", "level N"."""
    done: list[tuple[str, str]] = []
    for call in pd.calls:
        if call.status >= 400 or call.method not in ("POST", "PUT"):
            continue
        incident = call.path.split("/")[2]
        if call.method == "POST":
            content = str(((call.json or {}).get("note") or {}).get("content") or "")
            escalation = content.startswith("runbook-bot escalated")
            done.append((incident, "escalation note" if escalation else "note"))
            continue
        changes = (call.json or {}).get("incident") or {}
        if changes.get("status") == "resolved":
            done.append((incident, "resolve"))
        if "escalation_level" in changes:
            done.append((incident, f"level {changes['escalation_level']}"))
    return done


def thread_texts(slack: FakeSlack, channel: str) -> list[str]:
    return [str(m.get("text") or "") for m in slack.messages(channel)]


# --- the bot in this process ----------------------------------------------------------------


class Bot:
    """`BotApp` on waitress in this process, wired to FakeSlack and FakePagerDuty.

    Timings are made small for tests: the PagerDuty clients give up after `pd_timeout`
    seconds, and the outbox retries after (`backoff`) 50 ms doubling to 0.5 s.
    """

    def __init__(
        self,
        catalog: Path,
        db: Path,
        pd: FakePagerDuty,
        slack: FakeSlack | None = None,
        *,
        pd_timeout: float = 1.0,
        backoff: tuple[float, float] = (0.05, 0.5),
        **overrides: Any,
    ) -> None:
        self.pd = pd
        self.slack = slack
        values: dict[str, Any] = {
            "catalog": str(catalog),
            "db": str(db),
            "env": "staging",
            "pagerduty_webhook_secret": Secret(SECRET),
            "pagerduty_api_token": Secret(PD_TOKEN),
            "pagerduty_from": PD_FROM,
            "pagerduty_api_url": pd.url,
            "workers": 4,
            "shutdown_grace": 10.0,
        }
        if slack is not None:
            values.update(
                slack_bot_token=Secret(SLACK_TOKEN),
                slack_signing_secret=Secret(SLACK_SIGNING_SECRET),
                slack_api_url=slack.api_url,
            )
        values.update(overrides)
        self.config = Config(**values)
        self.app = BotApp(
            self.config, slack_tuning=SlackTuning(budgets={}, timeout=5), outbox_backoff=backoff
        )
        # The real clients, told to give up sooner than in production.
        if self.app.writeback is not None:
            set_timeout(self.app.writeback.client, pd_timeout)
        if self.app.pagerduty.api is not None:
            set_timeout(self.app.pagerduty.api, pd_timeout)
        self.app.repair()
        self.server = HttpServer(self.app.wsgi, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self.server.serve, name="waitress", daemon=True)
        self._thread.start()
        self.app.start()
        self.http = httpx.Client(base_url=self.url, timeout=30)
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.http.close()
        self.server.stop()
        self._thread.join(10)
        self.app.stop(grace=10)
        self.app.store.close()

    # -- deliveries ---------------------------------------------------------------------------

    def post(self, body: bytes, headers: dict[str, str]) -> httpx.Response:
        return self.http.post(WEBHOOK, content=body, headers=headers)

    def deliver(
        self,
        document: dict[str, Any],
        *,
        secrets: tuple[str, ...] = (SECRET,),
        webhook_id: str | None = None,
    ) -> httpx.Response:
        body = json.dumps(document).encode()
        return self.post(body, signed_headers(body, secrets, webhook_id))

    # -- state --------------------------------------------------------------------------------

    def inbox(self) -> list[tuple[str, str]]:
        """(kind, status) of every PagerDuty item, in receipt order."""
        return [(i.kind, str(i.status)) for i in self.app.store.inbox_items(source="pagerduty")]

    def outstanding(self) -> int:
        """Work not done yet, in one consistent read: queued inbox items, running steps,
        undelivered effects."""
        intake = self.app.store.intake
        received = intake.count_pending() if intake is not None else 0
        row = self.app.store.query_one(OUTSTANDING)
        assert row is not None
        return received + int(row["n"])

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until everything received was applied, run, and delivered."""
        wait_for(lambda: self.outstanding() == 0, timeout, "the bot to settle")

    def writeback(self, status: str | None = None) -> list[tuple[str, str, str]]:
        """(incident, kind, status) of the PagerDuty effects in the outbox."""
        rows = self.app.store.outbox_items(target="pagerduty")
        return [
            (r.incident_id, r.kind, str(r.status))
            for r in rows
            if status is None or str(r.status) == status
        ]

    def executed(self, incident_id: str) -> list[str]:
        return [
            str(e["step_id"])
            for e in self.app.store.events(incident_id)
            if e["status"] == "executed"
        ]


# --- the bot as its own process -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def runbook_bot() -> str:
    """The console script installed beside this interpreter."""
    return str(Path(sys.executable).with_name("runbook-bot"))


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the bot's database from outside (read-only, as an operator would)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute(sql, params).fetchall()


def in_log_only(db: Path, columns: str) -> list[tuple[Any, ...]]:
    """`columns` of the items the bot acknowledged that are only in its intake log (not
    in the inbox yet), in receipt order."""
    log = Path(f"{db}-intake")
    if not log.exists():
        return []
    with contextlib.closing(sqlite3.connect(f"file:{log}?mode=ro", uri=True, timeout=30)) as conn:
        conn.execute("ATTACH DATABASE ? AS bot", (f"file:{db}?mode=ro",))
        return conn.execute(f"SELECT {columns} {NOT_MOVED} ORDER BY id").fetchall()


def not_moved(db: Path) -> int:
    """Items the bot acknowledged that are still in its intake log only."""
    return int(in_log_only(db, "count(*)")[0][0]) if Path(f"{db}-intake").exists() else 0


def outstanding_in(db: Path) -> int:
    """Work not done yet in the database of a bot run from outside (see `Bot.outstanding`)."""
    return not_moved(db) + int(query(db, OUTSTANDING)[0][0])


class BotProcess:
    """`runbook-bot` configured through its environment, restartable, killable."""

    def __init__(
        self,
        catalog: Path,
        db: Path,
        pd: FakePagerDuty,
        slack: FakeSlack | None,
        log: Path,
        **env: str,
    ) -> None:
        self.db = db
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLACK_", "PAGERDUTY_", "RUNBOOK_"))
        }
        self.env = {
            **base,
            "RUNBOOK_CATALOG": str(catalog),
            "RUNBOOK_DB": str(db),
            "RUNBOOK_ENV": "staging",
            "HOST": "127.0.0.1",
            "PORT": str(self.port),
            "PAGERDUTY_WEBHOOK_SECRET": SECRET,
            "PAGERDUTY_API_TOKEN": PD_TOKEN,
            "PAGERDUTY_FROM": PD_FROM,
            "PAGERDUTY_API_URL": pd.url,
            "SSL_CERT_FILE": str(pd.ca_file),
            **env,
        }
        if slack is not None:
            self.env.update(
                SLACK_BOT_TOKEN=SLACK_TOKEN,
                SLACK_SIGNING_SECRET=SLACK_SIGNING_SECRET,
                SLACK_API_URL=slack.api_url,
            )
        self.proc: subprocess.Popen[bytes] | None = None
        self.http = httpx.Client(base_url=self.url, timeout=30)

    def start(self, timeout: float = 30.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([runbook_bot()], env=self.env, stdout=out, stderr=out)
        proc = self.proc

        def healthy() -> bool:
            if proc.poll() is not None:
                raise AssertionError(
                    f"runbook-bot exited with {proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                return self.http.get("/healthz", timeout=1).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(healthy, timeout, "runbook-bot to answer /healthz")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; whatever is in memory is gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        assert self.proc.wait(10) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def close(self) -> None:
        self.stop()
        self.http.close()

    def deliver(self, document: dict[str, Any], webhook_id: str | None = None) -> httpx.Response:
        body = json.dumps(document).encode()
        return self.http.post(
            WEBHOOK, content=body, headers=signed_headers(body, (SECRET,), webhook_id)
        )

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return query(self.db, sql, params)

    def received(self) -> list[tuple[str, str]]:
        """(kind, status) of every item received, in receipt order: the inbox's, then
        those still in the intake log (moved in order, so they all came later)."""
        inbox = self.query("SELECT kind, status FROM inbox ORDER BY id")
        return [*inbox, *in_log_only(self.db, "kind, status")]

    def outstanding(self) -> int:
        """Work not done yet (see `Bot.outstanding`)."""
        return outstanding_in(self.db)


# --- the fault scenario: PagerDuty down, kill -9 in the middle --------------------------------


@dataclass
class OutageReport:
    outage_seconds: float
    incidents: int
    expected: Counter[str] = field(default_factory=Counter)  # "note", "resolve", "escalate"
    delivered: Counter[str] = field(default_factory=Counter)  # distinct ones PagerDuty has
    duplicated: Counter[str] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)
    out_of_order: int = 0  # incidents whose resolve came before their note
    failed_calls: int = 0  # calls answered 5xx during the outage (hanging ones not counted)
    pending_at_kill: int = 0  # write-backs still pending when the bot was killed
    drain_seconds: float = 0.0  # from PagerDuty's return to the last write-back
    slack_roots: Counter[str] = field(default_factory=Counter)  # root messages per incident

    @property
    def ok(self) -> bool:
        return (
            not self.lost
            and not self.duplicated
            and not self.out_of_order
            and set(self.slack_roots.values()) == {1}
            and len(self.slack_roots) == self.incidents
        )

    def lines(self) -> list[str]:
        kinds = sorted(self.expected)
        return [
            f"outage {self.outage_seconds:.1f} s, {self.incidents} incidents, kill -9 in the "
            f"middle ({self.pending_at_kill} write-backs pending at the kill); PagerDuty "
            f"answered {self.failed_calls} calls with 503, then let the others hang",
            "  "
            + "   ".join(
                f"{k}: expected {self.expected[k]}, delivered {self.delivered[k]}, "
                f"lost {self.lost[k]}, duplicated {self.duplicated[k]}"
                for k in kinds
            ),
            f"  resolve before its note: {self.out_of_order}; Slack root messages per "
            f"incident: {dict(Counter(self.slack_roots.values()))}; "
            f"write-back drained {self.drain_seconds:.1f} s after PagerDuty came back",
        ]


def outage_with_kill(
    workdir: Path,
    *,
    outage: float,
    batches: int = 4,
    drain_timeout: float = 180.0,
    progress: Callable[[str], None] = lambda line: None,
) -> OutageReport:
    """PagerDuty's REST API is down (503, then hanging) for `outage` seconds while
    incidents arrive and their runs finish; the bot is killed with SIGKILL half way and
    started again; PagerDuty comes back. Counts what PagerDuty ends up with.

    Each batch brings three incidents (search: note and resolve; orders: note and
    escalation; billing: note, then a resolve from PagerDuty whose follow-ups add a
    second note); half the batches arrive before the kill, half after the restart.
    """
    catalog = write_catalog(workdir / "catalog")
    db = workdir / "bot.db"
    ids = [f"{kind}-{n}" for n in range(batches) for kind in ("S", "O", "B")]
    expected: Counter[str] = Counter()
    expected_per: dict[str, Counter[str]] = {}
    for i in ids:
        kind = i.split("-")[0]
        wanted = Counter(
            {
                "S": {"note": 1, "resolve": 1},
                "O": {"note": 1, "escalate": 1, "escalation note": 1},
                "B": {"note": 2},
            }[kind]
        )
        expected_per[i] = wanted
        expected.update(wanted)
    report = OutageReport(outage_seconds=0.0, incidents=len(ids), expected=expected)
    with pagerduty_account(ids) as pd, FakeSlack() as slack:
        bot = BotProcess(catalog, db, pd, slack, workdir / "bot.log")

        def pd_rows(status: str | None = None) -> int:
            sql = "SELECT count(*) FROM outbox WHERE target = 'pagerduty'"
            if status:
                sql += f" AND status = '{status}'"
            return int(bot.query(sql)[0][0])

        def main_run_completed(incident_id: str) -> bool:
            return bool(
                bot.query(
                    "SELECT 1 FROM runs WHERE incident_id = ? AND phase = 'main' "
                    "AND status = 'completed'",
                    (incident_id,),
                )
            )

        def send_batch(batch: list[str]) -> None:
            for i in batch:
                assert bot.deliver(v3_event("incident.triggered", i)).status_code == 202
            for i in batch:
                if i.startswith("B-"):
                    # Resolved in PagerDuty once its run finished: the follow-ups run.
                    wait_for(partial(main_run_completed, i), 60, f"the run of {i}")
                    resolved = v3_event(
                        "incident.resolved", i, status="resolved",
                        occurred_at="2024-05-01T10:30:00Z",
                    )  # fmt: skip
                    assert bot.deliver(resolved).status_code == 202

        def expected_rows(batch: list[str]) -> int:
            # one outbox row per write-back; an escalation row also writes its note
            return sum(sum(expected_per[i].values()) - expected_per[i]["escalation note"]
                       for i in batch)  # fmt: skip

        half = len(ids) // 2
        first, second = ids[:half], ids[half:]
        try:
            bot.start()
            down_at = time.monotonic()
            pd.down(503)
            progress(f"PagerDuty down (503); {len(first)} incidents")
            send_batch(first)
            wait_for(lambda: pd_rows() >= expected_rows(first), 60, "the first write-backs")
            wait_for(
                lambda: int(bot.query(
                    "SELECT count(*) FROM outbox WHERE target = 'pagerduty' AND attempts > 0"
                )[0][0]) > 0,
                60,
                "a write-back to fail",
            )  # fmt: skip
            kill_at = down_at + outage / 2
            while time.monotonic() < kill_at:
                time.sleep(min(1.0, kill_at - time.monotonic()))
            bot.kill()
            report.pending_at_kill = pd_rows("pending")
            progress(f"killed -9 with {report.pending_at_kill} write-backs pending")
            pd.down(0)  # now it hangs: the client has to time out
            bot.start()
            progress(f"restarted; PagerDuty hangs; {len(second)} more incidents")
            send_batch(second)
            wait_for(lambda: pd_rows() >= expected_rows(ids), 60, "the later write-backs")
            up_at = down_at + outage
            while time.monotonic() < up_at:
                time.sleep(min(1.0, up_at - time.monotonic()))
            report.failed_calls = sum(1 for c in pd.calls if c.status >= 500)
            pd.up()
            back = time.monotonic()
            report.outage_seconds = back - down_at
            progress(f"PagerDuty back after {report.outage_seconds:.1f} s")
            wait_for(lambda: pd_rows("pending") == 0, drain_timeout, "the write-backs")
            report.drain_seconds = time.monotonic() - back
        finally:
            bot.close()
        done = writeback_calls(pd)
        for i in ids:
            got = Counter(
                "escalate" if what.startswith("level") else what for who, what in done if who == i
            )
            for kind in {*got, *expected_per[i]}:
                report.delivered[kind] += min(got[kind], expected_per[i][kind])
                report.duplicated[kind] += max(0, got[kind] - expected_per[i][kind])
                report.lost[kind] += max(0, expected_per[i][kind] - got[kind])
            order = [what for who, what in done if who == i]
            if "resolve" in order and order.index("resolve") < order.index("note"):
                report.out_of_order += 1
        for channel in (CHANNELS["search"], CHANNELS["orders"], CHANNELS["billing"]):
            for message in slack.messages(channel):
                if message.get("thread_ts") in (None, message["ts"]):
                    text = str(message.get("text") or "")
                    for i in ids:
                        if f"({i})" in text:
                            report.slack_roots[i] += 1
    report.lost = +report.lost
    report.duplicated = +report.duplicated
    return report


@contextlib.contextmanager
def running(bot: Bot) -> Iterator[Bot]:
    try:
        yield bot
    finally:
        bot.stop()
