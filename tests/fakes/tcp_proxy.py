"""A TCP relay on 127.0.0.1 that a test can cut: one replica's network path to PostgreSQL.

What it models: the network between one client and a server failing while the server
itself stays up for everyone else. `cut()` resets every relayed connection (both ends
see their socket closed, as after a lost route or a killed proxy) and refuses new ones
until `restore()`. Bytes are relayed unchanged in both directions; nothing else about
the network (latency, partial writes, half-open connections) is modelled.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._cut = False
        self._closed = False
        threading.Thread(target=self._accept, name="tcp-proxy", daemon=True).start()

    def url(self, database_url: str) -> str:
        """`database_url` (postgresql://user@host:port/db) through this relay."""
        host_port = f"{self.target[0]}:{self.target[1]}"
        assert host_port in database_url, database_url
        return database_url.replace(host_port, f"127.0.0.1:{self.port}")

    def cut(self) -> None:
        with self._lock:
            self._cut = True
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
                    sock.close()

    def restore(self) -> None:
        with self._lock:
            self._cut = False

    def close(self) -> None:
        self._closed = True
        self.cut()
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                refused = self._cut
            if refused:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._pairs.append((client, server))
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        other = {client: server, server: client}
        with selectors.DefaultSelector() as selector:
            for sock in other:
                sock.setblocking(True)
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select(timeout=1.0):
                        sock = key.fileobj
                        assert isinstance(sock, socket.socket)
                        data = sock.recv(65536)
                        if not data:
                            return
                        other[sock].sendall(data)
                    if client.fileno() < 0 or server.fileno() < 0:
                        return
            except (OSError, ValueError):
                return
            finally:
                for sock in other:
                    with contextlib.suppress(OSError):
                        sock.close()
