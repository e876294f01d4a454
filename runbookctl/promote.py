"""`runbookctl promote`: allow an action in production, with evidence, through Git review.

A thin shell over `bot.promotion`: parse flags, print the evidence and the diff, map
refusals to exit 1 and flag mistakes to exit 2.
"""

from __future__ import annotations

import click

from runbookctl.common import catalog_option, default_db, user_errors


def _window(value: str | None) -> float | None:
    if value is None:
        return None
    from bot.catalog.loader import parse_duration

    seconds = parse_duration(value, -1.0)
    if seconds <= 0:
        raise click.BadParameter(
            f"{value!r} is not a duration such as 720h, 90m or 3600s", param_hint="--window"
        )
    return seconds


@click.command()
@click.option("--action", "action_id", required=True, help="Id of the action to promote.")
@click.option("--env", required=True, help="Production environment to allow it in (e.g. prod).")
@click.option(
    "--evidence-url",
    required=True,
    help="https:// link reviewers can open: dashboard, ticket or wiki page of the trial runs.",
)
@click.option(
    "--min-runs",
    type=click.IntRange(min=0),
    default=None,
    help="Successful runs in lower environments required. "
    "Default: the catalog's promotion.min_successful_runs, else 3. Fewer than the "
    "catalog asks for needs --force --reason.",
)
@click.option(
    "--window",
    default=None,
    metavar="DURATION",
    help="How far back runs count, e.g. 720h. Default: the catalog's promotion.window, "
    "else 720h (30 days). Longer than the catalog's needs --force --reason.",
)
@click.option(
    "--force/--no-force",
    default=False,
    show_default=True,
    help="Promote without enough runs; needs --reason, which is recorded.",
)
@click.option("--reason", default=None, help="Why --force is justified (kept in the record).")
@click.option(
    "--dry-run/--no-dry-run",
    default=False,
    show_default=True,
    help="Show the evidence and the change; write nothing.",
)
@click.option(
    "--commit/--no-commit",
    default=False,
    show_default=True,
    help="Also commit the edited file (it alone) with a descriptive message.",
)
@click.option(
    "--db",
    type=click.Path(dir_okay=False),
    default=default_db,
    show_default="$RUNBOOK_DB or ./runbook-bot.db",
    help="The bot's SQLite database, whose audit log holds the evidence.",
)
@catalog_option
def promote(
    action_id: str,
    env: str,
    evidence_url: str,
    min_runs: int | None,
    window: str | None,
    force: bool,
    reason: str | None,
    dry_run: bool,
    commit: bool,
    db: str,
    catalog_dir: str,
) -> None:
    """Allow an action in a production environment, with evidence from the audit log.

    Checks that the bot has run the action successfully often enough in lower
    environments (runs of simulate and runbook tests never count), then writes the
    environment into the action's scopes, with a promotion record, in its catalog file
    (comments and layout kept), and prints the diff for review.
    Exits 1 when the promotion is refused, saying why.
    """
    from bot import promotion

    if force and not (reason and reason.strip()):
        raise click.UsageError("--force needs --reason TEXT (it is recorded in the promotion)")
    if reason and not force:
        raise click.UsageError("--reason goes with --force")
    if dry_run and commit:
        raise click.UsageError("--dry-run writes nothing, so there is nothing to --commit")
    request = promotion.PromotionRequest(
        action_id=action_id,
        env=env,
        evidence_url=evidence_url,
        min_runs=min_runs,
        window=_window(window),
        force=force,
        reason=reason or "",
    )
    with user_errors():
        plan = promotion.plan_promotion(catalog_dir, request, db=db)
        click.echo(f"Evidence for promoting {action_id} to {env} (audit log {plan.evidence.db}):")
        click.echo(f"  {plan.evidence.summary()}")
        if plan.tests is not None:
            click.echo(f"  runbook tests: {plan.tests.summary()}")
        if force:
            click.echo(f"  forced: {request.reason.strip()}")
        if dry_run:
            click.echo(f"\nDry run: {plan.display_path} would become:")
            click.echo(plan.diff(), nl=False)
            if plan.refusal:
                raise click.ClickException(f"(dry run) {plan.refusal}")
            click.echo("Nothing written (dry run).")
            return
        promotion.check(plan)
        if commit:
            promotion.check_committable(plan)
        promotion.apply(plan)
        click.echo(plan.diff(), nl=False)
        if commit:
            sha = promotion.commit(plan)
            subject, _ = plan.commit_message()
            click.echo(f"Committed {sha[:12]}: {subject}")
        else:
            click.echo(
                f"Wrote {plan.display_path}: review and commit it (or run again with --commit)."
            )
