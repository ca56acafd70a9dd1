"""The relay link: Xen's bytes between two replicators over one mutual-TLS connection.

One `Link` per replication carries, framed (see `frames`): DATA (primary -> secondary, the
forward stream), BACK (secondary -> primary, the back channel), HEARTBEATs both ways and
CONTROL messages. The bytes of DATA and BACK are Xen's, unchanged.

Why threads and blocking sockets, not asyncio: asyncio's TLS transport copies every byte
through memory BIOs and callbacks and moved ~250 MB/s on the development machine, where a
blocking `SSLSocket.sendall` of 1 MiB chunks moved ~1 GB/s (OpenSSL releases the GIL while it
encrypts). So each link runs four threads:

- sender: reads the local source into a fixed buffer behind a 5-byte gap, writes the frame
  header into the gap and sends header and payload with one `sendall` (no copy);
- receiver: reads frame headers, streams DATA/BACK payloads through a fixed buffer into the
  local sink, handles heartbeats and control messages;
- heartbeat: sends a heartbeat every `heartbeat_interval` when no frame is being sent;
- watch: judges the peer's silence (it never sends, so it cannot block).

Memory is bounded by construction: one buffer per direction and the kernel's socket buffers.
A slow consumer blocks the receiver, the TCP window closes, the peer's `sendall` blocks, and
that blocks the peer's reads of its own local source: backpressure all the way to xl.

Silence is judged only while the receiver is waiting on the network: time spent blocked on a
slow local sink (migrate-receive applying a big checkpoint) is the consumer's, not the
peer's, and must not read as a lost peer. Any byte from the peer counts as life, so a long
DATA frame on a slow link does not need heartbeats squeezed in between.

Failing a link shuts the TCP connection down (both directions), which unblocks every thread;
the caller learns why through `on_down` exactly once.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from xenha_agent import frames
from xenha_agent.frames import FrameError, FrameType
from xenha_agent.tls import TlsMaterial, client_context, server_name, verify_peer

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1


@dataclass(frozen=True)
class LinkSettings:
    heartbeat_interval: float = 0.1
    silence_timeout: float = 0.6
    #: Largest DATA/BACK payload this side sends in one frame (and its buffer size).
    chunk: int = frames.DEFAULT_DATA_PAYLOAD
    #: TCP connect + TLS handshake + hello exchange.
    handshake_timeout: float = 10.0

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval < self.silence_timeout:
            raise ValueError("need 0 < heartbeat interval < silence timeout")
        if not 0 < self.chunk <= frames.MAX_DATA_PAYLOAD:
            raise ValueError(f"chunk must be in 1..{frames.MAX_DATA_PAYLOAD}")


# --- local byte streams ----------------------------------------------------------------------


class ByteSource(Protocol):
    def readinto(self, buffer: memoryview) -> int:
        """Some bytes (blocking until at least one), 0 at end of stream."""
        ...


class ByteSink(Protocol):
    def write_all(self, data: memoryview) -> None: ...


class SocketEnd:
    """Both directions of a local stream socket (the primary's `xenha agent pipe`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def readinto(self, buffer: memoryview) -> int:
        return self.sock.recv_into(buffer)

    def write_all(self, data: memoryview) -> None:
        self.sock.sendall(data)


class FdSource:
    """Reads a pipe (migrate-receive's stdout)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def readinto(self, buffer: memoryview) -> int:
        return os.readv(self.fd, [buffer])


class Cancelled(OSError):
    pass


class FdSink:
    """Writes a pipe (migrate-receive's stdin) and can be cancelled while blocked.

    The secondary must be able to stop writing without closing the pipe (closing it is
    what makes xl fail over), and must be sure no write is in flight before it does close
    it: a descriptor closed under a blocked write is reused by the next `open`.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_closed = False
        self._cancelled = False

    def write_all(self, data: memoryview) -> None:
        while data:
            if self._cancelled:
                raise Cancelled(errno.ECANCELED, "sink cancelled")
            try:
                data = data[os.write(self.fd, data) :]
                continue
            except BlockingIOError:
                pass
            select.select([self._wake_r], [self.fd], [])

    def cancel(self) -> None:
        self._cancelled = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"x")

    def close_wakeup(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)


# --- connecting -------------------------------------------------------------------------------


class HelloError(ConnectionError):
    """The peer's hello does not match this replication or role."""


def _tcp_tune(sock: socket.socket) -> None:
    # Heartbeats and COLO's small back-channel records must not wait for Nagle.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def parse_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port`."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def dial(
    address: str, *, uid: str, material: TlsMaterial, peer_node: str, timeout: float
) -> ssl.SSLSocket:
    """TCP + TLS to a peer's relay endpoint, with SNI `<uid>.xenha`; the peer must be
    `peer_node`. The returned socket is blocking."""
    raw = socket.create_connection(parse_address(address), timeout=timeout)
    try:
        _tcp_tune(raw)
        tls = client_context(material).wrap_socket(raw, server_hostname=server_name(uid))
    except BaseException:
        raw.close()
        raise
    try:
        verify_peer(tls, peer_node)
    except BaseException:
        tls.close()
        raise
    return tls


