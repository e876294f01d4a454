"""The incident state machine: one inbox item in, one transaction out.

Everything that can change an incident arrives as an item of the durable inbox
(``bot.inbox``): PagerDuty events, approvals from Slack, approval deadlines, command
results. Items of one incident are applied one at a time, in the order they were
received, so a resolve acknowledged before a ✅ always wins. ``Engine.apply`` applies one
item in one store transaction (``Store.unit``): it reads the incident, lets
``bot.policy`` decide, makes the state changes, records the audit events and the effects
the changes cause (Slack messages, PagerDuty write-back) in the outbox, and marks the
item applied, all or nothing. It never waits on Slack or PagerDuty (the outbox senders
deliver later) nor on a command (executors run them and send their results back as
inbox items).

After each change the run is walked as far as it can go without a human: the next step
is decided (blocked, skipped, needs approval, automatic), an automatic or approved step
is claimed (at most once: a unique attempt row and a conditional update) and handed to
the executor once the transaction commits.

The engine knows nothing of Slack, PagerDuty or click.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shlex
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from bot import effects, executor, messages, metrics, policy
from bot.catalog.environment import resolve_environment
from bot.catalog.model import (
    LOCAL,
    Action,
    Approvers,
    Catalog,
    Location,
    Match,
    Placement,
    Runbook,
    Safety,
    Step,
)
from bot.chat.base import IncidentView, StepView
from bot.conditions import ConditionError, evaluate
from bot.effects import Kind
from bot.states import (
    RESULT_EVENTS,
    RESULT_STATUSES,
    ApprovalStatus,
    Event,
    InboxKind,
    InboxStatus,
    IncidentStatus,
    Origin,
    Phase,
    Refusal,
    RunStatus,
    StepStatus,
)
from bot.store import AlreadyApplied, Approval, InboxItem, Run, StepRun, Store, Unit, now
from bot.store import Incident as IncidentRow

log = logging.getLogger(__name__)

OUTPUT_EXCERPT_CHARS = 1500
ROLLBACK_INDEX_BASE = 10_000  # step_index of the rollback of step i is BASE + i
MAX_WALK = 1_000  # steps one item may walk (a runbook is far shorter; a guard, not a limit)
# Requests of bot.guard decorators (``bot.guardapi``) are incidents whose runbook is made
# from its id, `guard:<timeout seconds>:<function>`: one step the asking program runs.
GUARD_RUNBOOK_PREFIX = "guard:"
GUARD_RUNNER = "guard"  # a claimed guard step: the asking program runs it
# A program that asked, was approved and has not reported its function's end after this
# long is taken for dead: its step is interrupted (escalated, never run again), and a
# report that comes later changes nothing.
GUARD_REPORT_SECONDS = 3600.0


def guard_runbook_id(function: str, timeout: float) -> str:
    return f"{GUARD_RUNBOOK_PREFIX}{max(1, round(timeout))}:{function}"


def guard_runbook(runbook_id: str) -> Runbook | None:
    """The one-step runbook of a bot.guard request (None: not one)."""
    if not runbook_id.startswith(GUARD_RUNBOOK_PREFIX):
        return None
    timeout, _, function = runbook_id.removeprefix(GUARD_RUNBOOK_PREFIX).partition(":")
    if not timeout.isdigit() or not function:
        return None
    where = Location("bot.guard")
    action = Action(
        id=function,
        command=("python-function", function),
        location=where,
        description=(
            "A Python function guarded by bot.guard.require_confirmation: the program that "
            "asked runs it once approved, and reports its result here."
        ),
        safety=Safety(requires_approval=True, approval_timeout=float(timeout)),
        external=True,
    )
    step = Step(id="confirm", action=action, location=where, name=f"Run {function}()")
    return Runbook(
        id=runbook_id,
        match=Match(services=("bot.guard",)),
        steps=(step,),
        location=where,
        title=f"bot.guard: {function}",
    )


@dataclass(frozen=True)
class Incident:
    """An incident as an intake reports it (PagerDuty, simulate)."""

    id: str
    title: str
    service: str
    service_id: str = ""
    urgency: str = ""
    priority: str = ""
    env: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    link: str = ""
    started_by: str = ""  # a manual run: the Slack user who started it


@dataclass(frozen=True)
class Job:
    """A claimed step's command, for an executor: everything it needs, nothing to decide."""

    step_run_id: int
    attempt: int
    incident_id: str
    phase: str
    action_id: str
    spec: executor.CommandSpec
    context: Mapping[str, Any]
    output_cap: int
    secret_patterns: tuple[str, ...]
    placement: Placement = LOCAL  # where its action says it runs

    @property
    def key(self) -> str:
        """The inbox key of this job's end (result or interruption): one per attempt."""
        return f"step:{self.step_run_id}:{self.attempt}:end"


class Executor(Protocol):
    """Where claimed steps run (``bot.jobs``). Results come back as inbox items."""

    dry_run: bool  # commands are not run: results say what would have run

    def reserve(self, placement: Placement = LOCAL) -> str:
        """A runner id for a step about to be claimed, where its action says it runs (the
        id tells which executor has it: ``bot.dispatch``); the claim records it."""
        ...

    def release(self, runner: str) -> None:
        """The claim did not commit: the runner is not needed."""
        ...

    def start(self, runner: str, job: Job) -> None:
        """Run the job (the claim is committed). Must not block on the command."""
        ...


MemberOf = Callable[[str, str], bool]


def fingerprint(command: str) -> str:
    """A short digest of what a step message shows: an approval applies to it only."""
    return hashlib.sha256(command.encode("utf-8")).hexdigest()[:12]


def result_payload(job: Job, result: executor.ExecutionResult) -> dict[str, Any]:
    return {
        "step_run_id": job.step_run_id,
        "attempt": job.attempt,
        "phase": job.phase,
        "status": result.status,
        "exit_code": result.exit_code,
        "output": result.output,
        "detail": result.detail,
        "duration": result.duration,
        "argv": list(result.argv),
    }


