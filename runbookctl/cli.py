"""`runbookctl`: the operator CLI. A thin shell over the core in `bot`.

Each subcommand lives in its own module and is imported only when it runs, so
`runbookctl lint` never imports the Slack or PagerDuty code (it runs on every commit).
Library errors (`RunbookBotError`) become `click.ClickException` (exit 1); usage errors
exit 2, as click does.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

from bot import __version__

# name -> (module, attribute); modules are imported on demand
_COMMANDS: dict[str, tuple[str, str]] = {
    "lint": ("runbookctl.lint", "lint"),
    "simulate": ("runbookctl.simulate", "simulate"),
    "report": ("runbookctl.report", "report"),
    "promote": ("runbookctl.promote", "promote"),
    "test": ("runbookctl.runbooktest", "test"),
    "runs": ("runbookctl.runs", "runs"),
    "runner": ("runbookctl.runner", "runner"),
    "db": ("runbookctl.db", "db"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module = importlib.import_module(target[0])
        command: click.Command = getattr(module, target[1])
        return command


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="runbookctl")
def cli() -> None:
    """Operate runbook-bot: lint and test the catalog, simulate incidents, promote actions,
    report."""


def main(argv: list[str] | None = None) -> Any:
    return cli.main(args=argv, prog_name="runbookctl")
