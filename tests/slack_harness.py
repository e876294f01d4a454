"""A real bot for Slack tests: BotApp served by waitress on 127.0.0.1, talking to FakeSlack.

Requests to it are signed like Slack signs them (v0 HMAC of timestamp and body with the
signing secret, checked by bolt); the bot's Web API calls go through the real slack_sdk
client to the stand-in. Used by tests/test_slack.py and tests/test_server.py.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from fakes import FakeSlack
from slack_sdk.signature import SignatureVerifier

from bot.chat.slack import SlackTuning
from bot.config import Config, Secret
from bot.engine import Incident
from bot.server import BotApp, HttpServer

TOKEN = "xoxb-test-token"
SIGNING_SECRET = "test-signing-secret"
CHANNEL = "CINC"
APPROVER = "UAPPROVER"  # listed by user id in the catalog
GROUP = "S0ONCALL"  # listed as a user group in the catalog
GROUPIE = "UGROUPIE"  # member of GROUP (FakeSlack usergroups)
STRANGER = "USTRANGER"  # nobody
BOT_USER = "UBOT"  # FakeSlack's bot user

INCIDENT = Incident(
    id="PINC001",
    title="API elevated errors",
    service="api",
    urgency="high",
    env="staging",
    link="https://example.pagerduty.com/incidents/PINC001",
)

# Pacing off unless a test is about pacing.
FAST = SlackTuning(usergroup_ttl=60.0, budgets={})


def write_catalog(
    root: Path, *, approval_timeout: str = "30s", check_prints: str = "'checked'"
) -> None:
    """A tiny catalog: `check` (automatic), `guarded` (needs approval), `after` (automatic).

    `guarded` appends a line to root/ran.log (so tests count runs), then waits for
    root/gate to exist (the `gate` file is there unless a test removes it).
    """
    py = sys.executable
    (root / "actions").mkdir(parents=True, exist_ok=True)
    (root / "runbooks").mkdir(exist_ok=True)
    (root / "catalog.yaml").write_text(
        "kind: catalog\n"
        "environments:\n"
        "  - name: dev\n"
        "  - name: staging\n"
        "  - name: prod\n"
        "    production: true\n"
        f"approvers:\n  users: [{APPROVER}]\n  groups: [{GROUP}]\n"
        f"channel: {CHANNEL}\n"
        "escalation:\n  mention: '<!subteam^S0LEADS>'\n  pagerduty: false\n"
        "defaults:\n  timeout: 20s\n  approval_timeout: 30s\n"
    )
    actions: dict[str, dict[str, Any]] = {
        "check": {
            "id": "check",
            "description": "Error rate of the service. Read-only.",
            "command": [py, "-c", f"print({check_prints})"],
            "expect": [{"pattern": "checked"}],
            "safety": {"requires_approval": False, "scopes": ["dev", "staging"]},
        },
        "guarded": {
            "id": "guarded",
            "description": "Clear the cache. Changes state.",
            "command": [
                py,
                "-c",
                "import os, sys, time\n"
                "open(sys.argv[1], 'a').write('ran\\n')\n"
                "while not os.path.exists(sys.argv[2]): time.sleep(0.005)\n"
                "print('OK')",
                str(root / "ran.log"),
                str(root / "gate"),
            ],
            "expect": [{"pattern": "OK"}],
            "safety": {
                "requires_approval": True,
                "scopes": ["staging"],
                "approval_timeout": approval_timeout,
            },
        },
    }
    for name, action in actions.items():
        (root / "actions" / f"{name}.yaml").write_text(json.dumps(action))
    runbook = {
        "kind": "runbook",
        "id": "api-errors",
        "title": "API elevated errors",
        "match": {"services": ["api"], "symptoms": ["elevated errors"]},
        "channel": CHANNEL,
        "steps": [
            {"action": "check"},
            {"action": "guarded", "on_failure": "continue"},
            {"id": "after", "action": "check"},
        ],
    }
    (root / "runbooks" / "api-errors.yaml").write_text(json.dumps(runbook))
    (root / "gate").touch()


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    """Poll `condition` until truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")
        time.sleep(0.005)


def sign(
    body: str, *, secret: str = SIGNING_SECRET, timestamp: int | None = None
) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    signature = SignatureVerifier(secret).generate_signature(timestamp=ts, body=body)
    assert signature is not None
    return {
        "Content-Type": "application/json",
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": signature,
    }


