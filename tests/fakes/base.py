"""Shared machinery of the stand-ins: a real HTTP(S) server on 127.0.0.1 in a daemon thread.

A subclass calls ``super().__init__`` first (nobody knows the URL before construction
returns), then says how to name a request (`call_name`), how to answer it (`handle`) and
what an error body looks like (`error_body`). This module does the rest: parsing, recording
every call, waiting for calls, queued faults (429 with ``Retry-After``, 500, ...), outages
(`down`: every call fails or hangs), answers lost after the call took effect
(`lose_answer`), latency.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

ANY = "*"
"""Fault and latency key matching every call."""


@dataclass(frozen=True)
class Request:
    """A parsed request, as handed to `FakeServer.handle`."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased
    form: dict[str, str]  # application/x-www-form-urlencoded body, else empty
    json: Any  # decoded application/json body, else None


@dataclass(frozen=True)
class Call:
    """One request the stand-in received, and what it answered."""

    method: str  # HTTP verb: "POST"
    path: str  # URL path without query: "/api/chat.postMessage", "/incidents/P1/notes"
    name: str  # Slack: "chat.postMessage"; PagerDuty: "POST /incidents/P1/notes"
    params: dict[str, Any]  # query + form fields (Slack also merges the JSON body in)
    json: Any  # decoded JSON body, or None
    headers: dict[str, str]  # names lower-cased: call.headers["authorization"]
    status: int  # HTTP status the stand-in answered with
    response: Any  # JSON body the stand-in answered with
    at: float = 0.0  # time.monotonic() when the stand-in decided its answer
    answered: bool = True  # False: handled, but the answer never reached the client


@dataclass
class Reply:
    status: int
    body: Any  # JSON; bytes sent as text/plain; an iterator of bytes streamed (chunked)
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Fault:
    status: int
    retry_after: int | None


@dataclass(frozen=True)
class _LostAnswer:
    """Handle the call, then hold the answer `delay` seconds (None: drop the connection)."""

    delay: float | None
    match: Callable[[dict[str, Any]], bool] | None


