"""Metrics read back from the real `GET /metrics` of the bot, after real runs.

The bot app (`bot.server.BotApp`) is served by a real waitress server on loopback and
started as `runbook-bot` starts it (repair, serve, resume work); incidents and decisions
enter its inbox as the intakes put them, and steps are real subprocesses under the bot's
step supervisors. The registry is module-global, so every assertion is on the change a
test caused (a delta), never on absolute values (gauges read the database at scrape
time: they are absolute, and each test has its own database).

Slack, where a test needs it, is the stand-in of tests/fakes: a real HTTP server
answering the Web API calls the bot makes, which can be taken down (every call 503).
"""

from __future__ import annotations

import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeSlack
from prometheus_client.parser import text_string_to_metric_families
from waitress.server import create_server

from bot import __version__, metrics
from bot.chat.slack import SlackTuning
from bot.config import Config, Secret
from bot.engine import Incident, incident_item
from bot.pagerduty import sign
from bot.server import BotApp
from bot.states import InboxKind

REPO = Path(__file__).resolve().parent.parent
APPROVER = "U0APPROVER"
WEBHOOK_SECRET = "whsec-metrics-test"
PY = sys.executable

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _py(code: str) -> list[str]:
    return [PY, "-c", code]


# name -> (command, expect, extra safety). Each action gets a runbook for service svc-<name>.
ACTIONS: dict[str, tuple[list[str], list[dict[str, Any]], dict[str, Any]]] = {
    "ok": (_py("print('OK')"), [{"pattern": "^OK$"}], {}),
    "allowed": (
        _py("print('degraded')"),
        [{"pattern": "^OK$"}, {"pattern": "degraded", "allow_failure": True}],
        {},
    ),
    "failed": (_py("import sys; sys.exit(3)"), [{"pattern": "^OK$"}], {}),
    "timeout": (_py("import time; time.sleep(30)"), [], {}),
    "error": (["/nonexistent/runbook-bot-test-program"], [], {}),
    "guarded": (_py("print('OK')"), [{"pattern": "^OK$"}], {"requires_approval": True}),
    "expiring": (
        _py("print('OK')"),
        [{"pattern": "^OK$"}],
        {"requires_approval": True, "approval_timeout": "100ms"},
    ),
}


def write_catalog(root: Path) -> Path:
    """A tiny catalog of harmless commands run with this interpreter. JSON is YAML."""
    (root / "actions").mkdir(parents=True)
    (root / "runbooks").mkdir()
    (root / "catalog.yaml").write_text(
        json.dumps(
            {
                "kind": "catalog",
                "environments": [
                    {"name": "dev"},
                    {"name": "staging"},
                    {"name": "prod", "production": True},
                ],
                "approvers": {"users": [APPROVER]},
            }
        )
    )
    for name, (command, expect, safety) in ACTIONS.items():
        action: dict[str, Any] = {
            "id": f"m-{name}",
            "command": command,
            "timeout": "300ms" if name == "timeout" else "20s",
            "safety": {"requires_approval": False, "scopes": ["dev", "staging"], **safety},
        }
        if expect:
            action["expect"] = expect
        (root / "actions" / f"m-{name}.yaml").write_text(json.dumps(action))
        runbook = {
            "kind": "runbook",
            "id": f"rb-{name}",
            "match": {"services": [f"svc-{name}"]},
            "steps": [{"action": f"m-{name}"}],
        }
        (root / "runbooks" / f"rb-{name}.yaml").write_text(json.dumps(runbook))
    return root


