"""Slack reaction -> command start: the bot's latency beside a fair floor, as ratios.

What is measured (loopback, the Slack Web API stand-in of tests/fakes, a real BotApp on
waitress with its database on a temporary directory, real step supervisors):

  bot     from sending a signed ``reaction_added`` (✅ on a guarded step's message) to
          /slack/events, to the step's command starting. "Started" is the first thing
          the command does: it writes ``time.monotonic()`` to a file (CLOCK_MONOTONIC is
          one clock for every process on the machine).
  floor   the same request to a minimal WSGI app on the same server software (waitress)
          that does only what must happen on that path: verify Slack's signature, parse
          the event, and start the same command (``subprocess.Popen``). The bot makes no
          Slack Web API call between the reaction and the start (the message's update
          follows through the outbox), so neither does the floor.

As `runbook-bot` serves it, the reaction reaches the bot through its intake front
(``bot.front``: a second process that owns the port and passes Slack's requests on to
the bot's server over loopback); ``--no-front`` sends it to the bot's server directly.

The bot's own path: bolt verifies, one indexed lookup (which step is this message?) and
one insert into the inbox, then the answer; the inbox applies the item (one transaction:
approve, claim), and a warm step supervisor starts the command.

Each run interleaves bot and floor iterations (the bot is idle, its outbox flushed, before
each measurement); several runs give the median and the range of the ratios.

    python bench/bench_slack.py [--runs 5] [--iterations 100] [--warmup 10] [--no-front]

Target: reaction -> start p99 within 1.5x the floor (median of the runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from fakes import FakeSlack  # noqa: E402
from slack_sdk.signature import SignatureVerifier  # noqa: E402

from bot import effects  # noqa: E402
from bot.chat.slack import SlackTuning  # noqa: E402
from bot.config import Config, Secret  # noqa: E402
from bot.engine import Incident, incident_item  # noqa: E402
from bot.front import FrontProcess, bind  # noqa: E402
from bot.server import BotApp  # noqa: E402
from bot.web import HttpServer  # noqa: E402

TOKEN = "xoxb-bench-token"
SECRET = "bench-signing-secret"
CHANNEL = "CBENCH"
APPROVER = "UAPPROVER"
TARGET = 1.5

# The command: note when it started, in a file named after its incident.
STARTED = (
    "import sys, time; from pathlib import Path; "
    "Path(sys.argv[1], sys.argv[2]).write_text(repr(time.monotonic())); print('OK')"
)


def write_catalog(root: Path, marks: Path) -> None:
    (root / "actions").mkdir(parents=True)
    (root / "runbooks").mkdir()
    (root / "catalog.yaml").write_text(
        "kind: catalog\nenvironments: [{name: staging}, {name: prod, production: true}]\n"
        f"approvers: {{users: [{APPROVER}]}}\nchannel: {CHANNEL}\n"
        "escalation: {pagerduty: false}\n"
    )
    action = {
        "id": "flush",
        "description": "Flush the cache. Changes state.",
        "command": [sys.executable, "-c", STARTED, str(marks), "{{ incident.id }}"],
        "expect": [{"pattern": "OK"}],
        "safety": {"requires_approval": True, "scopes": ["staging"]},
    }
    (root / "actions" / "flush.yaml").write_text(json.dumps(action))
    runbook = {
        "kind": "runbook",
        "id": "bench",
        "match": {"services": ["bench"]},
        "steps": [{"action": "flush"}],
    }
    (root / "runbooks" / "bench.yaml").write_text(json.dumps(runbook))


def signed(body: str) -> dict[str, str]:
    ts = str(int(time.time()))
    signature = SignatureVerifier(SECRET).generate_signature(timestamp=ts, body=body)
    assert signature
    return {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
    }


def reaction(channel: str, ts: str, event_id: str) -> str:
    return json.dumps(
        {
            "type": "event_callback",
            "team_id": "TFAKE",
            "api_app_id": "ABENCH",
            "event_id": event_id,
            "event_time": int(time.time()),
            "authorizations": [{"team_id": "TFAKE", "user_id": "UBOT", "is_bot": True}],
            "event": {
                "type": "reaction_added",
                "user": APPROVER,
                "reaction": "white_check_mark",
                "item_user": "UBOT",
                "item": {"type": "message", "channel": channel, "ts": ts},
                "event_ts": f"{time.time():.6f}",
            },
        }
    )


class Floor:
    """The minimal app: verify the signature, parse the event, start the command."""

    def __init__(self, marks: Path) -> None:
        self.verifier = SignatureVerifier(SECRET)
        self.marks = marks
        self.started: list[subprocess.Popen[bytes]] = []

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length).decode()
        headers = {
            "x-slack-request-timestamp": environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP", ""),
            "x-slack-signature": environ.get("HTTP_X_SLACK_SIGNATURE", ""),
        }
        if not self.verifier.is_valid_request(body, headers):
            start_response("401 Unauthorized", [("Content-Length", "0")])
            return [b""]
        event_id = json.loads(body)["event_id"]
        argv = [sys.executable, "-c", STARTED, str(self.marks), event_id]
        self.started.append(
            subprocess.Popen(argv, stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        )
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]

    def reap(self) -> None:
        for process in self.started:
            process.wait()
        self.started.clear()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def wait_until(condition: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {condition}")
        time.sleep(0.0002)


def started_at(path: Path) -> float | None:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    return float(text) if text else None


@dataclass
class RunResult:
    bot: list[float]
    floor: list[float]

    def row(self, p: float) -> tuple[float, float, float]:
        b, f = percentile(self.bot, p) * 1000, percentile(self.floor, p) * 1000
        return b, f, b / f


def ratio_table(results: list[RunResult], left: str, right: str) -> list[float]:
    """Print each run's p50/p99 of `left` (RunResult.bot) and `right` (.floor) and their
    ratios, then the median and range of the ratios; the p99 ratios."""
    print(
        f"{'run':>4}{left + ' p50':>12}{left + ' p99':>12}{right + ' p50':>12}"
        f"{right + ' p99':>12}{'ratio p50':>11}{'ratio p99':>11}"
    )
    for number, result in enumerate(results, 1):
        b50, f50, r50 = result.row(50)
        b99, f99, r99 = result.row(99)
        print(
            f"{number:>4}{b50:10.2f}ms{b99:10.2f}ms{f50:10.2f}ms{f99:10.2f}ms"
            f"{r50:10.2f}x{r99:10.2f}x"
        )
    p50s = [r.row(50)[2] for r in results]
    p99s = [r.row(99)[2] for r in results]
    print(
        f"ratio p50: median {statistics.median(p50s):.2f}x (range {min(p50s):.2f}x to "
        f"{max(p50s):.2f}x); ratio p99: median {statistics.median(p99s):.2f}x "
        f"(range {min(p99s):.2f}x to {max(p99s):.2f}x)"
    )
    return p99s


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def one_run(
    number: int, iterations: int, warmup: int, slack: FakeSlack, through_front: bool
) -> RunResult:
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
        # Pacing off: Slack's one post per second per channel would only slow the setup.
        app = BotApp(config, slack_tuning=SlackTuning(budgets={}), outbox_backoff=(0.05, 1.0))
        app.repair()
        server = HttpServer(app.wsgi, "127.0.0.1", 0)
        threading.Thread(target=server.serve, daemon=True).start()
        app.start()
        front = None
        bot_port = server.port
        if through_front:  # as `runbook-bot` serves Slack: its intake front passes it on
            listener = bind("127.0.0.1", 0)
            front = FrontProcess(config, listener, server.port, app.inbox.wake, app.http_threads)
            front.start()
            bot_port = listener.getsockname()[1]
            wait_until(lambda: _answers(bot_port))
        floor = Floor(marks)
        floor_server = HttpServer(floor.wsgi, "127.0.0.1", 0)  # the same server software
        threading.Thread(target=floor_server.serve, daemon=True).start()

        def idle() -> bool:
            # Also a step supervisor warm again: in production reactions come seconds
            # apart, and the pool refills in a fraction of one.
            warm = bool(getattr(app.executor, "_ready", True))
            return warm and app.executor.running() == 0 and app.inbox.idle()

        result = RunResult([], [])
        http = httpx.Client(timeout=10)
        bot_url = f"http://127.0.0.1:{bot_port}/slack/events"
        floor_url = f"http://127.0.0.1:{floor_server.port}/slack/events"
        try:
            for n in range(warmup + iterations):
                keep = n >= warmup
                incident_id = f"PB{number}N{n:05d}"
                app.inbox.receive(
                    **incident_item(
                        Incident(id=incident_id, title="bench", service="bench", env="staging")
                    )
                )
                wait_until(lambda: app.store.step_runs_of(incident_id))  # noqa: B023
                step = app.store.step_runs_of(incident_id)[0]
                channel, ts = wait_until(
                    lambda: app.store.message_ref(effects.step_key(step.id))  # noqa: B023
                )
                wait_until(idle)
                assert app.outbox.flush(30)

                # bot: signed reaction -> the command starts
                body = reaction(channel, ts, f"EvBOT{number}N{n:05d}")
                headers = signed(body)
                t0 = time.monotonic()
                assert http.post(bot_url, content=body, headers=headers).status_code == 200
                began = wait_until(lambda: started_at(marks / incident_id))  # noqa: B023
                if keep:
                    result.bot.append(began - t0)
                wait_until(idle)
                assert app.outbox.flush(30)

                # floor: signed reaction -> verified, parsed, the command starts
                event_id = f"EvFLOOR{number}N{n:05d}"
                body = reaction(channel, ts, event_id)
                headers = signed(body)
                t0 = time.monotonic()
                assert http.post(floor_url, content=body, headers=headers).status_code == 200
                began = wait_until(lambda: started_at(marks / event_id))  # noqa: B023
                if keep:
                    result.floor.append(began - t0)
                floor.reap()
        finally:
            http.close()
            if front is not None:
                front.stop()
                listener.close()
            floor_server.stop()
            server.stop()
            app.stop(grace=10)
            app.store.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument(
        "--no-front",
        action="store_true",
        help="send reactions to the bot's own server, not through its intake front",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    results: list[RunResult] = []
    with FakeSlack() as slack:
        for number in range(args.runs):
            results.append(one_run(number, args.iterations, args.warmup, slack, not args.no_front))

    print(
        f"reaction -> command start, loopback, {args.runs} runs of {args.iterations} "
        f"iterations (after {args.warmup} warm-up each), "
        f"{'straight to the bot' if args.no_front else 'through the intake front'}"
    )
    p99s = ratio_table(results, "bot", "floor")
    met = statistics.median(p99s) <= TARGET
    verdict = "met" if met else "NOT met"
    print(f"target (p99 within {TARGET}x the floor, median of the runs): {verdict}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
