"""Every Prometheus metric of runbook-bot, in one place (documented in docs/metrics.md).

Naming: prefix ``runbook_``, ``_total`` for counters, ``_seconds`` for durations.
Labels stay low-cardinality: service, action, result, decision, env, source, outcome,
matched. Never an incident id, a user or a timestamp: those belong in the audit log
(``automation_events``), which `runbookctl report` reads.

The metrics live in their own registry (not the process-global default), so the bot
serves exactly these and tests can read them back without interference from imports.
``SPECS`` describes each metric as PromQL sees it; the tests check the Grafana dashboard,
the alert rules and the docs against it, so none of them can name a metric that does not
exist.

prometheus-client's metric objects are thread-safe, so worker threads update them
without a lock of ours.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.exposition import generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

PREFIX = "runbook_"
# Labels that would make a series per incident, person or moment: never use them.
FORBIDDEN_LABELS = frozenset(
    {"incident", "incident_id", "user", "user_id", "actor", "approver", "ts", "timestamp"}
)

# Commands run from 100 ms (a read-only query) to 10 minutes (a rollout).
STEP_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Humans answer in seconds to tens of minutes.
APPROVAL_WAIT_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600)

STEP_RESULTS = ("success", "allowed_failure", "failed", "timeout", "error")
APPROVAL_DECISIONS = ("approved", "rejected", "expired", "unauthorized")
WEBHOOK_SOURCES = ("pagerduty", "slack")
WEBHOOK_OUTCOMES = ("accepted", "duplicate", "rejected")
OUTBOX_RESULTS = ("sent", "retry", "failed")
INBOX_SOURCES = ("pagerduty", "slack", "timer", "executor", "bot")
CATALOG_RELOAD_RESULTS = ("success", "failed", "unchanged")

Kind = Literal["counter", "histogram", "gauge", "info"]


@dataclass(frozen=True)
class MetricSpec:
    """One metric: the name it is declared with, and the series PromQL can select."""

    name: str  # family name: counters without `_total`, info metrics without `_info`
    kind: Kind
    labels: tuple[str, ...]
    help: str

    @property
    def series(self) -> tuple[str, ...]:
        """Sample names in the exposition (not counting the `_created` timestamps)."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        if self.kind == "info":
            return (f"{self.name}_info",)
        return (self.name,)

    @property
    def series_labels(self) -> tuple[str, ...]:
        """Labels a PromQL query may use on this metric's series."""
        if self.kind == "histogram":
            return (*self.labels, "le")
        if self.kind == "info":
            return ("version", "catalog_commit")
        return self.labels


SPECS: list[MetricSpec] = []


def _spec(name: str, kind: Kind, labels: tuple[str, ...], help_text: str) -> str:
    SPECS.append(MetricSpec(name, kind, labels, help_text))
    return name


def _counter(name: str, help_text: str, labels: tuple[str, ...]) -> Counter:
    return Counter(_spec(name, "counter", labels, help_text), help_text, labels, registry=REGISTRY)


def _histogram(
    name: str, help_text: str, labels: tuple[str, ...], buckets: tuple[float, ...]
) -> Histogram:
    return Histogram(
        _spec(name, "histogram", labels, help_text),
        help_text,
        labels,
        buckets=buckets,
        registry=REGISTRY,
    )


def _gauge(name: str, help_text: str) -> Gauge:
    return Gauge(_spec(name, "gauge", (), help_text), help_text, registry=REGISTRY)


def _info(name: str, help_text: str) -> Info:
    return Info(_spec(name, "info", (), help_text), help_text, registry=REGISTRY)


