"""Run a runbook test through the bot's own engine, executing nothing.

A test is the bot's flow for one incident, wired by ``bot.local.LocalRuntime`` (the same
store, inbox, engine, policy and outbox as the bot) on a fresh in-memory SQLite database:

* the incident enters the inbox as an intake puts it; the engine matches the runbook,
  decides the environment by the bot's rule (``bot.catalog.environment``: the incident's
  own `env`, else the catalog's ``services`` mapping, else the test's ``runbook_env``),
  and walks the steps: policy, ``when``, ``on_failure``, rollbacks and escalation are
  the engine's;
* a claimed step's command goes to the executor's ``runner``, here `ScriptedRunner`: it
  checks and renders the command as a real run does (``executor.prepare``: templates,
  params, env, secrets), starts no process, and returns the result the test assumes,
  judged by the action's ``expect`` (``executor.evaluate_expect``) and masked like real
  output;
* approvals enter the inbox as a responder's reaction would (``LocalRuntime.decide``), so
  who may approve is the catalog's rule; an expiry comes from the engine's timer
  (``LocalRuntime.expire_due``) once the injected clock passes the request's deadline;
* what Slack would show is what the outbox delivers to `ThreadRecorder`.

Audit rows are marked ``origin = 'test'`` (never evidence for a promotion). The clock
starts at the same instant for every test, so the thread reads the same at every run.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot import effects, executor, messages
from bot.catalog.model import Catalog
from bot.engine import Incident
from bot.local import LocalRuntime
from bot.outbox import Retry, Sent
from bot.runbooktests.files import Outcome, RunbookTest
from bot.states import Event, Origin, Phase
from bot.store import Approval, OutboxItem, Store

START = 1_900_000_000.0  # 2030-03-17 17:46:40 UTC, for every test
NO_OUTCOME = "not run: the test gives no outcome for this step"
_PAGERDUTY_KINDS = {
    str(effects.Kind.PD_NOTE): "note",
    str(effects.Kind.PD_ESCALATE): "escalate",
    str(effects.Kind.PD_RESOLVE): "resolve",
}


@dataclass
class Clock:
    """The test's time: moved only to make an approval request expire."""

    t: float = START

    def __call__(self) -> float:
        return self.t


class ThreadRecorder:
    """An outbox transport for Slack that keeps the thread as it reads at the end: every
    message in the order posted, each in its latest rendering (Slack edits in place)."""

    def __init__(self) -> None:
        self.messages: dict[str, str] = {}
        self._ts = 0

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        return ()

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        return ()

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        kind = item.kind
        key = item.key or f"item:{item.id}"
        if kind == effects.Kind.POST_INCIDENT:
            self.messages[key] = messages.incident_text(effects.incident_view(item.payload))
        elif kind in (effects.Kind.POST_STEP, effects.Kind.UPDATE_STEP):
            view = effects.step_view(item.payload)
            self.messages[key] = messages.step_text(view, messages.DEFAULT_REACTIONS)
            if kind == effects.Kind.UPDATE_STEP:
                return Sent()
        elif kind == effects.Kind.NOTE:
            self.messages[f"note:{item.id}"] = str(item.payload["text"])
        elif kind == effects.Kind.EPHEMERAL:
            text = f"(only visible to <@{item.payload['user']}>) {item.payload['text']}"
            self.messages[f"ephemeral:{item.id}"] = text
            return Sent()
        else:
            return Sent()  # reactions offered under a step: not text
        self._ts += 1
        return Sent(ts=f"{self._ts}.000000", channel=item.lane.removeprefix("slack:"))

    @property
    def text(self) -> str:
        return "\n\n".join(self.messages.values())


@dataclass(frozen=True)
class Problem:
    """Something the test itself left open (an outcome missing), found while running."""

    step_id: str
    expected: str  # what the test must say
    actual: str  # what it says
    fix: str


