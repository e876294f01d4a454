"""A real bot for Slack tests: BotApp served by waitress on 127.0.0.1, talking to FakeSlack.

Requests to it are signed like Slack signs them (v0 HMAC of timestamp and body with the
signing secret, checked by bolt); the bot's Web API calls go through the real slack_sdk
client to the stand-in. The bot is started the way `runbook-bot` starts it: repair what
a previous life left, serve HTTP, then resume work. Used by tests/test_slack.py,
tests/test_server.py and the benchmark.

Nothing here reaches into the engine: incidents enter through the inbox as an intake
puts them, reactions through /slack/events, and what the tests look at is what Slack
shows (the stand-in), what ran (the commands' own marker files) and the database rows.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
from fakes import FakeSlack
from slack_sdk.signature import SignatureVerifier

from bot import effects
from bot.chat.slack import SlackTuning
from bot.config import Config, Secret
from bot.engine import Incident, incident_item
from bot.server import BotApp
from bot.store import InboxItem, StepRun
from bot.web import HttpServer

TOKEN = "xoxb-test-token"
SIGNING_SECRET = "test-signing-secret"
CHANNEL = "CINC"
OTHER_CHANNEL = "COTHER"
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
# Retries come quickly: a test waits for the outbox, never for production back-off.
QUICK_BACKOFF = (0.05, 1.0)


def write_catalog(
    root: Path,
    *,
    approval_timeout: str = "30s",
    check_prints: str = "'checked'",
    channel: str = CHANNEL,
) -> None:
    """A tiny catalog: `check` (automatic), `guarded` (needs approval), `after`
    (automatic) for service `api` in `channel` (an id, or a name such as ``#inc-api``);
    `check` alone for service `db` in OTHER_CHANNEL.

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
        f"channel: '{channel}'\n"
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
        "channel": channel,
        "steps": [
            {"action": "check"},
            {"action": "guarded", "on_failure": "continue"},
            {"id": "after", "action": "check"},
        ],
    }
    (root / "runbooks" / "api-errors.yaml").write_text(json.dumps(runbook))
    other = {
        "kind": "runbook",
        "id": "db-errors",
        "title": "Database errors",
        "match": {"services": ["db"]},
        "channel": OTHER_CHANNEL,
        "steps": [{"action": "check"}],
    }
    (root / "runbooks" / "db-errors.yaml").write_text(json.dumps(other))
    (root / "gate").touch()


def wait_for(condition: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
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


TEAM_ID = "TFAKE"  # FakeSlack's workspace


def click_payload(
    user: str,
    action_id: str,
    channel: str,
    ts: str,
    value: str,
    *,
    team_id: str = TEAM_ID,
    response_url: str = "https://hooks.slack.com/actions/TFAKE/1/abc",
) -> dict[str, Any]:
    """A ``block_actions`` payload as Slack sends it when a button in a message is clicked
    (the shape of Slack's documented example)."""
    now = time.time()
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team_id},
        "api_app_id": "AFAKEAPP",
        "token": "legacy-verification-token",
        "container": {
            "type": "message",
            "message_ts": ts,
            "channel_id": channel,
            "is_ephemeral": False,
        },
        "trigger_id": f"{int(now)}.{uuid.uuid4().int % 10**12}.{uuid.uuid4().hex}",
        "team": {"id": team_id, "domain": "fake-workspace"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel, "name": "inc"},
        "message": {"type": "message", "ts": ts, "bot_id": "BFAKE", "text": "…"},
        "state": {"values": {}},
        "response_url": response_url,
        "actions": [
            {
                "action_id": action_id,
                "block_id": "runbook:1",
                "text": {"type": "plain_text", "text": action_id, "emoji": True},
                "value": value,
                "type": "button",
                "action_ts": f"{now:.6f}",
            }
        ],
    }


def form_body(payload: Mapping[str, Any]) -> str:
    """Interactivity payloads come form-encoded: ``payload=<json>``."""
    return urllib.parse.urlencode({"payload": json.dumps(payload)})