class Engine:
    def __init__(
        self,
        catalog: Catalog,
        store: Store,
        executor_: Executor,
        *,
        default_env: str = "",
        member_of: MemberOf | None = None,
        bot_users: Collection[str] = (),
        writeback: bool = False,
        chat: bool = True,
        clock: Callable[[], float] = now,
        output_cap: int = 64_000,
        details: Callable[[str], Mapping[str, Any]] | None = None,
        catalog_of: Callable[[str], Catalog | None] | None = None,
        origin: Origin = Origin.BOT,
    ) -> None:
        self.catalog = catalog  # new incidents use it; runs keep the one they started with
        # Catalogs of older versions, for runs that started on them (loaded on demand from
        # what the bot stored: `catalog_of(version)`).
        self.catalog_of = catalog_of
        self._catalogs: dict[str, Catalog] = {catalog.version: catalog}
        self.store = store
        self.executor = executor_
        self.default_env = default_env
        self.member_of: MemberOf = member_of or (lambda user, group: False)
        self.bot_users = frozenset(bot_users)
        self.writeback = writeback
        self.chat = chat
        self.clock = clock
        # What the audit rows it writes come from: the bot, or simulate and runbook tests
        # (whose rows never count as evidence for a promotion).
        self.origin = origin
        self.output_cap = output_cap
        # Reads an incident's alert details when the trigger carried none (PagerDuty's
        # REST API); called before the transaction, never inside it.
        self.details = details
        self._runbooks: dict[int, dict[str, Runbook]] = {}  # id(catalog) -> runbooks by id

    # --- the one entry point ---------------------------------------------------------------

    def apply(self, item: InboxItem) -> None:
        """Apply one inbox item: its changes, their audit rows and effects, in one commit."""
        handler = self._handlers().get(item.kind)
        payload = dict(item.payload)
        if item.kind == InboxKind.TRIGGERED and not payload.get("details") and self.details:
            try:
                payload["details"] = dict(self.details(item.incident_id))
            except Exception as exc:  # details help matching; the incident goes on without
                log.warning(
                    "could not read the alert details of incident %s: %s", item.incident_id, exc
                )
        jobs: list[tuple[str, Job]] = []
        groups = self._groups_of(item)  # may ask Slack: never inside the transaction
        try:
            with self.store.unit(at=self.clock(), origin=self.origin) as u:
                if handler is None:
                    u.finish_item(item, InboxStatus.IGNORED, f"{item.kind} is not acted on")
                else:
                    ctx = _Context(u, item, payload, jobs, groups)
                    status, detail = handler(ctx)
                    u.finish_item(item, status, detail)
        except AlreadyApplied:
            for runner, _job in jobs:
                self.executor.release(runner)
            return
        except BaseException:
            for runner, _job in jobs:
                self.executor.release(runner)
            raise
        if jobs:
            # A claim must be on disk before its command starts: the state database
            # does not sync each commit, and a power loss must not let a step run twice.
            self.store.sync()
        for runner, job in jobs:
            self.executor.start(runner, job)

    def _groups_of(self, item: InboxItem) -> frozenset[str]:
        """The approver groups of the decided step that the deciding user is in."""
        if item.kind not in (
            InboxKind.APPROVE,
            InboxKind.REJECT,
            InboxKind.PAUSE,
            InboxKind.RESUME,
        ):
            return frozenset()
        user = str(item.payload.get("user") or "")
        approval = self.store.approval(int(item.payload.get("step_run_id") or 0))
        if approval is None or not user or user in approval.approver_users:
            return frozenset()
        return frozenset(g for g in approval.approver_groups if self.member_of(user, g))

    def _handlers(self) -> Mapping[str, Callable[[_Context], tuple[InboxStatus, str]]]:
        return {
            InboxKind.TRIGGERED: self._triggered,
            InboxKind.RESOLVED: self._resolved,
            InboxKind.REOPENED: self._reopened,
            InboxKind.ACKNOWLEDGED: self._noted,
            InboxKind.REASSIGNED: self._noted,
            InboxKind.APPROVE: self._decision,
            InboxKind.REJECT: self._decision,
            InboxKind.PAUSE: self._pause,
            InboxKind.RESUME: self._resume,
            InboxKind.EXPIRE: self._expire,
            InboxKind.FINISHED: self._finished,
            InboxKind.INTERRUPTED: self._interrupted,
            InboxKind.REPAIR: self._repair,
            InboxKind.CATALOG_LOADED: self._catalog_loaded,
            InboxKind.WAITING: self._waiting,
        }

    # --- PagerDuty (and simulated) incident events -----------------------------------------

    def _stale(self, incident: IncidentRow | None, occurred_at: str) -> bool:
        """A state change older than one already applied (PagerDuty does not promise order)."""
        return bool(
            incident is not None
            and occurred_at
            and incident.state_changed_at
            and _later(incident.state_changed_at, occurred_at)
        )

    def _triggered(self, c: _Context) -> tuple[InboxStatus, str]:
        p = c.payload
        existing = c.u.incident(c.item.incident_id)
        occurred = str(p.get("occurred_at") or "")
        if self._stale(existing, occurred) or (
            existing is None
            and occurred
            and any(_later(seen, occurred) for seen in c.u.state_changes_seen(c.item.incident_id))
        ):
            return InboxStatus.IGNORED, "stale: a later change of this incident was received"
        if existing is not None:
            return InboxStatus.IGNORED, "incident already open"
        details = p.get("details") or {}
        details_text = json.dumps(details, sort_keys=True, default=str)
        if p.get("runbook_id"):  # a manual run names its runbook
            runbook = self._runbook(str(p["runbook_id"]))
        else:
            runbook = self.catalog.match(
                p["service"], p["title"], service_id=p.get("service_id", ""), details=details_text
            )
        if p.get("env"):
            env, why = str(p["env"]), "the incident says so"
        else:
            choice = resolve_environment(
                self.catalog, p["service"], p.get("service_id", ""), self.default_env
            )
            env, why = choice.env or "", choice.detail
        incident = c.u.create_incident(
            {
                "id": c.item.incident_id,
                "title": p["title"],
                "service": p["service"],
                "service_id": p.get("service_id", ""),
                "urgency": p.get("urgency", ""),
                "priority": p.get("priority", ""),
                "env": env,
                "details": details,
                "link": p.get("link", ""),
                "runbook_id": runbook.id if runbook else None,
                "catalog_commit": self.catalog.version,
                "channel": str(p.get("channel") or "") or self.catalog.channel_for(runbook),
                "state_changed_at": p.get("occurred_at") or None,
                "started_by": str(p.get("started_by") or ""),
            }
        )
        if incident is None:
            return InboxStatus.IGNORED, "incident already open"
        log.info(
            "incident %s (%s): %s; environment %s (%s)",
            incident.id, incident.service,
            f"runbook {runbook.id}" if runbook else "no runbook matches",
            env or "unknown", why,
            extra={"incident": incident.id, "service": incident.service},
        )  # fmt: skip
        metrics.incidents.labels(
            metrics.service_label(incident.service), "yes" if runbook else "no"
        ).inc()
        c.u.event(
            incident,
            Event.MATCHED if runbook else Event.NO_RUNBOOK,
            detail=(
                f"runbook {runbook.id}"
                if runbook
                else f"no runbook matches service {incident.service!r} and "
                f"symptom {incident.title!r}"
            ),
        )
        if self.chat:
            c.u.emit(effects.post_incident(self._incident_view(incident, runbook)))
        if runbook is not None:
            run = c.u.create_run(incident.id, runbook.id, Phase.MAIN, self.catalog.version)
            if run is not None:
                self._walk(c, incident, run, fresh=True)
        return InboxStatus.DONE, ""

    def _resolved(self, c: _Context) -> tuple[InboxStatus, str]:
        occurred = c.payload.get("occurred_at", "")
        incident = c.u.incident(c.item.incident_id)
        if incident is None:
            return InboxStatus.IGNORED, "unknown incident"
        if self._stale(incident, occurred):
            return InboxStatus.IGNORED, "stale: a later change of this incident was applied"
        if not incident.open:
            if occurred:
                c.u.note_state_change(incident, occurred)
            return InboxStatus.IGNORED, "already resolved"
        actor = str(c.payload.get("actor") or c.item.source)
        resolved = c.u.set_incident_status(
            incident, IncidentStatus.RESOLVED, state_changed_at=occurred or None
        )
        assert resolved is not None  # the incident's items are applied one at a time
        incident = resolved
        c.u.event(incident, Event.RESOLVED, actor=actor)
        main = c.u.run(incident.id, Phase.MAIN)
        if main is not None and main.status.live:
            for approval, step in c.u.pending_approvals(main.id):
                self._close_request(
                    c, incident, step, approval, ApprovalStatus.CANCELLED, actor,
                    messages.CANCELLED_BY_RESOLVE,
                )  # fmt: skip
            c.u.set_run_status(main, RunStatus.CANCELLED)
        runbook = self._runbook(incident.runbook_id or "")
        if runbook is not None and runbook.on_resolve:
            run = c.u.create_run(incident.id, runbook.id, Phase.ON_RESOLVE, self.catalog.version)
            if run is not None:
                self._walk(c, incident, run, fresh=True)
        self._note(c, incident, f"Incident resolved. {self._summary(c.u, incident)}")
        return InboxStatus.DONE, ""

    def _reopened(self, c: _Context) -> tuple[InboxStatus, str]:
        occurred = c.payload.get("occurred_at", "")
        incident = c.u.incident(c.item.incident_id)
        if incident is None:
            return InboxStatus.IGNORED, "unknown incident"
        if self._stale(incident, occurred):
            return InboxStatus.IGNORED, "stale: a later change of this incident was applied"
        if incident.open:
            if occurred:  # an older resolve delivered after this must not close it
                c.u.note_state_change(incident, occurred)
            return InboxStatus.IGNORED, "already open"
        reopened = c.u.set_incident_status(
            incident, IncidentStatus.OPEN, state_changed_at=occurred or None
        )
        assert reopened is not None
        c.u.event(reopened, Event.REOPENED, actor=str(c.payload.get("actor") or c.item.source))
        self._note(c, reopened, messages.REOPENED_NOTE)
        return InboxStatus.DONE, ""

    def _noted(self, c: _Context) -> tuple[InboxStatus, str]:
        incident = c.u.incident(c.item.incident_id)
        if incident is None:
            return InboxStatus.IGNORED, "unknown incident"
        text = str(c.payload.get("note") or "")
        if text:
            self._note(c, incident, text)
        return InboxStatus.DONE, ""

    def _waiting(self, c: _Context) -> tuple[InboxStatus, str]:
        """An executor says why a claimed step has not started yet (told in the thread
        while the step still waits; its end comes later, as every step's does)."""
        incident = c.u.incident(c.item.incident_id)
        step = c.u.step_run(int(c.payload["step_run_id"]))
        if incident is None or step is None or step.status is not StepStatus.RUNNING:
            return InboxStatus.IGNORED, "the step no longer waits"
        self._note(c, incident, str(c.payload.get("note") or ""))
        return InboxStatus.DONE, ""

    # --- the walk --------------------------------------------------------------------------

    def _walk(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        *,
        fresh: bool = False,
        current: StepRun | None = None,
    ) -> None:
        """Move the run as far as it can go without a human, within this transaction.

        `fresh`: the run's cursor was just moved (or the run created), so no attempt of
        the current step exists yet and it is created without reading first. `current`:
        the current step's latest attempt, when the caller has it.
        """
        known = current
        for _ in range(MAX_WALK):
            if not run.status.live:
                return
            if run.phase is Phase.MAIN and not incident.open:
                return  # resolving cancels the main run; nothing of it starts any more
            runbook = self._run_runbook(run)
            if runbook is None:
                self._finish_run(c, incident, run, RunStatus.FAILED, "its runbook left the catalog")
                return
            steps = _steps(runbook, run.phase)
            if run.cursor >= len(steps):
                self._finish_run(c, incident, run, RunStatus.COMPLETED, "")
                return
            step, index = self._current(run, steps)
            if known is not None and known.run_id == run.id and known.step_index == index:
                current = known
            else:
                current = None if fresh else c.u.latest_step_run(run.id, index)
            if current is None:
                current = self._start_step(c, incident, run, runbook, steps, index, step)
            fresh, known = False, None
            if current.status is StepStatus.APPROVED:
                current = self._claim(c, incident, run, runbook, steps, step, current)
                if current is None:
                    continue  # superseded: a new attempt asks again
            if current.status is StepStatus.RUNNING:
                return  # its result comes back as an inbox item
            if current.status is StepStatus.AWAITING_APPROVAL:
                if run.status is RunStatus.RUNNING:
                    c.u.set_run_status(run, RunStatus.WAITING)
                return
            moved = self._after(c, incident, run, step, index, current)
            if moved is None:
                return
            run, fresh = moved, True
        raise RuntimeError(f"run {run.id} walked {MAX_WALK} steps in one item")

    def _current(self, run: Run, steps: tuple[Step, ...]) -> tuple[Step, int]:
        step = steps[run.cursor]
        if run.rollback_of is not None and step.on_failure.rollback is not None:
            return _rollback_step(step), ROLLBACK_INDEX_BASE + run.cursor
        return step, run.cursor

    def _after(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        step: Step,
        index: int,
        done: StepRun,
    ) -> Run | None:
        """A finished step: the run moved on (returned), or stopped (None)."""
        status = done.status
        if index >= ROLLBACK_INDEX_BASE:
            original = _steps(self._run_runbook(run), run.phase)[run.cursor]
            if status.moves_on and original.on_failure.then == "continue":
                return c.u.move_cursor(run, run.cursor + 1)
            self._stop(
                c, incident, run,
                f"{original.id} failed; its rollback {step.action.id} ended {status}",
            )  # fmt: skip
            return None
        if status.moves_on:
            return c.u.move_cursor(run, run.cursor + 1)
        if status is StepStatus.EXPIRED:
            self._stop(c, incident, run, f"the approval request for {step.id} expired")
            return None
        if status is StepStatus.INTERRUPTED:
            self._stop(c, incident, run, f"{step.id} was interrupted and needs a human to check it")
            return None
        if status is StepStatus.CANCELLED:
            self._stop(c, incident, run, f"{step.id} was cancelled: {done.detail or 'no reason'}")
            return None
        mode = step.on_failure.mode
        if mode == "continue":
            return c.u.move_cursor(run, run.cursor + 1)
        # A rollback undoes what a command did: only when it started (not when it was
        # blocked, rejected or could not be built or started).
        if mode == "rollback" and step.on_failure.rollback is not None and status.command_started:
            rolled = c.u.start_rollback(run)
            if rolled is not None:
                return rolled
        self._stop(c, incident, run, f"{step.id} ended {status}")
        return None

    def _stop(self, c: _Context, incident: IncidentRow, run: Run, reason: str) -> None:
        if not self._finish_run(c, incident, run, RunStatus.ESCALATED, reason):
            return
        cat = self._of(run)
        escalation = cat.escalation_for(self._runbook(run.runbook_id, cat))
        c.u.event(incident, Event.ESCALATED, detail=reason)
        mention = f"{escalation.mention} " if escalation.mention else ""
        self._note(c, incident, f"{mention}Escalating: {reason}.")
        log.info(
            "incident %s escalated: %s", incident.id, reason,
            extra={"incident": incident.id, "service": incident.service},
        )  # fmt: skip
        if self.writeback and escalation.pagerduty:
            c.u.emit(effects.pagerduty(incident.id, Kind.PD_ESCALATE, {"reason": reason}))

    def _finish_run(
        self, c: _Context, incident: IncidentRow, run: Run, status: RunStatus, reason: str
    ) -> bool:
        finished = c.u.set_run_status(run, status)
        if finished is None:
            return False
        results = c.u.step_runs_of(incident.id, run.id)
        summary = _summary_of(results)
        if run.phase is Phase.MAIN:
            headline = (
                "Runbook finished."
                if status is RunStatus.COMPLETED
                else f"Runbook stopped: {reason}."
            )
            self._note(c, incident, f"{headline} {summary}")
        if self.writeback:
            note = messages.writeback_note(
                runbook=incident.runbook_id or "?",
                phase=run.phase,
                status=status,
                summary=summary,
            )
            c.u.emit(effects.pagerduty(incident.id, Kind.PD_NOTE, {"text": note}))
            runbook = self._run_runbook(run)
            all_succeeded = all(
                s.status in (StepStatus.SUCCESS, StepStatus.DRY_RUN) for s in results
            )
            if (
                runbook is not None
                and runbook.resolve_on_success
                and status is RunStatus.COMPLETED
                and all_succeeded
                and run.phase is Phase.MAIN
                and incident.open
            ):
                c.u.emit(effects.pagerduty(incident.id, Kind.PD_RESOLVE, {}))
        return True

    # --- one step --------------------------------------------------------------------------

    def _start_step(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        runbook: Runbook,
        steps: tuple[Step, ...],
        index: int,
        step: Step,
    ) -> StepRun:
        """Create the step's attempt with the policy's decision, and show it."""
        action = step.action
        cat = self._of(run)
        skip_reason = self._skip_reason(c.u, incident, run, step)
        decision = policy.decide(action, incident.env, cat.settings)
        render_error = ""
        try:
            command = self._display_command(action, self._context(incident, step), cat)
        except (executor.TemplateError, ValueError) as exc:
            command, render_error = action.command_text, str(exc)
        values: dict[str, Any] = {
            "run_id": run.id,
            "incident_id": incident.id,
            "step_index": index,
            "step_id": step.id,
            "action": action.id,
            "attempt": 1,
            "catalog_commit": cat.version,
            "command": command,
            "decision": decision.kind,
            "reason": decision.reason,
        }
        approval: dict[str, Any] | None = None
        runner = ""
        limited: tuple[str, str] | None = None
        if skip_reason:
            values.update(status=StepStatus.SKIPPED, reason=skip_reason, finished_at=c.u.at)
        elif render_error:
            values.update(
                status=StepStatus.ERROR,
                detail=f"could not build the command: {render_error}",
                finished_at=c.u.at,
            )
        elif decision.kind == "blocked":
            values.update(status=StepStatus.BLOCKED, finished_at=c.u.at)
        elif decision.kind == "needs_approval":
            values["status"] = StepStatus.AWAITING_APPROVAL
            approvers = cat.approvers_for(runbook, action)
            approval = {
                "incident_id": incident.id,
                "action": action.id,
                "approvers": {"users": list(approvers.users), "groups": list(approvers.groups)},
                "expires_at": c.item.received_at + cat.approval_timeout_for(action),
                "fingerprint": fingerprint(command),
                "catalog_commit": cat.version,
                **_two_person(action, incident),
            }
        elif limited := self._limit_reached(c, action):
            values.update(status=StepStatus.BLOCKED, detail=limited[1], finished_at=c.u.at)
        else:
            # Automatic: created claimed. The unique attempt row is the claim.
            runner = self.executor.reserve(action.executor)
            values.update(status=StepStatus.RUNNING, runner=runner, started_at=c.u.at)
        created = c.u.create_step_run(values, approval)
        if created is None:  # this attempt exists (an item applied again after a crash)
            if runner:
                self.executor.release(runner)
            existing = c.u.latest_step_run(run.id, index)
            assert existing is not None
            return existing
        if limited:
            metrics.steps_limited.labels(action.id, limited[0]).inc()
            reason = limited[1]
        else:
            reason = decision.reason
        self._on_step_created(c, incident, run, runbook, steps, step, created, reason)
        if runner:
            c.jobs.append((runner, self._job(incident, run, step, created)))
        return created

    def _on_step_created(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        runbook: Runbook,
        steps: tuple[Step, ...],
        step: Step,
        created: StepRun,
        reason: str,
    ) -> None:
        action = step.action
        status = created.status
        service = metrics.service_label(incident.service)
        if status is StepStatus.SKIPPED:
            c.u.event(
                incident, Event.SKIPPED, step_id=step.id, action=action.id, detail=created.reason
            )
        elif status is StepStatus.ERROR:
            if created.decision != "blocked":
                # A command that cannot be built is a failed attempt of the action: count
                # it, or an action broken by missing alert details would stay invisible.
                metrics.steps_executed.labels(service, action.id, "error").inc()
            c.u.event(
                incident, Event.ERROR, step_id=step.id, action=action.id, detail=created.detail
            )
        elif status is StepStatus.BLOCKED:
            metrics.steps_blocked.labels(service, action.id, incident.env or "none").inc()
            c.u.event(incident, Event.BLOCKED, step_id=step.id, action=action.id, detail=reason)
        elif status is StepStatus.AWAITING_APPROVAL:
            c.u.event(
                incident, Event.REQUIRES_MANUAL, step_id=step.id, action=action.id,
                detail="waiting for approval",
            )  # fmt: skip
        elif status is StepStatus.RUNNING:
            self._executed_event(c, incident, step, "")
        log.info(
            "incident %s step %s (%s): %s",
            incident.id, step.id, action.id, status,
            extra={"incident": incident.id, "service": incident.service, "action": action.id},
        )  # fmt: skip
        if self.chat:
            approval = c.u.approval(created.id) if status is StepStatus.AWAITING_APPROVAL else None
            view = self._step_view(incident, created, step, len(steps), run.phase, approval)
            c.u.emit(effects.post_step(view, incident.channel))
            if approval is not None:
                c.u.emit(effects.offer_reactions(incident.id, created.id, incident.channel))

    def _limit_reached(self, c: _Context, action: Action) -> tuple[str, str] | None:
        """(limit, why) when starting a step of `action` now would pass one of its limits:
        then it does not run (a circuit breaker), else None."""
        limits = action.limits
        if limits.max_concurrent is None and limits.max_per_hour is None:
            return None
        running, last_hour = c.u.action_usage(action.id, c.u.at - 3600.0)
        if limits.max_concurrent is not None and running >= limits.max_concurrent:
            return "max_concurrent", messages.limit_reached(
                action.id, "max_concurrent", limits.max_concurrent, running
            )
        if limits.max_per_hour is not None and last_hour >= limits.max_per_hour:
            return "max_per_hour", messages.limit_reached(
                action.id, "max_per_hour", limits.max_per_hour, last_hour
            )
        return None

    def _executed_event(self, c: _Context, incident: IncidentRow, step: Step, actor: str) -> None:
        if not self.executor.dry_run:
            c.u.event(incident, Event.EXECUTED, step_id=step.id, action=step.action.id, actor=actor)

    def _claim(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        runbook: Runbook,
        steps: tuple[Step, ...],
        step: Step,
        approved: StepRun,
    ) -> StepRun | None:
        """The last check before an approved command starts, and the claim itself.

        Returns the claimed (or finally refused) step run, or None when what would run
        changed since it was approved: that attempt is superseded and a new one asks again.
        """
        action = step.action
        cat = self._of(run)
        approval = c.u.approval(approved.id)
        decision = policy.decide(action, incident.env, cat.settings)
        check = policy.may_run(
            decision,
            approval=approval.status if approval else "none",  # type: ignore[arg-type]
            incident_open=incident.open or run.phase is Phase.ON_RESOLVE,
        )
        if not check.allowed:
            final = StepStatus.BLOCKED if decision.blocked else StepStatus.CANCELLED
            closed = c.u.set_step(approved, final, detail=check.reason)
            if closed is not None:
                if decision.blocked:  # e.g. a reloaded catalog took the scope away
                    metrics.steps_blocked.labels(
                        metrics.service_label(incident.service), action.id, incident.env or "none"
                    ).inc()
                c.u.event(
                    incident, Event(final), step_id=step.id, action=action.id, detail=check.reason
                )
                self._show(c, incident, run, step, closed, len(steps), approval)
            return closed
        try:
            command = self._display_command(action, self._context(incident, step), cat)
        except (executor.TemplateError, ValueError):
            command = ""
        if (
            approval is not None
            and approval.fingerprint
            and fingerprint(command) != approval.fingerprint
        ):
            self._supersede(c, incident, run, cat, runbook, step, approved, approval, command)
            return None
        if limited := self._limit_reached(c, action):
            closed = c.u.set_step(approved, StepStatus.BLOCKED, detail=limited[1])
            if closed is not None:
                metrics.steps_limited.labels(action.id, limited[0]).inc()
                c.u.event(
                    incident, Event.BLOCKED, step_id=step.id, action=action.id, detail=limited[1]
                )
                self._show(c, incident, run, step, closed, len(steps), approval)
            return closed
        if action.external:  # the program that asked runs it, and reports its result
            claimed = c.u.set_step(approved, StepStatus.RUNNING, runner=GUARD_RUNNER)
            if claimed is None:
                return c.u.step_run(approved.id)
            actor = approval.decided_by or "" if approval else ""
            self._executed_event(c, incident, step, actor)
            self._show(c, incident, run, step, claimed, len(steps), approval)
            return claimed
        runner = self.executor.reserve(action.executor)
        claimed = c.u.set_step(approved, StepStatus.RUNNING, runner=runner)
        if claimed is None:
            self.executor.release(runner)
            return c.u.step_run(approved.id)
        actor = approval.decided_by or "" if approval else ""
        self._executed_event(c, incident, step, actor)
        self._show(c, incident, run, step, claimed, len(steps), approval)
        c.jobs.append((runner, self._job(incident, run, step, claimed)))
        return claimed

    def _supersede(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        cat: Catalog,
        runbook: Runbook,
        step: Step,
        old: StepRun,
        approval: Approval,
        command: str,
    ) -> None:
        """What would run is not what was approved: void it, and ask again (under `cat`,
        which the run goes on with from here)."""
        detail = messages.SUPERSEDED_DETAIL
        gone = c.u.set_step(old, StepStatus.SUPERSEDED, detail=detail)
        if gone is None:
            return
        c.u.decide_approval(approval, ApprovalStatus.VOID, "", c.u.at)
        c.u.event(incident, Event.SUPERSEDED, step_id=step.id, action=step.action.id, detail=detail)
        self._show(c, incident, run, step, gone, self._total(run), approval)
        if cat.version != run.catalog_commit:
            run = c.u.set_run_catalog(run, cat.version) or run
        steps = _steps(runbook, run.phase)
        approvers = cat.approvers_for(runbook, step.action)
        retry = c.u.create_step_run(
            {
                "run_id": run.id,
                "incident_id": incident.id,
                "step_index": old.step_index,
                "step_id": step.id,
                "action": step.action.id,
                "attempt": old.attempt + 1,
                "catalog_commit": cat.version,
                "command": command,
                "decision": "needs_approval",
                "reason": old.reason,
                "status": StepStatus.AWAITING_APPROVAL,
            },
            {
                "incident_id": incident.id,
                "action": step.action.id,
                "approvers": {"users": list(approvers.users), "groups": list(approvers.groups)},
                "expires_at": c.u.at + cat.approval_timeout_for(step.action),
                "fingerprint": fingerprint(command),
                "catalog_commit": cat.version,
                **_two_person(step.action, incident),
            },
        )
        if retry is not None:
            self._on_step_created(c, incident, run, runbook, steps, step, retry, old.reason)

    def _job(self, incident: IncidentRow, run: Run, step: Step, claimed: StepRun) -> Job:
        action = step.action
        return Job(
            step_run_id=claimed.id,
            attempt=claimed.attempt,
            incident_id=incident.id,
            phase=run.phase,
            action_id=action.id,
            spec=executor.CommandSpec(
                command=action.command,
                shell=action.shell,
                timeout=action.timeout,
                env=dict(action.env),
                secret_env=action.secrets,
                expect=tuple(
                    executor.Expectation(e.pattern, e.allow_failure) for e in action.expect
                ),
            ),
            context=self._context(incident, step),
            output_cap=self.output_cap,
            secret_patterns=tuple(self._of(run).settings.secret_patterns),
            placement=action.executor,
        )

    def _finished(self, c: _Context) -> tuple[InboxStatus, str]:
        p = c.payload
        status = StepStatus(p["status"])
        if status not in RESULT_STATUSES and status is not StepStatus.DRY_RUN:
            raise ValueError(f"not a result: {status}")
        values: dict[str, Any] = {
            "exit_code": p.get("exit_code"),
            "output": p.get("output") or "",
            "detail": p.get("detail") or "",
            "duration": p.get("duration"),
        }
        argv = p.get("argv") or []
        if argv:
            values["command"] = " ".join(shlex.quote(a) for a in argv)
        return self._ended(c, status, values)

    def _interrupted(self, c: _Context) -> tuple[InboxStatus, str]:
        detail = str(c.payload.get("detail") or messages.INTERRUPTED)
        return self._ended(c, StepStatus.INTERRUPTED, {"detail": detail})

    def _ended(
        self, c: _Context, status: StepStatus, values: dict[str, Any]
    ) -> tuple[InboxStatus, str]:
        """A running step's end: record it, show it, and walk on."""
        p = c.payload
        phase = Phase(p.get("phase", Phase.MAIN))
        incident, run = c.u.incident_with_run(c.item.incident_id, phase)
        if incident is None or run is None:
            return InboxStatus.IGNORED, "unknown step"
        done = c.u.finish_step(int(p["step_run_id"]), int(p.get("attempt", 1)), status, **values)
        if done is None:
            found = c.u.step_run(int(p["step_run_id"]))
            return (
                InboxStatus.IGNORED,
                f"the step is {found.status if found else 'unknown'}, not running",
            )
        self._record_result(c, incident, run, done)
        self._walk(c, incident, run, current=done)
        return InboxStatus.DONE, ""

    def _record_result(self, c: _Context, incident: IncidentRow, run: Run, done: StepRun) -> None:
        step = self._step_of(run, done)
        if done.status is not StepStatus.DRY_RUN and done.status is not StepStatus.INTERRUPTED:
            metrics.steps_executed.labels(
                metrics.service_label(incident.service), done.action, str(done.status)
            ).inc()
            if done.duration is not None:
                metrics.step_duration.labels(done.action).observe(done.duration)
        c.u.event(
            incident, RESULT_EVENTS[done.status], step_id=done.step_id, action=done.action,
            detail=done.detail,
        )  # fmt: skip
        log.info(
            "incident %s step %s (%s): %s", incident.id, done.step_id, done.action, done.status,
            extra={"incident": incident.id, "service": incident.service, "action": done.action},
        )  # fmt: skip
        if step is not None:
            approval = c.u.approval(done.id) if done.decision == "needs_approval" else None
            total = self._total(run)
            self._show(c, incident, run, step, done, total, approval)

    def _repair(self, c: _Context) -> tuple[InboxStatus, str]:
        """Show what was never shown and settle what was left half-done (queued by schema
        migrations for what an earlier version left): the thread's root and the step
        messages that were never posted, requests decided while their step still waits,
        and the live runs walked on."""
        incident = c.u.incident(c.item.incident_id)
        if incident is None:
            return InboxStatus.IGNORED, "unknown incident"
        runbook = self._runbook(incident.runbook_id or "")
        shown = c.u.message_keys(incident.id)
        if self.chat and effects.root_key(incident.id) not in shown:
            c.u.emit(effects.post_incident(self._incident_view(incident, runbook)))
        settled = {
            ApprovalStatus.REJECTED: StepStatus.REJECTED,
            ApprovalStatus.EXPIRED: StepStatus.EXPIRED,
            ApprovalStatus.CANCELLED: StepStatus.CANCELLED,
            ApprovalStatus.VOID: StepStatus.SUPERSEDED,
        }
        for run in c.u.runs_of(incident.id):
            for step_run in c.u.step_runs_of(incident.id, run.id):
                step = self._step_of(run, step_run)
                approval = c.u.approval(step_run.id)
                if (
                    step_run.status is StepStatus.AWAITING_APPROVAL
                    and approval is not None
                    and approval.status in settled
                ):
                    moved = c.u.set_step(
                        step_run, settled[approval.status], detail="settled on repair"
                    )
                    step_run = moved or step_run
                if self.chat and step is not None and effects.step_key(step_run.id) not in shown:
                    view = self._step_view(
                        incident, step_run, step, self._total(run), run.phase, approval
                    )
                    c.u.cancel_orphan_updates(effects.step_key(step_run.id))
                    c.u.emit(effects.post_step(view, incident.channel))
                    if step_run.status is StepStatus.AWAITING_APPROVAL:
                        c.u.emit(
                            effects.offer_reactions(incident.id, step_run.id, incident.channel)
                        )
            if run.status.live:
                if run.status is RunStatus.WAITING:
                    run = c.u.set_run_status(run, RunStatus.RUNNING) or run
                self._walk(c, incident, run)
        return InboxStatus.DONE, "repaired"

    def _catalog_loaded(self, c: _Context) -> tuple[InboxStatus, str]:
        """A new catalog is served: a request whose command it would render differently is
        void, and asked again as the new catalog has it (its run goes on with it)."""
        incident = c.u.incident(c.item.incident_id)
        if incident is None:
            return InboxStatus.IGNORED, "unknown incident"
        cat = self.catalog
        asked = 0
        for run in c.u.runs_of(incident.id):
            if not run.status.live or run.catalog_commit == cat.version:
                continue
            for approval, step_run in c.u.pending_approvals(run.id):
                runbook = self._runbook(run.runbook_id, cat)
                steps = _steps(runbook, run.phase)
                index = step_run.step_index
                if runbook is None or index >= len(steps) or steps[index].id != step_run.step_id:
                    continue  # not in the new catalog as it was: it stays as it was shown
                step = steps[index]
                try:
                    command = self._display_command(step.action, self._context(incident, step), cat)
                except (executor.TemplateError, ValueError):
                    continue
                if fingerprint(command) != approval.fingerprint:
                    self._supersede(
                        c, incident, run, cat, runbook, step, step_run, approval, command
                    )
                    asked += 1
        return InboxStatus.DONE, f"{asked} request(s) asked again under {cat.version}"

    # --- approvals -------------------------------------------------------------------------

    def _request(
        self, c: _Context
    ) -> tuple[IncidentRow, Run, StepRun, Approval, Step | None] | Refusal:
        """The approval request an approve/reject/pause/resume item is about."""
        step_run = c.u.step_run(int(c.payload.get("step_run_id") or 0))
        if step_run is None or step_run.incident_id != c.item.incident_id:
            return Refusal.NOT_A_STEP
        incident = c.u.incident(step_run.incident_id)
        run = c.u.run_by_id(step_run.run_id)
        approval = c.u.approval(step_run.id)
        if incident is None or run is None or approval is None:
            return Refusal.NOT_A_STEP
        button = c.payload.get("button")
        if button is not None and (
            not isinstance(button, dict)
            or button.get("incident") != step_run.incident_id
            or button.get("step") != step_run.id
            or button.get("fingerprint") != approval.fingerprint
        ):
            # A click applies to what its message showed: this step of this incident,
            # rendered with this fingerprint. Another one's button changes nothing.
            return Refusal.STALE
        return incident, run, step_run, approval, self._step_of(run, step_run)

    def _decision(self, c: _Context) -> tuple[InboxStatus, str]:
        verdict = (
            ApprovalStatus.APPROVED if c.item.kind == InboxKind.APPROVE else ApprovalStatus.REJECTED
        )
        user = str(c.payload.get("user") or "")
        found = self._request(c)
        if isinstance(found, Refusal):
            return self._refuse(c, None, None, found)
        incident, run, step_run, approval, step = found
        received = c.item.received_at
        if (
            approval.status is not ApprovalStatus.PENDING
            or step_run.status is not StepStatus.AWAITING_APPROVAL
        ):
            return self._refuse(
                c, incident, step_run, Refusal.ALREADY_DECIDED, status=step_run.status
            )
        who = self._authorize(c, incident, approval, user, step_run)
        if not who.allowed:
            return self._refuse(
                c, incident, step_run, Refusal.UNAUTHORIZED, reason=who.reason, audited=True
            )
        if approval.paused_at is not None and verdict is ApprovalStatus.APPROVED:
            c.u.event(
                incident, Event.REFUSED, step_id=step_run.step_id, action=approval.action,
                actor=user, detail=f"paused by {approval.paused_by}",
            )  # fmt: skip
            return self._refuse(
                c, incident, step_run, Refusal.PAUSED, by=approval.paused_by or "", audited=True
            )
        if policy.approval_deadline_passed(received, approval.expires_at, approval.paused_at):
            self._expire_request(c, incident, run, step_run, approval, step)
            return self._refuse(c, incident, step_run, Refusal.EXPIRED)
        if run.phase is Phase.MAIN and not incident.open:
            return self._refuse(c, incident, step_run, Refusal.INCIDENT_CLOSED)
        if verdict is ApprovalStatus.APPROVED:
            may = policy.may_approve(
                user,
                approved_by=approval.approved_by,
                starter=approval.starter,
                self_approval=approval.self_approval,
            )
            if not may.allowed:
                c.u.event(
                    incident, Event.REFUSED, step_id=step_run.step_id, action=approval.action,
                    actor=user, detail=may.reason,
                )  # fmt: skip
                return self._refuse(
                    c, incident, step_run, Refusal.UNAUTHORIZED, reason=may.reason, audited=True
                )
            if len(approval.approved_by) + 1 < approval.required:
                return self._approved_in_part(c, incident, run, step_run, approval, step, user)
        decided = c.u.decide_approval(approval, verdict, user, received)
        assert decided is not None
        new_step = (
            StepStatus.APPROVED if verdict is ApprovalStatus.APPROVED else StepStatus.REJECTED
        )
        moved = c.u.set_step(step_run, new_step)
        assert moved is not None
        wait = max(received - approval.requested_at, 0.0)
        metrics.approvals.labels(approval.action, str(verdict)).inc()
        metrics.approval_wait.labels(approval.action, str(verdict)).observe(wait)
        detail = _via(c.payload)
        if verdict is ApprovalStatus.APPROVED and approval.required > 1:
            detail = f"{approval.required} of {approval.required} approvals {detail}".strip()
        c.u.event(
            incident, Event(verdict), step_id=step_run.step_id, action=approval.action,
            actor=user, detail=detail,
        )  # fmt: skip
        log.info(
            "incident %s step %s %s by %s", incident.id, step_run.step_id, verdict, user,
            extra={"incident": incident.id, "service": incident.service, "action": approval.action},
        )  # fmt: skip
        if step is not None and verdict is ApprovalStatus.REJECTED:
            self._show(c, incident, run, step, moved, self._total(run), decided)
        if run.status is RunStatus.WAITING:
            run = c.u.set_run_status(run, RunStatus.RUNNING) or run
        self._walk(c, incident, run)
        return InboxStatus.DONE, f"{verdict} by {user}"

    def _approved_in_part(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        step_run: StepRun,
        approval: Approval,
        step: Step | None,
        user: str,
    ) -> tuple[InboxStatus, str]:
        """One of several distinct approvals a request needs: recorded and shown; the step
        waits for the rest."""
        counted = c.u.add_approver(approval, user)
        assert counted is not None  # the incident's items are applied one at a time
        progress = f"{len(counted.approved_by)} of {counted.required} approvals"
        c.u.event(
            incident, Event.APPROVED, step_id=step_run.step_id, action=approval.action,
            actor=user, detail=f"{progress} {_via(c.payload)}".strip(),
        )  # fmt: skip
        if step is not None:
            self._show(c, incident, run, step, step_run, self._total(run), counted)
        return InboxStatus.DONE, f"{progress}, by {user}"

    def _pause(self, c: _Context) -> tuple[InboxStatus, str]:
        user = str(c.payload.get("user") or "")
        found = self._request(c)
        if isinstance(found, Refusal):
            return self._refuse(c, None, None, found)
        incident, run, step_run, approval, step = found
        if approval.status is not ApprovalStatus.PENDING:
            return self._refuse(c, incident, step_run, Refusal.NOT_PENDING)
        who = self._authorize(c, incident, approval, user, step_run)
        if not who.allowed:
            return self._refuse(
                c, incident, step_run, Refusal.UNAUTHORIZED, reason=who.reason, audited=True
            )
        if approval.paused_at is not None:
            return self._refuse(
                c, incident, step_run, Refusal.ALREADY_PAUSED, by=approval.paused_by or ""
            )
        if policy.approval_deadline_passed(c.item.received_at, approval.expires_at, None):
            self._expire_request(c, incident, run, step_run, approval, step)
            return self._refuse(c, incident, step_run, Refusal.EXPIRED)
        paused = c.u.pause_approval(approval, user, c.item.received_at)
        assert paused is not None
        c.u.event(
            incident, Event.PAUSED, step_id=step_run.step_id, action=approval.action, actor=user
        )
        if step is not None:
            self._show(c, incident, run, step, step_run, self._total(run), paused)
        return InboxStatus.DONE, f"paused by {user}"

    def _resume(self, c: _Context) -> tuple[InboxStatus, str]:
        user = str(c.payload.get("user") or "")
        found = self._request(c)
        if isinstance(found, Refusal):
            if "button" in c.payload:  # a click is answered; a removed reaction is not
                return self._refuse(c, None, None, found)
            return InboxStatus.IGNORED, str(found)
        incident, run, step_run, approval, step = found
        if approval.status is not ApprovalStatus.PENDING:
            if "button" in c.payload:
                return self._refuse(c, incident, step_run, Refusal.NOT_PENDING)
            return InboxStatus.IGNORED, "un-pausing a decided step: nothing to say"
        who = self._authorize(c, incident, approval, user, step_run)
        if not who.allowed:
            return self._refuse(
                c, incident, step_run, Refusal.UNAUTHORIZED, reason=who.reason, audited=True
            )
        if approval.paused_at is None:
            return self._refuse(c, incident, step_run, Refusal.NOT_PAUSED)
        # The request re-opens with the time it had left when it was paused.
        deadline = policy.resumed_deadline(
            approval.expires_at, approval.paused_at, c.item.received_at
        )
        resumed = c.u.resume_approval(approval, deadline)
        assert resumed is not None
        c.u.event(
            incident, Event.RESUMED, step_id=step_run.step_id, action=approval.action, actor=user
        )
        if step is not None:
            self._show(c, incident, run, step, step_run, self._total(run), resumed)
        return InboxStatus.DONE, f"resumed by {user}"

    def _expire(self, c: _Context) -> tuple[InboxStatus, str]:
        found = self._request(c)
        if isinstance(found, Refusal):
            return InboxStatus.IGNORED, str(found)
        incident, run, step_run, approval, step = found
        if approval.status is not ApprovalStatus.PENDING or approval.paused_at is not None:
            return InboxStatus.IGNORED, "not pending, or paused"
        if not policy.approval_deadline_passed(c.item.received_at, approval.expires_at, None):
            return InboxStatus.IGNORED, "the deadline moved (paused and resumed)"
        self._expire_request(c, incident, run, step_run, approval, step)
        return InboxStatus.DONE, "expired"

    def _expire_request(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        step_run: StepRun,
        approval: Approval,
        step: Step | None,
    ) -> None:
        metrics.approvals.labels(approval.action, "expired").inc()
        metrics.approval_wait.labels(approval.action, "expired").observe(
            max(approval.expires_at - approval.requested_at, 0.0)
        )
        self._close_request(
            c, incident, step_run, approval, ApprovalStatus.EXPIRED, "", messages.EXPIRED_DETAIL
        )
        current = c.u.run_by_id(run.id) or run
        if current.status is RunStatus.WAITING:
            current = c.u.set_run_status(current, RunStatus.RUNNING) or current
        self._walk(c, incident, current)

    def _close_request(
        self,
        c: _Context,
        incident: IncidentRow,
        step_run: StepRun,
        approval: Approval,
        status: ApprovalStatus,
        actor: str,
        why: str,
    ) -> None:
        """Expire or cancel an approval request and its step, in this transaction."""
        closed = c.u.decide_approval(approval, status, actor, c.u.at)
        assert closed is not None
        step_status = (
            StepStatus.EXPIRED if status is ApprovalStatus.EXPIRED else StepStatus.CANCELLED
        )
        moved = c.u.set_step(step_run, step_status, detail=why)
        assert moved is not None
        c.u.event(
            incident, Event(step_status), step_id=step_run.step_id, action=approval.action,
            actor=actor, detail=why,
        )  # fmt: skip
        run = c.u.run_by_id(step_run.run_id)
        if run is not None:
            step = self._step_of(run, moved)
            if step is not None:
                self._show(c, incident, run, step, moved, self._total(run), closed)

    def _authorize(
        self, c: _Context, incident: IncidentRow, approval: Approval, user: str, step_run: StepRun
    ) -> policy.Authorization:
        approvers = Approvers(approval.approver_users, approval.approver_groups)
        who = policy.authorize(
            user, approvers, member_of=lambda _u, g: g in c.groups, bot_users=self.bot_users
        )
        if not who.allowed and user not in self.bot_users:
            metrics.approvals.labels(approval.action, "unauthorized").inc()
            c.u.event(
                incident, Event.UNAUTHORIZED, step_id=step_run.step_id, action=approval.action,
                actor=user, detail=who.reason,
            )  # fmt: skip
        return who

    def _refuse(
        self,
        c: _Context,
        incident: IncidentRow | None,
        step_run: StepRun | None,
        refusal: Refusal,
        *,
        audited: bool = False,
        **details: Any,
    ) -> tuple[InboxStatus, str]:
        """The decision changed nothing: tell the person who sent it, privately."""
        reason = messages.refusal_text(refusal, **details)
        user = str(c.payload.get("user") or "")
        channel = str(c.payload.get("channel") or (incident.channel if incident else ""))
        bot_itself = user in self.bot_users
        if self.chat and user and channel and not bot_itself and c.payload.get("notify", True):
            step = step_run.step_id if step_run else "this message"
            c.u.emit(
                effects.ephemeral(
                    c.item.incident_id, channel, user,
                    messages.DECIDED_NOTE.format(step=step, reason=reason),
                )
            )  # fmt: skip
        return InboxStatus.IGNORED, f"{refusal}: {reason}"

    # --- after a restart -------------------------------------------------------------------

    def job_for(self, step_run: StepRun) -> Job | None:
        """The job of a step left running (to watch it, or start it again)."""
        with self.store.unit(origin=self.origin) as u:
            incident = u.incident(step_run.incident_id)
            run = u.run_by_id(step_run.run_id)
        if incident is None or run is None:
            return None
        step = self._step_of(run, step_run)
        return self._job(incident, run, step, step_run) if step is not None else None

    def restart(self, step_run: StepRun) -> None:
        """Start a claimed step whose command never started (a crash between its claim
        and its start; its supervisor proves it never ran). Same attempt, new runner."""
        job = self.job_for(step_run)
        if job is None:
            return
        runner = self.executor.reserve(job.placement)
        try:
            with self.store.unit(origin=self.origin) as u:
                moved = u.reassign_runner(step_run, runner)
        except BaseException:
            self.executor.release(runner)
            raise
        if moved is None:
            self.executor.release(runner)
            return
        self.store.sync()
        log.info(
            "incident %s step %s: started again (it never started)",
            step_run.incident_id,
            step_run.step_id,
        )
        self.executor.start(runner, job)

    # --- timers ----------------------------------------------------------------------------

    def due_expiries(self) -> list[dict[str, Any]]:
        """Inbox items for approval requests whose deadline passed (the expiry timer)."""
        return [
            {
                "source": "timer",
                "key": f"expire:{a.id}:{a.expires_at!r}",
                "incident_id": a.incident_id,
                "kind": InboxKind.EXPIRE,
                "payload": {"step_run_id": a.step_run_id, "notify": False},
            }
            for a in self.store.due_approvals(self.clock())
        ]

    def due_guard_ends(self) -> list[dict[str, Any]]:
        """Inbox items ending bot.guard steps whose program never reported (presumed dead):
        their end's key is the one a report would have, so only one of the two counts."""
        cutoff = self.clock() - GUARD_REPORT_SECONDS
        return [
            {
                "source": "timer",
                "key": f"step:{s.id}:{s.attempt}:end",
                "incident_id": s.incident_id,
                "kind": InboxKind.INTERRUPTED,
                "payload": {
                    "step_run_id": s.id,
                    "attempt": s.attempt,
                    "phase": str(Phase.MAIN),  # a guard runbook has one step, in main
                    "detail": messages.guard_never_reported(GUARD_REPORT_SECONDS),
                },
            }
            for s in self.store.running_steps(runner=GUARD_RUNNER, started_before=cutoff)
        ]

    # --- views and notes -------------------------------------------------------------------

    def _show(
        self,
        c: _Context,
        incident: IncidentRow,
        run: Run,
        step: Step,
        step_run: StepRun,
        total: int,
        approval: Approval | None,
    ) -> None:
        if self.chat:
            view = self._step_view(incident, step_run, step, total, run.phase, approval)
            c.u.emit(effects.update_step(view, incident.channel))
            if approval is not None and step_run.status is not StepStatus.AWAITING_APPROVAL:
                c.u.cancel_effects(effects.step_key(step_run.id))  # ✅ ❌ ⏸️ no longer offered

    def _note(self, c: _Context, incident: IncidentRow, text: str) -> None:
        if self.chat:
            c.u.emit(effects.note(incident.id, incident.channel, text))

    def _step_view(
        self,
        incident: IncidentRow,
        step_run: StepRun,
        step: Step,
        total: int,
        phase: Phase,
        approval: Approval | None,
    ) -> StepView:
        action = step.action
        index = step_run.step_index
        position = index - ROLLBACK_INDEX_BASE if index >= ROLLBACK_INDEX_BASE else index
        output = step_run.output
        if len(output) > OUTPUT_EXCERPT_CHARS:
            output = "…" + output[-OUTPUT_EXCERPT_CHARS:]
        return StepView(
            incident_id=incident.id,
            step_run_id=step_run.id,
            step_id=step.id,
            action_id=action.id,
            index=position + 1,
            total=total,
            name=step.name or action.description.split(".")[0],
            description=action.description,
            command=step_run.command or action.command_text,
            shell=action.shell,
            requires_approval=action.safety.requires_approval,
            scopes=action.safety.scopes,
            env=incident.env,
            expect=tuple((e.pattern, e.allow_failure) for e in action.expect),
            state=str(step_run.status),
            reason=step_run.reason,
            phase=str(phase),
            decision=step_run.decision,
            approvers_users=approval.approver_users if approval else (),
            approvers_groups=approval.approver_groups if approval else (),
            expires_at=approval.expires_at if approval else None,
            paused_by=(approval.paused_by or "") if approval else "",
            actor=(approval.decided_by or "") if approval else "",
            detail=step_run.detail,
            output=output,
            duration=step_run.duration,
            exit_code=step_run.exit_code,
            fingerprint=(approval.fingerprint if approval else "")
            or (fingerprint(step_run.command) if step_run.command else ""),
            attempt=step_run.attempt,
            production=self.catalog.settings.is_production(incident.env),
            decided_at=approval.decided_at if approval else None,
            approved_by=approval.approved_by if approval else (),
            approvals_required=approval.required if approval else 1,
        )

    def _incident_view(self, incident: IncidentRow, runbook: Runbook | None) -> IncidentView:
        return IncidentView(
            incident_id=incident.id,
            title=incident.title,
            service=incident.service,
            urgency=incident.urgency,
            env=incident.env,
            link=incident.link,
            channel=incident.channel,
            runbook_id=runbook.id if runbook else None,
            runbook_title=(runbook.title or runbook.id) if runbook else "",
            catalog_version=self.catalog.version,
            step_count=len(runbook.steps) if runbook else 0,
            details=dict(incident.details),
        )

    def _summary(self, u: Unit, incident: IncidentRow) -> str:
        return _summary_of(u.step_runs_of(incident.id))

    # --- helpers ---------------------------------------------------------------------------

    def use_catalog(self, catalog: Catalog) -> None:
        """Serve a newly loaded catalog to new incidents (runs keep theirs)."""
        self._catalogs[catalog.version] = catalog
        self.catalog = catalog

    def _of(self, run: Run) -> Catalog:
        """The catalog a run started with (or was moved to): it finishes on it."""
        version = run.catalog_commit
        found = self._catalogs.get(version)
        if found is None and self.catalog_of is not None and version:
            found = self.catalog_of(version)
            if found is not None:
                self._catalogs[version] = found
        if found is None:
            log.warning(
                "catalog %s of run %s is not available: it goes on with %s",
                version or "(unknown)", run.id, self.catalog.version,
            )  # fmt: skip
            found = self._catalogs[version] = self.catalog
        return found

    def _runbook(self, runbook_id: str, catalog: Catalog | None = None) -> Runbook | None:
        synthetic = guard_runbook(runbook_id)
        if synthetic is not None:
            return synthetic
        # Catalog.runbook scans every runbook; indexed per catalog object.
        cat = catalog or self.catalog
        index = self._runbooks.get(id(cat))
        if index is None:
            if len(self._runbooks) > 64:
                self._runbooks.clear()
            index = self._runbooks[id(cat)] = {r.id: r for r in cat.runbooks}
        return index.get(runbook_id)

    def _run_runbook(self, run: Run) -> Runbook | None:
        return self._runbook(run.runbook_id, self._of(run))

    def _total(self, run: Run) -> int:
        return len(_steps(self._run_runbook(run), run.phase))

    def _step_of(self, run: Run, step_run: StepRun) -> Step | None:
        steps = _steps(self._run_runbook(run), run.phase)
        index = step_run.step_index
        if index >= ROLLBACK_INDEX_BASE:
            original = index - ROLLBACK_INDEX_BASE
            if original < len(steps) and steps[original].on_failure.rollback is not None:
                return _rollback_step(steps[original])
            return None
        return steps[index] if index < len(steps) else None

    def _skip_reason(self, u: Unit, incident: IncidentRow, run: Run, step: Step) -> str:
        if not step.when:
            return ""
        try:
            names = {
                **self._context(incident, step),
                "steps": _results(u.step_runs_of(incident.id), run.id),
            }
            if evaluate(step.when, names):
                return ""
        except (ConditionError, executor.TemplateError) as exc:
            return f"condition could not be evaluated ({exc}): {step.when}"
        return f"condition is false: {step.when}"

    def _context(self, incident: IncidentRow, step: Step) -> dict[str, Any]:
        """What a step's templates see. Param values are rendered first, from the incident
        only (they stay data: each becomes at most one argument); raises TemplateError."""
        incident_context = _incident_context(incident)
        params = executor.render_params(step.resolved_params, {"incident": incident_context})
        return {"incident": incident_context, "params": params}

    def _display_command(self, action: Action, context: Mapping[str, Any], catalog: Catalog) -> str:
        spec = executor.CommandSpec(command=action.command, shell=action.shell)
        argv = executor.render_argv(spec, context)
        patterns: tuple[str | re.Pattern[str], ...] = (
            *executor.DEFAULT_SECRET_PATTERNS,
            *catalog.settings.secret_patterns,
        )
        shown = argv[-1] if action.shell else shlex.join(argv)
        return executor.mask_secrets(shown, (), patterns)


