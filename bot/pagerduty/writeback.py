"""Write-back: tell PagerDuty what the runbook did (the outbox's PagerDuty transport).

The engine decides what to write (``bot.engine``: a note when a run finishes, a resolve
when the runbook says ``resolve_on_success`` and every step succeeded, an escalation when
a run stops and the escalation settings say ``pagerduty: true``) and commits it to the
outbox with the change that caused it. This transport delivers one effect at a time, in
order per incident (a note before its resolve), retried by the outbox until PagerDuty
takes it: an outage or a restart delays write-back, it never loses it.

Doing it once: a note whose first attempt may have reached PagerDuty (a timeout, a
5xx) is looked for among the incident's notes before it is posted again; an escalation
remembers the level it asked for before asking, so a retry asks for the same level.
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

TIMEOUT = 10
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
        timeout: int = TIMEOUT,
    ) -> None:
        # The outbox retries, paced; the client only tries once more on 429 and 5xx.
        self.client = rest_client(config, retries=1, timeout=timeout, sleep_timer=0.25)
        self.client.max_network_attempts = 0
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
                text = f"{item.payload['text']}\n{thread_link(item.thread_channel, item.thread_ts)}"
                self._note(item.incident_id, text[:MAX_NOTE_CHARS], maybe_sent)
            elif item.kind == "pd_resolve":
                self._resolve(item.incident_id)
            elif item.kind == "pd_escalate":
                self._escalate(item, maybe_sent)
            else:
                raise Refused(f"not a PagerDuty effect: {item.kind}")
        except pagerduty.Error as exc:
            raise classify(exc, maybe_sent=item.kind != "pd_resolve") from None
        return Sent()

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
        target = item.payload.get("level")
        if target is None:
            if current.get("status") == "resolved":
                log.info("incident %s is resolved in PagerDuty: not escalating", item.incident_id)
                return
            level = current.get("escalation_level")
            target = (level if isinstance(level, int) else 1) + 1
            self.remember(item, {**item.payload, "level": target})  # a retry asks the same
        if current.get("escalation_level") != target:
            self.client.rput(path, json={"type": "incident_reference", "escalation_level": target})
        text = NOTE_ESCALATED.format(
            level=target,
            reason=item.payload.get("reason", ""),
            thread=thread_link(item.thread_channel, item.thread_ts),
        )
        self._note(item.incident_id, text[:MAX_NOTE_CHARS], maybe_sent=True)
