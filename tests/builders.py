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
from bot.chat.base import IncidentView, MessageRef, StepView

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


def catalog(*runbooks: Runbook, settings: Settings = SETTINGS) -> Catalog:
    actions: dict[str, Action] = {}
    for rb in runbooks:
        for s in (*rb.steps, *rb.on_resolve):
            actions.setdefault(s.action.id, s.action)
    return Catalog(
        settings=settings, actions=actions, runbooks=runbooks, root="test", commit="c0ffee1234567"
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
class RecordingChat:
    """A chat port that keeps everything the engine said, for assertions."""

    incidents: list[IncidentView] = field(default_factory=list)
    steps: list[StepView] = field(default_factory=list)
    updates: list[StepView] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    _ts: int = 0

    def _next(self, channel: str) -> MessageRef:
        self._ts += 1
        return MessageRef(channel, f"{self._ts}.0")

    def post_incident(self, view: IncidentView) -> MessageRef:
        self.incidents.append(view)
        return self._next(view.channel)

    def post_step(self, thread: MessageRef, view: StepView) -> MessageRef:
        self.steps.append(view)
        return self._next(thread.channel)

    def update_step(self, message: MessageRef, view: StepView) -> None:
        self.updates.append(view)

    def post_note(self, thread: MessageRef, text: str) -> None:
        self.notes.append(text)

    def notify_user(self, channel: str, user: str, text: str, thread_ts: str = "") -> None:
        self.notes.append(f"@{user}: {text}")

    @property
    def text(self) -> str:
        return "\n".join(
            [v.title for v in self.incidents]
            + [f"{v.step_id} {v.state} {v.reason} {v.detail}" for v in self.steps + self.updates]
            + self.notes
        )
