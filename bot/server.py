"""The bot's process: one WSGI app on one port, served by waitress.

Routes:
  POST /pagerduty/webhook   PagerDuty V3 webhooks (bot.pagerduty)
  POST /slack/events        Slack Events API in HTTP mode (bot.chat.slack)
  GET  /metrics             Prometheus exposition (bot.metrics)
  GET  /healthz             liveness/readiness: the database answers

Request handlers only verify, record and acknowledge; the work (posting to Slack,
running steps) happens on a bounded worker pool, so Slack gets its answer within 3 s
and PagerDuty within 5 s whatever a command does.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from bot import __version__, metrics
from bot.catalog import load_catalog
from bot.chat.base import NullChat
from bot.config import Config
from bot.engine import Engine, EngineListener
from bot.errors import ConfigError
from bot.store import Store

if TYPE_CHECKING:
    from bot.chat.slack import SlackAdapter, SlackTuning

log = logging.getLogger(__name__)

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

# How often the housekeeping thread copies the SQLite WAL into the database file. Often
# enough that the WAL never reaches the store's auto-checkpoint limit, which would make a
# request pay for the checkpoint: an incident writes about 60 WAL pages, so even 100 new
# incidents a second stay under it. With nothing new to copy a checkpoint costs microseconds.
CHECKPOINT_SECONDS = 1.0

# Largest request body waitress accepts (its own default is 1 GiB, spooled to disk and
# then read by the route). Above it waitress answers 413 and no route sees the request:
# at the Content-Length header, before reading the body; a chunked body once it passes
# the limit. Slack events and PagerDuty webhooks are a few kB; the PagerDuty route
# refuses more than 256 KiB itself.
MAX_REQUEST_BODY_BYTES = 1024 * 1024


class WorkerPool:
    """A thread pool with a bound on queued work, so a storm cannot exhaust memory."""

    def __init__(self, workers: int, max_queued: int = 10_000) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="runbook-worker"
        )
        self._slots = threading.BoundedSemaphore(workers + max_queued)
        self._closed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any] | None:
        if self._closed or not self._slots.acquire(timeout=5):
            log.error("worker pool full or closed; work stays queued in the database")
            return None

        def run() -> Any:
            try:
                return fn(*args)
            except Exception:
                log.exception("background work failed")
                return None
            finally:
                self._slots.release()

        return self._executor.submit(run)

    def shutdown(self, grace: float) -> bool:
        """Stop taking work; wait up to `grace` seconds for running work. True if idle."""
        self._closed = True
        done = threading.Event()

        def wait() -> None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            done.set()

        threading.Thread(target=wait, daemon=True).start()
        return done.wait(grace)


class BotApp:
    """Everything the process runs: the engine, its adapters, the expiry timer, the routes.

    ``slack_tuning`` changes the Slack adapter's pacing, retry and cache settings (tests
    and benchmarks make them small); production uses the defaults.
    """

    def __init__(self, config: Config, *, slack_tuning: SlackTuning | None = None) -> None:
        self.config = config
        self._slack_tuning = slack_tuning
        self.catalog = load_catalog(config.catalog)
        self.store = Store(config.db)
        self.pool = WorkerPool(config.workers)
        self.listeners: list[EngineListener] = []
        self.engine = Engine(
            self.catalog,
            self.store,
            NullChat(),
            default_env=config.env,
            listeners=self.listeners,
        )
        self._stopping = threading.Event()
        self._timer: threading.Thread | None = None
        self.checkpoint_seconds = CHECKPOINT_SECONDS
        self.slack = self._build_slack()
        self.intake = self._build_intake()
        metrics.set_info(__version__, self.catalog.version)
        metrics.track_pending_approvals(lambda: float(self.store.count_pending_approvals()))

    # Slack: the chat adapter and the /slack/events route (bot.chat.slack).
    def _build_slack(self) -> SlackAdapter | None:
        if not self.config.slack_enabled:
            log.warning("SLACK_BOT_TOKEN is not set: threads are not posted anywhere")
            return None
        from bot.chat.slack import SlackAdapter

        adapter = SlackAdapter(self.config, self, self._slack_tuning)
        self.engine.chat = adapter.chat
        self.engine.member_of = adapter.member_of
        self.engine.bot_users = set(adapter.bot_user_ids)
        return adapter

    # PagerDuty: the webhook route, its durable queue, and REST write-back (bot.pagerduty).
    def _build_intake(self) -> Any:
        # No ImportError fallback: a broken install must fail at start, not answer every
        # webhook with 503.
        from bot.pagerduty import PagerDutyIntake

        return PagerDutyIntake(self.config, self)

    # --- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        recovered = self.engine.recover()
        log.info("recovered state: %s", recovered)
        if self.slack is not None:
            self.slack.start()
        if self.intake is not None:
            self.intake.start()
        self._timer = threading.Thread(
            target=self._housekeeping_loop, name="housekeeping", daemon=True
        )
        self._timer.start()

    def stop(self, grace: float | None = None) -> bool:
        """Stop taking work, let running steps finish up to the grace period."""
        grace = self.config.shutdown_grace if grace is None else grace
        self._stopping.set()
        self.engine.stop_taking_work()
        if self.intake is not None:
            self.intake.stop()
        idle = self.pool.shutdown(grace)
        if self._timer is not None:
            self._timer.join(5)  # it may be mid-checkpoint: let it finish before the store closes
        if self.slack is not None:
            self.slack.stop()
        if not idle:
            log.warning(
                "grace period over with steps still running; they will show as "
                "interrupted at the next start"
            )
        return idle

    def _housekeeping_loop(self) -> None:
        """Expire approvals at their deadlines; checkpoint the database off the request path."""
        next_checkpoint = time.monotonic() + self.checkpoint_seconds
        while not self._stopping.is_set():
            try:
                self.engine.expire_due()
                deadline = self.store.next_deadline()
            except Exception:
                log.exception("approval expiry failed")
                deadline = None
            if time.monotonic() >= next_checkpoint:
                try:
                    self.store.checkpoint()
                except Exception:
                    log.exception("database checkpoint failed")
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
        if path == "/metrics" and method == "GET":
            body = metrics.exposition()
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4; charset=utf-8")])
            return [body]
        if path == "/pagerduty/webhook":
            if self.intake is None:
                return _json(
                    start_response, "503 Service Unavailable", {"error": "intake not available"}
                )
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed", {"error": "use POST"})
            result: Iterable[bytes] = self.intake.wsgi(environ, start_response)
            return result
        if path == "/slack/events":
            if self.slack is None or self.config.socket_mode:
                return _json(start_response, "404 Not Found", {"error": "Slack HTTP mode is off"})
            if method != "POST":
                return _json(start_response, "405 Method Not Allowed", {"error": "use POST"})
            return self.slack.wsgi(environ, start_response)
        return _json(start_response, "404 Not Found", {"error": f"no route for {method} {path}"})

    def _healthz(self, start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            self.store.query_one("SELECT 1 AS ok")
        except Exception:
            return _json(
                start_response, "503 Service Unavailable", {"status": "database unavailable"}
            )
        status = "stopping" if self._stopping.is_set() else "ok"
        code = "503 Service Unavailable" if self._stopping.is_set() else "200 OK"
        return _json(
            start_response,
            code,
            {"status": status, "version": __version__, "catalog": self.catalog.version},
        )


def _json(start_response: Callable[..., Any], status: str, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


class HttpServer:
    """`app` on waitress (the production server), stoppable from any thread.

    waitress's own `close()` from another thread races with its `select()`; here the loop
    runs one round at a time, and `stop()` only sets a flag and wakes it, so the sockets
    are closed on the loop's own thread. Its threads only verify, record and acknowledge.
    """

    def __init__(self, app: WSGIApp, host: str, port: int, *, threads: int = 4) -> None:
        from waitress.server import BaseWSGIServer, create_server

        self._map: dict[int, Any] = {}
        server = create_server(
            app,
            map=self._map,
            host=host,
            port=port,
            threads=threads,
            ident="runbook-bot",
            clear_untrusted_proxy_headers=True,
            max_request_body_size=MAX_REQUEST_BODY_BYTES,
        )
        if not isinstance(server, BaseWSGIServer):  # several sockets: not what we asked
            server.close()
            raise ConfigError("HOST must be one address to listen on")
        self._server = server
        self._stopping = threading.Event()
        self._closed = False

    @property
    def port(self) -> int:
        """The bound port (construct with port=0 for any free one)."""
        return int(self._server.getsockname()[1])

    def serve(self) -> None:
        """Serve until `stop()`; then close every connection and wait for running requests."""
        from waitress import wasyncore

        try:
            while not self._stopping.is_set():
                wasyncore.loop(
                    timeout=1.0,
                    map=self._map,
                    use_poll=self._server.adj.asyncore_use_poll,
                    count=1,
                )
        finally:
            # Before closing: once the wake-up pipe is closed its descriptor number may
            # be reused, and a late stop() must not write into someone else's file.
            self._closed = True
            wasyncore.close_all(self._map, ignore_all=True)
            self._server.task_dispatcher.shutdown(timeout=5)

    def stop(self) -> None:
        """Safe from a signal handler: sets a flag and writes a byte to a pipe."""
        self._stopping.set()
        if self._closed:
            return
        # Wakes the loop at once; if the wake-up pipe is already gone the loop still sees
        # the flag within its 1 s poll timeout.
        with contextlib.suppress(OSError):
            self._server.pull_trigger()


def serve(config: Config) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    app = BotApp(config)
    server = HttpServer(app.wsgi, config.host, config.port, threads=max(4, config.workers))
    app.start()

    def on_signal(signum: int, frame: Any) -> None:
        log.info("signal %s: stopping", signum)
        server.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log.info("runbook-bot %s listening on %s:%s", __version__, config.host, server.port)
    try:
        server.serve()
    finally:
        idle = app.stop()
        app.store.close()
        log.info("stopped")
    if not idle:
        # Worker threads still run commands past the grace period; the interpreter would
        # wait for them at exit. Their steps are in the database as running and show as
        # interrupted, for a human to check, at the next start.
        logging.shutdown()
        os._exit(0)
