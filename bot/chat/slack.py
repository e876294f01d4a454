"""The Slack adapter: incident threads in Block Kit, approval by reaction, restart-safe.

Three thin parts, no business rules (those are in ``bot.engine`` and ``bot.policy``):

  SlackChat       the chat port (``bot.chat.base.ChatPort``): posts the root message and one
                  message per step, updates it in place, adds ✅ ❌ ⏸️ under guarded steps.
  ReactionIntake  ``reaction_added``/``reaction_removed`` -> engine.approve/reject/pause/resume.
  SlackAdapter    wires a ``slack_sdk`` WebClient, a bolt ``App`` and the two above for
                  ``bot.server.BotApp``: ``.chat``, ``.member_of``, ``.bot_user_ids``,
                  ``.wsgi``, ``.start()``, ``.stop()``.

The path of a reaction:

  Slack ──signed POST──▶ /slack/events (bolt verifies) ──▶ ReactionIntake.receive
        ◀── 200 ─────────  records the event in `deliveries` (dedupe by event_id, durable)
                           and queues a drain on the bounded worker pool
  worker: claim the oldest delivery of that incident ──▶ engine.approve(step_run, user)
          ──▶ the step runs (at most once: the store's atomic claim) ──▶ message updated

Slack gets its answer after one indexed lookup and one insert, whatever the step does.
Deliveries of one incident are handled in arrival order (a pause and its removal must not
swap). A delivery left half-done by a crash is handled again at the next start; its
reacting user is not sent a second note.

Posting: ``chat.postMessage`` is paced per channel (a token bucket: bursts, then about one
message a second, as Slack asks), 429 ``Retry-After`` and 5xx are retried by slack_sdk's
retry handlers, and step updates go through one background sender that keeps only the
latest state of each message, so a slow Slack never delays a command or loses a state
(the state is in the database; the message catches up).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_bolt.authorization import AuthorizeResult
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError
from slack_sdk.http_retry.builtin_handlers import (
    ConnectionErrorRetryHandler,
    RateLimitErrorRetryHandler,
    ServerErrorRetryHandler,
)
from slack_sdk.http_retry.handler import RetryHandler
from slack_sdk.http_retry.interval_calculator import RetryIntervalCalculator

from bot import messages, metrics
from bot.chat.base import IncidentView, MessageRef, StepView
from bot.config import Config
from bot.errors import ConfigError

if TYPE_CHECKING:
    from slack_bolt.adapter.socket_mode import SocketModeHandler

    from bot.engine import Engine, Outcome
    from bot.store import Store

log = logging.getLogger(__name__)

SOURCE = "slack"  # deliveries.source of reaction events

# Block Kit limits (Slack rejects longer texts with invalid_blocks)
HEADER_MAX = 150
SECTION_MAX = 3000
FIELD_MAX = 2000


class Pool(Protocol):
    def submit(self, fn: Callable[..., Any], *args: Any) -> Any: ...


class Host(Protocol):
    """What the adapter needs from the process that hosts it (``bot.server.BotApp``)."""

    @property
    def engine(self) -> Engine: ...

    @property
    def store(self) -> Store: ...

    @property
    def pool(self) -> Pool: ...


@dataclass(frozen=True)
class SlackTuning:
    """Knobs with production defaults; tests and benchmarks make them small."""

    pacing_interval: float = 1.0  # seconds between posts to one channel, after a burst
    pacing_burst: int = 4  # posts to one channel allowed at once
    usergroup_ttl: float = 300.0  # seconds a user group's members are cached
    rate_limit_retries: int = 3  # 429: retried after Retry-After
    server_error_retries: int = 2  # 500/503 and connection errors
    retry_interval: RetryIntervalCalculator | None = None  # None: slack_sdk's backoff
    timeout: int = 10  # seconds per Web API request
    update_delay: float = 0.05  # seconds a step-message update waits to absorb the next one


# --- text helpers ------------------------------------------------------------------------


def escape(text: str) -> str:
    """Slack mrkdwn control characters: an incident title or a command's output could
    otherwise mention @channel or fake a link."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def code_block(text: str, limit: int = SECTION_MAX) -> str:
    body = escape(text.rstrip()).replace("```", "ˋˋˋ") or " "
    return "```" + clip(body, limit - 6) + "```"


def base_reaction(name: str) -> str:
    """`white_check_mark::skin-tone-2` -> `white_check_mark`."""
    return name.strip(":").split("::", 1)[0]


