"""Settings of the bot, from the environment (and `runbook-bot` flags that mirror it).

Secrets are wrapped in `Secret`, whose repr and str never show the value, so a
settings object can be logged or printed safely.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from bot.errors import ConfigError


class Secret:
    """A credential. `reveal()` is the only way to read it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __bool__(self) -> bool:
        return bool(self._value)

    def __repr__(self) -> str:
        return "Secret('********')" if self._value else "Secret('')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


def _list(value: str) -> tuple[str, ...]:
    return tuple(v.strip().strip(":") for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Config:
    """One field per environment variable; `ENV` in each field's metadata names it."""

    catalog: str = field(default="./runbooks", metadata={"env": "RUNBOOK_CATALOG", "help": "Catalog directory."})
    db: str = field(default="./runbook-bot.db", metadata={"env": "RUNBOOK_DB", "help": "SQLite file for state and audit."})
    env: str = field(default="", metadata={"env": "RUNBOOK_ENV", "help": "Environment this bot acts in (dev, staging, prod, …) when the catalog does not map the service."})
    host: str = field(default="0.0.0.0", metadata={"env": "HOST", "help": "Address to listen on."})  # noqa: S104 - a server in a container listens on all interfaces
    port: int = field(default=3000, metadata={"env": "PORT", "help": "HTTP port."})
    slack_bot_token: Secret = field(default_factory=lambda: Secret(""), metadata={"env": "SLACK_BOT_TOKEN", "help": "Slack bot token (xoxb-…)."})
    slack_signing_secret: Secret = field(default_factory=lambda: Secret(""), metadata={"env": "SLACK_SIGNING_SECRET", "help": "Slack signing secret (HTTP mode)."})
    slack_app_token: Secret = field(default_factory=lambda: Secret(""), metadata={"env": "SLACK_APP_TOKEN", "help": "Slack app-level token (xapp-…): Socket Mode instead of HTTP mode."})
    slack_api_url: str = field(default="https://slack.com/api/", metadata={"env": "SLACK_API_URL", "help": "Slack Web API base URL."})
    pagerduty_webhook_secret: Secret = field(default_factory=lambda: Secret(""), metadata={"env": "PAGERDUTY_WEBHOOK_SECRET", "help": "Secret(s) for X-PagerDuty-Signature; comma-separated during rotation."})
    pagerduty_webhook_token: Secret = field(default_factory=lambda: Secret(""), metadata={"env": "PAGERDUTY_WEBHOOK_TOKEN", "help": "Bearer token accepted instead of a signature, for relays that cannot sign."})
    pagerduty_api_token: Secret = field(default_factory=lambda: Secret(""), metadata={"env": "PAGERDUTY_API_TOKEN", "help": "PagerDuty REST API token for write-back."})
    pagerduty_from: str = field(default="", metadata={"env": "PAGERDUTY_FROM", "help": "Email of a PagerDuty user, sent as From on write-back."})
    pagerduty_api_url: str = field(default="https://api.pagerduty.com", metadata={"env": "PAGERDUTY_API_URL", "help": "PagerDuty REST API base URL."})
    workers: int = field(default=4, metadata={"env": "RUNBOOK_WORKERS", "help": "Worker threads running steps and deliveries."})
    shutdown_grace: float = field(default=50.0, metadata={"env": "RUNBOOK_SHUTDOWN_GRACE", "help": "Seconds running steps get to finish on SIGTERM."})
    approve_reactions: tuple[str, ...] = field(default=("white_check_mark",), metadata={"env": "RUNBOOK_APPROVE_REACTIONS", "help": "Reactions that approve (comma-separated)."})
    reject_reactions: tuple[str, ...] = field(default=("x",), metadata={"env": "RUNBOOK_REJECT_REACTIONS", "help": "Reactions that reject (comma-separated)."})
    pause_reactions: tuple[str, ...] = field(default=("double_vertical_bar",), metadata={"env": "RUNBOOK_PAUSE_REACTIONS", "help": "Reactions that pause the approval deadline (comma-separated)."})
    log_level: str = field(default="INFO", metadata={"env": "RUNBOOK_LOG_LEVEL", "help": "Logging level."})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Config:
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f.metadata["env"])
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(f.name, f.metadata["env"], raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for name in ("slack_bot_token", "slack_signing_secret", "slack_app_token",
                     "pagerduty_webhook_secret", "pagerduty_webhook_token", "pagerduty_api_token"):
            if isinstance(values.get(name), str):
                values[name] = Secret(values[name])
        return cls(**values)

    @property
    def socket_mode(self) -> bool:
        return bool(self.slack_app_token)

    @property
    def slack_enabled(self) -> bool:
        return bool(self.slack_bot_token)

    @property
    def pagerduty_writeback(self) -> bool:
        return bool(self.pagerduty_api_token and self.pagerduty_from)


def env_vars() -> list[tuple[str, str, str]]:
    """(variable, default, help) for every setting: the README table is checked against it."""
    out = []
    for f in fields(Config):
        default: Any = "" if isinstance(f.default, type(MISSING)) else f.default
        if isinstance(default, tuple):
            default = ",".join(default)
        out.append((f.metadata["env"], str(default), f.metadata["help"]))
    return out


def _convert(name: str, var: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
    except ValueError:
        raise ConfigError(f"{var}={raw!r} is not a number") from None
    if kind == "Secret":
        return Secret(raw)
    if kind.startswith("tuple"):
        return _list(raw)
    return raw
