"""The database schema and its migrations (schema version in ``meta``), for SQLite and
PostgreSQL (the PostgreSQL part, and how a migration covers both, is at the end).

Tables:
  incidents          one row per PagerDuty incident (or simulated one)
  runs               a runbook run of an incident: phase 'main' or 'on_resolve'
  step_runs          one attempt of one step; claimed atomically before it runs
  approvals          one approval request per guarded step run, with its deadline
  inbox              everything that can change an incident, deduplicated, in receipt order
  outbox             every effect a change causes (Slack messages, PagerDuty write-back),
                     committed with the change and delivered by the senders
  automation_events  the audit log: one row per thing that happened to a step, with its
                     origin (the bot, or `runbookctl simulate` / `test`)

  catalogs           snapshots of the good catalogs the bot served, by version

Migrations 1 to 3 built the first version's tables; 4 replaced its delivery queue and
in-memory message bookkeeping with the inbox and the outbox; 5 keeps served catalogs; 6
marks each audit row with its origin (the bot, `runbookctl simulate` or `runbookctl test`);
7 adds the two-person rule (approvals.required, approved_by, starter, self_approval) and
who started a manual run (incidents.started_by); 8 adds pull runners: their tokens
(hashed, revocable), the steps handed to them and the refusals on either side; 9 indexes
step runs by action and start, for the actions' limits.

  runner_tokens      one row per pull runner token: its pool, its sha256, when revoked
  runner_jobs        a claimed step for a runner pool: its signed payload, queued or
                     leased to a runner until its lease lapses; deleted once it ended
  runner_refusals    the event log of refusals: a token the bot refused, a payload a
                     runner refused (bad signature, expired, replayed, not allowed)
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable

import sqlite_utils

SCHEMA_VERSION = 10


def _migration_1(db: sqlite_utils.Database) -> None:
    db.table("incidents").create(
        {
            "id": str,
            "title": str,
            "service": str,
            "service_id": str,
            "urgency": str,
            "priority": str,
            "env": str,
            "details": str,  # JSON
            "link": str,
            "status": str,
            "runbook_id": str,
            "catalog_commit": str,
            "channel": str,
            "thread_ts": str,
            "created_at": float,
            "updated_at": float,
            "resolved_at": float,
        },
        pk="id",
        not_null={"id", "status"},
    )
    db.table("runs").create(
        {
            "id": int,
            "incident_id": str,
            "runbook_id": str,
            "phase": str,
            "status": str,
            "cursor": int,
            "rollback_of": int,  # index of the failed step whose rollback is running
            "catalog_commit": str,
            "started_at": float,
            "finished_at": float,
        },
        pk="id",
        foreign_keys=[("incident_id", "incidents", "id")],
    )
    db.table("runs").create_index(["incident_id", "phase"], unique=True)
    db.table("step_runs").create(
        {
            "id": int,
            "run_id": int,
            "incident_id": str,
            "step_index": int,
            "step_id": str,
            "action": str,
            "attempt": int,
            "status": str,
            "decision": str,  # auto | needs_approval | blocked
            "reason": str,
            "command": str,
            "exit_code": int,
            "output": str,
            "detail": str,
            "channel": str,
            "message_ts": str,
            "claimed_by": str,
            "created_at": float,
            "started_at": float,
            "finished_at": float,
            "duration": float,
            "catalog_commit": str,
        },
        pk="id",
        foreign_keys=[("run_id", "runs", "id"), ("incident_id", "incidents", "id")],
    )
    db.table("step_runs").create_index(["run_id", "step_index", "attempt"], unique=True)
    db.table("step_runs").create_index(["message_ts"])
    db.table("step_runs").create_index(["status"])
    db.table("approvals").create(
        {
            "id": int,
            "step_run_id": int,
            "incident_id": str,
            "action": str,
            "status": str,
            "approvers": str,  # JSON {"users": [...], "groups": [...]}
            "requested_at": float,
            "expires_at": float,
            "paused_at": float,
            "paused_by": str,
            "decided_by": str,
            "decided_at": float,
            "channel": str,
            "message_ts": str,
            "catalog_commit": str,
        },
        pk="id",
        foreign_keys=[("step_run_id", "step_runs", "id")],
    )
    db.table("approvals").create_index(["step_run_id"], unique=True)
    db.table("approvals").create_index(["status", "expires_at"])
    db.table("deliveries").create(
        {
            "id": str,
            "source": str,
            "event_id": str,
            "event_type": str,
            "incident_id": str,
            "payload": str,
            "status": str,
            "attempts": int,
            "error": str,
            "received_at": float,
            "processed_at": float,
        },
        pk="id",
    )
    db.table("deliveries").create_index(["source", "event_id"], unique=True)
    db.table("deliveries").create_index(["status", "received_at"])
    db.table("automation_events").create(
        {
            "id": int,
            "ts": float,
            "incident_id": str,
            "service": str,
            "runbook_id": str,
            "step_id": str,
            "action": str,
            "env": str,
            "status": str,
            "actor": str,
            "detail": str,
            "catalog_commit": str,
        },
        pk="id",
    )
    db.table("automation_events").create_index(["status", "action"])
    db.table("automation_events").create_index(["incident_id"])
    db.table("automation_events").create_index(["ts"])


def _migration_2(db: sqlite_utils.Database) -> None:
    db.table("deliveries").create_index(["source", "incident_id", "status"])


def _migration_3(db: sqlite_utils.Database) -> None:
    db.execute("ALTER TABLE deliveries ADD COLUMN catalog_commit TEXT")


_INBOX = """
CREATE TABLE inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- receipt order
    source TEXT NOT NULL,                   -- pagerduty | slack | timer | executor | bot
    key TEXT NOT NULL UNIQUE,               -- deduplication: a second put changes nothing
    alt_key TEXT UNIQUE,                    -- a second deduplication key (a delivery id)
    incident_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,                  -- JSON, parsed at the edge
    received_at REAL NOT NULL,              -- timeliness is judged at receipt
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    detail TEXT,
    catalog_commit TEXT,
    processed_at REAL
)
"""

_OUTBOX = """
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- delivery order within a lane
    incident_id TEXT NOT NULL,
    target TEXT NOT NULL,                   -- slack | pagerduty
    lane TEXT NOT NULL,                     -- a Slack channel, an incident's write-back, …
    kind TEXT NOT NULL,
    key TEXT,                               -- the message this is about: root:P1, step:42
    payload TEXT NOT NULL,                  -- JSON: the rendering to send
    version INTEGER NOT NULL DEFAULT 1,     -- bumped when a newer rendering replaces it
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL DEFAULT 0,        -- not before (retry back-off, Retry-After)
    error TEXT,
    ts TEXT,                                -- the Slack message, once posted
    posted_channel TEXT,                    -- the channel id Slack answered with
    created_at REAL NOT NULL,
    sent_at REAL
)
"""


def _migration_4(db: sqlite_utils.Database) -> None:
    conn = db.conn
    conn.execute(_INBOX)
    conn.execute("CREATE INDEX idx_inbox_queue ON inbox (status, incident_id, id)")
    conn.execute(_OUTBOX)
    conn.execute("CREATE INDEX idx_outbox_queue ON outbox (status, lane, id)")
    conn.execute("CREATE INDEX idx_outbox_key ON outbox (key)")
    conn.execute("CREATE INDEX idx_outbox_ts ON outbox (ts)")
    conn.execute("ALTER TABLE incidents ADD COLUMN state_changed_at TEXT")
    conn.execute("ALTER TABLE step_runs ADD COLUMN runner TEXT")
    conn.execute("ALTER TABLE approvals ADD COLUMN fingerprint TEXT")
    _never_started_steps(conn)
    _messages_into_outbox(conn)
    _deliveries_into_inbox(conn)
    _repairs(conn)
    conn.execute("DROP INDEX idx_step_runs_message_ts")
    for column in ("message_ts", "channel", "claimed_by"):
        conn.execute(f"ALTER TABLE step_runs DROP COLUMN {column}")
    for column in ("message_ts", "channel"):
        conn.execute(f"ALTER TABLE approvals DROP COLUMN {column}")
    conn.execute("DROP TABLE deliveries")


NEVER_STARTED = (
    "the bot stopped before this step started; it was not run. Run it by hand if it is "
    "still needed."
)


def _never_started_steps(conn: sqlite3.Connection) -> None:
    """Steps the first version left between two commits, never started:

      * created `pending` (automatic steps were created, then claimed);
      * approved, not claimed yet (`approved`);
      * approved, while the step still awaits approval (it committed the approval and
        the step's status in two transactions): nobody can approve it again, and no
        deadline applies to it any more.

    None is started after the upgrade: each is handed to the engine as interrupted (a
    queued ``step.interrupted`` item, applied before anything received later), so the
    thread says so and the run escalates like any interruption.

    Until that item is applied the step reads ``running`` with no runner, the state an
    interrupted claim has; the start-up repair reports it under the same inbox key
    (``step:<id>:<attempt>:end``), so it is interrupted once, with this item's reason.
    """
    rows = conn.execute(
        "SELECT s.id, s.attempt, s.incident_id, s.created_at, s.catalog_commit, r.phase "
        "FROM step_runs s JOIN runs r ON r.id = s.run_id "
        "LEFT JOIN approvals a ON a.step_run_id = s.id "
        "WHERE s.status IN ('pending', 'approved') "
        "OR (s.status = 'awaiting_approval' AND a.status = 'approved') ORDER BY s.id"
    ).fetchall()
    for step_run_id, attempt, incident_id, created_at, catalog_commit, phase in rows:
        conn.execute(
            "UPDATE step_runs SET status = 'running', started_at = NULL WHERE id = ?",
            (step_run_id,),
        )
        conn.execute(
            "INSERT INTO inbox (source, key, incident_id, kind, payload, received_at, status, "
            "catalog_commit) VALUES ('executor', ?, ?, 'step.interrupted', ?, ?, 'queued', ?) "
            "ON CONFLICT DO NOTHING",
            (
                f"step:{step_run_id}:{attempt or 1}:end",
                incident_id,
                json.dumps(
                    {
                        "step_run_id": step_run_id,
                        "attempt": attempt or 1,
                        "phase": phase or "main",
                        "detail": NEVER_STARTED,
                    }
                ),
                created_at or 0.0,
                catalog_commit,
            ),
        )


def _repairs(conn: sqlite3.Connection) -> None:
    """Open incidents the first version left half-shown or half-decided get a repair item
    (applied after everything received before the upgrade): a thread root or a step
    message lost in a Slack outage is posted, a step still waiting on a request that was
    already rejected, expired or cancelled is settled, and the run goes on."""
    rows = conn.execute(
        "SELECT i.id, i.created_at, i.catalog_commit FROM incidents i WHERE i.status = 'open' "
        "AND (i.thread_ts IS NULL "
        "OR EXISTS (SELECT 1 FROM step_runs s WHERE s.incident_id = i.id "
        "AND s.message_ts IS NULL) "
        "OR EXISTS (SELECT 1 FROM step_runs s JOIN approvals a ON a.step_run_id = s.id "
        "WHERE s.incident_id = i.id AND s.status = 'awaiting_approval' "
        "AND a.status IN ('rejected', 'expired', 'cancelled'))) ORDER BY i.created_at"
    ).fetchall()
    for incident_id, created_at, catalog_commit in rows:
        conn.execute(
            "INSERT INTO inbox (source, key, incident_id, kind, payload, received_at, status, "
            "catalog_commit) VALUES ('bot', ?, ?, 'incident.repair', '{}', "
            "(SELECT coalesce(max(received_at), ?) FROM inbox), 'queued', ?) "
            "ON CONFLICT DO NOTHING",
            (f"repair:schema-4:{incident_id}", incident_id, created_at or 0.0, catalog_commit),
        )


def _messages_into_outbox(conn: sqlite3.Connection) -> None:
    """Messages posted by the first version become sent outbox rows: reactions on them
    still find their step, and later updates find their `ts`."""
    conn.execute(
        "INSERT INTO outbox (incident_id, target, lane, kind, key, payload, status, ts, "
        "posted_channel, created_at, sent_at) "
        "SELECT id, 'slack', 'slack:' || channel, 'post_incident', 'root:' || id, '{}', "
        "'sent', thread_ts, channel, created_at, created_at FROM incidents "
        "WHERE thread_ts IS NOT NULL"
    )
    conn.execute(
        "INSERT INTO outbox (incident_id, target, lane, kind, key, payload, status, ts, "
        "posted_channel, created_at, sent_at) "
        "SELECT incident_id, 'slack', 'slack:' || channel, 'post_step', 'step:' || id, '{}', "
        "'sent', message_ts, channel, created_at, created_at FROM step_runs "
        "WHERE message_ts IS NOT NULL"
    )


_REACTION_KINDS = {
    "approve": "step.approve",
    "reject": "step.reject",
    "pause": "step.pause",
    "resume": "step.resume",
}


def _deliveries_into_inbox(conn: sqlite3.Connection) -> None:
    """Every delivery keeps its deduplication keys; queued ones are applied after the
    upgrade, in the order they were received."""
    from bot.pagerduty.webhook import PayloadError, event_payload, parse_event

    rows = conn.execute(
        "SELECT id, source, event_id, event_type, incident_id, payload, status, attempts, "
        "error, received_at, processed_at, catalog_commit FROM deliveries "
        "ORDER BY received_at, rowid"
    ).fetchall()
    for (
        delivery_id,
        source,
        event_id,
        event_type,
        incident_id,
        payload,
        status,
        attempts,
        error,
        received_at,
        processed_at,
        catalog_commit,
    ) in rows:
        kind, data = event_type, {}
        new_status = {"queued": "queued", "processing": "queued", "done": "done"}.get(
            status, "ignored" if status == "ignored" else "failed"
        )
        if source == "pagerduty":
            try:
                data = event_payload(parse_event(str(payload).encode("utf-8")))
            except PayloadError as exc:
                new_status, error = "failed", exc.reason
        else:
            old = json.loads(payload or "{}")
            kind = _REACTION_KINDS.get(str(old.get("verb")), "step.unknown")
            data = {
                "step_run_id": old.get("step_run_id"),
                "user": old.get("user"),
                "channel": old.get("channel"),
                "reaction": old.get("reaction"),
            }
        alt_key = (
            f"pagerduty:delivery:{str(delivery_id).partition(':')[2]}"
            if source == "pagerduty"
            else None
        )
        conn.execute(
            "INSERT INTO inbox (source, key, alt_key, incident_id, kind, payload, received_at, "
            "status, attempts, detail, catalog_commit, processed_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (
                source,
                f"{source}:event:{event_id}",
                alt_key,
                incident_id or "",
                kind,
                json.dumps(data),
                received_at or 0.0,
                new_status,
                attempts or 0,
                error,
                catalog_commit,
                processed_at,
            ),
        )


def _migration_5(db: sqlite_utils.Database) -> None:
    # Good catalogs the bot served, by version: it starts from the newest when the
    # directory has errors, and runs under way finish on the catalog they started with.
    db.conn.execute(
        "CREATE TABLE catalogs (version TEXT PRIMARY KEY, snapshot BLOB NOT NULL, "
        "loaded_at REAL NOT NULL)"
    )


def _migration_6(db: sqlite_utils.Database) -> None:
    # What produced each audit row: 'bot' (a real incident), 'simulate' or 'test'.
    # `runbookctl promote` counts only the bot's rows as evidence. Rows written before
    # this migration by `runbookctl simulate --db` are found by the incidents it opened
    # (their inbox items have source 'simulate'; their ids start with SIM-). No index:
    # promote's query narrows by (status, action) first, and every audit write would pay.
    conn = db.conn
    conn.execute("ALTER TABLE automation_events ADD COLUMN origin TEXT NOT NULL DEFAULT 'bot'")
    conn.execute(
        "UPDATE automation_events SET origin = 'simulate' WHERE incident_id LIKE 'SIM-%' "
        "OR incident_id IN (SELECT incident_id FROM inbox WHERE source = 'simulate')"
    )


def _migration_7(db: sqlite_utils.Database) -> None:
    # The two-person rule: how many distinct approvers a request needs, who approved so
    # far, and who started a manual run (who may not approve it unless the action allows).
    conn = db.conn
    conn.execute("ALTER TABLE approvals ADD COLUMN required INTEGER NOT NULL DEFAULT 1")
    conn.execute("ALTER TABLE approvals ADD COLUMN approved_by TEXT NOT NULL DEFAULT '[]'")
    conn.execute("ALTER TABLE approvals ADD COLUMN starter TEXT NOT NULL DEFAULT ''")
    conn.execute("ALTER TABLE approvals ADD COLUMN self_approval INTEGER NOT NULL DEFAULT 0")
    conn.execute("ALTER TABLE incidents ADD COLUMN started_by TEXT NOT NULL DEFAULT ''")


def _migration_8(db: sqlite_utils.Database) -> None:
    # Pull runners (bot.hub). Tokens are stored as sha256 only: the database never holds
    # what a runner presents. A step's row lives while it is queued or leased; the inbox
    # item of its end is what records the outcome.
    conn = db.conn
    conn.execute(
        "CREATE TABLE runner_tokens (id INTEGER PRIMARY KEY, pool TEXT NOT NULL, "
        "name TEXT NOT NULL, token_sha256 TEXT NOT NULL UNIQUE, created_at REAL NOT NULL, "
        "revoked_at REAL)"
    )
    conn.execute("CREATE UNIQUE INDEX runner_tokens_name ON runner_tokens (pool, name)")
    conn.execute(
        "CREATE TABLE runner_jobs (job_id TEXT PRIMARY KEY, pool TEXT NOT NULL, "
        "action TEXT NOT NULL, step_run_id INTEGER NOT NULL, attempt INTEGER NOT NULL, "
        "incident_id TEXT NOT NULL, phase TEXT NOT NULL, payload TEXT NOT NULL, "
        "state TEXT NOT NULL DEFAULT 'queued', token_id INTEGER, lease_until REAL, "
        "queued_at REAL NOT NULL, wait_until REAL NOT NULL)"
    )
    conn.execute("CREATE INDEX runner_jobs_queue ON runner_jobs (pool, state, queued_at)")
    conn.execute(
        "CREATE TABLE runner_refusals (id INTEGER PRIMARY KEY, at REAL NOT NULL, "
        "side TEXT NOT NULL, reason TEXT NOT NULL, pool TEXT NOT NULL DEFAULT '', "
        "token_id INTEGER, job_id TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '')"
    )


def _migration_9(db: sqlite_utils.Database) -> None:
    # An action's limits (max_concurrent, max_per_hour) are checked before each start.
    db.conn.execute("CREATE INDEX step_runs_action_started ON step_runs (action, started_at)")


# Replicas sharing a PostgreSQL database (bot.replicas): who is alive, who holds each
# singleton's lease, and which replica claimed each running step. SQLite has one bot,
# and the same tables, unused, so that both backends keep one schema.
_REPLICAS = (
    "CREATE TABLE replicas (id TEXT PRIMARY KEY, holder TEXT NOT NULL, "
    "host TEXT NOT NULL DEFAULT '', pid INTEGER, started_at {real} NOT NULL, "
    "seen_at {real} NOT NULL)",
    "CREATE TABLE leases (name TEXT PRIMARY KEY, holder TEXT NOT NULL, "
    "expires_at {real} NOT NULL, fence {integer} NOT NULL)",
    "ALTER TABLE step_runs ADD COLUMN owner TEXT",
)


def _migration_10(db: sqlite_utils.Database) -> None:
    for statement in _REPLICAS:
        db.conn.execute(statement.format(real="REAL", integer="INTEGER"))


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migration_1,
    2: _migration_2,
    3: _migration_3,
    4: _migration_4,
    5: _migration_5,
    6: _migration_6,
    7: _migration_7,
    8: _migration_8,
    9: _migration_9,
    10: _migration_10,
}


# --- PostgreSQL ---------------------------------------------------------------------------
#
# A fresh PostgreSQL database is created at `POSTGRES_BASELINE` in one go, from the DDL
# below: the tables, indexes and unique constraints SQLite has at that version, in
# PostgreSQL's types (bigint identity ids, double precision times, text, bigint, bytea).
# PostgreSQL never held an older schema, so migrations 1 to 8 exist for SQLite only.
#
# A later migration N must apply to both backends: it adds `MIGRATIONS[N]` (SQLite, as
# above) and `POSTGRES_MIGRATIONS[N]` (statements run in the same transaction that
# records the new version). tests/test_store.py checks both cover every version after the
# baseline, so a migration written for one backend only cannot be merged.

POSTGRES_BASELINE = 8

POSTGRES_SCHEMA = """
CREATE TABLE incidents (
    id TEXT PRIMARY KEY,
    title TEXT, service TEXT, service_id TEXT, urgency TEXT, priority TEXT, env TEXT,
    details TEXT, link TEXT,
    status TEXT NOT NULL,
    runbook_id TEXT, catalog_commit TEXT, channel TEXT, thread_ts TEXT,
    created_at DOUBLE PRECISION, updated_at DOUBLE PRECISION, resolved_at DOUBLE PRECISION,
    state_changed_at TEXT,
    started_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE runs (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    incident_id TEXT REFERENCES incidents (id),
    runbook_id TEXT, phase TEXT, status TEXT,
    cursor BIGINT, rollback_of BIGINT,
    catalog_commit TEXT,
    started_at DOUBLE PRECISION, finished_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX idx_runs_incident_id_phase ON runs (incident_id, phase);
CREATE TABLE step_runs (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run_id BIGINT REFERENCES runs (id),
    incident_id TEXT REFERENCES incidents (id),
    step_index BIGINT, step_id TEXT, action TEXT, attempt BIGINT,
    status TEXT, decision TEXT, reason TEXT, command TEXT,
    exit_code BIGINT, output TEXT, detail TEXT,
    created_at DOUBLE PRECISION, started_at DOUBLE PRECISION,
    finished_at DOUBLE PRECISION, duration DOUBLE PRECISION,
    catalog_commit TEXT,
    runner TEXT
);
CREATE UNIQUE INDEX idx_step_runs_run_id_step_index_attempt
    ON step_runs (run_id, step_index, attempt);
CREATE INDEX idx_step_runs_status ON step_runs (status);
CREATE TABLE approvals (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    step_run_id BIGINT REFERENCES step_runs (id),
    incident_id TEXT, action TEXT, status TEXT, approvers TEXT,
    requested_at DOUBLE PRECISION, expires_at DOUBLE PRECISION, paused_at DOUBLE PRECISION,
    paused_by TEXT, decided_by TEXT, decided_at DOUBLE PRECISION,
    catalog_commit TEXT, fingerprint TEXT,
    required BIGINT NOT NULL DEFAULT 1,
    approved_by TEXT NOT NULL DEFAULT '[]',
    starter TEXT NOT NULL DEFAULT '',
    self_approval BIGINT NOT NULL DEFAULT 0
);
CREATE UNIQUE INDEX idx_approvals_step_run_id ON approvals (step_run_id);
CREATE INDEX idx_approvals_status_expires_at ON approvals (status, expires_at);
CREATE TABLE automation_events (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    ts DOUBLE PRECISION,
    incident_id TEXT, service TEXT, runbook_id TEXT, step_id TEXT, action TEXT, env TEXT,
    status TEXT, actor TEXT, detail TEXT, catalog_commit TEXT,
    origin TEXT NOT NULL DEFAULT 'bot'
);
CREATE INDEX idx_automation_events_status_action ON automation_events (status, action);
CREATE INDEX idx_automation_events_incident_id ON automation_events (incident_id);
CREATE INDEX idx_automation_events_ts ON automation_events (ts);
CREATE TABLE inbox (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    source TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    alt_key TEXT UNIQUE,
    incident_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    detail TEXT,
    catalog_commit TEXT,
    processed_at DOUBLE PRECISION
);
CREATE INDEX idx_inbox_queue ON inbox (status, incident_id, id);
CREATE TABLE outbox (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    incident_id TEXT NOT NULL,
    target TEXT NOT NULL,
    lane TEXT NOT NULL,
    kind TEXT NOT NULL,
    key TEXT,
    payload TEXT NOT NULL,
    version BIGINT NOT NULL DEFAULT 1,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL DEFAULT 0,
    next_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    error TEXT,
    ts TEXT,
    posted_channel TEXT,
    created_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION
);
CREATE INDEX idx_outbox_queue ON outbox (status, lane, id);
CREATE INDEX idx_outbox_key ON outbox (key);
CREATE INDEX idx_outbox_ts ON outbox (ts);
CREATE TABLE catalogs (
    version TEXT PRIMARY KEY,
    snapshot BYTEA NOT NULL,
    loaded_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE runner_tokens (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    token_sha256 TEXT NOT NULL UNIQUE,
    created_at DOUBLE PRECISION NOT NULL,
    revoked_at DOUBLE PRECISION
);
CREATE UNIQUE INDEX runner_tokens_name ON runner_tokens (pool, name);
CREATE TABLE runner_jobs (
    job_id TEXT PRIMARY KEY,
    pool TEXT NOT NULL,
    action TEXT NOT NULL,
    step_run_id BIGINT NOT NULL,
    attempt BIGINT NOT NULL,
    incident_id TEXT NOT NULL,
    phase TEXT NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued',
    token_id BIGINT,
    lease_until DOUBLE PRECISION,
    queued_at DOUBLE PRECISION NOT NULL,
    wait_until DOUBLE PRECISION NOT NULL
);
CREATE INDEX runner_jobs_queue ON runner_jobs (pool, state, queued_at);
CREATE TABLE runner_refusals (
    id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at DOUBLE PRECISION NOT NULL,
    side TEXT NOT NULL,
    reason TEXT NOT NULL,
    pool TEXT NOT NULL DEFAULT '',
    token_id BIGINT,
    job_id TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT ''
)
"""

# Tables in the order a copy can fill them (referenced rows first), with the columns
# whose ids come from an identity sequence (reset after rows are copied with their ids).
TABLES: tuple[tuple[str, str | None], ...] = (
    ("incidents", None),
    ("runs", "id"),
    ("step_runs", "id"),
    ("approvals", "id"),
    ("automation_events", "id"),
    ("inbox", "id"),
    ("outbox", "id"),
    ("catalogs", None),
    ("runner_tokens", "id"),
    ("runner_jobs", None),
    ("runner_refusals", "id"),
)

# Tables `migrate-to` leaves behind: who was alive and held leases on the source (one
# bot on SQLite) says nothing about the replicas that will share the target.
TRANSIENT_TABLES = ("replicas", "leases")

# Version -> statements, for migrations after POSTGRES_BASELINE.
POSTGRES_MIGRATIONS: dict[int, tuple[str, ...]] = {
    9: ("CREATE INDEX step_runs_action_started ON step_runs (action, started_at)",),
    10: (
        *(s.format(real="double precision", integer="bigint") for s in _REPLICAS),
        # Every commit that queues inbox items or effects wakes the replicas listening
        # (`bot.replicas`): the one responsible for the incident, the outbox's sender.
        "CREATE FUNCTION runbook_notify() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN PERFORM pg_notify(TG_ARGV[0], ''); RETURN NULL; END $$",
        "CREATE TRIGGER inbox_notify AFTER INSERT ON inbox FOR EACH STATEMENT "
        "EXECUTE FUNCTION runbook_notify('runbook_inbox')",
        "CREATE TRIGGER outbox_notify AFTER INSERT ON outbox FOR EACH STATEMENT "
        "EXECUTE FUNCTION runbook_notify('runbook_outbox')",
    ),
}


def postgres_statements(current: int) -> list[str]:
    """What brings a PostgreSQL database from version `current` (0: empty) to
    SCHEMA_VERSION."""
    if current == 0:
        statements = [s.strip() for s in POSTGRES_SCHEMA.split(";") if s.strip()]
        current = POSTGRES_BASELINE
    else:
        statements = []
    for version in range(current + 1, SCHEMA_VERSION + 1):
        statements += POSTGRES_MIGRATIONS[version]
    return statements
