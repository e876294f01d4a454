"""User-facing texts, in one place. Plain text here; the Slack adapter adds Block Kit.

Never put a raw exception or a stack trace in these: people read them mid-incident.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from bot.catalog.model import Catalog, KubernetesPlacement, Placement, RunnerPlacement
from bot.chat.base import IncidentView, StepView
from bot.states import Refusal, StepStatus

# Every step status, as the thread shows it (a test checks none is missing).
STATE_LABELS: Mapping[StepStatus, str] = {
    StepStatus.AWAITING_APPROVAL: "⏳ awaiting approval",
    StepStatus.APPROVED: "👍 approved",
    StepStatus.RUNNING: "⚙️ running",
    StepStatus.SUCCESS: "✅ succeeded",
    StepStatus.ALLOWED_FAILURE: "☑️ allowed failure",
    StepStatus.FAILED: "❌ failed",
    StepStatus.TIMEOUT: "⌛ timed out",
    StepStatus.ERROR: "💥 could not run",
    StepStatus.BLOCKED: "⛔ blocked",
    StepStatus.REJECTED: "🚫 rejected",
    StepStatus.EXPIRED: "⌛ approval expired",
    StepStatus.SKIPPED: "⏭️ skipped",
    StepStatus.INTERRUPTED: "⚠️ interrupted",
    StepStatus.CANCELLED: "✖️ cancelled",
    StepStatus.DRY_RUN: "🧪 would run (dry run)",
    StepStatus.SUPERSEDED: "🔁 superseded",
}
# States whose status line reports a command's result (with its duration).
_RESULT_STATES = frozenset(
    {
        StepStatus.SUCCESS,
        StepStatus.ALLOWED_FAILURE,
        StepStatus.FAILED,
        StepStatus.TIMEOUT,
        StepStatus.ERROR,
        StepStatus.DRY_RUN,
    }
)

# How the policy's decision on a step (bot.policy.DecisionKind) reads in the thread.
DECISION_LABELS = {
    "auto": "auto-run",
    "needs_approval": "needs approval",
    "blocked": "blocked",
}


@dataclass(frozen=True)
class ReactionNames:
    """The reactions offered under a guarded step, one per choice.

    The text names exactly these, so it must get the ones the adapter adds: in Slack the
    first configured alias of each (RUNBOOK_APPROVE_REACTIONS, …); the console shows the
    defaults.
    """

    approve: str = "white_check_mark"
    reject: str = "x"
    pause: str = "double_vertical_bar"


DEFAULT_REACTIONS = ReactionNames()


def incident_text(view: IncidentView) -> str:
    lines = [
        f"🚨 {view.title}",
        f"Service: {view.service}   Urgency: {view.urgency or 'n/a'}   "
        f"Environment: {view.env or 'unknown'}",
    ]
    if view.link:
        lines.append(f"PagerDuty: {view.link}")
    if view.runbook_id:
        lines.append(
            f"Runbook: {view.runbook_title} ({view.runbook_id}, {view.step_count} steps, "
            f"catalog {view.catalog_version})"
        )
    else:
        lines.append(no_runbook_text(view))
    return "\n".join(lines)


def no_runbook_text(view: IncidentView) -> str:
    return (
        "No runbook matches this incident. To add one, create a runbook in the catalog "
        f"with `match.services: [{view.service}]` and a symptom pattern for this title, "
        "then check it with `runbookctl simulate`."
    )


def when_text(timestamp: float | None) -> str:
    if timestamp is None:
        return ""
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).strftime("%H:%M:%S UTC")


def approvers_text(view: StepView) -> str:
    who = [f"<@{u}>" for u in view.approvers_users] + [
        f"<!subteam^{g}>" for g in view.approvers_groups
    ]
    return ", ".join(who) if who else "nobody (declare approvers in the catalog)"


def safety_text(view: StepView) -> str:
    approval = "requires approval" if view.requires_approval else "safe for automation"
    shell = ", runs through a shell" if view.shell else ""
    return f"{approval}; scopes: {', '.join(view.scopes) or 'none'}{shell}"


def expect_text(view: StepView) -> str:
    if not view.expect:
        return "exit code 0 (no expected output declared)"
    parts = [f"/{p}/" + (" (allowed failure)" if allowed else "") for p, allowed in view.expect]
    return ", ".join(parts)


def state_label(state: str) -> str:
    """How a step status reads in the thread (an unknown one as it is)."""
    try:
        return STATE_LABELS[StepStatus(state)]
    except (ValueError, KeyError):
        return state


def decision_text(view: StepView) -> str:
    """What the policy decided when the step was offered, and why.

    Empty for a skipped step (its `when`, not the policy, kept it from running; the status
    line says why) and for a view without a decision.
    """
    label = DECISION_LABELS.get(view.decision)
    if label is None or view.state == StepStatus.SKIPPED:
        return ""
    if view.decision == "blocked":
        return f"{label}: {view.reason}" if view.reason else label
    return f"{label} ({view.reason})" if view.reason else label


def status_line(view: StepView, reactions: ReactionNames) -> str:
    label = state_label(view.state)
    if view.state == StepStatus.AWAITING_APPROVAL:
        extra = f" — {approvers_text(view)} may approve until {when_text(view.expires_at)}"
        if view.paused_by:
            extra = f" — paused by <@{view.paused_by}>; the deadline waits"
        if view.approvals_required > 1:
            so_far = ", ".join(f"<@{u}>" for u in view.approved_by) or "nobody yet"
            extra += (
                f" — needs {view.approvals_required} different approvers; approved so far "
                f"by {so_far} ({len(view.approved_by)} of {view.approvals_required})"
            )
        return (
            f"{label}{extra}. Use the buttons, or react :{reactions.approve}: to approve, "
            f":{reactions.reject}: to reject, :{reactions.pause}: to pause."
        )
    if view.state in (StepStatus.APPROVED, StepStatus.RUNNING) and view.actor:
        return f"{label} (approved by {decided_by(view)})"
    if view.state == StepStatus.REJECTED and view.actor:
        return f"{label} by {decided_by(view)}"
    if view.state == StepStatus.BLOCKED:
        # Blocked when offered: the decision line gives the reason. Blocked by the last
        # check before running (a reloaded catalog took the scope away): the check's
        # reason is in `detail`, and `reason` still explains the earlier decision.
        why = view.detail or ("" if decision_text(view) else view.reason)
        return f"{label}: {why}" if why else label
    if view.state == StepStatus.SKIPPED:
        return f"{label}: {view.reason}"
    if view.state in _RESULT_STATES:
        took = f" in {view.duration:.2f}s" if view.duration else ""
        by = f", approved by {decided_by(view)}" if view.actor else ""
        return f"{label}{took}{by}: {view.detail}"
    if view.detail:
        return f"{label}: {view.detail}"
    return label


def decided_by(view: StepView) -> str:
    """Who decided a step, and when: what replaces the buttons once it is decided."""
    at = when_text(view.decided_at)
    approvers = view.approved_by if view.state != StepStatus.REJECTED else ()
    who = [f"<@{u}>" for u in approvers if u != view.actor]
    names = " and ".join([", ".join(who), f"<@{view.actor}>"] if who else [f"<@{view.actor}>"])
    return f"{names} at {at}" if at else names


def fingerprint_text(view: StepView) -> str:
    return (
        f"Fingerprint `{view.fingerprint}`: an approval applies to this command only; "
        "if it changes, a new request is posted."
    )


def step_title(view: StepView) -> str:
    phase = "On resolve " if view.phase == "on_resolve" else ""
    name = f" — {view.name}" if view.name else ""
    return f"{phase}Step {view.index}/{view.total}: {view.step_id}{name}"


def step_text(view: StepView, reactions: ReactionNames) -> str:
    lines = [
        step_title(view),
        f"$ {view.command}",
        f"Safety: {safety_text(view)}",
    ]
    if view.fingerprint and view.state == StepStatus.AWAITING_APPROVAL:
        lines.append(fingerprint_text(view))
    decision = decision_text(view)
    if decision:
        lines.append(f"Decision: {decision}")
    lines += [f"Expect: {expect_text(view)}", status_line(view, reactions)]
    if view.output:
        lines.append("Output:\n" + view.output.rstrip())
    return "\n".join(lines)


PRODUCTION_CONFIRM = (
    "This runs in *{env}* (production), exactly as shown (fingerprint `{fingerprint}`):"
)
CLICK_REFUSED = "That click changed nothing: {reason}."

DECIDED_NOTE = "Your decision on {step} changed nothing: {reason}."

REOPENED_NOTE = (
    "Incident reopened. Steps already run are not repeated; re-run them by hand or "
    "trigger a new incident."
)
CANCELLED_BY_RESOLVE = "the incident resolved"
EXPIRED_DETAIL = "the request expired"
INTERRUPTED = (
    "the bot stopped while this step was running and its result could not be recovered; "
    "it was not re-run. Check its effect and continue by hand."
)


def limit_reached(action: str, limit: str, allowed: int, now: int) -> str:
    """Why a step was not run: its action reached one of its limits."""
    if limit == "max_concurrent":
        what = f"{now} of its steps are running (limits.max_concurrent: {allowed})"
    else:
        what = f"{now} of its steps started in the last hour (limits.max_per_hour: {allowed})"
    return (
        f"not run: {action} reached its limit, {what}. A remediation firing this often is "
        "not fixing anything: look at the cause, and run it by hand if it is still needed."
    )


def guard_never_reported(seconds: float) -> str:
    return (
        f"the program that asked was approved but did not report its function's result "
        f"within {seconds / 60:g} minutes (it may have died); whether the function ran is "
        "not known. Check its effect and continue by hand."
    )


SUPERSEDED_DETAIL = (
    "what this step would run changed after it was approved; the approval is void and "
    "a new request follows"
)


def executor_unavailable(placement: Placement, where: str = "this bot") -> str:
    """Why a step did not run: its action's executor is not available `where`."""
    if isinstance(placement, KubernetesPlacement):
        return (
            f"this action runs as a Kubernetes Job (namespace {placement.namespace}, service "
            f"account {placement.service_account}) and {where} has no Kubernetes executor "
            "configured; nothing ran. Run it by hand, or deploy the bot with Kubernetes access."
        )
    if isinstance(placement, RunnerPlacement):
        return (
            f"this action runs on a pull runner of pool {placement.pool}, which {where} does "
            "not reach; nothing ran."
        )
    return f"this action runs on the bot's own host, which {where} is not; nothing ran."