class ScriptedRunner:
    """The executor's runner for a test: the assumed result of each step, no process.

    The engine calls it right after committing a step's claim, in the same thread (the
    runtime has no other), so the step it runs is the incident's one claimed attempt not
    served yet.
    """

    def __init__(self, store: Store, incident_id: str, outcomes: Mapping[str, Outcome]) -> None:
        self.store = store
        self.incident_id = incident_id
        self.outcomes = outcomes
        self.ran: list[str] = []
        self.problems: list[Problem] = []
        self._served: set[int] = set()

    def __call__(
        self,
        spec: executor.CommandSpec,
        context: Mapping[str, Any],
        *,
        output_cap: int,
        secret_patterns: Sequence[str],
    ) -> executor.ExecutionResult:
        claimed = [
            s
            for s in self.store.step_runs_of(self.incident_id)
            if s.status == "running" and s.id not in self._served
        ]
        if len(claimed) != 1:  # the engine claims one step at a time in one thread
            raise RuntimeError(f"expected one claimed step, found {len(claimed)}")
        step = claimed[0]
        self._served.add(step.id)
        # What a real run checks before it starts: templates, params, env, regexes.
        ready = executor.prepare(
            spec, context, output_cap=output_cap, secret_patterns=secret_patterns
        )
        self.ran.append(step.step_id)
        outcome = self.outcomes.get(step.step_id)
        if outcome is None or not outcome.has_result:
            self.problems.append(
                Problem(
                    step.step_id,
                    f"how the command of {step.step_id} ends (it runs)",
                    "the test does not say: it ends in error, and the test fails",
                    f"add `exit_code: 0` and `output: …` (or `timeout: true`, or `error: …`) "
                    f"to `steps.{step.step_id}`",
                )
            )
            return _result("error", None, "", ready.shown_argv, NO_OUTCOME)
        if outcome.timeout:
            return _result(
                "timeout", None, "", ready.shown_argv, f"killed after {spec.timeout:g}s timeout"
            )
        if outcome.error:
            return _result(
                "error",
                None,
                "",
                ready.shown_argv,
                ready.masked(f"could not start: {outcome.error}"),
            )
        output = ready.masked(outcome.output)
        status, _matched, detail = executor.evaluate_expect(spec.expect, outcome.exit_code, output)
        return _result(status, outcome.exit_code, output, ready.shown_argv, detail)


def _result(
    status: executor.ResultStatus,
    exit_code: int | None,
    output: str,
    argv: tuple[str, ...],
    detail: str,
) -> executor.ExecutionResult:
    return executor.ExecutionResult(
        status=status,
        exit_code=exit_code,
        output=output,
        duration=0.0,
        argv=argv,
        matched=None,
        detail=detail,
    )


# --- what happened, and what was expected ------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    runbook: str | None
    env: str | None
    path: tuple[tuple[str, str], ...]  # (step id, final status), in order
    ran: tuple[str, ...]
    approvals: tuple[str, ...]
    status: str  # of the main run; "none" without a runbook
    escalation: str | None  # the reason, when the run escalated
    thread: str
    pagerduty: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "runbook": self.runbook,
            "env": self.env,
            "path": [{step: status} for step, status in self.path],
            "ran": list(self.ran),
            "approvals": list(self.approvals),
            "status": self.status,
            "escalation": self.escalation,
            "thread": self.thread,
            "pagerduty": list(self.pagerduty),
        }


@dataclass(frozen=True)
class Mismatch:
    """One way the test failed: what was expected, what happened, and where it says so."""

    what: str  # `path`, `status`, `steps.clear-cache`, …
    expected: str
    actual: str
    line: int
    fix: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "what": self.what,
            "expected": self.expected,
            "actual": self.actual,
            "line": self.line,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Verdict:
    test: RunbookTest
    observed: Observed
    mismatches: tuple[Mismatch, ...] = field(default=())

    @property
    def passed(self) -> bool:
        return not self.mismatches


def show_path(path: Sequence[tuple[str, str]]) -> str:
    return " → ".join(f"{step} {status}" for step, status in path) or "(no step)"


def _show_list(items: Sequence[str]) -> str:
    return ", ".join(items) if items else "(none)"


# --- running ------------------------------------------------------------------------------


def run_test(catalog: Catalog, test: RunbookTest, *, db: str = ":memory:") -> Verdict:
    """Run one test on a fresh database (in memory unless `db` names a file, e.g. to
    look at its audit rows); the verdict says how it went."""
    store = Store(db)
    try:
        clock = Clock()
        thread = ThreadRecorder()
        incident = Incident(**test.incident)
        runner = ScriptedRunner(store, incident.id, test.steps)
        members = test.members
        runtime = LocalRuntime(
            catalog,
            store,
            transports={"slack": thread},
            runner=runner,
            everywhere=True,  # the scripted runner stands in for every executor
            clock=clock,
            default_env=test.runbook_env,
            member_of=lambda user, group: user in members.get(group, ()),
            writeback=True,
            origin=Origin.TEST,
        )
        runtime.open(incident, source="test")
        asked = _decide(runtime, clock, test, incident.id, runner.problems)
        if test.resolve:
            runtime.resolve(incident.id, actor="test")
            asked += _decide(runtime, clock, test, incident.id, runner.problems)
        observed = _observe(store, incident.id, runner, thread)
    finally:
        store.close()
    # What the test expects first (the path leading), then what it left open or unused.
    mismatches = sorted(_compare(test, observed), key=lambda m: (m.what != "path", m.line))
    mismatches += [_problem(test, p) for p in runner.problems]
    mismatches += _unused(catalog, test, observed, runner, asked)
    return Verdict(test, observed, tuple(mismatches))


