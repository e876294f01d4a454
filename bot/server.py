"""The bot's process: one WSGI app on one port, served by waitress, and its workers.

Routes:
  POST /pagerduty/webhook   PagerDuty V3 webhooks (bot.pagerduty)
  POST /slack/events        Slack Events API in HTTP mode (bot.chat.slack)
  GET  /metrics             Prometheus exposition (bot.metrics)
  GET  /healthz             alive: the process serves requests
  GET  /readyz              ready: the database can be written and a catalog is loaded
  POST /runner/…            pull runners poll for steps and report results (bot.hub)

Request handlers only verify, record in the inbox and acknowledge. The work happens on
the bot's threads: the inbox consumer applies items per incident (``bot.inbox`` ->
``bot.engine``), executors run claimed steps (``bot.jobs``), the outbox sender delivers
what the changes said to Slack and PagerDuty (``bot.outbox``), and a timer puts expired
approval deadlines in the inbox.

Start order: open the database (migrations run), repair what the last run left (steps
it left running: their result or interruption goes to the inbox), start serving
(``/healthz`` answers), then resume work (steps that provably never started are started
then, nothing runs before the bot serves).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bot import __version__, metrics
from bot.catalog.model import Catalog
from bot.catalog.source import CatalogSource
from bot.commands import Commands
from bot.config import Config
from bot.dispatch import Dispatcher
from bot.engine import GUARD_RUNNER, Engine, Job
from bot.errors import ConfigError
from bot.guardapi import PREFIX as GUARD_PREFIX
from bot.guardapi import GuardApi
from bot.hub import MAX_LONG_POLLS, RunnerHub
from bot.hub import PREFIX as RUNNER_ROUTES
from bot.inbox import Inbox, database_unusable
from bot.jobs import JobEnd, Recovery, SupervisedExecutor, end_item
from bot.messages import environment_warnings
from bot.outbox import Budgets, OutboxSender, Transport
from bot.pagerduty import PagerDutyIntake
from bot.replicas import Replicas, Wakeups, replica_name
from bot.signing import load_or_create_key
from bot.states import InboxKind
from bot.store import StepRun, Store
from bot.web import HttpServer

if TYPE_CHECKING:
    from bot.chat.slack import SlackAdapter, SlackTuning
    from bot.kube import KubernetesExecutor

log = logging.getLogger(__name__)

# How often the housekeeping thread copies the SQLite WAL into the database file (so a
# request never pays for a checkpoint) and looks for expired approval deadlines.
CHECKPOINT_SECONDS = 1.0
READY_PROBE_SECONDS = 1.0  # /readyz writes to the database at most this often

SINK_RETRY_SECONDS = 1.0


def approver_groups(catalog: Catalog) -> set[str]:
    """Every Slack user group the catalog names as approvers (fetched ahead at start)."""
    declared = [catalog.settings.approvers]
    declared += [r.approvers for r in catalog.runbooks if r.approvers is not None]
    declared += [a.safety.approvers for a in catalog.actions.values() if a.safety.approvers]
    return {group for approvers in declared for group in approvers.groups}


# A step of a replica that died is interrupted only once its supervisor, which may still
# be running it on that replica's host, can no longer report: after its timeout and this.
RECORD_GRACE_SECONDS = 30.0


def state_dir_for(config: Config) -> Path:
    """Where step supervisors leave their results (``Config.state_directory``); with
    replicas (PostgreSQL), a directory per replica under it."""
    if config.db.startswith(("postgresql://", "postgres://")):
        return config.state_directory / replica_name(config.replica_id, config.port)
    return config.state_directory


def _lock_state_dir(path: Path, replica: str) -> Any:
    """One process per replica's state directory (its steps' files are recovered by that
    replica's next process): an exclusive lock, held while the process lives."""
    import fcntl

    path.mkdir(parents=True, exist_ok=True)
    handle = open(path / "replica.lock", "a+b")  # noqa: SIM115 - held until exit
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise ConfigError(
            f"another process serves replica {replica} from {path}: give each replica "
            "its own RUNBOOK_REPLICA_ID (or state directory)"
        ) from None
    return handle


