"""`runbookctl db`: the bot's database. `migrate-to` moves a SQLite database into
PostgreSQL (bot.store.migrate does the work)."""

from __future__ import annotations

import click

from runbookctl.common import default_db, user_errors


@click.group()
def db() -> None:
    """The bot's state database."""


@db.command("migrate-to")
@click.argument("url", metavar="postgresql://USER@HOST:PORT/DB")
@click.option(
    "--db",
    "sqlite_path",
    type=click.Path(dir_okay=False, exists=True),
    default=default_db,
    show_default="$RUNBOOK_DB or ./runbook-bot.db",
    help="The bot's SQLite state file to copy.",
)
def migrate_to(url: str, sqlite_path: str) -> None:
    """Copy every table of the bot's SQLite database into an empty PostgreSQL database.

    Stop the bot first (a running bot makes this refuse). Ids are kept, what the intake
    log still holds is moved in first, and the copy is all or nothing. Then set
    RUNBOOK_DB to the URL and start the bot. The password may come from PGPASSWORD or
    ~/.pgpass instead of the URL."""
    from bot.store.backend import display
    from bot.store.migrate import migrate_to as copy

    with user_errors():
        copied = copy(sqlite_path, url)
    for table, rows in copied.items():
        click.echo(f"{table:<18} {rows:>8} rows")
    click.echo(f"copied {sqlite_path} into {display(url)}: set RUNBOOK_DB to it and start the bot")
