"""Every status of the incident state machine, and the transitions between them.

One module, so the whole life of an incident can be read in one sitting (StackStorm keeps
its execution statuses the same way). The values are the strings stored in the database
and queried by operators (`automation_events.status` is the audit vocabulary teams
write reports against), so they never change once released.

    incident   OPEN ⇄ RESOLVED
    run        RUNNING ⇄ WAITING → COMPLETED | ESCALATED | FAILED | CANCELLED
    step run   (automatic: created claimed) RUNNING ─▶ SUCCESS | ALLOWED_FAILURE | FAILED
                                                   | TIMEOUT | ERROR | INTERRUPTED | DRY_RUN
               AWAITING_APPROVAL ─▶ APPROVED ─▶ RUNNING …
                        │              └─▶ BLOCKED | CANCELLED | SUPERSEDED
                        └─▶ REJECTED | EXPIRED | CANCELLED | SUPERSEDED
               (created final: BLOCKED | SKIPPED | ERROR)
    approval   PENDING ─▶ APPROVED | REJECTED | EXPIRED | CANCELLED | VOID
    inbox      (PARKED ─▶) QUEUED ─▶ DONE | IGNORED | FAILED
    outbox     PENDING ─▶ SENT | FAILED | CANCELLED

`check` is the one guard of the table: the store calls it before every status change,
so a transition the table does not allow is a bug that fails loudly instead of a row
quietly rewritten.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import TypeVar


class IncidentStatus(StrEnum):
    OPEN = "open"
    RESOLVED = "resolved"


class RunStatus(StrEnum):
    RUNNING = "running"  # a step is about to start, runs, or the walk goes on
    WAITING = "waiting"  # the current step waits for a human
    COMPLETED = "completed"
    ESCALATED = "escalated"  # stopped on a failure, rejection, expiry or interruption
    FAILED = "failed"  # could not go on at all (its runbook left the catalog)
    CANCELLED = "cancelled"  # the incident resolved first

    @property
    def live(self) -> bool:
        return self in (RunStatus.RUNNING, RunStatus.WAITING)


class Phase(StrEnum):
    MAIN = "main"
    ON_RESOLVE = "on_resolve"


class StepStatus(StrEnum):
    AWAITING_APPROVAL = "awaiting_approval"
    APPROVED = "approved"  # approved; about to be claimed
    RUNNING = "running"  # claimed: its command was handed to an executor
    SUCCESS = "success"
    ALLOWED_FAILURE = "allowed_failure"
    FAILED = "failed"
    TIMEOUT = "timeout"
    ERROR = "error"  # could not be built or started
    BLOCKED = "blocked"
    REJECTED = "rejected"
    EXPIRED = "expired"
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"  # its outcome cannot be known: never re-run
    CANCELLED = "cancelled"
    DRY_RUN = "dry_run"
    SUPERSEDED = "superseded"  # what it would run changed; a new attempt asks again

    @property
    def terminal(self) -> bool:
        return self not in _LIVE_STEP_STATUSES

    @property
    def moves_on(self) -> bool:
        """The run goes to the next step after this result, whatever `on_failure` says."""
        return self in (
            StepStatus.SUCCESS,
            StepStatus.ALLOWED_FAILURE,
            StepStatus.SKIPPED,
            StepStatus.DRY_RUN,
        )

    @property
    def command_started(self) -> bool:
        """A failure after which the command did start (so a rollback has work to undo)."""
        return self in (StepStatus.FAILED, StepStatus.TIMEOUT)


_LIVE_STEP_STATUSES = frozenset(
    {
        StepStatus.AWAITING_APPROVAL,
        StepStatus.APPROVED,
        StepStatus.RUNNING,
    }
)
RESULT_STATUSES = frozenset(
    {
        StepStatus.SUCCESS,
        StepStatus.ALLOWED_FAILURE,
        StepStatus.FAILED,
        StepStatus.TIMEOUT,
        StepStatus.ERROR,
    }
)


class ApprovalStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    CANCELLED = "cancelled"
    VOID = "void"  # what it approved is no longer what would run


class InboxStatus(StrEnum):
    PARKED = "parked"  # about a message whose ts is not known yet: waits for its post
    QUEUED = "queued"
    DONE = "done"
    IGNORED = "ignored"  # understood, and nothing to do (stale, not handled, …)
    FAILED = "failed"  # applying it raised, attempts exhausted; kept for a human


class OutboxStatus(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"  # refused for good by the other side (e.g. channel_not_found)
    CANCELLED = "cancelled"  # made moot before it was sent


class InboxKind(StrEnum):
    """What an inbox item asks of an incident (PagerDuty events keep their own names)."""

    TRIGGERED = "incident.triggered"
    ACKNOWLEDGED = "incident.acknowledged"
    REASSIGNED = "incident.reassigned"
    RESOLVED = "incident.resolved"
    REOPENED = "incident.reopened"
    APPROVE = "step.approve"
    REJECT = "step.reject"
    PAUSE = "step.pause"
    RESUME = "step.resume"
    EXPIRE = "step.expire"  # a timer: the approval deadline passed
    FINISHED = "step.finished"  # an executor: the command's result
    INTERRUPTED = "step.interrupted"  # its outcome cannot be known
    REPAIR = "incident.repair"  # show what was never shown, settle what was left half-done
    CATALOG_LOADED = "catalog.loaded"  # a new catalog: re-check what waits for approval
    WAITING = "step.waiting"  # an executor: the claimed step waits (no runner of its pool)


class Refusal(StrEnum):
    """Why a decision someone sent changed nothing (told to them, privately)."""

    NOT_A_STEP = "not_a_step"
    ALREADY_DECIDED = "already_decided"
    EXPIRED = "expired"
    INCIDENT_CLOSED = "incident_closed"
    UNAUTHORIZED = "unauthorized"
    PAUSED = "paused"
    NOT_PAUSED = "not_paused"
    ALREADY_PAUSED = "already_paused"
    NOT_PENDING = "not_pending"
    STALE = "stale"  # a button naming another step, incident or rendering of the command


class Event(StrEnum):
    """`automation_events.status`: the audit vocabulary (one row per thing that happened)."""

    MATCHED = "matched"
    NO_RUNBOOK = "no_runbook"
    EXECUTED = "executed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ALLOWED_FAILURE = "allowed_failure"
    TIMED_OUT = "timed_out"
    ERROR = "error"
    BLOCKED = "blocked"
    REQUIRES_MANUAL = "requires_manual"
    APPROVED = "approved"
    REJECTED = "rejected"
    EXPIRED = "expired"
    PAUSED = "paused"
    RESUMED = "resumed"
    UNAUTHORIZED = "unauthorized"
    REFUSED = "refused"  # an authorized decision that could not apply (paused, late, …)
    SKIPPED = "skipped"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    SUPERSEDED = "superseded"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    REOPENED = "reopened"
    DRY_RUN = "dry_run"


class Origin(StrEnum):
    """`automation_events.origin`: what produced an audit row. Only the bot's own rows are
    real executions; `runbookctl promote` counts nothing else as evidence."""

    BOT = "bot"  # the bot (and bot.guard's decorators) acting on a real incident
    SIMULATE = "simulate"  # `runbookctl simulate`, with or without --execute
    TEST = "test"  # `runbookctl test`: assumed outcomes, nothing executed


# The audit event a step's final status is recorded as.
RESULT_EVENTS: Mapping[StepStatus, Event] = {
    StepStatus.SUCCESS: Event.SUCCEEDED,
    StepStatus.ALLOWED_FAILURE: Event.ALLOWED_FAILURE,
    StepStatus.FAILED: Event.FAILED,
    StepStatus.TIMEOUT: Event.TIMED_OUT,
    StepStatus.ERROR: Event.ERROR,
    StepStatus.DRY_RUN: Event.DRY_RUN,
    StepStatus.INTERRUPTED: Event.INTERRUPTED,
}


S = TypeVar("S", IncidentStatus, RunStatus, StepStatus, ApprovalStatus, InboxStatus, OutboxStatus)

_STEP_RESULTS = frozenset(RESULT_STATUSES | {StepStatus.INTERRUPTED, StepStatus.DRY_RUN})

TRANSITIONS: Mapping[type, Mapping[StrEnum, frozenset[StrEnum]]] = {
    IncidentStatus: {
        IncidentStatus.OPEN: frozenset({IncidentStatus.RESOLVED}),
        IncidentStatus.RESOLVED: frozenset({IncidentStatus.OPEN}),
    },
    RunStatus: {
        RunStatus.RUNNING: frozenset(
            {
                RunStatus.WAITING,
                RunStatus.COMPLETED,
                RunStatus.ESCALATED,
                RunStatus.FAILED,
                RunStatus.CANCELLED,
            }
        ),
        RunStatus.WAITING: frozenset(
            {RunStatus.RUNNING, RunStatus.ESCALATED, RunStatus.FAILED, RunStatus.CANCELLED}
        ),
    },
    StepStatus: {
        StepStatus.AWAITING_APPROVAL: frozenset(
            {
                StepStatus.APPROVED,
                StepStatus.REJECTED,
                StepStatus.EXPIRED,
                StepStatus.CANCELLED,
                StepStatus.SUPERSEDED,
            }
        ),
        StepStatus.APPROVED: frozenset(
            {StepStatus.RUNNING, StepStatus.BLOCKED, StepStatus.CANCELLED, StepStatus.SUPERSEDED}
        ),
        StepStatus.RUNNING: _STEP_RESULTS,
    },
    ApprovalStatus: {
        ApprovalStatus.PENDING: frozenset(
            {
                ApprovalStatus.APPROVED,
                ApprovalStatus.REJECTED,
                ApprovalStatus.EXPIRED,
                ApprovalStatus.CANCELLED,
                ApprovalStatus.VOID,
            }
        ),
        ApprovalStatus.APPROVED: frozenset({ApprovalStatus.VOID}),
    },
    InboxStatus: {
        InboxStatus.PARKED: frozenset({InboxStatus.QUEUED, InboxStatus.IGNORED}),
        InboxStatus.QUEUED: frozenset({InboxStatus.DONE, InboxStatus.IGNORED, InboxStatus.FAILED}),
    },
    OutboxStatus: {
        OutboxStatus.PENDING: frozenset(
            {OutboxStatus.SENT, OutboxStatus.FAILED, OutboxStatus.CANCELLED}
        ),
    },
}


class TransitionError(RuntimeError):
    """A status change the table does not allow: a bug, never a user error."""


def allowed(current: S, new: S) -> bool:
    return new in TRANSITIONS[type(current)].get(current, frozenset())


def check(current: S, new: S) -> None:
    if not allowed(current, new):
        raise TransitionError(f"{type(current).__name__}: {current} -> {new} is not allowed")


def sources(new: S) -> tuple[S, ...]:
    """Every status from which `new` may be reached (for conditional UPDATEs)."""
    table = TRANSITIONS[type(new)]
    return tuple(sorted((s for s, targets in table.items() if new in targets), key=str))  # type: ignore[misc]
