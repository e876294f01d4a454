"""bot.guard: the Python decorators run the function only when the policy allows it.

"Ran" is a file the guarded function writes: a real side effect, not a mock.
"""

from __future__ import annotations

import io
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bot import guard
from bot.catalog.model import Environment, Settings
from bot.errors import ApprovalDenied, PolicyViolation
from bot.store import Store


class Scripted:
    """A confirmer that answers what it is told and remembers what it was asked."""

    def __init__(self, verdict: guard.Verdict, delay: float = 0.0) -> None:
        self.verdict = verdict
        self.delay = delay
        self.asked: list[tuple[str, float]] = []

    def confirm(self, message: str, timeout: float) -> guard.Verdict:
        self.asked.append((message, timeout))
        time.sleep(self.delay)
        return self.verdict


@pytest.fixture(autouse=True)
def fresh_guard() -> Iterator[None]:
    guard.reset()
    yield
    guard.reset()


@pytest.fixture
def marker(tmp_path: Path) -> Path:
    return tmp_path / "cache-cleared"


def make_clear_cache(marker: Path) -> Any:
    @guard.require_confirmation(message="Clear cache?", timeout=120)
    @guard.allowed_envs(["staging", "dev"])
    def clear_cache(cmd: str) -> str:
        with marker.open("a") as f:
            f.write(cmd + "\n")
        return f"ran {cmd}"

    return clear_cache


def runs(marker: Path) -> list[str]:
    return marker.read_text().splitlines() if marker.exists() else []


# --- the example ---------------------------------------------------------------------


def test_outside_the_allowed_envs_it_raises_without_running_or_asking(marker: Path) -> None:
    asker = Scripted("approved")
    guard.configure(env="prod", confirmer=asker)
    clear_cache = make_clear_cache(marker)
    with pytest.raises(PolicyViolation) as raised:
        clear_cache("FLUSHDB")
    message = str(raised.value)
    assert "clear_cache() may not run in environment prod" in message
    assert "allowed in: staging, dev" in message
    assert not isinstance(raised.value, ApprovalDenied)
    assert runs(marker) == []
    assert asker.asked == []  # nobody is bothered about a call that cannot run


def test_inside_it_asks_and_runs_once_confirmed(marker: Path) -> None:
    asker = Scripted("approved")
    guard.configure(env="staging", confirmer=asker)
    clear_cache = make_clear_cache(marker)
    assert clear_cache("FLUSHDB") == "ran FLUSHDB"
    assert runs(marker) == ["FLUSHDB"]
    assert asker.asked == [("Clear cache?", 120)]
    assert clear_cache.__name__ == "clear_cache"  # wraps keeps the identity


@pytest.mark.parametrize("verdict", ["rejected", "expired"])
def test_rejected_or_expired_raises_approval_denied(marker: Path, verdict: guard.Verdict) -> None:
    guard.configure(env="dev", confirmer=Scripted(verdict))
    with pytest.raises(ApprovalDenied, match="did not run"):
        make_clear_cache(marker)("FLUSHDB")
    assert runs(marker) == []


def test_an_approval_that_came_after_the_timeout_does_not_count(marker: Path) -> None:
    guard.configure(env="dev", confirmer=Scripted("approved", delay=0.2))

    @guard.require_confirmation(message="Go?", timeout=0.05)
    def act() -> None:
        marker.write_text("ran")

    with pytest.raises(ApprovalDenied, match="expired"):
        act()
    assert not marker.exists()


def test_an_unexpected_answer_is_a_rejection(marker: Path) -> None:
    guard.configure(env="dev", confirmer=Scripted("yes"))  # type: ignore[arg-type]
    with pytest.raises(ApprovalDenied, match="rejected"):
        make_clear_cache(marker)("x")
    assert runs(marker) == []


def test_without_a_confirmer_it_fails_closed(marker: Path) -> None:
    guard.configure(env="dev")
    with pytest.raises(PolicyViolation, match="no confirmer is configured"):
        make_clear_cache(marker)("x")
    assert runs(marker) == []


