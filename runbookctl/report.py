"""`runbookctl report`: the audit log as tables, JSON or CSV. The queries are bot.report's."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import click

from runbookctl.common import catalog_option, state_db_option, user_errors

F = TypeVar("F", bound=Callable[..., Any])


def _common(fn: F) -> F:
    fn = click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "json", "csv"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(fn)
    fn = click.option(
        "--since",
        default=None,
        metavar="WHEN",
        help="Only rows from this time on: a duration ago (24h, 7d, 30m) or an ISO date.",
    )(fn)
    fn = state_db_option(fn)
    return fn


def _show(db: str, fmt: str, build: Callable[..., Any], **kwargs: Any) -> None:
    from bot import report as queries

    with user_errors():
        conn = queries.connect(db)
        try:
            result = build(conn, **kwargs)
        finally:
            conn.close()
        click.echo(queries.render(result, fmt), nl=False)


def _since(text: str | None) -> float | None:
    from bot.report import parse_since

    if text is None:
        return None
    with user_errors():
        return parse_since(text)


@click.group()
def report() -> None:
    """Read the audit log: overrides, success rates, approval waits, recent events.

    `environments` reads the catalog instead: where each service's incidents would act.
    """


@report.command()
@_common
def overrides(db: str, since: str | None, fmt: str) -> None:
    """Steps that needed a human (status requires_manual), per action, most first."""
    from bot.report import overrides as build

    _show(db, fmt, build, since=_since(since))


@report.command()
@click.option("--action", default=None, help="Only this action.")
@_common
def actions(db: str, since: str | None, fmt: str, action: str | None) -> None:
    """Outcomes of executed commands per action, with the success rate."""
    from bot.report import actions as build

    _show(db, fmt, build, since=_since(since), action=action)


@report.command()
@click.option("--action", default=None, help="Only this action.")
@_common
def approvals(db: str, since: str | None, fmt: str, action: str | None) -> None:
    """Approval requests per action: decisions and how long people took to decide."""
    from bot.report import approvals as build

    _show(db, fmt, build, since=_since(since), action=action)


@report.command()
@click.option("--incident", default=None, help="Only this incident id.")
@click.option("--action", default=None, help="Only this action.")
@click.option("--status", default=None, help="Only this status (e.g. requires_manual).")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@_common
def events(
    db: str,
    since: str | None,
    fmt: str,
    incident: str | None,
    action: str | None,
    status: str | None,
    limit: int,
) -> None:
    """Recent audit rows, newest first."""
    from bot.report import events as build

    _show(
        db,
        fmt,
        build,
        incident=incident,
        action=action,
        status=status,
        since=_since(since),
        limit=limit,
    )


@report.command()
@click.option(
    "--env",
    "default_env",
    default=None,
    help="The bot's RUNBOOK_ENV, for services the catalog does not map. Default: $RUNBOOK_ENV.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json", "csv"]),
    default="table",
    show_default=True,
    help="Output format.",
)
@catalog_option
def environments(default_env: str | None, fmt: str, catalog_dir: str) -> None:
    """The environment each service's incidents act in (services mapping, else RUNBOOK_ENV).

    "unknown" means every step of those incidents is blocked: map the service under
    `services:` in the catalog settings, or set RUNBOOK_ENV.
    """
    import os

    from bot.catalog import load_catalog
    from bot.report import environments as build
    from bot.report import render

    with user_errors():
        catalog = load_catalog(catalog_dir, with_git=False)
        env = os.environ.get("RUNBOOK_ENV") if default_env is None else default_env
        click.echo(render(build(catalog, env), fmt), nl=False)
