"""The bot's HTTP server: waitress, stoppable from any thread.

Used by the bot's process (``bot.server``) and by its intake front (``bot.front``), which
imports this module alone and so starts without the engine's modules.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

from bot.errors import ConfigError

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class BadRequest(Exception):
    """What a route cannot take from a request; answered 400 with this text."""


def json_object(
    environ: dict[str, Any], max_bytes: int, *, empty_is_object: bool = False
) -> dict[str, Any]:
    """The request's body, a JSON object of at most `max_bytes` (an empty body is `{}`
    when `empty_is_object`); BadRequest says what is wrong with it."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise BadRequest("no Content-Length") from None
    if length > max_bytes:
        raise BadRequest(f"body over {max_bytes} bytes")
    raw = environ["wsgi.input"].read(length)
    try:
        body = json.loads(raw or (b"{}" if empty_is_object else b"null"))
    except ValueError:
        raise BadRequest("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the body is not a JSON object")
    return body


# Largest request body waitress accepts (its own default is 1 GiB, spooled to disk and
# then read by the route). Above it waitress answers 413 and no route sees the request.
MAX_REQUEST_BODY_BYTES = 1024 * 1024


class HttpServer:
    """`app` on waitress (the production server), stoppable from any thread.

    waitress's own `close()` from another thread races with its `select()`; here the loop
    runs one round at a time, and `stop()` only sets a flag and wakes it, so the sockets
    are closed on the loop's own thread. Its threads only verify, record and acknowledge.
    """

    def __init__(
        self,
        app: WSGIApp,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        threads: int = 4,
        sock: socket.socket | None = None,
    ) -> None:
        """Listen on `host`:`port`, or serve `sock`, a socket already listening."""
        from waitress.server import BaseWSGIServer, create_server

        self._map: dict[int, Any] = {}
        where: dict[str, Any] = (
            {"sockets": [sock]} if sock is not None else {"host": host, "port": port}
        )
        server = create_server(
            app,
            map=self._map,
            **where,
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
