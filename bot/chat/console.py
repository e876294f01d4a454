"""The console transport: the thread printed to a terminal (`runbookctl simulate`)."""

from __future__ import annotations

from typing import TextIO

from bot import effects, messages
from bot.outbox import Retry, Sent
from bot.states import StepStatus
from bot.store import OutboxItem


class ConsoleTransport:
    """Prints each Slack effect as it would appear in the thread (``bot.outbox.Transport``).

    Updates are printed as new lines marked ``↻`` since a terminal cannot edit in place,
    and only when the step's state changed.
    """

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._ts = 0
        self._last_state: dict[str, str] = {}

    def budgets(self, item: OutboxItem) -> tuple[str, ...]:
        return ()

    def penalize(self, item: OutboxItem, retry: Retry) -> tuple[str, ...]:
        return ()

    def _print(self, text: str, indent: str = "") -> None:
        for line in text.splitlines():
            self.out.write(f"{indent}{line}\n")
        self.out.flush()

    def _posted(self, item: OutboxItem) -> Sent:
        self._ts += 1
        return Sent(ts=f"{self._ts}.000000", channel=item.lane.removeprefix("slack:"))

    def deliver(self, item: OutboxItem, *, maybe_sent: bool) -> Sent:
        kind = item.kind
        if kind == effects.Kind.POST_INCIDENT:
            incident = effects.incident_view(item.payload)
            self._print(f"── {incident.channel} ──")
            self._print(messages.incident_text(incident))
            return self._posted(item)
        if kind == effects.Kind.POST_STEP:
            view = effects.step_view(item.payload)
            self.out.write("\n")
            self._print(messages.step_text(view, messages.DEFAULT_REACTIONS), "  │ ")
            self._last_state[item.key or ""] = view.state
            return self._posted(item)
        if kind == effects.Kind.UPDATE_STEP:
            view = effects.step_view(item.payload)
            if self._last_state.get(item.key or "") != view.state:
                self._last_state[item.key or ""] = view.state
                status = messages.status_line(view, messages.DEFAULT_REACTIONS)
                self._print(f"↻ {view.step_id}: {status}", "  │ ")
                if view.output and view.state not in (StepStatus.RUNNING, StepStatus.APPROVED):
                    self._print(view.output.rstrip(), "  │   ")
            return Sent()
        if kind == effects.Kind.NOTE:
            self.out.write("\n")
            self._print(str(item.payload["text"]), "  │ 📝 ")
            return self._posted(item)
        if kind == effects.Kind.EPHEMERAL:
            payload = item.payload
            self._print(f"(only visible to {payload['user']}) {payload['text']}", "  │ ")
            return Sent()
        return Sent()  # reactions: a terminal has none
