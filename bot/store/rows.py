"""Rows as typed, frozen values: what the store hands out instead of ``dict[str, Any]``.

Each class mirrors one table; `from_row` builds it from a database row (a mapping of
column names), converting status strings to their enums and JSON columns to values.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Self

from bot.states import (
    ApprovalStatus,
    InboxStatus,
    IncidentStatus,
    OutboxStatus,
    Phase,
    RunStatus,
    StepStatus,
)


def _json(value: Any) -> Any:
    if value is None or value == "":
        return {}
    return json.loads(value) if isinstance(value, str) else value


class _Row:
    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Self:
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: v for k, v in row.items() if k in names})


@dataclass(frozen=True)
class Incident(_Row):
    id: str
    title: str
    service: str
    status: IncidentStatus
    service_id: str = ""
    urgency: str = ""
    priority: str = ""
    env: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    link: str = ""
    runbook_id: str | None = None
    catalog_commit: str = ""
    channel: str = ""
    thread_ts: str | None = None
    state_changed_at: str | None = None  # PagerDuty's occurred_at of the last state change
    started_by: str = ""  # who started a manual run ("" for a page)
    created_at: float = 0.0
    updated_at: float = 0.0
    resolved_at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", IncidentStatus(self.status))
        object.__setattr__(self, "details", _json(self.details))
        for name in (
            "service_id", "urgency", "priority", "env", "link", "catalog_commit", "started_by",
        ):  # fmt: skip
            if getattr(self, name) is None:
                object.__setattr__(self, name, "")
        if self.channel is None:
            object.__setattr__(self, "channel", "")

    @property
    def open(self) -> bool:
        return self.status is IncidentStatus.OPEN


@dataclass(frozen=True)
class Run(_Row):
    id: int
    incident_id: str
    runbook_id: str
    phase: Phase
    status: RunStatus
    cursor: int
    rollback_of: int | None = None
    catalog_commit: str = ""
    started_at: float = 0.0
    finished_at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))
        object.__setattr__(self, "status", RunStatus(self.status))


@dataclass(frozen=True)
class StepRun(_Row):
    id: int
    run_id: int
    incident_id: str
    step_index: int
    step_id: str
    action: str
    attempt: int
    status: StepStatus
    decision: str = ""
    reason: str = ""
    command: str = ""
    exit_code: int | None = None
    output: str = ""
    detail: str = ""
    runner: str = ""
    owner: str = ""  # the replica that claimed it (PostgreSQL; "" on SQLite)
    created_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    duration: float | None = None
    catalog_commit: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", StepStatus(self.status))
        for name in ("decision", "reason", "command", "output", "detail", "runner", "owner"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, "")


@dataclass(frozen=True)
class Approval(_Row):
    id: int
    step_run_id: int
    incident_id: str
    action: str
    status: ApprovalStatus
    approvers: Mapping[str, Any] = field(default_factory=dict)  # {"users": [...], "groups": [...]}
    requested_at: float = 0.0
    expires_at: float = 0.0
    paused_at: float | None = None
    paused_by: str | None = None
    decided_by: str | None = None
    decided_at: float | None = None
    fingerprint: str = ""
    catalog_commit: str = ""
    required: int = 1  # distinct approvers needed
    approved_by: tuple[str, ...] = ()  # who approved so far, in order
    starter: str = ""  # who started the manual run ("" for a page)
    self_approval: bool = False  # may `starter` approve?

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", ApprovalStatus(self.status))
        object.__setattr__(self, "approvers", _json(self.approvers))
        if self.fingerprint is None:
            object.__setattr__(self, "fingerprint", "")
        approved = self.approved_by
        if isinstance(approved, str):
            approved = json.loads(approved) if approved else []
        object.__setattr__(self, "approved_by", tuple(str(u) for u in approved or ()))
        object.__setattr__(self, "required", int(self.required or 1))
        object.__setattr__(self, "self_approval", bool(self.self_approval))
        object.__setattr__(self, "starter", self.starter or "")

    @property
    def approver_users(self) -> tuple[str, ...]:
        return tuple(self.approvers.get("users", ()))

    @property
    def approver_groups(self) -> tuple[str, ...]:
        return tuple(self.approvers.get("groups", ()))


@dataclass(frozen=True)
class InboxItem(_Row):
    """One thing that can change an incident, as received: applied in `id` order."""

    id: int
    source: str
    key: str
    incident_id: str
    kind: str
    payload: Mapping[str, Any]
    received_at: float
    status: InboxStatus = InboxStatus.QUEUED
    attempts: int = 0
    detail: str = ""
    catalog_commit: str = ""
    alt_key: str | None = None
    processed_at: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", InboxStatus(self.status))
        object.__setattr__(self, "payload", _json(self.payload))
        if self.detail is None:
            object.__setattr__(self, "detail", "")
        if self.catalog_commit is None:
            object.__setattr__(self, "catalog_commit", "")


@dataclass(frozen=True)
class OutboxItem(_Row):
    """One effect to deliver (a Slack message, a PagerDuty note, …), in `id` order per lane.

    `lane` is what orders and paces deliveries: a Slack channel, or one incident's
    PagerDuty write-back. `key` names the message an effect is about (``step:42``), so
    later renderings of it coalesce and updates find the message's `ts`.
    """

    id: int
    incident_id: str
    target: str  # "slack" | "pagerduty"
    lane: str
    kind: str
    payload: Mapping[str, Any]
    status: OutboxStatus = OutboxStatus.PENDING
    key: str | None = None
    version: int = 1
    attempts: int = 0
    next_at: float = 0.0
    error: str = ""
    ts: str | None = None  # the Slack message, once posted
    posted_channel: str | None = None  # the channel id Slack answered with
    created_at: float = 0.0
    sent_at: float | None = None
    # Filled in by `Store.outbox_heads` for the sender: where the message or thread is.
    target_ts: str | None = None
    target_channel: str | None = None
    target_failed: bool = False  # the message this is about was refused, or never queued
    thread_ts: str | None = None
    thread_channel: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", OutboxStatus(self.status))
        object.__setattr__(self, "payload", _json(self.payload))
        if self.error is None:
            object.__setattr__(self, "error", "")


@dataclass(frozen=True)
class RunnerToken(_Row):
    """A pull runner's credential (only its sha256 is stored)."""

    id: int
    pool: str
    name: str
    token_sha256: str
    created_at: float
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None


@dataclass(frozen=True)
class RunnerJob(_Row):
    """A claimed step for a runner pool, queued or leased (``bot.hub``)."""

    job_id: str
    pool: str
    action: str
    step_run_id: int
    attempt: int
    incident_id: str
    phase: str
    payload: str  # the signed message, as sent
    state: str  # 'queued' or 'leased'
    queued_at: float
    wait_until: float
    token_id: int | None = None
    lease_until: float | None = None


@dataclass(frozen=True)
class RunnerRefusal(_Row):
    """One refusal: by the bot (a token) or by a runner (a payload)."""

    id: int
    at: float
    side: str  # 'bot' or 'runner'
    reason: str
    pool: str = ""
    token_id: int | None = None
    job_id: str = ""
    detail: str = ""
