"""`runbook-bot runner`: a pull runner, beside the systems the bot cannot reach.

It connects out to the bot (HTTP or HTTPS, ``httpx``), long-polls ``/runner/poll`` for
steps of its pool, runs them here and posts back their results; nothing connects in to
it. It runs a step only when all of these hold:

  1. the payload's Ed25519 signature verifies with the bot's public key (``--public-key``)
     over everything it runs: action, argv, env, step, attempt, pool, expiry, timeout,
     output cap, secret names and patterns, expectations (``bot.signing``);
  2. it is for this runner's pool, and not expired (by this host's clock);
  3. its action is on this runner's allowlist (``--allow`` / ``--allow-file``);
  4. its job id is the one the bot leased it under, and was never seen here: the id is
     written to the runner's own SQLite file (``--state``) before the command starts, so
     a replayed payload is refused, after a restart too. (Another runner of the pool has
     its own file: a payload copied to it could run there until it expires, the action's
     timeout plus 30 seconds after it was queued. Give each pool only the runners it
     needs.)

Otherwise it refuses, records the refusal in its file, and reports it to the bot (which
records and counts it, and ends the step as not run). The command runs as on the bot's
own host (``bot.executor.run``): argv without a shell (rendered by the bot: each
templated value one argument), a timeout that kills the process group, output capped and
masked (secrets are the values of ``secret_env`` variables in *this* host's environment:
they never travel).

A result is written to the file before it is sent, and kept until the bot acknowledges
it: a runner that lost the bot (or was restarted) reports what it holds when it is back.
While a step runs the runner sends heartbeats; when they stop for the bot's lease
(``RUNBOOK_RUNNER_LEASE``), the bot counts the step as interrupted and never re-runs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bot import executor, signing

log = logging.getLogger(__name__)

DEFAULT_POLL_WAIT = 20.0
DEFAULT_HEARTBEAT = 10.0
RETRY_FIRST, RETRY_MAX = 0.5, 30.0
# Ids are kept this long after their payload expired (refused as expired after that).
SEEN_KEEP_SECONDS = 86_400.0


class Ledger:
    """The runner's own file: job ids seen, results not yet acknowledged, refusals."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")  # an id is on disk before its command runs
        self.lock = threading.Lock()
        with self.lock:
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS seen (job_id TEXT PRIMARY KEY, "
                "expires_at REAL NOT NULL, started_at REAL NOT NULL, result TEXT, "
                "reported INTEGER NOT NULL DEFAULT 0)"
            )
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS refusals (id INTEGER PRIMARY KEY, at REAL NOT NULL, "
                "job_id TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL, "
                "reported INTEGER NOT NULL DEFAULT 0)"
            )

    def claim(self, job_id: str, expires_at: float, at: float) -> bool:
        """Record `job_id` as started; False if it was seen before (a replay)."""
        with self.lock:
            try:
                self.conn.execute(
                    "INSERT INTO seen (job_id, expires_at, started_at) VALUES (?, ?, ?)",
                    (job_id, expires_at, at),
                )
            except sqlite3.IntegrityError:
                return False
        return True

    def finish(self, job_id: str, result: dict[str, Any]) -> None:
        with self.lock:
            self.conn.execute(
                "UPDATE seen SET result = ? WHERE job_id = ?", (json.dumps(result), job_id)
            )

    def unreported(self) -> list[tuple[str, dict[str, Any]]]:
        with self.lock:
            rows = self.conn.execute(
                "SELECT job_id, result FROM seen WHERE result IS NOT NULL AND reported = 0 "
                "ORDER BY started_at"
            ).fetchall()
        return [(job_id, json.loads(result)) for job_id, result in rows]

    def reported(self, job_id: str) -> None:
        with self.lock:
            self.conn.execute("UPDATE seen SET reported = 1 WHERE job_id = ?", (job_id,))

    def prune(self, now: float) -> None:
        with self.lock:
            self.conn.execute(
                "DELETE FROM seen WHERE reported = 1 AND expires_at < ?",
                (now - SEEN_KEEP_SECONDS,),
            )

    def refused(self, job_id: str, reason: str, detail: str, at: float) -> int:
        with self.lock:
            cursor = self.conn.execute(
                "INSERT INTO refusals (at, job_id, reason, detail) VALUES (?, ?, ?, ?)",
                (at, job_id, reason, detail),
            )
        return int(cursor.lastrowid or 0)

    def unreported_refusals(self) -> list[tuple[int, str, str, str]]:
        with self.lock:
            return [
                (int(r[0]), str(r[1]), str(r[2]), str(r[3]))
                for r in self.conn.execute(
                    "SELECT id, job_id, reason, detail FROM refusals WHERE reported = 0 ORDER BY id"
                ).fetchall()
            ]

    def refusal_reported(self, refusal_id: int) -> None:
        with self.lock:
            self.conn.execute("UPDATE refusals SET reported = 1 WHERE id = ?", (refusal_id,))

    def close(self) -> None:
        with self.lock:
            self.conn.close()


