"""`runbook-bot`: start the bot. Every flag mirrors an environment variable."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

import click

from bot.config import Config


def _options(fn: Any) -> Any:
    for f in reversed(fields(Config)):
        if f.name in ("approve_reactions", "reject_reactions", "pause_reactions"):
            continue
        kind: Any = {"int": int, "float": float}.get(str(f.type), str)
        flag = "--" + f.name.replace("_", "-")
        fn = click.option(
            flag,
            f.name,
            type=kind,
            default=None,
            help=f"{f.metadata['help']} [env {f.metadata['env']}]",
        )(fn)
    return fn


@click.command(context_settings={"max_content_width": 100})
@_options
def main(**flags: Any) -> None:
    """Start runbook-bot: PagerDuty webhooks in, runbook steps in Slack threads.

    Every setting comes from the environment variable named in its help; a flag
    overrides it.
    """
    from bot.errors import RunbookBotError
    from bot.logs import configure_logging
    from bot.server import serve

    try:
        config = Config.from_env(**flags)
        configure_logging(config)
        serve(config)
    except RunbookBotError as exc:
        raise click.ClickException(str(exc)) from None


if __name__ == "__main__":  # pragma: no cover - `python -m bot`
    main()