class Bot:
    """One bot process's worth of parts, in this process: BotApp + waitress in a thread.

    Started in the production order: `repair()`, serve, `start()`. A second `Bot` on the
    same root is a restart (same catalog, same database, same step state directory).
    """

    def __init__(
        self,
        root: Path,
        slack: FakeSlack,
        *,
        tuning: SlackTuning = FAST,
        backoff: tuple[float, float] = QUICK_BACKOFF,
        **config: Any,
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
        self.app = BotApp(self.config, slack_tuning=tuning, outbox_backoff=backoff)
        self.repaired = self.app.repair()
        self.server = HttpServer(self.app.wsgi, "127.0.0.1", 0, threads=self.app.http_threads)
        self._thread = threading.Thread(target=self.server.serve, name="waitress", daemon=True)
        self._thread.start()
        self.app.start()
        self.http = httpx.Client(base_url=self.url, timeout=10)
        self._stopped = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 10.0) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.http.close()
        self.app.hub.end_polls()  # as `serve` does on SIGTERM: runners' long polls end now
        self.server.stop()
        self._thread.join(10)
        self.app.stop(grace=grace)
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
        incident_id: str | None = None,
    ) -> httpx.Response:
        """`user` reacts on the step's message (waiting until that message is posted)."""
        channel, ts = self.message_ref(step_id, incident_id)
        event = reaction_event(user, reaction, channel, ts, added=added, event_id=event_id)
        return self.signed(event)

    def post_click(self, payload: Mapping[str, Any], **sign_args: Any) -> httpx.Response:
        body = form_body(payload)
        headers = {**sign(body, **sign_args), "Content-Type": "application/x-www-form-urlencoded"}
        return self.post(body, headers)

    def button(self, action_id: str, step_id: str = "guarded") -> tuple[str, str, str]:
        """(channel, ts, value) of a button on the step's latest message, as Slack shows it
        (waiting until the message shows that button)."""
        channel, ts = self.message_ref(step_id)

        def shown() -> str | None:
            self.flush()
            message = self.slack.message(channel, ts) or {}
            for block in message.get("blocks") or ():
                for element in block.get("elements") or ():
                    if element.get("action_id") == action_id:
                        return str(element["value"])
            return None

        value: str = wait_for(shown, what=f"{action_id} on {step_id}")
        return channel, ts, value

    def click(self, user: str, action_id: str, step_id: str = "guarded") -> httpx.Response:
        """`user` clicks a button of the step's message (waiting until it is shown)."""
        channel, ts, value = self.button(action_id, step_id)
        return self.post_click(click_payload(user, action_id, channel, ts, value))

    # -- what PagerDuty (or any intake) would send ----------------------------------------------

    def open_incident(self, incident: Incident = INCIDENT, *, settle: bool = True) -> str:
        """Put the trigger in the inbox as an intake does; by default wait until the bot
        has done everything it can do without a human, Slack included."""
        self.app.inbox.put(**incident_item(incident))
        if settle:
            self.settle()
        return incident.id

    # -- the bot's side -------------------------------------------------------------------

    def step_runs(self, step_id: str, incident_id: str | None = None) -> list[StepRun]:
        """Every attempt of `step_id` (of one incident, or of all), oldest first."""
        store = self.app.store
        ids = [incident_id] if incident_id else [i.id for i in store.incidents()]
        found = [s for i in ids for s in store.step_runs_of(i) if s.step_id == step_id]
        return sorted(found, key=lambda s: s.id)

    def step_run(self, step_id: str, incident_id: str | None = None) -> StepRun:
        """The latest attempt of `step_id` (waiting for it to exist)."""
        runs: list[StepRun] = wait_for(
            lambda: self.step_runs(step_id, incident_id), what=f"a step run of {step_id}"
        )
        return runs[-1]

    def message_ref(self, step_id: str, incident_id: str | None = None) -> tuple[str, str]:
        """(channel, ts) of the step's message, once Slack has it."""
        key = effects.step_key(self.step_run(step_id, incident_id).id)
        ref: tuple[str, str] = wait_for(
            lambda: self.app.store.message_ref(key), what=f"the message of {step_id} posted"
        )
        return ref

    def status(self, step_id: str) -> str:
        """The step's latest status, or "" before it started."""
        runs = self.step_runs(step_id)
        return str(runs[-1].status) if runs else ""

    def events(self) -> list[tuple[str, str | None, str | None]]:
        return [(e["status"], e["step_id"], e["actor"]) for e in self.app.store.events()]

    def runs(self) -> list[str]:
        log = self.root / "ran.log"
        return log.read_text().splitlines() if log.exists() else []

    def deliveries(self) -> list[InboxItem]:
        """Reactions recorded in the inbox."""
        return self.app.store.inbox_items(source="slack")

    def idle(self) -> bool:
        """Nothing left to do without a human: no command running, no inbox item queued."""
        # Order matters: a finishing command puts its result in the inbox before it stops
        # counting as running, so "none running, then nothing queued" cannot miss one.
        return self.app.executor.running() == 0 and self.app.inbox.idle()

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until everything received so far was handled, to its last Slack effect."""
        deadline = time.monotonic() + timeout
        while True:
            wait_for(self.idle, timeout=max(0.1, deadline - time.monotonic()), what="the bot idle")
            self.flush(max(0.1, deadline - time.monotonic()))
            if self.idle():
                return

    def flush(self, timeout: float = 20.0) -> None:
        """Wait until every effect due was delivered."""
        assert self.app.outbox.flush(timeout), "the outbox did not drain"


class BotProcess:
    """`runbook-bot` as a subprocess (the installed console script); its log is collected
    and its port read from the log (start it with PORT=0)."""

    def __init__(self, env: Mapping[str, str]) -> None:
        executable = Path(sys.executable).parent / "runbook-bot"
        self.proc = subprocess.Popen(
            [str(executable)],
            env=dict(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.log: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        found = wait_for(self._port, timeout=30, what="runbook-bot to listen")
        self.url = f"http://127.0.0.1:{found}"

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.log.append(line)

    def _port(self) -> int | None:
        if self.proc.poll() is not None:
            raise AssertionError("runbook-bot exited:\n" + "".join(self.log))
        for line in list(self.log):
            found = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
            if found:
                return int(found.group(1))
        return None

    def _reap(self, code: int) -> int:
        self._reader.join(5)
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return code

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self._reap(self.proc.wait(30))

    def kill(self) -> None:
        """kill -9: no shutdown at all."""
        if self.proc.poll() is None:
            self.proc.kill()
        self._reap(self.proc.wait(10))


def process_env(root: Path, slack: FakeSlack, **extra: str) -> dict[str, str]:
    """The environment of a `runbook-bot` process on root's catalog and database."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOST": "127.0.0.1",
        "PORT": "0",
        "RUNBOOK_CATALOG": str(root),
        "RUNBOOK_DB": str(root / "state.db"),
        "RUNBOOK_ENV": "staging",
        "SLACK_BOT_TOKEN": TOKEN,
        "SLACK_SIGNING_SECRET": SIGNING_SECRET,
        "SLACK_API_URL": slack.api_url,
        **extra,
    }
