"""The incident state machine, one inbox item at a time, with real subprocesses and a real
SQLite file.

Everything enters through the inbox as the real intake puts it (``bot.local.LocalRuntime``
wires the same store, inbox, engine and outbox without threads). Commands are small Python
programs run with this interpreter; "did it run" is answered by a marker file the command
appends to, never by spying on the engine. What Slack would show is what the outbox
delivered to a recording transport; what PagerDuty would get is in the outbox.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from builders import (
    APPROVER,
    SETTINGS,
    Clock,
    RecordingTransport,
    action,
    catalog,
    py,
    runbook,
    step,
)

from bot import executor
from bot.catalog.model import Approvers, Catalog, OnFailure
from bot.engine import Incident
from bot.local import LocalRuntime
from bot.store import Approval, Store

MARK = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


def marking(path: Path, label: str, *, out: str = "OK", code: int = 0) -> tuple[str, ...]:
    """A command that appends `label` to `path`, prints `out` and exits with `code`."""
    return (*py(f"{MARK}; print({out!r}); raise SystemExit({code})"), str(path), label)


def ran(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


class Harness:
    def __init__(self, store: Store, tmp: Path) -> None:
        self.store = store
        self.target = ""  # the database: a SQLite file or a PostgreSQL URL
        self.tmp = tmp
        self.marks = tmp / "marks.txt"
        self.chat = RecordingTransport()
        self.clock = Clock()
        self.runtime: LocalRuntime | None = None
        self._keys = 0

    def build(self, cat: Catalog, **kwargs: Any) -> LocalRuntime:
        kwargs.setdefault("default_env", "staging")
        kwargs.setdefault("writeback", True)
        self.runtime = LocalRuntime(
            cat,
            self.store,
            transports={"slack": self.chat},
            clock=self.clock,
            member_of=lambda user, group: user == "U0GROUPIE" and group == "S0ONCALL",
            bot_users={"U0BOT"},
            **kwargs,
        )
        return self.runtime

    @property
    def rt(self) -> LocalRuntime:
        assert self.runtime is not None
        return self.runtime

    def open(self, incident_id: str = "P1", **fields: Any) -> str:
        values: dict[str, Any] = {"title": "Payments API elevated 5xx", "service": "payments"}
        values.update(fields)
        return self.rt.open(Incident(id=incident_id, **values))

    def decide(self, step_run_id: int, user: str, verb: str = "approve") -> tuple[bool, str]:
        """Send a decision as a reaction would; (it changed something, why not)."""
        self._keys += 1
        key = f"test:{self._keys}"
        self.rt.decide(step_run_id, user, verb, channel="#incidents", key=key)
        (item,) = [i for i in self.store.inbox_items() if i.key == key]
        return str(item.status) == "done", item.detail

    def approve(self, step_run_id: int, user: str = APPROVER) -> tuple[bool, str]:
        return self.decide(step_run_id, user, "approve")

    def step_runs(self, incident_id: str = "P1") -> dict[str, Any]:
        return {s.step_id: s for s in self.store.step_runs_of(incident_id)}

    def statuses(self, incident_id: str = "P1") -> dict[str, str]:
        return {k: str(v.status) for k, v in self.step_runs(incident_id).items()}

    def events(self, incident_id: str = "P1") -> list[tuple[str | None, str]]:
        return [(e["action"], e["status"]) for e in self.store.events(incident_id)]

    def run_status(self, incident_id: str = "P1", phase: str = "main") -> str:
        run = self.store.run(incident_id, phase)
        assert run is not None
        return str(run.status)

    def pending(self, incident_id: str = "P1") -> Approval:
        (approval,) = self.store.pending_approvals(incident_id)
        return approval

    def escalations(self, incident_id: str = "P1") -> list[str]:
        """What PagerDuty write-back would escalate with (the outbox's pd_escalate rows)."""
        return [
            str(e.payload["reason"])
            for e in self.store.outbox_items(incident_id, target="pagerduty")
            if e.kind == "pd_escalate"
        ]

    def writeback(self, incident_id: str = "P1") -> list[str]:
        return [e.kind for e in self.store.outbox_items(incident_id, target="pagerduty")]


@pytest.fixture
def h(tmp_path: Path, db_target: str) -> Iterator[Harness]:
    """The engine over a fresh store, on each backend."""
    store = Store(db_target)
    harness = Harness(store, tmp_path)
    harness.target = db_target
    yield harness
    store.close()


def simple(*steps: Any, **kwargs: Any) -> Catalog:
    return catalog(runbook("payments-5xx", steps, symptoms=("5xx",), **kwargs))


def build_guarded_flush(h: Harness) -> LocalRuntime:
    """One guarded step whose approval request lasts 60 s on the harness clock; APPROVER
    and the members of S0ONCALL (U0GROUPIE) may decide it."""
    flush = action(
        "clear-cache",
        marking(h.marks, "flush"),
        approval=True,
        approval_timeout=60,
        approvers=Approvers(users=(APPROVER,), groups=("S0ONCALL",)),
    )
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
    assert h.writeback() == ["pd_note"]  # no resolve_on_success in this runbook
    assert h.chat.incidents[0].runbook_id == "payments-5xx"
    assert [v.step_id for v in h.chat.steps] == ["check", "verify"]
    assert h.chat.latest("verify").state == "success"
    assert "rate => 0.5" in h.step_runs()["check"].output
    assert h.chat.notes[-1].startswith("Runbook finished.")
    # every row names the catalog version it was decided under
    assert {e["catalog_commit"] for e in h.store.events("P1")} == {"c0ffee123456"}
    assert {s.catalog_commit for s in h.store.step_runs_of("P1")} == {"c0ffee123456"}


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
    assert h.writeback() == ["pd_note"]


def test_failure_stops_and_escalates_by_default(h: Harness) -> None:
    broken = action("broken", marking(h.marks, "broken", code=3))
    h.build(simple(step(broken), step(action("never", marking(h.marks, "never")))))
    h.open()
    assert ran(h.marks) == ["broken"]
    assert h.statuses() == {"broken": "failed"}
    assert h.run_status() == "escalated"
    assert h.events()[-2:] == [("broken", "failed"), (None, "escalated")]
    assert h.escalations() == ["broken ended failed"]
    assert "non-zero exit code 3" in h.step_runs()["broken"].detail
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
        assert h.escalations() == ["deploy failed; its rollback rollout-undo ended success"]


def test_rollback_is_not_run_for_a_step_that_never_ran(h: Harness) -> None:
    undo = action("rollout-undo", marking(h.marks, "undo"))
    guarded = action("deploy", marking(h.marks, "deploy"), approval=True)
    h.build(simple(step(guarded, on_failure=OnFailure("rollback", rollback=undo))))
    h.open()
    assert h.decide(h.pending().step_run_id, APPROVER, "reject")[0]
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
    assert runs["if-check-ok"].status == "skipped"
    assert "condition is false" in runs["if-check-ok"].reason
    assert runs["bad-when"].status == "skipped"
    assert "could not be evaluated" in runs["bad-when"].reason
    assert ("if-check-ok", "skipped") in h.events()
    assert h.run_status() == "completed"


def test_no_matching_runbook_is_recorded_and_reported(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))))
    h.open(service="search", title="Search latency")
    incident = h.store.incident("P1")
    assert incident is not None and incident.runbook_id is None
    assert h.events() == [(None, "no_runbook")]
    assert "no runbook matches service 'search'" in h.store.events("P1")[0]["detail"]
    assert h.chat.incidents[0].runbook_id is None
    assert h.store.run("P1") is None
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
    assert run.status == "blocked"
    assert "runbookctl promote --action clear-cache --env prod" in run.reason
    assert h.store.pending_approvals() == []
    assert h.store.approval(run.id) is None
    assert ("clear-cache", "blocked") in h.events()
    assert h.run_status() == "escalated"
    assert h.chat.steps[0].state == "blocked"
    assert ran(h.marks) == []