def accept_tls(
    raw: socket.socket, *, context: ssl.SSLContext, peer_node: str, timeout: float
) -> ssl.SSLSocket:
    """Server side of the handshake on an accepted (or handed-over) TCP socket."""
    raw.settimeout(timeout)
    _tcp_tune(raw)
    try:
        tls = context.wrap_socket(raw, server_side=True)
    except BaseException:
        raw.close()
        raise
    try:
        verify_peer(tls, peer_node)
    except BaseException:
        tls.close()
        raise
    return tls


def _recv_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("peer closed the connection during the hello")
        got += k
    return bytes(buf)


def exchange_hello(
    tls: ssl.SSLSocket, *, uid: str, node: str, role: str, peer_role: str, timeout: float
) -> dict[str, Any]:
    """Both sides say who they are before any Xen byte moves; returns the peer's hello."""
    tls.settimeout(timeout)
    tls.sendall(
        frames.encode_control(
            {"type": "hello", "version": PROTOCOL_VERSION, "uid": uid, "node": node, "role": role}
        )
    )
    ftype, length = frames.decode_header(_recv_exactly(tls, frames.HEADER_SIZE))
    if ftype is not FrameType.CONTROL:
        raise HelloError(f"expected a hello, got a {ftype.name} frame")
    hello = frames.decode_control(_recv_exactly(tls, length)).message
    if hello.get("type") != "hello":
        raise HelloError(f"expected a hello, got {hello.get('type')!r}")
    if hello.get("uid") != uid or hello.get("role") != peer_role:
        raise HelloError(
            f"peer is {hello.get('role')!r} of {hello.get('uid')!r}, expected {peer_role} of {uid}"
        )
    if hello.get("version") != PROTOCOL_VERSION:
        raise HelloError(f"peer speaks relay protocol {hello.get('version')!r}")
    tls.settimeout(None)
    return hello


# --- the link ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LinkStatus:
    connected: bool
    down_reason: str | None
    down_monotonic: float | None
    last_rx_monotonic: float
    last_heartbeat_monotonic: float | None
    peer_checkpoints: int | None
    peer_eof: bool
    bytes_sent: int
    bytes_received: int


OnDown = Callable[[str], None]
OnControl = Callable[[frames.Control], None]


