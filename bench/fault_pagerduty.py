"""Fault: PagerDuty down for minutes, the bot killed -9 in the middle; nothing lost.

    python bench/fault_pagerduty.py [--outage 300] [--batches 4] [--keep]

The real `runbook-bot` process, the local PagerDuty (HTTPS) and Slack stand-ins of
tests/fakes, a real SQLite file. PagerDuty's REST API answers 503 from the start; while
it is down, incidents arrive and their runs finish (notes, resolves on success,
escalations, follow-ups on resolve: write-back piles up in the outbox). Half way the bot
is killed with SIGKILL and started again; PagerDuty then hangs (every call times out)
while more incidents arrive; at the end PagerDuty comes back. Counted from what the
stand-in PagerDuty applied: write-backs expected, delivered, lost, written twice, and a
resolve before its note. The scenario is tests/pagerduty_harness.py's
`outage_with_kill`; tests/test_pagerduty.py runs it with a short outage.

Exit status 0 when nothing was lost or duplicated.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from pagerduty_harness import outage_with_kill  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outage", type=float, default=300.0, help="seconds PagerDuty is down")
    parser.add_argument(
        "--batches", type=int, default=4, help="batches of three incidents (half before the kill)"
    )
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs, db)")
    args = parser.parse_args()

    started = time.monotonic()

    def progress(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fault-pagerduty-"))
    try:
        report = outage_with_kill(
            work,
            outage=args.outage,
            batches=args.batches,
            drain_timeout=args.drain_timeout,
            progress=progress,
        )
    finally:
        if args.keep:
            print(f"work directory (logs, database): {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print("\n".join(report.lines()))
    print("\nOK" if report.ok else "\nFAILED: see above")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
