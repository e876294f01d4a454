"""Slack latency: the bot's overhead beside a minimal slack_sdk script, in one run.

Two figures, p50 and p99, on loopback against the local Slack stand-in (tests/fakes):

  decide -> posted    from the engine deciding a step (``policy.decide`` returns) to the
                      stand-in receiving that step's ``chat.postMessage``.
                      floor: ``WebClient.chat_postMessage`` of the same message (same text
                      and blocks), from the call to the stand-in receiving it.
  reaction -> start   from sending a signed ``reaction_added`` to /slack/events to the step's
                      command starting (the engine calling its runner).
                      floor: a minimal WSGI app on the same server (waitress) that verifies
                      the signature and makes the Web API call the bot makes for an
                      approval (``chat.update`` of the step message), then "starts".

The real BotApp runs in this process, with its database on a temporary directory.
Per-channel pacing is off (it deliberately delays bursts beyond ~1 post/s).

    python bench/bench_slack.py [--iterations 500] [--warmup 50]

Targets: bot within 1.5x the floor, p99 under 50 ms.
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from fakes import FakeSlack  # noqa: E402
from fakes.base import Reply, Request  # noqa: E402
from slack_sdk import WebClient  # noqa: E402
from slack_sdk.signature import SignatureVerifier  # noqa: E402

from bot import policy  # noqa: E402
from bot.chat.slack import SlackTuning  # noqa: E402
from bot.config import Config, Secret  # noqa: E402
from bot.engine import Incident  # noqa: E402
from bot.server import BotApp, HttpServer  # noqa: E402

TOKEN = "xoxb-bench-token"
SECRET = "bench-signing-secret"
CHANNEL = "CBENCH"
APPROVER = "UAPPROVER"


class TimedSlack(FakeSlack):
    """The stand-in, noting when each message arrived (same process: one clock)."""

    def __init__(self) -> None:
        super().__init__()
        self.arrived: dict[str, float] = {}  # ts -> perf_counter at arrival

    def handle(self, request: Request) -> Reply:
        arrived = time.perf_counter()
        reply = super().handle(request)
        if self.call_name(request) == "chat.postMessage" and isinstance(reply.body, dict):
            self.arrived[str(reply.body.get("ts"))] = arrived
        return reply


def write_catalog(root: Path) -> None:
    (root / "actions").mkdir(parents=True)
    (root / "runbooks").mkdir()
    (root / "catalog.yaml").write_text(
        "kind: catalog\nenvironments: [{name: staging}, {name: prod, production: true}]\n"
        f"approvers: {{users: [{APPROVER}]}}\nchannel: {CHANNEL}\n"
    )
    action = {
        "id": "flush",
        "description": "Flush the cache. Changes state.",
        "command": [sys.executable, "-c", "print('OK')"],
        "expect": [{"pattern": "OK"}],
        "safety": {"requires_approval": True, "scopes": ["staging"]},
    }
    (root / "actions" / "flush.yaml").write_text(json.dumps(action))
    runbook = {
        "kind": "runbook",
        "id": "bench",
        "match": {"services": ["bench"], "symptoms": ["slow"]},
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


def reaction(channel: str, ts: str, n: int) -> str:
    return json.dumps(
        {
            "type": "event_callback",
            "team_id": "TFAKE",
            "api_app_id": "ABENCH",
            "event_id": f"EvBENCH{n:08d}",
            "event_time": int(time.time()),
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
    """The minimal script: verify the signature, make the same Web API call, start."""

    def __init__(self, api_url: str) -> None:
        self.client = WebClient(token=TOKEN, base_url=api_url)
        self.verifier = SignatureVerifier(SECRET)
        self.started: float = 0.0

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length).decode()
        headers = {
            "x-slack-request-timestamp": environ.get("HTTP_X_SLACK_REQUEST_TIMESTAMP", ""),
            "x-slack-signature": environ.get("HTTP_X_SLACK_SIGNATURE", ""),
        }
        if not self.verifier.is_valid_request(body, headers):
            start_response("401 Unauthorized", [])
            return [b""]
        item = json.loads(body)["event"]["item"]
        self.client.chat_update(channel=item["channel"], ts=item["ts"], text="approved")
        self.started = time.perf_counter()
        start_response("200 OK", [("Content-Length", "0")])
        return [b""]


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)

    decided: list[float] = []
    real_decide = policy.decide

    def timed_decide(*a: Any, **kw: Any) -> policy.Decision:
        result = real_decide(*a, **kw)
        decided.append(time.perf_counter())
        return result

    policy.decide = timed_decide  # the engine calls policy.decide: time it

    with tempfile.TemporaryDirectory() as tmp, TimedSlack() as slack:
        root = Path(tmp)
        write_catalog(root / "catalog")
        config = Config(
            catalog=str(root / "catalog"),
            db=str(root / "state.db"),
            env="staging",
            slack_bot_token=Secret(TOKEN),
            slack_signing_secret=Secret(SECRET),
            slack_api_url=slack.api_url,
            workers=4,
        )
        app = BotApp(config, slack_tuning=SlackTuning(pacing_interval=0))
        started: list[float] = []
        real_runner = app.engine.runner

        def timed_runner(*a: Any, **kw: Any) -> Any:
            started.append(time.perf_counter())
            return real_runner(*a, **kw)

        app.engine.runner = timed_runner
        server = HttpServer(app.wsgi, "127.0.0.1", 0)
        threading.Thread(target=server.serve, daemon=True).start()
        app.start()

        floor = Floor(slack.api_url)
        floor_server = HttpServer(floor.wsgi, "127.0.0.1", 0)  # the same server software
        threading.Thread(target=floor_server.serve, daemon=True).start()

        bot_post: list[float] = []
        bot_react: list[float] = []
        floor_post: list[float] = []
        floor_react: list[float] = []
        http = httpx.Client(timeout=10)
        bot_url = f"http://127.0.0.1:{server.port}/slack/events"
        floor_url = f"http://127.0.0.1:{floor_server.port}/slack/events"
        plain = WebClient(token=TOKEN, base_url=slack.api_url)

        for n in range(args.warmup + args.iterations):
            keep = n >= args.warmup
            # bot: decide -> posted
            decided.clear()
            incident_id = f"PBENCH{n:06d}"
            app.engine.open_incident(
                Incident(id=incident_id, title="bench slow", service="bench", env="staging")
            )
            step = app.store.query_one(
                "SELECT * FROM step_runs WHERE incident_id = ?", (incident_id,)
            )
            assert step is not None and step["message_ts"], "the step was not posted"
            if keep:
                bot_post.append(slack.arrived[step["message_ts"]] - decided[0])
            assert app.slack is not None
            app.slack.chat.flush()
            message = slack.message(step["channel"], step["message_ts"])
            assert message is not None

            # floor: the same message with slack_sdk
            t0 = time.perf_counter()
            response = plain.chat_postMessage(
                channel=CHANNEL,
                thread_ts=step["message_ts"],
                text=message["text"],
                blocks=message["blocks"],
            )
            if keep:
                floor_post.append(slack.arrived[response["ts"]] - t0)

            # bot: signed reaction -> command starts
            started.clear()
            body = reaction(step["channel"], step["message_ts"], n)
            headers = signed(body)
            t0 = time.perf_counter()
            assert http.post(bot_url, content=body, headers=headers).status_code == 200
            while not started:
                time.sleep(0.0002)
            if keep:
                bot_react.append(started[0] - t0)
            while app.store.query_one(
                "SELECT 1 FROM deliveries WHERE source = 'slack' AND status != 'done'"
            ):
                time.sleep(0.001)
            assert app.slack is not None
            app.slack.chat.flush()  # the bot is idle before the floor is measured

            # floor: signed reaction -> verified, chat.update, "start"
            body = reaction(step["channel"], step["message_ts"], n)
            headers = signed(body)
            t0 = time.perf_counter()
            assert http.post(floor_url, content=body, headers=headers).status_code == 200
            if keep:
                floor_react.append(floor.started - t0)

        http.close()
        floor_server.stop()
        server.stop()
        app.stop(grace=10)
        app.store.close()

    ok = True
    print(
        f"runbook-bot Slack latency, loopback, {args.iterations} iterations "
        f"(after {args.warmup} warm-up)"
    )
    print(
        f"{'':22}{'bot p50':>10}{'bot p99':>10}{'floor p50':>11}{'floor p99':>11}"
        f"{'ratio p50':>11}{'ratio p99':>11}"
    )
    for name, bot, base in (
        ("decide -> posted", bot_post, floor_post),
        ("reaction -> start", bot_react, floor_react),
    ):
        b50, b99 = percentile(bot, 50) * 1000, percentile(bot, 99) * 1000
        f50, f99 = percentile(base, 50) * 1000, percentile(base, 99) * 1000
        r50, r99 = b50 / f50, b99 / f99
        print(f"{name:22}{b50:8.2f}ms{b99:8.2f}ms{f50:9.2f}ms{f99:9.2f}ms{r50:10.2f}x{r99:10.2f}x")
        ok = ok and r50 <= 1.5 and r99 <= 1.5 and b99 < 50
    mean = statistics.mean(bot_react) * 1000
    print(f"(reaction -> start mean {mean:.2f} ms)")
    print("targets (within 1.5x the floor, p99 < 50 ms):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
