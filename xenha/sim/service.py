"""A guest's network presence: a listening socket on the guest's address while its copy is
active, and a thread per client connection.

Every copy of a protected domain binds the same address (the guest's IP moves with the
guest), with SO_REUSEPORT so that a standby can take the address over even while a hung
primary's host still holds it, as two machines claiming one IP would. A copy that stops
being active (paused, fenced, destroyed) closes its listener so new connections reach the
other copy; a hung host's listener stays and its connections hang, like a real one.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable

MAX_LINE = 4096

# (connection, request line) -> None; called from the connection's thread.
RequestHandler = Callable[[socket.socket, bytes], None]


def reserve_port(ip: str) -> socket.socket:
    """A free TCP port on `ip` for a guest created with service port 0, kept bound (not
    listening: it takes no connections) for as long as the guest lives.

    A port merely picked and released could be picked by another process too, and since
    every copy binds with SO_REUSEPORT, two unrelated guests would then share it and
    clients would reach either. Held like this, no other bind finds it free, while the
    guest's own listener (SO_REUSEPORT as well) can come and go on it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((ip, 0))
    except OSError:
        sock.close()
        raise
    return sock


class Service:
    def __init__(self, ip: str, port: int, handler: RequestHandler, *, name: str) -> None:
        self.address = (ip, port)
        self._handler = handler
        self._name = name
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()

    @property
    def listening(self) -> bool:
        return self._listener is not None

    def open(self) -> None:
        with self._lock:
            if self._listener is not None:
                return
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(self.address)
            sock.listen(64)
            self._listener = sock
        threading.Thread(
            target=self._accept_loop, args=(sock,), name=f"{self._name}-listen", daemon=True
        ).start()

    def close_listener(self) -> None:
        with self._lock:
            sock, self._listener = self._listener, None
        if sock is not None:
            # shutdown() wakes the thread blocked in accept(); close() alone may not.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """The guest is gone: its address and every connection with it."""
        self.close_listener()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with self._lock:
                if self._listener is not sock:
                    conn.close()
                    return
                self._conns.add(conn)
            threading.Thread(
                target=self._serve, args=(conn,), name=f"{self._name}-conn", daemon=True
            ).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn.makefile("rb") as reader:
                while True:
                    line = reader.readline(MAX_LINE)
                    if not line:
                        return
                    self._handler(conn, line)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
