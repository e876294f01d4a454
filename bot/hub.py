"""The bot's side of pull runners: steps queued per pool, leased to runners that poll.

A pull runner (``bot.pullrunner``, ``runbook-bot runner``) connects out to the bot; the
bot never connects to it. Routes, each with ``Authorization: Bearer <runner token>``
(tokens per pool, stored as sha256 in the state database, revocable with
``runbookctl runner token``):

  POST /runner/poll       {"pool", "allow": [action…], "wait": s} -> 200 {"job": signed,
                          "lease": job_id}
                          or 204 after up to `wait` seconds with nothing for it (long poll)
  POST /runner/heartbeat  {"jobs": [job_id…]} -> {"held": [job_id…]}: leases extended
  POST /runner/result     {"job_id", "result": {status, exit_code, output, …}}
                          -> {"accepted": true|false}: false when its end is already
                          recorded (the lease lapsed, or this result came before)
  POST /runner/refusal    {"job_id", "reason", "detail"}: a payload the runner refused

A step's life here, all in ``runner_jobs`` (``bot.store``): `start` renders the argv and
env (templates filled as single arguments, as on the bot's own host), signs them
(``bot.signing``) and queues the row; a poll leases the oldest step of the pool whose
action the runner allows; heartbeats extend the lease. The row is removed only after
the step's end is in the inbox (one inbox key per attempt: a result is accepted once).

  * its incident resolves before a runner takes it: it is not handed out, and ends
    ``error`` ("did not run"; follow-ups of a resolved incident are handed out);
  * nobody takes it before the action's timeout: it ends ``error`` ("did not run"),
    and the thread said it was waiting as soon as it was queued with no runner connected;
  * its runner's lease lapses (the runner died or lost the network): ``interrupted``,
    escalated, never re-run; a result the runner brings later is acknowledged and
    dropped;
  * a runner refuses it (bad signature, expired, replayed, not on its allowlist): the
    refusal is recorded and counted, and the step ends ``error`` ("did not run").

After a restart the rows are still there: queued and leased steps go on as if nothing
happened (each lease starts afresh: the bot's own downtime is not a runner's silence); a
claimed step with no row never reached a runner and is started again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bot import executor, messages, metrics, signing
from bot.catalog.model import LOCAL, Placement, RunnerPlacement
from bot.engine import Job
from bot.jobs import JobEnd, Recovery, Sink
from bot.store import RunnerJob, RunnerToken, StepRun, Store
from bot.web import BadRequest, json_object

log = logging.getLogger(__name__)

PREFIX = "/runner/"
RUNNER_PREFIX = "runner:"
LEASE_SECONDS = 30.0  # a runner heartbeats every third of it
CONNECTED_SECONDS = 30.0  # a runner seen this recently counts as connected
MAX_POLL_WAIT = 20.0
MAX_LONG_POLLS = 16  # at once; more get 429 and poll again (request threads are shared)
EXPIRY_SLACK = 30.0  # a payload stays valid this long after its step stops being offered
MAX_BODY = 1024 * 1024
RESULT_STATUSES = ("success", "allowed_failure", "failed", "timeout", "error")
RUNNER_REASONS = ("bad_signature", "expired", "replayed", "not_allowed", "wrong_pool")

StartResponse = Callable[..., Any]
PutNote = Callable[[Job, str], None]


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return "rbr_" + secrets.token_urlsafe(32)


def pool_of(runner: str) -> str:
    return runner.removeprefix(RUNNER_PREFIX).rpartition(":")[0]


class RunnerHub:
    """The executor for ``executor: {runner: POOL}`` steps, and its HTTP routes."""

    dry_run = False

    def __init__(
        self,
        store: Store,
        sink: Sink,
        key: Ed25519PrivateKey,
        *,
        note: PutNote,
        lease: float = LEASE_SECONDS,
        clock: Callable[[], float] = time.time,
        tick: float = 0.25,
    ) -> None:
        self.store = store
        self.sink = sink
        self.key = key
        self.note = note
        self.lease = lease
        self.clock = clock
        self.tick = tick
        self._queued = threading.Condition()
        self._seen: dict[int, tuple[str, float]] = {}  # token id -> (pool, last seen)
        self._seen_lock = threading.Lock()
        self._polls = threading.BoundedSemaphore(MAX_LONG_POLLS)
        self._stopping = threading.Event()
        self._polls_ended = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------

    def open(self, renew: bool = True) -> None:
        # Runners kept working while no bot served them: they get a full lease to report.
        if renew:
            self.store.runner_jobs_renew_leases(self.clock() + self.lease)
        self._thread = threading.Thread(target=self._watch, name="runner-hub", daemon=True)
        self._thread.start()

    def end_polls(self) -> None:
        """Answer waiting long polls now (the server is stopping: they would hold it)."""
        self._polls_ended.set()
        with self._queued:
            self._queued.notify_all()

    def close(self) -> None:
        self._stopping.set()
        self.end_polls()
        if self._thread is not None:
            self._thread.join(5)

    # --- Executor ------------------------------------------------------------------------

    def reserve(self, placement: Placement = LOCAL) -> str:
        assert isinstance(placement, RunnerPlacement)
        return f"{RUNNER_PREFIX}{placement.pool}:{secrets.token_hex(8)}"

    def release(self, runner: str) -> None:
        return None  # nothing is held before `start`

    def start(self, runner: str, job: Job) -> None:
        pool = pool_of(runner)
        try:
            argv = executor.render_argv(job.spec, job.context)
            env = executor.render_env(job.spec, job.context)
        except ValueError as exc:  # TemplateError and spec errors speak to people
            self.sink(_end(job, executor.not_run(f"could not run: {exc}")))
            return
        try:
            self._queue(runner, pool, job, argv, env)
        except Exception:
            # Not queued, so no runner can have it: it ends as not run, not as lost.
            log.exception("could not queue step %s for pool %s", job.step_run_id, pool)
            self.sink(
                _end(job, executor.not_run("could not run: it could not be queued for a runner"))
            )
            return
        if not self.connected(pool):
            self.note(job, messages.runner_waiting(pool, job.spec.timeout))
        with self._queued:
            self._queued.notify_all()

    def _queue(
        self, runner: str, pool: str, job: Job, argv: list[str], env: dict[str, str]
    ) -> None:
        now = self.clock()
        wait_until = now + job.spec.timeout
        payload = {
            "job_id": runner,
            "action": job.action_id,
            "argv": argv,
            "env": env,
            "step_run_id": job.step_run_id,
            "attempt": job.attempt,
            "pool": pool,
            "expires_at": wait_until + EXPIRY_SLACK,
            "timeout": job.spec.timeout,
            "output_cap": job.output_cap,
            "secret_env": list(job.spec.secret_env),
            "secret_patterns": list(job.secret_patterns),
            "expect": [
                {"pattern": e.pattern, "allow_failure": e.allow_failure} for e in job.spec.expect
            ],
        }
        self.store.runner_job_queue(
            RunnerJob(
                job_id=runner,
                pool=pool,
                action=job.action_id,
                step_run_id=job.step_run_id,
                attempt=job.attempt,
                incident_id=job.incident_id,
                phase=job.phase,
                payload=json.dumps(signing.sign(self.key, payload)),
                state="queued",
                queued_at=now,
                wait_until=wait_until,
            )
        )

    def recover(
        self,
        steps: Iterable[StepRun],
        job_of: Callable[[StepRun], Job | None],
        restart: Callable[[StepRun], None],
    ) -> list[Recovery]:
        """Queued and leased steps go on (their rows outlived the bot); a claimed step
        with no row never reached a runner: it is started again."""
        found: list[Recovery] = []
        for step in steps:
            if self.store.runner_job(step.runner) is not None:
                found.append(Recovery(step, attached=True))
            else:
                found.append(Recovery(step, not_started=True))
        return found

    def forget(self, runner: str) -> None:
        return None  # a step's row goes once its end is stored

    # --- who is connected ----------------------------------------------------------------

    def _saw(self, token: RunnerToken) -> None:
        with self._seen_lock:
            self._seen[token.id] = (token.pool, time.monotonic())
        self._count_connected()

    def connected(self, pool: str) -> int:
        horizon = time.monotonic() - CONNECTED_SECONDS
        with self._seen_lock:
            return sum(1 for p, seen in self._seen.values() if p == pool and seen >= horizon)

    def _count_connected(self) -> None:
        horizon = time.monotonic() - CONNECTED_SECONDS
        with self._seen_lock:
            pools: dict[str, int] = {}
            for pool, seen in self._seen.values():
                pools[pool] = pools.get(pool, 0) + (1 if seen >= horizon else 0)
        for pool, count in pools.items():
            metrics.runners_connected.labels(pool).set(count)

    # --- lapsed leases and steps nobody took --------------------------------------------

    def _watch(self) -> None:
        while not self._stopping.wait(self.tick):
            try:
                self.sweep()
            except Exception:
                log.exception("runner lease check failed; trying again")

    def sweep(self) -> None:
        """End steps whose runner stopped answering (interrupted) or that no runner took
        in time (error, not run)."""
        self._count_connected()
        lapsed, unclaimed, closed = self.store.runner_jobs_overdue()
        for job in lapsed:
            if self.store.runner_job_take_overdue(job):
                log.warning("runner lease of %s lapsed: step interrupted", job.job_id)
                self.sink(_row_end(job, None, messages.runner_lost(job.pool)))
        for job in unclaimed:
            if self.store.runner_job_take_overdue(job):
                wait = job.wait_until - job.queued_at
                self.sink(
                    _row_end(job, executor.not_run(messages.runner_none_took(job.pool, wait)))
                )
        for job in closed:
            if self.store.runner_job_take_overdue(job):
                self.sink(_row_end(job, executor.not_run(messages.RUNNER_INCIDENT_CLOSED)))

    # --- HTTP ----------------------------------------------------------------------------

    def wsgi(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = str(environ.get("PATH_INFO", "")).removeprefix(PREFIX)
        if environ.get("REQUEST_METHOD") != "POST":
            return _json(start_response, "405 Method Not Allowed", {"error": "use POST"})
        token, refusal = self._authenticate(environ)
        if token is None:
            return _json(start_response, "401 Unauthorized", {"error": refusal})
        self._saw(token)
        try:
            body = json_object(environ, MAX_BODY, empty_is_object=True)
            if path == "poll":
                return self._poll(token, body, start_response)
            if path == "heartbeat":
                return self._heartbeat(token, body, start_response)
            if path == "result":
                return self._result(token, body, start_response)
            if path == "refusal":
                return self._refusal(token, body, start_response)
        except BadRequest as exc:
            return _json(start_response, "400 Bad Request", {"error": str(exc)})
        return _json(start_response, "404 Not Found", {"error": "no such runner route"})

    def _authenticate(self, environ: Mapping[str, Any]) -> tuple[RunnerToken | None, str]:
        scheme, _, given = str(environ.get("HTTP_AUTHORIZATION", "")).partition(" ")
        digest = token_digest(given.strip()) if scheme.lower() == "bearer" else ""
        token = self.store.runner_token_by_hash(digest) if digest else None
        if token is not None and hmac.compare_digest(token.token_sha256, digest):
            if not token.revoked:
                return token, ""
            self._refused("bot", "revoked_token", pool=token.pool, token_id=token.id)
            return None, "this runner token was revoked: ask for a new one"
        self._refused("bot", "unknown_token", detail=str(environ.get("REMOTE_ADDR", "")))
        return None, "unknown runner token (RUNBOOK_RUNNER_TOKEN)"

    def _refused(self, side: str, reason: str, **where: Any) -> None:
        metrics.runner_refusals.labels(side, reason).inc()
        self.store.record_runner_refusal(side, reason, **where)
        log.warning("runner refusal (%s side): %s %s", side, reason, where)

    def _poll(
        self, token: RunnerToken, body: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        pool = body.get("pool")
        allow = body.get("allow")
        if pool != token.pool:
            self._refused("bot", "wrong_pool", pool=str(pool), token_id=token.id)
            return _json(
                start_response,
                "403 Forbidden",
                {"error": f"this token is for pool {token.pool}, not {pool}"},
            )
        if not isinstance(allow, list) or not all(isinstance(a, str) for a in allow):
            raise BadRequest("allow must be a list of action ids")
        wait = min(MAX_POLL_WAIT, max(0.0, float(body.get("wait") or 0.0)))
        if not self._polls.acquire(blocking=False):
            return _json(start_response, "429 Too Many Requests", {"error": "poll again"})
        try:
            deadline = time.monotonic() + wait
            while True:
                job = self.store.runner_job_lease(
                    token.pool, allow, token.id, self.clock() + self.lease
                )
                if job is not None:
                    self._saw(token)
                    # `lease`: the id this runner reports a refusal under (the payload's
                    # own id only counts once its signature verified).
                    answer = {"job": json.loads(job.payload), "lease": job.job_id}
                    return _json(start_response, "200 OK", answer)
                left = deadline - time.monotonic()
                if left <= 0 or self._polls_ended.is_set():
                    self._saw(token)
                    start_response("204 No Content", [("Content-Length", "0")])
                    return [b""]
                with self._queued:
                    # A new step wakes it; the bound catches steps queued before a restart.
                    self._queued.wait(min(left, 1.0))
        finally:
            self._polls.release()

    def _heartbeat(
        self, token: RunnerToken, body: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        jobs = body.get("jobs")
        if not isinstance(jobs, list) or not all(isinstance(j, str) for j in jobs):
            raise BadRequest("jobs must be a list of job ids")
        held = self.store.runner_job_extend(jobs, token.id, self.clock() + self.lease)
        return _json(start_response, "200 OK", {"held": held})

    def _result(
        self, token: RunnerToken, body: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        job_id = body.get("job_id")
        result = body.get("result")
        if not isinstance(job_id, str) or not isinstance(result, dict):
            raise BadRequest("a result needs job_id and result")
        values = _result_values(result)
        row = self.store.runner_job(job_id)
        if row is None or row.token_id != token.id or row.state != "leased":
            # Its end is recorded already (lease lapsed, or this result came before):
            # acknowledged, so the runner forgets it; never applied twice.
            return _json(start_response, "200 OK", {"accepted": False})
        self.sink(_row_end(row, values))  # durably in the inbox first, then the row goes
        self.store.runner_job_take(job_id, token.id)
        return _json(start_response, "200 OK", {"accepted": True})

    def _refusal(
        self, token: RunnerToken, body: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        job_id = str(body.get("job_id") or "")[:200]
        reason = str(body.get("reason") or "")
        if reason not in RUNNER_REASONS:
            raise BadRequest(f"reason must be one of {', '.join(RUNNER_REASONS)}")
        detail = str(body.get("detail") or "")[:500]
        self._refused(
            "runner", reason, pool=token.pool, token_id=token.id, job_id=job_id, detail=detail
        )
        row = self.store.runner_job(job_id)
        if row is not None and row.token_id == token.id:
            self.sink(_row_end(row, executor.not_run(messages.runner_refused(row.pool, reason))))
            self.store.runner_job_take(job_id, token.id)
        return _json(start_response, "200 OK", {"recorded": True})


def _result_values(result: Mapping[str, Any]) -> dict[str, Any]:
    status = result.get("status")
    if status not in RESULT_STATUSES:
        raise BadRequest(f"result status must be one of {', '.join(RESULT_STATUSES)}")
    exit_code = result.get("exit_code")
    if exit_code is not None and not isinstance(exit_code, int):
        raise BadRequest("exit_code must be an integer or null")
    argv = result.get("argv") or []
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise BadRequest("argv must be a list of strings")
    duration = result.get("duration")
    return {
        "status": status,
        "exit_code": exit_code,
        "output": str(result.get("output") or ""),
        "duration": float(duration) if isinstance(duration, int | float) else None,
        "argv": argv,
        "matched": result.get("matched") if isinstance(result.get("matched"), str) else None,
        "detail": str(result.get("detail") or ""),
    }


def _end(job: Job, result: dict[str, Any]) -> JobEnd:
    return JobEnd(job.step_run_id, job.attempt, job.incident_id, job.phase, result)


def _row_end(row: RunnerJob, result: dict[str, Any] | None, message: str = "") -> JobEnd:
    return JobEnd(row.step_run_id, row.attempt, row.incident_id, row.phase, result, message=message)


def _json(start_response: StartResponse, status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]
