"""A network path between simulated hosts that tests can cut and restore.

`NetPath` listens on `listen` (e.g. 127.0.0.21:0) and forwards every connection to `target`
(a host's relay endpoint). Clients dial the path's `address` instead of the target.

- `cut()`: a silent partition. Nothing is forwarded in either direction and new connections
  are not accepted (the kernel may complete their handshake; no byte ever flows). No FIN, no
  RST: both ends see silence, as when a switch dies or a host loses power.
- `restore()`: forwarding resumes where it stopped (TCP would retransmit), pending connections
  are accepted.
- `reset()`: every connection is aborted with an RST, as by a rebooted middlebox.

One thread runs all connections with `selectors`; bytes are buffered per direction, so a slow
reader slows only its own connection.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from xenha.sim.ledger import Ledger

BUFFER_LIMIT = 4 << 20


@dataclass(eq=False)
class _End:
    sock: socket.socket
    peer: _End | None = None
    outbox: bytearray = field(default_factory=bytearray)
    read_closed: bool = False  # no more bytes will come from this end
    write_shut: bool = False


class NetPath:
    def __init__(
        self,
        target: tuple[str, int],
        listen: tuple[str, int] = ("127.0.0.1", 0),
        *,
        name: str = "",
        ledger: Ledger | None = None,
    ) -> None:
        self.target = target
        self.name = name or f"{listen[0]}->{target[0]}:{target[1]}"
        self._ledger = ledger
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(listen)
        self._listener.listen(64)
        self._listener.setblocking(False)
        self.address: tuple[str, int] = self._listener.getsockname()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._lock = threading.Lock()
        self._commands: list[Callable[[], None]] = []
        self._ends: set[_End] = set()
        self._cut = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=f"netpath {self.name}", daemon=True)

    def start(self) -> NetPath:
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        self._thread.start()
        return self

    # --- control (any thread) ---------------------------------------------------------------

    @property
    def is_cut(self) -> bool:
        return self._cut

    @property
    def connections(self) -> int:
        return len(self._ends) // 2

    def cut(self) -> None:
        self._do(self._cut_now)
        self._record("netpath_cut")

    def restore(self) -> None:
        self._do(self._restore_now)
        self._record("netpath_restored")

    def reset(self) -> None:
        self._do(self._reset_now)

    def close(self) -> None:
        if self._closed:
            return
        self._do(self._close_now)
        self._thread.join(timeout=5)

    def __enter__(self) -> NetPath:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, kind: str) -> None:
        if self._ledger is not None:
            self._ledger.record(kind, path=self.name)

    def _do(self, command: Callable[[], None]) -> None:
        done = threading.Event()

        def run() -> None:
            try:
                command()
            finally:
                done.set()

        with self._lock:
            self._commands.append(run)
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            done.wait(5)

    # --- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._closed:
            for key, mask in self._sel.select(timeout=1.0):
                if key.data == "wake":
                    with contextlib.suppress(OSError):
                        self._wake_r.recv(4096)
                    with self._lock:
                        commands, self._commands = self._commands, []
                    for command in commands:
                        command()
                elif key.data == "listen":
                    self._accept()
                else:
                    end: _End = key.data
                    if mask & selectors.EVENT_READ:
                        self._read(end)
                    if mask & selectors.EVENT_WRITE and end in self._ends:
                        self._write(end)
        self._sel.close()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except OSError:
            return
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.settimeout(2.0)
        try:
            upstream.connect(self.target)
        except OSError:
            upstream.close()
            _abort(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a, b = _End(client), _End(upstream)
        a.peer, b.peer = b, a
        self._ends |= {a, b}
        self._update(a)
        self._update(b)

    def _update(self, end: _End) -> None:
        """(Re)register an end for what it can do now; nothing at all while cut."""
        events = 0
        if not self._cut:
            peer = end.peer
            if not end.read_closed and peer is not None and len(peer.outbox) < BUFFER_LIMIT:
                events |= selectors.EVENT_READ
            if end.outbox:
                events |= selectors.EVENT_WRITE
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(end.sock)
        if events:
            self._sel.register(end.sock, events, end)

    def _read(self, end: _End) -> None:
        peer = end.peer
        assert peer is not None
        try:
            data = end.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            self._drop(end, abort=True)
            return
        if data:
            peer.outbox += data
        else:
            end.read_closed = True
        self._flush(peer)
        self._update(end)
        self._update(peer)

    def _write(self, end: _End) -> None:
        self._flush(end)
        if end in self._ends:
            self._update(end)
            if end.peer is not None:
                self._update(end.peer)

    def _flush(self, end: _End) -> None:
        if self._cut:
            return
        if end.outbox:
            try:
                sent = end.sock.send(end.outbox)
            except BlockingIOError:
                return
            except OSError:
                self._drop(end, abort=True)
                return
            del end.outbox[:sent]
        peer = end.peer
        if not end.outbox and peer is not None and peer.read_closed and not end.write_shut:
            with contextlib.suppress(OSError):
                end.sock.shutdown(socket.SHUT_WR)
            end.write_shut = True
        if end.write_shut and peer is not None and peer.write_shut:
            self._drop(end, abort=False)

    def _drop(self, end: _End, *, abort: bool) -> None:
        for e in (end, end.peer):
            if e is None or e not in self._ends:
                continue
            self._ends.discard(e)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(e.sock)
            if abort:
                _abort(e.sock)
            else:
                e.sock.close()

    def _cut_now(self) -> None:
        self._cut = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        for end in list(self._ends):
            self._update(end)

    def _restore_now(self) -> None:
        self._cut = False
        with contextlib.suppress(KeyError, ValueError):
            self._sel.register(self._listener, selectors.EVENT_READ, "listen")
        for end in list(self._ends):
            self._update(end)
            self._flush(end)

    def _reset_now(self) -> None:
        for end in list(self._ends):
            self._drop(end, abort=True)

    def _close_now(self) -> None:
        self._reset_now()
        self._closed = True
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(self._listener)
        self._listener.close()
        self._wake_w.close()


def _abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
