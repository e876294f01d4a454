"""The views the engine renders for chat, as plain data.

The engine decides *what* to say (a view of the incident or of a step) and commits it to
the outbox (``bot.effects``); each transport decides *how* it looks: Block Kit in Slack,
text in the terminal. Transports hold no business rules.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class IncidentView:
    incident_id: str
    title: str
    service: str
    urgency: str
    env: str
    link: str
    channel: str
    runbook_id: str | None
    runbook_title: str
    catalog_version: str
    step_count: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StepView:
    """Everything a responder needs to judge one step, as it stands now."""

    incident_id: str
    step_run_id: int
    step_id: str
    action_id: str
    index: int  # 1-based position in the runbook
    total: int
    name: str
    description: str
    command: str  # rendered, secrets masked
    shell: bool
    requires_approval: bool
    scopes: tuple[str, ...]
    env: str
    expect: tuple[tuple[str, bool], ...]  # (pattern, allow_failure)
    state: str  # a step run status: awaiting_approval, approved, running, success, ...
    reason: str  # why this decision (blocked because…, skipped because…)
    phase: str = "main"
    decision: str = ""  # the policy's, when the step was offered: auto | needs_approval | blocked
    approvers_users: tuple[str, ...] = ()
    approvers_groups: tuple[str, ...] = ()
    expires_at: float | None = None
    paused_by: str = ""
    actor: str = ""  # who approved / rejected
    detail: str = ""  # result explanation
    output: str = ""  # excerpt, masked and capped
    duration: float | None = None
    exit_code: int | None = None
    fingerprint: str = ""  # of `command`: an approval applies to what was shown
    attempt: int = 1
    production: bool = False  # `env` is a production environment: Approve asks to confirm
    decided_at: float | None = None  # when `actor` approved / rejected
    approved_by: tuple[str, ...] = ()  # who approved so far (the two-person rule)
    approvals_required: int = 1  # distinct approvers needed