def runner_waiting(pool: str, timeout: float) -> str:
    return (
        f"No runner of pool `{pool}` is connected: this step waits for one, up to "
        f"{timeout:g}s, then escalates. Nothing runs until a runner of the pool takes it."
    )


def runner_none_took(pool: str, timeout: float) -> str:
    return f"no runner of pool {pool} took this step within {timeout:g}s; it did not run"


RUNNER_INCIDENT_CLOSED = "the incident resolved before a runner took this step; it did not run"


def runner_refused(pool: str, reason: str) -> str:
    return f"the runner of pool {pool} refused this step ({reason}); it did not run"


def runner_lost(pool: str) -> str:
    return (
        f"the runner of pool {pool} that had this step stopped answering; its outcome is "
        "unknown and it was not re-run. Check its effect and continue by hand."
    )


_REFUSALS: Mapping[Refusal, str] = {
    Refusal.NOT_A_STEP: "this message is not a step of a runbook",
    Refusal.ALREADY_DECIDED: "this step was already decided ({status})",
    Refusal.EXPIRED: "this approval request has expired",
    Refusal.INCIDENT_CLOSED: "the incident is no longer open",
    Refusal.UNAUTHORIZED: "{reason}",
    Refusal.PAUSED: "paused by <@{by}>; press Resume (or remove :double_vertical_bar:) first",
    Refusal.NOT_PAUSED: "it is not paused",
    Refusal.ALREADY_PAUSED: "already paused by <@{by}>",
    Refusal.NOT_PENDING: "there is no pending approval to pause or resume",
    Refusal.STALE: (
        "that button belongs to another step or to an earlier rendering of its command; "
        "use the buttons on the step's latest message"
    ),
}


