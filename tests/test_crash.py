"""Crashes and races with real processes and real SQLite files.

`test_kill_9_at_random_moments` kills the real `runbook-bot` process with SIGKILL at
random moments of a workload (see tests/fault_harness.py for what is driven and what is
counted) and asserts that nothing broke: no step ran twice, no acknowledged delivery or
approval was lost, one thread per incident, no message posted twice, every finished
command's result recorded. RUNBOOK_FAULT_KILLS sets how many kills (default 104).

The race tests start several processes that apply the same inbox items of one database
at once: a step runs once whoever wins.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fault_harness import run_worlds

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve().parent


def test_kill_9_at_random_moments(tmp_path: Path) -> None:
    kills = int(os.environ.get("RUNBOOK_FAULT_KILLS") or 104)
    per_world = 4
    worlds = -(-kills // per_world)
    counts = run_worlds(tmp_path, worlds, parallel=3, seed=20261201, kills=per_world)
    print(counts.summary())
    assert counts.kills >= kills
    assert counts.steps_run_twice == 0
    assert counts.deliveries_lost == 0
    assert counts.approvals_lost == 0
    assert counts.duplicate_roots == 0
    assert counts.steps_posted_twice == 0
    assert counts.results_lost == 0
    assert counts.notes_lost == counts.notes_duplicated == 0
    assert counts.unfinished == []
    # the kills did land everywhere: around the 202s, mid-post, mid-step, …
    assert len(counts.moments) >= 3, counts.moments


RACER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from builders import APPROVER, action, catalog, py, runbook, step
    from bot.local import LocalRuntime
    from bot.store import Store

    db, marks, go = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    command = (*py("import sys; open(sys.argv[1], 'a').write('ran\\\\n')"), str(marks))
    cat = catalog(
        runbook("orders", [step(action("guarded", command, approval=True))], services=("orders",)),
        runbook("search", [step(action("once", command))], services=("search",)),
    )
    runtime = LocalRuntime(cat, Store(db), default_env="staging")
    while not go.exists():
        time.sleep(0.001)
    mode = sys.argv[4]
    if mode == "approve":
        step_run_id = int(sys.argv[5])
        runtime.put(
            source="slack", key="slack:event:EvRACE", incident_id="GUARDED", kind="step.approve",
            payload={{"step_run_id": step_run_id, "user": APPROVER, "channel": ""}},
        )
    else:
        runtime.put(
            source="pagerduty", key="pagerduty:event:OPEN", incident_id="RACE",
            kind="incident.triggered", payload={{"title": "search down", "service": "search"}},
        )
    runtime.settle()
    """
).format(tests=str(HERE))


def race(tmp_path: Path, mode: str, *args: str, racers: int = 6) -> Path:
    db, marks, go = tmp_path / "state.db", tmp_path / "marks.txt", tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, str(db), str(marks), str(go), mode, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(racers)
    ]
    go.touch()
    for proc in procs:
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    return marks


def test_processes_racing_to_open_one_incident_run_its_step_once(tmp_path: Path) -> None:
    marks = race(tmp_path, "open")
    assert marks.read_text().splitlines() == ["ran"]


def test_processes_racing_to_apply_one_approval_run_the_step_once(tmp_path: Path) -> None:
    from builders import APPROVER, action, catalog, py, runbook, step

    from bot.engine import Incident
    from bot.local import LocalRuntime
    from bot.store import Store

    marks = tmp_path / "marks.txt"
    command = (*py("import sys; open(sys.argv[1], 'a').write('ran\\n')"), str(marks))
    cat = catalog(
        runbook("orders", [step(action("guarded", command, approval=True))], services=("orders",))
    )
    store = Store(tmp_path / "state.db")
    runtime = LocalRuntime(cat, store, default_env="staging")
    runtime.open(Incident(id="GUARDED", title="orders down", service="orders"))
    (approval,) = store.pending_approvals()
    store.close()
    assert approval.approver_users == (APPROVER,)
    race(tmp_path, "approve", str(approval.step_run_id))
    assert marks.read_text().splitlines() == ["ran"]
