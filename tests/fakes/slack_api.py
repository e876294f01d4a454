"""Stand-in for the Slack Web API.

Point the real client at it::

    with FakeSlack(usergroups={"S0ONCALL": ["U1", "U2"]}) as slack:
        client = WebClient(token="xoxb-test", base_url=slack.api_url)

``slack.api_url`` is ``http://127.0.0.1:PORT/api/``, shaped like Slack's own
``https://slack.com/api/``: slack_sdk joins it with the method name, so
``chat.postMessage`` is posted to ``/api/chat.postMessage``. (``slack.url + "/"`` also
works: the stand-in accepts ``/<method>`` too.)

Every response is ``{"ok": true, ...}`` or HTTP 200 ``{"ok": false, "error": "..."}``
as Slack does; queued faults answer 429 ``ratelimited`` (with ``Retry-After``) or 5xx.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .base import FakeServer, Reply, Request

Message = dict[str, Any]


class SlackError(Exception):
    """Raised by a method handler to answer ``{"ok": false, "error": <code>}``."""


class FakeSlack(FakeServer):
    """A Slack workspace with one bot user, remembering every message it posted.

    ``token``: if given, the only accepted token (others get ``invalid_auth``); any
    ``Authorization: Bearer`` token (or ``token`` field) is accepted otherwise, and a
    request with none gets ``not_authed``.
    ``users``: user id -> fields merged over a default profile, for ``users.info``.
    ``channels``: channel id -> fields merged over a default channel, for
    ``conversations.info`` and ``conversations.list``. ``chat.postMessage`` accepts any
    channel; the name of a configured one (``#inc-payments``) is resolved to its id, and
    the answer and the stored message carry the id, as Slack does.
    ``usergroups``: user group id -> member user ids, for ``usergroups.users.list``.
    """

    def __init__(
        self,
        *,
        token: str | None = None,
        bot_user_id: str = "UBOT",
        bot_id: str = "BBOT",
        team_id: str = "TFAKE",
        users: Mapping[str, Mapping[str, Any]] | None = None,
        channels: Mapping[str, Mapping[str, Any]] | None = None,
        usergroups: Mapping[str, Iterable[str]] | None = None,
        latency: float = 0.0,
        tls: bool = False,
    ) -> None:
        super().__init__(latency=latency, tls=tls)
        self.token = token
        self.bot_user_id = bot_user_id
        self.bot_id = bot_id
        self.team_id = team_id
        self.users = {uid: dict(fields) for uid, fields in (users or {}).items()}
        self.users.setdefault(bot_user_id, {"name": "runbook-bot", "is_bot": True})
        self.channels = {cid: dict(fields) for cid, fields in (channels or {}).items()}
        self.usergroups = {gid: list(members) for gid, members in (usergroups or {}).items()}
        self._messages: dict[str, list[Message]] = {}
        self._ephemeral: list[Message] = []
        # Slack's ts are the time of posting (conversations.history filters on them);
        # microseconds, strictly increasing.
        self._last_ts = int(time.time() * 1_000_000)
        self._methods: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
            "auth.test": self._auth_test,
            "chat.postMessage": self._post_message,
            "chat.update": self._update,
            "chat.postEphemeral": self._post_ephemeral,
            "reactions.add": self._reactions_add,
            "reactions.remove": self._reactions_remove,
            "usergroups.users.list": self._usergroup_members,
            "users.info": self._users_info,
            "conversations.info": self._conversations_info,
            "conversations.history": self._history,
            "conversations.replies": self._replies,
            "conversations.list": self._conversations_list,
        }

    @property
    def api_url(self) -> str:
        """The ``base_url`` for ``slack_sdk.WebClient`` (and ``SLACK_API_URL``)."""
        return self.url + "/api/"

    # -- what a user would see ------------------------------------------------------------

    def messages(self, channel: str) -> list[Message]:
        """Every message in ``channel`` (roots and thread replies), oldest first."""
        with self._cond:
            return copy.deepcopy(self._messages.get(channel, []))

    def message_count(self, channel: str) -> int:
        """How many messages ``channel`` holds (cheap enough to poll in a benchmark)."""
        with self._cond:
            return len(self._messages.get(channel, []))

    def thread(self, channel: str, thread_ts: str) -> list[Message]:
        """The thread's root (if any) followed by its replies, like conversations.replies."""
        return [
            m
            for m in self.messages(channel)
            if m["ts"] == thread_ts or m.get("thread_ts") == thread_ts
        ]

    def message(self, channel: str, ts: str) -> Message | None:
        """The message with timestamp ``ts`` as it looks now (after updates), or None."""
        return next((m for m in self.messages(channel) if m["ts"] == ts), None)

    def ephemerals(self, channel: str | None = None) -> list[Message]:
        """Ephemeral messages (each with ``channel`` and ``user``), optionally per channel."""
        with self._cond:
            return [
                copy.deepcopy(m)
                for m in self._ephemeral
                if channel is None or m["channel"] == channel
            ]

    # -- FakeServer hooks -----------------------------------------------------------------

    def call_name(self, request: Request) -> str:
        return request.path.removeprefix("/api/").lstrip("/")

    def call_params(self, request: Request) -> dict[str, Any]:
        body = request.json if isinstance(request.json, dict) else {}
        return {**request.query, **request.form, **body}

    def error_body(self, status: int) -> Any:
        return {"ok": False, "error": "ratelimited" if status == 429 else "internal_error"}

    def handle(self, request: Request) -> Reply:
        params = self.call_params(request)
        authorization = request.headers.get("authorization", "")
        token = authorization.removeprefix("Bearer ").strip() if authorization else ""
        token = token or str(params.get("token", ""))
        try:
            if not token:
                raise SlackError("not_authed")
            if self.token is not None and token != self.token:
                raise SlackError("invalid_auth")
            method = self._methods.get(self.call_name(request))
            if method is None:
                raise SlackError("unknown_method")
            return Reply(200, {"ok": True, **method(params)})
        except SlackError as exc:
            return Reply(200, {"ok": False, "error": str(exc)})

    # -- methods --------------------------------------------------------------------------

    def _auth_test(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "url": "https://fake-workspace.slack.com/",
            "team": "Fake Workspace",
            "user": self.users[self.bot_user_id].get("name", "runbook-bot"),
            "team_id": self.team_id,
            "user_id": self.bot_user_id,
            "bot_id": self.bot_id,
            "is_enterprise_install": False,
        }

    def _channel(self, params: dict[str, Any]) -> str:
        """The channel of a call; a configured channel's name (``#inc-payments`` or
        ``inc-payments``) resolves to its id, as Slack resolves names in posts."""
        channel = _required(params, "channel")
        name = channel.removeprefix("#")
        for channel_id, fields in self.channels.items():
            if channel in (channel_id, f"#{fields.get('name')}") or name == fields.get("name"):
                return channel_id
        return channel

    def _post_message(self, params: dict[str, Any]) -> dict[str, Any]:
        channel = self._channel(params)
        text = str(params.get("text") or "")
        blocks = _decoded(params.get("blocks"))
        attachments = _decoded(params.get("attachments"))
        if not (text or blocks or attachments):
            raise SlackError("no_text")
        message: Message = {
            "type": "message",
            "user": self.bot_user_id,
            "bot_id": self.bot_id,
            "team": self.team_id,
            "text": text,
            "ts": self._next_ts(),
        }
        if blocks:
            message["blocks"] = blocks
        if attachments:
            message["attachments"] = attachments
        metadata = _decoded(params.get("metadata"))
        if metadata:
            if not isinstance(metadata, dict) or "event_type" not in metadata:
                raise SlackError("invalid_metadata_format")
            message["metadata"] = metadata
        thread_ts = params.get("thread_ts")
        if thread_ts:
            message["thread_ts"] = str(thread_ts)
            root = self._find(channel, str(thread_ts))
            if root is not None:
                root["thread_ts"] = root["ts"]
                root["reply_count"] = root.get("reply_count", 0) + 1
                root["latest_reply"] = message["ts"]
        self._messages.setdefault(channel, []).append(message)
        return {"channel": channel, "ts": message["ts"], "message": copy.deepcopy(message)}

    def _update(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, ts = _required(params, "channel"), _required(params, "ts")
        message = self._find(channel, ts)
        if message is None:
            raise SlackError("message_not_found")
        if message.get("user") != self.bot_user_id:
            raise SlackError("cant_update_message")
        if "text" in params:
            message["text"] = str(params["text"] or "")
        for key in ("blocks", "attachments"):
            if key in params:
                message[key] = _decoded(params[key])
        message["edited"] = {"user": self.bot_user_id, "ts": self._next_ts()}
        return {
            "channel": channel,
            "ts": ts,
            "text": message["text"],
            "message": copy.deepcopy(message),
        }

    def _post_ephemeral(self, params: dict[str, Any]) -> dict[str, Any]:
        channel, user = self._channel(params), _required(params, "user")
        message: Message = {
            "type": "message",
            "channel": channel,
            "user": user,
            "text": str(params.get("text") or ""),
            "ts": self._next_ts(),
        }
        for key in ("blocks", "attachments"):
            if key in params:
                message[key] = _decoded(params[key])
        if params.get("thread_ts"):
            message["thread_ts"] = str(params["thread_ts"])
        self._ephemeral.append(message)
        return {"message_ts": message["ts"]}

    def _reacted(self, params: dict[str, Any]) -> tuple[Message, str]:
        channel, ts = _required(params, "channel"), _required(params, "timestamp")
        name = _required(params, "name").strip(":")
        message = self._find(channel, ts)
        if message is None:
            raise SlackError("message_not_found")
        return message, name

    def _reactions_add(self, params: dict[str, Any]) -> dict[str, Any]:
        message, name = self._reacted(params)
        reactions: list[dict[str, Any]] = message.setdefault("reactions", [])
        reaction = next((r for r in reactions if r["name"] == name), None)
        if reaction is None:
            reaction = {"name": name, "users": [], "count": 0}
            reactions.append(reaction)
        if self.bot_user_id in reaction["users"]:
            raise SlackError("already_reacted")
        reaction["users"].append(self.bot_user_id)
        reaction["count"] += 1
        return {}

    def _reactions_remove(self, params: dict[str, Any]) -> dict[str, Any]:
        message, name = self._reacted(params)
        reactions: list[dict[str, Any]] = message.get("reactions", [])
        reaction = next((r for r in reactions if r["name"] == name), None)
        if reaction is None or self.bot_user_id not in reaction["users"]:
            raise SlackError("no_reaction")
        reaction["users"].remove(self.bot_user_id)
        reaction["count"] -= 1
        if not reaction["count"]:
            reactions.remove(reaction)
        return {}

    def _usergroup_members(self, params: dict[str, Any]) -> dict[str, Any]:
        group = _required(params, "usergroup")
        if group not in self.usergroups:
            raise SlackError("no_such_subteam")
        return {"users": list(self.usergroups[group])}

    def _users_info(self, params: dict[str, Any]) -> dict[str, Any]:
        user_id = _required(params, "user")
        if user_id not in self.users:
            raise SlackError("user_not_found")
        fields = self.users[user_id]
        name = fields.get("name", user_id.lower())
        user = {
            "id": user_id,
            "team_id": self.team_id,
            "name": name,
            "real_name": name,
            "deleted": False,
            "is_bot": False,
            "tz": "UTC",
            "profile": {"display_name": name, "real_name": name, "email": f"{name}@example.com"},
            **fields,
        }
        return {"user": user}

    def _conversations_info(self, params: dict[str, Any]) -> dict[str, Any]:
        channel_id = _required(params, "channel")
        if channel_id not in self.channels:
            raise SlackError("channel_not_found")
        channel = {
            "id": channel_id,
            "name": channel_id.lower(),
            "is_channel": True,
            "is_private": False,
            "is_archived": False,
            "is_member": True,
            **self.channels[channel_id],
        }
        return {"channel": channel}

    def _visible(self, message: Message, params: dict[str, Any]) -> Message:
        """A message as read back: metadata only with include_all_metadata (as Slack does)."""
        shown = copy.deepcopy(message)
        if str(params.get("include_all_metadata", "")).lower() not in ("true", "1"):
            shown.pop("metadata", None)
        return shown

    def _page(self, found: list[Message], params: dict[str, Any]) -> dict[str, Any]:
        limit = int(params.get("limit") or 100)
        start = int(params.get("cursor") or 0)
        page = found[start : start + limit]
        more = start + limit < len(found)
        return {
            "messages": [self._visible(m, params) for m in page],
            "has_more": more,
            "response_metadata": {"next_cursor": str(start + limit) if more else ""},
        }

    def _history(self, params: dict[str, Any]) -> dict[str, Any]:
        """Top-level messages of a channel, newest first, from `oldest` on."""
        channel = _required(params, "channel")
        oldest = float(params.get("oldest") or 0)
        found = [
            m
            for m in self._messages.get(channel, [])
            if float(m["ts"]) >= oldest and m.get("thread_ts") in (None, m["ts"])
        ]
        return self._page(list(reversed(found)), params)

    def _replies(self, params: dict[str, Any]) -> dict[str, Any]:
        """A thread: its root, then its replies, oldest first."""
        channel, ts = _required(params, "channel"), _required(params, "ts")
        if self._find(channel, ts) is None:
            raise SlackError("thread_not_found")
        found = [m for m in self._messages.get(channel, []) if ts in (m["ts"], m.get("thread_ts"))]
        return self._page(found, params)

    def _conversations_list(self, params: dict[str, Any]) -> dict[str, Any]:
        channels = [
            {"id": cid, "name": cid.lower(), "is_channel": True, **fields}
            for cid, fields in self.channels.items()
        ]
        return {"channels": channels, "response_metadata": {"next_cursor": ""}}

    # -- helpers --------------------------------------------------------------------------

    def _next_ts(self) -> str:
        self._last_ts = max(self._last_ts + 100, int(time.time() * 1_000_000))
        seconds, micros = divmod(self._last_ts, 1_000_000)
        return f"{seconds}.{micros:06d}"

    def _find(self, channel: str, ts: str) -> Message | None:
        return next((m for m in self._messages.get(channel, []) if m["ts"] == ts), None)


def visible_text(message: Message) -> str:
    """The text a reader sees: ``text`` plus the text of section/context/header blocks."""
    parts = [str(message.get("text") or "")]
    for block in message.get("blocks") or []:
        texts = [block.get("text"), *block.get("fields", []), *block.get("elements", [])]
        for t in texts:
            if isinstance(t, dict) and "text" in t:
                text = t["text"]  # a button's label is a text object
                parts.append(text["text"] if isinstance(text, dict) else text)
    return "\n".join(part for part in parts if part)


def _required(params: dict[str, Any], name: str) -> str:
    value = params.get(name)
    if value in (None, ""):
        raise SlackError("invalid_arguments")
    return str(value)


def _decoded(value: Any) -> Any:
    """Form-encoded requests carry blocks/attachments as JSON strings."""
    if isinstance(value, str) and value.strip().startswith(("[", "{")):
        return json.loads(value)
    return value