def _decide(
    runtime: LocalRuntime,
    clock: Clock,
    test: RunbookTest,
    incident_id: str,
    problems: list[Problem],
) -> list[str]:
    """Answer every approval request as the test says, until none is left to answer;
    returns the steps that asked."""
    asked: list[str] = []
    answered: set[int] = set()
    store = runtime.store
    while True:
        pending = [a for a in store.pending_approvals(incident_id) if a.step_run_id not in answered]
        if not pending:
            return asked
        approval = pending[0]
        answered.add(approval.step_run_id)
        step = store.step_run(approval.step_run_id)
        assert step is not None
        asked.append(step.step_id)
        outcome = test.steps.get(step.step_id)
        decision = outcome.approval if outcome else None
        if decision is None:
            problems.append(
                Problem(
                    step.step_id,
                    f"a decision on the approval {step.step_id} asks for",
                    "the test does not say: it stays pending, and the test fails",
                    f"add `approval: approved by U…` (or `rejected`, `expired`, `pending`) "
                    f"to `steps.{step.step_id}`",
                )
            )
            continue
        if decision.verb == "pending":
            continue
        if decision.verb == "expired":
            clock.t = max(clock.t, approval.expires_at)
            runtime.expire_due()
            continue
        user = decision.user or _first_approver(approval, test)
        if not user:
            problems.append(
                Problem(
                    step.step_id,
                    f"someone to decide {step.step_id} ({decision.verb})",
                    f"its approvers are groups ({', '.join(approval.approver_groups) or 'none'}) "
                    "and the test names no member of them",
                    f"write `approval: {decision.verb} by U…`, or list the group's members "
                    "under `members:`",
                )
            )
            continue
        incident = store.incident(incident_id)
        verb = "approve" if decision.verb == "approved" else "reject"
        runtime.decide(
            approval.step_run_id, user, verb, channel=incident.channel if incident else ""
        )


def _first_approver(approval: Approval, test: RunbookTest) -> str:
    if approval.approver_users:
        return approval.approver_users[0]
    for group in approval.approver_groups:
        if test.members.get(group):
            return test.members[group][0]
    return ""


def _observe(
    store: Store, incident_id: str, runner: ScriptedRunner, thread: ThreadRecorder
) -> Observed:
    incident = store.incident(incident_id)
    steps = store.step_runs_of(incident_id)
    run = store.run(incident_id, Phase.MAIN)
    escalations = [
        str(e["detail"] or "") for e in store.events(incident_id) if e["status"] == Event.ESCALATED
    ]
    return Observed(
        runbook=incident.runbook_id if incident else None,
        env=(incident.env or None) if incident else None,
        path=tuple((s.step_id, str(s.status)) for s in steps),
        ran=tuple(runner.ran),
        approvals=tuple(dict.fromkeys(s.step_id for s in steps if s.decision == "needs_approval")),
        status=str(run.status) if run else "none",
        escalation=escalations[0] if escalations else None,
        thread=thread.text,
        pagerduty=tuple(
            _PAGERDUTY_KINDS.get(item.kind, item.kind)
            for item in store.outbox_items(incident_id, target=effects.PAGERDUTY)
        ),
    )


def _problem(test: RunbookTest, problem: Problem) -> Mismatch:
    return Mismatch(
        what=f"steps.{problem.step_id}",
        expected=problem.expected,
        actual=problem.actual,
        line=_line_of_step(test, problem.step_id),
        fix=problem.fix,
    )


def _line_of_step(test: RunbookTest, step_id: str) -> int:
    if step_id in test.steps:
        return test.where("steps", step_id, key=True)
    return test.where("steps", key=True) if test.steps else test.line


