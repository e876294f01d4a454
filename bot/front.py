"""The intake front: a process of the bot that owns its HTTP port and answers PagerDuty.

A PagerDuty delivery is answered once its item is durable in the intake log
(``bot.store.intake``). In one process, that answer waited behind the bot's own work for
the interpreter lock: under a storm the engine's threads are always runnable, and each
hand-off of the lock to a request thread waited behind them (ack p50 7-12 ms against
2 ms for a bare handler). So the bot answers from a second process that does nothing
else:

  * ``POST /pagerduty/webhook`` is handled here: verified, recorded in the intake log
    (as a recorder: the bot's process is the log's one mover), answered. Each outcome
    (accepted, duplicate, rejected) is passed to the bot as one byte on a pipe, which
    wakes its inbox and counts the delivery in its ``/metrics``.
  * Every other route (Slack, ``/runbook``, bot.guard requests, ``/metrics``,
    ``/healthz``, ``/readyz``) is passed as it came to the bot's own server on a
    loopback port, and its answer passed back: those need the bot's state and threads.

The bot binds the port and keeps it: the front serves the socket it inherits. If the
front dies, the bot starts another on the same socket (connections wait in its backlog
meanwhile); if the bot dies, the kernel kills the front (``PR_SET_PDEATHSIG``), so no
front ever acknowledges for a bot that is gone, and the port is free for the next one.
An item the front acknowledged is in the intake log, which the next bot moves first.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from bot import metrics
from bot.config import Config
from bot.pagerduty.intake import SOURCE, PagerDutyIntake
from bot.states import InboxStatus
from bot.store import intake

log = logging.getLogger(__name__)

# What the front tells the bot, one byte each (a pipe write of one byte is atomic):
# a delivery's outcome, or that it serves.
OUTCOMES = {b"a": "accepted", b"d": "duplicate", b"r": "rejected"}
_CODES = {outcome: code for code, outcome in OUTCOMES.items()}
SERVING = b"s"

PROXY_TIMEOUT = 300.0  # seconds a passed-on request may take (long polls included)
# A front that dies before it serves is started again after a pause that doubles with
# each such death in a row (a front that cannot start must not spin); one that served
# is replaced at once.
FIRST_PAUSE, MAX_PAUSE = 0.05, 5.0
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
_PR_SET_PDEATHSIG = 1


def bind(host: str, port: int) -> socket.socket:
    """The bot's listening socket (the front serves it; the bot keeps it open)."""
    family, kind, proto, _name, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except BaseException:
        sock.close()
        raise
    return sock


# --- in the front's process ------------------------------------------------------------


class Front:
    """The front's WSGI app: PagerDuty deliveries here, everything else to the bot."""

    def __init__(self, config: Config, log_: intake.IntakeLog, bot_port: int, tell: int) -> None:
        self.log = log_
        self.bot_port = bot_port
        self.tell = tell  # the pipe to the bot
        self.pagerduty = PagerDutyIntake(config, self.receive, counted=self.counted)

    def receive(self, **item: Any) -> bool:
        """Record a delivery's item in the intake log; True when new (else a duplicate)."""
        values = intake.row(
            **item, received_at=time.time(), status=InboxStatus.QUEUED, catalog_commit=""
        )
        return self.log.record(values)

    def counted(self, outcome: str) -> None:
        """Tell the bot: its inbox wakes for an accepted item, its /metrics counts it.
        Never blocks: with the bot not reading (stopped), a count is dropped, the item
        is not (the bot's inbox also looks for items every second)."""
        with contextlib.suppress(BlockingIOError, BrokenPipeError):
            os.write(self.tell, _CODES[outcome])

    def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/pagerduty/webhook" and environ["REQUEST_METHOD"] == "POST":
            return self.pagerduty.wsgi(environ, start_response)
        return self.pass_on(environ, start_response)

    def pass_on(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        """The request as it came, to the bot's server; its answer as it came back."""
        length = environ.get("CONTENT_LENGTH") or ""
        body = environ["wsgi.input"].read(int(length)) if length.isdigit() else b""
        path = environ.get("PATH_INFO", "/")
        if environ.get("QUERY_STRING"):
            path += "?" + environ["QUERY_STRING"]
        headers = {
            key[5:].replace("_", "-").title(): value
            for key, value in environ.items()
            if key.startswith("HTTP_") and key[5:].replace("_", "-").lower() not in _HOP_BY_HOP
        }
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        headers["Content-Length"] = str(len(body))
        headers["Connection"] = "close"
        conn = http.client.HTTPConnection("127.0.0.1", self.bot_port, timeout=PROXY_TIMEOUT)
        try:
            conn.request(environ["REQUEST_METHOD"], path, body=body, headers=headers)
            answer = conn.getresponse()
            data = answer.read()
        except OSError as exc:
            log.warning("the bot did not answer %s %s: %s", environ["REQUEST_METHOD"], path, exc)
            reply = json.dumps({"error": "the bot is not answering; retry"}).encode()
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "application/json"), ("Content-Length", str(len(reply)))],
            )
            return [reply]
        finally:
            conn.close()
        start_response(
            f"{answer.status} {answer.reason}",
            [(k, v) for k, v in answer.getheaders() if k.lower() not in _HOP_BY_HOP],
        )
        return [data]