def refusal_text(refusal: Refusal | str, **details: object) -> str:
    """Why a decision changed nothing, for the person who sent it."""
    return _REFUSALS[Refusal(refusal)].format(**{"status": "", "reason": "", "by": "", **details})


# Written to PagerDuty (incident notes, plain text); the sender appends where the thread is.
_WRITEBACK_PHASES = {"main": "steps", "on_resolve": "follow-ups on resolve"}
_WRITEBACK_STATUS = {"completed": "finished", "escalated": "stopped", "failed": "failed"}


def writeback_note(*, runbook: str, phase: str, status: str, summary: str) -> str:
    return (
        f"runbook-bot: runbook {runbook} ({_WRITEBACK_PHASES.get(str(phase), 'steps')}) "
        f"{_WRITEBACK_STATUS.get(str(status), str(status))}. {summary}"
    )


# Logged once at start, at WARNING, when incidents of some services would get no
# environment (DESIGN.md section 3: the bot never guesses one; it says so, loudly).
UNMAPPED_SERVICES_WARNING = (
    "NO ENVIRONMENT for {count} service(s) of the catalog: {services}. RUNBOOK_ENV is not "
    "set and the catalog's `services:` mapping does not name them, so every step of their "
    "incidents will be BLOCKED and the incident escalated. Fix: map each one under "
    "`services:` in the catalog settings (e.g. `{example}: staging`), or set RUNBOOK_ENV."
)
CATCH_ALL_NO_ENVIRONMENT_WARNING = (
    'NO ENVIRONMENT for services only a catch-all runbook (`services: ["*"]`) matches: '
    "{runbooks}. RUNBOOK_ENV is not set, so incidents of any service not under `services:` "
    "will have every step BLOCKED. Fix: set RUNBOOK_ENV, or map those services under "
    "`services:`."
)


def environment_warnings(catalog: Catalog, default_env: str | None) -> list[str]:
    """The start-up warnings about services whose incidents would get no environment."""
    from bot.catalog.environment import catch_all_runbooks, unmapped_services

    if default_env:
        return []
    found: list[str] = []
    missing = unmapped_services(catalog, default_env)
    if missing:
        found.append(
            UNMAPPED_SERVICES_WARNING.format(
                count=len(missing), services=", ".join(missing), example=missing[0]
            )
        )
    catch_all = catch_all_runbooks(catalog)
    if catch_all:
        found.append(CATCH_ALL_NO_ENVIRONMENT_WARNING.format(runbooks=", ".join(catch_all)))
    return found


# `runbookctl simulate` without --env, a mapping or RUNBOOK_ENV.
SIMULATE_NO_ENVIRONMENT = (
    "Environment: unknown — {detail}. To simulate it, map {service!r} under `services:` in "
    "the catalog settings, or pass --env ENV (or set RUNBOOK_ENV)."
)
