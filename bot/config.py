"""Settings of the bot, from the environment (and `runbook-bot` flags that mirror it).

Secrets are wrapped in `Secret`, whose repr and str never show the value, so a
settings object can be logged or printed safely.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
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


LOG_FORMATS = ("text", "json")
KUBERNETES_MODES = ("auto", "on", "off")


def _list(value: str) -> tuple[str, ...]:
    return tuple(v.strip().strip(":") for v in value.split(",") if v.strip())


def _setting(var: str, default: Any, help_text: str) -> Any:
    return field(default=default, metadata={"env": var, "help": help_text})


def _secret(var: str, help_text: str) -> Any:
    return field(default_factory=lambda: Secret(""), metadata={"env": var, "help": help_text})


@dataclass(frozen=True)
class Config:
    """One field per environment variable; `ENV` in each field's metadata names it."""

    catalog: str = _setting("RUNBOOK_CATALOG", "./runbooks", "Catalog directory.")
    catalog_commit: str = _setting(
        "RUNBOOK_CATALOG_COMMIT",
        "",
        "The catalog's commit when it is not a Git checkout (a ConfigMap, a baked image); "
        "shown in runbook_bot_info and every audit row.",
    )
    catalog_refresh: float = _setting(
        "RUNBOOK_CATALOG_REFRESH",
        10.0,
        "Seconds between checks of the catalog for changes (0: no periodic checks; SIGHUP "
        "reloads at once). A catalog with errors is never loaded.",
    )
    db: str = _setting(
        "RUNBOOK_DB",
        "./runbook-bot.db",
        "State and audit: a SQLite file, or a postgresql:// URL (libpq conninfo; PG* "
        "variables fill in what it leaves out). SQLite: one bot per file; PostgreSQL: "
        "any number of replicas share it.",
    )
    replica_id: str = _setting(
        "RUNBOOK_REPLICA_ID",
        "",
        "This replica's name among those sharing a PostgreSQL database (default: host name "
        "and port). Keep it stable across restarts on the same state directory (a pod "
        "name): a restarted replica then recovers the steps its supervisors finished.",
    )
    state_dir: str = _setting(
        "RUNBOOK_STATE_DIR",
        "",
        "Directory where step supervisors record results that outlive the bot "
        "(default: beside the SQLite file, e.g. runbook-bot-steps/; with PostgreSQL, "
        "./runbook-bot-steps).",
    )
    signing_key: str = _setting(
        "RUNBOOK_SIGNING_KEY",
        "",
        "File with the Ed25519 private key the bot signs pull runner steps with (default: "
        "signing.key in the state directory, created if absent; `runbookctl runner "
        "public-key` prints the public key runners need).",
    )
    runner_lease: float = _setting(
        "RUNBOOK_RUNNER_LEASE",
        30.0,
        "Seconds a pull runner may go without reporting on a step it runs before the step "
        "counts as interrupted (never re-run).",
    )
    kubernetes: str = _setting(
        "RUNBOOK_KUBERNETES",
        "auto",
        "Kubernetes Job executor for actions with executor: {kubernetes: …}: auto (on when "
        "the bot runs in a cluster or KUBECONFIG is set), on, or off (such steps are "
        "refused).",
    )
    kubernetes_instance: str = _setting(
        "RUNBOOK_KUBERNETES_INSTANCE",
        "runbook-bot",
        "Names and labels this bot's Jobs; bots sharing a namespace need different ones.",
    )
    env: str = _setting(
        "RUNBOOK_ENV",
        "",
        "Environment this bot acts in (dev, staging, prod, …) when the catalog "
        "does not map the service.",
    )
    host: str = _setting("HOST", "0.0.0.0", "Address to listen on.")
    port: int = _setting("PORT", 3000, "HTTP port.")
    slack_bot_token: Secret = _secret("SLACK_BOT_TOKEN", "Slack bot token (xoxb-…).")
    slack_signing_secret: Secret = _secret(
        "SLACK_SIGNING_SECRET", "Slack signing secret (HTTP mode)."
    )
    slack_app_token: Secret = _secret(
        "SLACK_APP_TOKEN", "Slack app-level token (xapp-…): Socket Mode instead of HTTP mode."
    )
    slack_api_url: str = _setting(
        "SLACK_API_URL", "https://slack.com/api/", "Slack Web API base URL."
    )
    slack_pacing: str = _setting(
        "RUNBOOK_SLACK_PACING",
        "slack",
        "Pace Web API calls to Slack's published limits (slack), or not at all (off: only "
        "for a Slack-compatible endpoint without those limits, such as a test stand-in).",
    )
    pagerduty_webhook_secret: Secret = _secret(
        "PAGERDUTY_WEBHOOK_SECRET",
        "Secret(s) for X-PagerDuty-Signature; comma-separated during rotation.",
    )
    pagerduty_webhook_token: Secret = _secret(
        "PAGERDUTY_WEBHOOK_TOKEN",
        "Bearer token accepted instead of a signature, for relays that cannot sign.",
    )
    guard_token: Secret = _secret(
        "RUNBOOK_GUARD_TOKEN",
        "Bearer token bot.guard decorators send to ask for approval in Slack "
        "(/guard/requests); unset: every such request is refused.",
    )
    pagerduty_api_token: Secret = _secret(
        "PAGERDUTY_API_TOKEN", "PagerDuty REST API token for write-back."
    )
    pagerduty_from: str = _setting(
        "PAGERDUTY_FROM", "", "Email of a PagerDuty user, sent as From on write-back."
    )
    pagerduty_api_url: str = _setting(
        "PAGERDUTY_API_URL", "https://api.pagerduty.com", "PagerDuty REST API base URL."
    )
    workers: int = _setting("RUNBOOK_WORKERS", 4, "Worker threads running steps and deliveries.")
    intake_process: int = _setting(
        "RUNBOOK_INTAKE_PROCESS",
        1,
        "1: PagerDuty deliveries are answered by a process of their own, whose answers "
        "never wait behind the bot's work; 0: one process. SQLite only: with PostgreSQL "
        "the bot serves in one process.",
    )
    shutdown_grace: float = _setting(
        "RUNBOOK_SHUTDOWN_GRACE", 50.0, "Seconds running steps get to finish on SIGTERM."
    )
    approve_reactions: tuple[str, ...] = _setting(
        "RUNBOOK_APPROVE_REACTIONS",
        ("white_check_mark",),
        "Reactions that approve (comma-separated).",
    )
    reject_reactions: tuple[str, ...] = _setting(
        "RUNBOOK_REJECT_REACTIONS", ("x",), "Reactions that reject (comma-separated)."
    )
    pause_reactions: tuple[str, ...] = _setting(
        "RUNBOOK_PAUSE_REACTIONS",
        ("double_vertical_bar",),
        "Reactions that pause the approval deadline (comma-separated).",
    )
    log_level: str = _setting("RUNBOOK_LOG_LEVEL", "INFO", "Logging level.")
    log_format: str = _setting(
        "RUNBOOK_LOG_FORMAT", "text", "Log format: text, or json (one object per line)."
    )

    def __post_init__(self) -> None:
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(
                f"RUNBOOK_LOG_FORMAT={self.log_format!r}: use one of {', '.join(LOG_FORMATS)}"
            )
        if self.kubernetes not in KUBERNETES_MODES:
            raise ConfigError(
                f"RUNBOOK_KUBERNETES={self.kubernetes!r}: use one of {', '.join(KUBERNETES_MODES)}"
            )
        if self.runner_lease <= 0:
            raise ConfigError(f"RUNBOOK_RUNNER_LEASE={self.runner_lease!r}: use seconds > 0")
        if self.catalog_refresh < 0:
            raise ConfigError(
                f"RUNBOOK_CATALOG_REFRESH={self.catalog_refresh!r}: use seconds >= 0 "
                "(0 turns periodic checks off)"
            )

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
        for f in fields(cls):
            if str(f.type) == "Secret" and isinstance(values.get(f.name), str):
                values[f.name] = Secret(values[f.name])
        return cls(**values)

    def __repr__(self) -> str:
        # Secrets print as stars (Secret); a PostgreSQL URL may carry a password too.
        from bot.store.backend import display, is_postgres

        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        if is_postgres(self.db):
            shown["db"] = display(self.db)
        return f"Config({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    def to_env(self) -> dict[str, str]:
        """The environment `from_env` reads back into an equal Config (for the bot's
        own child processes)."""
        out: dict[str, str] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Secret):
                value = value.reveal()
            elif isinstance(value, tuple):
                value = ",".join(value)
            out[f.metadata["env"]] = str(value)
        return out

    @property
    def state_directory(self) -> Path:
        """Where step supervisors leave their results and the signing key lives:
        RUNBOOK_STATE_DIR, else beside the SQLite file (``runbook-bot.db`` ->
        ``runbook-bot-steps/``), or ``./runbook-bot-steps`` with PostgreSQL."""
        if self.state_dir:
            return Path(self.state_dir)
        if self.db.startswith(("postgresql://", "postgres://")):
            return Path("runbook-bot-steps")
        db = Path(self.db)
        return db.with_name(f"{db.stem}-steps")

    @property
    def signing_key_path(self) -> Path:
        return Path(self.signing_key) if self.signing_key else self.state_directory / "signing.key"

    @property
    def kubernetes_enabled(self) -> bool:
        if self.kubernetes == "auto":
            return bool(os.environ.get("KUBERNETES_SERVICE_HOST") or os.environ.get("KUBECONFIG"))
        return self.kubernetes == "on"

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
