"""`runbook-bot`: start the bot (every flag mirrors an environment variable), or a pull
runner (`runbook-bot runner`)."""

from __future__ import annotations

import os
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


@click.group(invoke_without_command=True, context_settings={"max_content_width": 100})
@_options
@click.pass_context
def main(ctx: click.Context, /, **flags: Any) -> None:
    """Start runbook-bot: PagerDuty webhooks in, runbook steps in Slack threads.

    Every setting comes from the environment variable named in its help; a flag
    overrides it. `runbook-bot runner --help`: a pull runner instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from bot.errors import RunbookBotError
    from bot.logs import configure_logging
    from bot.server import serve

    try:
        config = Config.from_env(**flags)
        configure_logging(config)
        serve(config)
    except RunbookBotError as exc:
        raise click.ClickException(str(exc)) from None


@main.command(context_settings={"max_content_width": 100})
@click.option("--url", required=True, help="The bot's base URL (https://runbook-bot.example.com).")
@click.option("--pool", required=True, help="The runner pool this runner serves.")
@click.option(
    "--allow",
    "allow",
    multiple=True,
    metavar="ACTION",
    help="An action id this runner may run (repeat it); with --allow-file, both count.",
)
@click.option(
    "--allow-file",
    type=click.Path(exists=True, dir_okay=False),
    help="File of action ids this runner may run, one a line (# comments).",
)
@click.option(
    "--public-key",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="The bot's public key (PEM; `runbookctl runner public-key` prints it).",
)
@click.option(
    "--state",
    default=lambda: os.environ.get("RUNBOOK_RUNNER_STATE") or "./runbook-runner.db",
    show_default="$RUNBOOK_RUNNER_STATE or ./runbook-runner.db",
    type=click.Path(dir_okay=False),
    help="The runner's own SQLite file: job ids seen, results not yet acknowledged.",
)
@click.option(
    "--parallel",
    type=click.IntRange(1, 64),
    default=1,
    show_default=True,
    help="Steps it runs at once.",
)
@click.option(
    "--poll-wait",
    type=click.FloatRange(0.5, 60),
    default=20.0,
    show_default=True,
    help="Seconds a poll waits at the bot for a step (long poll).",
)
@click.option(
    "--heartbeat",
    type=click.FloatRange(0.05, 60),
    default=10.0,
    show_default=True,
    help="Seconds between reports on running steps (keep it well under the bot's "
    "RUNBOOK_RUNNER_LEASE).",
)
def runner(
    url: str,
    pool: str,
    allow: tuple[str, ...],
    allow_file: str | None,
    public_key: str,
    state: str,
    parallel: int,
    poll_wait: float,
    heartbeat: float,
) -> None:
    """A pull runner: connects out to the bot at URL, takes steps of POOL's allowed
    actions, runs only payloads the bot signed, posts back their results.

    The token comes from RUNBOOK_RUNNER_TOKEN (`runbookctl runner token create`).
    """
    import logging
    import signal

    from bot.errors import RunbookBotError
    from bot.pullrunner import Ledger, PullRunner, RunnerStopped, read_allow_file
    from bot.signing import load_public_key

    token = os.environ.get("RUNBOOK_RUNNER_TOKEN", "")
    if not token:
        raise click.UsageError("set RUNBOOK_RUNNER_TOKEN (runbookctl runner token create)")
    actions = [*allow, *(read_allow_file(allow_file) if allow_file else [])]
    if not actions:
        raise click.UsageError("name the actions this runner may run: --allow or --allow-file")
    logging.basicConfig(
        level=os.environ.get("RUNBOOK_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s runner: %(message)s",
    )
    try:
        key = load_public_key(public_key)
    except RunbookBotError as exc:
        raise click.ClickException(str(exc)) from None
    ledger = Ledger(state)
    pull = PullRunner(
        url,
        pool,
        token,
        key,
        actions,
        ledger,
        parallel=parallel,
        poll_wait=poll_wait,
        heartbeat=heartbeat,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: pull.stop.set())
    logging.getLogger(__name__).info("runner of pool %s for %s", pool, url)
    try:
        pull.serve()
    except RunnerStopped as exc:
        raise click.ClickException(f"the bot refused this runner: {exc}") from None
    except KeyboardInterrupt:
        pass
    finally:
        ledger.close()


if __name__ == "__main__":  # pragma: no cover - `python -m bot`
    main()
