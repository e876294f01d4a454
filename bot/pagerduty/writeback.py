"""Write-back: tell PagerDuty what the runbook did (an `EngineListener`).

For each finished run: a note on the incident (steps, results, the Slack thread). When
the runbook says ``resolve_on_success`` and every step succeeded: resolve the incident.
When a run stops on a failure or an expired approval and the escalation settings say
``pagerduty: true``: move the incident to the next escalation level.

The engine calls listeners on its own thread while it holds the incident; these calls
only queue a job and return. Jobs run on a few lanes of their own (an incident always
on the same lane, so its note comes before its resolve), with bounded retries inside
the client; a job that still fails is logged and dropped. A PagerDuty outage therefore
delays nothing in Slack and loses nothing there.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import re
import threading
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import pagerduty

from bot.catalog.model import Catalog
from bot.config import Config
from bot.pagerduty.api import incident_path, rest_client

log = logging.getLogger(__name__)

Job = Callable[[pagerduty.RestApiV2Client], None]

LANES = 2
MAX_QUEUED_PER_LANE = 5_000
RETRIES = 4  # per call and status: with the client's doubling sleeps, about 45 s in all
SLEEP_TIMER = 1.5  # the client's own default first back-off, in seconds
TIMEOUT = 10
MAX_NOTE_CHARS = 25_000  # PagerDuty refuses longer notes

_SLACK_ID = re.compile(r"[CGD][A-Z0-9]{2,}")

# Texts written to PagerDuty (incident notes): plain text, read in the PagerDuty app.
NOTE_RUN = "runbook-bot: runbook {runbook} ({phase}) {status}. {summary}\n{thread}"
NOTE_ESCALATED = "runbook-bot escalated this incident to level {level}: {reason}.\n{thread}"
PHASES = {"open": "steps", "resolved": "follow-ups on resolve"}
STATUS_WORDS = {"completed": "finished", "escalated": "stopped", "failed": "failed"}


def thread_link(incident: Mapping[str, Any]) -> str:
    """Where the incident's Slack thread is, for a note a responder reads in PagerDuty."""
    channel, ts = incident.get("channel") or "", incident.get("thread_ts") or ""
    if not ts:
        return "No Slack thread was posted."
    where = f"Slack thread: channel {channel}, message {ts}"
    if _SLACK_ID.fullmatch(channel):
        where += f" (https://slack.com/archives/{channel}/p{ts.replace('.', '')})"
    return where