@dataclass
class Served:
    app: BotApp
    url: str

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        samples: Samples = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    def post(self, path: str, body: bytes, headers: dict[str, str]) -> int:
        request = urllib.request.Request(
            self.url + path,
            data=body,
            headers={"Content-Type": "application/json", **headers},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as error:
            with error:
                return int(error.code)

    def idle(self) -> bool:
        """No command running and no inbox item queued (in that order: a finishing
        command puts its result in the inbox before it stops counting as running)."""
        return self.app.executor.running() == 0 and self.app.inbox.idle()

    def settle(self) -> None:
        deadline = time.monotonic() + 30
        while not self.idle():
            assert time.monotonic() < deadline, "the bot did not settle"
            time.sleep(0.005)

    def open(self, service: str, env: str = "") -> str:
        """Put a trigger in the inbox as the PagerDuty intake does (not waiting)."""
        incident_id = f"T-{uuid.uuid4().hex[:10]}"
        incident = Incident(id=incident_id, title="metrics test", service=service, env=env)
        self.app.inbox.put(**incident_item(incident))
        return incident_id

    def incident(self, service: str, env: str = "") -> str:
        """Open an incident and wait until the bot has done all it can without a human."""
        incident_id = self.open(service, env)
        self.settle()
        return incident_id

    def step_run_id(self, incident_id: str) -> int:
        (step_run,) = self.app.store.step_runs_of(incident_id)
        return step_run.id

    def status(self, incident_id: str) -> str:
        return str(self.app.store.step_runs_of(incident_id)[0].status)

    def decide(self, incident_id: str, user: str, kind: InboxKind) -> None:
        """A reaction, as the Slack intake puts it in the inbox; waits until applied."""
        self.app.inbox.put(
            source="slack",
            key=f"test:{uuid.uuid4().hex}",
            incident_id=incident_id,
            kind=kind,
            payload={"step_run_id": self.step_run_id(incident_id), "user": user, "channel": ""},
        )
        self.settle()


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def executed(before: Samples, after: Samples, name: str, result: str) -> float:
    """Change of the step counter for action m-<name> on service svc-<name>."""
    return delta(
        before,
        after,
        "runbook_steps_executed_total",
        service=f"svc-{name}",
        action=f"m-{name}",
        result=result,
    )


def decided(before: Samples, after: Samples, name: str, decision: str) -> float:
    """Change of the approval counter for action m-<name>."""
    return delta(before, after, "runbook_approvals_total", action=f"m-{name}", decision=decision)


def waited(before: Samples, after: Samples, name: str, decision: str) -> float:
    """Change of the number of approval waits observed for action m-<name>."""
    return delta(
        before,
        after,
        "runbook_approval_wait_seconds_count",
        action=f"m-{name}",
        decision=decision,
    )


def _serve(app: BotApp) -> Iterator[Served]:
    app.repair()
    server = create_server(app.wsgi, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, name="test-waitress", daemon=True)
    thread.start()
    app.start()
    try:
        yield Served(app, f"http://127.0.0.1:{server.effective_port}")  # type: ignore[union-attr]
    finally:
        # Stop the handler threads, then close the sockets from the server's own loop
        # thread: closing them from here races with its select() (EBADF).
        server.task_dispatcher.shutdown()
        server.trigger.pull_trigger(server.close)  # type: ignore[union-attr]
        thread.join(timeout=10)
        assert not thread.is_alive(), "the test server did not stop"
        app.stop(grace=10)
        app.store.close()


def _config(tmp_path: Path, **extra: Any) -> Config:
    return Config(
        catalog=str(write_catalog(tmp_path / "catalog")),
        db=str(tmp_path / "bot.db"),
        env="staging",
        workers=8,
        pagerduty_webhook_secret=Secret(WEBHOOK_SECRET),
        **extra,
    )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    yield from _serve(BotApp(_config(tmp_path)))


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    # The catalog names no channel: the bot posts to its default, #incidents, by name.
    with FakeSlack(channels={"CINCIDENTS": {"name": "incidents"}}) as fake:
        yield fake


@pytest.fixture
def served_with_slack(tmp_path: Path, slack: FakeSlack) -> Iterator[Served]:
    config = _config(
        tmp_path,
        slack_bot_token=Secret("xoxb-metrics"),
        slack_signing_secret=Secret("metrics-signing-secret"),
        slack_api_url=slack.api_url,
    )
    tuning = SlackTuning(budgets={})
    yield from _serve(BotApp(config, slack_tuning=tuning, outbox_backoff=(0.05, 0.5)))


# --- every step, whatever its result -------------------------------------------------------


@pytest.mark.slow
def test_every_executed_step_is_counted_with_its_result(served: Served) -> None:
    before = served.scrape()
    for name in ("ok", "allowed", "failed", "timeout", "error"):
        served.incident(f"svc-{name}")
    after = served.scrape()

    expected = {
        "ok": "success",
        "allowed": "allowed_failure",
        "failed": "failed",
        "timeout": "timeout",
        "error": "error",
    }
    for name, result in expected.items():
        assert executed(before, after, name, result) == 1, name
        others = [r for r in metrics.STEP_RESULTS if r != result]
        assert [executed(before, after, name, other) for other in others] == [0] * len(others)
        duration_count = "runbook_step_duration_seconds_count"
        assert delta(before, after, duration_count, action=f"m-{name}") == 1
    # the timed-out command ran its full 300 ms before it was killed
    assert delta(before, after, "runbook_step_duration_seconds_sum", action="m-timeout") >= 0.3
    # the duration histogram has the documented buckets, 100 ms to 10 minutes
    buckets = {
        float(dict(labels)["le"])
        for (name, labels) in after
        if name == "runbook_step_duration_seconds_bucket" and ("action", "m-ok") in labels
    }
    assert {0.1, 600.0, float("inf")} <= buckets
    assert delta(before, after, "runbook_incidents_total", service="svc-ok", matched="yes") == 1


def test_a_step_that_cannot_be_built_counts_as_an_error(served: Served, tmp_path: Path) -> None:
    # {{ incident.details.namespace }} is missing from the alert: the command never starts
    root = tmp_path / "catalog"
    (root / "actions" / "m-templated.yaml").write_text(
        json.dumps(
            {
                "id": "m-templated",
                "command": [PY, "-c", "print('OK')", "{{ incident.details.namespace }}"],
                "expect": [{"pattern": "OK"}],
                "safety": {"requires_approval": False, "scopes": ["staging"]},
            }
        )
    )
    (root / "runbooks" / "rb-templated.yaml").write_text(
        json.dumps(
            {
                "kind": "runbook",
                "id": "rb-templated",
                "match": {"services": ["svc-templated"]},
                "steps": [{"action": "m-templated"}],
            }
        )
    )
    from bot.catalog import load_catalog

    served.app.engine.use_catalog(load_catalog(root))
    before = served.scrape()
    incident_id = served.incident("svc-templated")
    after = served.scrape()
    assert served.status(incident_id) == "error"
    assert executed(before, after, "templated", "error") == 1


def test_approved_and_rejected_steps_and_the_pending_gauge(served: Served) -> None:
    before = served.scrape()
    approved = served.incident("svc-guarded")
    rejected = served.incident("svc-guarded")
    waiting = served.scrape()
    assert delta(before, waiting, "runbook_pending_approvals") == 2
    # nothing ran yet: a guarded step counts only once it is approved and run
    assert executed(before, waiting, "guarded", "success") == 0

    served.decide(approved, "U0STRANGER", InboxKind.APPROVE)  # may not approve: ignored
    assert served.status(approved) == "awaiting_approval"
    served.decide(approved, APPROVER, InboxKind.APPROVE)
    served.decide(rejected, APPROVER, InboxKind.REJECT)
    assert (served.status(approved), served.status(rejected)) == ("success", "rejected")
    after = served.scrape()

    assert delta(before, after, "runbook_pending_approvals") == 0
    assert executed(before, after, "guarded", "success") == 1
    for decision in ("approved", "rejected", "unauthorized"):
        assert decided(before, after, "guarded", decision) == 1, decision
    # an ignored reaction ends no wait
    assert waited(before, after, "guarded", "approved") == 1
    assert waited(before, after, "guarded", "rejected") == 1
    assert waited(before, after, "guarded", "unauthorized") == 0


def test_expired_approvals(served: Served) -> None:
    before = served.scrape()
    incident_id = served.incident("svc-expiring")
    # the action's approval timeout is 100 ms: the bot's expiry timer ends the request
    deadline = time.monotonic() + 15
    while served.status(incident_id) != "expired":
        assert time.monotonic() < deadline, "the request did not expire"
        time.sleep(0.01)
    served.settle()
    after = served.scrape()
    assert decided(before, after, "expiring", "expired") == 1
    assert waited(before, after, "expiring", "expired") == 1
    assert executed(before, after, "expiring", "success") == 0


def test_steps_blocked_by_scope(served: Served) -> None:
    before = served.scrape()
    incident_id = served.incident("svc-ok", env="prod")
    after = served.scrape()
    assert served.status(incident_id) == "blocked"
    blocked = {"service": "svc-ok", "action": "m-ok", "env": "prod"}
    assert delta(before, after, "runbook_steps_blocked_total", **blocked) == 1
    assert executed(before, after, "ok", "success") == 0


def test_webhook_deliveries_by_source_and_outcome(served: Served) -> None:
    body = json.dumps(
        {
            "event": {
                "id": f"E{uuid.uuid4().hex[:12]}",
                "event_type": "incident.triggered",
                "resource_type": "incident",
                "data": {
                    "id": f"Q{uuid.uuid4().hex[:8].upper()}",
                    "type": "incident",
                    "title": "metrics test",
                    "service": {"id": "PSVC", "summary": "svc-ok"},
                },
            }
        }
    ).encode()
    signed = {"X-PagerDuty-Signature": sign(body, WEBHOOK_SECRET)}
    before = served.scrape()
    assert served.post("/pagerduty/webhook", body, signed) == 202
    assert served.post("/pagerduty/webhook", body, signed) == 202  # PagerDuty retried
    assert served.post("/pagerduty/webhook", body, {"X-PagerDuty-Signature": "v1=00"}) == 401
    after = served.scrape()
    name = "runbook_webhook_deliveries_total"
    for outcome in metrics.WEBHOOK_OUTCOMES:
        assert delta(before, after, name, source="pagerduty", outcome=outcome) == 1, outcome


def test_info_names_the_bot_version_and_catalog_commit(served: Served) -> None:
    samples = served.scrape()
    info = {"version": __version__, "catalog_commit": served.app.catalog.version}
    assert value(samples, "runbook_bot_info", **info) == 1


@pytest.mark.slow
def test_counts_are_exact_with_concurrent_workers(served: Served) -> None:
    """Many incidents at once, applied by the inbox's workers in parallel and their steps
    run under as many supervisors: no increment is lost."""
    runs = 24
    before = served.scrape()
    for _ in range(runs):
        served.open("svc-ok")
    served.settle()
    after = served.scrape()
    assert executed(before, after, "ok", "success") == runs
    assert delta(before, after, "runbook_step_duration_seconds_count", action="m-ok") == runs
    assert delta(before, after, "runbook_incidents_total", service="svc-ok", matched="yes") == runs


# --- the inbox and the outbox ------------------------------------------------------------


def test_the_queue_gauges_read_the_database_at_scrape(served: Served) -> None:
    served.app.inbox.stop()  # nothing takes items: they wait, durably
    for _ in range(3):
        served.open("svc-ok")
    samples = served.scrape()
    assert value(samples, "runbook_inbox_queued") == 3
    assert value(samples, "runbook_outbox_pending") == 0  # no Slack, no write-back here
    served.app.inbox.start()
    served.settle()
    assert value(served.scrape(), "runbook_inbox_queued") == 0


def test_outbox_sends_and_the_pending_gauge_follow_a_slack_outage(
    served_with_slack: Served, slack: FakeSlack
) -> None:
    served = served_with_slack
    before = served.scrape()
    slack.down(503)
    served.incident("svc-ok")  # root, the step (posted finished), "Runbook finished"
    slack.wait_until(lambda: len(slack.calls) >= 4)  # auth.test, then tries that fail
    during = served.scrape()
    assert value(during, "runbook_outbox_pending") == 3
    assert delta(before, during, "runbook_outbox_sends_total", target="slack", result="retry") >= 2
    assert delta(before, during, "runbook_outbox_sends_total", target="slack", result="sent") == 0

    slack.up()
    assert served.app.outbox.flush(30)
    after = served.scrape()
    assert value(after, "runbook_outbox_pending") == 0
    assert delta(before, after, "runbook_outbox_sends_total", target="slack", result="sent") == 3
    assert delta(before, after, "runbook_outbox_sends_total", target="slack", result="failed") == 0


def test_inbox_items_that_fail_to_apply_are_counted_by_source(served: Served) -> None:
    before = served.scrape()
    incident_id = served.incident("svc-guarded")
    served.app.inbox.put(  # no step has that id: applying it raises, every attempt
        source="slack",
        key=f"test:{uuid.uuid4().hex}",
        incident_id=incident_id,
        kind=InboxKind.APPROVE,
        payload={"step_run_id": "not-a-step", "user": APPROVER, "channel": ""},
    )
    deadline = time.monotonic() + 30
    while [i.status for i in served.app.store.inbox_items(incident_id, source="slack")] != [
        "failed"
    ]:
        assert time.monotonic() < deadline, "the item was not given up"
        time.sleep(0.02)
    after = served.scrape()
    attempts = served.app.inbox.max_attempts
    assert delta(before, after, "runbook_inbox_failures_total", source="slack") == attempts
    assert delta(before, after, "runbook_inbox_failures_total", source="pagerduty") == 0


# --- naming rules ------------------------------------------------------------------------


def test_every_metric_follows_the_naming_rules(served: Served) -> None:
    served.incident("svc-ok")
    # everything GET /metrics serves is one of the declared metrics (nothing from the
    # runtime or another registry); `_created` is prometheus-client's per-series timestamp
    for name, _ in served.scrape():
        declared = metrics.spec(name.removesuffix("_created"))
        assert declared is not None, f"/metrics serves undeclared {name}"
    assert {s.name for s in metrics.SPECS} == {
        family.name for family in metrics.REGISTRY.collect()
    }, "every metric of the registry is declared through SPECS"
    for spec in metrics.SPECS:
        assert spec.name.startswith(metrics.PREFIX), spec.name
        assert re.fullmatch(r"[a-z_]+", spec.name), spec.name
        if spec.kind == "counter":
            assert spec.series == (f"{spec.name}_total",)
        if spec.kind == "histogram" or re.search(r"duration|wait|latency|age", spec.name):
            assert spec.name.endswith("_seconds"), f"{spec.name} measures time: use _seconds"
        assert not set(spec.labels) & metrics.FORBIDDEN_LABELS, spec.name
        assert not any(re.search(r"incident|user|ts$|time", label) for label in spec.labels)
        assert spec.help.strip(), spec.name


def test_metrics_are_documented() -> None:
    doc = (REPO / "docs" / "metrics.md").read_text("utf-8")
    for spec in metrics.SPECS:
        for series in spec.series:
            if spec.kind != "histogram" or series.endswith("_bucket"):
                assert f"`{series}" in doc, f"{series} is missing from docs/metrics.md"
        for label in spec.labels:
            assert label in doc
    # every metric name the docs mention exists (the PromQL examples included)
    for name in set(re.findall(r"\brunbook_[a-z_]+", doc)):
        assert metrics.spec(name) is not None, f"docs/metrics.md names unknown metric {name}"
