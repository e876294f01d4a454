"""`runbookctl runs`: follow runs outside Slack, from the audit log. The queries are
bot.report's."""

from __future__ import annotations

import click

from runbookctl.common import state_db_option, user_errors


def _format(fn: click.decorators.FC) -> click.decorators.FC:
    fn = click.option(
        "--format",
        "fmt",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="Output format.",
    )(fn)
    return state_db_option(fn)


@click.group()
def runs() -> None:
    """Follow runs outside Slack: every incident's steps, decisions, approvers, results."""


@runs.command("list")
@click.option("--since", default=None, metavar="WHEN", help="A duration ago (24h, 7d) or a date.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=100, show_default=True)
@_format
def list_(db: str, fmt: str, since: str | None, limit: int) -> None:
    """The incidents the audit log knows, newest first."""
    from bot import report

    with user_errors():
        start = report.parse_since(since) if since else None
        conn = report.connect(db)
        try:
            result = report.runs(conn, since=start, limit=limit)
        finally:
            conn.close()
        click.echo(report.render(result, "json" if fmt == "json" else "table"), nl=False)


@runs.command()
@click.argument("incident")
@_format
def show(db: str, fmt: str, incident: str) -> None:
    """One incident's steps: decision, who approved or rejected, result."""
    from bot import report

    with user_errors():
        conn = report.connect(db)
        try:
            result = report.run(conn, incident)
        finally:
            conn.close()
        click.echo(report.render(result, "json" if fmt == "json" else "table"), nl=False)
