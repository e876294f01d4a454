"""Shared fixtures. Stand-ins for Slack and PagerDuty live in tests/fakes/."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from fakes import FakeSlack

    from bot.store import Store

REPO = Path(__file__).resolve().parent.parent
BUNDLED_CATALOG = REPO / "runbooks"

_PREFIXES = ("SLACK_", "PAGERDUTY_", "RUNBOOK_")
# ... and no cluster: a test of the Kubernetes executor points it at the stand-in itself.
_NAMES = ("PORT", "HOST", "KUBECONFIG", "KUBERNETES_SERVICE_HOST")


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


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    """A fresh store on a real SQLite file (the import waits: lint tests need no store)."""
    from bot.store import Store

    s = Store(db_path)
    yield s
    s.close()


@pytest.fixture
def slack() -> Iterator[FakeSlack]:
    """The Slack Web API stand-in, where GROUPIE is in the catalog's approver group."""
    from fakes import FakeSlack
    from slack_harness import GROUP, GROUPIE

    with FakeSlack(usergroups={GROUP: [GROUPIE]}) as fake:
        yield fake
