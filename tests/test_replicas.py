"""Several replicas on one PostgreSQL database (bot.replicas).

The chaos test kills random replicas of a fleet of real `runbook-bot` processes while
PagerDuty and Slack drive a storm of incidents at random replicas
(tests/replica_harness.py says what is driven and counted). RUNBOOK_CHAOS_KILLS sets
how many kills (default 100). The other tests look at the parts: heartbeats and leases
between real stores, the share of incidents, the order every replica applies items in.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from replica_harness import run_chaos

from bot.replicas import responsible
from bot.states import InboxStatus
from bot.store import AlreadyApplied, Store

# Read here: the tests' environment is cleaned of RUNBOOK_* before each test.
KILLS = int(os.environ.get("RUNBOOK_CHAOS_KILLS") or 100)


def test_chaos_kill_9_of_random_replicas_in_a_storm(tmp_path: Path, pg_url: str) -> None:
    counts = run_chaos(tmp_path, pg_url, replicas=3, incidents=40, kills=KILLS, seed=20261202)
    print(counts.summary())
    assert counts.kills == KILLS
    assert counts.steps_run_twice == 0
    assert counts.deliveries_acked == counts.incidents
    assert counts.deliveries_lost == 0
    assert counts.approvals_lost == 0
    assert counts.duplicate_roots == 0
    assert counts.steps_posted_twice == 0
    assert counts.results_lost == 0
    assert counts.notes_lost == counts.notes_duplicated == 0
    assert counts.unfinished == []
    assert counts.steps_run == 3 * counts.incidents
    # every kill of a lease holder was followed by a takeover within 10 s
    assert counts.takeovers, "no kill hit a lease holder"
    assert max(counts.takeovers) <= 10.0, sorted(counts.takeovers)


# --- heartbeats and leases, between real stores ---------------------------------------------


def _beat(store: Store, replica: str, holder: str, host: str = "h1", ttl: float = 5.0):  # type: ignore[no-untyped-def]
    return store.beat(
        replica, holder, host=host, leases=("outbox", "timers"), ttl=ttl, dead_after=5.0
    )


def test_a_lease_has_one_holder_until_it_lapses_or_is_given_up(pg_url: str) -> None:
    a, b = Store(pg_url), Store(pg_url)
    try:
        first = _beat(a, "a", "a#1")
        assert first.held == {"outbox": 1, "timers": 1}
        second = _beat(b, "b", "b#1")
        assert second.held == {}  # a holds both
        assert second.alive == ("a", "b")
        assert _beat(a, "a", "a#1").held == {"outbox": 1, "timers": 1}  # renewed, same fence
        a.leave("a", "a#1")  # a stops cleanly: b takes both at once, with a new fence
        taken = _beat(b, "b", "b#1")
        assert taken.held == {"outbox": 2, "timers": 2}
        assert taken.alive == ("b",)
        # b dies without a word: its leases lapse (a short lease here), then a takes them
        assert _beat(b, "b", "b#1", ttl=0.2).held == {"outbox": 2, "timers": 2}
        assert _beat(a, "a", "a#2").held == {}
        deadline = time.monotonic() + 10
        while not (held := _beat(a, "a", "a#2").held) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert held == {"outbox": 3, "timers": 3}
    finally:
        a.close()
        b.close()


def test_two_live_processes_on_two_hosts_cannot_be_one_replica(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        assert not _beat(store, "r0", "r0#1", host="h1").refused
        refused = _beat(store, "r0", "r0#2", host="h2")
        assert refused.refused == "r0 is served by a process on h1"
        # the same host: the old process is gone (its state directory's lock says so)
        assert not _beat(store, "r0", "r0#3", host="h1").refused
    finally:
        store.close()


# --- the share of incidents ---------------------------------------------------------------


@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=2, max_size=6, unique=True),
    st.lists(st.text(min_size=1, max_size=20), min_size=1, max_size=50),
)
def test_when_a_replica_dies_only_its_incidents_move(
    replicas: list[str], incidents: list[str]
) -> None:
    alive = tuple(replicas)
    dead = replicas[0]
    survivors = tuple(replicas[1:])
    for incident in incidents:
        before = responsible(incident, alive)
        after = responsible(incident, survivors)
        assert after in survivors
        if before != dead:
            assert after == before


# --- the order items are applied in, whoever applies them -----------------------------------


def test_an_item_is_applied_only_after_the_older_items_of_its_incident(store: Store) -> None:
    for key in ("first", "second"):
        store.inbox_put(source="slack", key=key, incident_id="P1", kind="step.pause", payload={})
    first, second = store.inbox_items()
    with pytest.raises(AlreadyApplied), store.unit() as u:
        u.finish_item(second, InboxStatus.DONE)  # out of turn: rolled back
    with store.unit() as u:
        u.finish_item(first, InboxStatus.DONE)
    with store.unit() as u:
        u.finish_item(second, InboxStatus.DONE)  # its turn now
    with pytest.raises(AlreadyApplied), store.unit() as u:
        u.finish_item(second, InboxStatus.DONE)  # applied already
    assert [i.status for i in store.inbox_items()] == [InboxStatus.DONE] * 2