def _escaped_step(view: StepView) -> StepView:
    """The view with every text that comes from outside the bot made inert for mrkdwn."""
    return dataclasses.replace(
        view,
        step_id=escape(view.step_id),
        name=escape(view.name),
        description=escape(view.description),
        command=escape(view.command),
        reason=escape(view.reason),
        detail=escape(view.detail),
        output=escape(view.output),
        expect=tuple((escape(p), allowed) for p, allowed in view.expect),
    )


def _escaped_incident(view: IncidentView) -> IncidentView:
    return dataclasses.replace(
        view,
        title=escape(view.title),
        service=escape(view.service),
        urgency=escape(view.urgency),
        env=escape(view.env),
        link=escape(view.link),
        runbook_title=escape(view.runbook_title),
    )


# --- Block Kit ---------------------------------------------------------------------------


def _header(text: str) -> dict[str, Any]:
    return {"type": "header", "text": {"type": "plain_text", "text": clip(text, HEADER_MAX)}}


def _section(text: str) -> dict[str, Any]:
    return {"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_MAX)}}


def _fields(*pairs: tuple[str, str]) -> dict[str, Any]:
    return {
        "type": "section",
        "fields": [
            {"type": "mrkdwn", "text": clip(f"*{label}*\n{value}", FIELD_MAX)}
            for label, value in pairs
        ],
    }


def _context(text: str) -> dict[str, Any]:
    return {"type": "context", "elements": [{"type": "mrkdwn", "text": clip(text, SECTION_MAX)}]}


def incident_blocks(view: IncidentView) -> list[dict[str, Any]]:
    safe = _escaped_incident(view)
    link = f"<{safe.link}|{escape(view.incident_id)}>" if view.link else escape(view.incident_id)
    blocks = [
        _header(f"🚨 {view.title}"),
        _fields(
            ("Service", safe.service),
            ("Urgency", safe.urgency or "n/a"),
            ("Environment", safe.env or "unknown"),
            ("PagerDuty", link),
        ),
    ]
    if view.runbook_id:
        blocks.append(
            _section(
                f"*Runbook:* {safe.runbook_title} (`{escape(view.runbook_id)}`, "
                f"{view.step_count} steps). Steps follow in this thread."
            )
        )
    else:
        blocks.append(_section(messages.no_runbook_text(safe)))
    blocks.append(_context(f"Catalog {escape(view.catalog_version)}"))
    return blocks


def step_blocks(view: StepView, reactions: messages.ReactionNames) -> list[dict[str, Any]]:
    safe = _escaped_step(view)
    blocks: list[dict[str, Any]] = [_header(messages.step_title(view))]
    if safe.description:
        blocks.append(_section(safe.description))
    blocks.append(_section(code_block(view.command)))
    blocks.append(
        _fields(
            ("Action", f"`{safe.action_id}`"),
            ("Environment", safe.env or "unknown"),
            ("Safety", messages.safety_text(safe)),
            ("Expect", messages.expect_text(safe)),
        )
    )
    decision = messages.decision_text(safe)
    if decision:
        blocks.append(_section(f"*Decision:* {decision}"))
    blocks.append(_section(messages.status_line(safe, reactions)))
    if view.output:
        blocks.append(_section("*Output*\n" + code_block(view.output, SECTION_MAX - 12)))
    return blocks


# --- pacing, user groups ------------------------------------------------------------------


class ChannelPacer:
    """A token bucket per channel: `burst` posts at once, then one per `interval` seconds.

    Slack allows about one message per second per channel, with short bursts; pacing
    ourselves keeps an alert storm from turning into a wall of 429s.
    """

    def __init__(
        self,
        interval: float,
        burst: int = 4,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.interval = interval
        self.burst = max(1, burst)
        self._clock = clock
        self._sleep = sleep
        self._buckets: dict[str, tuple[float, float]] = {}  # channel -> (tokens, at)
        self._lock = threading.Lock()

    def wait(self, channel: str) -> float:
        """Block until a post to `channel` is due; returns the seconds waited."""
        if self.interval <= 0:
            return 0.0
        with self._lock:
            now = self._clock()
            tokens, at = self._buckets.get(channel, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) / self.interval) - 1.0
            self._buckets[channel] = (tokens, now)  # negative: reserved slots in the queue
        delay = -tokens * self.interval if tokens < 0 else 0.0
        if delay > 0:
            self._sleep(delay)
        return delay


class UserGroups:
    """Members of Slack user groups (``usergroups.users.list``), cached for `ttl` seconds."""

    def __init__(
        self, client: WebClient, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client = client
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def members(self, group: str) -> frozenset[str]:
        with self._lock:
            cached = self._cache.get(group)
        if cached is not None and self._clock() < cached[0]:
            return cached[1]
        try:
            response = self.client.usergroups_users_list(usergroup=group)
        except SlackClientError as exc:
            # Keep the last known members rather than lock everyone out while Slack is
            # unwell; with none known, nobody is a member (deny).
            log.warning("usergroups.users.list %s failed: %s", group, _api_error(exc))
            return cached[1] if cached is not None else frozenset()
        users = frozenset(str(u) for u in response.get("users") or ())
        with self._lock:
            self._cache[group] = (self._clock() + self.ttl, users)
        return users

    def member_of(self, user: str, group: str) -> bool:
        return user in self.members(group)


def _api_error(exc: Exception) -> str:
    """A short reason for the log: Slack's error code, never the request."""
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or f"HTTP {exc.response.status_code}")
    return type(exc).__name__


# --- the chat port -----------------------------------------------------------------------


class _LatestUpdates:
    """Sends step-message updates in the background, keeping only the newest per message.

    An update waits `delay` seconds before it is sent, so states that follow each other
    within that window (approved, then running a millisecond later) become one
    ``chat.update``: fewer calls against its per-workspace rate limit, and none competing
    with the command that is about to start. One sender thread keeps the updates of a
    message in order.
    """

    def __init__(self, send: Callable[[MessageRef, StepView], None], delay: float) -> None:
        self._send = send
        self._delay = delay
        self._latest: dict[MessageRef, tuple[float, StepView]] = {}  # ref -> (due, view)
        self._busy = False
        self._hurry = 0  # flushes waiting: send what is queued without the delay
        self._closed = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="slack-updates", daemon=True)
        self._thread.start()

    def put(self, ref: MessageRef, view: StepView) -> None:
        with self._cond:
            if not self._closed:
                # A newer state of a queued message takes its place, not a later turn.
                queued = self._latest.get(ref)
                due = queued[0] if queued else time.monotonic() + self._delay
                self._latest[ref] = (due, view)
                self._cond.notify_all()
                return
        self._send(ref, view)  # after close: nobody is left to send it later

    def _next(self) -> tuple[MessageRef, StepView] | None:
        """The oldest queued update once it is due; None when closed and drained."""
        with self._cond:
            while True:
                if self._latest:
                    ref, (due, view) = next(iter(self._latest.items()))
                    wait = due - time.monotonic()
                    if wait <= 0 or self._hurry or self._closed:
                        del self._latest[ref]
                        self._busy = True
                        return ref, view
                    self._cond.wait(wait)
                elif self._closed:
                    return None
                else:
                    self._cond.wait()

    def _run(self) -> None:
        while (item := self._next()) is not None:
            ref, view = item
            try:
                self._send(ref, view)
            except Exception:
                log.exception("updating step message %s failed", ref.ts)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def flush(self, timeout: float) -> bool:
        """Send every queued update now; False if `timeout` passed before they were sent."""
        with self._cond:
            self._hurry += 1
            self._cond.notify_all()
            try:
                return self._cond.wait_for(lambda: not self._latest and not self._busy, timeout)
            finally:
                self._hurry -= 1

    def close(self, timeout: float) -> bool:
        done = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(max(0.1, timeout))
        return done


