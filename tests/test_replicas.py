"""Several replicas on one PostgreSQL database (bot.replicas).

The chaos test kills random replicas of a fleet of real `runbook-bot` processes while
PagerDuty and Slack drive a storm of incidents at random replicas
(tests/replica_harness.py says what is driven and counted). RUNBOOK_CHAOS_KILLS sets
how many kills (default 100). The other tests look at the parts: heartbeats and leases
between real stores, the share of incidents, the order every replica applies items in.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from fakes import FakeSlack
from fault_harness import free_port
from hypothesis import given
from hypothesis import strategies as st
from replica_harness import run_chaos
from slack_harness import APPROVER, Bot, process_env, wait_for, write_catalog
from test_server import PD_SECRET, deliver, triggered

from bot.config import Secret
from bot.replicas import Replicas, responsible
from bot.states import InboxStatus
from bot.store import AlreadyApplied, StepRun, Store

# Read here: the tests' environment is cleaned of RUNBOOK_* before each test.
KILLS = int(os.environ.get("RUNBOOK_CHAOS_KILLS") or 100)


def test_chaos_kill_9_of_random_replicas_in_a_storm(tmp_path: Path, pg_url: str) -> None:
    counts = run_chaos(
        tmp_path, pg_url, replicas=3, incidents=30, kills=KILLS, interval=0.8, seed=20261202
    )
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
        held = wait_for(lambda: _beat(a, "a", "a#2").held, what="a to take the leases")
        assert held == {"outbox": 3, "timers": 3}
    finally:
        a.close()
        b.close()


def test_two_live_processes_cannot_be_one_replica(pg_url: str) -> None:
    store = Store(pg_url)
    try:
        assert not _beat(store, "r0", "r0#1", host="h1").refused
        refused = _beat(store, "r0", "r0#2", host="h2")
        assert refused.refused == "r0 is served by a process on h1"
        assert _beat(store, "r0", "r0#3", host="h1").refused  # the same host: still alive
        store.leave("r0", "r0#1")  # the first stops: the name is free at once
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


# --- a replica that dies for good: its steps --------------------------------------------------


def _its_incident(replica: str, replicas: tuple[str, ...], prefix: str) -> str:
    """An incident id the share gives to `replica` among `replicas`."""
    return next(
        f"{prefix}{n}" for n in range(1000) if responsible(f"{prefix}{n}", replicas) == replica
    )


def _replica(root: Path, slack: FakeSlack, url: str, name: str) -> tuple[Bot, Replicas]:
    """Replica `name` in this process (its parts within reach) on the database `url`."""
    bot = Bot(
        root,
        slack,
        db=url,
        replica_id=name,
        state_dir=str(root / "state"),
        pagerduty_webhook_secret=Secret(PD_SECRET),
    )
    assert bot.app.replicas is not None
    return bot, bot.app.replicas


class _Pair:
    """Replica b in this process (its parts within reach), replica a a real `runbook-bot`
    process that the test kills; one PostgreSQL database, one Slack stand-in."""

    def __init__(self, root: Path, slack: FakeSlack, url: str) -> None:
        self.root = root
        self.b, replicas = _replica(root, slack, url, "b")
        # b came first: it holds the leases; a only takes its share of incidents
        wait_for(lambda: replicas.holds("outbox"), what="b to hold the outbox lease")
        # a real process, its output in a file: its step supervisors, which outlive it,
        # keep what it had as stderr
        env = process_env(
            root,
            slack,
            RUNBOOK_DB=url,
            RUNBOOK_REPLICA_ID="a",
            RUNBOOK_STATE_DIR=str(root / "state"),
            RUNBOOK_SLACK_PACING="off",
            PORT=str(free_port()),
        )
        with (root / "a.log").open("ab") as log:
            self.a = subprocess.Popen(
                [str(Path(sys.executable).parent / "runbook-bot")], env=env, stdout=log, stderr=log
            )
        wait_for(self._both_alive, what="both replicas to be alive")

    def _both_alive(self) -> bool:
        rows = self.b.app.store.query("SELECT id FROM replicas WHERE seen_at > 0 ORDER BY id")
        return [r["id"] for r in rows] == ["a", "b"]

    def close(self) -> None:
        (self.root / "gate").touch()  # a command still waiting may end
        self.kill_a()
        self.b.stop()

    def kill_a(self) -> None:
        if self.a.poll() is None:
            self.a.kill()
        self.a.wait(10)


def _started_on_a(pair: _Pair, incident_id: str) -> StepRun:
    """The guarded step of `incident_id`, approved through b and started by a."""
    b = pair.b
    replicas = b.app.replicas
    assert replicas is not None
    wait_for(lambda: not replicas.mine(incident_id), what="b to count a among the living")
    assert deliver(b.http, triggered(incident_id)).status_code == 202
    wait_for(lambda: b.step_runs("guarded", incident_id), what="the guarded step")
    assert b.react(APPROVER, "white_check_mark", incident_id=incident_id).status_code == 200
    wait_for(lambda: b.runs() == ["ran"], what="the command to start")
    step = b.step_run("guarded", incident_id)
    assert (step.status, step.owner) == ("running", "a")
    return step


def test_a_result_recorded_after_its_replica_died_for_good_is_used(
    tmp_path: Path, slack: FakeSlack, pg_url: str
) -> None:
    write_catalog(tmp_path)
    (tmp_path / "gate").unlink()  # the guarded command waits for it
    pair = _Pair(tmp_path, slack, pg_url)
    try:
        incident_id = _its_incident("a", ("a", "b"), "PDEAD")
        step = _started_on_a(pair, incident_id)
        pair.kill_a()  # for good; its step supervisor lives on
        (tmp_path / "gate").touch()  # the command ends: the supervisor records the result
        done = wait_for(
            lambda: (s := pair.b.app.store.step_run(step.id)) and s.status != "running" and s,
            timeout=30,
            what="b to apply the result a's supervisor recorded",
        )
        assert done.status == "success"
        assert pair.b.runs() == ["ran"]  # never run again
        wait_for(lambda: pair.b.step_run("after", incident_id).status == "success")
    finally:
        pair.close()


def test_a_step_whose_replica_and_supervisor_died_is_interrupted_not_run_again(
    tmp_path: Path, slack: FakeSlack, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bot.server

    monkeypatch.setattr(bot.server, "RECORD_GRACE_SECONDS", 0.0)
    write_catalog(tmp_path)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(catalog.read_text().replace("timeout: 20s", "timeout: 3s"))
    (tmp_path / "gate").unlink()
    pair = _Pair(tmp_path, slack, pg_url)
    try:
        incident_id = _its_incident("a", ("a", "b"), "PLOST")
        step = _started_on_a(pair, incident_id)
        pair.kill_a()
        for started in (tmp_path / "state" / "a").glob("*.started"):
            os.kill(json.loads(started.read_text())["pid"], signal.SIGKILL)  # the supervisor
        done = wait_for(
            lambda: (s := pair.b.app.store.step_run(step.id)) and s.status != "running" and s,
            timeout=30,
            what="b to interrupt the step once its result could no longer come",
        )
        assert done.status == "interrupted"
        assert "replica a stopped while it ran" in done.detail
        assert pair.b.runs() == ["ran"]  # never run again
    finally:
        pair.close()


# --- a replica cut off from the database ----------------------------------------------------


def test_a_replica_cut_off_from_the_database_stops_and_comes_back_by_itself(
    tmp_path: Path, slack: FakeSlack, pg_url: str
) -> None:
    """Replica a reaches PostgreSQL through a relay the test cuts: a answers 503 on
    /readyz and lets its leases go, b takes them and a's share of the incidents; once
    the relay is back, a is ready again and takes its share, without a restart."""
    from fakes import TcpProxy

    write_catalog(tmp_path)
    port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
    proxy = TcpProxy("127.0.0.1", port)
    a, a_replicas = _replica(tmp_path, slack, proxy.url(pg_url), "a")
    wait_for(lambda: a_replicas.holds("outbox") and a_replicas.holds("timers"))
    b, b_replicas = _replica(tmp_path, slack, pg_url, "b")
    try:
        first = _its_incident("a", ("a", "b"), "PCUT")
        wait_for(lambda: not b_replicas.mine(first), what="b to count a among the living")
        proxy.cut()
        wait_for(lambda: a.http.get("/readyz").status_code == 503, what="a to be not ready")
        assert "cannot reach the database" in a.http.get("/readyz").json()["reason"]
        wait_for(lambda: not a_replicas.holds("outbox"), what="a to stop sending")
        wait_for(
            lambda: b_replicas.holds("outbox") and b_replicas.holds("timers"),
            timeout=10,
            what="b to take the leases within 10 s",
        )
        # a's share is b's now: an incident that was a's is applied by b, posted by b
        assert deliver(b.http, triggered(first)).status_code == 202
        check = wait_for(
            lambda: (s := b.step_runs("check", first)) and s[-1].status == "success" and s[-1]
        )
        assert check.owner == "b"
        wait_for(lambda: b.app.store.message_ref(f"root:{first}"), what="b to post the thread")
        proxy.restore()
        wait_for(lambda: a.http.get("/readyz").status_code == 200, timeout=30, what="a ready")
        wait_for(lambda: not b_replicas.mine(first), timeout=10, what="a back among the living")
        second = _its_incident("a", ("a", "b"), "PBACK")
        assert deliver(b.http, triggered(second)).status_code == 202
        check = wait_for(
            lambda: (s := b.step_runs("check", second)) and s[-1].status == "success" and s[-1]
        )
        assert check.owner == "a"  # a applies its share again
        roots = [c for c in slack.calls_to("chat.postMessage") if not c.params.get("thread_ts")]
        assert len(roots) == 2  # one thread per incident
    finally:
        a.stop()
        b.stop()
        proxy.close()


def test_a_replica_finds_its_incidents_behind_a_backlog_of_others(store: Store) -> None:
    """Heads of incidents another replica is slow to apply do not hide this one's."""
    for n in range(40):
        store.inbox_put(
            source="pagerduty", key=f"k{n}", incident_id=f"OTHER{n}", kind="incident.triggered",
            payload={},
        )  # fmt: skip
    store.inbox_put(
        source="pagerduty", key="mine", incident_id="MINE", kind="incident.triggered", payload={}
    )
    ready = store.inbox_ready(1, accept=lambda incident: incident == "MINE")
    assert [item.incident_id for item in ready] == ["MINE"]


