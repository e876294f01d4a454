"""The PagerDuty REST API, through the `pagerduty` client (successor of `pdpyras`).

The client can retry by itself: it sleeps `sleep_timer`, doubling it each time, and does
not read ``Retry-After``. How often is ours to bound, per use:

  * 5xx: `retries` times (0 for write-back, whose outbox retries instead and looks
    before posting again; a blind retry of a POST that did reach PagerDuty writes a
    second note);
  * 429: at least once (the client reads 0 as "retry forever" for 429), then the
    caller gets the 429 and waits its ``Retry-After``;
  * no answer (a timeout, a refused connection): `network_attempts` more tries.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pagerduty

from bot.config import Config
from bot.errors import ConfigError

log = logging.getLogger(__name__)

SERVER_ERRORS = (500, 502, 503, 504)
# The endpoints the bot calls: an incident, its alerts, its notes.
_INCIDENT_PATH = re.compile(r"/incidents/[^/]+(/alerts|/notes)?")


class RestClient(pagerduty.RestApiV2Client):
    """The client, with `canonical_path` answered from the shape of the URL for the
    endpoints the bot calls. The client classifies every URL (two or three times per
    request) by filtering its whole table of API paths node by node: under a storm that
    was a third of the CPU of opening an incident. Other URLs go to the client's own.
    """

    def canonical_path(self, url: str) -> str:
        base = self.url.rstrip("/")
        path = (url[len(base) :] if url.startswith(base) else url).split("?")[0]
        match = _INCIDENT_PATH.fullmatch(path)
        if match is None:
            return str(super().canonical_path(url))
        return "/incidents/{id}" + (match.group(1) or "")


def rest_client(
    config: Config,
    *,
    retries: int,
    timeout: float,
    sleep_timer: float,
    network_attempts: int = 0,
) -> pagerduty.RestApiV2Client:
    """A REST client for `config`'s token, From address and base URL (PAGERDUTY_API_URL)."""
    try:
        client = RestClient(
            config.pagerduty_api_token.reveal(),
            default_from=config.pagerduty_from or None,
            base_url=config.pagerduty_api_url.rstrip("/"),
        )
    except pagerduty.UrlError as exc:
        raise ConfigError(f"PAGERDUTY_API_URL: {exc}") from None
    client.retry = {**dict.fromkeys(SERVER_ERRORS, retries), 429: max(1, retries)}
    client.max_network_attempts = network_attempts
    set_timeout(client, timeout)
    client.sleep_timer = sleep_timer
    return client


def set_timeout(client: pagerduty.RestApiV2Client, seconds: float) -> None:
    """Seconds a request may take (the client's default is 60)."""
    # httpx takes float seconds; the client's attribute is typed after its int default.
    client.timeout = seconds  # type: ignore[assignment]


def incident_path(incident_id: str) -> str:
    return f"/incidents/{quote(incident_id, safe='')}"


def no_answer(exc: pagerduty.Error) -> bool:
    """PagerDuty did not answer, or answered with a server error (it may be down)."""
    response = getattr(exc, "response", None)
    return response is None or response.status_code >= 500


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
