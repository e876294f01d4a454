"""The PagerDuty REST API, through the `pagerduty` client (successor of `pdpyras`).

The client retries 429 and 5xx answers itself, sleeping `sleep_timer` and doubling it
each time (it does not read ``Retry-After``); we bound how many times, so a PagerDuty
outage ends in a logged failure instead of a thread stuck forever.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pagerduty

from bot.config import Config
from bot.errors import ConfigError

log = logging.getLogger(__name__)

RETRIED_STATUSES = (429, 500, 502, 503, 504)


def rest_client(
    config: Config, *, retries: int, timeout: int, sleep_timer: float
) -> pagerduty.RestApiV2Client:
    """A REST client for `config`'s token, From address and base URL (PAGERDUTY_API_URL)."""
    try:
        client = pagerduty.RestApiV2Client(
            config.pagerduty_api_token.reveal(),
            default_from=config.pagerduty_from or None,
            base_url=config.pagerduty_api_url.rstrip("/"),
        )
    except pagerduty.UrlError as exc:
        raise ConfigError(f"PAGERDUTY_API_URL: {exc}") from None
    client.retry = dict.fromkeys(RETRIED_STATUSES, retries)
    client.timeout = timeout  # seconds per request (the client's default is 60)
    client.sleep_timer = sleep_timer
    return client


def incident_path(incident_id: str) -> str:
    return f"/incidents/{quote(incident_id, safe='')}"


def first_alert_details(client: pagerduty.RestApiV2Client, incident_id: str) -> dict[str, Any]:
    """The custom details of the incident's first alert ({} when it has none)."""
    alerts = client.rget(f"{incident_path(incident_id)}/alerts", params={"limit": 1})
    first = alerts[0] if isinstance(alerts, list) and alerts else None
    body = first.get("body") if isinstance(first, dict) else None
    if not isinstance(body, dict):
        return {}
    for details in (body.get("details"), _get(body.get("cef_details"), "details")):
        if isinstance(details, dict) and details:
            return details
    return {}


def _get(value: Any, key: str) -> Any:
    return value.get(key) if isinstance(value, Mapping) else None
