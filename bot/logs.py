"""Logging set-up: text for people, one JSON object per line for log pipelines.

``configure_logging(config)`` installs one handler on the root logger, by
``RUNBOOK_LOG_FORMAT``:

* ``text``: ``2024-05-01 12:00:00,123 INFO bot.engine: step decided (incident=P1
  service=payments action=clear-cache step=clear-cache)``;
* ``json``: ``{"ts": "2024-05-01T12:00:00.123Z", "level": "INFO", "logger": "bot.engine",
  "message": "step decided", "incident": "P1", "service": "payments", ...}``, plus
  ``exc`` (the traceback, one string) when there is one.

Context goes in ``extra=``: ``log.info("step decided", extra={"incident": i.id,
"service": i.service, "action": a.id, "step": s.id})``. Any key works; ``CONTEXT_KEYS``
only fixes the order they are shown in.

Secrets never reach the output: the values of the bot's credentials (every ``Secret``
of the config) and the token shapes the executor masks (``DEFAULT_SECRET_PATTERNS``) are
replaced by ``********`` in the message, the context and tracebacks, and a context key
that names a credential (``token``, ``secret``, ``password``, ...) has its value
replaced whatever it is.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import sys
from collections.abc import Iterable
from dataclasses import fields
from typing import Any, TextIO

from bot.config import Config, Secret
from bot.executor import DEFAULT_SECRET_PATTERNS, MASK, mask_secrets

CONTEXT_KEYS = ("incident", "service", "service_id", "runbook", "action", "step", "env")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_SECRET_KEY = re.compile(r"(?i)token|secret|passw|authorization|signature|api_?key|cookie")
# Everything a LogRecord carries on its own; the rest came with `extra=`.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class _Masking:
    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = tuple(secrets)

    def mask(self, text: str) -> str:
        return mask_secrets(text, self.secrets, DEFAULT_SECRET_PATTERNS)

    def context(self, record: logging.LogRecord) -> dict[str, Any]:
        """The `extra=` values of a record, known keys first, credentials masked."""
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        ordered = {k: extras.pop(k) for k in CONTEXT_KEYS if k in extras}
        ordered.update(sorted(extras.items()))
        return {key: self._value(key, value) for key, value in ordered.items()}

    def _value(self, key: str, value: Any) -> Any:
        if _SECRET_KEY.search(key) or isinstance(value, Secret):
            return MASK
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.mask(value if isinstance(value, str) else str(value))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message, the context, exc."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._masking = _Masking(secrets)

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.UTC)
        line: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": self._masking.mask(record.getMessage()),
        }
        for key, value in self._masking.context(record).items():
            line.setdefault(key, value)  # a context key never hides ts, level, logger…
        if record.exc_info:
            line["exc"] = self._masking.mask(self.formatException(record.exc_info))
        elif record.exc_text:
            line["exc"] = self._masking.mask(record.exc_text)
        if record.stack_info:
            line["stack"] = self._masking.mask(self.formatStack(record.stack_info))
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """The classic one-line format, with the context in parentheses, credentials masked."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__(TEXT_FORMAT)
        self._masking = _Masking(secrets)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        context = self._masking.context(record)
        if context:
            pairs = " ".join(f"{key}={value}" for key, value in context.items())
            first, newline, rest = text.partition("\n")
            text = f"{first} ({pairs}){newline}{rest}"
        return self._masking.mask(text)


def secret_values(config: Config) -> list[str]:
    """The credentials of the config, as the strings that must never be logged."""
    found: list[str] = []
    for f in fields(config):
        value = getattr(config, f.name)
        if isinstance(value, Secret) and value:
            # PAGERDUTY_WEBHOOK_SECRET holds several during a rotation.
            found += [value.reveal(), *(v.strip() for v in value.reveal().split(","))]
    return [v for v in found if v]


def configure_logging(config: Config, stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to `stream` (stderr) in `config.log_format`, at `log_level`.

    Replaces the handler an earlier call installed, and leaves others alone. Returns it.
    """
    secrets = secret_values(config)
    formatter: logging.Formatter = (
        JsonFormatter(secrets) if config.log_format == "json" else TextFormatter(secrets)
    )
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(formatter)
    handler.set_name(_HANDLER_NAME)
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(config.log_level.upper())
    return handler


_HANDLER_NAME = "runbook-bot"
