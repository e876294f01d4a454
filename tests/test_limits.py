"""Limits per action (`limits: {max_concurrent, max_per_hour}`): the circuit breaker.

The engine on a real store, SQLite and PostgreSQL (bot.local.LocalRuntime, the harness
clock), commands
as real subprocesses; where a step must still be running when the next one is tried, an
executor that keeps its jobs stands for a long command (it starts nothing and reports
the end when the test says so).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from builders import APPROVER, action, step
from test_catalog import load
from test_engine import Harness, marking, ran, simple

from bot import metrics
from bot.catalog.model import LOCAL, Limits, Placement
from bot.engine import Job
from bot.errors import CatalogError
from bot.jobs import JobEnd
from bot.store import Store


@pytest.fixture
def h(tmp_path: Path, db_target: str) -> Iterator[Harness]:
    """The engine over a fresh store, on each backend (SQLite, PostgreSQL)."""
    store = Store(db_target)
    yield Harness(store, tmp_path)
    store.close()


def limited(limits: Limits, h: Harness, *, approval: bool = False) -> None:
    restart = dataclasses.replace(
        action("restart-api", marking(h.marks, "restart"), approval=approval), limits=limits
    )
    h.build(simple(step(restart)))


def refusals(limit: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "runbook_steps_limited_total", {"action": "restart-api", "limit": limit}
    )
    return value or 0.0


def test_past_max_per_hour_a_step_is_not_run_says_why_and_escalates(h: Harness) -> None:
    limited(Limits(max_per_hour=2), h)
    before = refusals("max_per_hour")
    h.open("P1")
    h.clock.advance(600)
    h.open("P2")
    h.clock.advance(600)
    h.open("P3")  # a third start within the hour
    assert ran(h.marks) == ["restart", "restart"]
    assert [h.statuses(i)["restart-api"] for i in ("P1", "P2", "P3")] == [
        "success",
        "success",
        "blocked",
    ]
    detail = h.step_runs("P3")["restart-api"].detail
    assert "reached its limit" in detail and "limits.max_per_hour: 2" in detail
    assert h.run_status("P3") == "escalated" and h.escalations("P3")
    assert ("restart-api", "blocked") in h.events("P3")
    assert refusals("max_per_hour") == before + 1
    h.rt.outbox.flush()
    assert "restart-api blocked" in h.chat.text and "reached its limit" in h.chat.text
    # An hour after the first start, one start is free again.
    h.clock.advance(2401)
    h.open("P4")
    assert h.statuses("P4")["restart-api"] == "success" and len(ran(h.marks)) == 3


class Holding:
    """An executor whose commands have not ended yet: it keeps each job (what a long
    command is to the engine) until `end` reports it finished."""

    dry_run = False

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.jobs: list[Job] = []

    def reserve(self, placement: Placement = LOCAL) -> str:
        return f"local:held{len(self.jobs)}"

    def release(self, runner: str) -> None:
        return None

    def start(self, runner: str, job: Job) -> None:
        self.jobs.append(job)

    def end(self, job: Job) -> None:
        result = {"status": "success", "exit_code": 0, "output": "OK\n", "duration": 1.0}
        self.h.rt._ended(JobEnd(job.step_run_id, job.attempt, job.incident_id, job.phase, result))
        self.h.rt.settle()


def test_past_max_concurrent_a_step_is_not_run_until_one_ends(h: Harness) -> None:
    limited(Limits(max_concurrent=1), h)
    holding = Holding(h)
    h.rt.engine.executor = holding
    before = refusals("max_concurrent")
    h.open("P1")
    assert h.statuses("P1")["restart-api"] == "running"
    h.open("P2")  # P1's step still runs
    assert h.statuses("P2")["restart-api"] == "blocked"
    assert "1 of its steps are running (limits.max_concurrent: 1)" in (
        h.step_runs("P2")["restart-api"].detail
    )
    assert h.run_status("P2") == "escalated"
    assert refusals("max_concurrent") == before + 1
    holding.end(holding.jobs[0])
    assert h.statuses("P1")["restart-api"] == "success"
    h.open("P3")
    assert h.statuses("P3")["restart-api"] == "running" and len(holding.jobs) == 2


def test_an_approved_step_past_a_limit_is_not_run(h: Harness) -> None:
    """The last check before an approved command starts includes the limits: an approval
    given while the limit is reached does not run it."""
    limited(Limits(max_per_hour=1), h, approval=True)
    h.open("P1")
    h.approve(h.pending("P1").step_run_id, APPROVER)
    h.open("P2")
    assert h.approve(h.pending("P2").step_run_id, APPROVER)[0]
    assert ran(h.marks) == ["restart"]
    assert h.statuses("P2")["restart-api"] == "blocked"
    assert h.run_status("P2") == "escalated"


def test_limits_from_the_catalog_defaults_and_the_action(tmp_path: Path) -> None:
    settings = (
        "kind: catalog\nenvironments: [{name: staging}]\n"
        "defaults: {limits: {max_concurrent: 2, max_per_hour: 10}}\n"
    )
    cat = load(
        tmp_path,
        {
            "catalog.yaml": settings,
            "actions/a.yaml": "id: a\ncommand: [echo, a]\nlimits: {max_per_hour: 3}\n",
            "actions/b.yaml": "id: b\ncommand: [echo, b]\n",
        },
    )
    assert cat.actions["a"].limits == Limits(max_concurrent=2, max_per_hour=3)
    assert cat.actions["b"].limits == Limits(max_concurrent=2, max_per_hour=10)


@pytest.mark.parametrize("bad", ["{max_per_hour: 0}", "{max_concurrent: many}", "{per_day: 3}"])
def test_a_bad_limit_is_refused_at_its_line(tmp_path: Path, bad: str) -> None:
    with pytest.raises(CatalogError) as raised:
        load(tmp_path, {"actions/a.yaml": f"id: a\ncommand: [echo, a]\nlimits: {bad}\n"})
    (diagnostic,) = [d for d in raised.value.diagnostics if d.code == "RB010"]
    assert Path(diagnostic.file).name == "a.yaml" and diagnostic.line == 3
    assert diagnostic.path.startswith("$.limits") and diagnostic.fix
