"""Bot -> pull runner -> result, beside a step on the bot's own host, as ratios in one run.

What is measured (loopback; a real BotApp on waitress with its database in a temporary
directory, real step supervisors, one real `runbook-bot runner` subprocess polling it):

  runner  from putting a trigger in the inbox (as an intake does) to the step's result
          recorded in the database, for a runbook of one automatic step whose action says
          `executor: {runner: bench}`: claim, render, sign, queue, the runner's long poll
          answered, signature and allowlist checked, the id written to its file, the
          command run, the result posted back, the inbox item applied.
  local   the same for the same command with `executor: local` (a step supervisor).

The command is `/bin/true`-like (`echo OK`): what is measured is the path, not the
command. Each iteration measures one of each, interleaved, with the bot idle before
each measurement.

    python bench/bench_runner.py [--runs 5] [--iterations 100] [--warmup 10]
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

from bench_slack import RunResult, percentile, ratio_table, wait_until  # noqa: E402
from runner_harness import Runner, create_token  # noqa: E402

from bot.config import Config  # noqa: E402
from bot.engine import Incident, incident_item  # noqa: E402
from bot.server import BotApp  # noqa: E402
from bot.signing import public_pem  # noqa: E402
from bot.web import HttpServer  # noqa: E402

POOL = "bench"
FINAL = ("success", "failed", "error", "timeout", "interrupted")


def write_catalog(root: Path) -> None:
    (root / "actions").mkdir(parents=True)
    (root / "runbooks").mkdir()
    (root / "catalog.yaml").write_text(
        "kind: catalog\nenvironments: [{name: staging}]\nchannel: CBENCH\n"
        f"escalation: {{pagerduty: false}}\nrunner_pools: [{{name: {POOL}}}]\n"
    )
    for name, executor in (("remote", {"runner": POOL}), ("here", "local")):
        (root / "actions" / f"{name}.yaml").write_text(
            json.dumps(
                {
                    "id": name,
                    "command": ["echo", "OK"],
                    "expect": [{"pattern": "OK"}],
                    "executor": executor,
                    "safety": {"requires_approval": False, "scopes": ["staging"]},
                }
            )
        )
        (root / "runbooks" / f"{name}.yaml").write_text(
            json.dumps(
                {
                    "kind": "runbook",
                    "id": name,
                    "match": {"services": [name]},
                    "steps": [{"action": name}],
                }
            )
        )


def one_run(number: int, iterations: int, warmup: int) -> RunResult:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_catalog(root / "catalog")
        config = Config(
            catalog=str(root / "catalog"), db=str(root / "state.db"), env="staging", workers=4
        )
        app = BotApp(config)
        app.repair()
        server = HttpServer(app.wsgi, "127.0.0.1", 0, threads=app.http_threads)
        serving = threading.Thread(target=server.serve, daemon=True)
        serving.start()
        app.start()
        key = root / "bot.pub"
        key.write_text(public_pem(app.hub.key))
        token = create_token(root / "state.db", pool=POOL)
        runner = Runner(
            f"http://127.0.0.1:{server.port}",
            token,
            key,
            root / "runner.db",
            pool=POOL,
            allow=("remote",),
            heartbeat=10.0,
            poll_wait=20.0,
        )
        result = RunResult(bot=[], floor=[])
        try:
            wait_until(lambda: app.hub.connected(POOL) > 0)
            for i in range(warmup + iterations):
                timings = []
                for service in ("remote", "here"):
                    incident_id = f"B{number}-{i}-{service}"
                    wait_until(lambda: app.executor.running() == 0 and app.inbox.idle())
                    started = time.perf_counter()
                    app.inbox.put(
                        **incident_item(
                            Incident(id=incident_id, title="bench", service=service, env="staging")
                        )
                    )

                    def ended(incident_id: str = incident_id) -> bool:
                        row = app.store.query_one(
                            "SELECT status FROM step_runs WHERE incident_id = ?", (incident_id,)
                        )
                        return bool(row and row["status"] in FINAL)

                    wait_until(ended)
                    timings.append(time.perf_counter() - started)
                if i >= warmup:
                    result.bot.append(timings[0])
                    result.floor.append(timings[1])
        finally:
            runner.stop()
            app.hub.end_polls()
            server.stop()
            serving.join(10)
            app.stop(grace=5)
            app.store.close()
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    results = [one_run(n, args.iterations, args.warmup) for n in range(args.runs)]
    print(
        f"trigger -> step result: pull runner vs the bot's own host, loopback, {args.runs} "
        f"runs of {args.iterations} iterations (after {args.warmup} warm-up each)"
    )
    ratio_table(results, "runner", "local")
    runner_p99 = statistics.median(percentile(r.bot, 99) * 1000 for r in results)
    local_p99 = statistics.median(percentile(r.floor, 99) * 1000 for r in results)
    print(f"p99, median of the runs: runner {runner_p99:.2f}ms, local {local_p99:.2f}ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
