"""The safety decisions of DESIGN.md section 3, as pure functions.

Everything that decides whether a command may run lives here, so it can be read in one
sitting and tested exhaustively. Nothing in this module does I/O: callers pass in what
they know (the action, the incident's environment, the approval's state, the clock).

A step may run only when all of these hold, checked at the moment it is about to run:
  1. the incident's environment is in the action's scopes (else **blocked**: no approval
     is offered, the thread says how to promote);
  2. the action is safe for automation, or an authorized approver approved this very step
     before it expired and nobody rejected it;
  3. this step was not already claimed (enforced by the store's atomic claim);
  4. the incident is still open.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from bot.catalog.model import Action, Approvers, Settings

DecisionKind = Literal["blocked", "needs_approval", "auto"]
ApprovalState = Literal["none", "pending", "approved", "rejected", "expired", "cancelled"]


@dataclass(frozen=True)
class Decision:
    kind: DecisionKind
    reason: str

    @property
    def blocked(self) -> bool:
        return self.kind == "blocked"


def promote_hint(action_id: str, env: str) -> str:
    return (
        f"runbookctl promote --action {action_id} --env {env} "
        "--evidence-url https://…  (after enough successful runs in lower environments)"
    )


def decide(action: Action, env: str, settings: Settings) -> Decision:
    """What may happen with this action for an incident in `env`, before any human acts."""
    if action.external:
        # A bot.guard decorator asking: its `allowed_envs` (the same `decide`, in the
        # asking program) checked the environment; here a person must approve.
        return Decision("needs_approval", "asked by a bot.guard decorator: a person approves")
    if not env:
        return Decision(
            "blocked",
            "the incident has no environment, so no scope can allow it: map the service "
            "under `services` in the catalog or set RUNBOOK_ENV",
        )
    if env not in settings.environment_names:
        return Decision(
            "blocked",
            f"environment {env!r} is not declared in the catalog "
            f"({', '.join(settings.environment_names)})",
        )
    if env not in action.safety.scopes:
        scopes = ", ".join(action.safety.scopes) or "none"
        return Decision(
            "blocked",
            f"{action.id} is not allowed in {env} (scopes: {scopes}). "
            f"To allow it: {promote_hint(action.id, env)}",
        )
    if settings.is_production(env):
        promotion = action.safety.promotion_for(env)
        if promotion is None or not promotion.evidence_url.startswith("https://"):
            return Decision(
                "blocked",
                f"{action.id} is scoped to production environment {env} without a promotion "
                f"record. To allow it: {promote_hint(action.id, env)}",
            )
    if action.safety.requires_approval:
        return Decision("needs_approval", "requires approval by an authorized responder")
    return Decision("auto", "safe for automation: runs without approval")


@dataclass(frozen=True)
class RunCheck:
    allowed: bool
    reason: str


def may_run(
    decision: Decision,
    *,
    approval: ApprovalState,
    incident_open: bool,
    approval_expired: bool = False,
) -> RunCheck:
    """The last check before a command starts. The claim (rule 3) is the store's job."""
    if not incident_open:
        return RunCheck(False, "the incident is no longer open")
    if decision.kind == "blocked":
        return RunCheck(False, decision.reason)
    if decision.kind == "auto":
        return RunCheck(True, decision.reason)
    if approval == "approved" and not approval_expired:
        return RunCheck(True, "approved")
    if approval == "approved":
        return RunCheck(False, "the approval came after the request expired")
    reasons = {
        "none": "no approval was requested",
        "pending": "waiting for approval",
        "rejected": "rejected by a responder",
        "expired": "the approval request expired",
        "cancelled": "the approval request was cancelled",
    }
    return RunCheck(False, reasons[approval])


MemberOf = Callable[[str, str], bool]  # (user id, group id) -> is the user in the group


@dataclass(frozen=True)
class Authorization:
    allowed: bool
    reason: str


def authorize(
    user: str,
    approvers: Approvers,
    *,
    member_of: MemberOf,
    bot_users: Collection[str] = (),
) -> Authorization:
    """May `user` approve, reject or pause a step guarded by `approvers`?"""
    if not user:
        return Authorization(False, "the reaction has no user")
    if user in bot_users:
        return Authorization(False, "the bot's own reactions never count")
    if not approvers:
        return Authorization(
            False,
            "nobody is allowed to approve this step: declare `approvers` on the catalog, "
            "the runbook or the action",
        )
    if user in approvers.users:
        return Authorization(True, "listed approver")
    for group in approvers.groups:
        if member_of(user, group):
            return Authorization(True, f"member of {group}")
    return Authorization(False, f"<@{user}> is not among the approvers of this step")


def may_approve(
    user: str, *, approved_by: Collection[str], starter: str, self_approval: bool
) -> Authorization:
    """The two-person rule and no self-approval, for an approver already authorized:
    each approval of a request comes from a different person, and whoever started a
    manual run does not approve its steps unless the action allows it."""
    if user in approved_by:
        return Authorization(
            False, "you already approved this step; it needs another approver as well"
        )
    if starter and user == starter and not self_approval:
        return Authorization(
            False,
            "you started this run, so another approver must approve its steps (an action "
            "may allow it with `safety.self_approval: true`)",
        )
    return Authorization(True, "")


def approval_deadline_passed(now: float, expires_at: float, paused_since: float | None) -> bool:
    """A paused request does not expire; its deadline moves by the pause when resumed."""
    if paused_since is not None:
        return False
    return now >= expires_at


def resumed_deadline(expires_at: float, paused_since: float, now: float) -> float:
    return expires_at + max(0.0, now - paused_since)
