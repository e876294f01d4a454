"""Small builders for catalogs, chats and clocks used by the engine, store and guard tests.

Catalogs are built from the typed models directly (not YAML), so these tests exercise the
engine and policy even for catalogs lint would refuse (a production scope without a
promotion must still be blocked at run time).
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bot import effects
from bot.catalog.model import (
    Action,
    Approvers,
    Catalog,
    Environment,
    Expectation,
    Location,
    Match,
    OnFailure,
    Promotion,
    Runbook,
    Safety,
    Settings,
    Step,
)
from bot.chat.base import IncidentView, StepView
from bot.outbox import Retry, Sent
from bot.store import OutboxItem

HERE = Location("test.yaml")
APPROVER = "U0APPROVER"
SETTINGS = Settings(
    environments=(Environment("dev"), Environment("staging"), Environment("prod", True)),
    approvers=Approvers(users=(APPROVER,)),
    channel="#incidents",
)


def py(code: str) -> tuple[str, ...]:
    """A command that runs a Python snippet with this interpreter (no shell)."""
    return (sys.executable, "-c", code)


def action(
    action_id: str,
    command: str | tuple[str, ...] | None = None,
    *,
    approval: bool = False,
    scopes: tuple[str, ...] = ("dev", "staging"),
    expect: Iterable[tuple[str, bool]] = (),
    timeout: float = 10.0,
    promotions: Iterable[Promotion] = (),
    approvers: Approvers | None = None,
    approval_timeout: float | None = None,
    shell: bool = False,
    env: Mapping[str, str] | None = None,
    secrets: tuple[str, ...] = (),
) -> Action:
    return Action(
        id=action_id,
        command=command if command is not None else py("print('ok')"),
        location=HERE,
        shell=shell,
        timeout=timeout,
        env=dict(env or {}),
        secrets=secrets,
        expect=tuple(Expectation(p, a) for p, a in expect),
        safety=Safety(
            requires_approval=approval,
            scopes=scopes,
            approvers=approvers,
            approval_timeout=approval_timeout,
            promotions=tuple(promotions),
        ),
    )


def step(
    act: Action,
    *,
    step_id: str | None = None,
    when: str | None = None,
    on_failure: OnFailure | str = "stop",
    params: Mapping[str, Any] | None = None,
) -> Step:
    if isinstance(on_failure, str):
        on_failure = OnFailure(on_failure)  # type: ignore[arg-type]
    return Step(
        id=step_id or act.id,
        action=act,
        location=HERE,
        params=dict(params or {}),
        when=when,
        on_failure=on_failure,
    )


def runbook(
    runbook_id: str,
    steps: Iterable[Step],
    *,
    services: tuple[str, ...] = ("payments",),
    symptoms: tuple[str, ...] = (),
    on_resolve: Iterable[Step] = (),
    approvers: Approvers | None = None,
) -> Runbook:
    return Runbook(
        id=runbook_id,
        match=Match(services=services, symptoms=symptoms),
        steps=tuple(steps),
        location=HERE,
        title=runbook_id.replace("-", " "),
        approvers=approvers,
        on_resolve=tuple(on_resolve),
    )


def catalog(
    *runbooks: Runbook, settings: Settings = SETTINGS, commit: str = "c0ffee1234567"
) -> Catalog:
    actions: dict[str, Action] = {}
    for rb in runbooks:
        for s in (*rb.steps, *rb.on_resolve):
            actions.setdefault(s.action.id, s.action)
    return Catalog(
        settings=settings, actions=actions, runbooks=runbooks, root="test", commit=commit
    )


@dataclass
class Clock:
    """A clock tests move by hand."""

    t: float = 1_000_000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class RecordingTransport:
    """An outbox transport that keeps everything delivered to "Slack", for assertions.

    With the outbox, a message carries its latest rendering when it is sent, so a step
    that finished before its message went out is posted finished: `latest` gives each
    step's last rendering, however it was delivered.
    """

    incidents: list[IncidentView] = field(default_factory=list)
    steps: list[StepView] = field(default_factory=list)
    updates: list[StepView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    ephemerals: list[tuple[str, str]] = field(default_factory=list)  # (user, text)
    reactions: list[str] = field(default_factory=list)  # message keys reacted under
    views: list[StepView] = field(default_factory=list)  # step renderings, in delivery order
    _ts: int = 0

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        return ()

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        return ()

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        kind = item.kind
        if kind == "post_incident":
            self.incidents.append(effects.incident_view(item.payload))
        elif kind == "post_step":
            self.steps.append(effects.step_view(item.payload))
            self.views.append(self.steps[-1])
        elif kind == "update_step":
            self.updates.append(effects.step_view(item.payload))
            self.views.append(self.updates[-1])
            return Sent()
        elif kind == "note":
            self.notes.append(str(item.payload["text"]))
        elif kind == "ephemeral":
            self.ephemerals.append((str(item.payload["user"]), str(item.payload["text"])))
            return Sent()
        elif kind == "react":
            self.reactions.append(item.key or "")
            return Sent()
        self._ts += 1
        return Sent(ts=f"{self._ts}.0", channel=item.lane.removeprefix("slack:"))

    def latest(self, step_id: str) -> StepView:
        return [v for v in self.views if v.step_id == step_id][-1]

    @property
    def text(self) -> str:
        return "\n".join(
            [v.title for v in self.incidents]
            + [f"{v.step_id} {v.state} {v.reason} {v.detail}" for v in self.steps + self.updates]
            + self.notes
            + [text for _user, text in self.ephemerals]
        )