def test_production_scope_without_promotion_is_blocked_at_run_time(h: Harness) -> None:
    restart = action("restart", marking(h.marks, "restart"), scopes=("prod",))
    h.build(simple(step(restart)))
    h.open(env="prod")
    assert h.statuses() == {"restart": "blocked"}
    assert "without a promotion record" in h.step_runs()["restart"].reason
    assert ran(h.marks) == []


def test_environment_comes_from_the_incident_then_the_catalog_then_the_bot(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))), default_env="")
    h.open("NOENV")
    assert h.statuses("NOENV") == {"check": "blocked"}
    assert "no environment" in h.step_runs("NOENV")["check"].reason


def test_approval_flow_runs_the_step_once_after_an_authorized_approval(h: Harness) -> None:
    flush = action("clear-cache", marking(h.marks, "flush"), approval=True, approval_timeout=300)
    h.build(simple(step(flush), step(action("verify", marking(h.marks, "verify")))))
    h.open()
    approval = h.pending()
    assert approval.expires_at == h.clock.t + 300
    assert approval.approvers == {"users": [APPROVER], "groups": []}
    assert h.statuses() == {"clear-cache": "awaiting_approval"}
    assert h.run_status() == "waiting"
    assert ("clear-cache", "requires_manual") in h.events()
    assert h.chat.steps[0].state == "awaiting_approval"
    assert h.chat.reactions == [f"step:{approval.step_run_id}"]  # ✅ ❌ ⏸️ offered
    assert ran(h.marks) == []

    step_run_id = approval.step_run_id
    for user, says in [
        ("U0STRANGER", "not among the approvers"),
        ("U0BOT", "bot's own reactions"),
        ("", "no user"),
    ]:
        ok, why = h.approve(step_run_id, user)
        assert not ok and says in why
    assert ("clear-cache", "unauthorized") in h.events()
    # the stranger is told privately why nothing happened; the bot is not
    assert [u for u, _ in h.chat.ephemerals] == ["U0STRANGER"]
    assert "not among the approvers" in h.chat.ephemerals[0][1]
    assert ran(h.marks) == []

    h.clock.advance(42)
    ok, why = h.approve(step_run_id, APPROVER)
    assert ok, why
    assert ran(h.marks) == ["flush", "verify"]
    assert not h.approve(step_run_id, APPROVER)[0]  # already decided
    assert ran(h.marks) == ["flush", "verify"]
    decided = h.store.approval(step_run_id)
    assert decided is not None
    assert (decided.status, decided.decided_by) == ("approved", APPROVER)
    assert decided.decided_at is not None and decided.decided_at - decided.requested_at == 42
    events = h.store.events("P1")
    approved = next(e for e in events if e["status"] == "approved")
    assert approved["actor"] == APPROVER
    executed = next(e for e in events if e["status"] == "executed" and e["action"] == "clear-cache")
    assert executed["actor"] == APPROVER
    assert h.run_status() == "completed"
    assert h.chat.latest("clear-cache").actor == APPROVER