def reaction_event(
    user: str,
    reaction: str,
    channel: str,
    ts: str,
    *,
    added: bool = True,
    event_id: str | None = None,
) -> dict[str, Any]:
    """An Events API envelope as Slack sends it for reaction_added / reaction_removed."""
    now = time.time()
    return {
        "token": "legacy-verification-token",
        "team_id": "TFAKE",
        "api_app_id": "AFAKEAPP",
        "type": "event_callback",
        "event_id": event_id or f"Ev{uuid.uuid4().hex[:12].upper()}",
        "event_time": int(now),
        "authorizations": [{"team_id": "TFAKE", "user_id": BOT_USER, "is_bot": True}],
        "event": {
            "type": "reaction_added" if added else "reaction_removed",
            "user": user,
            "reaction": reaction,
            "item_user": BOT_USER,
            "item": {"type": "message", "channel": channel, "ts": ts},
            "event_ts": f"{now:.6f}",
        },
    }


class Bot:
    """One bot process's worth of parts, in this process: BotApp + waitress in a thread."""

    def __init__(
        self, root: Path, slack: FakeSlack, *, tuning: SlackTuning = FAST, **config: Any
    ) -> None:
        self.root = root
        self.slack = slack
        settings: dict[str, Any] = {
            "catalog": str(root),
            "db": str(root / "state.db"),
            "env": "staging",
            "slack_bot_token": Secret(TOKEN),
            "slack_signing_secret": Secret(SIGNING_SECRET),
            "slack_api_url": slack.api_url,
            "workers": 4,
            "shutdown_grace": 10.0,
            **config,
        }
        self.config = Config(**settings)
        self.app = BotApp(self.config, slack_tuning=tuning)
        self.server = HttpServer(self.app.wsgi, "127.0.0.1", 0)
        self._thread = threading.Thread(target=self.server.serve, name="waitress", daemon=True)
        self._thread.start()
        self.app.start()
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.http.close()
        self.server.stop()
        self._thread.join(10)
        self.app.stop(grace=10)
        self.app.store.close()

    # -- what Slack would send ------------------------------------------------------------

    def post(self, body: str, headers: Mapping[str, str]) -> httpx.Response:
        return self.http.post("/slack/events", content=body, headers=dict(headers))

    def signed(self, payload: Mapping[str, Any], **extra_headers: str) -> httpx.Response:
        body = json.dumps(payload)
        return self.post(body, {**sign(body), **extra_headers})

    def react(
        self,
        user: str,
        reaction: str,
        step_id: str = "guarded",
        *,
        added: bool = True,
        event_id: str | None = None,
    ) -> httpx.Response:
        step = self.step_run(step_id)
        return self.signed(
            reaction_event(
                user, reaction, step["channel"], step["message_ts"], added=added, event_id=event_id
            )
        )

    # -- the engine's side ------------------------------------------------------------------

    def open_incident(self, incident: Incident = INCIDENT) -> str:
        return self.app.engine.open_incident(incident)

    def step_run(self, step_id: str) -> dict[str, Any]:
        row = self.app.store.query_one(
            "SELECT * FROM step_runs WHERE step_id = ? ORDER BY id DESC LIMIT 1", (step_id,)
        )
        assert row is not None, f"no step run for {step_id}"
        return row

    def status(self, step_id: str) -> str:
        """The step's latest status, or "" before it started."""
        row = self.app.store.query_one(
            "SELECT status FROM step_runs WHERE step_id = ? ORDER BY id DESC LIMIT 1", (step_id,)
        )
        return str(row["status"]) if row else ""

    def events(self) -> list[tuple[str, str | None, str | None]]:
        return [(e["status"], e["step_id"], e["actor"]) for e in self.app.store.events()]

    def runs(self) -> list[str]:
        log = self.root / "ran.log"
        return log.read_text().splitlines() if log.exists() else []

    def deliveries(self) -> list[dict[str, Any]]:
        return self.app.store.query("SELECT * FROM deliveries WHERE source = 'slack'")

    def settle(self) -> None:
        """Wait until every reaction received so far was handled, to its last effect."""
        wait_for(
            lambda: (
                not self.app.store.query(
                    "SELECT 1 FROM deliveries WHERE source = 'slack' "
                    "AND status IN ('queued', 'processing')"
                )
            ),
            what="the reactions to be handled",
        )
        self.flush()

    def flush(self) -> None:
        assert self.app.slack is not None
        assert self.app.slack.chat.flush(10)
