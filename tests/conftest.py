"""Shared fixtures. Stand-ins for Slack and PagerDuty live in tests/fakes/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fakes import FakeSlack
    from postgres import Cluster

    from bot.store import Store

REPO = Path(__file__).resolve().parent.parent
BUNDLED_CATALOG = REPO / "runbooks"

_PREFIXES = ("SLACK_", "PAGERDUTY_", "RUNBOOK_")
# ... and no cluster: a test of the Kubernetes executor points it at the stand-in itself.
_NAMES = ("PORT", "HOST", "KUBECONFIG", "KUBERNETES_SERVICE_HOST")
# Read before `clean_environ` clears RUNBOOK_*: CI sets it, so a machine without
# PostgreSQL fails there instead of quietly testing one backend.
REQUIRE_POSTGRES = os.environ.get("RUNBOOK_REQUIRE_POSTGRES") == "1"


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No token or setting from the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(_PREFIXES) or name in _NAMES:
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bundled_catalog_dir() -> Path:
    return BUNDLED_CATALOG


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """A fresh SQLite file per test."""
    return tmp_path / "state.db"


@pytest.fixture(scope="session")
def postgres() -> Iterator[Cluster]:
    """A real PostgreSQL server for the session (tests/postgres.py)."""
    from postgres import Cluster, binaries

    bindir = binaries()
    if bindir is None:
        reason = (
            "PostgreSQL is not installed (no initdb/pg_ctl under PG_BINDIR, pg_config "
            "--bindir or /usr/lib/postgresql/*/bin): apt-get install postgresql"
        )
        if REQUIRE_POSTGRES:
            pytest.fail(f"RUNBOOK_REQUIRE_POSTGRES=1 but {reason}")
        pytest.skip(reason)
    cluster = Cluster(bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(postgres: Cluster) -> str:
    """A fresh, empty PostgreSQL database per test; its URL."""
    return postgres.create_database()


@pytest.fixture(params=["sqlite", "postgres"])
def db_target(request: pytest.FixtureRequest, db_path: Path) -> str:
    """A fresh database per test on each backend: a SQLite file, a PostgreSQL URL."""
    if request.param == "sqlite":
        return str(db_path)
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture
def store(db_target: str) -> Iterator[Store]:
    """A fresh store on each backend (the import waits: lint tests need no store)."""
    from bot.store import Store

    s = Store(db_target)
    yield s
    s.close()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    """The Slack Web API stand-in, where GROUPIE is in the catalog's approver group."""
    from fakes import FakeSlack
    from slack_harness import GROUP, GROUPIE

    with FakeSlack(usergroups={GROUP: [GROUPIE]}) as fake:
        yield fake