def test_group_members_may_approve_and_the_nearest_approvers_win(h: Harness) -> None:
    flush = action(
        "clear-cache",
        marking(h.marks, "flush"),
        approval=True,
        approvers=Approvers(groups=("S0ONCALL",)),
    )
    h.build(simple(step(flush), approvers=Approvers(users=("U0RUNBOOK",))))
    h.open()
    step_run_id = h.pending().step_run_id
    assert not h.approve(step_run_id, "U0RUNBOOK")[0]  # the action's approvers win
    assert h.approve(step_run_id, "U0GROUPIE")[0]
    assert ran(h.marks) == ["flush"]


def test_rejection_stops_and_escalates(h: Harness) -> None:
    h.build(simple(step(action("clear-cache", marking(h.marks, "flush"), approval=True))))
    h.open()
    assert h.decide(h.pending().step_run_id, APPROVER, "reject")[0]
    assert h.statuses() == {"clear-cache": "rejected"}
    assert ("clear-cache", "rejected") in h.events()
    assert h.run_status() == "escalated"
    assert ran(h.marks) == []


def test_expiry_is_a_rejection_that_escalates(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    step_run_id = h.pending().step_run_id
    h.clock.advance(59)
    h.rt.expire_due()
    assert h.statuses() == {"clear-cache": "awaiting_approval"}
    h.clock.advance(1)
    h.rt.expire_due()
    assert h.statuses() == {"clear-cache": "expired"}
    assert ("clear-cache", "expired") in h.events()
    assert h.run_status() == "escalated"
    assert h.escalations() == ["the approval request for clear-cache expired"]
    assert not h.approve(step_run_id)[0]
    assert ran(h.marks) == []


def test_approving_after_the_deadline_expires_instead(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    h.clock.advance(61)  # the timer has not run yet
    ok, why = h.approve(h.pending().step_run_id)
    assert not ok and "expired" in why
    assert h.statuses() == {"clear-cache": "expired"}
    assert h.run_status() == "escalated"
    assert ran(h.marks) == []


def test_timeliness_is_judged_at_receipt_not_when_a_busy_worker_gets_to_it(h: Harness) -> None:
    """A ✅ received before the deadline counts, however late it is applied."""
    build_guarded_flush(h)
    h.open()
    step_run_id = h.pending().step_run_id
    h.clock.advance(59)
    h.rt.put(
        source="slack",
        key="slack:event:EvLATE",
        incident_id="P1",
        kind="step.approve",
        payload={"step_run_id": step_run_id, "user": APPROVER, "channel": "#incidents"},
    )
    h.clock.advance(600)  # the inbox is busy elsewhere; the deadline passes meanwhile
    h.rt.expire_due()  # the expiry timer fires before the ✅ is applied
    assert ran(h.marks) == ["flush"]
    assert h.statuses() == {"clear-cache": "success"}
    assert h.run_status() == "completed"


def test_pause_is_a_hold_an_approval_while_paused_is_refused(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    step_run_id = h.pending().step_run_id
    assert not h.decide(step_run_id, "U0STRANGER", "pause")[0]
    assert h.decide(step_run_id, APPROVER, "pause")[0]
    ok, why = h.decide(step_run_id, APPROVER, "pause")
    assert not ok and "already paused" in why
    h.clock.advance(3600)
    h.rt.expire_due()
    assert h.statuses() == {"clear-cache": "awaiting_approval"}  # the deadline waits
    # A second approver's ✅ while ⏸️ stands runs nothing, and says why, privately.
    ok, why = h.approve(step_run_id, "U0GROUPIE")
    assert not ok and "paused by <@U0APPROVER>" in why
    assert (
        "U0GROUPIE",
        f"Your decision on clear-cache changed nothing: {why.split(': ', 1)[1]}.",
    ) in h.chat.ephemerals
    assert ("clear-cache", "refused") in h.events()
    assert ran(h.marks) == []
    assert h.chat.latest("clear-cache").paused_by == APPROVER
    # Removing ⏸️ (here by another approver) re-opens the request; then ✅ runs it.
    assert h.decide(step_run_id, "U0GROUPIE", "resume")[0]
    assert h.approve(step_run_id, "U0GROUPIE")[0]
    assert ran(h.marks) == ["flush"]
    assert h.statuses() == {"clear-cache": "success"}


def test_resume_reopens_the_request_with_the_time_it_had_left(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    approval = h.pending()
    h.clock.advance(10)
    assert h.decide(approval.step_run_id, APPROVER, "pause")[0]
    h.clock.advance(100)
    assert h.decide(approval.step_run_id, APPROVER, "resume")[0]
    assert h.pending().expires_at == approval.expires_at + 100
    assert [s for _, s in h.events()][-2:] == ["paused", "resumed"]
    h.clock.advance(49)
    h.rt.expire_due()
    assert h.statuses() == {"clear-cache": "awaiting_approval"}
    h.clock.advance(1)
    h.rt.expire_due()
    assert h.statuses() == {"clear-cache": "expired"}


def test_a_pause_after_the_deadline_is_too_late(h: Harness) -> None:
    build_guarded_flush(h)
    h.open()
    h.clock.advance(60)
    ok, why = h.decide(h.pending().step_run_id, APPROVER, "pause")
    assert not ok and "expired" in why
    assert h.statuses() == {"clear-cache": "expired"}


# --- resolve ---------------------------------------------------------------------------


def test_resolve_cancels_pending_approvals_and_runs_the_follow_ups(h: Harness) -> None:
    cat = simple(
        step(action("clear-cache", marking(h.marks, "flush"), approval=True)),
        on_resolve=[step(action("final-check", marking(h.marks, "final")))],
    )
    h.build(cat)
    h.open()
    step_run_id = h.pending().step_run_id
    h.rt.resolve("P1")
    h.rt.resolve("P1")  # a second resolve changes nothing
    assert h.store.pending_approvals() == []
    assert h.statuses() == {"clear-cache": "cancelled", "final-check": "success"}
    assert h.run_status() == "cancelled"
    assert h.run_status(phase="on_resolve") == "completed"
    assert ran(h.marks) == ["final"]
    ok, why = h.approve(step_run_id)
    assert not ok and "already decided" in why
    assert ran(h.marks) == ["final"]
    assert ("clear-cache", "cancelled") in h.events()
    assert [e for e in h.events() if e == (None, "resolved")] == [(None, "resolved")]
    assert [n for n in h.chat.notes if n.startswith("Incident resolved.")] != []


def test_a_resolve_received_before_an_approval_wins(h: Harness) -> None:
    """Both are in the inbox before either is applied: receipt order decides."""
    h.build(simple(step(action("clear-cache", marking(h.marks, "flush"), approval=True))))
    h.open()
    step_run_id = h.pending().step_run_id
    h.rt.put(
        source="pagerduty",
        key="pagerduty:event:RESOLVE",
        incident_id="P1",
        kind="incident.resolved",
        payload={"occurred_at": "", "actor": "pagerduty"},
    )
    h.rt.put(
        source="slack",
        key="slack:event:EvAPPROVE",
        incident_id="P1",
        kind="step.approve",
        payload={"step_run_id": step_run_id, "user": APPROVER, "channel": "#incidents"},
    )
    h.rt.settle()
    assert ran(h.marks) == []
    assert h.statuses() == {"clear-cache": "cancelled"}
    (approve,) = [i for i in h.store.inbox_items("P1") if i.key == "slack:event:EvAPPROVE"]
    assert approve.status == "ignored" and "already decided" in approve.detail


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
    h.rt.resolve("P1")
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
    assert h.statuses()["echo-title"] == "success", h.step_runs()["echo-title"].detail
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
    assert run.status == "timeout"
    assert run.exit_code == -signal.SIGKILL
    assert "started" in run.output
    assert ("stubborn", "timed_out") in h.events()
    assert h.run_status() == "escalated"
    assert ran(h.marks) == []


def test_huge_output_is_capped(h: Harness) -> None:
    noisy = py("import sys; sys.stdout.write('x' * 5_000_000 + '\\nEND\\n')")
    h.build(simple(step(action("noisy", noisy, expect=[("END", False)]))), output_cap=10_000)
    h.open()
    run = h.step_runs()["noisy"]
    assert run.status == "success"
    assert len(run.output) < 12_000
    assert run.output.rstrip().endswith("END")
    # the chat gets an excerpt, not the whole output
    assert len(h.chat.latest("noisy").output) <= 1_501


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
    rows = json.dumps(
        [
            h.store.query("SELECT * FROM step_runs"),
            h.store.events("P1"),
            h.store.query("SELECT payload FROM outbox"),
        ]
    )
    assert "hunter2" not in rows
    assert "xoxb-1234567890" not in rows
    assert "********" in h.step_runs()["leaky"].output


def test_a_command_that_cannot_start_is_an_error(h: Harness) -> None:
    h.build(simple(step(action("missing", ("/nonexistent/program", "x")))))
    h.open()
    run = h.step_runs()["missing"]
    assert run.status == "error"
    assert "could not start" in run.detail
    assert h.run_status() == "escalated"


def test_an_unknown_template_variable_is_an_error_before_anything_runs(h: Harness) -> None:
    h.build(
        simple(step(action("templated", (*marking(h.marks, "t"), "{{ incident.details.nope }}"))))
    )
    h.open()
    run = h.step_runs()["templated"]
    assert run.status == "error"
    assert "could not build the command" in run.detail
    assert ran(h.marks) == []


def test_a_runner_that_raises_ends_the_step_instead_of_leaving_it_running(h: Harness) -> None:
    def exploding(*args: Any, **kwargs: Any) -> executor.ExecutionResult:
        raise RuntimeError("boom: internal detail")

    h.build(simple(step(action("check"))), runner=exploding)
    h.open()
    run = h.step_runs()["check"]
    assert run.status == "error"
    assert "boom" not in run.detail  # never a raw exception in the thread
    assert h.run_status() == "escalated"


def test_an_env_template_error_at_run_time_is_an_error_step(h: Harness) -> None:
    templated_env = action("env-templated", env={"NS": "{{ incident.details.nope }}"})
    h.build(simple(step(templated_env)))
    h.open()
    run = h.step_runs()["env-templated"]
    assert run.status == "error"
    assert "incident.details.nope" in run.detail


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


# --- the inbox: order, duplicates, staleness -----------------------------------------------


def test_a_duplicate_item_changes_nothing(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))))
    for _ in range(3):
        assert h.rt.put(
            source="pagerduty",
            key="pagerduty:event:E1",
            incident_id="P1",
            kind="incident.triggered",
            payload={"title": "Payments API elevated 5xx", "service": "payments"},
        ) is (_ == 0)
    h.rt.settle()
    assert ran(h.marks) == ["check"]
    assert len(h.chat.incidents) == 1


def test_an_item_applied_by_another_worker_is_not_applied_again(h: Harness, tmp_path: Path) -> None:
    """Two consumers on one database take the same queued approval: it applies once."""
    cat = simple(step(action("clear-cache", marking(h.marks, "flush"), approval=True)))
    h.build(cat)
    h.open()
    step_run_id = h.pending().step_run_id
    h.rt.put(
        source="slack",
        key="slack:event:EvTWICE",
        incident_id="P1",
        kind="step.approve",
        payload={"step_run_id": step_run_id, "user": APPROVER, "channel": "#incidents"},
    )
    (item,) = h.store.inbox_ready(1)
    other = Store(h.target)
    second = LocalRuntime(cat, other, default_env="staging", clock=h.clock)
    h.rt.engine.apply(item)
    second.engine.apply(item)  # the same (now stale) item, from another worker
    other.close()
    h.rt.settle()
    assert ran(h.marks) == ["flush"]
    assert [s for a, s in h.events() if a == "clear-cache"].count("approved") == 1


def test_a_resolve_that_arrives_before_its_trigger_leaves_no_thread(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))))
    for key, kind, at in [
        ("E2", "incident.resolved", "2026-12-01T10:05:00Z"),
        ("E1", "incident.triggered", "2026-12-01T10:00:00Z"),
    ]:
        h.rt.put(
            source="pagerduty",
            key=f"pagerduty:event:{key}",
            incident_id="P1",
            kind=kind,
            payload={
                "title": "Payments API elevated 5xx",
                "service": "payments",
                "occurred_at": at,
            },
        )
    h.rt.settle()
    assert h.store.incident("P1") is None
    assert h.chat.incidents == []
    assert ran(h.marks) == []


