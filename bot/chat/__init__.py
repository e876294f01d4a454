"""The chat port: how the engine talks to people. Adapters: Slack, console (simulate)."""

from bot.chat.base import ChatPort, IncidentView, MessageRef, StepView

__all__ = ["ChatPort", "IncidentView", "MessageRef", "StepView"]
