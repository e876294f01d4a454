"""The incident engine: match a runbook, walk its steps, decide, execute, record, advance.

It knows nothing of Slack, PagerDuty or click. Adapters call it:
  * intake: ``open_incident``, ``resolve_incident``, ``reopen_incident``, ``note``;
  * chat: ``approve``, ``reject``, ``pause``, ``resume`` (each returns an ``Outcome``
    whose message the adapter may show to the person who acted);
  * a timer: ``expire_due``; start-up: ``recover``.
It talks back through the chat port (``bot.chat.base.ChatPort``) and notifies
``EngineListener``s (PagerDuty write-back) of escalations and finished runs.

State lives in the store, so any call may be the first after a restart. Everything
that decides whether a command may run is in ``bot.policy``; the store's atomic claim
makes every step run at most once.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shlex
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from bot import executor, metrics, policy
from bot.catalog.model import Action, Approvers, Catalog, Runbook, Step
from bot.chat.base import ChatPort, IncidentView, MessageRef, NullChat, StepView
from bot.conditions import ConditionError, evaluate
from bot.store import STEP_APPROVED, STEP_AWAITING, STEP_PENDING, Store, now

log = logging.getLogger(__name__)

OUTPUT_EXCERPT_CHARS = 1500
ROLLBACK_INDEX_BASE = 10_000  # step_index of the rollback of step i is BASE + i

# step run status -> automation_events status
_RESULT_EVENTS = {
    "success": "succeeded",
    "allowed_failure": "allowed_failure",
    "failed": "failed",
    "timeout": "timed_out",
    "error": "error",
    "dry_run": "dry_run",
}
_MOVES_ON = frozenset({"success", "allowed_failure", "skipped", "dry_run"})
_RAN = frozenset({"failed", "timeout"})  # failures where the command did start


@dataclass(frozen=True)
class Incident:
    id: str
    title: str
    service: str
    service_id: str = ""
    urgency: str = ""
    priority: str = ""
    env: str = ""
    details: Mapping[str, Any] = field(default_factory=dict)
    link: str = ""


@dataclass(frozen=True)
class Outcome:
    ok: bool
    message: str


class EngineListener(Protocol):
    def escalated(self, incident: Mapping[str, Any], reason: str) -> None: ...

    def run_finished(
        self, incident: Mapping[str, Any], status: str, summary: str, all_succeeded: bool
    ) -> None: ...


Runner = Callable[..., executor.ExecutionResult]


class Engine:
    def __init__(
        self,
        catalog: Catalog,
        store: Store,
        chat: ChatPort | None = None,
        *,
        default_env: str = "",
        dry_run: bool = False,
        member_of: policy.MemberOf | None = None,
        bot_users: Collection[str] = (),
        listeners: Iterable[EngineListener] = (),
        runner: Runner = executor.run,
        clock: Callable[[], float] = now,
        output_cap: int = 64_000,
    ) -> None:
        self.catalog = catalog
        self.store = store
        self.chat: ChatPort = chat or NullChat()
        self.default_env = default_env
        self.dry_run = dry_run
        self.member_of: policy.MemberOf = member_of or (lambda user, group: False)
        self.bot_users = set(bot_users)
        # kept, not copied: adapters may register listeners after the engine is built
        self.listeners = listeners if isinstance(listeners, list) else list(listeners)
        self.runner = runner
        self.clock = clock
        self.output_cap = output_cap
        self._locks: dict[str, threading.RLock] = {}
        self._runbook_index: tuple[Catalog | None, dict[str, Runbook]] = (None, {})
        self._locks_guard = threading.Lock()
        self._stopping = threading.Event()

    # --- intake --------------------------------------------------------------------------

    def open_incident(self, incident: Incident) -> str:
        """Start (or, for a duplicate, leave alone) the incident; returns its id."""
        with self._lock(incident.id):
            if self.store.get_incident(incident.id) is not None:
                return incident.id
            details_text = json.dumps(incident.details, sort_keys=True, default=str)
            runbook = self.catalog.match(
                incident.service,
                incident.title,
                service_id=incident.service_id,
                details=details_text,
            )
            env = (
                incident.env
                or self.catalog.environment_for_service(incident.service, incident.service_id)
                or self.default_env
            )
            channel = self.catalog.channel_for(runbook)
            created = self.store.create_incident(
                {
                    "id": incident.id,
                    "title": incident.title,
                    "service": incident.service,
                    "service_id": incident.service_id,
                    "urgency": incident.urgency,
                    "priority": incident.priority,
                    "env": env,
                    "details": dict(incident.details),
                    "link": incident.link,
                    "status": "open",
                    "runbook_id": runbook.id if runbook else None,
                    "catalog_commit": self.catalog.version,
                    "channel": channel,
                    "created_at": self.clock(),
                    "updated_at": self.clock(),
                }
            )
            if not created:
                return incident.id
            metrics.incidents.labels(
                metrics.service_label(incident.service), "yes" if runbook else "no"
            ).inc()
            row = self._incident(incident.id)
            self._event(
                row,
                "matched" if runbook else "no_runbook",
                detail=(
                    f"runbook {runbook.id}"
                    if runbook
                    else f"no runbook matches service {incident.service!r} and "
                    f"symptom {incident.title!r}"
                ),
            )
            self._post_root(row, runbook)
            if runbook is None:
                return incident.id
            self._start_main_run(incident.id, runbook.id)
        self.advance(incident.id)
        return incident.id

    def _start_main_run(self, incident_id: str, runbook_id: str) -> None:
        self.store.create_run(
            {
                "incident_id": incident_id,
                "runbook_id": runbook_id,
                "phase": "main",
                "status": "running",
                "cursor": 0,
                "catalog_commit": self.catalog.version,
                "started_at": self.clock(),
            }
        )

    def resolve_incident(self, incident_id: str, actor: str = "pagerduty") -> Outcome:
        with self._lock(incident_id):
            row = self.store.get_incident(incident_id)
            if row is None:
                return Outcome(False, f"unknown incident {incident_id}")
            if row["status"] == "resolved":
                return Outcome(False, "already resolved")
            runbook = self._runbook(row["runbook_id"] or "")
            # One transaction: after a crash the follow-ups are either all due or not
            # resolved yet; `recover` finishes the rest (`_wind_down` is idempotent).
            with self.store.transaction() as conn:
                conn.execute(
                    "UPDATE incidents SET status = 'resolved', resolved_at = ?, updated_at = ? "
                    "WHERE id = ?",
                    (self.clock(), self.clock(), incident_id),
                )
                if runbook is not None and runbook.on_resolve:
                    conn.execute(
                        "INSERT OR IGNORE INTO runs (incident_id, runbook_id, phase, status, "
                        "cursor, catalog_commit, started_at) "
                        "VALUES (?, ?, 'on_resolve', 'running', 0, ?, ?)",
                        (incident_id, runbook.id, self.catalog.version, self.clock()),
                    )
            row = self._incident(incident_id)
            self._event(row, "resolved", actor=actor)
            self._wind_down(row, actor)
        if runbook is not None and runbook.on_resolve:
            self.advance(incident_id, "on_resolve")
        row = self._incident(incident_id)
        self._note(row, f"Incident resolved. {self.summary(incident_id)}")
        return Outcome(True, "resolved")

    def _wind_down(self, row: dict[str, Any], actor: str) -> None:
        """Cancel what a resolved incident's main run still waits for."""
        for approval in self.store.query(
            "SELECT approvals.* FROM approvals "
            "JOIN step_runs ON step_runs.id = approvals.step_run_id "
            "JOIN runs ON runs.id = step_runs.run_id WHERE approvals.incident_id = ? "
            "AND approvals.status = 'pending' AND runs.phase = 'main' ORDER BY approvals.id",
            (row["id"],),
        ):
            self._close_approval(row, approval, "cancelled", actor, "the incident resolved")
        self.store.execute(
            "UPDATE runs SET status = 'cancelled', finished_at = ? "
            "WHERE incident_id = ? AND phase = 'main' AND status IN ('running', 'waiting')",
            (self.clock(), row["id"]),
        )

    def reopen_incident(self, incident_id: str, actor: str = "pagerduty") -> Outcome:
        with self._lock(incident_id):
            row = self.store.get_incident(incident_id)
            if row is None:
                return Outcome(False, f"unknown incident {incident_id}")
            if row["status"] == "open":
                return Outcome(False, "already open")
            self.store.update(
                "incidents", incident_id, {"status": "open", "updated_at": self.clock()}
            )
            row = self._incident(incident_id)
            self._event(row, "reopened", actor=actor)
        self._note(
            row,
            "Incident reopened. Steps already run are not repeated; re-run them by hand "
            "or trigger a new incident.",
        )
        return Outcome(True, "reopened")

    def note(self, incident_id: str, text: str) -> None:
        row = self.store.get_incident(incident_id)
        if row is not None:
            self._note(row, text)

    # --- the walk ------------------------------------------------------------------------

    def advance(self, incident_id: str, phase: str = "main") -> None:
        """Move the run as far as it can go without a human."""
        with self._lock(incident_id):
            while self._advance_once(incident_id, phase):
                pass

    def stop_taking_work(self) -> None:
        """On shutdown: finish what runs, start nothing new. Runs stay where they are in
        the database and `recover()` takes them up at the next start."""
        self._stopping.set()

    def _advance_once(self, incident_id: str, phase: str) -> bool:
        if self._stopping.is_set():
            return False
        row = self.store.get_incident(incident_id)
        run = self.store.get_run(incident_id, phase)
        if row is None or run is None or run["status"] not in ("running", "waiting"):
            return False
        if phase == "main" and row["status"] != "open":
            return False  # resolving cancels the main run; nothing of it starts any more
        runbook = self._runbook(run["runbook_id"])
        if runbook is None:
            self._finish_run(row, run, "failed", f"runbook {run['runbook_id']} left the catalog")
            return False
        steps = runbook.steps if phase == "main" else runbook.on_resolve
        cursor: int = run["cursor"]
        if cursor >= len(steps):
            self._finish_run(row, run, "completed", "")
            return False
        step = steps[cursor]
        index = cursor
        if run["rollback_of"] is not None and step.on_failure.rollback is not None:
            step = self._rollback_step(step)
            index = ROLLBACK_INDEX_BASE + cursor
        step_run = self.store.latest_step_run(run["id"], index)
        if step_run is None:
            step_run = self._start_step(row, run, runbook, steps, index, step)
        status = step_run["status"]
        if status in (STEP_PENDING, STEP_APPROVED):
            self._execute(row, run, runbook, steps, step, step_run)
            return True
        if status == STEP_AWAITING:
            if run["status"] != "waiting":
                self.store.execute(
                    "UPDATE runs SET status = 'waiting' WHERE id = ? AND status = 'running'",
                    (run["id"],),
                )
            return False
        if status == "running":
            return False  # another worker has it; it will advance when done
        return self._after(row, run, step, index, step_run)

    def _rollback_step(self, failed: Step) -> Step:
        assert failed.on_failure.rollback is not None
        return Step(
            id=f"{failed.id}:rollback",
            action=failed.on_failure.rollback,
            location=failed.location,
            name=f"Rollback after {failed.id}",
            params=failed.params,
        )

    def _after(
        self,
        row: dict[str, Any],
        run: dict[str, Any],
        step: Step,
        index: int,
        step_run: dict[str, Any],
    ) -> bool:
        """A terminal step run: decide where the run goes next."""
        status = step_run["status"]
        cursor = run["cursor"]
        if index >= ROLLBACK_INDEX_BASE:
            original = self._steps_of(run)[cursor]
            if status in _MOVES_ON and original.on_failure.then == "continue":
                return self._move_cursor(run, cursor + 1)
            self._stop(
                row, run, f"{original.id} failed; its rollback {step.action.id} ended {status}"
            )
            return False
        if status in _MOVES_ON:
            return self._move_cursor(run, cursor + 1)
        if status == "expired":
            self._stop(row, run, f"the approval request for {step.id} expired")
            return False
        if status == "interrupted":
            self._stop(row, run, f"{step.id} was interrupted and needs a human to check it")
            return False
        if status == "cancelled":
            # The run is still live (a resolve cancels the run first), so something
            # stopped this step at the last check: a human has to look.
            self._stop(row, run, f"{step.id} was cancelled: {step_run['detail'] or 'no reason'}")
            return False
        mode = step.on_failure.mode
        if mode == "continue":
            return self._move_cursor(run, cursor + 1)
        # A rollback undoes what a command did: only when it started (not when it was
        # blocked, rejected or could not be built or started).
        if mode == "rollback" and step.on_failure.rollback is not None and status in _RAN:
            self.store.execute(
                "UPDATE runs SET rollback_of = ?, status = 'running' WHERE id = ? AND cursor = ? "
                "AND rollback_of IS NULL AND status IN ('running', 'waiting')",
                (cursor, run["id"], cursor),
            )
            return True
        self._stop(row, run, f"{step.id} ended {status}")
        return False

    def _move_cursor(self, run: Mapping[str, Any], to: int) -> bool:
        # Conditional on the cursor read, so a second worker that read the same run late
        # cannot move it back; either way the caller re-reads the run and goes on.
        self.store.execute(
            "UPDATE runs SET cursor = ?, rollback_of = NULL, status = 'running' "
            "WHERE id = ? AND cursor = ? AND status IN ('running', 'waiting')",
            (to, run["id"], run["cursor"]),
        )
        return True

    def _steps_of(self, run: Mapping[str, Any]) -> tuple[Step, ...]:
        runbook = self._runbook(run["runbook_id"])
        if runbook is None:
            return ()
        return runbook.steps if run["phase"] == "main" else runbook.on_resolve

    def _stop(self, row: dict[str, Any], run: dict[str, Any], reason: str) -> None:
        if self._finish_run(row, run, "escalated", reason):  # escalate once, whoever stops it
            self._escalate(row, reason)

    def _finish_run(
        self, row: dict[str, Any], run: dict[str, Any], status: str, reason: str
    ) -> bool:
        changed = self.store.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE id = ? "
            "AND status IN ('running', 'waiting')",
            (status, self.clock(), run["id"]),
        )
        if not changed:
            return False
        summary = self.summary(row["id"], phase=run["phase"])
        results = [
            s["status"] for s in self.store.step_runs_of(row["id"]) if s["phase"] == run["phase"]
        ]
        all_succeeded = status == "completed" and all(r in ("success", "dry_run") for r in results)
        if run["phase"] == "main":
            headline = (
                "Runbook finished." if status == "completed" else f"Runbook stopped: {reason}."
            )
            self._note(row, f"{headline} {summary}")
        for listener in self.listeners:
            self._safely(
                functools.partial(listener.run_finished, row, status, summary, all_succeeded),
                "run_finished listener",
            )
        return True

    def _escalate(self, row: dict[str, Any], reason: str) -> None:
        runbook = self._runbook(row["runbook_id"] or "")
        escalation = self.catalog.escalation_for(runbook)
        self._event(row, "escalated", detail=reason)
        mention = f"{escalation.mention} " if escalation.mention else ""
        self._note(row, f"{mention}Escalating: {reason}.")
        for listener in self.listeners:
            self._safely(functools.partial(listener.escalated, row, reason), "escalation")

    # --- one step ------------------------------------------------------------------------

    def _start_step(
        self,
        row: dict[str, Any],
        run: dict[str, Any],
        runbook: Runbook,
        steps: tuple[Step, ...],
        index: int,
        step: Step,
    ) -> dict[str, Any]:
        """Create the step run with its decision, and show it in the thread."""
        action = step.action
        context = self._context(row, step)
        base: dict[str, Any] = {
            "run_id": run["id"],
            "incident_id": row["id"],
            "step_index": index,
            "step_id": step.id,
            "action": action.id,
            "attempt": 1,
            "created_at": self.clock(),
            "catalog_commit": self.catalog.version,
            "channel": row["channel"],
        }
        skip_reason = self._skip_reason(row, run, step)
        decision = policy.decide(action, row["env"] or "", self.catalog.settings)
        try:
            command = self._display_command(action, context)
            render_error = ""
        except (executor.TemplateError, ValueError) as exc:
            command, render_error = action.command_text, str(exc)
        if skip_reason:
            values = {"status": "skipped", "decision": decision.kind, "reason": skip_reason}
        elif render_error:
            values = {
                "status": "error",
                "decision": decision.kind,
                "reason": decision.reason,  # the thread shows it beside the decision
                "detail": f"could not build the command: {render_error}",
            }
        elif decision.kind == "blocked":
            values = {"status": "blocked", "decision": "blocked", "reason": decision.reason}
        elif decision.kind == "needs_approval":
            values = {"status": STEP_AWAITING, "decision": decision.kind, "reason": decision.reason}
        else:
            values = {"status": STEP_PENDING, "decision": decision.kind, "reason": decision.reason}
        approval: dict[str, Any] | None = None
        if values["status"] == STEP_AWAITING:
            approvers = self.catalog.approvers_for(runbook, action)
            approval = {
                "incident_id": row["id"],
                "action": action.id,
                "status": "pending",
                "approvers": json.dumps(
                    {"users": list(approvers.users), "groups": list(approvers.groups)}
                ),
                "requested_at": self.clock(),
                "expires_at": self.clock() + self.catalog.approval_timeout_for(action),
                "channel": row["channel"],
                "catalog_commit": self.catalog.version,
            }
        step_run_id, created = self.store.create_step_run(
            {**base, **values, "command": command}, approval
        )
        step_run = self.store.get_step_run(step_run_id)
        assert step_run is not None
        if not created:
            return step_run
        status = values["status"]
        if status == "skipped":
            self._event(row, "skipped", step=step, detail=skip_reason)
        elif status == "error":
            if decision.kind != "blocked" and not self.dry_run:
                # A command that cannot be built is a failed attempt of the action: count
                # it, or an action broken by missing alert details would stay invisible.
                metrics.steps_executed.labels(
                    metrics.service_label(row["service"]), action.id, "error"
                ).inc()
            self._event(row, "error", step=step, detail=values["detail"])
        elif status == "blocked":
            metrics.steps_blocked.labels(
                metrics.service_label(row["service"]), action.id, row["env"] or "none"
            ).inc()
            self._event(row, "blocked", step=step, detail=decision.reason)
        elif status == STEP_AWAITING:
            self._event(row, "requires_manual", step=step, detail="waiting for approval")
        self._post_step(row, step_run, step, steps)
        refreshed = self.store.get_step_run(step_run_id)
        assert refreshed is not None
        return refreshed

    def _skip_reason(self, row: Mapping[str, Any], run: Mapping[str, Any], step: Step) -> str:
        if not step.when:
            return ""
        names = {
            "incident": self._incident_context(row),
            "steps": self._results(run),
            "params": step.resolved_params,
        }
        try:
            if evaluate(step.when, names):
                return ""
        except ConditionError as exc:
            return f"condition could not be evaluated ({exc}): {step.when}"
        return f"condition is false: {step.when}"

    def _results(self, run: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
        """Results of the incident's steps so far: follow-ups on resolve can read the main
        run's, and the current run's own results win over a same-named main step."""
        results: dict[str, dict[str, Any]] = {}
        for s in self.store.query(
            "SELECT step_id, status, exit_code, output, detail FROM step_runs "
            "WHERE incident_id = ? ORDER BY run_id = ?, id",
            (run["incident_id"], run["id"]),
        ):
            # a dry run shows the path the runbook takes when every step succeeds
            status = "success" if s["status"] == "dry_run" else s["status"]
            results[s["step_id"]] = {**s, "status": status}
        return results

    def _execute(
        self,
        row: dict[str, Any],
        run: dict[str, Any],
        runbook: Runbook,
        steps: tuple[Step, ...],
        step: Step,
        step_run: dict[str, Any],
    ) -> None:
        action = step.action
        decision = policy.decide(action, row["env"] or "", self.catalog.settings)
        approval = self.store.get_approval(step_run["id"])
        check = policy.may_run(
            decision,
            approval=approval["status"] if approval else "none",
            incident_open=row["status"] == "open" or run["phase"] == "on_resolve",
            # decided while paused: the deadline was waiting, so the approval is in time
            approval_expired=bool(
                approval
                and approval["decided_at"] is not None
                and policy.approval_deadline_passed(
                    approval["decided_at"], approval["expires_at"], approval["paused_at"]
                )
            ),
        )
        if not check.allowed:
            final = "blocked" if decision.blocked else "cancelled"
            if self.store.transition_step(
                step_run["id"],
                (STEP_PENDING, STEP_APPROVED),
                {"status": final, "detail": check.reason},
            ):
                if decision.blocked:  # e.g. a reloaded catalog took the scope away
                    metrics.steps_blocked.labels(
                        metrics.service_label(row["service"]), action.id, row["env"] or "none"
                    ).inc()
                self._event(row, final, step=step, detail=check.reason)
                self._refresh_step(row, step_run["id"], step, steps)
            return
        if not self.store.claim_step(step_run["id"], (STEP_PENDING, STEP_APPROVED)):
            return  # claimed by someone else: at most once
        if not self.dry_run:  # `executed` means a process started: not so in a dry run
            self._event(
                row, "executed", step=step, actor=approval["decided_by"] if approval else ""
            )
            self._refresh_step(row, step_run["id"], step, steps)  # shows "running"
        if self.dry_run:
            values: dict[str, Any] = {
                "status": "dry_run",
                "detail": "not executed (use --execute to run it)",
                "duration": 0.0,
            }
        else:
            result = self._run_command(action, self._context(row, step))
            values = {
                "status": result.status,
                "exit_code": result.exit_code,
                "output": result.output,
                "detail": result.detail,
                "duration": result.duration,
                "command": " ".join(shlex.quote(a) for a in result.argv) or step_run["command"],
            }
            metrics.steps_executed.labels(
                metrics.service_label(row["service"]), action.id, result.status
            ).inc()
            metrics.step_duration.labels(action.id).observe(result.duration)
        values["finished_at"] = self.clock()
        self.store.transition_step(step_run["id"], ("running",), values)
        self._event(row, _RESULT_EVENTS[values["status"]], step=step, detail=values["detail"])
        self._refresh_step(row, step_run["id"], step, steps)

    def _run_command(self, action: Action, context: Mapping[str, Any]) -> executor.ExecutionResult:
        spec = executor.CommandSpec(
            command=action.command,
            shell=action.shell,
            timeout=action.timeout,
            env=dict(action.env),
            secret_env=action.secrets,
            expect=tuple(executor.Expectation(e.pattern, e.allow_failure) for e in action.expect),
        )
        patterns = (*executor.DEFAULT_SECRET_PATTERNS, *self.catalog.settings.secret_patterns)
        try:
            return self.runner(spec, context, output_cap=self.output_cap, secret_patterns=patterns)
        except Exception as exc:
            # The step is claimed: an exception here must still end it, or it would stay
            # `running` until a restart calls it interrupted.
            if isinstance(exc, ValueError):  # TemplateError and spec errors speak to people
                detail = f"could not run: {exc}"
            else:
                log.exception("runner failed for %s", action.id)
                detail = "could not run: unexpected error in the bot (see its log)"
            return executor.ExecutionResult(
                status="error",
                exit_code=None,
                output="",
                duration=0.0,
                argv=(),
                matched=None,
                detail=detail,
            )

    # --- approvals -----------------------------------------------------------------------

    def approve(self, step_run_id: int, user: str) -> Outcome:
        return self._decide(step_run_id, user, "approved")

    def reject(self, step_run_id: int, user: str) -> Outcome:
        return self._decide(step_run_id, user, "rejected")

    def _decide(self, step_run_id: int, user: str, decision: str) -> Outcome:
        step_run = self.store.get_step_run(step_run_id)
        if step_run is None:
            return Outcome(False, "this message is not a step of a runbook")
        incident_id = step_run["incident_id"]
        with self._lock(incident_id):
            row = self._incident(incident_id)
            approval = self.store.get_approval(step_run_id)
            step_run = self.store.get_step_run(step_run_id) or step_run
            if approval is None or step_run["status"] != STEP_AWAITING:
                return Outcome(False, f"this step was already decided ({step_run['status']})")
            step = self._step_of(step_run)
            if approval["status"] != "pending":
                return Outcome(False, f"this step was already decided ({approval['status']})")
            if policy.approval_deadline_passed(
                self.clock(), approval["expires_at"], approval["paused_at"]
            ):
                self._expire(row, approval)
                return Outcome(False, "this approval request has expired")
            if row["status"] != "open" and self._phase(step_run) == "main":
                return Outcome(False, "the incident is no longer open")
            who = self._authorize(row, approval, user, step)
            if not who.allowed:
                return Outcome(False, who.reason)
            if not self.store.decide_approval(step_run_id, decision, user, self.clock()):
                return Outcome(False, "this step was already decided")
            new_status = STEP_APPROVED if decision == "approved" else "rejected"
            self.store.transition_step(step_run_id, (STEP_AWAITING,), {"status": new_status})
            wait = self.clock() - approval["requested_at"]
            metrics.approvals.labels(approval["action"], decision).inc()
            metrics.approval_wait.labels(approval["action"], decision).observe(max(wait, 0.0))
            self._event(row, decision, step=step, actor=user, action_id=approval["action"])
            self._refresh_step(row, step_run_id, step, None)
            run = self.store.query_one("SELECT * FROM runs WHERE id = ?", (step_run["run_id"],))
            if run is not None and run["status"] == "waiting":
                self.store.execute(
                    "UPDATE runs SET status = 'running' WHERE id = ? AND status = 'waiting'",
                    (run["id"],),
                )
        self.advance(incident_id, self._phase(step_run))
        return Outcome(True, f"{decision} by <@{user}>")

    def pause(self, step_run_id: int, user: str) -> Outcome:
        return self._pause(step_run_id, user, pausing=True)

    def resume(self, step_run_id: int, user: str) -> Outcome:
        return self._pause(step_run_id, user, pausing=False)

    def _pause(self, step_run_id: int, user: str, *, pausing: bool) -> Outcome:
        step_run = self.store.get_step_run(step_run_id)
        if step_run is None:
            return Outcome(False, "this message is not a step of a runbook")
        with self._lock(step_run["incident_id"]):
            row = self._incident(step_run["incident_id"])
            approval = self.store.get_approval(step_run_id)
            if approval is None or approval["status"] != "pending":
                return Outcome(False, "there is no pending approval to pause or resume")
            step = self._step_of(step_run)
            who = self._authorize(row, approval, user, step)
            if not who.allowed:
                return Outcome(False, who.reason)
            if pausing:
                if approval["paused_at"] is not None:
                    return Outcome(False, "already paused")
                self.store.execute(
                    "UPDATE approvals SET paused_at = ?, paused_by = ? "
                    "WHERE id = ? AND status = 'pending' AND paused_at IS NULL",
                    (self.clock(), user, approval["id"]),
                )
                self._event(row, "paused", step=step, actor=user)
            else:
                if approval["paused_at"] is None:
                    return Outcome(False, "not paused")
                deadline = policy.resumed_deadline(
                    approval["expires_at"], approval["paused_at"], self.clock()
                )
                self.store.execute(
                    "UPDATE approvals SET paused_at = NULL, paused_by = NULL, expires_at = ? "
                    "WHERE id = ? AND status = 'pending'",
                    (deadline, approval["id"]),
                )
                self._event(row, "resumed", step=step, actor=user)
            self._refresh_step(row, step_run_id, step, None)
        return Outcome(True, "paused" if pausing else "resumed")

    def _authorize(
        self, row: Mapping[str, Any], approval: Mapping[str, Any], user: str, step: Step | None
    ) -> policy.Authorization:
        declared = json.loads(approval["approvers"] or "{}")
        approvers = Approvers(tuple(declared.get("users", ())), tuple(declared.get("groups", ())))
        who = policy.authorize(user, approvers, member_of=self.member_of, bot_users=self.bot_users)
        if not who.allowed and user not in self.bot_users:
            metrics.approvals.labels(approval["action"], "unauthorized").inc()
            self._event(
                row,
                "unauthorized",
                step=step,
                actor=user,
                detail=who.reason,
                action_id=approval["action"],
            )
        return who

    def expire_due(self) -> int:
        """Expire every approval whose deadline passed; returns how many."""
        count = 0
        for approval in self.store.due_approvals(self.clock()):
            with self._lock(approval["incident_id"]):
                row = self._incident(approval["incident_id"])
                fresh = self.store.get_approval(approval["step_run_id"])
                if fresh and fresh["status"] == "pending" and fresh["paused_at"] is None:
                    count += self._expire(row, fresh)
            step_run = self.store.get_step_run(approval["step_run_id"])
            if step_run is not None:
                self.advance(approval["incident_id"], self._phase(step_run))
        return count

    def _expire(self, row: dict[str, Any], approval: Mapping[str, Any]) -> int:
        return self._close_approval(row, approval, "expired", "", "the request expired")

    def _close_approval(
        self, row: dict[str, Any], approval: Mapping[str, Any], status: str, actor: str, why: str
    ) -> int:
        if not self.store.decide_approval(approval["step_run_id"], status, actor, self.clock()):
            return 0
        self.store.transition_step(
            approval["step_run_id"], (STEP_AWAITING,), {"status": status, "detail": why}
        )
        step_run = self.store.get_step_run(approval["step_run_id"])
        step = self._step_of(step_run) if step_run else None
        if status == "expired":
            metrics.approvals.labels(approval["action"], "expired").inc()
            metrics.approval_wait.labels(approval["action"], "expired").observe(
                max(self.clock() - approval["requested_at"], 0.0)
            )
        self._event(row, status, step=step, actor=actor, detail=why, action_id=approval["action"])
        self._refresh_step(row, approval["step_run_id"], step, None)
        return 1

    # --- restart -------------------------------------------------------------------------

    def recover(self) -> dict[str, int]:
        """After a (re)start: surface interrupted steps, re-show unposted ones, go on."""
        interrupted = 0
        for step_run in self.store.running_step_runs():
            if self.store.transition_step(
                step_run["id"],
                ("running",),
                {
                    "status": "interrupted",
                    "detail": "the bot stopped while this step was running; it was not "
                    "re-run. Check its effect and continue by hand.",
                    "finished_at": self.clock(),
                },
            ):
                interrupted += 1
                row = self._incident(step_run["incident_id"])
                step = self._step_of(step_run)
                self._event(row, "interrupted", step=step, detail="bot restarted mid-step")
                self._refresh_step(row, step_run["id"], step, None)
        # A crash (or a chat outage) before the thread existed: post its root now, or
        # every later message of the incident would have nowhere to go.
        for unposted in self.store.query(
            "SELECT id FROM incidents WHERE status = 'open' AND thread_ts IS NULL"
        ):
            with self._lock(unposted["id"]):
                row = self._incident(unposted["id"])
                if not row.get("thread_ts"):
                    self._post_root(row, self._runbook(row["runbook_id"]))
        # A crash in the middle of opening or resolving an incident: finish that first.
        for orphan in self.store.query(
            "SELECT * FROM incidents WHERE status = 'open' AND runbook_id IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM runs WHERE runs.incident_id = incidents.id "
            "AND runs.phase = 'main')"
        ):
            self._start_main_run(orphan["id"], orphan["runbook_id"])
        for resolved in self.store.query(
            "SELECT DISTINCT incidents.id FROM incidents JOIN runs ON runs.incident_id = "
            "incidents.id WHERE incidents.status = 'resolved' AND runs.phase = 'main' "
            "AND runs.status IN ('running', 'waiting')"
        ):
            with self._lock(resolved["id"]):
                self._wind_down(self._incident(resolved["id"]), "recover")
        resumed = 0
        for run in self.store.query(
            "SELECT incident_id, phase FROM runs WHERE status IN ('running', 'waiting')"
        ):
            self._repost_missing(run["incident_id"])
            self.advance(run["incident_id"], run["phase"])
            resumed += 1
        return {"interrupted": interrupted, "runs_resumed": resumed}

    def _post_root(self, row: Mapping[str, Any], runbook: Runbook | None) -> None:
        root = self._say(
            lambda: self.chat.post_incident(self._incident_view(row, runbook)), "root post"
        )
        if root is not None:
            self.store.update(
                "incidents", row["id"], {"channel": root.channel, "thread_ts": root.ts}
            )

    def _repost_missing(self, incident_id: str) -> None:
        row = self._incident(incident_id)
        for step_run in self.store.query(
            "SELECT * FROM step_runs WHERE incident_id = ? AND status = ? AND message_ts IS NULL",
            (incident_id, STEP_AWAITING),
        ):
            step = self._step_of(step_run)
            if step is not None:
                self._post_step(row, step_run, step, None)

    # --- views and chat --------------------------------------------------------------------

    def _post_step(
        self,
        row: dict[str, Any],
        step_run: Mapping[str, Any],
        step: Step,
        steps: tuple[Step, ...] | None,
    ) -> None:
        if not row.get("thread_ts"):
            return
        view = self._step_view(row, step_run, step, steps)
        ref = self._say(
            lambda: self.chat.post_step(MessageRef(row["channel"], row["thread_ts"]), view),
            "step post",
        )
        if ref is not None:
            self.store.update(
                "step_runs", step_run["id"], {"message_ts": ref.ts, "channel": ref.channel}
            )
            self.store.execute(
                "UPDATE approvals SET message_ts = ?, channel = ? WHERE step_run_id = ?",
                (ref.ts, ref.channel, step_run["id"]),
            )

    def _refresh_step(
        self,
        row: dict[str, Any],
        step_run_id: int,
        step: Step | None,
        steps: tuple[Step, ...] | None,
    ) -> None:
        step_run = self.store.get_step_run(step_run_id)
        if step_run is None or step is None:
            return
        if not step_run["message_ts"]:
            self._post_step(row, step_run, step, steps)
            return
        view = self._step_view(row, step_run, step, steps)
        self._say(
            lambda: self.chat.update_step(
                MessageRef(step_run["channel"], step_run["message_ts"]), view
            ),
            "step update",
        )

    def step_view(self, step_run_id: int) -> StepView | None:
        step_run = self.store.get_step_run(step_run_id)
        if step_run is None:
            return None
        step = self._step_of(step_run)
        if step is None:
            return None
        return self._step_view(self._incident(step_run["incident_id"]), step_run, step, None)

    def _step_view(
        self,
        row: Mapping[str, Any],
        step_run: Mapping[str, Any],
        step: Step,
        steps: tuple[Step, ...] | None,
    ) -> StepView:
        action = step.action
        approval = self.store.get_approval(step_run["id"])
        declared = json.loads(approval["approvers"]) if approval and approval["approvers"] else {}
        if steps is None:
            run = self.store.query_one("SELECT * FROM runs WHERE id = ?", (step_run["run_id"],))
            steps = self._steps_of(run) if run else ()
        index = step_run["step_index"]
        position = index - ROLLBACK_INDEX_BASE if index >= ROLLBACK_INDEX_BASE else index
        output = step_run["output"] or ""
        if len(output) > OUTPUT_EXCERPT_CHARS:
            output = "…" + output[-OUTPUT_EXCERPT_CHARS:]
        actor = approval["decided_by"] if approval and approval["decided_by"] else ""
        return StepView(
            incident_id=row["id"],
            step_run_id=step_run["id"],
            step_id=step.id,
            action_id=action.id,
            index=position + 1,
            total=len(steps),
            name=step.name or action.description.split(".")[0],
            description=action.description,
            command=step_run["command"] or action.command_text,
            shell=action.shell,
            requires_approval=action.safety.requires_approval,
            scopes=action.safety.scopes,
            env=row["env"] or "",
            expect=tuple((e.pattern, e.allow_failure) for e in action.expect),
            state=step_run["status"],
            reason=step_run["reason"] or "",
            phase=self._phase(step_run),
            decision=step_run["decision"] or "",
            approvers_users=tuple(declared.get("users", ())),
            approvers_groups=tuple(declared.get("groups", ())),
            expires_at=approval["expires_at"] if approval else None,
            paused_by=(approval["paused_by"] or "") if approval else "",
            actor=actor,
            detail=step_run["detail"] or "",
            output=output,
            duration=step_run["duration"],
            exit_code=step_run["exit_code"],
        )

    def _incident_view(self, row: Mapping[str, Any], runbook: Runbook | None) -> IncidentView:
        return IncidentView(
            incident_id=row["id"],
            title=row["title"],
            service=row["service"],
            urgency=row["urgency"] or "",
            env=row["env"] or "",
            link=row["link"] or "",
            channel=row["channel"],
            runbook_id=runbook.id if runbook else None,
            runbook_title=(runbook.title or runbook.id) if runbook else "",
            catalog_version=self.catalog.version,
            step_count=len(runbook.steps) if runbook else 0,
            details=row["details"],
        )

    def summary(self, incident_id: str, phase: str | None = None) -> str:
        parts = []
        for s in self.store.step_runs_of(incident_id):
            if phase is not None and s["phase"] != phase:
                continue
            took = f" in {s['duration']:.1f}s" if s["duration"] else ""
            parts.append(f"{s['step_id']}: {s['status']}{took}")
        return ("Steps: " + "; ".join(parts) + ".") if parts else "No step ran."

    def _note(self, row: Mapping[str, Any], text: str) -> None:
        if row.get("thread_ts"):
            self._say(
                lambda: self.chat.post_note(MessageRef(row["channel"], row["thread_ts"]), text),
                "note",
            )

    def _say(self, call: Callable[[], Any], what: str) -> Any:
        """Chat failures are logged, never allowed to lose state or stop the runbook."""
        return self._safely(call, what)

    @staticmethod
    def _safely(call: Callable[[], Any], what: str) -> Any:
        try:
            return call()
        except Exception:
            log.exception("%s failed", what)
            return None

    # --- helpers -------------------------------------------------------------------------

    def _runbook(self, runbook_id: str) -> Runbook | None:
        # Catalog.runbook scans every runbook; with thousands of them that scan was a tenth
        # of each step's cost. Indexed per catalog object, so a reloaded catalog is seen.
        if self._runbook_index[0] is not self.catalog:
            self._runbook_index = (self.catalog, {r.id: r for r in self.catalog.runbooks})
        return self._runbook_index[1].get(runbook_id)

    def _lock(self, incident_id: str) -> threading.RLock:
        with self._locks_guard:
            lock = self._locks.get(incident_id)
            if lock is None:
                lock = self._locks[incident_id] = threading.RLock()
            return lock

    def _incident(self, incident_id: str) -> dict[str, Any]:
        row = self.store.get_incident(incident_id)
        if row is None:
            raise KeyError(incident_id)
        return row

    def _phase(self, step_run: Mapping[str, Any]) -> str:
        run = self.store.query_one("SELECT phase FROM runs WHERE id = ?", (step_run["run_id"],))
        return str(run["phase"]) if run else "main"

    def _step_of(self, step_run: Mapping[str, Any]) -> Step | None:
        run = self.store.query_one("SELECT * FROM runs WHERE id = ?", (step_run["run_id"],))
        if run is None:
            return None
        steps = self._steps_of(run)
        index = step_run["step_index"]
        if index >= ROLLBACK_INDEX_BASE:
            original = index - ROLLBACK_INDEX_BASE
            if original < len(steps) and steps[original].on_failure.rollback is not None:
                return self._rollback_step(steps[original])
            return None
        return steps[index] if index < len(steps) else None

    def _incident_context(self, row: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "id": row["id"],
            "title": row["title"],
            "service": row["service"],
            "service_id": row["service_id"] or "",
            "urgency": row["urgency"] or "",
            "priority": row["priority"] or "",
            "env": row["env"] or "",
            "link": row["link"] or "",
            "status": row["status"],
            "details": row["details"] or {},
        }

    def _context(self, row: Mapping[str, Any], step: Step) -> dict[str, Any]:
        return {"incident": self._incident_context(row), "params": step.resolved_params}

    def _display_command(self, action: Action, context: Mapping[str, Any]) -> str:
        spec = executor.CommandSpec(command=action.command, shell=action.shell)
        argv = executor.render_argv(spec, context)
        patterns: tuple[str | re.Pattern[str], ...] = (
            *executor.DEFAULT_SECRET_PATTERNS,
            *self.catalog.settings.secret_patterns,
        )
        shown = argv[-1] if action.shell else shlex.join(argv)
        return executor.mask_secrets(shown, (), patterns)

    def _event(
        self,
        row: Mapping[str, Any],
        status: str,
        *,
        step: Step | None = None,
        actor: str = "",
        detail: str = "",
        action_id: str = "",
    ) -> None:
        self.store.record_event(
            ts=self.clock(),  # the engine's one clock: events line up with approvals
            incident_id=row["id"],
            service=row["service"],
            runbook_id=row["runbook_id"],
            step_id=step.id if step else None,
            action=step.action.id if step else (action_id or None),
            env=row["env"],
            status=status,
            actor=actor or None,
            detail=detail or None,
            catalog_commit=row["catalog_commit"],
        )