def test_a_late_resolve_does_not_close_an_incident_reopened_since(h: Harness) -> None:
    h.build(simple(step(action("clear-cache", marking(h.marks, "flush"), approval=True))))
    h.rt.put(
        source="pagerduty",
        key="pagerduty:event:E1",
        incident_id="P1",
        kind="incident.triggered",
        payload={"title": "5xx", "service": "payments", "occurred_at": "2026-12-01T10:00:00Z"},
    )
    h.rt.resolve("P1", occurred_at="2026-12-01T10:01:00Z")
    h.rt.put(
        source="pagerduty",
        key="pagerduty:event:E3",
        incident_id="P1",
        kind="incident.reopened",
        payload={"occurred_at": "2026-12-01T10:03:00Z"},
    )
    h.rt.resolve("P1", occurred_at="2026-12-01T10:02:00Z")  # delivered late
    incident = h.store.incident("P1")
    assert incident is not None and incident.status == "open"
    assert [n for n in h.chat.notes if n.startswith("Incident reopened")] != []


def test_notes_from_pagerduty_events_go_to_the_thread(h: Harness) -> None:
    h.build(simple(step(action("check", marking(h.marks, "check")))))
    h.open()
    h.rt.put(
        source="pagerduty",
        key="pagerduty:event:ACK",
        incident_id="P1",
        kind="incident.acknowledged",
        payload={"note": "Acknowledged in PagerDuty by Jane."},
    )
    h.rt.put(
        source="pagerduty",
        key="pagerduty:event:PING",
        incident_id="",
        kind="pagey.ping",
        payload={},
    )
    h.rt.settle()
    assert "Acknowledged in PagerDuty by Jane." in h.chat.notes
    (ping,) = [i for i in h.store.inbox_items() if i.key == "pagerduty:event:PING"]
    assert ping.status == "ignored" and "not acted on" in ping.detail


