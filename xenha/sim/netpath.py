"""A network path between simulated hosts that tests can cut and restore.

`NetPath` listens on `listen` (e.g. 127.0.0.21:0) and forwards every connection to `target`
(a host's relay endpoint). Clients dial the path's `address` instead of the target.

- `cut()`: a silent partition. Nothing is forwarded in either direction and new connections
  are not accepted (the kernel may complete their handshake; no byte ever flows). No FIN, no
  RST: both ends see silence, as when a switch dies or a host loses power.
- `restore()`: forwarding resumes where it stopped (TCP would retransmit), pending connections
  are accepted.
- `reset()`: every connection is aborted with an RST, as by a rebooted middlebox.
- `silence(endpoints)`: single connections go silent for good, in both directions, and
  nothing of their ends' later fate (a FIN, an RST) reaches the other side; bytes the dead
  side sent before are still delivered. This is how a power cut looks to the survivor: its
  socket stays ESTABLISHED and only the peer's heartbeats stopping can tell it.
  `silence_processes(pids)` does it in every NetPath of this process for each connection to
  or from a socket of those processes (`SimHost.kill` calls it with the host's frozen
  processes). A silenced connection ends only with `reset()` or `close()` (an RST, as from
  the rebooted host).

One thread runs all connections with `selectors`; bytes are buffered per direction, so a slow
reader slows only its own connection.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from xenha.sim.ledger import Ledger

BUFFER_LIMIT = 4 << 20

Address = tuple[str, int]
# A TCP socket as (its own address, the address it is connected to).
Endpoint = tuple[Address, Address]


@dataclass(eq=False)
class _End:
    sock: socket.socket
    # Addresses of our socket and of whoever is on the other side of it, kept from the
    # start: getpeername fails once the far side is gone.
    local: Address = ("", 0)
    remote: Address = ("", 0)
    peer: _End | None = None
    outbox: bytearray = field(default_factory=bytearray)
    read_closed: bool = False  # no more bytes will come from this end
    write_shut: bool = False
    silenced: bool = False

    @property
    def far_endpoint(self) -> Endpoint:
        """The socket on the other side of this end, as its owner sees it."""
        return self.remote, self.local


_paths: weakref.WeakSet[NetPath] = weakref.WeakSet()
_paths_lock = threading.Lock()


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
        with _paths_lock:
            _paths.add(self)
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

    def silence(self, endpoints: Collection[Endpoint]) -> int:
        """Silence for good every connection whose far side, on either end, is one of these
        sockets (a dead host's); returns how many. Connections such a socket dialed and
        this path has not accepted yet are dropped unseen by the target."""
        if not endpoints:
            return 0
        silenced: list[int] = []
        # Patient: the caller kills the processes next, and their FINs must find the
        # connections already silent, however starved this thread is.
        self._do(lambda: silenced.append(self._silence_now(frozenset(endpoints))), timeout=60)
        count = silenced[0] if silenced else 0
        if count:
            self._record("netpath_silenced", connections=count)
        return count

    def close(self) -> None:
        if self._closed:
            return
        with _paths_lock:
            _paths.discard(self)
        self._do(self._close_now)
        self._thread.join(timeout=5)

    def __enter__(self) -> NetPath:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, kind: str, **fields: object) -> None:
        if self._ledger is not None:
            self._ledger.record(kind, path=self.name, **fields)

    def _do(self, command: Callable[[], None], timeout: float = 5.0) -> None:
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
            done.wait(timeout)

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
                    if end not in self._ends:
                        continue
                    # Not even if silenced by a command earlier in this batch: whatever it
                    # has to say (an RST too) must not reach the other side.
                    if mask & selectors.EVENT_READ and not end.silenced:
                        self._read(end)
                    if mask & selectors.EVENT_WRITE and end in self._ends:
                        self._write(end)
        self._sel.close()

    def _accept(self) -> None:
        try:
            client, remote = self._listener.accept()
        except OSError:
            return
        self._connect(client, remote)

    def _connect(self, client: socket.socket, remote: Address) -> None:
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        upstream.settimeout(2.0)
        try:
            upstream.connect(self.target)
            a = _End(client, local=client.getsockname(), remote=remote)
            b = _End(upstream, local=upstream.getsockname(), remote=upstream.getpeername())
        except OSError:
            upstream.close()
            _abort(client)
            return
        for sock in (client, upstream):
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        a.peer, b.peer = b, a
        self._ends |= {a, b}
        self._update(a)
        self._update(b)

    def _update(self, end: _End) -> None:
        """(Re)register an end for what it can do now: nothing at all while cut; once
        silenced, only delivering what it still holds."""
        if end not in self._ends:
            return  # dropped meanwhile (its socket is closed), e.g. by the flush just before
        events = 0
        if not self._cut:
            peer = end.peer
            if (
                not end.silenced
                and not end.read_closed
                and peer is not None
                and len(peer.outbox) < BUFFER_LIMIT
            ):
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
        if end.silenced:
            return  # what was sent before the silence arrives; no FIN ever follows it
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

    def _silence_now(self, endpoints: frozenset[Endpoint]) -> int:
        # What a dying socket dialed may still wait in the backlog: accepted now, it would
        # be forwarded and then carry the dialer's FIN to the target. While cut, the
        # backlog is left alone (it is not served anyway).
        while not self._cut:
            try:
                client, remote = self._listener.accept()
            except OSError:
                break
            try:
                dead = (remote, client.getsockname()) in endpoints
            except OSError:
                dead = True  # already gone: nothing to forward
            if dead:
                client.close()
            else:
                self._connect(client, remote)
        count = 0
        for end in list(self._ends):
            peer = end.peer
            if end.silenced or peer is None or end.far_endpoint not in endpoints:
                continue
            # Neither socket is closed: the survivor's must stay open, and closing the dead
            # side's would not be heard by anyone anyway. Bytes the dead side sent before
            # it froze are on the wire and still arrive; bytes for it are lost.
            for e in (end, peer):
                e.silenced = True
                if e.far_endpoint in endpoints:
                    e.outbox.clear()
                self._update(e)
            count += 1
        return count

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


def silence_processes(pids: Iterable[int]) -> int:
    """Silence, in every started NetPath of this process, each connection to or from a TCP
    socket that one of these processes holds. They must be stopped (SIGSTOP), so that none
    opens or closes a socket meanwhile. Returns how many connections went silent."""
    endpoints = tcp_endpoints(pids)
    with _paths_lock:
        paths = list(_paths)
    return sum(path.silence(endpoints) for path in paths)


def tcp_endpoints(pids: Iterable[int]) -> set[Endpoint]:
    """The TCP sockets these processes hold, as (local, remote) address pairs (Linux /proc:
    socket inodes from the processes' fds, addresses from /proc/net/tcp{,6})."""
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    found: set[Endpoint] = set()
    if not inodes:
        return found
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 9 and int(fields[9]) in inodes:
                found.add((_proc_address(fields[1]), _proc_address(fields[2])))
    return found


def _proc_address(text: str) -> Address:
    """`0100007F:1F90` (the address as the kernel's native 32-bit words, port in hex)."""
    hex_ip, _, hex_port = text.partition(":")
    raw = b"".join(struct.pack("=I", int(hex_ip[i : i + 8], 16)) for i in range(0, len(hex_ip), 8))
    if len(raw) == 4:
        ip = socket.inet_ntop(socket.AF_INET, raw)
    else:
        ip = socket.inet_ntop(socket.AF_INET6, raw)
        # A dual-stack socket's IPv4 peer, as an AF_INET NetPath sees it.
        ip = ip.removeprefix("::ffff:") if "." in ip else ip
    return ip, int(hex_port, 16)


def _abort(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