class FakeServer:
    """Base class: start on construction, stop with `stop()` or by leaving a ``with`` block."""

    def __init__(self, *, latency: float = 0.0, tls: bool = False) -> None:
        self._cond = threading.Condition(threading.RLock())
        self._calls: list[Call] = []
        self._faults: defaultdict[str, deque[_Fault]] = defaultdict(deque)
        self._lost: defaultdict[str, deque[_LostAnswer]] = defaultdict(deque)
        self._latency: dict[str, float] = {ANY: latency}
        self._down: int | None = None  # outage: every call answers this status (0: hangs)
        self._up = threading.Event()
        self._up.set()
        self.errors: list[BaseException] = []
        self._connections: set[socket.socket] = set()
        """Exceptions raised inside the stand-in itself (answered as 500): bugs in the fake."""
        self._tls = tls
        self._httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.fake = self
        if tls:
            cert, key = _certificate()
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            # Handshake lazily in the per-connection thread, not in the accept loop.
            self._httpd.socket = context.wrap_socket(
                self._httpd.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{type(self).__name__}-server",
            daemon=True,
        )
        self._thread.start()
        self._stopped = False

    # -- lifecycle ------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Server root without trailing slash: ``http://127.0.0.1:PORT`` (https if tls)."""
        host, port = self._httpd.server_address[:2]
        name = host.decode() if isinstance(host, bytes) else host
        return f"{'https' if self._tls else 'http'}://{name}:{port}"

    @property
    def ca_file(self) -> str | None:
        """PEM file to trust (e.g. as ``SSL_CERT_FILE``) when tls is on, else None."""
        return _certificate()[0] if self._tls else None

    def client_ssl_context(self) -> ssl.SSLContext:
        """A client-side context trusting this server (pass as httpx's ``verify=``)."""
        return ssl.create_default_context(cafile=self.ca_file)

    def stop(self) -> None:
        """Stop serving and close the listening socket. Safe to call twice."""
        if self._stopped:
            return
        self._stopped = True
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        with self._cond:  # kept-alive connections go too: a stopped server is gone
            connections, self._connections = set(self._connections), set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- recorded calls -------------------------------------------------------------------

    @property
    def calls(self) -> list[Call]:
        """Snapshot of every call received so far, in arrival order."""
        with self._cond:
            return list(self._calls)

    def calls_to(self, name: str) -> list[Call]:
        """Calls whose `Call.name` equals ``name``."""
        return [call for call in self.calls if call.name == name]

    def wait_until(self, condition: Callable[[], Any], timeout: float = 5.0) -> Any:
        """Block until ``condition()`` is truthy (re-checked after every call); return it.

        The condition runs under the stand-in's lock, so it may use the query helpers.
        Raises AssertionError, listing the calls seen, on timeout.
        """
        with self._cond:
            result = self._cond.wait_for(condition, timeout)
            if not result:
                seen = ", ".join(f"{c.name}->{c.status}" for c in self._calls) or "none"
                raise AssertionError(f"condition not met within {timeout}s; calls: {seen}")
            return result

    def wait_for(self, predicate: Callable[[Call], bool], timeout: float = 5.0) -> Call:
        """Return the first call (already received or still to come) matching ``predicate``."""
        found: Call = self.wait_until(
            lambda: next((c for c in self._calls if predicate(c)), None), timeout
        )
        return found

    def wait_for_calls(self, name: str, count: int = 1, timeout: float = 5.0) -> list[Call]:
        """Wait until ``count`` calls named ``name`` arrived; return the first ``count``."""

        def enough() -> list[Call] | None:
            hits = [c for c in self._calls if c.name == name]
            return hits[:count] if len(hits) >= count else None

        calls: list[Call] = self.wait_until(enough, timeout)
        return calls

    # -- fault injection ------------------------------------------------------------------

    def rate_limit(self, name: str = ANY, *, times: int = 1, retry_after: int = 1) -> None:
        """Answer the next ``times`` calls to ``name`` with 429 and ``Retry-After``."""
        self.fail(name, status=429, times=times, retry_after=retry_after)

    def fail(
        self, name: str = ANY, *, status: int = 500, times: int = 1, retry_after: int | None = None
    ) -> None:
        """Answer the next ``times`` calls to ``name`` with ``status`` (500 by default).

        Faults are consumed in the order queued; ``name`` is matched exactly against
        `Call.name`, ``"*"`` matches any call. Faulted calls are recorded too.
        """
        with self._cond:
            self._faults[name].extend([_Fault(status, retry_after)] * times)

    def lose_answer(
        self,
        name: str = ANY,
        *,
        delay: float | None = None,
        times: int = 1,
        match: Callable[[dict[str, Any]], bool] | None = None,
    ) -> None:
        """Let the next ``times`` calls to ``name`` take effect, and lose their answers.

        The call is handled (a message is posted) and recorded, then the answer is held
        for ``delay`` seconds, longer than the client waits, or, with ``delay=None``, the
        connection is closed without an answer: the client cannot know what happened.
        ``match`` (on the call's params) picks which calls qualify.
        """
        with self._cond:
            self._lost[name].extend([_LostAnswer(delay, match)] * times)

    def down(self, status: int = 503) -> None:
        """An outage until `up()`: every call answers `status`, or hangs when `status` is 0
        (the client's own timeout ends it). Calls during an outage are recorded too."""
        with self._cond:
            self._down = status
            self._up.clear()

    def up(self) -> None:
        """The end of an outage; hanging calls are answered 503 (their client gave up)."""
        with self._cond:
            self._down = None
            self._up.set()

    def set_latency(self, seconds: float, name: str = ANY) -> None:
        """Delay answers to ``name`` (or to every call) by ``seconds``."""
        with self._cond:
            self._latency[name] = seconds

    # -- for subclasses -------------------------------------------------------------------

    def call_name(self, request: Request) -> str:
        raise NotImplementedError

    def call_params(self, request: Request) -> dict[str, Any]:
        return {**request.query, **request.form}

    def handle(self, request: Request) -> Reply:
        """Answer a request; runs under the stand-in's lock."""
        raise NotImplementedError

    def error_body(self, status: int) -> Any:
        raise NotImplementedError

    # -- internals ------------------------------------------------------------------------

    def _dispatch(
        self, method: str, target: str, headers: dict[str, str], raw: bytes
    ) -> Reply | None:
        """The answer to send, or None to close the connection without one."""
        request = _parse(method, target, headers, raw)
        name = self.call_name(request)
        with self._cond:
            delay = self._latency.get(name, self._latency[ANY])
            down = self._down
        if down == 0:
            self._up.wait(120)
            down = 503
        if delay:
            time.sleep(delay)
        lost: _LostAnswer | None = None
        with self._cond:
            fault = _Fault(down, None) if down is not None else self._pop_fault(name)
            if fault is not None:
                extra = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
                reply = Reply(fault.status, self.error_body(fault.status), extra)
            else:
                lost = self._pop_lost(name, self.call_params(request))
                try:
                    reply = self.handle(request)
                except Exception as exc:  # a bug in the stand-in; make it loud
                    self.errors.append(exc)
                    reply = Reply(500, {"error": f"stand-in crashed: {exc!r}"})
            self._calls.append(
                Call(
                    method=request.method,
                    path=request.path,
                    name=name,
                    params=self.call_params(request),
                    json=request.json,
                    headers=request.headers,
                    status=reply.status,
                    response=reply.body,
                    at=time.monotonic(),
                    answered=lost is None,
                )
            )
            self._cond.notify_all()
        if lost is not None:
            if lost.delay is None:
                return None
            time.sleep(lost.delay)
        return reply

    def _pop_lost(self, name: str, params: dict[str, Any]) -> _LostAnswer | None:
        for key in (name, ANY):
            queue = self._lost[key]
            for i, lost in enumerate(queue):
                if lost.match is None or lost.match(params):
                    del queue[i]
                    return lost
        return None

    def _pop_fault(self, name: str) -> _Fault | None:
        for key in (name, ANY):
            if self._faults[key]:
                return self._faults[key].popleft()
        return None