# --- results that come back after a crash ----------------------------------------------------


def test_an_interrupted_step_escalates_and_is_never_run_again(h: Harness) -> None:
    h.build(
        simple(
            step(action("slow", marking(h.marks, "slow"))),
            step(action("after", marking(h.marks, "after"))),
        ),
        runner=lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()),  # dies mid-step
    )
    with pytest.raises(KeyboardInterrupt):
        h.open()
    (running,) = h.store.running_steps()
    assert running.step_id == "slow" and running.runner == "inline"
    # The restarted bot cannot know what happened: it says so, and escalates.
    h.rt.put(
        source="executor",
        key=f"step:{running.id}:1:end",
        incident_id="P1",
        kind="step.interrupted",
        payload={"step_run_id": running.id, "attempt": 1, "phase": "main", "detail": "gone"},
    )
    h.rt.settle()
    assert h.statuses() == {"slow": "interrupted"}
    assert h.run_status() == "escalated"
    assert h.escalations() == ["slow was interrupted and needs a human to check it"]
    assert ran(h.marks) == []


def test_a_result_recorded_while_the_bot_was_down_continues_the_runbook(h: Harness) -> None:
    h.build(
        simple(
            step(action("slow", marking(h.marks, "slow"))),
            step(action("after", marking(h.marks, "after"))),
        ),
        runner=lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()),
    )
    with pytest.raises(KeyboardInterrupt):
        h.open()
    (running,) = h.store.running_steps()
    h.build(h.rt.engine.catalog)  # the bot is back, with a working runner
    result = {"status": "success", "exit_code": 0, "output": "OK", "detail": "exit 0"}
    for _ in range(2):  # reported twice (a supervisor and a recovery): applied once
        h.rt.put(
            source="executor",
            key=f"step:{running.id}:1:end",
            incident_id="P1",
            kind="step.finished",
            payload={"step_run_id": running.id, "attempt": 1, "phase": "main", **result},
        )
    h.rt.settle()
    assert h.statuses() == {"slow": "success", "after": "success"}
    assert ran(h.marks) == ["after"]
    assert h.run_status() == "completed"


