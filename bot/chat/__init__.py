"""The chat port: how the engine talks to people. Adapters: Slack, console (simulate)."""

from bot.chat.base import IncidentView, StepView

__all__ = ["IncidentView", "StepView"]
