"""Write-back: tell PagerDuty what the runbook did (the outbox's PagerDuty transport).

The engine decides what to write (``bot.engine``: a note when a run finishes, a resolve
when the runbook says ``resolve_on_success`` and every step succeeded, an escalation when
a run stops and the escalation settings say ``pagerduty: true``) and commits it to the
outbox with the change that caused it. This transport delivers one effect at a time, in
order per incident (a note before its resolve), retried by the outbox until PagerDuty
takes it: an outage or a restart delays write-back, it never loses it.

Doing it once: the client never repeats a call by itself after a 5xx or a timeout (the
call may have reached PagerDuty); the outbox retries it, and the sender knows the first
attempt may have been applied (``maybe_sent``):

  * a note's text is fixed before its first attempt (remembered in the outbox row), and
    a retry after an unknown outcome looks for that text among the incident's notes
    before posting it again;
  * an escalation remembers the level it asks for before asking, so a retry asks for the
    same level (never one more), and does not ask when PagerDuty is already there;
  * a resolve is idempotent: PagerDuty answers 400 "already resolved", which is success.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any

import pagerduty

from bot.config import Config
from bot.outbox import Refused, Retry, Sent
from bot.pagerduty.api import incident_path, rest_client
from bot.store import OutboxItem

log = logging.getLogger(__name__)

TIMEOUT = 10.0  # seconds per request
MAX_NOTE_CHARS = 25_000  # PagerDuty refuses longer notes
# PagerDuty's REST API allows 960 requests a minute per token.
PAGERDUTY_BUDGETS: Mapping[str, tuple[float, float]] = {"pagerduty": (900 / 60, 30.0)}

_SLACK_ID = re.compile(r"[CGD][A-Z0-9]{2,}")

# Texts written to PagerDuty (incident notes): plain text, read in the PagerDuty app.
NOTE_ESCALATED = "runbook-bot escalated this incident to level {level}: {reason}.\n{thread}"


def thread_link(channel: str | None, ts: str | None) -> str:
    """Where the incident's Slack thread is, for a note a responder reads in PagerDuty."""
    if not ts:
        return "No Slack thread was posted."
    where = f"Slack thread: channel {channel or '?'}, message {ts}"
    if channel and _SLACK_ID.fullmatch(channel):
        where += f" (https://slack.com/archives/{channel}/p{ts.replace('.', '')})"
    return where


def classify(exc: pagerduty.Error, *, maybe_sent: bool) -> Retry | Refused:
    response = getattr(exc, "response", None)
    if response is None:  # no answer at all: a timeout or a refused connection
        return Retry(
            f"no answer from PagerDuty ({type(exc.__cause__ or exc).__name__})",
            maybe_sent=maybe_sent,
        )
    status = response.status_code
    if status == 429:
        try:
            after = float(response.headers.get("Retry-After") or 1)
        except ValueError:
            after = 1.0
        return Retry("rate limited (429)", after=after)
    if status >= 500:
        return Retry(f"HTTP {status}", maybe_sent=maybe_sent)
    if status in (401, 403):
        return Retry(f"HTTP {status}: check PAGERDUTY_API_TOKEN and PAGERDUTY_FROM", after=60.0)
    return Refused(f"HTTP {status}")


class PagerDutyTransport:
    """Delivers ``pd_note``, ``pd_resolve`` and ``pd_escalate`` effects (``bot.outbox``)."""

    def __init__(
        self,
        config: Config,
        remember: Callable[[OutboxItem, Mapping[str, Any]], None],
        *,
        timeout: float = TIMEOUT,
    ) -> None:
        # The outbox retries, paced, and looks before repeating a call that may have
        # reached PagerDuty: the client itself only repeats a 429 (once, then the outbox
        # waits for its Retry-After).
        self.client = rest_client(config, retries=0, timeout=timeout, sleep_timer=0.25)
        self.remember = remember

    def close(self) -> None:
        self.client.close()

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        return ("pagerduty",)

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        return ("pagerduty",)

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        try:
            if item.kind == "pd_note":
                self._note(item.incident_id, self._content(item), maybe_sent)
            elif item.kind == "pd_resolve":
                self._resolve(item.incident_id)
            elif item.kind == "pd_escalate":
                self._escalate(item, maybe_sent)
            else:
                raise Refused(f"not a PagerDuty effect: {item.kind}")
        except pagerduty.Error as exc:
            raise classify(exc, maybe_sent=item.kind != "pd_resolve") from None
        return Sent()

    def _content(self, item: OutboxItem) -> str:
        """The note's text, fixed at its first attempt: the thread link may appear between
        two attempts, and a retry must look for what the first one sent."""
        content = item.payload.get("content")
        if isinstance(content, str):
            return content
        text = f"{item.payload['text']}\n{thread_link(item.thread_channel, item.thread_ts)}"
        content = text[:MAX_NOTE_CHARS]
        self.remember(item, {**item.payload, "content": content})
        return content

    def _note(self, incident_id: str, text: str, maybe_sent: bool) -> None:
        path = f"{incident_path(incident_id)}/notes"
        if maybe_sent:
            notes = self.client.rget(path)
            if isinstance(notes, list) and any(
                isinstance(n, dict) and n.get("content") == text for n in notes
            ):
                log.info("the note on incident %s was already written", incident_id)
                return
        self.client.rpost(path, json={"content": text})

    def _resolve(self, incident_id: str) -> None:
        try:
            self.client.rput(
                incident_path(incident_id),
                json={"type": "incident_reference", "status": "resolved"},
            )
        except pagerduty.HttpError as exc:
            if exc.response is not None and exc.response.status_code == 400:
                # Most often "Incident Already Resolved": a human was faster. Nothing to do.
                log.info("PagerDuty did not resolve incident %s: %s", incident_id, exc)
                return
            raise

    def _escalate(self, item: OutboxItem, maybe_sent: bool) -> None:
        path = incident_path(item.incident_id)
        current = self.client.rget(path)
        current = current if isinstance(current, dict) else {}
        level = current.get("escalation_level")
        resolved = current.get("status") == "resolved"
        target = item.payload.get("level")
        content = item.payload.get("content")
        if not isinstance(target, int) or not isinstance(content, str):
            if resolved:
                log.info("incident %s is resolved in PagerDuty: not escalating", item.incident_id)
                return
            target = (level if isinstance(level, int) else 1) + 1
            content = NOTE_ESCALATED.format(
                level=target,
                reason=item.payload.get("reason", ""),
                thread=thread_link(item.thread_channel, item.thread_ts),
            )[:MAX_NOTE_CHARS]
            # Before asking: a retry after an unknown outcome asks for this same level.
            self.remember(item, {**item.payload, "level": target, "content": content})
        if not isinstance(level, int) or level < target:
            if resolved:
                log.info("incident %s is resolved in PagerDuty: not escalating", item.incident_id)
                return
            self.client.rput(path, json={"type": "incident_reference", "escalation_level": target})
        self._note(item.incident_id, content, maybe_sent)
