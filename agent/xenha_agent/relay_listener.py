"""One relay port per node, many replications behind it: route by SNI, terminate TLS elsewhere.

The node listener (run by the agent, `NodeListener`) accepts a peer's TCP connection, *peeks*
at its ClientHello without consuming it, reads the SNI `<uid>.xenha`, and hands the untouched
socket to that replication's replicator over the Unix socket `$XENHA_RUN_DIR/<uid>.accept.sock`
(SCM_RIGHTS). The replicator then does the TLS handshake itself with its replication's CA and
certificate (`HandoffServer`). So:

- one port per node (XenNode.status.relayEndpoint) serves every replication;
- the router holds no key material and no state: it finds replicators by file name, which is
  why an agent restart loses nothing (the replicator keeps its connection, and a new agent
  routes new ones the same way);
- a connection for a replication this node does not serve is closed after the peek.

`DirectListener` is the same interface on a port of the replicator's own, for deployments
or tests without a node listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from pathlib import Path
from typing import Protocol

from xenha_agent.relay import parse_address
from xenha_agent.tls import (
    NeedMoreData,
    NotClientHello,
    client_hello_server_name,
    uid_from_server_name,
)

log = logging.getLogger(__name__)

_PEEK_MAX = 16 << 10


def accept_socket_path(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.accept.sock"


class RawAcceptor(Protocol):
    """Where a secondary replicator gets its peer's TCP connections (TLS not started)."""

    def accept(self) -> socket.socket: ...

    def close(self) -> None: ...


# --- replicator side --------------------------------------------------------------------------


class HandoffServer:
    """Receives the TCP sockets the node listener routes to one replication."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o077)
        try:
            self._sock.bind(str(path))
        finally:
            os.umask(old)
        self._sock.listen(16)

    def accept(self) -> socket.socket:
        """Blocks until a connection is handed over; OSError once closed."""
        while True:
            conn, _ = self._sock.accept()
            with conn:
                conn.settimeout(5.0)
                try:
                    _, fds, _, _ = socket.recv_fds(conn, 16, 4)
                except OSError as e:
                    log.warning("handoff from the node listener failed: %s", e)
                    continue
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                log.warning("handoff carried %d descriptors, expected 1", len(fds))
                continue
            sock = socket.socket(fileno=fds[0])
            if sock.type != socket.SOCK_STREAM:
                sock.close()
                continue
            sock.setblocking(True)
            return sock

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class DirectListener:
    """A replicator's own TCP port (no node listener in front)."""

    def __init__(self, address: str) -> None:
        host, port = parse_address(address)
        self._sock = socket.create_server((host, port), reuse_port=False)
        self.port: int = self._sock.getsockname()[1]

    def accept(self) -> socket.socket:
        conn, _ = self._sock.accept()
        conn.setblocking(True)
        return conn

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


# --- node side --------------------------------------------------------------------------------


def hand_over(sock: socket.socket, path: Path, *, timeout: float = 2.0) -> None:
    """Pass `sock`'s descriptor to the replicator listening on `path`."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix:
        unix.settimeout(timeout)
        unix.connect(str(path))
        socket.send_fds(unix, [b"x"], [sock.fileno()])


class NodeListener:
    """The agent's relay port: routes each peer connection to its replicator by SNI."""

    def __init__(
        self, run_dir: Path, address: str, *, hello_timeout: float = 5.0, backlog: int = 128
    ) -> None:
        self.run_dir = run_dir
        self._address = parse_address(address)
        self._hello_timeout = hello_timeout
        self._backlog = backlog
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.routed = 0
        self.refused = 0

    @property
    def port(self) -> int:
        assert self._sock is not None, "not started"
        return int(self._sock.getsockname()[1])

    async def start(self) -> None:
        sock = socket.create_server(self._address, backlog=self._backlog)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop(sock), name="relay-listener")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as e:
                log.warning("relay listener accept failed: %s", e)
                await asyncio.sleep(0.1)
                continue
            task = asyncio.create_task(self._route(conn, peer))
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)

    async def _route(self, conn: socket.socket, peer: object) -> None:
        try:
            uid = await self._peek_uid(conn)
            path = accept_socket_path(self.run_dir, uid) if uid is not None else None
            if path is None or not path.exists():
                self.refused += 1
                log.info("relay: refused %s (SNI names no replication served here)", peer)
                return
            await asyncio.get_running_loop().run_in_executor(None, hand_over, conn, path)
            self.routed += 1
        except (OSError, TimeoutError, NotClientHello) as e:
            self.refused += 1
            log.info("relay: dropped %s: %s", peer, e)
        finally:
            conn.close()  # ours only: the replicator holds its own descriptor

    async def _peek_uid(self, conn: socket.socket) -> str | None:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + self._hello_timeout
        seen = -1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no complete ClientHello in time")
            async with asyncio.timeout(left):
                await _readable(loop, conn)
            data = conn.recv(_PEEK_MAX, socket.MSG_PEEK)
            if not data:
                raise ConnectionError("closed before the ClientHello")
            try:
                return uid_from_server_name(client_hello_server_name(data))
            except NeedMoreData:
                if len(data) == seen or len(data) >= _PEEK_MAX:
                    # Peeked bytes stay readable: wait a little for the rest, do not spin.
                    await asyncio.sleep(0.01)
                seen = len(data)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    future: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()

    def ready() -> None:
        if not future.done():
            future.set_result(None)

    loop.add_reader(fd, ready)
    try:
        await future
    finally:
        loop.remove_reader(fd)


__all__ = [
    "DirectListener",
    "HandoffServer",
    "NodeListener",
    "RawAcceptor",
    "accept_socket_path",
    "hand_over",
]
