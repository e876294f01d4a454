"""The store's two backends: which one a `RUNBOOK_DB` names, and the PostgreSQL connection.

``RUNBOOK_DB`` is either a SQLite file (a plain path: the embedded default) or a
PostgreSQL URL (``postgresql://user:password@host:port/db?sslmode=…``: anything libpq
takes as a conninfo URL, the ``PG*`` environment variables filling in what it leaves
out). The store keeps one SQL text per statement, written in the subset both speak
(``INSERT … ON CONFLICT … DO UPDATE SET … = excluded.…``, ``RETURNING``); `PgConnection`
runs it on PostgreSQL: ``?`` placeholders become ``%s``, booleans become the integers
SQLite stores. What only one of them has (SQLite's PRAGMAs, ``json_set``, ``BEGIN
IMMEDIATE``; PostgreSQL's advisory locks, ``jsonb``) stays in the store, per backend.

Errors: psycopg's own become `StoreError` naming the server (host:port/database, never
the password) and libpq's reason.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from bot.errors import StoreError

if TYPE_CHECKING:
    import psycopg

_SCHEMES = ("postgresql://", "postgres://")


def is_postgres(target: object) -> bool:
    """Does `target` (a RUNBOOK_DB value) name a PostgreSQL database?"""
    return isinstance(target, str) and target.startswith(_SCHEMES)


def display(url: str) -> str:
    """`url` as it may be shown or logged: ``postgresql://user@host:port/db``, no password."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        parts = conninfo_to_dict(url)
    except Exception:
        return "postgresql://(a URL libpq cannot parse)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    host = str(parts.get("host") or "localhost")
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{host}{port}/{parts.get('dbname') or ''}"


def reason(exc: BaseException) -> str:
    """libpq's reason, on one line, without anything that could be a password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", text)


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """One SQL text for both backends: ``?`` → ``%s``, and ``%`` escaped for psycopg."""
    return sql.replace("%", "%%").replace("?", "%s")


def _param(value: Any) -> Any:
    # SQLite stores booleans as 0/1 in INTEGER columns; so do we.
    return int(value) if isinstance(value, bool) else value


class PgConnection:
    """A pooled psycopg connection that takes the store's SQL as SQLite does.

    ``execute`` returns psycopg's cursor (tuples, ``description``, ``rowcount``), so the
    store's row helpers serve both backends.
    """

    def __init__(self, raw: psycopg.Connection[Any]) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        return self.raw.execute(translate(sql), [_param(p) for p in params])

    def close(self) -> None:
        self.raw.close()

    @property
    def in_transaction(self) -> bool:
        from psycopg.pq import TransactionStatus

        return self.raw.info.transaction_status != TransactionStatus.IDLE


def connect_readonly(url: str) -> PgConnection:
    """A read-only session (reports): it can never change what it reads."""
    import psycopg

    try:
        raw = psycopg.connect(
            url, autocommit=True, connect_timeout=10, options="-c default_transaction_read_only=on"
        )
    except psycopg.Error as exc:
        raise unreachable(url, exc) from None
    return PgConnection(raw)


def integrity_errors() -> tuple[type[Exception], ...]:
    """What a unique constraint raises, on either backend."""
    import sqlite3

    import psycopg

    return (sqlite3.IntegrityError, psycopg.errors.IntegrityError)


def unreachable(url: str, exc: BaseException) -> StoreError:
    return StoreError(f"cannot reach the database {display(url)}: {reason(exc)}")
