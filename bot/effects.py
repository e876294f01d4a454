"""The effects a state change causes, as outbox rows: what to say, where, in which order.

The engine decides *what* happens (a step message with this rendering, a note, a
PagerDuty resolve) and commits it with the change; the senders (``bot.outbox``) deliver
it later through a transport (Slack, the console, PagerDuty). A transport never decides
anything: it turns a payload into API calls.

Lanes order and pace delivery:
  ``slack:<channel>``           the incident's thread: root, step messages and updates, notes
  ``slack-react:<channel>``     the ✅ ❌ ⏸️ offered under guarded steps (after their message)
  ``slack-ephemeral``           private notes to one person (Slack's Tier 4 budget)
  ``pagerduty:<incident>``      write-back of one incident: notes before the resolve
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from bot.chat.base import IncidentView, StepView
from bot.store import Effect


class Kind(StrEnum):
    POST_INCIDENT = "post_incident"
    POST_STEP = "post_step"
    UPDATE_STEP = "update_step"
    NOTE = "note"
    REACT = "react"
    EPHEMERAL = "ephemeral"
    PD_NOTE = "pd_note"
    PD_RESOLVE = "pd_resolve"
    PD_ESCALATE = "pd_escalate"


SLACK = "slack"
PAGERDUTY = "pagerduty"


def _fields(view: IncidentView | StepView) -> dict[str, Any]:
    """A view as a payload: a shallow copy (``dataclasses.asdict`` deep-copies every
    value, a fifth of an item's cost; the payload is serialised at once anyway)."""
    return {f.name: getattr(view, f.name) for f in dataclasses.fields(view)}


def root_key(incident_id: str) -> str:
    return f"root:{incident_id}"


def step_key(step_run_id: int) -> str:
    return f"step:{step_run_id}"


def thread_lane(channel: str) -> str:
    return f"slack:{channel}"


def post_incident(view: IncidentView) -> Effect:
    return Effect(
        incident_id=view.incident_id,
        target=SLACK,
        lane=thread_lane(view.channel),
        kind=Kind.POST_INCIDENT,
        key=root_key(view.incident_id),
        payload=_fields(view),
    )


def post_step(view: StepView, channel: str) -> Effect:
    return Effect(
        incident_id=view.incident_id,
        target=SLACK,
        lane=thread_lane(channel),
        kind=Kind.POST_STEP,
        key=step_key(view.step_run_id),
        payload=_fields(view),
    )


def update_step(view: StepView, channel: str) -> Effect:
    return Effect(
        incident_id=view.incident_id,
        target=SLACK,
        lane=thread_lane(channel),
        kind=Kind.UPDATE_STEP,
        key=step_key(view.step_run_id),
        payload=_fields(view),
    )


def offer_reactions(incident_id: str, step_run_id: int, channel: str) -> Effect:
    """The approve / reject / pause reactions under a guarded step's message."""
    return Effect(
        incident_id=incident_id,
        target=SLACK,
        lane=f"slack-react:{channel}",
        kind=Kind.REACT,
        key=step_key(step_run_id),
        payload={},
    )


def note(incident_id: str, channel: str, text: str) -> Effect:
    return Effect(
        incident_id=incident_id,
        target=SLACK,
        lane=thread_lane(channel),
        kind=Kind.NOTE,
        payload={"text": text},
    )


def ephemeral(incident_id: str, channel: str, user: str, text: str) -> Effect:
    return Effect(
        incident_id=incident_id,
        target=SLACK,
        lane="slack-ephemeral",
        kind=Kind.EPHEMERAL,
        payload={"channel": channel, "user": user, "text": text},
    )


def pagerduty(incident_id: str, kind: Kind, payload: Mapping[str, Any]) -> Effect:
    return Effect(
        incident_id=incident_id,
        target=PAGERDUTY,
        lane=f"pagerduty:{incident_id}",
        kind=kind,
        payload=payload,
    )


_TUPLE_FIELDS = {
    f.name for f in dataclasses.fields(StepView) if str(f.type).startswith("tuple")
} | {f.name for f in dataclasses.fields(IncidentView) if str(f.type).startswith("tuple")}


def _restore(payload: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    values = {k: v for k, v in payload.items() if k in names}
    for name in _TUPLE_FIELDS & values.keys():
        value = values[name]
        if name == "expect":
            values[name] = tuple((str(p), bool(a)) for p, a in value)
        else:
            values[name] = tuple(value)
    return values


def step_view(payload: Mapping[str, Any]) -> StepView:
    return StepView(**_restore(payload, {f.name for f in dataclasses.fields(StepView)}))


def incident_view(payload: Mapping[str, Any]) -> IncidentView:
    return IncidentView(**_restore(payload, {f.name for f in dataclasses.fields(IncidentView)}))
