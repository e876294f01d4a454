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

Also ``/runbook run``: from sending a signed slash command (``/runbook run bench`` in a
channel of its own) to the stand-in Slack holding the new thread's first message, beside
the same run opened by a page already in the inbox (``incident_item``, no HTTP, no
parsing): what the command adds on top of the path every page takes.

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
    CHANNEL,
    SECRET,
    TOKEN,
    RunResult,
    percentile,
    ratio_table,
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
from bot.server import BotApp  # noqa: E402
from bot.web import HttpServer  # noqa: E402

TARGET = 1.5
RUN_CHANNEL = "CBENCHRUNS"


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


def form_signed(body: str) -> dict[str, str]:
    """Headers of a signed, form-encoded request (interactivity, slash commands)."""
    return {**signed(body), "Content-Type": "application/x-www-form-urlencoded"}


def slash_command(channel: str, text: str) -> str:
    """A ``/runbook`` request as Slack sends it (form-encoded)."""
    return urllib.parse.urlencode(
        {
            "token": "legacy-verification-token",
            "team_id": "TFAKE",
            "team_domain": "bench",
            "channel_id": channel,
            "channel_name": "bench-runs",
            "user_id": APPROVER,
            "user_name": "approver",
            "command": "/runbook",
            "text": text,
            "api_app_id": "ABENCH",
            "response_url": "https://hooks.slack.com/commands/TFAKE/1/bench",
            "trigger_id": f"{time.time():.6f}.bench",
        }
    )


def one_run(
    number: int, iterations: int, warmup: int, slack: FakeSlack
) -> tuple[RunResult, RunResult]:
    """Clicks beside reactions (the reference); `/runbook run` beside a page's run."""
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

        def settle() -> None:
            """Nothing under way and nothing left to post before the next measurement."""
            wait_until(idle)
            assert app.outbox.flush(30)

        def first_message(channel: str, before: int) -> float:
            wait_until(lambda: slack.message_count(channel) > before)
            return time.monotonic()

        result = RunResult([], [])
        manual = RunResult([], [])
        http = httpx.Client(timeout=10)
        url = f"http://127.0.0.1:{server.port}/slack/events"
        try:
            for n in range(warmup + iterations):
                keep = n >= warmup
                by_click, by_reaction = f"PC{number}N{n:05d}", f"PR{number}N{n:05d}"
                channel, ts, value = pending(by_click)
                r_channel, r_ts, _ = pending(by_reaction)
                settle()

                body = click(channel, ts, value, f"{number}.{n}.bench")
                headers = form_signed(body)
                t0 = time.monotonic()
                assert http.post(url, content=body, headers=headers).status_code == 200
                began = wait_until(lambda: started_at(marks / by_click))  # noqa: B023
                if keep:
                    result.bot.append(began - t0)
                settle()

                body = reaction(r_channel, r_ts, f"EvR{number}N{n:05d}")
                headers = signed(body)
                t0 = time.monotonic()
                assert http.post(url, content=body, headers=headers).status_code == 200
                began = wait_until(lambda: started_at(marks / by_reaction))  # noqa: B023
                if keep:
                    result.floor.append(began - t0)
                settle()

                body = slash_command(RUN_CHANNEL, "run bench")
                headers = form_signed(body)
                before = slack.message_count(RUN_CHANNEL)
                t0 = time.monotonic()
                response = http.post(url, content=body, headers=headers)
                assert response.status_code == 200 and "Starting" in response.text, response.text
                posted = first_message(RUN_CHANNEL, before)
                if keep:
                    manual.bot.append(posted - t0)
                settle()

                before = slack.message_count(CHANNEL)
                t0 = time.monotonic()
                app.inbox.receive(
                    **incident_item(
                        Incident(id=f"PP{number}N{n:05d}", title="bench", service="bench")
                    )
                )
                posted = first_message(CHANNEL, before)
                if keep:
                    manual.floor.append(posted - t0)
                settle()
        finally:
            http.close()
            server.stop()
            app.stop(grace=10)
            app.store.close()
    return result, manual


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    results: list[RunResult] = []
    manuals: list[RunResult] = []
    with FakeSlack() as slack:
        for number in range(args.runs):
            clicks, manual = one_run(number, args.iterations, args.warmup, slack)
            results.append(clicks)
            manuals.append(manual)

    print(
        f"button click vs reaction -> command start, loopback, {args.runs} runs of "
        f"{args.iterations} iterations (after {args.warmup} warm-up each)"
    )
    p99s = ratio_table(results, "click", "react")
    click_p99 = statistics.median(percentile(r.bot, 99) * 1000 for r in results)
    print(f"click -> start p99, median of the runs: {click_p99:.2f}ms")
    print()
    print("/runbook run -> first thread message, beside a page's run from the inbox")
    print(
        f"{'run':>4}{'cmd p50':>11}{'cmd p99':>11}{'page p50':>11}{'page p99':>11}{'ratio p99':>11}"
    )
    for number, manual in enumerate(manuals, 1):
        m50, g50, _ = manual.row(50)
        m99, g99, y99 = manual.row(99)
        print(f"{number:>4}{m50:9.2f}ms{m99:9.2f}ms{g50:9.2f}ms{g99:9.2f}ms{y99:10.2f}x")
    command_p99s = [percentile(m.bot, 99) * 1000 for m in manuals]
    print(
        f"/runbook run -> first message p99: median {statistics.median(command_p99s):.2f}ms "
        f"(range {min(command_p99s):.2f} to {max(command_p99s):.2f}ms)"
    )
    print()
    met = statistics.median(p99s) <= TARGET
    verdict = "met" if met else "NOT met"
    print(f"target (click p99 within {TARGET}x the reaction's, median of the runs): {verdict}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