# --- what was approved is what runs ----------------------------------------------------------


def test_an_approval_applies_to_the_command_shown_a_changed_command_asks_again(
    h: Harness,
) -> None:
    """A reload changes what a waiting step would run: its request is void and asked
    again, and only the new rendering, once approved, runs."""
    old = action("clear-cache", (*marking(h.marks, "old"), "db0"), approval=True)
    h.build(simple(step(old)))
    h.open()
    first = h.pending()
    assert h.chat.steps[0].fingerprint == first.fingerprint != ""
    new = action("clear-cache", (*marking(h.marks, "new"), "db1"), approval=True)
    h.rt.engine.use_catalog(
        catalog(runbook("payments-5xx", [step(new)], symptoms=("5xx",)), commit="beef00000001")
    )
    h.rt.put(
        source="bot",
        key="catalog:beef00000001:P1",
        incident_id="P1",
        kind="catalog.loaded",
        payload={"version": "beef00000001"},
    )
    h.rt.settle()
    voided = h.store.approval(first.step_run_id)
    assert voided is not None and voided.status == "void"
    assert not h.approve(first.step_run_id)[0]  # the old rendering can no longer be approved
    second = h.pending()
    assert second.step_run_id != first.step_run_id and second.fingerprint != first.fingerprint
    assert [s.attempt for s in h.store.step_runs_of("P1")] == [1, 2]
    assert ("clear-cache", "superseded") in h.events()
    assert h.chat.latest("clear-cache").attempt == 2
    assert h.store.run("P1") is not None and h.store.run("P1").catalog_commit == "beef00000001"  # type: ignore[union-attr]
    assert h.approve(second.step_run_id)[0]
    assert ran(h.marks) == ["new"]