class SlackChat:
    """The chat port on Slack: a thread per incident, a message per step."""

    def __init__(
        self,
        client: WebClient,
        *,
        pacer: ChannelPacer | None = None,
        reactions: messages.ReactionNames = messages.DEFAULT_REACTIONS,
        update_delay: float = 0.05,
    ) -> None:
        self.client = client
        self.pacer = pacer or ChannelPacer(0)
        self.reactions = reactions  # added under guarded steps, and named in their text
        self._channel_ids: dict[str, str] = {}  # "#inc-payments" -> "C0…", as Slack answered
        self._updates = _LatestUpdates(self._send_update, update_delay)

    def _post(self, channel: str, text: str, **kwargs: Any) -> MessageRef:
        channel = self._channel_ids.get(channel, channel)
        self.pacer.wait(channel)
        response = self.client.chat_postMessage(channel=channel, text=text, **kwargs)
        posted_in = str(response.get("channel") or channel)
        self._channel_ids[channel] = posted_in
        return MessageRef(posted_in, str(response["ts"]))

    def post_incident(self, view: IncidentView) -> MessageRef:
        return self._post(
            view.channel,
            messages.incident_text(_escaped_incident(view)),
            blocks=incident_blocks(view),
            unfurl_links=False,
        )

    def post_step(self, thread: MessageRef, view: StepView) -> MessageRef:
        ref = self._post(
            thread.channel,
            messages.step_text(_escaped_step(view), self.reactions),
            blocks=step_blocks(view, self.reactions),
            thread_ts=thread.ts,
        )
        if view.state == "awaiting_approval":
            # The choices, visible under the message: one click for the responder.
            offered = (self.reactions.approve, self.reactions.reject, self.reactions.pause)
            for name in offered:
                try:
                    self.client.reactions_add(channel=ref.channel, timestamp=ref.ts, name=name)
                except SlackClientError as exc:
                    log.warning(
                        "adding :%s: under step %s failed: %s", name, view.step_id, _api_error(exc)
                    )
        return ref

    def update_step(self, message: MessageRef, view: StepView) -> None:
        self._updates.put(message, view)

    def _send_update(self, message: MessageRef, view: StepView) -> None:
        self.client.chat_update(
            channel=message.channel,
            ts=message.ts,
            text=messages.step_text(_escaped_step(view), self.reactions),
            blocks=step_blocks(view, self.reactions),
        )

    def post_note(self, thread: MessageRef, text: str) -> None:
        self._post(thread.channel, text, thread_ts=thread.ts)

    def notify_user(self, channel: str, user: str, text: str, thread_ts: str = "") -> None:
        self.client.chat_postEphemeral(
            channel=channel, user=user, text=text, thread_ts=thread_ts or None
        )

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait for pending message updates (tests, shutdown)."""
        return self._updates.flush(timeout)

    def close(self, timeout: float = 5.0) -> bool:
        return self._updates.close(timeout)


# --- reactions -> engine -----------------------------------------------------------------


@dataclass(frozen=True)
class Reactions:
    """Which reaction names mean what (config aliases; skin tones are ignored)."""

    approve: tuple[str, ...]
    reject: tuple[str, ...]
    pause: tuple[str, ...]

    @classmethod
    def from_config(cls, config: Config) -> Reactions:
        def names(values: Iterable[str], default: str) -> tuple[str, ...]:
            return tuple(base_reaction(v) for v in values if base_reaction(v)) or (default,)

        return cls(
            names(config.approve_reactions, "white_check_mark"),
            names(config.reject_reactions, "x"),
            names(config.pause_reactions, "double_vertical_bar"),
        )

    @property
    def offered(self) -> messages.ReactionNames:
        """The first alias of each: what the bot adds under a guarded step."""
        return messages.ReactionNames(self.approve[0], self.reject[0], self.pause[0])

    def verb(self, reaction: str, added: bool) -> str | None:
        """approve | reject | pause | resume, or None for a reaction that means nothing."""
        name = base_reaction(reaction)
        if added:
            if name in self.approve:
                return "approve"
            if name in self.reject:
                return "reject"
            if name in self.pause:
                return "pause"
            return None
        return "resume" if name in self.pause else None


class ReactionIntake:
    """Reaction events in, engine decisions out; a durable, deduplicated queue between."""

    def __init__(
        self, host: Host, chat: SlackChat, reactions: Reactions, bot_user_ids: frozenset[str]
    ) -> None:
        self.host = host
        self.chat = chat
        self.reactions = reactions
        self.bot_user_ids = bot_user_ids

    # On the request path: cheap, durable, then acknowledge.
    def receive(self, body: dict[str, Any], added: bool) -> None:
        event = body.get("event") or {}
        reaction = str(event.get("reaction") or "")
        verb = self.reactions.verb(reaction, added)
        user = str(event.get("user") or "")
        item = event.get("item") or {}
        if verb is None or not user or user in self.bot_user_ids or item.get("type") != "message":
            return  # not a decision, or the bot's own ✅ ❌ ⏸️: silently nothing
        channel, ts = str(item.get("channel") or ""), str(item.get("ts") or "")
        step_run = self.host.store.step_run_by_message(channel, ts)
        if step_run is None:
            return  # a reaction on the root message, a note, or any other message
        event_id = str(body.get("event_id") or "") or (
            f"{event.get('type')}:{channel}:{ts}:{user}:{reaction}:{event.get('event_ts')}"
        )
        payload = {
            "verb": verb,
            "user": user,
            "reaction": reaction,
            "channel": channel,
            "ts": ts,
            "step_run_id": step_run["id"],
        }
        fresh = self.host.store.enqueue_delivery(
            source=SOURCE,
            delivery_id=event_id,
            event_id=event_id,
            event_type=str(event.get("type") or ""),
            incident_id=step_run["incident_id"],
            payload=json.dumps(payload),
            catalog_commit=self.host.engine.catalog.version,
        )
        metrics.webhook_deliveries.labels(SOURCE, "accepted" if fresh else "duplicate").inc()
        if fresh:
            self.kick()

    def kick(self) -> None:
        self.host.pool.submit(self.drain)

    # On a worker.
    def drain(self) -> None:
        """Handle queued reactions until none is ready (one incident's in arrival order)."""
        store = self.host.store
        while True:
            delivery = store.claim_next_delivery(SOURCE, set())
            if delivery is None:
                return
            try:
                self.handle(delivery)
            except Exception:
                log.exception("reaction delivery %s failed", delivery["id"])
                store.finish_delivery(delivery["id"], "failed", "unexpected error (see the log)")
            else:
                store.finish_delivery(delivery["id"], "done")

    def handle(self, delivery: dict[str, Any]) -> None:
        payload = json.loads(delivery["payload"])
        engine, store = self.host.engine, self.host.store
        step_run_id, user, verb = int(payload["step_run_id"]), payload["user"], payload["verb"]
        step_run = store.get_step_run(step_run_id)
        if step_run is None:
            return
        if verb == "resume" and step_run["status"] != "awaiting_approval":
            return  # un-pausing a decided step: nothing to say
        decide: dict[str, Callable[[int, str], Outcome]] = {
            "approve": engine.approve,
            "reject": engine.reject,
            "pause": engine.pause,
            "resume": engine.resume,
        }
        outcome = decide[verb](step_run_id, user)
        if outcome.ok:
            return  # the step's message shows it
        if delivery["attempts"] > 1:
            return  # handled again after a crash: the person most likely has their answer
        incident = store.get_incident(step_run["incident_id"]) or {}
        text = messages.DECIDED_NOTE.format(step=step_run["step_id"], reason=outcome.message)
        try:
            self.chat.notify_user(
                payload["channel"], user, text, thread_ts=str(incident.get("thread_ts") or "")
            )
        except SlackClientError as exc:
            log.warning("ephemeral note to %s failed: %s", user, _api_error(exc))


# --- the adapter BotApp builds -------------------------------------------------------------


def _retry_handlers(tuning: SlackTuning) -> list[RetryHandler]:
    interval: dict[str, Any] = (
        {"interval_calculator": tuning.retry_interval} if tuning.retry_interval else {}
    )
    return [
        ConnectionErrorRetryHandler(max_retry_count=tuning.server_error_retries, **interval),
        RateLimitErrorRetryHandler(max_retry_count=tuning.rate_limit_retries),
        ServerErrorRetryHandler(max_retry_count=tuning.server_error_retries, **interval),
    ]


class _DropMessage(logging.Filter):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != self.text


def _bolt_logger() -> logging.Logger:
    """bolt's logger, without one misleading line: bolt warns that "`token` will be
    unused" whenever SLACK_BOT_TOKEN is in the environment and a client is given
    (slackapi/bolt-python#983), which is exactly how this bot is meant to run."""
    logger = logging.getLogger("bot.chat.slack.bolt")
    if not logger.filters:
        logger.addFilter(_DropMessage("As you gave `client` as well, `token` will be unused."))
    return logger


class SlackAdapter:
    """Slack for ``BotApp``: the chat port, the events endpoint and Socket Mode."""

    def __init__(self, config: Config, app: Host, tuning: SlackTuning | None = None) -> None:
        self.config = config
        self.host = app
        self.tuning = tuning or SlackTuning()
        if not config.socket_mode and not config.slack_signing_secret:
            raise ConfigError(
                "SLACK_SIGNING_SECRET is not set: without it anyone could post reactions to "
                "/slack/events. Set it (Slack app > Basic Information > Signing Secret), or "
                "set SLACK_APP_TOKEN to use Socket Mode."
            )
        self.client = WebClient(
            token=config.slack_bot_token.reveal(),
            base_url=config.slack_api_url,
            timeout=self.tuning.timeout,
            retry_handlers=_retry_handlers(self.tuning),
        )
        identity = self._auth_test()
        self.team_id = str(identity.get("team_id") or "")
        self.bot_user_id = str(identity.get("user_id") or "")
        self.bot_id = str(identity.get("bot_id") or "")
        self.bot_user_ids = frozenset(i for i in (self.bot_user_id, self.bot_id) if i)
        self.reactions = Reactions.from_config(config)
        self.chat = SlackChat(
            self.client,
            pacer=ChannelPacer(self.tuning.pacing_interval, self.tuning.pacing_burst),
            reactions=self.reactions.offered,
            update_delay=self.tuning.update_delay,
        )
        self.usergroups = UserGroups(self.client, self.tuning.usergroup_ttl)
        self.intake = ReactionIntake(app, self.chat, self.reactions, self.bot_user_ids)
        self.bolt = self._bolt_app()
        self._http = SlackRequestHandler(self.bolt, path="/slack/events")
        self._socket: Any = None  # a SocketModeHandler (its methods are untyped)

    def _auth_test(self) -> dict[str, Any]:
        """Who the bot is: its own reactions never count. Fails start-up on a bad token."""
        try:
            return dict(self.client.auth_test().data)  # type: ignore[arg-type]
        except SlackClientError as exc:
            raise ConfigError(
                f"Slack auth.test failed ({_api_error(exc)}) at {self.config.slack_api_url}: "
                "check SLACK_BOT_TOKEN (a bot token, xoxb-…) and SLACK_API_URL"
            ) from None

    def _bolt_app(self) -> App:
        # bolt's own client carries no token: each request gets the bot token from
        # `_authorize`, which answers from the auth.test above instead of calling Slack
        # on the request path.
        bolt_client = WebClient(
            base_url=self.config.slack_api_url,
            timeout=self.tuning.timeout,
            retry_handlers=_retry_handlers(self.tuning),
        )
        authorized = AuthorizeResult(
            enterprise_id=None,
            team_id=self.team_id or None,
            bot_user_id=self.bot_user_id or None,
            bot_id=self.bot_id or None,
            bot_token=self.config.slack_bot_token.reveal(),
        )

        def _authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
            return authorized

        bolt = App(
            name="runbook-bot",
            client=bolt_client,
            signing_secret=self.config.slack_signing_secret.reveal(),
            authorize=_authorize,
            # Run the listener before answering: it only records the event and queues the
            # work (on BotApp's bounded pool), so the answer says "recorded", not "maybe".
            process_before_response=True,
            logger=_bolt_logger(),
        )

        def on_added(body: dict[str, Any]) -> None:
            self.intake.receive(body, added=True)

        def on_removed(body: dict[str, Any]) -> None:
            self.intake.receive(body, added=False)

        bolt.event("reaction_added")(on_added)
        bolt.event("reaction_removed")(on_removed)
        return bolt

    # --- what BotApp uses -----------------------------------------------------------------

    def member_of(self, user: str, group: str) -> bool:
        return self.usergroups.member_of(user, group)

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        def counting_start_response(status: str, headers: Any, *args: Any) -> Any:
            if status.startswith("401"):
                metrics.webhook_deliveries.labels(SOURCE, "rejected").inc()
            return start_response(status, headers, *args)

        return self._http(environ, counting_start_response)

    def socket_mode_handler(self) -> SocketModeHandler:
        """The Socket Mode connection (constructing it starts its threads; close it)."""
        from slack_bolt.adapter.socket_mode import SocketModeHandler

        return SocketModeHandler(self.bolt, app_token=self.config.slack_app_token.reveal())

    def start(self) -> None:
        """Finish reactions a previous run had accepted, then listen (Socket Mode)."""
        requeued = self.host.store.requeue_interrupted_deliveries(SOURCE)
        if requeued:
            log.info("%d reaction(s) interrupted by the last stop will be handled now", requeued)
        self.intake.kick()
        if self.config.socket_mode:
            self._socket = self.socket_mode_handler()
            self._socket.connect()
            log.info("Slack Socket Mode connected")

    def stop(self, timeout: float = 5.0) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if not self.chat.close(timeout):
            log.warning("some Slack message updates were not sent before shutdown")
