"""PostgreSQL as the store's backend, where it differs from SQLite: its schema, one bot per
database, unreachable servers, a server restart under a running store and bot, and a bot
served end to end (a signed PagerDuty delivery to the Slack thread).

The store and engine tests run on both backends (the `store` and `db_target` fixtures in
conftest.py); these are the rest. The server is real (tests/postgres.py).
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from fakes import FakeSlack
from postgres import Cluster
from slack_harness import APPROVER, Bot, BotProcess, process_env, wait_for, write_catalog
from test_server import PD_SECRET, deliver, triggered

from bot.config import Secret
from bot.errors import ConfigError, StoreError
from bot.store import SCHEMA_VERSION, Store
from bot.store.backend import display, is_postgres
from bot.store.schema import (
    MIGRATIONS,
    POSTGRES_BASELINE,
    POSTGRES_MIGRATIONS,
    TABLES,
    TRANSIENT_TABLES,
)


def _put(store: Store, key: str, alt_key: str | None = None) -> bool:
    return store.inbox_put(
        source="pagerduty",
        key=key,
        alt_key=alt_key,
        incident_id="P1",
        kind="incident.triggered",
        payload={"n": key},
    )


def test_runbook_db_names_a_backend() -> None:
    assert is_postgres("postgresql://bot@db:5432/runbook")
    assert is_postgres("postgres://db/runbook")
    assert not is_postgres("./runbook-bot.db")
    assert not is_postgres("/var/lib/postgresql.db")
    assert display("postgresql://bot:s3cret@db.internal:6432/runbook?sslmode=require") == (
        "postgresql://bot@db.internal:6432/runbook"
    )


def test_the_state_directory_never_derives_from_a_url() -> None:
    from bot.config import Config

    on_postgres = Config(db="postgresql://bot:s3cret@db:5432/runbook")
    assert on_postgres.state_directory == Path("runbook-bot-steps")
    assert Config(db="/var/lib/rb/state.db").state_directory == Path("/var/lib/rb/state-steps")
    assert "s3cret" not in repr(on_postgres)
    assert "db='postgresql://bot@db:5432/runbook'" in repr(on_postgres)


def test_every_migration_after_the_baseline_exists_for_both_backends() -> None:
    later = set(range(POSTGRES_BASELINE + 1, SCHEMA_VERSION + 1))
    assert later == set(POSTGRES_MIGRATIONS), "a migration needs a PostgreSQL step too"
    assert set(MIGRATIONS) == set(range(1, SCHEMA_VERSION + 1))


def test_a_fresh_database_is_created_at_the_current_schema(pg_url: str) -> None:
    store = Store(pg_url)
    assert store.schema_version == SCHEMA_VERSION
    tables = {
        r["table_name"]
        for r in store.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        )
    }
    assert tables == {"meta", *TRANSIENT_TABLES} | {name for name, _ in TABLES}
    # Unique constraints, not memory, dedupe: both keys, across reopening.
    assert _put(store, "pagerduty:event:E1", "pagerduty:delivery:D1")
    assert not _put(store, "pagerduty:event:E2", "pagerduty:delivery:D1")
    store.close()
    again = Store(pg_url)
    assert not _put(again, "pagerduty:event:E1")
    assert [i.key for i in again.inbox_items()] == ["pagerduty:event:E1"]
    again.close()


def test_a_newer_schema_is_refused_with_a_clear_error(pg_url: str) -> None:
    Store(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(StoreError, match="schema version 99, newer than this bot"):
        Store(pg_url)


def test_bots_share_a_postgresql_database(pg_url: str) -> None:
    """Replicas: a second bot's store opens the same database, and what one records the
    other sees (no intake log, no one-bot lock)."""
    first = Store(pg_url, intake_log=True)
    assert first.intake is None  # no intake log: items go straight into the inbox
    second = Store(pg_url, intake_log=True)
    assert _put(first, "pagerduty:event:E1")
    assert not _put(second, "pagerduty:event:E1")  # a retry landing on another replica
    assert [i.key for i in second.inbox_items()] == ["pagerduty:event:E1"]
    second.close()
    first.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_an_unreachable_server_is_named_with_libpqs_reason_and_no_password() -> None:
    port = _free_port()
    with pytest.raises(StoreError) as refused:
        Store(f"postgresql://bot:s3cret@127.0.0.1:{port}/runbook")
    message = str(refused.value)
    assert f"cannot reach the database postgresql://bot@127.0.0.1:{port}/runbook" in message
    assert "Connection refused" in message
    assert "s3cret" not in message


def test_a_role_without_rights_is_told_why_and_its_password_never_shown(
    postgres: Cluster, pg_url: str
) -> None:
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute("CREATE ROLE checker LOGIN PASSWORD 's3cret'")
    url = pg_url.replace("runbook@", "checker:s3cret@")
    with pytest.raises(StoreError) as refused:
        Store(url)
    message = str(refused.value)
    assert message.startswith("cannot prepare the database postgresql://checker@127.0.0.1:")
    assert "permission denied for schema public" in message
    assert "s3cret" not in message


@pytest.fixture
def own_cluster(postgres: Cluster) -> Iterator[Cluster]:
    """A PostgreSQL server of the test's own, to restart (the session's serves the rest)."""
    cluster = Cluster(postgres.bindir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def test_the_store_reconnects_by_itself_after_a_server_restart(own_cluster: Cluster) -> None:
    url = own_cluster.create_database()
    store = Store(url, intake_log=True, busy_timeout=1.0)
    assert _put(store, "pagerduty:event:E1")
    own_cluster.stop_server()
    with pytest.raises(StoreError, match=r"cannot reach the database .*127\.0\.0\.1"):
        store.probe_write()
    with pytest.raises(StoreError, match="cannot reach the database"):
        _put(store, "pagerduty:event:E2")
    own_cluster.start_server()
    wait_for(lambda: _ready(store), timeout=30, what="the store to write again")
    assert _put(store, "pagerduty:event:E2")
    assert [i.key for i in store.inbox_items()] == ["pagerduty:event:E1", "pagerduty:event:E2"]
    store.close()


def _ready(store: Store) -> bool:
    try:
        store.probe_write()
    except StoreError:
        return False
    return True


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    write_catalog(tmp_path)
    return tmp_path


def _bot(catalog: Path, slack: FakeSlack, url: str) -> Bot:
    return Bot(
        catalog,
        slack,
        db=url,
        state_dir=str(catalog / "steps"),
        pagerduty_webhook_secret=Secret(PD_SECRET),
    )


def test_the_bot_serves_a_page_end_to_end_on_postgresql(
    catalog: Path, slack: FakeSlack, pg_url: str
) -> None:
    """A signed PagerDuty delivery → the thread and its steps in Slack → an approval →
    the guarded step runs once; a redelivery changes nothing; a second process cannot
    serve as the same replica."""
    bot = _bot(catalog, slack, pg_url)
    try:
        assert bot.http.get("/readyz").json()["status"] == "ready"
        assert deliver(bot.http, triggered("PPG1")).status_code == 202
        assert deliver(bot.http, triggered("PPG1")).status_code == 202  # a retry: no effect
        bot.settle()
        assert bot.status("check") == "success"
        assert bot.status("guarded") == "awaiting_approval"
        assert bot.react(APPROVER, "white_check_mark").status_code == 200
        wait_for(lambda: bot.status("after") == "success", what="the run to go on")
        bot.settle()
        assert bot.runs() == ["ran"]  # the guarded command ran once
        thread = [c for c in slack.calls_to("chat.postMessage") if c.params.get("thread_ts")]
        assert len(thread) >= 3  # the steps, in the thread
        roots = [c for c in slack.calls_to("chat.postMessage") if not c.params.get("thread_ts")]
        assert len(roots) == 1  # one thread for the incident
        with pytest.raises(ConfigError, match="another process serves replica"):
            _bot(catalog, slack, pg_url)
    finally:
        bot.stop()


def test_readyz_says_503_while_postgresql_is_down_and_the_bot_recovers_by_itself(
    catalog: Path, slack: FakeSlack, own_cluster: Cluster
) -> None:
    bot = _bot(catalog, slack, own_cluster.create_database())
    try:
        assert deliver(bot.http, triggered("PPG1")).status_code == 202
        bot.settle()
        own_cluster.stop_server()
        not_ready = wait_for(
            lambda: (r := bot.http.get("/readyz")).status_code == 503 and r,
            timeout=30,
            what="/readyz to say not ready",
        )
        assert (
            "cannot reach the database postgresql://runbook@127.0.0.1"
            in (not_ready.json()["reason"])
        )
        refused = deliver(bot.http, triggered("PPG2"))
        assert refused.status_code == 503  # not acknowledged: PagerDuty retries
        assert bot.http.get("/healthz").status_code == 200  # alive all along
        own_cluster.start_server()
        wait_for(lambda: bot.http.get("/readyz").status_code == 200, timeout=30, what="ready")
        assert deliver(bot.http, triggered("PPG2")).status_code == 202
        wait_for(lambda: bot.app.store.incident("PPG2"), what="the retried delivery applied")
        bot.settle()
        assert bot.status("check") == "success"
    finally:
        bot.stop()


def test_pagerduty_may_post_to_a_bot_on_postgresql_with_a_pooled_client(
    catalog: Path, slack: FakeSlack, pg_url: str
) -> None:
    """Deliveries from several connections at once are all recorded, each once."""
    import concurrent.futures

    bot = _bot(catalog, slack, pg_url)
    try:
        bodies = [triggered(f"PC{n:02d}") for n in range(20)] * 2
        with (
            httpx.Client(base_url=bot.url, timeout=10) as http,
            concurrent.futures.ThreadPoolExecutor(8) as pool,
        ):
            codes = list(pool.map(lambda b: deliver(http, b).status_code, bodies))
        assert set(codes) == {202}
        items = bot.app.store.inbox_items(source="pagerduty")
        assert sorted(i.incident_id for i in items) == [f"PC{n:02d}" for n in range(20)]
    finally:
        bot.stop()


# --- runbookctl db migrate-to -------------------------------------------------------------


def _sqlite_with_history(path: Path) -> None:
    """A bot's SQLite database: incidents run by the real engine (commands run, a request
    rejected, one still waiting for approval), and a delivery the intake log acknowledged
    but never moved into the inbox (the bot stopped first)."""
    from builders import Clock, action, catalog, py, runbook, step

    from bot.engine import Incident
    from bot.local import LocalRuntime

    store = Store(path)
    clock = Clock(t=1_800_000_000.0)
    ok = action("check-error-rate", py("print('rate => 0.1')"), expect=[("=>", False)])
    flush = action("clear-cache", py("print('OK')"), approval=True, approval_timeout=600)
    cat = catalog(runbook("payments", [step(ok), step(flush)]))
    runtime = LocalRuntime(cat, store, clock=clock, default_env="staging")
    for incident_id in ("P1", "P2", "P3"):
        runtime.open(Incident(id=incident_id, title="5xx", service="payments"))
        clock.advance(30)
    (first,) = store.pending_approvals("P1")
    runtime.decide(first.step_run_id, APPROVER)
    (second,) = store.pending_approvals("P2")
    runtime.decide(second.step_run_id, APPROVER, "reject")
    store.close()
    bot = Store(path, intake_log=True)
    assert bot.inbox_put(
        source="pagerduty",
        key="pagerduty:event:LATE",
        incident_id="P9",
        kind="incident.triggered",
        payload={},
        waiting=True,
    )
    assert bot.intake is not None and bot.intake.count_pending() == 1
    bot.close()


def _ctl(*args: str) -> Any:
    from click.testing import CliRunner

    from runbookctl.cli import cli

    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


_REPORTS = (
    ("report", "overrides"),
    ("report", "actions"),
    ("report", "approvals"),
    ("report", "events", "--limit", "1000"),
    ("runs", "list"),
    ("runs", "show", "P1"),
)


def test_migrate_to_copies_everything_and_reports_read_the_same(
    tmp_path: Path, pg_url: str
) -> None:
    sqlite_db = tmp_path / "state.db"
    _sqlite_with_history(sqlite_db)
    moved = _ctl("db", "migrate-to", pg_url, "--db", str(sqlite_db))
    assert moved.exit_code == 0, moved.output
    assert "set RUNBOOK_DB to it" in moved.output
    for args in _REPORTS:
        before = _ctl(*args, "--db", str(sqlite_db), "--format", "json")
        after = _ctl(*args, "--db", pg_url, "--format", "json")
        assert before.exit_code == after.exit_code == 0, (args, before.output, after.output)
        assert json.loads(after.output) == json.loads(before.output), args

    old, new = Store(sqlite_db), Store(pg_url)
    try:
        for table, _identity in TABLES:
            assert new.query(f"SELECT * FROM {table} ORDER BY 1") == old.query(
                f"SELECT * FROM {table} ORDER BY 1"
            ), table
        waiting = new.pending_approvals()
        assert "P3" in {a.incident_id for a in waiting}
        assert waiting == old.pending_approvals()
        assert "pagerduty:event:LATE" in [i.key for i in new.inbox_items()]  # the intake log's
        # The ids go on after the copied ones.
        top = max(i.id for i in new.inbox_items())
        assert _put(new, "pagerduty:event:AFTER")
        assert new.inbox_items()[-1].id == top + 1
    finally:
        old.close()
        new.close()

    again = _ctl("db", "migrate-to", pg_url, "--db", str(sqlite_db))
    assert again.exit_code == 1
    assert "is not empty (" in again.output and "copies into an empty database only" in again.output


def test_migrate_to_refuses_while_the_bot_runs(tmp_path: Path, pg_url: str) -> None:
    sqlite_db = tmp_path / "state.db"
    running = Store(sqlite_db, intake_log=True)
    try:
        refused = _ctl("db", "migrate-to", pg_url, "--db", str(sqlite_db))
    finally:
        running.close()
    assert refused.exit_code == 1
    assert "stop the bot before moving its database" in refused.output
    target = Store(pg_url)
    assert target.incidents() == []
    target.close()


def test_migrate_to_needs_a_postgresql_url(tmp_path: Path) -> None:
    sqlite_db = tmp_path / "state.db"
    Store(sqlite_db).close()
    refused = _ctl("db", "migrate-to", str(tmp_path / "other.db"), "--db", str(sqlite_db))
    assert refused.exit_code == 1
    assert "is not a PostgreSQL URL" in refused.output


def test_the_installed_bot_serves_postgresql_in_one_process_without_an_intake_log(
    catalog: Path, slack: FakeSlack, pg_url: str
) -> None:
    """`runbook-bot` with RUNBOOK_DB=postgresql://…: the intake front is SQLite's (it
    records into the intake log), so the bot answers PagerDuty itself; a delivery is in
    the inbox when it is acknowledged, and the page runs."""
    env = process_env(
        catalog,
        slack,
        RUNBOOK_DB=pg_url,
        RUNBOOK_STATE_DIR=str(catalog / "steps"),
        PAGERDUTY_WEBHOOK_SECRET=PD_SECRET,
    )
    bot = BotProcess(env)
    try:
        with httpx.Client(base_url=bot.url, timeout=10) as http:
            assert http.get("/readyz").json()["status"] == "ready"
            assert deliver(http, triggered("PPROC")).status_code == 202
            wait_for(lambda: slack.calls_to("chat.postMessage"), timeout=30, what="the thread")
    finally:
        code = bot.terminate()
    assert code == 0, "".join(bot.log)
    assert not any("intake front started" in line for line in bot.log)
    assert not list(catalog.glob("*-intake*"))  # no intake log anywhere
    store = Store(pg_url)
    assert [i.incident_id for i in store.inbox_items(source="pagerduty")] == ["PPROC"]
    assert store.incident("PPROC") is not None
    store.close()


def test_runbookctl_names_an_unreachable_or_foreign_database_without_its_password(
    tmp_path: Path, pg_url: str
) -> None:
    port = _free_port()
    url = f"postgresql://bot:s3cret@127.0.0.1:{port}/runbook"
    for args in (("runs", "list", "--db", url), ("report", "actions", "--db", url)):
        refused = _ctl_raw(*args)
        assert refused.exit_code == 1, args
        assert f"cannot reach the database postgresql://bot@127.0.0.1:{port}/runbook" in (
            refused.output
        )
        assert "s3cret" not in refused.output
    foreign = _ctl_raw("runs", "list", "--db", pg_url)  # a database the bot never opened
    assert foreign.exit_code == 1 and "is not a runbook-bot database" in foreign.output
    sqlite_db = tmp_path / "state.db"
    Store(sqlite_db).close()
    moved = _ctl_raw("db", "migrate-to", url, "--db", str(sqlite_db))
    assert moved.exit_code == 1 and "cannot reach the database" in moved.output
    assert "s3cret" not in moved.output


def _ctl_raw(*args: str) -> Any:
    from click.testing import CliRunner

    from runbookctl.cli import cli

    return CliRunner().invoke(cli, list(args))