def _unused(
    catalog: Catalog,
    test: RunbookTest,
    observed: Observed,
    runner: ScriptedRunner,
    asked: Sequence[str],
) -> list[Mismatch]:
    """Outcomes the run never used: a step the runbook does not have, a command that never
    ran, a decision nobody asked for. Each says the test's picture differs from the
    catalog's, so it fails rather than pass on a path nobody checked."""
    runbook = next((r for r in catalog.runbooks if r.id == observed.runbook), None)
    if runbook is None:
        if not test.steps or test.expect.get("runbook", "") is None:
            return []  # `expect.runbook` says what matched; nothing more to say
        return [
            Mismatch(
                "steps",
                "a runbook whose steps the test gives outcomes for",
                f"no runbook matches service {test.incident['service']!r} with title "
                f"{test.incident['title']!r}",
                test.where("steps", key=True),
                "check the incident's service and title against the runbooks' `match:` "
                "(runbookctl simulate shows the same)",
            )
        ]
    known: list[str] = []
    if runbook is not None:
        for step in (*runbook.steps, *runbook.on_resolve):
            known.append(step.id)
            if step.on_failure.rollback is not None:
                known.append(f"{step.id}:rollback")
    final = dict(observed.path)
    found: list[Mismatch] = []
    for step_id, outcome in test.steps.items():
        line = test.where("steps", step_id, key=True)
        if step_id not in known:
            close = difflib.get_close_matches(step_id, known, n=1)
            found.append(
                Mismatch(
                    f"steps.{step_id}",
                    f"a step of runbook {runbook.id}",
                    f"it has no step {step_id!r}",
                    line,
                    f"did you mean `{close[0]}`?" if close else f"its steps: {_show_list(known)}",
                )
            )
            continue
        state = final.get(step_id, "not reached")
        if outcome.has_result and step_id not in runner.ran:
            found.append(
                Mismatch(
                    f"steps.{step_id}",
                    f"the command of {step_id} runs (the test says how it ends)",
                    f"it never ran ({state})",
                    line,
                    "fix the expectation, or remove the outcome the run never uses",
                )
            )
        if outcome.approval is not None and step_id not in asked:
            found.append(
                Mismatch(
                    f"steps.{step_id}.approval",
                    f"{step_id} asks for approval ({outcome.approval})",
                    f"it never asked ({state})",
                    test.where("steps", step_id, "approval"),
                    "fix the expectation, or remove the decision the run never uses",
                )
            )
    return found


def _compare(test: RunbookTest, observed: Observed) -> list[Mismatch]:
    expect = test.expect
    found: list[Mismatch] = []

    def differ(what: str, expected: str, actual: str) -> None:
        found.append(Mismatch(what, expected, actual, test.where("expect", what, key=True)))

    if "runbook" in expect and expect["runbook"] != observed.runbook:
        differ("runbook", str(expect["runbook"] or "none"), observed.runbook or "none")
    if "env" in expect and (expect["env"] or None) != observed.env:
        differ("env", str(expect["env"] or "none"), observed.env or "none")
    if "path" in expect:
        wanted = tuple((str(k), str(v)) for item in expect["path"] for k, v in item.items())
        if wanted != observed.path:
            differ("path", show_path(wanted), show_path(observed.path))
    for key, actual in (("ran", observed.ran), ("approvals", observed.approvals)):
        if key in expect and tuple(expect[key]) != actual:
            differ(key, _show_list(expect[key]), _show_list(actual))
    if "status" in expect and expect["status"] != observed.status:
        differ("status", str(expect["status"]), observed.status)
    if "escalation" in expect:
        wanted_escalation = expect["escalation"]
        got = observed.escalation
        if wanted_escalation is False and got is not None:
            differ("escalation", "no escalation", f"escalated: {got}")
        elif wanted_escalation is True and got is None:
            differ("escalation", "an escalation", "no escalation")
        elif isinstance(wanted_escalation, str) and (got is None or wanted_escalation not in got):
            differ(
                "escalation",
                f"escalated with a reason containing {wanted_escalation!r}",
                f"escalated: {got}" if got is not None else "no escalation",
            )
    if "thread" in expect:
        at = 0
        for index, text in enumerate(expect["thread"]):
            found_at = observed.thread.find(text, at)
            if found_at < 0:
                earlier = observed.thread.find(text) >= 0
                found.append(
                    Mismatch(
                        "thread",
                        f"the thread shows {text!r}",
                        "it does, but before the text expected ahead of it"
                        if earlier
                        else "it does not",
                        test.where("expect", "thread", index),
                    )
                )
                break
            at = found_at + len(text)
    for index, text in enumerate(expect.get("not_in_thread", ())):
        if text in observed.thread:
            found.append(
                Mismatch(
                    "not_in_thread",
                    f"the thread never shows {text!r}",
                    "it does",
                    test.where("expect", "not_in_thread", index),
                )
            )
    if "pagerduty" in expect and tuple(expect["pagerduty"]) != observed.pagerduty:
        differ("pagerduty", _show_list(expect["pagerduty"]), _show_list(observed.pagerduty))
    return found


__all__ = [
    "START",
    "Clock",
    "Mismatch",
    "Observed",
    "ScriptedRunner",
    "ThreadRecorder",
    "Verdict",
    "run_test",
    "show_path",
]