class Link:
    """A connected, authenticated relay between this side's local streams and the peer.

    `send_type` is what this side originates: DATA on the primary, BACK on the secondary.
    `observe` sees every DATA byte (sent on the primary, received on the secondary).
    `checkpoints` is what this side reports in its heartbeats.
    `drain_after_down`: once the peer is lost, keep reading the local source and discard
    (so its writer never blocks), or stop reading it (so its writer does block).
    """

    def __init__(
        self,
        tls: ssl.SSLSocket,
        *,
        send_type: FrameType,
        settings: LinkSettings,
        on_down: OnDown,
        on_control: OnControl | None = None,
        observe: Callable[[memoryview], None] | None = None,
        checkpoints: Callable[[], int] = lambda: 0,
        name: str = "link",
        drain_after_down: bool = True,
    ) -> None:
        if send_type not in (FrameType.DATA, FrameType.BACK):
            raise ValueError("a link sends DATA or BACK")
        self._tls = tls
        self._send_type = send_type
        self._recv_type = FrameType.BACK if send_type is FrameType.DATA else FrameType.DATA
        self._settings = settings
        self._on_down = on_down
        self._on_control = on_control
        self._observe = observe
        self._checkpoints = checkpoints
        self._name = name
        self._drain_after_down = drain_after_down
        # Wakes a sender that waits for its source, so that once the link is down it leaves
        # without reading (and so without letting the writer proceed).
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._wake_closed = False
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._down = threading.Event()
        self._down_reason: str | None = None
        self._down_at: float | None = None
        self._threads: list[threading.Thread] = []
        now = time.monotonic()
        self._last_rx = now
        self._rx_waiting_since: float | None = None
        self._last_heartbeat: float | None = None
        self._peer_checkpoints: int | None = None
        self._peer_eof = False
        self._bytes_sent = 0
        self._bytes_received = 0
        self._sink: ByteSink | None = None
        self._attached = threading.Event()
        self.sink_error: str | None = None
        self.source_ended = threading.Event()

    # -- lifecycle

    def start(self, source: ByteSource | None = None, sink: ByteSink | None = None) -> None:
        """Start heartbeats, silence detection and the receiver; relay Xen's bytes once the
        local streams are there (now, or later through `attach`).

        Heartbeats must flow from the handshake on: the primary's xl takes a while to start
        its transport, and the peer would otherwise read that time as silence.
        """
        for target, suffix in (
            (self._recv_loop, "recv"),
            (self._heartbeat_loop, "heartbeat"),
            (self._watch_loop, "watch"),
        ):
            self._spawn(target, suffix)
        if source is not None and sink is not None:
            self.attach(source, sink)

    def attach(self, source: ByteSource, sink: ByteSink) -> None:
        self._sink = sink
        self._attached.set()
        self._spawn(lambda: self._send_loop(source), "send")

    def _spawn(self, target: Callable[[], None], suffix: str) -> None:
        thread = threading.Thread(target=target, name=f"{self._name}-{suffix}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def fail(self, reason: str) -> None:
        """Declare the peer lost (idempotent): shut the connection down, tell the owner."""
        with self._state_lock:
            if self._down.is_set():
                return
            self._down_reason = reason
            self._down_at = time.monotonic()
            self._down.set()
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        # socket.shutdown, not SSLSocket.shutdown: the latter drops the SSL object under
        # threads that are still inside it.
        with contextlib.suppress(OSError):
            socket.socket.shutdown(self._tls, socket.SHUT_RDWR)
        log.info("%s down: %s", self._name, reason)
        try:
            self._on_down(reason)
        except Exception:
            log.exception("%s: on_down handler failed", self._name)

    def close(self, reason: str = "closed locally", *, join_timeout: float = 5.0) -> None:
        """Fail (if not yet) and release the socket once the threads are out of it.

        The sender is not waited for: it may sit in a read of the local source that only the
        source's owner can end, and once the link is down it never touches the socket again.
        """
        self.fail(reason)
        me = threading.current_thread()
        others = [t for t in self._threads if t is not me and not t.name.endswith("-send")]
        for thread in others:
            thread.join(join_timeout)
        if not any(t.is_alive() for t in others):
            self._tls.close()
        senders = [t for t in self._threads if t.name.endswith("-send") and t is not me]
        for thread in senders:
            thread.join(0.2)  # a primary's sender leaves on the wake-up at once
        with self._state_lock:
            if not any(t.is_alive() for t in senders) and not self._wake_closed:
                self._wake_closed = True
                os.close(self._wake_r)
                os.close(self._wake_w)

    def join_receiver(self, timeout: float) -> bool:
        """True once the receiver thread (the only writer of the sink) has exited."""
        for thread in self._threads:
            if thread.name.endswith("-recv"):
                thread.join(timeout)
                return not thread.is_alive()
        return True

    @property
    def is_down(self) -> bool:
        return self._down.is_set()

    def wait_down(self, timeout: float | None = None) -> bool:
        return self._down.wait(timeout)

    def status(self) -> LinkStatus:
        return LinkStatus(
            connected=not self._down.is_set(),
            down_reason=self._down_reason,
            down_monotonic=self._down_at,
            last_rx_monotonic=self._last_rx,
            last_heartbeat_monotonic=self._last_heartbeat,
            peer_checkpoints=self._peer_checkpoints,
            peer_eof=self._peer_eof,
            bytes_sent=self._bytes_sent,
            bytes_received=self._bytes_received,
        )

    # -- sending

    def _send(self, data: bytes | memoryview) -> None:
        with self._write_lock:
            self._tls.sendall(data)
        self._bytes_sent += len(data)

    def send_control(self, message: dict[str, Any]) -> bool:
        """False if the link is down (the message is then lost, by design)."""
        if self._down.is_set():
            return False
        try:
            self._send(frames.encode_control(message))
        except (OSError, ValueError) as e:
            self.fail(f"send failed: {e}")
            return False
        return True

    def _send_loop(self, source: ByteSource) -> None:
        buffer = bytearray(frames.HEADER_SIZE + self._settings.chunk)
        view = memoryview(buffer)
        payload = view[frames.HEADER_SIZE :]
        sending = True
        fileno = getattr(source, "fileno", None)
        while True:
            if not self._drain_after_down and fileno is not None:
                select.select([fileno(), self._wake_r], [], [])
                if self._down.is_set():
                    return  # leave the writer blocked: the owner decides what it may do
            try:
                n = source.readinto(payload)
            except OSError as e:
                n = 0
                log.info("%s: local source failed: %s", self._name, e)
            if n == 0:
                self.source_ended.set()
                if sending:
                    self.send_control({"type": "eof"})
                return
            if not sending or self._down.is_set():
                if not self._drain_after_down:
                    return  # leave the writer blocked: the owner decides what it may do
                sending = False
                continue  # link down: drain the source so its writer never blocks on us
            if self._observe is not None and self._send_type is FrameType.DATA:
                self._observe(payload[:n])
            frames.pack_header_into(buffer, self._send_type, n)
            try:
                self._send(view[: frames.HEADER_SIZE + n])
            except (OSError, ValueError) as e:  # ValueError: closed under us
                self.fail(f"send failed: {e}")
                sending = False

    # -- receiving

    def _recv_into(self, view: memoryview) -> int:
        self._rx_waiting_since = time.monotonic()
        try:
            n = self._tls.recv_into(view)
        finally:
            self._rx_waiting_since = None
        if n:
            self._last_rx = time.monotonic()
            self._bytes_received += n
        return n

    def _recv_exact(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self._recv_into(view[got:])
            if not n:
                raise EOFError
            got += n

    def _recv_loop(self) -> None:
        header = memoryview(bytearray(frames.HEADER_SIZE))
        buffer = memoryview(bytearray(max(self._settings.chunk, frames.MAX_CONTROL_PAYLOAD)))
        try:
            while True:
                self._recv_exact(header)
                ftype, length = frames.decode_header(header)
                if ftype is self._recv_type:
                    self._stream_payload(length, buffer, self._wait_for_sink())
                elif ftype is FrameType.HEARTBEAT:
                    self._recv_exact(buffer[:length])
                    beat = frames.decode_heartbeat(buffer[:length])
                    self._last_heartbeat = time.monotonic()
                    self._peer_checkpoints = beat.checkpoints
                elif ftype is FrameType.CONTROL:
                    self._recv_exact(buffer[:length])
                    self._handle_control(frames.decode_control(buffer[:length]))
                else:
                    raise frames.FrameError(f"peer sent {ftype.name}, which flows the other way")
        except EOFError:
            self.fail("peer closed the connection")
        except FrameError as e:
            self.fail(f"protocol error: {e}")
        except (OSError, ValueError) as e:  # ssl errors are OSErrors; ValueError: closed
            self.fail(f"receive failed: {e}")

    def _wait_for_sink(self) -> ByteSink:
        # Not reading meanwhile, so the watch does not judge the peer (see the module doc).
        while not self._attached.wait(0.1):
            if self._down.is_set():
                raise EOFError
        assert self._sink is not None
        return self._sink

    def _stream_payload(self, length: int, buffer: memoryview, sink: ByteSink) -> None:
        left = length
        while left:
            # Gather up to a buffer's worth before writing: fewer, larger writes to the sink,
            # and the frame ends where the sender's read ended, so nothing waits for more.
            filled = 0
            want = min(left, len(buffer))
            while filled < want:
                n = self._recv_into(buffer[filled:want])
                if not n:
                    raise EOFError
                filled += n
            left -= filled
            chunk = buffer[:filled]
            if self._observe is not None and self._recv_type is FrameType.DATA:
                self._observe(chunk)
            if self.sink_error is None:
                try:
                    sink.write_all(chunk)
                except OSError as e:
                    # The local consumer is gone (or we were told to stop feeding it); keep
                    # reading so the peer's heartbeats and controls still arrive.
                    self.sink_error = str(e)
                    log.info("%s: local sink failed: %s", self._name, e)

    def _handle_control(self, control: frames.Control) -> None:
        if control.type == "eof":
            self._peer_eof = True
        if self._on_control is not None:
            try:
                self._on_control(control)
            except Exception:
                log.exception("%s: control handler failed", self._name)

    # -- heartbeats and silence

    def _watch_loop(self) -> None:
        # Never sends: a watchdog stuck in a blocked sendall would watch nothing.
        interval = min(self._settings.heartbeat_interval, self._settings.silence_timeout / 4)
        while not self._down.wait(interval):
            waiting = self._rx_waiting_since
            if waiting is None:
                continue
            silent = time.monotonic() - max(waiting, self._last_rx)
            if silent > self._settings.silence_timeout:
                self.fail(f"heartbeat silence for {silent * 1000:.0f} ms")
                return

    def _heartbeat_loop(self) -> None:
        while not self._down.wait(self._settings.heartbeat_interval):
            # Only when the line is free: a DATA frame in flight already proves we are alive.
            if not self._write_lock.acquire(blocking=False):
                continue
            try:
                beat = frames.Heartbeat(time.monotonic_ns(), self._checkpoints())
                self._tls.sendall(frames.encode_heartbeat(beat))
            except (OSError, ValueError) as e:
                self.fail(f"heartbeat send failed: {e}")
                return
            finally:
                self._write_lock.release()