steps_executed = _counter(
    "runbook_steps_executed",
    "Steps whose command was run (or failed to start), automatic or approved, by result: "
    "success, allowed_failure, failed, timeout, error.",
    ("service", "action", "result"),
)
step_duration = _histogram(
    "runbook_step_duration_seconds",
    "Wall time of step commands, from start to exit or kill.",
    ("action",),
    STEP_DURATION_BUCKETS,
)
approvals = _counter(
    "runbook_approvals",
    "Decisions on approval requests of guarded steps: approved, rejected, expired, "
    "unauthorized (a reaction from someone who may not approve; ignored).",
    ("action", "decision"),
)
approval_wait = _histogram(
    "runbook_approval_wait_seconds",
    "Time from an approval request to its decision (approved, rejected, expired).",
    ("action", "decision"),
    APPROVAL_WAIT_BUCKETS,
)
steps_blocked = _counter(
    "runbook_steps_blocked",
    "Steps not offered because the incident's environment is outside the action's "
    "scopes (or the scope lacks a promotion record).",
    ("service", "action", "env"),
)
steps_limited = _counter(
    "runbook_steps_limited",
    "Steps not run because their action reached one of its limits (limit: max_concurrent "
    "or max_per_hour): the circuit breaker; the run escalates.",
    ("action", "limit"),
)
incidents = _counter(
    "runbook_incidents",
    "Incidents received, by whether a runbook matched (matched: yes or no).",
    ("service", "matched"),
)
webhook_deliveries = _counter(
    "runbook_webhook_deliveries",
    "Inbound webhook deliveries by source (pagerduty, slack) and outcome: accepted, "
    "duplicate (already seen, acknowledged and dropped), rejected (bad signature or body).",
    ("source", "outcome"),
)
catalog_reloads = _counter(
    "runbook_catalog_reloads",
    "Checks and reloads of the catalog directory by result: success (a new catalog is "
    "served), failed (it has errors or could not be read; the last good one keeps "
    "serving), unchanged (nothing new).",
    ("result",),
)
pending_approvals = _gauge(
    "runbook_pending_approvals",
    "Approval requests waiting for a human right now (read from the database at scrape time).",
)
inbox_failures = _counter(
    "runbook_inbox_failures",
    "Failed attempts to apply an inbox item (each is retried; after the third the item is "
    "kept as failed for a human), by source: pagerduty, slack, timer, executor.",
    ("source",),
)
outbox_sends = _counter(
    "runbook_outbox_sends",
    "Deliveries of outbox effects by target (slack, pagerduty) and result: sent, retry "
    "(429, 5xx, timeout, outage: tried again later), failed (refused for good).",
    ("target", "result"),
)
inbox_queued = _gauge(
    "runbook_inbox_queued",
    "Inbox items received and not yet applied (read from the database at scrape time).",
)
outbox_pending = _gauge(
    "runbook_outbox_pending",
    "Effects (Slack messages, PagerDuty write-back) committed and not yet delivered.",
)
replicas_alive = _gauge(
    "runbook_replicas_alive",
    "Replicas sharing the PostgreSQL database that were alive at this replica's last "
    "heartbeat (itself included).",
)
replica_leases = Gauge(
    _spec(
        "runbook_replica_leases",
        "gauge",
        ("lease",),
        "1 while this replica holds the lease of a singleton (outbox, timers), else 0.",
    ),
    "1 while this replica holds the lease of a singleton (outbox, timers), else 0.",
    ("lease",),
    registry=REGISTRY,
)
lease_takeovers = _counter(
    "runbook_lease_takeovers",
    "Times this replica took the lease of a singleton (at start, or from a replica that "
    "died or stopped).",
    ("lease",),
)
runners_connected = Gauge(
    _spec(
        "runbook_runners_connected",
        "gauge",
        ("pool",),
        "Pull runners connected per pool: polled or reported within the last 30 seconds.",
    ),
    "Pull runners connected per pool: polled or reported within the last 30 seconds.",
    ("pool",),
    registry=REGISTRY,
)
runner_refusals = _counter(
    "runbook_runner_refusals",
    "Refusals around pull runners, by side (bot: a token it refused; runner: a payload a "
    "runner refused) and reason: unknown_token, revoked_token, wrong_pool, bad_signature, "
    "expired, replayed, not_allowed.",
    ("side", "reason"),
)
bot_info = _info(
    "runbook_bot",
    "Version of the bot and the catalog commit it runs (labels version, catalog_commit).",
)


def service_label(service: str) -> str:
    """Service names come from PagerDuty: keep them, but bound their size."""
    return (service or "unknown")[:64]


_tracked_by: object | None = None  # the bot whose database the gauges read


def track_pending_approvals(count: Callable[[], float], *, owner: object = None) -> None:
    """Read the gauge from the database at scrape time, so it survives restarts."""
    global _tracked_by
    pending_approvals.set_function(count)
    _tracked_by = owner


def track_queues(
    queued: Callable[[], int], pending: Callable[[], int], *, owner: object = None
) -> None:
    global _tracked_by
    inbox_queued.set_function(lambda: float(queued()))
    outbox_pending.set_function(lambda: float(pending()))
    _tracked_by = owner


def untrack(owner: object) -> None:
    """`owner` stops (its database closes): its gauges read 0 rather than fail every
    scrape, unless another bot in this process took them over since."""
    global _tracked_by
    if owner is None or _tracked_by is not owner:
        return
    for gauge in (pending_approvals, inbox_queued, outbox_pending):
        gauge.set_function(lambda: 0.0)
    _tracked_by = None


def set_info(version: str, catalog_commit: str) -> None:
    bot_info.info({"version": version, "catalog_commit": catalog_commit})


def spec(name: str) -> MetricSpec | None:
    """The metric a series name (``runbook_steps_executed_total``, ``…_bucket``) belongs to."""
    return next((s for s in SPECS if name == s.name or name in s.series), None)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