class RunnerStopped(Exception):
    """The bot refused this runner's token: nothing more can be done with it."""


class PullRunner:
    def __init__(
        self,
        url: str,
        pool: str,
        token: str,
        public_key: Ed25519PublicKey,
        allow: Iterable[str],
        ledger: Ledger,
        *,
        parallel: int = 1,
        poll_wait: float = DEFAULT_POLL_WAIT,
        heartbeat: float = DEFAULT_HEARTBEAT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pool = pool
        self.public_key = public_key
        self.allow = frozenset(allow)
        self.ledger = ledger
        self.poll_wait = poll_wait
        self.heartbeat = heartbeat
        self.clock = clock
        self.http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(10.0, read=poll_wait + 15.0),
        )
        self.slots = threading.BoundedSemaphore(parallel)
        # Steps it has taken and not yet reported: heartbeats hold their leases (a result
        # waiting for a bot that restarts is not an interruption).
        self.held: set[str] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []

    # --- the loop -------------------------------------------------------------------------

    def serve(self) -> None:
        """Poll and run until `stop` is set; then wait for running steps and report."""
        beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        beat.start()
        backoff = RETRY_FIRST
        try:
            while not self.stop.is_set():
                try:
                    self._report_all()
                    self.slots.acquire()
                    try:
                        message = self._poll()
                    except BaseException:
                        self.slots.release()
                        raise
                    if message is None:
                        self.slots.release()
                    else:
                        self._take(message)
                    backoff = RETRY_FIRST
                except httpx.TransportError as exc:
                    log.warning("the bot is not answering (%s); trying again", exc)
                    self.stop.wait(backoff)
                    backoff = min(RETRY_MAX, backoff * 2)
        finally:
            for thread in self.threads:
                thread.join()
            with contextlib.suppress(httpx.TransportError, RunnerStopped):
                self._report_all()
            self.stop.set()
            beat.join(5)
            self.http.close()

    def _poll(self) -> dict[str, Any] | None:
        response = self.http.post(
            "/runner/poll",
            json={"pool": self.pool, "allow": sorted(self.allow), "wait": self.poll_wait},
        )
        if response.status_code == 204:
            return None
        if response.status_code == 429:
            self.stop.wait(0.2)
            return None
        self._check(response)
        answer = response.json()
        job, lease = answer.get("job"), answer.get("lease")
        if not isinstance(job, dict) or not isinstance(lease, str):
            return None
        return {"message": job, "lease": lease}

    def _check(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            raise RunnerStopped(_error_of(response))
        if response.status_code >= 400:
            raise httpx.TransportError(f"the bot answered {response.status_code}")

    # --- one step -------------------------------------------------------------------------

    def _take(self, leased: dict[str, Any]) -> None:
        """Check a leased message; run it in a thread of its own, or refuse it."""
        try:
            payload = signing.verify(self.public_key, leased["message"])
            if payload["job_id"] != leased["lease"]:
                raise signing.Refused("replayed", "the payload was issued for another step")
            self._admit(payload)
        except signing.Refused as refused:
            self.slots.release()
            self._refuse(leased["lease"], refused.reason, refused.detail)
            return
        job_id = payload["job_id"]
        with self.lock:
            self.held.add(job_id)
        thread = threading.Thread(target=self._run, args=(payload,), name=job_id, daemon=True)
        self.threads = [t for t in self.threads if t.is_alive()] + [thread]
        thread.start()

    def _admit(self, payload: dict[str, Any]) -> None:
        if payload["pool"] != self.pool:
            raise signing.Refused("wrong_pool", f"for pool {payload['pool']}, not {self.pool}")
        if not float(payload["expires_at"]) > self.clock():
            raise signing.Refused("expired", "the payload expired before it reached this runner")
        if payload["action"] not in self.allow:
            raise signing.Refused(
                "not_allowed", f"action {payload['action']} is not on this runner's allowlist"
            )
        if not self.ledger.claim(payload["job_id"], float(payload["expires_at"]), self.clock()):
            raise signing.Refused("replayed", "this runner has seen this job before")

    def _run(self, payload: dict[str, Any]) -> None:
        job_id = payload["job_id"]
        outcome: dict[str, Any]
        try:
            spec = executor.CommandSpec(
                command=tuple(payload["argv"]),
                rendered=True,
                timeout=float(payload["timeout"]),
                env=dict(payload["env"]),
                secret_env=tuple(payload["secret_env"]),
                expect=tuple(executor.Expectation(**e) for e in payload["expect"]),
            )
            outcome = dataclasses.asdict(
                executor.run(
                    spec,
                    {},
                    output_cap=int(payload["output_cap"]),
                    secret_patterns=tuple(payload["secret_patterns"]),
                )
            )
        except ValueError as exc:  # a spec error, before anything started
            outcome = executor.not_run(f"could not run: {exc}")
        except Exception as exc:  # a bug here: told without its text (it could hold a secret)
            log.exception("step %s failed in the runner", job_id)
            outcome = executor.not_run(
                f"could not run: unexpected {type(exc).__name__} in the runner"
            )
        try:
            self.ledger.finish(job_id, outcome)
            log.info("step %s (%s): %s", job_id, payload["action"], outcome["status"])
        finally:
            self.slots.release()
        with contextlib.suppress(httpx.TransportError, RunnerStopped):
            self._report(job_id, outcome)  # else the main loop reports it later

    def _refuse(self, job_id: str, reason: str, detail: str) -> None:
        log.warning("refused job %s: %s (%s)", job_id or "?", reason, detail)
        self.ledger.refused(job_id, reason, detail, self.clock())
        with contextlib.suppress(httpx.TransportError):
            self._report_refusals()

    # --- reports --------------------------------------------------------------------------

    def _report(self, job_id: str, result: dict[str, Any]) -> None:
        response = self.http.post("/runner/result", json={"job_id": job_id, "result": result})
        self._check(response)
        self.ledger.reported(job_id)  # accepted, or its end was already recorded
        with self.lock:
            self.held.discard(job_id)

    def _report_all(self) -> None:
        for job_id, result in self.ledger.unreported():
            self._report(job_id, result)
        self._report_refusals()
        self.ledger.prune(self.clock())

    def _report_refusals(self) -> None:
        for refusal_id, job_id, reason, detail in self.ledger.unreported_refusals():
            response = self.http.post(
                "/runner/refusal", json={"job_id": job_id, "reason": reason, "detail": detail}
            )
            self._check(response)
            self.ledger.refusal_reported(refusal_id)

    def _heartbeats(self) -> None:
        while not self.stop.wait(self.heartbeat):
            with self.lock:
                held = sorted(self.held)
            if not held:
                continue
            with contextlib.suppress(httpx.TransportError):
                self.http.post("/runner/heartbeat", json={"jobs": held})


def _error_of(response: httpx.Response) -> str:
    try:
        return str(response.json().get("error") or response.status_code)
    except ValueError:
        return f"the bot answered {response.status_code}"


def read_allow_file(path: str | Path) -> list[str]:
    """Action ids, one a line; blank lines and `#` comments ignored."""
    names = []
    for line in Path(path).read_text("utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            names.append(name)
    return names