@dataclass
class _Context:
    """What a handler works with: the open transaction, the item, and the jobs to start
    once it commits."""

    u: Unit
    item: InboxItem
    payload: dict[str, Any]
    jobs: list[tuple[str, Job]]
    groups: frozenset[str] = frozenset()  # approver groups the deciding user is in


def _two_person(action: Action, incident: IncidentRow) -> dict[str, Any]:
    """What an approval request of `action` needs beyond one authorized approver."""
    return {
        "required": action.safety.approvals,
        "self_approval": int(action.safety.self_approval),
        "starter": incident.started_by,
    }


def _via(payload: Mapping[str, Any]) -> str:
    """How a decision was given, for the audit log."""
    if "button" in payload:
        return "by button"
    return "by reaction" if payload.get("reaction") else ""


def _steps(runbook: Runbook | None, phase: Phase) -> tuple[Step, ...]:
    if runbook is None:
        return ()
    return runbook.steps if phase is Phase.MAIN else runbook.on_resolve


def _rollback_step(failed: Step) -> Step:
    assert failed.on_failure.rollback is not None
    return Step(
        id=f"{failed.id}:rollback",
        action=failed.on_failure.rollback,
        location=failed.location,
        name=f"Rollback after {failed.id}",
        params=failed.params,
    )


