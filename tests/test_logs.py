"""Logs (bot.logs): text or one JSON object per line, with the incident's context, and
never a credential, whatever a caller passes."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from bot.config import Config
from bot.errors import ConfigError
from bot.logs import configure_logging

SLACK_TOKEN = "xoxb-1111-2222-abcdefghijkl"
SIGNING_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
WEBHOOK_SECRETS = "whsec-old-0123456789,whsec-new-9876543210"


def config(log_format: str, level: str = "INFO") -> Config:
    return Config.from_env(
        {
            "RUNBOOK_LOG_FORMAT": log_format,
            "RUNBOOK_LOG_LEVEL": level,
            "SLACK_BOT_TOKEN": SLACK_TOKEN,
            "SLACK_SIGNING_SECRET": SIGNING_SECRET,
            "PAGERDUTY_WEBHOOK_SECRET": WEBHOOK_SECRETS,
        }
    )


@pytest.fixture
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)


def lines(stream: io.StringIO) -> list[str]:
    return stream.getvalue().splitlines()


@pytest.mark.usefixtures("restore_root_logger")
def test_json_lines_carry_the_incident_context() -> None:
    out = io.StringIO()
    configure_logging(config("json"), out)
    log = logging.getLogger("bot.engine")
    log.info(
        "step %s decided: %s",
        "clear-cache",
        "needs approval",
        extra={
            "incident": "PABC123",
            "service": "payments",
            "action": "clear-cache",
            "step": "clear-cache",
            "attempt": 2,
        },
    )
    log.debug("not at INFO")
    (line,) = lines(out)
    record = json.loads(line)
    assert list(record)[:4] == ["ts", "level", "logger", "message"]
    assert record["ts"].endswith("Z") and "T" in record["ts"]
    assert record == {
        "ts": record["ts"],
        "level": "INFO",
        "logger": "bot.engine",
        "message": "step clear-cache decided: needs approval",
        "incident": "PABC123",
        "service": "payments",
        "action": "clear-cache",
        "step": "clear-cache",
        "attempt": 2,
    }


@pytest.mark.usefixtures("restore_root_logger")
def test_a_traceback_stays_inside_its_json_line() -> None:
    out = io.StringIO()
    configure_logging(config("json"), out)
    try:
        raise RuntimeError(f"Slack said no to {SLACK_TOKEN}")
    except RuntimeError:
        logging.getLogger("bot.chat").exception("post failed", extra={"incident": "P1"})
    (line,) = lines(out)
    record = json.loads(line)
    assert "RuntimeError: Slack said no to ********" in record["exc"]
    assert record["incident"] == "P1"


@pytest.mark.parametrize("log_format", ["json", "text"])
@pytest.mark.usefixtures("restore_root_logger")
def test_credentials_never_reach_the_log(log_format: str) -> None:
    out = io.StringIO()
    configure_logging(config(log_format), out)
    log = logging.getLogger("bot.server")
    cfg = config(log_format)
    log.warning(
        "started with %s and %s; signature check with %s",
        SLACK_TOKEN,
        cfg,
        SIGNING_SECRET,
        extra={
            "token": "anything at all",
            "secret": cfg.slack_signing_secret,
            "url": "https://x.example.com/?api_key=abcd1234",
            "header": "Authorization: Bearer sk-live-1234567890",
            "rotation": "whsec-new-9876543210",
        },
    )
    text = out.getvalue()
    for value in (
        SLACK_TOKEN,
        SIGNING_SECRET,
        "whsec-old-0123456789",
        "whsec-new-9876543210",
        "anything at all",
        "abcd1234",
        "sk-live-1234567890",
    ):
        assert value not in text, value
    assert "********" in text


@pytest.mark.usefixtures("restore_root_logger")
def test_text_lines_show_the_context_too() -> None:
    out = io.StringIO()
    configure_logging(config("text"), out)
    logging.getLogger("bot.engine").info(
        "incident received", extra={"service": "payments", "incident": "P9"}
    )
    (line,) = lines(out)
    assert line.endswith(" INFO bot.engine: incident received (incident=P9 service=payments)")


@pytest.mark.usefixtures("restore_root_logger")
def test_configuring_again_replaces_the_handler_and_keeps_others() -> None:
    root = logging.getLogger()
    others = list(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging(config("text"), first)
    handler = configure_logging(config("json", "WARNING"), second)
    logging.getLogger("x").warning("once")
    logging.getLogger("x").info("filtered out")
    assert first.getvalue() == ""
    assert [json.loads(line)["message"] for line in lines(second)] == ["once"]
    assert root.handlers == [*others, handler]


def test_unknown_log_format_and_negative_refresh_are_refused() -> None:
    with pytest.raises(ConfigError, match="RUNBOOK_LOG_FORMAT='xml': use one of text, json"):
        Config.from_env({"RUNBOOK_LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match=re.escape("RUNBOOK_CATALOG_REFRESH=-1.0")):
        Config.from_env({"RUNBOOK_CATALOG_REFRESH": "-1"})
    assert Config.from_env({"RUNBOOK_CATALOG_REFRESH": "0"}).catalog_refresh == 0.0
