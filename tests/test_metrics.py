"""Metrics read back from the real `GET /metrics` of the bot, after real runs.

The bot app (`bot.server.BotApp`) is served by a real waitress server on loopback; steps
are real subprocesses started by the engine the app built. The registry is module-global,
so every assertion is on the change a test caused (a delta), never on absolute values.
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
from prometheus_client.parser import text_string_to_metric_families
from waitress.server import create_server

from bot import __version__, metrics
from bot.config import Config, Secret
from bot.engine import Incident
from bot.pagerduty import sign
from bot.server import BotApp

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

    def incident(self, service: str, env: str = "") -> str:
        incident_id = f"T-{uuid.uuid4().hex[:10]}"
        self.app.engine.open_incident(
            Incident(id=incident_id, title="metrics test", service=service, env=env)
        )
        return incident_id

    def step_run_id(self, incident_id: str) -> int:
        (step_run,) = self.app.store.step_runs_of(incident_id)
        return int(step_run["id"])


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


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    catalog = write_catalog(tmp_path / "catalog")
    app = BotApp(
        Config(
            catalog=str(catalog),
            db=str(tmp_path / "bot.db"),
            env="staging",
            workers=8,
            pagerduty_webhook_secret=Secret(WEBHOOK_SECRET),
        )
    )
    server = create_server(app.wsgi, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, name="test-waitress", daemon=True)
    thread.start()
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

    served.app.engine.catalog = load_catalog(root)
    before = served.scrape()
    incident_id = served.incident("svc-templated")
    after = served.scrape()
    assert [s["status"] for s in served.app.store.step_runs_of(incident_id)] == ["error"]
    assert executed(before, after, "templated", "error") == 1


def test_approved_and_rejected_steps_and_the_pending_gauge(served: Served) -> None:
    before = served.scrape()
    approved = served.incident("svc-guarded")
    rejected = served.incident("svc-guarded")
    waiting = served.scrape()
    assert delta(before, waiting, "runbook_pending_approvals") == 2
    # nothing ran yet: a guarded step counts only once it is approved and run
    assert executed(before, waiting, "guarded", "success") == 0

    outcome = served.app.engine.approve(served.step_run_id(approved), "U0STRANGER")
    assert not outcome.ok
    assert served.app.engine.approve(served.step_run_id(approved), APPROVER).ok
    assert served.app.engine.reject(served.step_run_id(rejected), APPROVER).ok
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
    time.sleep(0.2)  # past the action's 100 ms approval timeout
    assert served.app.engine.expire_due() == 1
    after = served.scrape()
    assert served.app.store.step_runs_of(incident_id)[0]["status"] == "expired"
    assert decided(before, after, "expiring", "expired") == 1
    assert waited(before, after, "expiring", "expired") == 1
    assert executed(before, after, "expiring", "success") == 0


def test_steps_blocked_by_scope(served: Served) -> None:
    before = served.scrape()
    incident_id = served.incident("svc-ok", env="prod")
    after = served.scrape()
    assert served.app.store.step_runs_of(incident_id)[0]["status"] == "blocked"
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
    """Steps run on the bot's own worker pool, many at once: no increment is lost."""
    runs = 24
    before = served.scrape()
    futures = [served.app.pool.submit(served.incident, "svc-ok") for _ in range(runs)]
    for future in futures:
        assert future is not None
        assert future.result(timeout=60) is not None, "the incident failed (see the log)"
    after = served.scrape()
    assert executed(before, after, "ok", "success") == runs
    assert delta(before, after, "runbook_step_duration_seconds_count", action="m-ok") == runs
    assert delta(before, after, "runbook_incidents_total", service="svc-ok", matched="yes") == runs


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