def test_a_run_finishes_on_the_catalog_it_started_with(h: Harness) -> None:
    """A reload while a run is under way: its next steps come from its own catalog; the
    next incident uses the new one."""
    first = action("check", marking(h.marks, "old-check"))
    second = action("verify", marking(h.marks, "old-verify"), approval=True)
    h.build(simple(step(first), step(second)))
    h.open()
    assert h.statuses() == {"check": "success", "verify": "awaiting_approval"}
    renamed = action("verify", marking(h.marks, "old-verify"), approval=True)
    h.rt.engine.use_catalog(
        catalog(
            runbook(
                "payments-5xx",
                [step(action("check", marking(h.marks, "new-check"))), step(renamed)],
                symptoms=("5xx",),
            ),
            commit="beef00000002",
        )
    )
    assert h.approve(h.pending().step_run_id)[0]  # same rendering: still approved
    h.open("P2")
    assert ran(h.marks) == ["old-check", "old-verify", "new-check"]
    assert {e["catalog_commit"] for e in h.store.events("P2")} == {"beef00000002"}


# --- write-back decisions ----------------------------------------------------------------------


def test_resolve_on_success_writes_a_note_then_resolves(h: Harness) -> None:
    cat = catalog(
        dataclasses.replace(
            runbook("payments-5xx", [step(action("check", marking(h.marks, "check")))]),
            resolve_on_success=True,
        )
    )
    h.build(cat)
    h.open()
    assert h.writeback() == ["pd_note", "pd_resolve"]
    (note, _resolve) = h.store.outbox_items("P1", target="pagerduty")
    assert note.payload["text"].startswith("runbook-bot: runbook payments-5xx (steps) finished.")


