"""Button click -> command start, beside the reaction path, as ratios in the same run.

What is measured (loopback, the Slack Web API stand-in of tests/fakes, a real BotApp on
waitress with its database on a temporary directory, real step supervisors; the setup of
``bench/bench_slack.py``, whose catalog and helpers this reuses):

  click     from sending a signed, form-encoded ``block_actions`` payload (Approve on a
            guarded step's message) to /slack/events, to the step's command starting
            (the command's first act is writing ``time.monotonic()`` to a file).
  reaction  the same for a signed ``reaction_added`` (✅) on another incident's step.

A click is checked more strictly than a reaction (``Click.parse``) and its button is
matched against the request (incident, step, fingerprint); both then take the same
inbox and engine path. Each iteration opens two incidents and measures one of each,
interleaved, with the bot idle and its outbox flushed before each measurement.

    python bench/bench_buttons.py [--runs 5] [--iterations 100] [--warmup 10]

Target: click -> start p99 within 1.5x the reaction's (median of the runs).
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
import urllib.parse
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import httpx  # noqa: E402
from bench_slack import (  # noqa: E402
    APPROVER,
    SECRET,
    TOKEN,
    RunResult,
    percentile,
    reaction,
    signed,
    started_at,
    wait_until,
    write_catalog,
)
from fakes import FakeSlack  # noqa: E402

from bot import effects  # noqa: E402
from bot.chat.slack import ButtonValue, SlackTuning  # noqa: E402
from bot.config import Config, Secret  # noqa: E402
from bot.engine import Incident, incident_item  # noqa: E402
from bot.server import BotApp, HttpServer  # noqa: E402

TARGET = 1.5


def click(channel: str, ts: str, value: str, trigger: str) -> str:
    payload = {
        "type": "block_actions",
        "user": {"id": APPROVER, "username": "approver", "team_id": "TFAKE"},
        "api_app_id": "ABENCH",
        "container": {"type": "message", "message_ts": ts, "channel_id": channel},
        "trigger_id": trigger,
        "team": {"id": "TFAKE", "domain": "bench"},
        "channel": {"id": channel, "name": "bench"},
        "response_url": "https://hooks.slack.com/actions/TFAKE/1/bench",
        "actions": [
            {
                "action_id": "runbook_approve",
                "block_id": "runbook",
                "type": "button",
                "value": value,
                "action_ts": f"{time.time():.6f}",
            }
        ],
    }
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


def one_run(number: int, iterations: int, warmup: int, slack: FakeSlack) -> RunResult:
    """`bot` holds the clicks, `floor` the reactions (the reference)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        marks = root / "marks"
        marks.mkdir()
        write_catalog(root / "catalog", marks)
        config = Config(
            catalog=str(root / "catalog"),
            db=str(root / "state.db"),
            env="staging",
            slack_bot_token=Secret(TOKEN),
            slack_signing_secret=Secret(SECRET),
            slack_api_url=slack.api_url,
            workers=4,
        )
        app = BotApp(config, slack_tuning=SlackTuning(budgets={}), outbox_backoff=(0.05, 1.0))
        app.repair()
        server = HttpServer(app.wsgi, "127.0.0.1", 0)
        threading.Thread(target=server.serve, daemon=True).start()
        app.start()

        def idle() -> bool:
            warm = bool(getattr(app.executor, "_ready", True))
            return warm and app.executor.running() == 0 and app.inbox.idle()

        def pending(incident_id: str) -> tuple[str, str, str]:
            app.inbox.receive(
                **incident_item(
                    Incident(id=incident_id, title="bench", service="bench", env="staging")
                )
            )
            wait_until(lambda: app.store.step_runs_of(incident_id))
            step = app.store.step_runs_of(incident_id)[0]
            channel, ts = wait_until(lambda: app.store.message_ref(effects.step_key(step.id)))
            approval = app.store.approval(step.id)
            assert approval is not None
            value = ButtonValue(incident_id, step.id, approval.fingerprint).encode()
            return channel, ts, value

        result = RunResult([], [])
        http = httpx.Client(timeout=10)
        url = f"http://127.0.0.1:{server.port}/slack/events"
        try:
            for n in range(warmup + iterations):
                keep = n >= warmup
                by_click, by_reaction = f"PC{number}N{n:05d}", f"PR{number}N{n:05d}"
                channel, ts, value = pending(by_click)
                r_channel, r_ts, _ = pending(by_reaction)
                wait_until(idle)
                assert app.outbox.flush(30)

                body = click(channel, ts, value, f"{number}.{n}.bench")
                headers = {
                    **signed(body),
                    "Content-Type": "application/x-www-form-urlencoded",
                }
                t0 = time.monotonic()
                assert http.post(url, content=body, headers=headers).status_code == 200
                began = wait_until(lambda: started_at(marks / by_click))  # noqa: B023
                if keep:
                    result.bot.append(began - t0)
                wait_until(idle)
                assert app.outbox.flush(30)

                body = reaction(r_channel, r_ts, f"EvR{number}N{n:05d}")
                headers = signed(body)
                t0 = time.monotonic()
                assert http.post(url, content=body, headers=headers).status_code == 200
                began = wait_until(lambda: started_at(marks / by_reaction))  # noqa: B023
                if keep:
                    result.floor.append(began - t0)
                wait_until(idle)
                assert app.outbox.flush(30)
        finally:
            http.close()
            server.stop()
            app.stop(grace=10)
            app.store.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    results: list[RunResult] = []
    with FakeSlack() as slack:
        for number in range(args.runs):
            results.append(one_run(number, args.iterations, args.warmup, slack))

    print(
        f"button click vs reaction -> command start, loopback, {args.runs} runs of "
        f"{args.iterations} iterations (after {args.warmup} warm-up each)"
    )
    print(
        f"{'run':>4}{'click p50':>11}{'click p99':>11}{'react p50':>11}{'react p99':>11}"
        f"{'ratio p50':>11}{'ratio p99':>11}"
    )
    for number, result in enumerate(results, 1):
        c50, r50, x50 = result.row(50)
        c99, r99, x99 = result.row(99)
        print(
            f"{number:>4}{c50:9.2f}ms{c99:9.2f}ms{r50:9.2f}ms{r99:9.2f}ms{x50:10.2f}x{x99:10.2f}x"
        )
    p50s = [r.row(50)[2] for r in results]
    p99s = [r.row(99)[2] for r in results]
    print(
        f"ratio p50: median {statistics.median(p50s):.2f}x (range {min(p50s):.2f}x to "
        f"{max(p50s):.2f}x); ratio p99: median {statistics.median(p99s):.2f}x "
        f"(range {min(p99s):.2f}x to {max(p99s):.2f}x)"
    )
    click_p99 = statistics.median(percentile(r.bot, 99) * 1000 for r in results)
    print(f"click -> start p99, median of the runs: {click_p99:.2f}ms")
    met = statistics.median(p99s) <= TARGET
    verdict = "met" if met else "NOT met"
    print(f"target (click p99 within {TARGET}x the reaction's, median of the runs): {verdict}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