def _incident_context(incident: IncidentRow) -> dict[str, Any]:
    return {
        "id": incident.id,
        "title": incident.title,
        "service": incident.service,
        "service_id": incident.service_id,
        "urgency": incident.urgency,
        "priority": incident.priority,
        "env": incident.env,
        "link": incident.link,
        "status": str(incident.status),
        "details": dict(incident.details),
    }


def _results(step_runs: list[StepRun], run_id: int) -> dict[str, dict[str, Any]]:
    """Results of the incident's steps so far, for `when`: follow-ups on resolve can read
    the main run's, and the current run's own results win over a same-named main step."""
    results: dict[str, dict[str, Any]] = {}
    for s in sorted(step_runs, key=lambda s: (s.run_id == run_id, s.id)):
        # a dry run shows the path the runbook takes when every step succeeds
        status = StepStatus.SUCCESS if s.status is StepStatus.DRY_RUN else s.status
        results[s.step_id] = {
            "step_id": s.step_id,
            "status": str(status),
            "exit_code": s.exit_code,
            "output": s.output,
            "detail": s.detail,
        }
    return results


def _summary_of(step_runs: list[StepRun]) -> str:
    parts = []
    for s in step_runs:
        if s.status is StepStatus.SUPERSEDED:
            continue
        took = f" in {s.duration:.1f}s" if s.duration else ""
        parts.append(f"{s.step_id}: {s.status}{took}")
    return ("Steps: " + "; ".join(parts) + ".") if parts else "No step ran."


def _later(a: str, b: str) -> bool:
    """Is ISO time `a` after `b`? (Unreadable times are never later.)"""
    from datetime import datetime

    try:
        first, second = datetime.fromisoformat(a), datetime.fromisoformat(b)
    except ValueError:
        return False
    if (first.tzinfo is None) != (second.tzinfo is None):
        return False
    return first > second


def incident_item(
    incident: Incident, *, source: str = "bot", occurred_at: str = ""
) -> dict[str, Any]:
    """An inbox item that opens `incident` (for `Inbox.put`)."""
    payload = asdict(incident)
    payload["details"] = dict(incident.details)
    if occurred_at:
        payload["occurred_at"] = occurred_at
    return {
        "source": source,
        "key": f"{source}:open:{incident.id}",
        "incident_id": incident.id,
        "kind": InboxKind.TRIGGERED,
        "payload": payload,
    }
