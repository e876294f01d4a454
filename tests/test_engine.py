"""The incident engine against issue 3, with real subprocesses and a real SQLite file.

Commands are small Python programs run with this interpreter; "did it run" is answered by
a marker file the command appends to, never by spying on the engine.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from builders import (
    APPROVER,
    Clock,
    RecordingChat,
    action,
    catalog,
    py,
    runbook,
    step,
)

from bot import executor
from bot.catalog.model import Approvers, Catalog, OnFailure
from bot.engine import Engine, Incident
from bot.store import Store

MARK = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def marking(path: Path, label: str, *, out: str = "OK", code: int = 0) -> tuple[str, ...]:
    """A command that appends `label` to `path`, prints `out` and exits with `code`."""
    return (*py(f"{MARK}; print({out!r}); raise SystemExit({code})"), str(path), label)


def ran(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class Listener:
    def __init__(self) -> None:
        self.escalations: list[str] = []
        self.finished: list[tuple[str, bool]] = []

    def escalated(self, incident: Mapping[str, Any], reason: str) -> None:
        self.escalations.append(reason)

    def run_finished(
        self, incident: Mapping[str, Any], status: str, summary: str, all_succeeded: bool
    ) -> None:
        self.finished.append((status, all_succeeded))


class Harness:
    def __init__(self, store: Store, tmp: Path) -> None:
        self.store = store
        self.tmp = tmp
        self.marks = tmp / "marks.txt"
        self.chat = RecordingChat()
        self.clock = Clock()
        self.listener = Listener()
        self.engine: Engine | None = None

    def build(self, cat: Catalog, **kwargs: Any) -> Engine:
        kwargs.setdefault("default_env", "staging")
        self.engine = Engine(
            cat,
            self.store,
            self.chat,
            clock=self.clock,
            listeners=[self.listener],
            member_of=lambda user, group: user == "U0GROUPIE" and group == "S0ONCALL",
            bot_users={"U0BOT"},
            **kwargs,
        )
        return self.engine

    def open(self, incident_id: str = "P1", **fields: Any) -> str:
        assert self.engine is not None
        values: dict[str, Any] = {"title": "Payments API elevated 5xx", "service": "payments"}
        values.update(fields)
        return self.engine.open_incident(Incident(id=incident_id, **values))

    def step_runs(self, incident_id: str = "P1") -> dict[str, dict[str, Any]]:
        return {s["step_id"]: s for s in self.store.step_runs_of(incident_id)}

    def statuses(self, incident_id: str = "P1") -> dict[str, str]:
        return {k: v["status"] for k, v in self.step_runs(incident_id).items()}

    def events(self, incident_id: str = "P1") -> list[tuple[str | None, str]]:
        return [(e["action"], e["status"]) for e in self.store.events(incident_id)]

    def run_status(self, incident_id: str = "P1", phase: str = "main") -> str:
        run = self.store.get_run(incident_id, phase)
        assert run is not None
        return str(run["status"])

    def pending(self, incident_id: str = "P1") -> dict[str, Any]:
        (approval,) = self.store.pending_approvals(incident_id)
        return approval


@pytest.fixture
def h(tmp_path: Path) -> Iterator[Harness]:
    store = Store(tmp_path / "state.db")
    yield Harness(store, tmp_path)
    store.close()


def simple(*steps: Any, **kwargs: Any) -> Catalog:
    return catalog(runbook("payments-5xx", steps, symptoms=("5xx",), **kwargs))


def build_guarded_flush(h: Harness) -> Engine:
    """One guarded step whose approval request lasts 60 s on the harness clock."""
    flush = action("clear-cache", marking(h.marks, "flush"), approval=True, approval_timeout=60)
    return h.build(simple(step(flush)))


# --- walking the steps ------------------------------------------------------------------


def test_auto_steps_run_in_order_and_the_run_completes(h: Harness) -> None:
    first = action(
        "check", marking(h.marks, "check", out="rate => 0.5"), expect=[("=> [0-9.]+", False)]
    )
    second = action("verify", marking(h.marks, "verify"))
    h.build(simple(step(first), step(second)))
    h.open()
    assert ran(h.marks) == ["check", "verify"]
    assert h.statuses() == {"check": "success", "verify": "success"}
    assert h.run_status() == "completed"
    assert h.events() == [
        (None, "matched"),
        ("check", "executed"),
        ("check", "succeeded"),
        ("verify", "executed"),
        ("verify", "succeeded"),
    ]
    assert h.listener.finished == [("completed", True)]
    assert h.chat.incidents[0].runbook_id == "payments-5xx"
    assert [v.step_id for v in h.chat.steps] == ["check", "verify"]
    assert h.chat.updates[-1].state == "success"
    assert "rate => 0.5" in h.step_runs()["check"]["output"]
    assert h.chat.notes[-1].startswith("Runbook finished.")
    # every row names the catalog version it was decided under
    assert {e["catalog_commit"] for e in h.store.events("P1")} == {"c0ffee123456"}
    assert {s["catalog_commit"] for s in h.store.step_runs_of("P1")} == {"c0ffee123456"}


def test_allowed_failure_is_recorded_and_the_runbook_goes_on(h: Harness) -> None:
    flush = action(
        "clear-cache",
        marking(h.marks, "flush", out="(empty list or set)", code=1),
        expect=[("OK", False), (r"\(empty list or set\)", True)],
    )
    h.build(simple(step(flush), step(action("after", marking(h.marks, "after")))))
    h.open()
    assert h.statuses() == {"clear-cache": "allowed_failure", "after": "success"}
    assert ("clear-cache", "allowed_failure") in h.events()
    assert h.run_status() == "completed"
    assert h.listener.finished == [("completed", False)]


def test_failure_stops_and_escalates_by_default(h: Harness) -> None:
    broken = action("broken", marking(h.marks, "broken", code=3))
    h.build(simple(step(broken), step(action("never", marking(h.marks, "never")))))
    h.open()
    assert ran(h.marks) == ["broken"]
    assert h.statuses() == {"broken": "failed"}
    assert h.run_status() == "escalated"
    assert h.events()[-2:] == [("broken", "failed"), (None, "escalated")]
    assert h.listener.escalations == ["broken ended failed"]
    assert "non-zero exit code 3" in h.step_runs()["broken"]["detail"]
    assert any("Escalating: broken ended failed" in n for n in h.chat.notes)


def test_on_failure_continue_goes_on(h: Harness) -> None:
    broken = action("diagnose", marking(h.marks, "diagnose", code=1))
    h.build(
        simple(step(broken, on_failure="continue"), step(action("next", marking(h.marks, "next"))))
    )
    h.open()
    assert ran(h.marks) == ["diagnose", "next"]
    assert h.statuses() == {"diagnose": "failed", "next": "success"}
    assert h.run_status() == "completed"


@pytest.mark.parametrize(
    ("then", "run_status", "after"),
    [("stop", "escalated", []), ("continue", "completed", ["after"])],
)
def test_on_failure_rollback(h: Harness, then: str, run_status: str, after: list[str]) -> None:
    undo = action("rollout-undo", marking(h.marks, "undo"))
    deploy = action("deploy", marking(h.marks, "deploy", code=1))
    on_failure = OnFailure("rollback", rollback=undo, then=then)  # type: ignore[arg-type]
    h.build(
        simple(
            step(deploy, on_failure=on_failure), step(action("after", marking(h.marks, "after")))
        )
    )
    h.open()
    assert ran(h.marks) == ["deploy", "undo", *after]
    statuses = h.statuses()
    assert statuses["deploy"] == "failed"
    assert statuses["deploy:rollback"] == "success"
    assert h.run_status() == run_status
    if then == "stop":
        assert h.listener.escalations == ["deploy failed; its rollback rollout-undo ended success"]


def test_rollback_is_not_run_for_a_step_that_never_ran(h: Harness) -> None:
    undo = action("rollout-undo", marking(h.marks, "undo"))
    guarded = action("deploy", marking(h.marks, "deploy"), approval=True)
    h.build(simple(step(guarded, on_failure=OnFailure("rollback", rollback=undo))))
    h.open()
    assert h.engine is not None
    assert h.engine.reject(h.pending()["step_run_id"], APPROVER).ok
    assert ran(h.marks) == []
    assert h.statuses() == {"deploy": "rejected"}
    assert h.run_status() == "escalated"


def test_when_reads_the_incident_and_earlier_results(h: Harness) -> None:
    cat = simple(
        step(action("check", marking(h.marks, "check", code=1)), on_failure="continue"),
        step(
            action("if-check-failed", marking(h.marks, "remedy")),
            when="steps['check'].status == 'failed' and incident.urgency == 'high'",
        ),
        step(
            action("if-check-ok", marking(h.marks, "verify")),
            when="steps['check'].status == 'success'",
        ),
        step(action("bad-when", marking(h.marks, "bad")), when="incident.title()"),
    )
    h.build(cat)
    h.open(urgency="high")
    assert ran(h.marks) == ["check", "remedy"]
    runs = h.step_runs()
    assert runs["if-check-ok"]["status"] == "skipped"
    assert "condition is false" in runs["if-check-ok"]["reason"]
    assert runs["bad-when"]["status"] == "skipped"
    assert "could not be evaluated" in runs["bad-when"]["reason"]
    assert ("if-check-ok", "skipped") in h.events()
    assert h.run_status() == "completed"


def test_no_matching_runbook_is_recorded_and_reported(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))))
    h.open(service="search", title="Search latency")
    incident = h.store.get_incident("P1")
    assert incident is not None and incident["runbook_id"] is None
    assert h.events() == [(None, "no_runbook")]
    assert "no runbook matches service 'search'" in h.store.events("P1")[0]["detail"]
    assert h.chat.incidents[0].runbook_id is None
    assert h.store.get_run("P1") is None
    assert ran(h.marks) == []


def test_a_duplicate_delivery_runs_nothing_twice(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))))
    h.open()
    h.open()
    assert ran(h.marks) == ["check"]
    assert len(h.chat.incidents) == 1


# --- safety: blocked, approvals ----------------------------------------------------------


def test_out_of_scope_is_blocked_without_an_approval_and_says_how_to_promote(h: Harness) -> None:
    flush = action("clear-cache", marking(h.marks, "flush"), approval=True, scopes=("staging",))
    h.build(simple(step(flush)))
    h.open(env="prod")
    run = h.step_runs()["clear-cache"]
    assert run["status"] == "blocked"
    assert "runbookctl promote --action clear-cache --env prod" in run["reason"]
    assert h.store.pending_approvals() == []
    assert h.store.query("SELECT * FROM approvals") == []
    assert ("clear-cache", "blocked") in h.events()
    assert h.run_status() == "escalated"
    assert h.chat.steps[0].state == "blocked"
    assert ran(h.marks) == []


def test_production_scope_without_promotion_is_blocked_at_run_time(h: Harness) -> None:
    restart = action("restart", marking(h.marks, "restart"), scopes=("prod",))
    h.build(simple(step(restart)))
    h.open(env="prod")
    assert h.statuses() == {"restart": "blocked"}
    assert "without a promotion record" in h.step_runs()["restart"]["reason"]
    assert ran(h.marks) == []


def test_environment_comes_from_the_incident_then_the_catalog_then_the_bot(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))), default_env="")
    h.open("NOENV")
    assert h.statuses("NOENV") == {"check": "blocked"}
    assert "no environment" in h.step_runs("NOENV")["check"]["reason"]


def test_approval_flow_runs_the_step_once_after_an_authorized_approval(h: Harness) -> None:
    flush = action("clear-cache", marking(h.marks, "flush"), approval=True, approval_timeout=300)
    h.build(simple(step(flush), step(action("verify", marking(h.marks, "verify")))))
    h.open()
    engine = h.engine
    assert engine is not None
    approval = h.pending()
    assert approval["expires_at"] == h.clock.t + 300
    assert json.loads(approval["approvers"]) == {"users": [APPROVER], "groups": []}
    assert h.statuses() == {"clear-cache": "awaiting_approval"}
    assert h.run_status() == "waiting"
    assert ("clear-cache", "requires_manual") in h.events()
    assert h.chat.steps[0].state == "awaiting_approval"
    assert ran(h.marks) == []

    step_run_id = approval["step_run_id"]
    for user, says in [
        ("U0STRANGER", "not among the approvers"),
        ("U0BOT", "bot's own reactions"),
        ("", "no user"),
    ]:
        outcome = engine.approve(step_run_id, user)
        assert not outcome.ok and says in outcome.message
    assert ("clear-cache", "unauthorized") in h.events()
    assert ran(h.marks) == []

    h.clock.advance(42)
    outcome = engine.approve(step_run_id, APPROVER)
    assert outcome.ok, outcome.message
    assert ran(h.marks) == ["flush", "verify"]
    assert not engine.approve(step_run_id, APPROVER).ok  # already decided
    assert ran(h.marks) == ["flush", "verify"]
    decided = h.store.get_approval(step_run_id)
    assert decided is not None
    assert (decided["status"], decided["decided_by"]) == ("approved", APPROVER)
    assert decided["decided_at"] - decided["requested_at"] == 42
    events = h.store.events("P1")
    approved = next(e for e in events if e["status"] == "approved")
    assert approved["actor"] == APPROVER
    executed = next(e for e in events if e["status"] == "executed" and e["action"] == "clear-cache")
    assert executed["actor"] == APPROVER
    assert h.run_status() == "completed"


def test_group_members_may_approve_and_the_nearest_approvers_win(h: Harness) -> None:
    flush = action(
        "clear-cache",
        marking(h.marks, "flush"),
        approval=True,
        approvers=Approvers(groups=("S0ONCALL",)),
    )
    h.build(simple(step(flush), approvers=Approvers(users=("U0RUNBOOK",))))
    h.open()
    assert h.engine is not None
    step_run_id = h.pending()["step_run_id"]
    assert not h.engine.approve(step_run_id, "U0RUNBOOK").ok  # the action's approvers win
    assert h.engine.approve(step_run_id, "U0GROUPIE").ok
    assert ran(h.marks) == ["flush"]


def test_rejection_stops_and_escalates(h: Harness) -> None:
    h.build(simple(step(action("clear-cache", marking(h.marks, "flush"), approval=True))))
    h.open()
    assert h.engine is not None
    assert h.engine.reject(h.pending()["step_run_id"], APPROVER).ok
    assert h.statuses() == {"clear-cache": "rejected"}
    assert ("clear-cache", "rejected") in h.events()
    assert h.run_status() == "escalated"
    assert ran(h.marks) == []


def test_expiry_is_a_rejection_that_escalates(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    engine = h.engine
    assert engine is not None
    step_run_id = h.pending()["step_run_id"]
    h.clock.advance(59)
    assert engine.expire_due() == 0
    h.clock.advance(1)
    assert engine.expire_due() == 1
    assert h.statuses() == {"clear-cache": "expired"}
    assert ("clear-cache", "expired") in h.events()
    assert h.run_status() == "escalated"
    assert h.listener.escalations == ["the approval request for clear-cache expired"]
    assert not engine.approve(step_run_id, APPROVER).ok
    assert ran(h.marks) == []


def test_approving_after_the_deadline_expires_instead(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    assert h.engine is not None
    h.clock.advance(61)  # the timer has not run yet
    outcome = h.engine.approve(h.pending()["step_run_id"], APPROVER)
    assert not outcome.ok and "expired" in outcome.message
    assert h.statuses() == {"clear-cache": "expired"}
    assert ran(h.marks) == []


def test_pause_holds_the_deadline_and_an_approval_while_paused_still_runs(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    engine = h.engine
    assert engine is not None
    step_run_id = h.pending()["step_run_id"]
    assert not engine.pause(step_run_id, "U0STRANGER").ok
    assert engine.pause(step_run_id, APPROVER).ok
    assert not engine.pause(step_run_id, APPROVER).ok  # already paused
    h.clock.advance(3600)
    assert engine.expire_due() == 0
    assert h.statuses() == {"clear-cache": "awaiting_approval"}
    assert engine.approve(step_run_id, APPROVER).ok
    assert ran(h.marks) == ["flush"]
    assert h.statuses() == {"clear-cache": "success"}


def test_resume_moves_the_deadline_by_the_pause(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    engine = h.engine
    assert engine is not None
    approval = h.pending()
    h.clock.advance(10)
    assert engine.pause(approval["step_run_id"], APPROVER).ok
    h.clock.advance(100)
    assert engine.resume(approval["step_run_id"], APPROVER).ok
    assert h.pending()["expires_at"] == approval["expires_at"] + 100
    assert [s for _, s in h.events()][-2:] == ["paused", "resumed"]
    h.clock.advance(49)
    assert engine.expire_due() == 0
    h.clock.advance(1)
    assert engine.expire_due() == 1


# --- resolve ---------------------------------------------------------------------------


def test_resolve_cancels_pending_approvals_and_runs_the_follow_ups(h: Harness) -> None:
    cat = simple(
        step(action("clear-cache", marking(h.marks, "flush"), approval=True)),
        on_resolve=[step(action("final-check", marking(h.marks, "final")))],
    )
    h.build(cat)
    h.open()
    engine = h.engine
    assert engine is not None
    step_run_id = h.pending()["step_run_id"]
    assert engine.resolve_incident("P1").ok
    assert not engine.resolve_incident("P1").ok  # already resolved
    assert h.store.pending_approvals() == []
    assert h.statuses() == {"clear-cache": "cancelled", "final-check": "success"}
    assert h.run_status() == "cancelled"
    assert h.run_status(phase="on_resolve") == "completed"
    assert ran(h.marks) == ["final"]
    assert not engine.approve(step_run_id, APPROVER).ok
    assert ran(h.marks) == ["final"]
    assert ("clear-cache", "cancelled") in h.events()
    assert (None, "resolved") in h.events()
    assert any(n.startswith("Incident resolved.") for n in h.chat.notes)


def test_follow_ups_can_read_the_main_run_results(h: Harness) -> None:
    cat = simple(
        step(action("check", marking(h.marks, "check"))),
        on_resolve=[
            step(
                action("report", marking(h.marks, "report")),
                when="steps['check'].status == 'success'",
            )
        ],
    )
    h.build(cat)
    h.open()
    assert h.engine is not None
    h.engine.resolve_incident("P1")
    assert ran(h.marks) == ["check", "report"]


# --- the command: injection, timeouts, output, secrets -----------------------------------


HOSTILE = [
    "$(touch {pwned})",
    "`touch {pwned}`",
    "; touch {pwned}",
    "' ; touch {pwned} ; '",
    '" && touch {pwned} && "',
    "a\ntouch {pwned}",
    "{{{{ incident.id }}}} | touch {pwned}",
    "-rf * ..",
]


@pytest.mark.parametrize("shell", [False, True])
@pytest.mark.parametrize("template", HOSTILE)
def test_incident_text_is_data_never_code(h: Harness, template: str, shell: bool) -> None:
    pwned = h.tmp / "pwned"
    title = template.format(pwned=pwned)
    got = h.tmp / "argv.json"
    writer = f"import json, sys; json.dump(sys.argv[1:], open({str(got)!r}, 'w'))"
    if shell:
        command: str | tuple[str, ...] = (
            f'{sys.executable} -c "{writer}" {{{{ incident.title }}}} tail'
        )
    else:
        command = (*py(writer), "{{ incident.title }}", "tail")
    h.build(catalog(runbook("any", [step(action("echo-title", command, shell=shell))])))
    h.open(title=title)
    assert h.statuses()["echo-title"] == "success", h.step_runs()["echo-title"]["detail"]
    assert json.loads(got.read_text()) == [title, "tail"]
    assert not pwned.exists()


def test_a_command_that_ignores_sigterm_is_killed_at_its_timeout(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(executor, "TERMINATE_GRACE_SECONDS", 0.3)
    stubborn = py(
        "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('started', flush=True); time.sleep(30)"
    )
    h.build(
        simple(
            step(action("stubborn", stubborn, timeout=0.5)),
            step(action("never", marking(h.marks, "never"))),
        )
    )
    started = time.monotonic()
    h.open()
    assert time.monotonic() - started < 5
    run = h.step_runs()["stubborn"]
    assert run["status"] == "timeout"
    assert run["exit_code"] == -signal.SIGKILL
    assert "started" in run["output"]
    assert ("stubborn", "timed_out") in h.events()
    assert h.run_status() == "escalated"
    assert ran(h.marks) == []


def test_huge_output_is_capped(h: Harness) -> None:
    noisy = py("import sys; sys.stdout.write('x' * 5_000_000 + '\\nEND\\n')")
    h.build(simple(step(action("noisy", noisy, expect=[("END", False)]))), output_cap=10_000)
    h.open()
    run = h.step_runs()["noisy"]
    assert run["status"] == "success"
    assert len(run["output"]) < 12_000
    assert run["output"].rstrip().endswith("END")
    # the chat gets an excerpt, not the whole output
    assert len(h.chat.updates[-1].output) <= 1_501


def test_secrets_are_masked_in_output_and_audit(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RUNBOOK_TEST_SECRET", "hunter2-very-secret")
    leaky = action(
        "leaky",
        py(
            "import os; print('password=' + os.environ['RUNBOOK_TEST_SECRET']); "
            "print('xoxb-1234567890-abc')"
        ),
        secrets=("RUNBOOK_TEST_SECRET",),
    )
    h.build(simple(step(leaky)))
    h.open()
    rows = json.dumps([h.step_runs(), h.store.events("P1")])
    assert "hunter2" not in rows
    assert "xoxb-1234567890" not in rows
    assert "********" in h.step_runs()["leaky"]["output"]


def test_a_command_that_cannot_start_is_an_error(h: Harness) -> None:
    h.build(simple(step(action("missing", ("/nonexistent/program", "x")))))
    h.open()
    run = h.step_runs()["missing"]
    assert run["status"] == "error"
    assert "could not start" in run["detail"]
    assert h.run_status() == "escalated"


def test_an_unknown_template_variable_is_an_error_before_anything_runs(h: Harness) -> None:
    h.build(
        simple(step(action("templated", (*marking(h.marks, "t"), "{{ incident.details.nope }}"))))
    )
    h.open()
    run = h.step_runs()["templated"]
    assert run["status"] == "error"
    assert "could not build the command" in run["detail"]
    assert ran(h.marks) == []


def test_a_runner_that_raises_ends_the_step_instead_of_leaving_it_running(h: Harness) -> None:
    def exploding(*args: Any, **kwargs: Any) -> executor.ExecutionResult:
        raise RuntimeError("boom: internal detail")

    h.build(simple(step(action("check"))), runner=exploding)
    h.open()
    run = h.step_runs()["check"]
    assert run["status"] == "error"
    assert "boom" not in run["detail"]  # never a raw exception in the thread
    assert h.run_status() == "escalated"


def test_an_env_template_error_at_run_time_is_an_error_step(h: Harness) -> None:
    templated_env = action("env-templated", env={"NS": "{{ incident.details.nope }}"})
    h.build(simple(step(templated_env)))
    h.open()
    run = h.step_runs()["env-templated"]
    assert run["status"] == "error"
    assert "incident.details.nope" in run["detail"]


def test_dry_run_shows_the_path_without_executing(h: Harness) -> None:
    cat = simple(
        step(action("check", marking(h.marks, "check"))),
        step(
            action("only-if-ok", marking(h.marks, "x")), when="steps['check'].status == 'success'"
        ),
    )
    h.build(cat, dry_run=True)
    h.open()
    assert ran(h.marks) == []
    assert h.statuses() == {"check": "dry_run", "only-if-ok": "dry_run"}
    assert "executed" not in {s for _, s in h.events()}
    assert h.run_status() == "completed"


# --- concurrency and restarts in one process ----------------------------------------------


def test_concurrent_approvals_run_the_step_once(h: Harness, tmp_path: Path) -> None:
    flush = action("clear-cache", marking(h.marks, "flush"), approval=True)
    cat = simple(step(flush))
    h.build(cat)
    h.open()
    step_run_id = h.pending()["step_run_id"]
    # two engines on two connections to the same file, as two workers would be
    engines = [h.engine]
    other = Store(tmp_path / "state.db")
    engines.append(Engine(cat, other, RecordingChat(), default_env="staging", clock=h.clock))
    barrier = threading.Barrier(len(engines) * 4)
    results: list[bool] = []

    def approve(engine: Engine) -> None:
        barrier.wait()
        results.append(engine.approve(step_run_id, APPROVER).ok)

    threads = [threading.Thread(target=approve, args=(e,)) for e in engines * 4 if e is not None]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    other.close()
    assert results.count(True) == 1
    assert ran(h.marks) == ["flush"]
    assert [s for a, s in h.events() if a == "clear-cache"].count("executed") == 1


def test_a_crash_between_creating_a_step_and_running_it_runs_it_once_on_restart(
    h: Harness,
) -> None:
    class Crash(BaseException):
        pass

    class CrashingChat(RecordingChat):
        def post_step(self, thread: Any, view: Any) -> Any:
            raise Crash()

    cat = simple(step(action("check", marking(h.marks, "check"))))
    engine = Engine(cat, h.store, CrashingChat(), default_env="staging")
    with pytest.raises(Crash):
        engine.open_incident(Incident(id="P1", title="5xx", service="payments"))
    assert h.statuses() == {"check": "pending"}
    assert ran(h.marks) == []
    restarted = Engine(cat, h.store, RecordingChat(), default_env="staging")
    assert restarted.recover() == {"interrupted": 0, "runs_resumed": 1}
    assert ran(h.marks) == ["check"]
    restarted.recover()
    assert ran(h.marks) == ["check"]


def test_a_step_the_catalog_guards_after_a_restart_is_cancelled_and_escalated(h: Harness) -> None:
    class Crash(BaseException):
        pass

    class CrashingChat(RecordingChat):
        def post_step(self, thread: Any, view: Any) -> Any:
            raise Crash()

    auto = action("check", marking(h.marks, "check"))
    engine = Engine(simple(step(auto)), h.store, CrashingChat(), default_env="staging")
    with pytest.raises(Crash):
        engine.open_incident(Incident(id="P1", title="5xx", service="payments"))
    # the new catalog now requires approval for the action: the pending step may not run
    guarded = simple(step(action("check", marking(h.marks, "check"), approval=True)))
    listener = Listener()
    Engine(guarded, h.store, RecordingChat(), default_env="staging", listeners=[listener]).recover()
    assert ran(h.marks) == []
    assert h.statuses() == {"check": "cancelled"}
    assert h.run_status() == "escalated"
    assert listener.escalations and "check was cancelled" in listener.escalations[0]


def test_a_crash_after_the_incident_row_but_before_its_run_is_finished_on_restart(
    h: Harness,
) -> None:
    class Crash(BaseException):
        pass

    class CrashingChat(RecordingChat):
        def post_incident(self, view: Any) -> Any:
            raise Crash()

    cat = simple(step(action("check", marking(h.marks, "check"))))
    with pytest.raises(Crash):
        Engine(cat, h.store, CrashingChat(), default_env="staging").open_incident(
            Incident(id="P1", title="5xx", service="payments")
        )
    assert h.store.get_run("P1") is None
    Engine(cat, h.store, RecordingChat(), default_env="staging").recover()
    assert ran(h.marks) == ["check"]
    assert h.run_status() == "completed"


def test_a_thread_that_could_not_be_posted_is_posted_on_restart(h: Harness) -> None:
    class DownChat(RecordingChat):
        def post_incident(self, view: Any) -> Any:
            raise ConnectionError("chat is down")

    cat = simple(
        step(action("check", marking(h.marks, "check"))),
        step(action("fix", marking(h.marks, "fix"), approval=True)),
    )
    Engine(cat, h.store, DownChat(), default_env="staging").open_incident(
        Incident(id="P1", title="5xx", service="payments")
    )
    incident = h.store.get_incident("P1")
    assert incident is not None and incident["thread_ts"] is None
    assert ran(h.marks) == ["check"]  # the chat outage did not stop the runbook

    later = RecordingChat()
    Engine(cat, h.store, later, default_env="staging").recover()
    incident = h.store.get_incident("P1")
    assert incident is not None and incident["thread_ts"]
    assert [v.incident_id for v in later.incidents] == ["P1"]
    # the guarded step that never had a message is shown, so it can be approved
    assert [v.step_id for v in later.steps if v.state == "awaiting_approval"] == ["fix"]
    assert ran(h.marks) == ["check"]