def test_a_replica_whose_name_another_process_took_says_it_is_not_ready(
    tmp_path: Path, slack: FakeSlack, pg_url: str
) -> None:
    write_catalog(tmp_path)
    bot, replicas = _replica(tmp_path, slack, pg_url, "b")
    try:
        assert bot.http.get("/readyz").status_code == 200
        with psycopg.connect(pg_url, autocommit=True) as conn:  # another process, beating
            conn.execute(
                "UPDATE replicas SET holder = 'b#other', host = 'elsewhere', "
                "seen_at = EXTRACT(EPOCH FROM clock_timestamp()) + 3600 WHERE id = 'b'"
            )
        wait_for(lambda: bot.http.get("/readyz").status_code == 503, what="not ready")
        reason = bot.http.get("/readyz").json()["reason"]
        assert reason == "not serving as a replica: b is served by a process on elsewhere"
        assert not replicas.holds("outbox") and not replicas.mine("P1")
        with psycopg.connect(pg_url, autocommit=True) as conn:  # it stopped
            conn.execute("UPDATE replicas SET seen_at = 0 WHERE id = 'b'")
        wait_for(lambda: bot.http.get("/readyz").status_code == 200, what="ready again")
        wait_for(lambda: replicas.holds("outbox"), what="the leases back")
    finally:
        bot.stop()
