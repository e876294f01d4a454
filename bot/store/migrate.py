"""Moving a bot's state from its SQLite file into PostgreSQL (`runbookctl db migrate-to`).

Every table is copied as it is, ids included, into an empty PostgreSQL database created
at the same schema version, in one transaction (all of it or nothing); the identity
sequences then continue after the copied ids. Safe to run only with the bot stopped:

  * the SQLite database is opened as the bot opens it, so a running bot makes it refuse
    (one bot per SQLite database), and what the intake log still holds (deliveries
    acknowledged but not yet moved) is moved into the inbox first, then copied;
  * the PostgreSQL database is opened as a bot's, so no bot starts on it during the
    copy, and it must hold no runbook-bot rows (a second copy would mix two histories).
"""

from __future__ import annotations

from typing import Any

from bot.errors import StoreError
from bot.store import Store
from bot.store.backend import is_postgres
from bot.store.schema import TABLES, TRANSIENT_TABLES


def migrate_to(sqlite_path: str, url: str, *, batch: int = 1000) -> dict[str, int]:
    """Copy the bot's SQLite database at `sqlite_path` into the PostgreSQL database `url`;
    the number of rows copied, per table."""
    if is_postgres(sqlite_path):
        raise StoreError("--db must name the SQLite file to copy, not a PostgreSQL URL")
    if not is_postgres(url):
        raise StoreError(f"{url!r} is not a PostgreSQL URL: use postgresql://user@host:port/db")
    try:
        source = Store(sqlite_path, intake_log=True)
    except StoreError as exc:
        raise StoreError(f"stop the bot before moving its database: {exc}") from None
    try:
        target = Store(url, intake_log=True)
    except BaseException:
        source.close()
        raise
    try:
        return _copy(source, target, batch)
    finally:
        target.close()
        source.close()


def _copy(source: Store, target: Store, batch: int) -> dict[str, int]:
    names = {
        r["name"]
        for r in source.query(
            "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
        )
    } - {"meta", *TRANSIENT_TABLES}
    unknown = names - {name for name, _ in TABLES}
    if unknown:  # a migration added a table and forgot bot.store.schema.TABLES
        raise StoreError(f"cannot copy tables {sorted(unknown)}: not in bot.store.schema.TABLES")
    present = {name: _count(target, name) for name, _ in TABLES}
    if any(present.values()):
        held = ", ".join(f"{n} {name}" for name, n in present.items() if n)
        raise StoreError(
            f"{target.path} is not empty ({held}): migrate-to copies into an empty database "
            "only; create a new one (createdb) and point the URL at it"
        )
    copied: dict[str, int] = {}
    with target._transaction() as conn:
        for name, identity in TABLES:
            columns = [r["name"] for r in source.query(f"PRAGMA table_info({name})")]
            listed = ", ".join(columns)
            copied[name] = 0
            with (
                conn.raw.cursor() as cursor,
                cursor.copy(f"COPY {name} ({listed}) FROM STDIN") as copy,
            ):
                for rows in _batches(source, f"SELECT {listed} FROM {name} ORDER BY rowid", batch):
                    for row in rows:
                        copy.write_row(row)
                    copied[name] += len(rows)
            if identity:
                conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{name}', '{identity}'), "
                    f"coalesce(max({identity}), 0) + 1, false) FROM {name}"
                )
    return copied


def _count(store: Store, table: str) -> int:
    row = store.query_one(f"SELECT count(*) AS n FROM {table}")
    return int(row["n"]) if row else 0


def _batches(store: Store, sql: str, size: int) -> Any:
    with store._session() as conn:
        cursor = conn.execute(sql)
        while rows := cursor.fetchmany(size):
            yield rows
