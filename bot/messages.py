"""User-facing texts, in one place. Plain text here; the Slack adapter adds Block Kit.

Never put a raw exception or a stack trace in these: people read them mid-incident.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from bot.catalog.model import Catalog
from bot.chat.base import IncidentView, StepView

STATE_LABELS = {
    "awaiting_approval": "⏳ awaiting approval",
    "approved": "👍 approved",
    "pending": "▶️ about to run",
    "running": "⚙️ running",
    "success": "✅ succeeded",
    "allowed_failure": "☑️ allowed failure",
    "failed": "❌ failed",
    "timeout": "⌛ timed out",
    "error": "💥 could not run",
    "blocked": "⛔ blocked",
    "rejected": "🚫 rejected",
    "expired": "⌛ approval expired",
    "skipped": "⏭️ skipped",
    "interrupted": "⚠️ interrupted",
    "cancelled": "✖️ cancelled",
    "dry_run": "🧪 would run (dry run)",
}

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


def decision_text(view: StepView) -> str:
    """What the policy decided when the step was offered, and why.

    Empty for a skipped step (its `when`, not the policy, kept it from running; the status
    line says why) and for a view without a decision.
    """
    label = DECISION_LABELS.get(view.decision)
    if label is None or view.state == "skipped":
        return ""
    if view.decision == "blocked":
        return f"{label}: {view.reason}" if view.reason else label
    return f"{label} ({view.reason})" if view.reason else label


def status_line(view: StepView, reactions: ReactionNames) -> str:
    label = STATE_LABELS.get(view.state, view.state)
    if view.state == "awaiting_approval":
        extra = f" — {approvers_text(view)} may approve until {when_text(view.expires_at)}"
        if view.paused_by:
            extra = f" — paused by <@{view.paused_by}>; the deadline waits"
        return (
            f"{label}{extra}. React :{reactions.approve}: to approve, "
            f":{reactions.reject}: to reject, :{reactions.pause}: to pause."
        )
    if view.state in ("approved", "running") and view.actor:
        return f"{label} (approved by <@{view.actor}>)"
    if view.state in ("rejected",) and view.actor:
        return f"{label} by <@{view.actor}>"
    if view.state == "blocked":
        # Blocked when offered: the decision line gives the reason. Blocked by the last
        # check before running (a reloaded catalog took the scope away): the check's
        # reason is in `detail`, and `reason` still explains the earlier decision.
        why = view.detail or ("" if decision_text(view) else view.reason)
        return f"{label}: {why}" if why else label
    if view.state == "skipped":
        return f"{label}: {view.reason}"
    if view.state in ("success", "allowed_failure", "failed", "timeout", "error", "dry_run"):
        took = f" in {view.duration:.2f}s" if view.duration else ""
        by = f", approved by <@{view.actor}>" if view.actor else ""
        return f"{label}{took}{by}: {view.detail}"
    if view.detail:
        return f"{label}: {view.detail}"
    return label


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
    decision = decision_text(view)
    if decision:
        lines.append(f"Decision: {decision}")
    lines += [f"Expect: {expect_text(view)}", status_line(view, reactions)]
    if view.output:
        lines.append("Output:\n" + view.output.rstrip())
    return "\n".join(lines)


UNAUTHORIZED_NOTE = "Your reaction on {step} changed nothing: {reason}."
DECIDED_NOTE = "Your reaction on {step} changed nothing: {reason}."


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
