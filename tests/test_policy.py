"""bot.policy, exhaustively: every combination of what the safety decision depends on.

The grid: environment (lower, production, undeclared, none) x in the action's scopes or not
x promotion record (absent, https, not https) x requires_approval x approval state x
incident open or closed x approval given after the deadline. The expected answer is
written from DESIGN.md section 3, independently of the code's branch order.
"""

from __future__ import annotations

import itertools
from typing import get_args

import pytest
from builders import action

from bot import policy
from bot.catalog.model import Approvers, Environment, Promotion, Settings

SETTINGS = Settings(
    environments=(
        Environment("dev"),
        Environment("staging"),
        Environment("prod", production=True),
        Environment("live", production=True),
    )
)
ENVS = ("dev", "staging", "prod", "live", "qa", "")  # qa: not declared; "": unknown
PROMOTIONS = {
    "absent": None,
    "https": "https://wiki.example.com/promotions/x",
    "http": "http://wiki.example.com/promotions/x",
    "empty": "",
}
APPROVAL_STATES: tuple[policy.ApprovalState, ...] = get_args(policy.ApprovalState)


def expected_kind(env: str, in_scope: bool, promotion: str | None, approval: bool) -> str:
    if env not in SETTINGS.environment_names:  # includes "" (no environment known)
        return "blocked"
    if not in_scope:
        return "blocked"
    production = env in ("prod", "live")
    if production and not (promotion or "").startswith("https://"):
        return "blocked"
    return "needs_approval" if approval else "auto"


def expected_may_run(kind: str, state: str, incident_open: bool, late: bool) -> bool:
    if not incident_open or kind == "blocked":
        return False
    if kind == "auto":
        return True
    return state == "approved" and not late


def test_approval_states_cover_the_audit_vocabulary() -> None:
    assert set(APPROVAL_STATES) == {
        "none",
        "pending",
        "approved",
        "rejected",
        "expired",
        "cancelled",
    }


@pytest.mark.parametrize("env", ENVS)
def test_decide_and_may_run_over_the_whole_grid(env: str) -> None:
    checked = 0
    for in_scope, (promo_name, url), requires_approval in itertools.product(
        (True, False), PROMOTIONS.items(), (True, False)
    ):
        scopes = ("dev", "staging", "prod", "live") if in_scope else ("dev",)
        if in_scope is False and env == "dev":
            scopes = ("staging",)
        promotions = (
            ()
            if url is None
            else tuple(Promotion(env=e, evidence_url=url, by="sre") for e in ("prod", "live"))
        )
        act = action(
            "restart-api", approval=requires_approval, scopes=scopes, promotions=promotions
        )
        decision = policy.decide(act, env, SETTINGS)
        kind = expected_kind(env, env in scopes, url, requires_approval)
        where = f"env={env!r} scopes={scopes} promotion={promo_name} approval={requires_approval}"
        assert decision.kind == kind, where
        assert decision.blocked == (kind == "blocked")
        assert decision.reason, where
        if kind == "blocked" and env in SETTINGS.environment_names:
            # blocked for scope or promotion: the thread says how to promote
            assert f"runbookctl promote --action restart-api --env {env}" in decision.reason
        for state, incident_open, late in itertools.product(
            APPROVAL_STATES, (True, False), (True, False)
        ):
            check = policy.may_run(
                decision, approval=state, incident_open=incident_open, approval_expired=late
            )
            want = expected_may_run(kind, state, incident_open, late)
            assert check.allowed is want, f"{where} state={state} open={incident_open} late={late}"
            assert check.reason
            checked += 1
    assert checked == 2 * len(PROMOTIONS) * 2 * len(APPROVAL_STATES) * 2 * 2


def test_blocked_reasons_say_why() -> None:
    out_of_scope = policy.decide(action("clear-cache", scopes=("staging",)), "prod", SETTINGS)
    assert "clear-cache is not allowed in prod (scopes: staging)" in out_of_scope.reason
    no_scopes = policy.decide(action("x", scopes=()), "dev", SETTINGS)
    assert "scopes: none" in no_scopes.reason
    unpromoted = policy.decide(action("x", scopes=("prod",)), "prod", SETTINGS)
    assert "without a promotion record" in unpromoted.reason
    undeclared = policy.decide(action("x", scopes=("qa",)), "qa", SETTINGS)
    assert "not declared in the catalog" in undeclared.reason
    assert "dev, staging, prod, live" in undeclared.reason
    unknown = policy.decide(action("x"), "", SETTINGS)
    assert "RUNBOOK_ENV" in unknown.reason