class BotApp:
    """Everything the process runs: the engine, its adapters, inbox, outbox, executor.

    ``slack_tuning`` changes the Slack adapter's pacing, retry and cache settings (tests
    and benchmarks make them small); production uses the defaults.
    """

    def __init__(
        self,
        config: Config,
        *,
        slack_tuning: SlackTuning | None = None,
        outbox_backoff: tuple[float, float] | None = None,
    ) -> None:
        self.config = config
        self.store = Store(config.db, intake_log=True)
        # PostgreSQL: this bot is one of any number of replicas (bot.replicas); SQLite: the
        # only bot (its intake log's lock makes sure), and every singleton is its own.
        self.replicas: Replicas | None = None
        if self.store.postgres:
            replica = replica_name(config.replica_id, config.port)
            self._state_lock = _lock_state_dir(state_dir_for(config), replica)
            self.store.owner = replica
            self.replicas = Replicas(self.store, replica, on_lease=self._lease_changed)
            self.replicas.join()
            # Beating from now on (repair can take a while) until `stop` has finished.
            self._beating = threading.Event()
            self._beater = threading.Thread(
                target=self.replicas.run, args=(self._beating,), name="replica", daemon=True
            )
            self._beater.start()
        # The catalog lives in Git: checked every RUNBOOK_CATALOG_REFRESH seconds and on
        # SIGHUP, linted before it is served, never served broken (bot.catalog.source).
        self.source = CatalogSource(
            config.catalog,
            commit_override=config.catalog_commit or None,
            on_loaded=self._catalog_loaded,
            on_failed=self._catalog_failed,
        )
        self.source.start(self.store.catalog_snapshot())
        self.inbox = Inbox(
            self.store,
            self._apply,
            workers=config.workers,
            catalog_commit=lambda: self.engine.catalog.version,
            mine=self.replicas.mine if self.replicas else None,
        )
        # Where claimed steps run: the bot's own host (supervised), pull runners of a pool
        # (the hub), Kubernetes Jobs (bot.kube) when RUNBOOK_KUBERNETES allows; without
        # it Kubernetes steps are refused.
        self.executor = SupervisedExecutor(
            state_dir_for(config), self._job_ended, record=config.db if self.replicas else ""
        )
        if self.replicas is not None and not config.signing_key_path.exists():
            # Each replica would make a key of its own; a runner trusts one public key.
            log.warning(
                "no signing key at %s: this replica makes its own, and pull runners accept "
                "the steps of one replica only; give every replica the same key "
                "(RUNBOOK_SIGNING_KEY, e.g. from a Secret)",
                config.signing_key_path,
            )
        self.hub = RunnerHub(
            self.store,
            self._job_ended,
            load_or_create_key(config.signing_key_path),
            note=self._step_waits,
            lease=config.runner_lease,
        )
        self.kubernetes = self._build_kubernetes()
        self.dispatch = Dispatcher(
            self.executor, self._job_ended, runners=self.hub, kubernetes=self.kubernetes
        )
        self.pagerduty = PagerDutyIntake(config, self.inbox.receive)
        self.slack = self._build_slack(slack_tuning)
        transports: dict[str, Transport] = {}
        rules: dict[str, tuple[float, float]] = {}
        if self.slack is not None:
            transports["slack"] = self.slack.transport
            rules.update(self.slack.budgets)
        self.writeback = None
        if config.pagerduty_writeback:
            from bot.pagerduty.writeback import PAGERDUTY_BUDGETS, PagerDutyTransport

            self.writeback = PagerDutyTransport(config, self.store.outbox_set_payload)
            transports["pagerduty"] = self.writeback
            rules.update(PAGERDUTY_BUDGETS)
        first, most = outbox_backoff or (1.0, 60.0)
        self.outbox = OutboxSender(
            self.store,
            transports,
            budgets=Budgets(rules),
            workers=max(4, config.workers),
            backoff_first=first,
            backoff_max=most,
            gate=self._holds("outbox") if self.replicas else None,
        )
        self.engine = Engine(
            self.source.current(),
            self.store,
            self.dispatch,
            default_env=config.env,
            member_of=self.slack.member_of if self.slack else None,
            bot_users=self.slack.bot_user_ids if self.slack else (),
            writeback=config.pagerduty_writeback,
            chat=self.slack is not None,
            details=self.pagerduty.details if self.pagerduty.api is not None else None,
            catalog_of=self._stored_catalog,
        )
        # `/runbook`: manual runs enter the inbox as a page's trigger does.
        self.commands = Commands(
            lambda: self.engine.catalog,
            self.store,
            self.inbox.receive,
            default_env=config.env,
            member_of=self.slack.member_of if self.slack else None,
            bot_users=lambda: self.slack.bot_user_ids if self.slack else frozenset(),
        )
        # bot.guard decorators ask here (authenticated; deny without RUNBOOK_GUARD_TOKEN).
        self.guard_api = GuardApi(
            config, self.store, self.inbox.receive, lambda: self.engine.catalog.settings.channel
        )
        self._save_catalog(self.source.current())
        self._stopping = threading.Event()
        self._never_started: list[StepRun] = []  # found by repair(), started by start()
        self._timer: threading.Thread | None = None
        self._ready: tuple[float, str] = (0.0, "")
        self._ready_lock = threading.Lock()
        self.checkpoint_seconds = CHECKPOINT_SECONDS
        metrics.set_info(__version__, self.catalog.version)
        for warning in environment_warnings(self.catalog, config.env):
            log.warning("%s", warning)
        metrics.track_pending_approvals(
            lambda: float(self.store.count_pending_approvals()), owner=self
        )
        metrics.track_queues(self.store.count_queued, self.store.count_outbox_pending, owner=self)

    @property
    def http_threads(self) -> int:
        """Request threads: runners' long polls hold one each, and get their own, so a
        webhook or a runner's heartbeat never waits behind them."""
        return max(4, self.config.workers) + MAX_LONG_POLLS

    @property
    def catalog(self) -> Catalog:
        """The catalog new incidents get."""
        return self.engine.catalog

    # --- the catalog, reloaded -------------------------------------------------------------

    def _catalog_loaded(self, catalog: Catalog, result: Any) -> None:
        """A good new catalog: served to new incidents, remembered, announced; requests
        waiting under an older one are checked against it (through each incident's inbox)."""
        engine = getattr(self, "engine", None)
        if engine is None:
            return  # the first load, before the engine exists: __init__ takes it from here
        engine.use_catalog(catalog)
        self._save_catalog(catalog)
        metrics.set_info(__version__, catalog.version)
        log.info("catalog %s loaded (%d runbooks)", catalog.version, len(catalog.runbooks))
        for incident_id in self.store.incidents_waiting_for_approval():
            self.inbox.put(
                source="bot",
                key=f"catalog:{catalog.version}:{incident_id}",
                incident_id=incident_id,
                kind=InboxKind.CATALOG_LOADED,
                payload={"version": catalog.version},
            )

    def _catalog_failed(self, result: Any) -> None:
        log.error("the catalog in %s was not loaded:\n%s", self.config.catalog, result.report())

    def _save_catalog(self, catalog: Catalog) -> None:
        try:
            self.store.save_catalog(catalog.version, self.source.snapshot())
        except Exception as exc:  # the catalog is served anyway; a restart may not find it
            log.warning("could not store catalog %s: %s", catalog.version, exc)

    def _stored_catalog(self, version: str) -> Catalog | None:
        """A catalog the bot served before (for a run that started on it)."""
        snapshot = self.store.catalog_snapshot(version)
        if snapshot is None:
            return None
        try:
            return CatalogSource.from_snapshot(snapshot, self.config.catalog).current()
        except Exception as exc:
            log.warning("stored catalog %s cannot be served: %s", version, exc)
            return None

    def _build_kubernetes(self) -> KubernetesExecutor | None:
        if not self.config.kubernetes_enabled:
            return None
        from bot.kube import KubernetesExecutor  # the client takes seconds to import

        return KubernetesExecutor(
            state_dir_for(self.config) / "kubernetes",
            self._job_ended,
            instance=self.config.kubernetes_instance,
        )

    def _build_slack(self, tuning: SlackTuning | None) -> SlackAdapter | None:
        if not self.config.slack_enabled:
            log.warning("SLACK_BOT_TOKEN is not set: threads are not posted anywhere")
            return None
        from bot.chat.slack import SlackAdapter

        return SlackAdapter(
            self.config,
            put=self.inbox.receive,
            find_message=self.store.message_at,
            tuning=tuning,
            command=lambda request: self.commands.handle(request),
        )

    def _apply(self, item: Any) -> None:
        self.engine.apply(item)
        self.outbox.wake()

    # --- lifecycle -----------------------------------------------------------------------

    def repair(self) -> dict[str, int]:
        """What the last run left running: results, interruptions, steps never started.

        Runs nothing: results and interruptions go into the inbox, and steps that never
        started are started by `start()`, once the bot serves (start order).
        """
        self.executor.open()
        # Runners' leases are renewed after a time no bot served them: not when another
        # replica was serving all along.
        self.hub.open(renew=self.replicas is None or self.replicas.alone())
        # A step whose end is already in the inbox is settled (its supervisor's files are
        # gone once the end is stored): only the others are looked at.
        left = [
            step
            for step in self.store.running_steps()
            if not self.store.has_item(f"step:{step.id}:{step.attempt}:end")
            # a bot.guard step runs in the program that asked, which reports its end
            and step.runner != GUARD_RUNNER
            # replicas: another's steps are its own (or, once it died, `take_over_steps`)
            and step.owner in ("", self.store.owner)
        ]
        found: list[Recovery] = []
        if self.replicas is not None:
            # Claimed before replicas (an upgrade, a `migrate-to`): their supervisors' files
            # are in no replica's directory, so "never started" cannot be proven: only
            # their result (put in the inbox) or an interruption ends them.
            found = [Recovery(s, interrupted=True) for s in left if not s.owner]
            left = [s for s in left if s.owner]
        found += self.dispatch.recover(left, self.engine.job_for, self._restart)
        return self._settle(found, "the bot stopped while it ran")

    def _settle(self, found: Iterable[Recovery], stopped: str) -> dict[str, int]:
        """Act on what recovery found: results and interruptions into the inbox, steps
        that never started kept for `start()`; counts of each."""
        counts = {"results": 0, "interrupted": 0, "restarted": 0, "still_running": 0}
        for recovery in found:
            step = recovery.step
            if recovery.attached:
                counts["still_running"] += 1
                continue
            if recovery.not_started:
                counts["restarted"] += 1
                self._never_started.append(step)
                continue
            job = self.engine.job_for(step)
            if job is None:
                continue
            if recovery.result is not None:
                counts["results"] += 1
                self._job_ended(
                    JobEnd(step.id, step.attempt, step.incident_id, job.phase, recovery.result)
                )
            else:
                counts["interrupted"] += 1
                self._job_ended(
                    JobEnd(step.id, step.attempt, step.incident_id, job.phase, None, stopped)
                )
            self.dispatch.forget(step.runner)
        return counts

    def _restart(self, step: StepRun) -> None:
        """A claimed step whose command never started: start it now (same attempt)."""
        self.engine.restart(step)

    def start(self) -> None:
        """Resume work: steps `repair` found never started, the inbox, the outbox, the
        timers, Slack's Socket Mode."""
        never_started, self._never_started = self._never_started, []
        for step in never_started:
            self._restart(step)
        if self.replicas is not None:
            wakeups = Wakeups(
                self.config.db,
                {"runbook_inbox": self.inbox.wake, "runbook_outbox": self.outbox.wake},
            )
            threading.Thread(
                target=wakeups.run, args=(self._stopping,), name="wakeups", daemon=True
            ).start()
        self.inbox.start()
        self.outbox.start()
        if self.slack is not None:
            self.slack.start(approver_groups(self.catalog))
        self._timer = threading.Thread(
            target=self._housekeeping_loop, name="housekeeping", daemon=True
        )
        self._timer.start()
        self._reloader = threading.Thread(
            target=self.source.run,
            args=(self._stopping, self.config.catalog_refresh),
            name="catalog",
            daemon=True,
        )
        self._reloader.start()

    def stop(self, grace: float | None = None) -> bool:
        """Take no new work; let running steps finish up to the grace period.

        Steps still running after it keep running under their supervisors; the next
        start picks up their results.
        """
        grace = self.config.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        self._stopping.set()
        self.source.close()
        if self.slack is not None:
            self.slack.stop()
        self.inbox.stop(timeout=max(0.0, deadline - time.monotonic()))
        self.hub.close()  # steps on runners go on; their results come after the restart
        idle = self.executor.close(grace=max(0.0, deadline - time.monotonic()))
        if self.kubernetes is not None:  # Jobs go on in the cluster; the next start re-attaches
            idle = self.kubernetes.close(grace=max(0.0, deadline - time.monotonic())) and idle
        # Results that came in meanwhile are in the inbox: the next start applies them.
        self.outbox.stop(timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        if self._timer is not None:
            self._timer.join(5)  # it may be mid-checkpoint: let it finish before the store closes
        if self.replicas is not None:
            self._beating.set()
            self._beater.join(10)
            self.replicas.leave()  # survivors take its share and leases at their next beat
            self._state_lock.close()
        if self.writeback is not None:
            self.writeback.close()
        self.pagerduty.close()
        metrics.untrack(self)  # its database closes next: scrapes must not fail on it
        if not idle:
            log.warning(
                "grace period over with steps still running; they go on under their "
                "supervisors and the next start records their results"
            )
        return idle

    def _job_ended(self, end: JobEnd) -> None:
        """An executor's report: into the inbox, retried until the database takes it."""
        while True:
            try:
                self.inbox.put(**end_item(end))
                return
            except Exception as exc:
                if not database_unusable(exc):
                    raise
                log.error("cannot record a step result yet (%s); retrying", exc)
                time.sleep(SINK_RETRY_SECONDS)

    # --- replicas ----------------------------------------------------------------------

    def _holds(self, lease: str) -> Callable[[], bool]:
        replicas = self.replicas
        assert replicas is not None
        return lambda: replicas.holds(lease)

    def _lease_changed(self, lease: str, held: bool) -> None:
        if lease == "outbox" and held and hasattr(self, "outbox"):
            self.outbox.wake()

    def take_over_steps(self) -> dict[str, int]:
        """Steps left running by replicas that died (the timers lease's holder does this).

        Nothing is started or re-attached here, so nothing can run twice. A local step's
        supervisor puts its result in the inbox itself, even with its replica dead; a
        Kubernetes Job ends by its own deadline (the step's timeout); a step queued for a
        pull runner is the hub's, whichever replica serves the runner (its lease covers
        a runner that dies). So a step of a dead replica waits for its result until its
        timeout and `RECORD_GRACE_SECONDS` have passed; then, with none recorded, it is
        interrupted, shown in the thread and escalated.
        """
        assert self.replicas is not None
        counts = {"waiting": 0, "interrupted": 0}
        for step in self.store.running_steps():
            if (
                not step.owner
                or not self.replicas.dead(step.owner)
                or step.runner == GUARD_RUNNER
                or (step.runner.startswith("runner:") and self.store.runner_job(step.runner))
                or self.store.has_item(f"step:{step.id}:{step.attempt}:end")
            ):
                continue
            job = self.engine.job_for(step)
            timeout = job.spec.timeout if job is not None else 0.0
            if time.time() < (step.started_at or 0.0) + timeout + RECORD_GRACE_SECONDS:
                counts["waiting"] += 1
                continue
            counts["interrupted"] += 1
            log.warning(
                "incident %s step %s: replica %s died while it ran and no result came",
                step.incident_id, step.step_id, step.owner,
            )  # fmt: skip
            self._job_ended(
                JobEnd(
                    step.id,
                    step.attempt,
                    step.incident_id,
                    job.phase if job is not None else self._phase_of(step),
                    None,
                    f"replica {step.owner} stopped while it ran",
                )
            )
        return counts

    def _phase_of(self, step: StepRun) -> str:
        with self.store.unit() as u:
            run = u.run_by_id(step.run_id)
        return str(run.phase) if run is not None else "main"

    def _step_waits(self, job: Job, note: str) -> None:
        """An executor says in the thread why a claimed step has not started yet."""
        self.inbox.put(
            source="executor",
            key=f"step:{job.step_run_id}:{job.attempt}:waiting",
            incident_id=job.incident_id,
            kind=InboxKind.WAITING,
            payload={"step_run_id": job.step_run_id, "note": note},
        )

    def _housekeeping_loop(self) -> None:
        """Put expired approval deadlines in the inbox; checkpoint the database."""
        next_checkpoint = time.monotonic() + self.checkpoint_seconds
        while not self._stopping.is_set():
            deadline: float | None = None
            try:
                if self.replicas is None or self.replicas.holds("timers"):
                    for item in [*self.engine.due_expiries(), *self.engine.due_guard_ends()]:
                        self.inbox.put(**item)
                    deadline = self.store.next_deadline()
                    if self.replicas is not None:
                        self.take_over_steps()
            except Exception as exc:
                log.warning(
                    "timer check (approval deadlines, unreported bot.guard steps, steps of "
                    "replicas that died) failed: %s",
                    exc,
                )
            if time.monotonic() >= next_checkpoint:
                try:
                    self.store.checkpoint()
                except Exception as exc:
                    log.warning("database checkpoint failed: %s", exc)
                next_checkpoint = time.monotonic() + self.checkpoint_seconds
            wait = 1.0 if deadline is None else min(1.0, max(0.05, deadline - time.time()))
            wait = min(wait, max(0.0, next_checkpoint - time.monotonic()))
            self._stopping.wait(wait)

    # --- HTTP ----------------------------------------------------------------------------

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "/")
        if path == "/healthz" and method in ("GET", "HEAD"):
            return self._healthz(start_response)
        if path == "/readyz" and method in ("GET", "HEAD"):
            return self._readyz(start_response)
        if path == "/metrics" and method == "GET":
            body = metrics.exposition()
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            return [body]
        if path == "/pagerduty/webhook":
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed", {"error": "use POST"})
            return self.pagerduty.wsgi(environ, start_response)
        if path.startswith(RUNNER_ROUTES):
            return self.hub.wsgi(environ, start_response)
        if path == GUARD_PREFIX or path.startswith(GUARD_PREFIX + "/"):
            return self.guard_api.wsgi(environ, start_response)
        if path == "/slack/events":
            if self.slack is None or self.config.socket_mode:
                return _json(start_response, "404 Not Found", {"error": "Slack HTTP mode is off"})
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed", {"error": "use POST"})
            return self.slack.wsgi(environ, start_response)
        return _json(start_response, "404 Not Found", {"error": f"no route for {method} {path}"})

    def _healthz(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        status = "stopping" if self._stopping.is_set() else "ok"
        code = "503 Service Unavailable" if self._stopping.is_set() else "200 OK"
        return _json(
            start_response,
            code,
            {"status": status, "version": __version__, "catalog": self.catalog.version},
        )

    def not_ready(self) -> str:
        """Why the bot is not ready, or "" (the database probe runs at most once a second)."""
        if self._stopping.is_set():
            return "stopping"
        if self.replicas is not None and self.replicas.refused:
            return f"not serving as a replica: {self.replicas.refused}"
        with self._ready_lock:
            checked, reason = self._ready
            if time.monotonic() - checked < READY_PROBE_SECONDS and checked:
                return reason
            try:
                self.store.probe_write()
                reason = ""
            except Exception as exc:
                reason = f"the database {self.store.path} cannot be written: {exc}"
                log.error("%s", reason)
            self._ready = (time.monotonic(), reason)
            return reason

    def _readyz(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        reason = self.not_ready()
        body: dict[str, Any] = {
            "status": "not ready" if reason else "ready",
            "reason": reason,
            "catalog": self.catalog.version,
            "inbox_queued": None,
        }
        failure = self.source.last_failure
        if failure is not None:
            # Still ready: the last good catalog serves. The body says what is wrong.
            body["catalog_not_loaded"] = failure.report()
        with contextlib.suppress(Exception):
            body["inbox_queued"] = self.store.count_queued()
        return _json(start_response, "503 Service Unavailable" if reason else "200 OK", body)


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully.

    With RUNBOOK_INTAKE_PROCESS=1 (the default) the bot binds its port and hands it to
    its intake front (``bot.front``), which answers PagerDuty and passes every other
    request to this process's server on a loopback port.
    """
    from bot.front import FrontProcess, bind

    # Request threads answer Slack while workers apply items: hand the GIL over more
    # often than Python's 5 ms, so an answer never waits behind a busy worker.
    sys.setswitchinterval(0.0005)
    app = BotApp(config)
    repaired = app.repair()
    log.info("state repaired: %s", repaired)
    listener = bind(config.host, config.port)
    front: FrontProcess | None = None
    # The intake front records into the SQLite intake log; PostgreSQL takes concurrent
    # writers, so with it a request's item goes straight into the inbox, in one process.
    if config.intake_process and not app.store.postgres:
        server = HttpServer(app.wsgi, "127.0.0.1", 0, threads=app.http_threads)
        front = FrontProcess(config, listener, server.port, app.inbox.wake, app.http_threads)
    else:
        server = HttpServer(app.wsgi, sock=listener, threads=app.http_threads)
    stopping = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %s: stopping", signum)
        app.hub.end_polls()  # runners' long polls answered now: they come back later
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # SIGHUP: read the catalog again now (a storm of them costs at most one more reload).
    signal.signal(signal.SIGHUP, lambda signum, frame: app.source.request_reload())
    serving = threading.Thread(target=server.serve, name="http", daemon=True)
    serving.start()
    if front is not None:
        front.start()  # from this thread, which lives as long as the process
    # Serve first (/healthz answers while work resumes), then resume the work.
    threading.Thread(target=app.start, name="resume", daemon=True).start()
    log.info(
        "runbook-bot %s listening on %s:%s", __version__, config.host, listener.getsockname()[1]
    )
    try:
        while not stopping.wait(1.0) and serving.is_alive():
            pass
    finally:
        if front is not None:
            front.stop()  # it answers what it began (passing on needs this server)
        server.stop()
        serving.join()
        listener.close()
        idle = app.stop()
        app.store.close()
        log.info("stopped")
    if not idle:
        # Threads still wait on step supervisors past the grace period; the commands go
        # on in their own sessions and the next start records their results.
        logging.shutdown()
        os._exit(0)
