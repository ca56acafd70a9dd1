"""xenstored for the simulated Xen host: the XenStore wire protocol on a Unix socket.

pyxs (`Client`, `Monitor`, `Router`) talks to it unchanged, through `$XENSTORED_PATH` or
`UnixSocketConnection(path)`. Every socket client is dom0, as on a real host; a client may
drop to a guest's rights with RESTRICT (request type 20, or 128 as pyxs numbers it).

Embedding it in the simulated host daemon is one call; the daemon then works on the same
`Store` in-process (thread-safe), and socket clients see its changes and watch events::

    from xenha.sim.xenstored import XenstoreServer

    server = XenstoreServer(run_dir / "xenstored.sock")   # or XenstoreServer(path, store)
    server.start()              # bound and serving (in a daemon thread) when this returns
    store = server.store        # the hypervisor's side:
    store.write("/local/domain/3/name", "db1")
    store.introduce_domain(3)   # fires @introduceDomain for socket clients
    with store.watch("/local/domain/3/control") as watcher:
        event = watcher.get(timeout=5)
    store.domain_shutdown(3)    # fires @releaseDomain; the domain still exists
    store.release_domain(3)     # destroyed: fires @releaseDomain, no longer introduced
    server.stop()               # or use the server as a context manager

Standalone, serving until SIGTERM or SIGINT::

    python -m xenha.sim.xenstored --socket /run/xenstored/socket

A client that sends a header announcing more than 4096 bytes, or stops reading its replies
until a backlog builds up, is disconnected; malformed requests earn error replies. Either way
the other clients are not affected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, TracebackType

from xenha.sim.xenstore import wire
from xenha.sim.xenstore.store import Session, Store

log = logging.getLogger(__name__)

DEFAULT_SOCKET = "/var/run/xenstored/socket"
# A client this far behind on reading its replies and watch events is cut off.
OUTPUT_BACKLOG_MAX = 8 * 1024 * 1024


class _Connection(asyncio.Protocol):
    """One socket client: frames requests, answers them, and carries its watch events.

    Watch events may come from any thread (the hypervisor writes in-process), so all output
    goes through one queue that is flushed on the event loop; that keeps every byte in the
    order the store produced it.
    """

    def __init__(self, server: XenstoreServer, loop: asyncio.AbstractEventLoop) -> None:
        self._server = server
        self._loop = loop
        self._inbox = bytearray()
        self._lock = threading.Lock()
        self._outbox: list[bytes] = []
        self._flush_scheduled = False
        self._closed = False
        self._transport: asyncio.Transport | None = None
        self._session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._session = self._server.store.session(deliver=self._on_watch_event)
        self._server._connections.add(self)

    def data_received(self, data: bytes) -> None:
        assert self._session is not None
        self._inbox += data
        while len(self._inbox) >= wire.HEADER.size and not self._closed:
            op, req_id, tx_id, length = wire.HEADER.unpack_from(self._inbox)
            if length > wire.PAYLOAD_MAX:
                log.warning("dropping a xenstore client that announced %d bytes", length)
                self.abort()
                return
            end = wire.HEADER.size + length
            if len(self._inbox) < end:
                return
            payload = bytes(self._inbox[wire.HEADER.size : end])
            del self._inbox[:end]
            for message in wire.handle(self._session, op, req_id, tx_id, payload):
                self._send(message)

    def connection_lost(self, exc: Exception | None) -> None:
        with self._lock:
            self._closed = True
            self._outbox.clear()
        if self._session is not None:
            self._session.close()
        self._server._connections.discard(self)

    def abort(self) -> None:
        with self._lock:
            self._closed = True
        if self._transport is not None:
            self._transport.abort()

    def _on_watch_event(self, path: str, token: bytes) -> None:
        self._send(wire.watch_event(path, token))

    def _send(self, message: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            self._outbox.append(message)
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        if self._server._loop_thread_id == threading.get_ident():
            self._flush()
        else:
            self._loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:
        with self._lock:
            data = b"".join(self._outbox)
            self._outbox.clear()
            self._flush_scheduled = False
            if self._closed or self._transport is None:
                return
        self._transport.write(data)
        if self._transport.get_write_buffer_size() > OUTPUT_BACKLOG_MAX:
            log.warning("dropping a xenstore client that stopped reading")
            self.abort()


class XenstoreServer:
    """Serves `store` (a fresh dom0 `Store` by default) on the Unix socket `path`."""

    def __init__(self, path: str | os.PathLike[str], store: Store | None = None) -> None:
        self.path = Path(path)
        self.store = store if store is not None else Store()
        self._connections: set[_Connection] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread_id: int | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._failure: BaseException | None = None

    @property
    def client_count(self) -> int:
        return len(self._connections)

    def start(self) -> None:
        """Bind the socket and serve in a daemon thread; clients may connect on return."""
        if self._thread is not None:
            raise RuntimeError("already started")
        listener = _bind(self.path)
        self._failure = None
        started = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(listener, started), name="xenstored", daemon=True
        )
        self._thread.start()
        started.wait()
        if self._failure is not None:
            self._thread.join()
            self._thread = None
            listener.close()
            self.path.unlink(missing_ok=True)
            raise RuntimeError(f"xenstored could not serve on {self.path}") from self._failure

    def stop(self) -> None:
        """Disconnect every client, stop serving and remove the socket."""
        if self._thread is None:
            return
        if self._thread.is_alive() and self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop may be closing on its own
                self._loop.call_soon_threadsafe(self._stopping.set)
        self._thread.join()
        self._thread = None
        self.path.unlink(missing_ok=True)

    def __enter__(self) -> XenstoreServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self, listener: socket.socket, started: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._loop_thread_id = threading.get_ident()
        try:
            loop.run_until_complete(self._serve(loop, listener, started))
        except BaseException as error:
            self._failure = error
            log.exception("xenstored stopped serving")
        finally:
            loop.close()
            started.set()  # never leave start() waiting, whatever happened

    async def _serve(
        self, loop: asyncio.AbstractEventLoop, listener: socket.socket, started: threading.Event
    ) -> None:
        self._stopping = asyncio.Event()
        server = await loop.create_unix_server(lambda: _Connection(self, loop), sock=listener)
        started.set()
        log.info("xenstored listening on %s", self.path)
        try:
            await self._stopping.wait()
        finally:
            server.close()
            for connection in list(self._connections):
                connection.abort()
            await server.wait_closed()
            # Let the aborted transports report connection_lost, which closes their sessions.
            await asyncio.sleep(0)


def _bind(path: Path) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()  # left behind by a daemon that did not stop cleanly
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(128)
    except OSError:
        listener.close()
        raise
    return listener


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xenha.sim.xenstored",
        description="Serve a simulated XenStore on a Unix socket until SIGTERM.",
    )
    parser.add_argument(
        "--socket",
        default=os.environ.get("XENSTORED_PATH", DEFAULT_SOCKET),
        help="socket path (default: $XENSTORED_PATH or %(default)s)",
    )
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="xenstored: %(message)s")

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with XenstoreServer(args.socket):
        while not stop.wait(1.0):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
