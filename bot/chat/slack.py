"""The Slack adapter: incident threads in Block Kit, approvals by reaction, nothing lost.

Thin parts, no business rules (those are in ``bot.engine`` and ``bot.policy``):

  SlackTransport   delivers the outbox's Slack effects (``bot.outbox``): the thread's root,
                   one message per step (updated in place), notes, the ✅ ❌ ⏸️ offered
                   under guarded steps, private notes. Every post carries message
                   metadata naming its outbox row, so after a crash or a timeout the
                   transport finds a message Slack did post instead of posting it again.
  ReactionIntake   ``reaction_added``/``reaction_removed`` -> inbox items (approve, reject,
                   pause, resume), deduplicated on Slack's event id.
  ClickIntake      the step buttons' ``block_actions`` -> the same inbox items, checked
                   strictly (``Click.parse``) and deduplicated on the click's trigger id;
                   each names its incident, step and fingerprint (``ButtonValue``), and
                   the engine refuses a click whose button is not the request's own.
  SlackAdapter     wires a ``slack_sdk`` WebClient, a bolt ``App`` and the two above. A
                   token Slack refuses fails the start; a Slack that cannot answer at
                   start (an outage) does not: the bot starts and asks again later.

The path of a reaction:

  Slack ──signed POST──▶ /slack/events (bolt verifies) ──▶ ReactionIntake.receive
        ◀── 200 ─────────  one indexed lookup (which step is this message?) and one insert
                           into the inbox (dedupe by event id, durable), then the answer
  inbox: the incident's items in receipt order ──▶ engine ──▶ the step runs (at most once)
  outbox: the step message updated, paced to Slack's limits, retried until delivered

Slack's limits (``SLACK_BUDGETS``, from Slack's rate-limit documentation): about one
``chat.postMessage`` per second per channel with short bursts, and several hundred per
minute per workspace; ``chat.update``, ``reactions.add``, ``conversations.history`` and
``conversations.replies`` are Tier 3 (50+ per minute); ``chat.postEphemeral`` Tier 4
(100+ per minute). A 429 holds that method's budget for its ``Retry-After``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slack_bolt import App
from slack_bolt.adapter.wsgi import SlackRequestHandler
from slack_bolt.authorization import AuthorizeResult
from slack_bolt.context import BoltContext
from slack_bolt.context.ack import Ack
from slack_bolt.middleware import Middleware
from slack_bolt.request import BoltRequest
from slack_bolt.response import BoltResponse
from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackClientError

from bot import effects, messages, metrics
from bot.chat.base import IncidentView, StepView
from bot.commands import CommandRequest
from bot.config import Config
from bot.errors import ConfigError
from bot.outbox import Refused, Retry, Sent
from bot.states import InboxKind, StepStatus
from bot.store import OutboxItem

if TYPE_CHECKING:
    from slack_bolt.adapter.socket_mode import SocketModeHandler

log = logging.getLogger(__name__)

SOURCE = "slack"  # inbox source of reaction events
METADATA_TYPE = "runbook_bot_message"  # Slack message metadata naming the outbox row

# Block Kit limits (Slack rejects longer texts with invalid_blocks)
HEADER_MAX = 150
SECTION_MAX = 3000
FIELD_MAX = 2000

# Per second, burst. "name:*" applies to every "name:<channel>".
# In any minute a budget allows at most burst + rate × 60 calls: Tier 3 methods 50, Tier 4
# 100, chat.postMessage 300 per workspace, and about one a second per channel.
SLACK_BUDGETS: Mapping[str, tuple[float, float]] = {
    "chat.postMessage:*": (1.0, 3.0),
    "chat.postMessage": (280 / 60, 20.0),
    "chat.update": (40 / 60, 10.0),
    "reactions.add": (40 / 60, 10.0),
    "conversations": (40 / 60, 10.0),  # .history and .replies, looking for a lost post
    "chat.postEphemeral": (90 / 60, 10.0),
}

# Slack errors that will not go away by retrying the same call.
_REFUSED = frozenset(
    {
        "invalid_blocks",
        "invalid_blocks_format",
        "msg_too_long",
        "no_text",
        "invalid_arguments",
        "message_not_found",
        "cant_update_message",
        "edit_window_closed",
        "is_archived",
        "channel_is_archived",
        "invalid_metadata_format",
        "invalid_metadata_schema",
        "user_not_in_channel",
        "restricted_action",
    }
)
# Errors an operator fixes (a token, inviting the bot): retried slowly, nothing is lost.
_SETUP_ERRORS = frozenset(
    {"not_in_channel", "channel_not_found", "not_authed", "invalid_auth", "token_revoked",
     "account_inactive", "missing_scope", "team_access_not_granted"}
)  # fmt: skip
SETUP_RETRY_SECONDS = 60.0
# auth.test errors that mean the token is wrong: the bot refuses to start.
_AUTH_ERRORS = frozenset(
    {"not_authed", "invalid_auth", "token_revoked", "token_expired", "account_inactive",
     "not_allowed_token_type", "no_permission", "ekm_access_denied"}
)  # fmt: skip
_CHANNEL_ID = re.compile(r"[CGD][A-Z0-9]{2,}")


@dataclass(frozen=True)
class SlackTuning:
    """Knobs with production defaults; tests and benchmarks make them small."""

    usergroup_ttl: float = 300.0  # seconds a user group's members are cached
    timeout: int = 10  # seconds per Web API request
    budgets: Mapping[str, tuple[float, float]] | None = None  # None: SLACK_BUDGETS
    lookup_pages: int = 10  # pages of history searched for a message that may exist


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


# Button action_ids (DESIGN.md section 4): what a click asks of the step.
APPROVE_ACTION = "runbook_approve"
REJECT_ACTION = "runbook_reject"
PAUSE_ACTION = "runbook_pause"
RESUME_ACTION = "runbook_resume"
BUTTON_KINDS: Mapping[str, InboxKind] = {
    APPROVE_ACTION: InboxKind.APPROVE,
    REJECT_ACTION: InboxKind.REJECT,
    PAUSE_ACTION: InboxKind.PAUSE,
    RESUME_ACTION: InboxKind.RESUME,
}
BUTTON_VALUE_MAX = 2000  # Slack's limit for a button's value


@dataclass(frozen=True)
class ButtonValue:
    """What a button names: this step of this incident, as rendered with this fingerprint.
    A click applies to exactly that; anything else changes nothing."""

    incident_id: str
    step_run_id: int
    fingerprint: str

    def encode(self) -> str:
        value = {"incident": self.incident_id, "step": self.step_run_id}
        return json.dumps({**value, "fingerprint": self.fingerprint}, separators=(",", ":"))

    @classmethod
    def decode(cls, text: object) -> ButtonValue | None:
        """The value of a click, or None when it is not exactly one of ours."""
        if not isinstance(text, str) or len(text) > BUTTON_VALUE_MAX:
            return None
        try:
            data = json.loads(text)
        except ValueError:
            return None
        if not isinstance(data, dict) or set(data) != {"incident", "step", "fingerprint"}:
            return None
        incident, step, fp = data["incident"], data["step"], data["fingerprint"]
        if (
            not isinstance(incident, str)
            or not incident
            or isinstance(step, bool)
            or not isinstance(step, int)
            or step <= 0
            or not isinstance(fp, str)
            or not _FINGERPRINT.fullmatch(fp)
        ):
            return None
        return cls(incident, step, fp)


_FINGERPRINT = re.compile(r"[0-9a-f]{12}")


def _button(
    text: str, action_id: str, value: str, *, style: str = "", confirm: Any = None
) -> dict[str, Any]:
    button: dict[str, Any] = {
        "type": "button",
        "text": {"type": "plain_text", "text": text, "emoji": True},
        "action_id": action_id,
        "value": value,
    }
    if style:
        button["style"] = style
    if confirm:
        button["confirm"] = confirm
    return button


def step_buttons(view: StepView) -> dict[str, Any] | None:
    """Approve / Reject / Pause (Resume while paused) under a step awaiting approval;
    None once it is decided (the status line then says who decided, and when)."""
    if view.state != StepStatus.AWAITING_APPROVAL or not view.fingerprint:
        return None
    value = ButtonValue(view.incident_id, view.step_run_id, view.fingerprint).encode()
    confirm = None
    if view.production:
        confirm = {
            "title": {"type": "plain_text", "text": "Run in production?"},
            "text": {
                "type": "mrkdwn",
                "text": clip(
                    messages.PRODUCTION_CONFIRM.format(
                        env=escape(view.env), fingerprint=view.fingerprint
                    )
                    + "\n"
                    + code_block(view.command, 250),
                    300,
                ),
            },
            "confirm": {"type": "plain_text", "text": "Approve"},
            "deny": {"type": "plain_text", "text": "Cancel"},
            "style": "danger",
        }
    pause = (
        _button("▶️ Resume", RESUME_ACTION, value)
        if view.paused_by
        else _button("⏸️ Pause", PAUSE_ACTION, value)
    )
    return {
        "type": "actions",
        # A new block_id per rendering: Slack keys a message's interactive state on it.
        "block_id": f"runbook:{view.step_run_id}:{view.fingerprint}:{bool(view.paused_by):d}",
        "elements": [
            _button("✅ Approve", APPROVE_ACTION, value, style="primary", confirm=confirm),
            _button("❌ Reject", REJECT_ACTION, value, style="danger"),
            pause,
        ],
    }


def step_blocks(view: StepView, reactions: messages.ReactionNames) -> list[dict[str, Any]]:
    safe = _escaped_step(view)
    blocks: list[dict[str, Any]] = [_header(messages.step_title(view))]
    if safe.description:
        blocks.append(_section(safe.description))
    blocks.append(_section(code_block(view.command)))
    if view.fingerprint and view.state == StepStatus.AWAITING_APPROVAL:
        blocks.append(_context(messages.fingerprint_text(view)))
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
    buttons = step_buttons(view)
    if buttons is not None:
        blocks.append(buttons)
    return blocks


# --- user groups ----------------------------------------------------------------------------


class UserGroups:
    """Members of Slack user groups (``usergroups.users.list``), cached for `ttl` seconds.

    The engine asks while it decides a reaction, so an answer must not wait on Slack when
    it can be helped: groups are fetched ahead (`warm`, at start), and an expired entry is
    answered from the cache while a background refresh asks Slack. Only a group never
    fetched is asked for on the spot.
    """

    def __init__(
        self, client: WebClient, ttl: float, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client = client
        self.ttl = ttl
        self._clock = clock
        self._cache: dict[str, tuple[float, frozenset[str]]] = {}
        self._refreshing: set[str] = set()
        self._lock = threading.Lock()

    def members(self, group: str) -> frozenset[str]:
        with self._lock:
            cached = self._cache.get(group)
            stale = cached is not None and self._clock() >= cached[0]
            refresh = stale and group not in self._refreshing
            if refresh:
                self._refreshing.add(group)
        if cached is None:
            return self._fetch(group)
        if refresh:
            threading.Thread(
                target=self._fetch, args=(group,), name=f"usergroup-{group}", daemon=True
            ).start()
        return cached[1]

    def warm(self, groups: Iterable[str]) -> None:
        """Fetch these groups now (in the caller's thread), so decisions find them cached."""
        for group in groups:
            self._fetch(group)

    def _fetch(self, group: str) -> frozenset[str]:
        try:
            response = self.client.usergroups_users_list(usergroup=group)
        except (SlackClientError, OSError) as exc:
            # Keep the last known members rather than lock everyone out while Slack is
            # unwell; with none known, nobody is a member (deny).
            log.warning("usergroups.users.list %s failed: %s", group, _api_error(exc))
            with self._lock:
                self._refreshing.discard(group)
                cached = self._cache.get(group)
            return cached[1] if cached is not None else frozenset()
        users = frozenset(str(u) for u in response.get("users") or ())
        with self._lock:
            self._cache[group] = (self._clock() + self.ttl, users)
            self._refreshing.discard(group)
        return users

    def member_of(self, user: str, group: str) -> bool:
        return user in self.members(group)


class BotIdentity:
    """Who the bot is in Slack: its own reactions (the ✅ ❌ ⏸️ it adds) never count.

    Known from ``auth.test`` at start. When Slack cannot answer then (an outage), the bot
    starts anyway and asks again in the background; meanwhile every signed event names
    the bot user it was delivered to (``authorizations``), which is learned as it comes.
    """

    def __init__(self) -> None:
        self.team_id = ""
        self.user_id = ""
        self.bot_id = ""
        self._ids: set[str] = set()
        self._lock = threading.Lock()

    def learn(self, *, team_id: str = "", user_id: str = "", bot_id: str = "") -> None:
        with self._lock:
            self.team_id = self.team_id or team_id
            self.user_id = self.user_id or user_id
            self.bot_id = self.bot_id or bot_id
            self._ids.update(i for i in (user_id, bot_id) if i)

    def learn_from_event(self, body: Mapping[str, Any]) -> None:
        for authorization in body.get("authorizations") or ():
            if isinstance(authorization, dict) and authorization.get("is_bot"):
                self.learn(user_id=str(authorization.get("user_id") or ""))

    @property
    def known(self) -> bool:
        with self._lock:
            return bool(self.user_id)

    def ids(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._ids)

    def __contains__(self, user: object) -> bool:
        with self._lock:
            return user in self._ids


def _api_error(exc: Exception) -> str:
    """A short reason for the log: Slack's error code, never the request."""
    if isinstance(exc, SlackApiError):
        return str(exc.response.get("error") or f"HTTP {exc.response.status_code}")
    return type(exc).__name__


def _retry_after(exc: SlackApiError) -> float | None:
    headers = exc.response.headers or {}
    for name, value in headers.items():
        if name.lower() == "retry-after":
            raw = value[0] if isinstance(value, list | tuple) else value
            try:
                return max(0.0, float(raw))
            except (TypeError, ValueError):
                return 1.0
    return None


def classify(exc: Exception, *, maybe_sent: bool) -> Retry | Refused:
    """What a failed Web API call means for the outbox.

    `maybe_sent`: the call posts something, so a timeout or a server error may hide a
    success (the next attempt looks first).
    """
    if isinstance(exc, SlackApiError):
        status = exc.response.status_code
        error = str(exc.response.get("error") or "")
        if status == 429 or error == "ratelimited":
            return Retry(f"rate limited ({error or 429})", after=_retry_after(exc) or 1.0)
        if status >= 500:
            return Retry(f"HTTP {status} {error}".strip(), maybe_sent=maybe_sent)
        if error in _SETUP_ERRORS:
            return Retry(
                f"{error}: check SLACK_BOT_TOKEN and invite the bot to the channel",
                after=SETUP_RETRY_SECONDS,
            )
        if error in _REFUSED:
            return Refused(error)
        return Retry(error or f"HTTP {status}", maybe_sent=maybe_sent)
    # Timeouts, refused or reset connections: Slack may or may not have acted.
    return Retry(type(exc).__name__, maybe_sent=maybe_sent)


class SlackTransport:
    """Delivers Slack effects of the outbox through the Web API (``bot.outbox.Transport``)."""

    def __init__(
        self,
        client: WebClient,
        *,
        reactions: messages.ReactionNames = messages.DEFAULT_REACTIONS,
        lookup_pages: int = 10,
    ) -> None:
        self.client = client
        self.reactions = reactions  # added under guarded steps, and named in their text
        self.lookup_pages = lookup_pages
        self._channel_ids: dict[str, str] = {}  # "#inc-payments" -> "C0…"
        self._lock = threading.Lock()

    # --- Transport -------------------------------------------------------------------------

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        kind = item.kind
        if kind in (effects.Kind.POST_INCIDENT, effects.Kind.POST_STEP, effects.Kind.NOTE):
            channel = item.lane.removeprefix("slack:")
            posting = (f"chat.postMessage:{channel}", "chat.postMessage")
            # A retry may look for the post first (a timeout may hide a success).
            return (*posting, "conversations") if item.attempts else posting
        if kind == effects.Kind.UPDATE_STEP:
            return ("chat.update",)
        if kind == effects.Kind.REACT:
            return ("reactions.add",) * 3  # ✅ ❌ ⏸️: three calls
        if kind == effects.Kind.EPHEMERAL:
            return ("chat.postEphemeral",)
        return ()

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        # A 429 on chat.postMessage is per channel; on other methods, per workspace.
        names = self.budgets(item)
        return names[:1]

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        kind, payload = item.kind, item.payload
        try:
            if kind == effects.Kind.POST_INCIDENT:
                incident = effects.incident_view(payload)
                return self._post(
                    item,
                    maybe_sent,
                    channel=incident.channel,
                    thread_ts=None,
                    text=messages.incident_text(_escaped_incident(incident)),
                    blocks=incident_blocks(incident),
                )
            if kind == effects.Kind.POST_STEP:
                view = effects.step_view(payload)
                return self._post(
                    item,
                    maybe_sent,
                    channel=self._thread_channel(item),
                    thread_ts=self._thread(item),
                    text=messages.step_text(_escaped_step(view), self.reactions),
                    blocks=step_blocks(view, self.reactions),
                )
            if kind == effects.Kind.NOTE:
                return self._post(
                    item,
                    maybe_sent,
                    channel=self._thread_channel(item),
                    thread_ts=self._thread(item),
                    text=str(payload["text"]),
                    blocks=None,
                )
            if kind == effects.Kind.UPDATE_STEP:
                view = effects.step_view(payload)
                assert item.target_ts is not None and item.target_channel is not None
                self.client.chat_update(
                    channel=item.target_channel,
                    ts=item.target_ts,
                    text=messages.step_text(_escaped_step(view), self.reactions),
                    blocks=step_blocks(view, self.reactions),
                )
                return Sent()
            if kind == effects.Kind.REACT:
                self._react(item)
                return Sent()
            if kind == effects.Kind.EPHEMERAL:
                channel = str(payload["channel"])
                self.client.chat_postEphemeral(
                    channel=self._channel_id(channel) or channel,
                    user=str(payload["user"]),
                    text=str(payload["text"]),
                    thread_ts=item.thread_ts or None,
                )
                return Sent()
        except SlackClientError as exc:
            posts = kind in (effects.Kind.POST_INCIDENT, effects.Kind.POST_STEP, effects.Kind.NOTE)
            raise classify(exc, maybe_sent=posts) from None
        except (OSError, TimeoutError) as exc:
            posts = kind in (effects.Kind.POST_INCIDENT, effects.Kind.POST_STEP, effects.Kind.NOTE)
            raise classify(exc, maybe_sent=posts) from None
        raise Refused(f"not a Slack effect: {kind}")

    # --- posting once ----------------------------------------------------------------------

    def _thread(self, item: OutboxItem) -> str:
        if not item.thread_ts:
            # The root is delivered first on the same lane; without it, it was refused.
            raise Refused("the incident's first message could not be posted")
        return item.thread_ts

    def _thread_channel(self, item: OutboxItem) -> str:
        return item.thread_channel or item.lane.removeprefix("slack:")

    def _post(
        self,
        item: OutboxItem,
        maybe_sent: bool,
        *,
        channel: str,
        thread_ts: str | None,
        text: str,
        blocks: list[dict[str, Any]] | None,
    ) -> Sent:
        if maybe_sent:
            found = self._find(item, channel, thread_ts)
            if found is not None:
                log.info("outbox %s was already posted as %s: not posting again", item.id, found.ts)
                return found
        kwargs: dict[str, Any] = {}
        if blocks is not None:
            kwargs["blocks"] = blocks
        if thread_ts:
            kwargs["thread_ts"] = thread_ts
        response = self.client.chat_postMessage(
            channel=channel,
            text=text,
            unfurl_links=False,
            metadata={
                "event_type": METADATA_TYPE,
                "event_payload": {"outbox_id": item.id, "incident": item.incident_id},
            },
            **kwargs,
        )
        posted_in = str(response.get("channel") or channel)
        with self._lock:
            self._channel_ids[channel] = posted_in
        return Sent(ts=str(response["ts"]), channel=posted_in)

    def _find(self, item: OutboxItem, channel: str, thread_ts: str | None) -> Sent | None:
        """The message this row posted before, if Slack has it (by its metadata)."""
        channel_id = self._channel_id(channel)
        if channel_id is None:
            # A channel the bot cannot see by name: nowhere to look. Posting again risks a
            # copy; not posting would lose the message for good. (Slack most likely refused
            # the first post for the same reason.)
            log.warning("cannot look for outbox %s in %s: posting it again", item.id, channel)
            return None
        cursor: str | None = None
        for _ in range(self.lookup_pages):
            args: dict[str, Any] = {
                "channel": channel_id,
                "include_all_metadata": True,
                "limit": 200,
            }
            if cursor:
                args["cursor"] = cursor
            if thread_ts:
                response = self.client.conversations_replies(ts=thread_ts, **args)
            else:
                response = self.client.conversations_history(
                    oldest=f"{max(0.0, item.created_at - 60):.6f}", **args
                )
            for message in response.get("messages") or ():
                metadata = message.get("metadata") or {}
                found = (metadata.get("event_payload") or {}).get("outbox_id")
                if metadata.get("event_type") == METADATA_TYPE and found == item.id:
                    return Sent(ts=str(message["ts"]), channel=channel_id)
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                break
        return None

    def _channel_id(self, channel: str) -> str | None:
        """A channel id for methods that need one (the catalog may name `#inc-payments`);
        None when no channel of that name is visible to the bot."""
        name = channel.lstrip("#")
        if _CHANNEL_ID.fullmatch(name):
            return name
        with self._lock:
            known = self._channel_ids.get(channel)
        if known:
            return known
        cursor: str | None = None
        while True:
            response = self.client.conversations_list(
                types="public_channel,private_channel", limit=1000, cursor=cursor,
                exclude_archived=True,
            )  # fmt: skip
            for found in response.get("channels") or ():
                if found.get("name") == name:
                    with self._lock:
                        self._channel_ids[channel] = str(found["id"])
                    return str(found["id"])
            cursor = (response.get("response_metadata") or {}).get("next_cursor") or None
            if not cursor:
                return None

    def _react(self, item: OutboxItem) -> None:
        assert item.target_ts is not None and item.target_channel is not None
        for name in (self.reactions.approve, self.reactions.reject, self.reactions.pause):
            try:
                self.client.reactions_add(
                    channel=item.target_channel, timestamp=item.target_ts, name=name
                )
            except SlackApiError as exc:
                if exc.response.get("error") != "already_reacted":
                    raise


# --- reactions -> inbox --------------------------------------------------------------------


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


Put = Callable[..., bool]
FindMessage = Callable[[str, str], "tuple[str, str] | None"]

_VERB_KINDS = {
    "approve": InboxKind.APPROVE,
    "reject": InboxKind.REJECT,
    "pause": InboxKind.PAUSE,
    "resume": InboxKind.RESUME,
}


class ReactionIntake:
    """Reaction events in, inbox items out: cheap, durable, then acknowledged."""

    def __init__(
        self,
        put: Put,
        find_message: FindMessage,
        reactions: Reactions,
        identity: BotIdentity,
    ) -> None:
        self.put = put
        self.find_message = find_message
        self.reactions = reactions
        self.identity = identity

    def receive(self, body: dict[str, Any], added: bool) -> None:
        self.identity.learn_from_event(body)  # a signed event names the bot it reached
        event = body.get("event") or {}
        reaction = str(event.get("reaction") or "")
        verb = self.reactions.verb(reaction, added)
        user = str(event.get("user") or "")
        item = event.get("item") or {}
        if verb is None or not user or user in self.identity or item.get("type") != "message":
            return  # not a decision, or the bot's own ✅ ❌ ⏸️: silently nothing
        channel, ts = str(item.get("channel") or ""), str(item.get("ts") or "")
        found = self.find_message(channel, ts)
        if found is not None and not found[0].startswith("step:"):
            return  # a reaction on the root message or a note
        event_id = str(body.get("event_id") or "") or (
            f"{event.get('type')}:{channel}:{ts}:{user}:{reaction}:{event.get('event_ts')}"
        )
        payload = {"user": user, "channel": channel, "ts": ts, "reaction": reaction}
        if found is None:
            # Not a message we know, or one of ours whose ts is not recorded yet (posted
            # just before a crash, or an instant ago): it waits, parked, for that message.
            fresh = self.put(
                source=SOURCE,
                key=f"{SOURCE}:event:{event_id}",
                incident_id="",
                kind=_VERB_KINDS[verb],
                payload=payload,
                waiting_for=(channel, ts),
            )
        else:
            key, incident_id = found
            fresh = self.put(
                source=SOURCE,
                key=f"{SOURCE}:event:{event_id}",
                incident_id=incident_id,
                kind=_VERB_KINDS[verb],
                payload={"step_run_id": int(key.removeprefix("step:")), **payload},
            )
        metrics.webhook_deliveries.labels(SOURCE, "accepted" if fresh else "duplicate").inc()


# --- button clicks -> inbox ---------------------------------------------------------------

# Where Slack's response_url points. A payload naming another host was not made by Slack.
RESPONSE_URL_HOSTS = frozenset({"hooks.slack.com"})
_SLACK_ID = re.compile(r"[A-Z0-9]{2,40}")
_TS = re.compile(r"\d{1,12}\.\d{1,9}")


class ClickRefused(Exception):
    """A click payload that is not a well-formed click on one of our step buttons."""


@dataclass(frozen=True)
class Click:
    """A button click as plain values, parsed once at the edge."""

    kind: InboxKind
    value: ButtonValue
    user: str
    channel: str
    ts: str
    trigger: str  # unique per click: the inbox dedupe key

    @classmethod
    def parse(cls, body: Mapping[str, Any], team_id: str) -> Click:
        """Check a ``block_actions`` payload strictly; raises ClickRefused saying why."""
        if body.get("type") != "block_actions":
            raise ClickRefused("not a block_actions payload")
        team = body.get("team")
        if not team_id or not isinstance(team, dict) or team.get("id") != team_id:
            raise ClickRefused("from another workspace")
        user = body.get("user")
        user_id = user.get("id") if isinstance(user, dict) else None
        if not isinstance(user_id, str) or not _SLACK_ID.fullmatch(user_id):
            raise ClickRefused("no user")
        actions = body.get("actions")
        if not isinstance(actions, list) or len(actions) != 1 or not isinstance(actions[0], dict):
            raise ClickRefused("not exactly one action")
        action = actions[0]
        kind = BUTTON_KINDS.get(str(action.get("action_id")))
        if kind is None or action.get("type") != "button":
            raise ClickRefused("not one of the step buttons")
        value = ButtonValue.decode(action.get("value"))
        if value is None:
            raise ClickRefused("a button value the bot did not write")
        container = body.get("container")
        channel = body.get("channel")
        if not isinstance(container, dict) or container.get("type") != "message":
            raise ClickRefused("not a click on a message")
        channel_id = container.get("channel_id")
        ts = container.get("message_ts")
        if (
            not isinstance(channel_id, str)
            or not _SLACK_ID.fullmatch(channel_id)
            or not isinstance(ts, str)
            or not _TS.fullmatch(ts)
            or not isinstance(channel, dict)
            or channel.get("id") != channel_id
        ):
            raise ClickRefused("no message to act on")
        response_url = body.get("response_url")
        if not isinstance(response_url, str):
            raise ClickRefused("no response_url")
        url = urllib.parse.urlsplit(response_url)
        if url.scheme != "https" or url.hostname not in RESPONSE_URL_HOSTS:
            raise ClickRefused("a response_url on a foreign host")
        trigger = body.get("trigger_id")
        if not isinstance(trigger, str) or not trigger or len(trigger) > 200:
            raise ClickRefused("no trigger_id")
        return cls(kind, value, user_id, channel_id, ts, trigger)


class ClickIntake:
    """Button clicks in, inbox items out: the same items, and so exactly the same rules,
    as reactions (authorized approvers, pause is a hold, timeliness at receipt)."""

    def __init__(self, put: Put, find_message: FindMessage, identity: BotIdentity) -> None:
        self.put = put
        self.find_message = find_message
        self.identity = identity

    def check(self, body: Mapping[str, Any]) -> Click | None:
        """The click a payload is, or None (logged and counted) when it is refused."""
        try:
            return Click.parse(body, self.identity.team_id)
        except ClickRefused as exc:
            log.warning("refused a Slack click payload: %s", exc)
            metrics.webhook_deliveries.labels(SOURCE, "rejected").inc()
            return None

    def receive(self, click: Click) -> bool:
        """Record a click; False (nothing recorded) when it is not on a step message."""
        if click.user in self.identity:
            return True  # the bot's own clicks never count
        payload: dict[str, Any] = {
            "user": click.user,
            "channel": click.channel,
            "ts": click.ts,
            "button": {
                "incident": click.value.incident_id,
                "step": click.value.step_run_id,
                "fingerprint": click.value.fingerprint,
            },
        }
        found = self.find_message(click.channel, click.ts)
        if found is not None and not found[0].startswith("step:"):
            log.warning("refused a click on a message that is not a step")
            return False
        key = f"{SOURCE}:click:{click.trigger}"
        if found is None:
            # Posted an instant ago (its ts not recorded yet): it waits for its message.
            fresh = self.put(
                source=SOURCE, key=key, incident_id="", kind=click.kind, payload=payload,
                waiting_for=(click.channel, click.ts),
            )  # fmt: skip
        else:
            message_key, incident_id = found
            fresh = self.put(
                source=SOURCE, key=key, incident_id=incident_id, kind=click.kind,
                payload={"step_run_id": int(message_key.removeprefix("step:")), **payload},
            )  # fmt: skip
        metrics.webhook_deliveries.labels(SOURCE, "accepted" if fresh else "duplicate").inc()
        return True


COMMAND = "/runbook"


def _command_request(body: Mapping[str, Any], team_id: str) -> CommandRequest | None:
    """A slash command payload as plain values, or None when it is not one of ours."""
    fields = {k: body.get(k) for k in ("command", "team_id", "user_id", "channel_id")}
    text, response_url, trigger = (
        body.get("text", ""),
        body.get("response_url"),
        body.get("trigger_id"),
    )
    if (
        fields["command"] != COMMAND
        or not team_id
        or fields["team_id"] != team_id
        or not isinstance(fields["user_id"], str)
        or not _SLACK_ID.fullmatch(fields["user_id"])
        or not isinstance(fields["channel_id"], str)
        or not _SLACK_ID.fullmatch(fields["channel_id"])
        or not isinstance(text, str)
        or not isinstance(trigger, str)
        or not trigger
        or not isinstance(response_url, str)
    ):
        log.warning("refused a /runbook payload: missing fields or another workspace")
        return None
    url = urllib.parse.urlsplit(response_url)
    if url.scheme != "https" or url.hostname not in RESPONSE_URL_HOSTS:
        log.warning("refused a /runbook payload: a response_url on a foreign host")
        return None
    return CommandRequest(text, fields["user_id"], fields["channel_id"], trigger[:200])


class _VetClicks(Middleware):
    """Refuses a click payload that is not exactly a click on one of our buttons (400,
    nothing changes), after bolt checked its signature and before bolt's own matchers,
    which index into a payload's `actions` as if it were well formed. A subclass rather
    than a function middleware: bolt builds a function's arguments from the payload with
    the same assumption."""

    def __init__(self, clicks: ClickIntake) -> None:
        self.clicks = clicks

    def process(
        self, *, req: BoltRequest, resp: BoltResponse, next: Callable[[], BoltResponse]
    ) -> BoltResponse | None:
        body = req.body if isinstance(req.body, dict) else {}
        if body.get("type") == "block_actions":
            click = self.clicks.check(body)
            if click is None:
                return BoltResponse(status=400, body="")
            req.context["runbook_click"] = click
        return next()


# --- the adapter BotApp builds -------------------------------------------------------------


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
    """Slack for ``BotApp``: the transport, the events endpoint and Socket Mode."""

    def __init__(
        self,
        config: Config,
        *,
        put: Put,
        find_message: FindMessage,
        tuning: SlackTuning | None = None,
        command: Callable[[CommandRequest], str] | None = None,
    ) -> None:
        self.config = config
        self.command = command
        self.tuning = tuning or SlackTuning()
        if not config.socket_mode and not config.slack_signing_secret:
            raise ConfigError(
                "SLACK_SIGNING_SECRET is not set: without it anyone could post reactions to "
                "/slack/events. Set it (Slack app > Basic Information > Signing Secret), or "
                "set SLACK_APP_TOKEN to use Socket Mode."
            )
        # No retry handlers: the outbox retries, paced, without holding a thread asleep.
        self.client = WebClient(
            token=config.slack_bot_token.reveal(),
            base_url=config.slack_api_url,
            timeout=self.tuning.timeout,
            retry_handlers=[],
        )
        self.identity = BotIdentity()
        self._auth_test()
        self.reactions = Reactions.from_config(config)
        self.transport = SlackTransport(
            self.client, reactions=self.reactions.offered, lookup_pages=self.tuning.lookup_pages
        )
        if config.slack_pacing not in ("slack", "off"):
            raise ConfigError(f"RUNBOOK_SLACK_PACING={config.slack_pacing!r}: use slack or off")
        default = SLACK_BUDGETS if config.slack_pacing == "slack" else {}
        self.budgets = dict(self.tuning.budgets if self.tuning.budgets is not None else default)
        self.usergroups = UserGroups(self.client, self.tuning.usergroup_ttl)
        self.intake = ReactionIntake(put, find_message, self.reactions, self.identity)
        self.clicks = ClickIntake(put, find_message, self.identity)
        self.bolt = self._bolt_app()
        self._http = SlackRequestHandler(self.bolt, path="/slack/events")
        self._socket: Any = None  # a SocketModeHandler (its methods are untyped)
        self._stopping = threading.Event()
        self._background: threading.Thread | None = None

    def _auth_test(self) -> bool:
        """Who the bot is (its own reactions never count). A token Slack refuses fails
        the start with advice; a Slack that cannot answer now (an outage, a timeout) does
        not: the bot starts, takes PagerDuty deliveries, and asks again later. True when
        the identity is known."""
        try:
            data = self.client.auth_test().data
        except (SlackClientError, OSError) as exc:
            error = _api_error(exc)
            if isinstance(exc, SlackApiError) and error in _AUTH_ERRORS:
                raise ConfigError(
                    f"Slack auth.test failed ({error}) at {self.config.slack_api_url}: "
                    "check SLACK_BOT_TOKEN (a bot token, xoxb-…) and SLACK_API_URL"
                ) from None
            log.warning(
                "Slack auth.test failed (%s) at %s: starting anyway and asking again; "
                "threads are posted once Slack answers",
                error, self.config.slack_api_url,
            )  # fmt: skip
            return False
        identity = data if isinstance(data, dict) else {}
        self.identity.learn(
            team_id=str(identity.get("team_id") or ""),
            user_id=str(identity.get("user_id") or ""),
            bot_id=str(identity.get("bot_id") or ""),
        )
        return True

    @property
    def bot_user_ids(self) -> frozenset[str]:
        """The bot's own user and bot ids, as far as known now."""
        return self.identity.ids()

    def _bolt_app(self) -> App:
        # bolt's own client carries no token: each request gets the bot token from
        # `_authorize`, which answers from what auth.test said instead of calling Slack
        # on the request path.
        bolt_client = WebClient(base_url=self.config.slack_api_url, timeout=self.tuning.timeout)
        identity = self.identity
        token = self.config.slack_bot_token.reveal()

        def _authorize(enterprise_id: str | None, team_id: str | None) -> AuthorizeResult:
            return AuthorizeResult(
                enterprise_id=None,
                team_id=identity.team_id or team_id,
                bot_user_id=identity.user_id or None,
                bot_id=identity.bot_id or None,
                bot_token=token,
            )

        bolt = App(
            name="runbook-bot",
            client=bolt_client,
            signing_secret=self.config.slack_signing_secret.reveal(),
            authorize=_authorize,
            # Run the listener before answering: it only records the event in the inbox,
            # so the answer says "recorded", not "maybe".
            process_before_response=True,
            logger=_bolt_logger(),
        )

        def on_added(body: dict[str, Any]) -> None:
            self.intake.receive(body, added=True)

        def on_removed(body: dict[str, Any]) -> None:
            self.intake.receive(body, added=False)

        def on_click(ack: Ack, context: BoltContext) -> BoltResponse | None:
            # Recorded (one insert into the intake log), then acknowledged: well within
            # Slack's 3 seconds, and the answer means "it counts".
            if not self.clicks.receive(context["runbook_click"]):
                return BoltResponse(status=400, body="")
            ack()
            return None

        def on_command(ack: Ack, body: dict[str, Any]) -> BoltResponse | None:
            request = _command_request(body, self.identity.team_id)
            if request is None:
                metrics.webhook_deliveries.labels(SOURCE, "rejected").inc()
                return BoltResponse(status=400, body="")
            # The answer (private to the user) is the acknowledgement; `run` only puts a
            # trigger in the inbox, well within Slack's 3 seconds.
            answer = self.command(request) if self.command else "/runbook is not set up."
            ack(text=answer, response_type="ephemeral")
            return None

        bolt.use(_VetClicks(self.clicks))
        bolt.command(COMMAND)(on_command)

        bolt.event("reaction_added")(on_added)
        bolt.event("reaction_removed")(on_removed)
        bolt.action(re.compile("^runbook_(approve|reject|pause|resume)$"))(on_click)
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

    def start(self, approver_groups: Iterable[str] = ()) -> None:
        """Listen (Socket Mode; in HTTP mode the server routes /slack/events here), and,
        in the background, fetch the approvers' user groups and, if auth.test could not
        be answered at start, ask until it is."""
        self._stopping.clear()
        groups = sorted(set(approver_groups))
        self._background = threading.Thread(
            target=self._prepare, args=(groups,), name="slack-prepare", daemon=True
        )
        self._background.start()
        if self.config.socket_mode:
            self._socket = self.socket_mode_handler()
            self._socket.connect()
            log.info("Slack Socket Mode connected")

    def _prepare(self, groups: list[str]) -> None:
        wait = 1.0
        while not self.identity.known and not self._stopping.is_set():
            try:
                if self._auth_test():
                    log.info("Slack answered auth.test: the bot is %s", self.identity.user_id)
                    break
            except ConfigError as exc:  # the token was revoked meanwhile: say so, loudly
                log.error("%s", exc)
            self._stopping.wait(wait)
            wait = min(60.0, wait * 2)
        if not self._stopping.is_set():
            self.usergroups.warm(groups)

    def stop(self) -> None:
        self._stopping.set()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
