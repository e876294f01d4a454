"""`runbook-bot`: start the bot (HTTP or Socket Mode). Filled in by the bot itself."""

from __future__ import annotations

import click


@click.command()
def main() -> None:
    """Start runbook-bot. Settings come from the environment (see README)."""
    raise click.ClickException("the bot server is not built yet; use `runbookctl simulate`")