class PagerDutyWriteBack:
    """Engine listener that adds notes, resolves and escalates in PagerDuty."""

    def __init__(
        self,
        config: Config,
        catalog: Catalog,
        *,
        lanes: int = LANES,
        retries: int = RETRIES,
        sleep_timer: float | None = None,
        timeout: int = TIMEOUT,
    ) -> None:
        self.catalog = catalog
        backoff = SLEEP_TIMER if sleep_timer is None else sleep_timer
        self._clients = [
            rest_client(config, retries=retries, timeout=timeout, sleep_timer=backoff)
            for _ in range(lanes)
        ]
        self._queues: list[queue.Queue[tuple[str, str, Job] | None]] = [
            queue.Queue(MAX_QUEUED_PER_LANE) for _ in range(lanes)
        ]
        self._threads: list[threading.Thread] = []
        self._idle = threading.Condition()
        self._pending = 0

    # --- EngineListener --------------------------------------------------------------------

    def run_finished(
        self, incident: Mapping[str, Any], status: str, summary: str, all_succeeded: bool
    ) -> None:
        incident_id = str(incident["id"])
        runbook = self.catalog.runbook(incident.get("runbook_id") or "")
        note = NOTE_RUN.format(
            runbook=incident.get("runbook_id") or "?",
            phase=PHASES.get(incident.get("status") or "", "steps"),
            status=STATUS_WORDS.get(status, status),
            summary=summary,
            thread=thread_link(incident),
        )[:MAX_NOTE_CHARS]
        # A run finishing after the incident closed is the follow-ups: nothing to resolve.
        resolve = bool(
            runbook is not None
            and runbook.resolve_on_success
            and status == "completed"
            and all_succeeded
            and incident.get("status") == "open"
        )

        def add_note(client: pagerduty.RestApiV2Client) -> None:
            client.rpost(f"{incident_path(incident_id)}/notes", json={"content": note})

        # Two jobs on the incident's lane: in this order, and a failed note does not
        # keep the incident open.
        self._submit(incident_id, "note", add_note)
        if resolve:
            self._submit(incident_id, "resolve", lambda client: _resolve(client, incident_id))

    def escalated(self, incident: Mapping[str, Any], reason: str) -> None:
        runbook = self.catalog.runbook(incident.get("runbook_id") or "")
        if not self.catalog.escalation_for(runbook).pagerduty:
            return
        incident_id = str(incident["id"])
        thread = thread_link(incident)

        def job(client: pagerduty.RestApiV2Client) -> None:
            path = incident_path(incident_id)
            current = client.rget(path)
            current = current if isinstance(current, dict) else {}
            if current.get("status") == "resolved":
                log.info("incident %s is resolved in PagerDuty: not escalating", incident_id)
                return
            level = current.get("escalation_level")
            next_level = (level if isinstance(level, int) else 1) + 1
            client.rput(path, json={"type": "incident_reference", "escalation_level": next_level})
            content = NOTE_ESCALATED.format(level=next_level, reason=reason, thread=thread)
            client.rpost(f"{path}/notes", json={"content": content})

        self._submit(incident_id, "escalation", job)

    # --- lanes -----------------------------------------------------------------------------

    def start(self) -> None:
        for n, (client, jobs) in enumerate(zip(self._clients, self._queues, strict=True)):
            thread = threading.Thread(
                target=self._lane, args=(client, jobs), name=f"pagerduty-writeback-{n}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 5.0) -> None:
        """Finish queued jobs for up to `timeout` seconds, then leave the rest."""
        for jobs in self._queues:
            with contextlib.suppress(queue.Full):
                jobs.put(None, timeout=timeout)
        for thread in self._threads:
            thread.join(timeout)
        for client in self._clients:
            client.close()

    def wait_idle(self, timeout: float) -> bool:
        """True once every queued job has run (for tests and shutdown)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def _submit(self, incident_id: str, what: str, job: Job) -> None:
        lane = self._queues[zlib.crc32(incident_id.encode()) % len(self._queues)]
        with self._idle:
            self._pending += 1
        try:
            lane.put_nowait((incident_id, what, job))
        except queue.Full:
            self._done()
            log.error(
                "PagerDuty write-back queue full: dropped %s of incident %s", what, incident_id
            )

    def _lane(
        self,
        client: pagerduty.RestApiV2Client,
        jobs: queue.Queue[tuple[str, str, Job] | None],
    ) -> None:
        while (item := jobs.get()) is not None:
            incident_id, what, job = item
            try:
                job(client)
            except pagerduty.Error as exc:
                # The client already retried 429/5xx; a 4xx will not get better.
                log.error(
                    "PagerDuty write-back (%s) of incident %s failed: %s", what, incident_id, exc
                )
            except Exception:
                log.exception("PagerDuty write-back (%s) of incident %s failed", what, incident_id)
            finally:
                self._done()

    def _done(self) -> None:
        with self._idle:
            self._pending -= 1
            self._idle.notify_all()


def _resolve(client: pagerduty.RestApiV2Client, incident_id: str) -> None:
    try:
        client.rput(
            incident_path(incident_id), json={"type": "incident_reference", "status": "resolved"}
        )
    except pagerduty.HttpError as exc:
        if exc.response is not None and exc.response.status_code == 400:
            # Most often "Incident Already Resolved": a human was faster. Nothing to do.
            log.info("PagerDuty did not resolve incident %s: %s", incident_id, exc)
            return
        raise
