"""A chat adapter that prints the thread to a terminal (`runbookctl simulate`)."""

from __future__ import annotations

from typing import TextIO

from bot import messages
from bot.chat.base import IncidentView, MessageRef, StepView


class ConsoleChat:
    """Prints each message as it would appear in the Slack thread.

    Updates are printed as new lines marked ``↻`` since a terminal cannot edit in place.
    """

    def __init__(self, out: TextIO, *, color: bool = False) -> None:
        self.out = out
        self.color = color
        self._ts = 0
        self._last_state: dict[str, str] = {}

    def _next(self, channel: str) -> MessageRef:
        self._ts += 1
        return MessageRef(channel, f"{self._ts}.000000")

    def _print(self, text: str, indent: str = "") -> None:
        for line in text.splitlines():
            self.out.write(f"{indent}{line}\n")
        self.out.flush()

    def post_incident(self, view: IncidentView) -> MessageRef:
        self._print(f"── {view.channel} ──")
        self._print(messages.incident_text(view))
        return self._next(view.channel)

    def post_step(self, thread: MessageRef, view: StepView) -> MessageRef:
        ref = self._next(thread.channel)
        self.out.write("\n")
        self._print(messages.step_text(view, messages.DEFAULT_REACTIONS), "  │ ")
        self._last_state[ref.ts] = view.state
        return ref

    def update_step(self, message: MessageRef, view: StepView) -> None:
        if self._last_state.get(message.ts) == view.state:
            return
        self._last_state[message.ts] = view.state
        status = messages.status_line(view, messages.DEFAULT_REACTIONS)
        self._print(f"↻ {view.step_id}: {status}", "  │ ")
        if view.output and view.state not in ("running", "approved"):
            self._print(view.output.rstrip(), "  │   ")

    def post_note(self, thread: MessageRef, text: str) -> None:
        self.out.write("\n")
        self._print(text, "  │ 📝 ")

    def notify_user(self, channel: str, user: str, text: str, thread_ts: str = "") -> None:
        self._print(f"(only visible to {user}) {text}", "  │ ")
