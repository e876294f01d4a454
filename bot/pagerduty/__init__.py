"""PagerDuty: V3 webhooks in, REST write-back out.

  webhook.py    signature verification and envelope parsing (pure functions)
  intake.py     `POST /pagerduty/webhook`: verified events into the inbox
  writeback.py  the outbox transport adding notes, resolving and escalating incidents
                (imported where used: the intake front loads only what intake needs)
  api.py        the REST client (`pagerduty` package) and the calls the others share

Errors: `PayloadError` (a `bot.errors.RunbookBotError`) is the one error a webhook body
can cause; it becomes a 400 with its reason. REST failures are the client's own
`pagerduty.Error` tree, which the write-back transport maps to the outbox's retry or
refusal; `intake.DetailsUnavailable` says alert details were not even asked for, because
PagerDuty did not answer a moment ago (the incident opens without them).
"""

from bot.pagerduty.intake import MAX_BODY_BYTES, PagerDutyIntake
from bot.pagerduty.webhook import PayloadError, WebhookEvent, parse_event, sign, verify_signature

__all__ = [
    "MAX_BODY_BYTES",
    "PagerDutyIntake",
    "PayloadError",
    "WebhookEvent",
    "parse_event",
    "sign",
    "verify_signature",
]
