"""Every Prometheus metric of runbook-bot, in one place.

Naming: prefix ``runbook_``, ``_total`` for counters, ``_seconds`` for durations.
Labels stay low-cardinality: service, action, result, decision, env, source, outcome.
Never an incident id, a user or a timestamp.

The metrics live in their own registry (not the process-global default), so the bot
serves exactly these and tests can read them back without interference from imports.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# Commands run from 100 ms (a read-only query) to 10 minutes (a rollout).
STEP_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Humans answer in seconds to tens of minutes.
APPROVAL_WAIT_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)

STEP_RESULTS = ("success", "allowed_failure", "failed", "timeout", "error")

steps_executed = Counter(
    "runbook_steps_executed",
    "Steps whose command ran, automatic or approved, by result.",
    ["service", "action", "result"],
    registry=REGISTRY,
)
step_duration = Histogram(
    "runbook_step_duration_seconds",
    "Wall time of step commands.",
    ["action"],
    buckets=STEP_DURATION_BUCKETS,
    registry=REGISTRY,
)
approvals = Counter(
    "runbook_approvals",
    "Approval decisions on guarded steps (approved, rejected, expired, unauthorized).",
    ["action", "decision"],
    registry=REGISTRY,
)
approval_wait = Histogram(
    "runbook_approval_wait_seconds",
    "Time from an approval request to its decision.",
    ["action", "decision"],
    buckets=APPROVAL_WAIT_BUCKETS,
    registry=REGISTRY,
)
steps_blocked = Counter(
    "runbook_steps_blocked",
    "Steps not offered because the incident's environment is outside the action's scopes.",
    ["service", "action", "env"],
    registry=REGISTRY,
)
incidents = Counter(
    "runbook_incidents",
    "Incidents received, by whether a runbook matched.",
    ["service", "matched"],
    registry=REGISTRY,
)
webhook_deliveries = Counter(
    "runbook_webhook_deliveries",
    "Inbound webhook deliveries by source and outcome (accepted, duplicate, rejected).",
    ["source", "outcome"],
    registry=REGISTRY,
)
pending_approvals = Gauge(
    "runbook_pending_approvals",
    "Approval requests waiting for a human right now.",
    registry=REGISTRY,
)
bot_info = Info(
    "runbook_bot",
    "Version of the bot and of the catalog it runs.",
    registry=REGISTRY,
)


def service_label(service: str) -> str:
    """Service names come from PagerDuty: keep them, but bound their size."""
    return (service or "unknown")[:64]


def track_pending_approvals(count: Callable[[], float]) -> None:
    """Read the gauge from the database at scrape time, so it survives restarts."""
    pending_approvals.set_function(count)


def set_info(version: str, catalog_commit: str) -> None:
    bot_info.info({"version": version, "catalog_commit": catalog_commit})


def exposition() -> bytes:
    return generate_latest(REGISTRY)