def test_the_environment_is_read_at_each_call(
    marker: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @guard.allowed_envs(["staging"])
    def touch() -> None:
        marker.write_text("ran")

    with pytest.raises(PolicyViolation, match="none: set RUNBOOK_ENV"):
        touch()
    monkeypatch.setenv("RUNBOOK_ENV", "dev")
    with pytest.raises(PolicyViolation, match="environment dev"):
        touch()
    monkeypatch.setenv("RUNBOOK_ENV", "staging")
    touch()
    assert marker.read_text() == "ran"
    guard.configure(env="dev")  # configure wins over the variable
    with pytest.raises(PolicyViolation):
        touch()


def test_decorator_order_does_not_matter(marker: Path) -> None:
    asker = Scripted("approved")
    guard.configure(env="prod", confirmer=asker)

    @guard.allowed_envs(["staging"])
    @guard.require_confirmation(message="Clear?", timeout=5)
    def clear() -> None:
        marker.write_text("ran")

    with pytest.raises(PolicyViolation):
        clear()
    assert asker.asked == [] and not marker.exists()
    guard.configure(env="staging")
    clear()
    assert marker.read_text() == "ran" and len(asker.asked) == 1


# --- the same policy as catalog actions ---------------------------------------------------------


def test_production_needs_a_promotion_record_like_a_catalog_action(marker: Path) -> None:
    guard.configure(env="prod")

    @guard.allowed_envs(["staging", "prod"])
    def unpromoted() -> None:
        marker.write_text("ran")

    with pytest.raises(PolicyViolation, match="production environment: pass its promotion"):
        unpromoted()

    @guard.allowed_envs(["prod"], promotions={"prod": "http://not-https.example"})
    def weak_evidence() -> None:
        marker.write_text("ran")

    with pytest.raises(PolicyViolation):
        weak_evidence()
    assert not marker.exists()

    @guard.allowed_envs(["prod"], promotions={"prod": "https://wiki.example.com/promotion/42"})
    def promoted() -> None:
        marker.write_text("ran")

    promoted()
    assert marker.read_text() == "ran"


def test_environments_come_from_the_catalog_settings(marker: Path) -> None:
    @guard.allowed_envs(["qa"])
    def touch() -> None:
        marker.write_text("ran")

    guard.configure(env="qa")
    with pytest.raises(PolicyViolation, match="not declared in the catalog"):
        touch()
    guard.configure(settings=Settings(environments=(Environment("qa"), Environment("live", True))))
    touch()
    assert marker.read_text() == "ran"


def test_invalid_declarations_fail_at_import_time() -> None:
    with pytest.raises(ValueError):
        guard.allowed_envs([])
    with pytest.raises(ValueError):
        guard.require_confirmation("x", timeout=0)


def test_decisions_are_audited_when_a_store_is_configured(marker: Path, db_target: str) -> None:
    store = Store(db_target)  # on each backend
    guard.configure(env="staging", confirmer=Scripted("approved"), store=store, service="payments")
    clear_cache = make_clear_cache(marker)
    clear_cache("one")
    guard.configure(confirmer=Scripted("rejected"))
    with pytest.raises(ApprovalDenied):
        clear_cache("two")
    guard.configure(env="prod")
    with pytest.raises(PolicyViolation):
        clear_cache("three")

    @guard.allowed_envs(["prod"], promotions={"prod": "https://e.example/1"}, action="boom")
    def boom() -> None:
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        boom()
    rows = store.events()
    store.close()
    name = "test_guard.make_clear_cache.<locals>.clear_cache"
    assert [(r["action"], r["env"], r["status"]) for r in rows] == [
        (name, "staging", "requires_manual"),
        (name, "staging", "approved"),
        (name, "staging", "executed"),
        (name, "staging", "succeeded"),
        (name, "staging", "requires_manual"),
        (name, "staging", "rejected"),
        (name, "prod", "blocked"),
        ("boom", "prod", "executed"),
        ("boom", "prod", "failed"),
    ]
    assert {r["service"] for r in rows} == {"payments"}
    assert runs(marker) == ["one"]


# --- confirmers ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("typed", "verdict"),
    [
        ("y\n", "approved"),
        ("YES\n", "approved"),
        ("n\n", "rejected"),
        ("\n", "rejected"),
        ("", "rejected"),
    ],
)
def test_console_confirmer_answers(typed: str, verdict: str) -> None:
    out = io.StringIO()
    assert guard.ConsoleConfirmer(io.StringIO(typed), out).confirm("Clear cache?", 5) == verdict
    assert out.getvalue().startswith("Clear cache? [y/N] (expires in 5s): ")


def test_console_confirmer_expires_on_a_silent_terminal(marker: Path) -> None:
    read_end, write_end = os.pipe()
    out = io.StringIO()
    with os.fdopen(read_end) as stdin:
        guard.configure(env="dev", confirmer=guard.ConsoleConfirmer(stdin, out))

        @guard.require_confirmation(message="Clear cache?", timeout=0.2)
        def clear() -> None:
            marker.write_text("ran")

        started = time.monotonic()
        with pytest.raises(ApprovalDenied, match="expired"):
            clear()
        assert 0.15 < time.monotonic() - started < 2
        os.write(write_end, b"yes\n")
        assert guard.ConsoleConfirmer(stdin, out).confirm("again?", 2) == "approved"
    os.close(write_end)
    assert "no answer in time" in out.getvalue()
    assert not marker.exists()