def test_promotion_for_another_environment_does_not_count() -> None:
    act = action(
        "x",
        scopes=("prod", "live"),
        promotions=(Promotion(env="live", evidence_url="https://e.example/1"),),
    )
    assert policy.decide(act, "live", SETTINGS).kind == "auto"
    assert policy.decide(act, "prod", SETTINGS).kind == "blocked"


def test_may_run_reasons() -> None:
    needs = policy.Decision("needs_approval", "requires approval")
    assert policy.may_run(needs, approval="pending", incident_open=True).reason == (
        "waiting for approval"
    )
    assert "rejected" in policy.may_run(needs, approval="rejected", incident_open=True).reason
    late = policy.may_run(needs, approval="approved", incident_open=True, approval_expired=True)
    assert "expired" in late.reason
    closed = policy.may_run(needs, approval="approved", incident_open=False)
    assert closed.reason == "the incident is no longer open"


# --- who may approve ------------------------------------------------------------------


def groups(mapping: dict[str, set[str]]) -> policy.MemberOf:
    return lambda user, group: user in mapping.get(group, set())


APPROVERS = Approvers(users=("U1",), groups=("S1",))
MEMBERS = groups({"S1": {"U2"}, "S2": {"U3"}})


@pytest.mark.parametrize(
    ("user", "approvers", "bots", "allowed", "says"),
    [
        ("U1", APPROVERS, (), True, "listed approver"),
        ("U2", APPROVERS, (), True, "member of S1"),
        ("U3", APPROVERS, (), False, "<@U3> is not among the approvers"),
        ("U9", APPROVERS, (), False, "is not among the approvers"),
        ("", APPROVERS, (), False, "no user"),
        ("U1", APPROVERS, ("U1",), False, "bot's own reactions never count"),
        ("U2", APPROVERS, ("U2",), False, "bot's own reactions never count"),
        ("U1", Approvers(), (), False, "declare `approvers`"),
    ],
)
def test_authorize(
    user: str, approvers: Approvers, bots: tuple[str, ...], allowed: bool, says: str
) -> None:
    who = policy.authorize(user, approvers, member_of=MEMBERS, bot_users=bots)
    assert who.allowed is allowed
    assert says in who.reason


def test_group_lookup_only_for_declared_groups() -> None:
    asked: list[tuple[str, str]] = []

    def member_of(user: str, group: str) -> bool:
        asked.append((user, group))
        return False

    policy.authorize("U5", APPROVERS, member_of=member_of)
    assert asked == [("U5", "S1")]


# --- deadlines ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "expires", "paused", "passed"),
    [
        (99.0, 100.0, None, False),
        (100.0, 100.0, None, True),  # the deadline itself is too late
        (500.0, 100.0, None, True),
        (500.0, 100.0, 50.0, False),  # a paused request never expires
        (100.0, 100.0, 100.0, False),
    ],
)
def test_approval_deadline(now: float, expires: float, paused: float | None, passed: bool) -> None:
    assert policy.approval_deadline_passed(now, expires, paused) is passed


def test_resumed_deadline_moves_by_the_pause() -> None:
    assert policy.resumed_deadline(100.0, 40.0, 70.0) == 130.0
    assert policy.resumed_deadline(100.0, 40.0, 30.0) == 100.0  # clock skew never shortens it


def test_promote_hint_is_a_command_line() -> None:
    hint = policy.promote_hint("clear-cache", "prod")
    assert hint.startswith("runbookctl promote --action clear-cache --env prod --evidence-url")


def test_may_approve_needs_a_different_person_each_time_and_not_the_starter() -> None:
    from bot.policy import may_approve

    assert may_approve("U1", approved_by=(), starter="", self_approval=False).allowed
    again = may_approve("U1", approved_by=("U1",), starter="", self_approval=False)
    assert not again.allowed and "already approved" in again.reason
    assert may_approve("U2", approved_by=("U1",), starter="", self_approval=False).allowed
    own = may_approve("U1", approved_by=(), starter="U1", self_approval=False)
    assert not own.allowed and "self_approval: true" in own.reason
    assert may_approve("U1", approved_by=(), starter="U1", self_approval=True).allowed
    assert may_approve("U2", approved_by=(), starter="U1", self_approval=False).allowed
