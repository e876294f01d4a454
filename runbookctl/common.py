"""Helpers shared by runbookctl commands: option defaults and error mapping."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import click

from bot.errors import RunbookBotError

F = TypeVar("F", bound=Callable[..., Any])


def default_catalog() -> str:
    return os.environ.get("RUNBOOK_CATALOG") or "./runbooks"


def default_db() -> str:
    return os.environ.get("RUNBOOK_DB") or "./runbook-bot.db"


def catalog_option(fn: F) -> F:
    return click.option(
        "--catalog",
        "catalog_dir",
        type=click.Path(exists=True, file_okay=False),
        default=default_catalog,
        show_default="$RUNBOOK_CATALOG or ./runbooks",
        help="Catalog directory.",
    )(fn)


def state_db_option(fn: F) -> F:
    """--db for commands that read the bot's state (report, runs)."""
    return click.option(
        "--db",
        type=click.Path(dir_okay=False),
        default=default_db,
        show_default="$RUNBOOK_DB or ./runbook-bot.db",
        help="The bot's state: a SQLite file or a postgresql:// URL (opened read-only).",
    )(fn)


@contextmanager
def user_errors() -> Iterator[None]:
    """Library errors become click errors: a message and exit 1, no traceback."""
    try:
        yield
    except RunbookBotError as exc:
        raise click.ClickException(str(exc)) from None
