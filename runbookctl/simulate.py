"""`runbookctl simulate`: the whole flow for a synthetic alert, printed as the thread."""

from __future__ import annotations

import os
import sys
import tempfile
import uuid
from typing import TYPE_CHECKING

import click

from runbookctl.common import catalog_option, user_errors

if TYPE_CHECKING:
    from bot.local import LocalRuntime


def _parse_details(pairs: tuple[str, ...]) -> dict[str, str]:
    details: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--detail")
        details[key] = value
    return details


@click.command()
@click.option("--service", required=True, help="PagerDuty service name (or id) of the alert.")
@click.option("--symptom", required=True, help="Alert title / symptom text.")
@click.option(
    "--env",
    default=None,
    help="Environment of the incident. Default: the catalog's `services` mapping for the "
    "service, else $RUNBOOK_ENV; with neither it is unknown and every step is blocked, "
    "as in the bot.",
)
@click.option(
    "--detail",
    "details",
    multiple=True,
    metavar="KEY=VALUE",
    help="Alert custom detail, repeatable (e.g. --detail namespace=payments).",
)
@click.option(
    "--approve",
    type=click.Choice(["all", "none", "ask"]),
    default=None,
    help="How guarded steps are decided. Default: all for a dry run, ask with --execute.",
)
@click.option(
    "--execute/--dry-run",
    default=False,
    show_default=True,
    help="Run commands for real. A dry run shows what would run and why.",
)
@click.option(
    "--resolve/--no-resolve",
    default=False,
    show_default=True,
    help="Resolve the incident at the end, to show the on-resolve follow-ups.",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=None,
    help="Record state and audit in this SQLite file (default: a throwaway file).",
)
@catalog_option
def simulate(
    service: str,
    symptom: str,
    env: str | None,
    details: tuple[str, ...],
    approve: str | None,
    execute: bool,
    resolve: bool,
    db: str | None,
    catalog_dir: str,
) -> None:
    """Feed a synthetic alert through the engine and print the Slack thread it would make.

    Exits 1 when no runbook matches or the runbook stops (failure, rejection, block).
    """
    from bot.catalog import load_catalog
    from bot.catalog.environment import resolve_environment
    from bot.chat.console import ConsoleTransport
    from bot.engine import Incident
    from bot.local import LocalRuntime
    from bot.messages import SIMULATE_NO_ENVIRONMENT
    from bot.states import Origin, RunStatus
    from bot.store import Store

    mode = approve or ("ask" if execute else "all")
    with user_errors():
        catalog = load_catalog(catalog_dir)
    # The bot's rule (bot.catalog.environment); --env stands for an incident that says.
    choice = resolve_environment(catalog, service, default_env=os.environ.get("RUNBOOK_ENV"))
    why = "--env" if env else choice.detail
    env = env or choice.env or ""
    alert = Incident(
        id=f"SIM-{uuid.uuid4().hex[:8].upper()}",
        title=symptom,
        service=service,
        urgency="high",
        env=env,
        details=_parse_details(details),
    )
    header = "EXECUTING commands for real" if execute else "dry run: nothing is executed"
    click.echo(
        f"runbookctl simulate — {header}; approvals: {mode}; "
        f"environment: {env or 'unknown'} ({why})\n"
    )
    with tempfile.TemporaryDirectory(prefix="runbookctl-") as scratch:
        with user_errors():
            store = Store(db or os.path.join(scratch, "simulate.db"))
        try:
            runtime = LocalRuntime(
                catalog,
                store,
                transports={"slack": ConsoleTransport(sys.stdout)},
                dry_run=not execute,
                default_env=env,
                # Its audit rows are marked: never evidence for `runbookctl promote`.
                origin=Origin.SIMULATE,
                # The person at the terminal stands in for the responders.
                member_of=lambda user, group: True,
            )
            runtime.open(alert, source="simulate")
            _decide_pending(runtime, alert.id, mode)
            if resolve:
                runtime.resolve(alert.id, actor="simulate")
                _decide_pending(runtime, alert.id, mode)
            incident = store.incident(alert.id)
            run = store.run(alert.id)
        finally:
            store.close()
    assert incident is not None
    if incident.runbook_id is None:
        raise click.ClickException(
            f"no runbook matches service {service!r} with symptom {symptom!r}"
        )
    click.echo(f"\nrunbook {incident.runbook_id}: {run.status if run else 'none'}")
    if not env:
        click.echo(SIMULATE_NO_ENVIRONMENT.format(detail=choice.detail, service=service))
    if run is None or run.status not in (RunStatus.COMPLETED, RunStatus.CANCELLED):
        click.get_current_context().exit(1)


def _decide_pending(runtime: LocalRuntime, incident_id: str, mode: str) -> None:
    """Decide every approval request of the incident as `mode` says, as its first
    approver (the person at the terminal stands in for the responders). A decision the
    engine refuses is printed as the private note a responder would get."""
    seen: set[int] = set()
    incident = runtime.store.incident(incident_id)
    channel = incident.channel if incident else ""
    while True:
        pending = [
            a for a in runtime.store.pending_approvals(incident_id) if a.step_run_id not in seen
        ]
        if not pending:
            return
        for approval in pending:
            seen.add(approval.step_run_id)
            users = approval.approver_users
            actor = users[0] if users else "simulate"
            if mode == "all":
                approved = True
            elif mode == "none":
                approved = False
            else:
                approved = click.confirm(f"  │ Approve {approval.action}?", default=False, err=True)
            runtime.decide(
                approval.step_run_id, actor, "approve" if approved else "reject", channel=channel
            )
            # The two-person rule: as many different listed approvers as it needs.
            for other in users[1 : approval.required] if approved else ():
                runtime.decide(approval.step_run_id, other, "approve", channel=channel)
