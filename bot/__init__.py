"""runbook-bot: the runbook for a PagerDuty incident, step by step, in a Slack thread."""

__version__ = "0.1.0"
