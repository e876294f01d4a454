"""`runbookctl runner`: pull runner tokens and the bot's public key. The SQL is bot.store's."""

from __future__ import annotations

import datetime as dt

import click

from runbookctl.common import user_errors


@click.group()
def runner() -> None:
    """Pull runners: their tokens (per pool, stored hashed, revocable) and the public key
    they verify the bot's signatures with."""


def _store(db: str):  # type: ignore[no-untyped-def]
    from bot.store import Store

    return Store(db)


def _db_option(fn: click.decorators.FC) -> click.decorators.FC:
    from runbookctl.common import default_db

    return click.option(
        "--db",
        type=click.Path(dir_okay=False),
        default=default_db,
        show_default="$RUNBOOK_DB or ./runbook-bot.db",
        help="The bot's state: a SQLite file or a postgresql:// URL.",
    )(fn)


@runner.group()
def token() -> None:
    """Create, revoke and list runner tokens."""


@token.command()
@click.option("--pool", required=True, help="The runner pool the token is for.")
@click.option("--name", required=True, help="A name for the runner (unique in the pool).")
@_db_option
def create(pool: str, name: str, db: str) -> None:
    """Create a token; it is printed once (the database keeps only its sha256)."""
    from bot.hub import new_token, token_digest

    secret = new_token()
    with user_errors():
        store = _store(db)
        try:
            store.runner_token_create(pool, name, token_digest(secret))
        finally:
            store.close()
    click.echo(secret)


@token.command()
@click.option("--pool", required=True)
@click.option("--name", required=True)
@_db_option
def revoke(pool: str, name: str, db: str) -> None:
    """Revoke a token: the bot refuses it from the next request on."""
    with user_errors():
        store = _store(db)
        try:
            revoked = store.runner_token_revoke(pool, name)
        finally:
            store.close()
    if revoked is None:
        raise click.ClickException(f"pool {pool} has no active token named {name}")
    click.echo(f"revoked {pool}/{name}")


@token.command("list")
@click.option("--pool", default=None, help="Only this pool's tokens.")
@_db_option
def list_(pool: str | None, db: str) -> None:
    """The tokens: pool, name, created, revoked (never the token itself)."""
    with user_errors():
        store = _store(db)
        try:
            tokens = store.runner_tokens(pool)
        finally:
            store.close()
    for t in tokens:
        revoked = f"revoked {_when(t.revoked_at)}" if t.revoked_at is not None else "active"
        click.echo(f"{t.pool}\t{t.name}\tcreated {_when(t.created_at)}\t{revoked}")


@runner.command()
@_db_option
def refusals(db: str) -> None:
    """The refusal log: tokens the bot refused, payloads runners refused (newest last)."""
    with user_errors():
        store = _store(db)
        try:
            found = store.runner_refusals()
        finally:
            store.close()
    for r in found:
        where = f"{r.pool or '-'}\t{r.job_id or '-'}"
        click.echo(f"{_when(r.at)}\t{r.side}\t{r.reason}\t{where}\t{r.detail}")


@runner.command("public-key")
@click.option(
    "--key",
    default=None,
    type=click.Path(dir_okay=False),
    help="The bot's private key file [default: RUNBOOK_SIGNING_KEY, else signing.key in "
    "the state directory, created if absent].",
)
def public_key(key: str | None) -> None:
    """Print the bot's public key (PEM): give it to runners as --public-key."""
    from bot.config import Config
    from bot.signing import load_or_create_key, public_pem

    with user_errors():
        path = key or Config.from_env().signing_key_path
        click.echo(public_pem(load_or_create_key(path)), nl=False)


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