def _parse(method: str, target: str, headers: dict[str, str], raw: bytes) -> Request:
    parts = urlsplit(target)
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    form: dict[str, str] = {}
    body: Any = None
    if content_type == "application/x-www-form-urlencoded":
        form = dict(parse_qsl(raw.decode(), keep_blank_values=True))
    elif content_type == "application/json" and raw:
        body = json.loads(raw)
    return Request(
        method=method,
        path=parts.path,
        query=dict(parse_qsl(parts.query, keep_blank_values=True)),
        headers=headers,
        form=form,
        json=body,
    )


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    fake: FakeServer


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.1 with keep-alive, as the real APIs answer: a client reuses its connections
    (and TLS sessions) instead of paying a handshake per call."""

    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        with self.server.fake._cond:
            self.server.fake._connections.add(self.connection)

    def finish(self) -> None:
        with self.server.fake._cond:
            self.server.fake._connections.discard(self.connection)
        super().finish()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        reply = self.server.fake._dispatch(self.command, self.path, headers, raw)
        if reply is None:  # the answer is lost: close without one
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if isinstance(reply.body, Iterator):
            self._stream(reply)
            return
        # bytes are sent as they are (a pod's log); anything else as JSON
        raw_body = isinstance(reply.body, bytes)
        data = reply.body if raw_body else json.dumps(reply.body).encode()
        try:
            self.send_response(reply.status)
            self.send_header(
                "Content-Type",
                "text/plain; charset=utf-8" if raw_body else "application/json; charset=utf-8",
            )
            self.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True  # the client gave up waiting (a lost answer, a hang)

    def _stream(self, reply: Reply) -> None:
        """An iterator of bytes, sent as it comes (chunked): a followed log."""
        try:
            self.send_response(reply.status)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in reply.body:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            self.close_connection = True

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


@cache
def _certificate() -> tuple[str, str]:
    """A throwaway self-signed certificate for 127.0.0.1, made once per process."""
    directory = Path(tempfile.mkdtemp(prefix="runbook-bot-fake-tls-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    command = [
        "openssl", "req", "-x509", "-nodes", "-days", "2",
        "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        "-keyout", str(key), "-out", str(cert),
    ]  # fmt: skip
    try:
        subprocess.run(command, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"cannot make a test TLS certificate with openssl: {exc}") from exc
    return str(cert), str(key)