def test_no_write_back_when_it_is_not_configured(h: Harness) -> None:
    h.build(simple(step(action("broken", marking(h.marks, "broken", code=1)))), writeback=False)
    h.open()
    assert h.run_status() == "escalated"
    assert h.writeback() == []


def test_a_service_mapped_to_production_is_production_whatever_its_case(h: Harness) -> None:
    """`SVC-PROD` from PagerDuty finds `svc-prod: prod` as runbooks are matched (any case),
    so RUNBOOK_ENV=staging never makes a production incident look like staging."""
    settings = dataclasses.replace(SETTINGS, services={"svc-prod": "prod"})
    restart = action("restart", marking(h.marks, "restart"), scopes=("prod",))
    check = action("check", marking(h.marks, "check"), scopes=("staging",))
    cat = catalog(
        runbook("svc", [step(check), step(restart)], services=("svc-prod",)), settings=settings
    )
    h.build(cat, default_env="staging")
    h.open(service="SVC-PROD", title="down")
    incident = h.store.incident("P1")
    assert incident is not None and incident.env == "prod"
    assert h.statuses() == {"check": "blocked"}  # staging-only: not in production
    assert "not allowed in prod" in h.step_runs()["check"].reason
    assert ran(h.marks) == []


def test_every_incident_event_is_one_info_line_naming_the_incident(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    guarded = action("clear-cache", marking(h.marks, "flush", code=1), approval=True)
    h.build(simple(step(action("check", marking(h.marks, "check"))), step(guarded)))
    h.open()
    h.approve(h.pending().step_run_id)
    lines = [r for r in caplog.records if getattr(r, "incident", None) == "P1"]
    text = "\n".join(r.getMessage() for r in lines)
    for expected in (
        "incident.triggered received",
        "runbook payments-5xx; environment staging",
        "step check (check): running",
        "step check (check): success",
        "step clear-cache (clear-cache): awaiting_approval",
        "step.approve received",
        "clear-cache approved by U0APPROVER",
        "step clear-cache (clear-cache): failed",
        "escalated: clear-cache ended failed",
    ):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert all(r.levelno == logging.INFO for r in lines)


def test_templates_in_params_are_rendered_from_the_incident_and_stay_one_argument(
    h: Harness,
) -> None:
    got = h.tmp / "argv.json"
    writer = f"import json, sys; json.dump(sys.argv[1:], open({str(got)!r}, 'w'))"
    probe = action("probe", (*py(writer), "{{ params.url }}"))
    hostile = "x; touch pwned $(id)"
    h.build(
        simple(
            step(probe, params={"url": "https://{{ incident.details.host }}/healthz"}),
        )
    )
    h.open(details={"host": hostile})
    assert h.statuses() == {"probe": "success"}
    assert json.loads(got.read_text()) == [f"https://{hostile}/healthz"]
    assert not (h.tmp / "pwned").exists()


def test_a_param_naming_a_missing_detail_is_an_error_before_anything_runs(h: Harness) -> None:
    probe = action("probe", (*marking(h.marks, "probe"), "{{ params.url }}"))
    h.build(simple(step(probe, params={"url": "https://{{ incident.details.host }}/"})))
    h.open()
    run = h.step_runs()["probe"]
    assert run.status == "error" and "incident.details.host" in run.detail
    assert ran(h.marks) == []
