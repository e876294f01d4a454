"""A bot worker as its own process, for tests/test_crash.py to kill and race.

    python crash_worker.py DB MARKS crash     open an incident with a guarded step, then one
                                              whose command runs 30 s (kill it meanwhile)
    python crash_worker.py DB MARKS approve ID    wait for MARKS/go, approve step run ID
    python crash_worker.py DB MARKS open ID       wait for MARKS/go, open incident ID

Commands append to files under MARKS, so the test counts how often each really ran.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from builders import APPROVER, action, catalog, py, runbook, step

from bot.catalog.model import Catalog
from bot.engine import Engine, Incident
from bot.store import Store

APPEND = (
    "import os, sys; open(sys.argv[1], 'a').write(sys.argv[2] + ' ' + str(os.getpid()) + '\\n')"
)


def build_catalog(marks: Path) -> Catalog:
    def appending(name: str, then: str = "print('OK')") -> tuple[str, ...]:
        return (*py(f"{APPEND}; {then}"), str(marks / f"{name}.txt"), name)

    slow = action(
        "slow-step",
        appending("slow", "import time; time.sleep(30); print('OK')"),
        timeout=60,
    )
    return catalog(
        runbook(
            "orders-guarded",
            [step(action("guarded", appending("guarded"), approval=True, approval_timeout=600))],
            services=("orders",),
        ),
        runbook(
            "payments-slow",
            [step(slow), step(action("after-slow", appending("after")))],
            services=("payments",),
        ),
        runbook("search-once", [step(action("once", appending("once")))], services=("search",)),
    )


def engine(db: Path, marks: Path, worker: str) -> Engine:
    return Engine(build_catalog(marks), Store(db, worker=worker), default_env="staging")


def wait_for(path: Path, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.005)


def main(argv: list[str]) -> None:
    db, marks, mode = Path(argv[0]), Path(argv[1]), argv[2]
    bot = engine(db, marks, worker=f"{mode}-worker")
    if mode == "crash":
        bot.open_incident(Incident(id="GUARDED", title="orders down", service="orders"))
        print("guarded step waiting", flush=True)
        bot.open_incident(Incident(id="SLOW", title="5xx", service="payments"))
        print("slow incident finished (the test should have killed me)", flush=True)
    elif mode == "approve":
        wait_for(marks / "go")
        outcome = bot.approve(int(argv[3]), APPROVER)
        print("ok" if outcome.ok else f"refused: {outcome.message}", flush=True)
    elif mode == "open":
        wait_for(marks / "go")
        bot.open_incident(Incident(id=argv[3], title="search down", service="search"))
        print("ok", flush=True)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv[1:])