def _die_with_parent(parent: int) -> None:
    """SIGKILL when the bot's process ends (Linux): a front never outlives its bot."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it ended before the request took effect
        os._exit(1)


def main(argv: list[str]) -> int:
    """`bot.front.main LISTEN_FD TELL_FD BOT_PORT PARENT_PID THREADS` (started by the bot)."""
    from bot.logs import configure_logging
    from bot.web import HttpServer

    listen_fd, tell, bot_port, parent, threads = (int(a) for a in argv)
    _die_with_parent(parent)
    config = Config.from_env()
    configure_logging(config)
    sys.setswitchinterval(0.0005)
    os.set_blocking(tell, False)
    log_ = intake.IntakeLog(config.db, mover=False)
    front = Front(config, log_, bot_port, tell)
    server = HttpServer(
        front.wsgi,
        sock=socket.socket(fileno=listen_fd),
        threads=threads,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: server.stop())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the bot stops it (a Ctrl-C reaches both)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # the catalog is the bot's
    with contextlib.suppress(BlockingIOError, BrokenPipeError):
        os.write(tell, SERVING)
    try:
        server.serve()
    finally:
        front.pagerduty.close()
        log_.close()
    return 0


# --- in the bot's process --------------------------------------------------------------


class FrontProcess:
    """The bot's side: starts the front on the bot's socket, reads what it tells, starts
    a new one if it dies, stops it first on shutdown."""

    def __init__(
        self,
        config: Config,
        listener: socket.socket,
        bot_port: int,
        wake: Callable[[], None],
        threads: int,
    ) -> None:
        """`threads`: request threads of the front, as many as the bot's server has (a
        passed-on long poll holds one in each)."""
        self.config = config
        self.threads = threads
        self.listener = listener
        self.bot_port = bot_port
        self.wake = wake
        self._stopping = threading.Event()
        self._serving = threading.Event()  # the front started last said it serves
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self.starts = 0
        self._read_end, self._write_end = os.pipe()

    def start(self) -> None:
        """Start the front (from the main thread: the front dies with the thread that
        started it) and the threads that read it and keep it running."""
        self._spawn()
        threading.Thread(target=self._read_loop, name="front-counts", daemon=True).start()
        threading.Thread(target=self._keep_running, name="front", daemon=True).start()

    def _spawn(self) -> None:
        env = {**os.environ, **self.config.to_env()}
        argv = [
            sys.executable,
            "-c",
            "import sys; from bot.front import main; sys.exit(main(sys.argv[1:]))",
            str(self.listener.fileno()),
            str(self._write_end),
            str(self.bot_port),
            str(os.getpid()),
            str(self.threads),
        ]
        with self._lock:
            if self._stopping.is_set():
                return
            self._serving.clear()
            self._proc = subprocess.Popen(
                argv, env=env, pass_fds=(self.listener.fileno(), self._write_end)
            )
            self.starts += 1
        log.info("intake front started (pid %d)", self._proc.pid)

    @property
    def pid(self) -> int | None:
        with self._lock:
            return self._proc.pid if self._proc is not None else None

    def _keep_running(self) -> None:
        failed = 0  # fronts in a row that died before they served
        while not self._stopping.is_set():
            with self._lock:
                proc = self._proc
            if proc is None:
                return
            code = proc.wait()
            if self._stopping.is_set():
                return
            failed = 0 if self._serving.is_set() else failed + 1
            pause = min(MAX_PAUSE, FIRST_PAUSE * 2 ** (failed - 1)) if failed else 0.0
            log.error("the intake front exited (%s); starting another in %.2fs", code, pause)
            self._stopping.wait(pause)
            # Not the main thread: this one lives as long as the bot, and the front
            # dies with the thread that started it.
            self._spawn()

    def _read_loop(self) -> None:
        while True:
            try:
                data = os.read(self._read_end, 4096)
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return
            if not data:
                return
            accepted = False
            for code in data:
                if bytes((code,)) == SERVING:
                    self._serving.set()
                    continue
                outcome = OUTCOMES.get(bytes((code,)))
                if outcome is None:
                    continue
                metrics.webhook_deliveries.labels(SOURCE, outcome).inc()
                accepted |= outcome == "accepted"
            if accepted:
                self.wake()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the front: it answers what it has begun (up to `timeout`), takes no more."""
        self._stopping.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(OSError):
            os.close(self._write_end)  # the reader sees the end once the front's copy is gone
