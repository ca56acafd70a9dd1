"""The relay link between two replicators: bytes unchanged, memory bounded, silence noticed."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from xenha_agent import frames
from xenha_agent.checkpoint_stats import CheckpointStats
from xenha_agent.frames import FrameType
from xenha_agent.pipe import transport_command
from xenha_agent.relay import (
    HelloError,
    Link,
    LinkSettings,
    SocketEnd,
    accept_tls,
    dial,
    exchange_hello,
)
from xenha_agent.relay_listener import HandoffServer, NodeListener, accept_socket_path
from xenha_agent.tls import PeerRejected, TlsMaterial, server_context

from .certs import TestCA
from .streams import remus_stream

UID = "1a2b3c4d-0000-4000-8000-00000000000a"
UID2 = "1a2b3c4d-0000-4000-8000-00000000000b"
FAST = LinkSettings(heartbeat_interval=0.05, silence_timeout=1.0, chunk=256 << 10)


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def materials(ca: TestCA) -> tuple[TlsMaterial, TlsMaterial]:
    a, b = ca.issue("xen-a"), ca.issue("xen-b")
    return (
        TlsMaterial(a.ca_pem, a.cert_pem, a.key_pem),
        TlsMaterial(b.ca_pem, b.cert_pem, b.key_pem),
    )


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("relay-tests")


def tls_pair(
    ca: TestCA, *, via: Callable[[int], int] = lambda port: port, uid: str = UID
) -> tuple[ssl.SSLSocket, ssl.SSLSocket]:
    """(primary's, secondary's) authenticated sockets, hellos exchanged."""
    primary, secondary = materials(ca)
    listener = socket.create_server(("127.0.0.1", 0))
    port = via(listener.getsockname()[1])
    accepted: dict[str, ssl.SSLSocket] = {}

    def serve() -> None:
        raw, _ = listener.accept()
        tls = accept_tls(raw, context=server_context(secondary, uid), peer_node="xen-a", timeout=5)
        exchange_hello(tls, uid=uid, node="xen-b", role="secondary", peer_role="primary", timeout=5)
        accepted["tls"] = tls

    thread = threading.Thread(target=serve)
    thread.start()
    client = dial(f"127.0.0.1:{port}", uid=uid, material=primary, peer_node="xen-b", timeout=5)
    exchange_hello(client, uid=uid, node="xen-a", role="primary", peer_role="secondary", timeout=5)
    thread.join(5)
    listener.close()
    return client, accepted["tls"]


@dataclass
class Side:
    """One replicator's link, and the test's end of its local stream (xl's side)."""

    link: Link
    app: socket.socket
    stats: CheckpointStats
    downs: list[str] = field(default_factory=list)
    controls: list[dict[str, object]] = field(default_factory=list)


def make_side(tls: ssl.SSLSocket, send_type: FrameType, settings: LinkSettings) -> Side:
    local, app = socket.socketpair()
    stats = CheckpointStats()
    downs: list[str] = []
    controls: list[dict[str, object]] = []
    link = Link(
        tls,
        send_type=send_type,
        settings=settings,
        on_down=downs.append,
        on_control=lambda c: controls.append(c.message),
        observe=stats.observe,
        checkpoints=lambda: stats.total,
        name=send_type.name.lower(),
    )
    link.start(SocketEnd(local), SocketEnd(local))
    return Side(link, app, stats, downs, controls)


@pytest.fixture
def linked(ca: TestCA) -> Iterator[Callable[..., tuple[Side, Side]]]:
    sides: list[Side] = []

    def make(
        settings: LinkSettings = FAST, via: Callable[[int], int] = lambda p: p
    ) -> tuple[Side, Side]:
        p_tls, s_tls = tls_pair(ca, via=via)
        primary = make_side(p_tls, FrameType.DATA, settings)
        secondary = make_side(s_tls, FrameType.BACK, settings)
        sides.extend((primary, secondary))
        return primary, secondary

    yield make
    for side in sides:
        side.link.close("test over", join_timeout=2)
        side.app.close()


def read_exactly(sock: socket.socket, n: int, timeout: float = 20.0) -> bytes:
    sock.settimeout(timeout)
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(1 << 20, n - got))
        assert chunk, f"stream ended after {got} of {n} bytes"
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


# --- bytes ------------------------------------------------------------------------------------


def test_forward_and_back_bytes_arrive_unchanged(linked):
    primary, secondary = linked()
    forward = os.urandom(24 << 20)
    back = os.urandom(3 << 20)
    writer = in_thread(lambda: primary.app.sendall(forward))
    back_writer = in_thread(lambda: secondary.app.sendall(back))
    try:
        received = read_exactly(secondary.app, len(forward))
        returned = read_exactly(primary.app, len(back))
    except TimeoutError:
        raise AssertionError(
            f"stalled; links went down: {primary.downs} {secondary.downs}"
        ) from None
    writer.join(5)
    back_writer.join(5)
    assert hashlib.sha256(received).digest() == hashlib.sha256(forward).digest()
    assert returned == back
    assert primary.downs == secondary.downs == []


def test_the_end_of_xls_stream_reaches_the_peer_as_a_control_message(linked):
    primary, secondary = linked()
    primary.app.sendall(b"last bytes")
    primary.app.shutdown(socket.SHUT_WR)
    assert read_exactly(secondary.app, 10) == b"last bytes"
    wait_for(lambda: {"type": "eof"} in secondary.controls)
    assert secondary.link.status().peer_eof
    assert secondary.link.status().connected  # an ended stream is not a lost peer


def test_checkpoints_are_counted_on_both_sides_and_carried_by_heartbeats(linked):
    primary, secondary = linked()
    pieces = list(remus_stream(5))
    drained = bytearray()

    def drain() -> None:
        while len(drained) < sum(map(len, pieces)):
            drained.extend(secondary.app.recv(1 << 20))

    reader = in_thread(drain)
    for piece in pieces:
        primary.app.sendall(piece)
        time.sleep(0.02)
    reader.join(10)
    assert bytes(drained) == b"".join(pieces)
    wait_for(lambda: primary.stats.total == 5 and secondary.stats.total == 5)
    wait_for(lambda: primary.link.status().peer_checkpoints == 5)
    wait_for(lambda: secondary.link.status().peer_checkpoints == 5)
    snap = secondary.stats.snapshot()
    assert snap.last_bytes == len(pieces[-1])
    assert snap.interval_ms is not None
    assert snap.last_pause_ms is not None
    assert snap.parse_error is None


# --- backpressure -----------------------------------------------------------------------------


def test_a_slow_reader_stalls_the_writer_instead_of_growing_buffers(linked):
    primary, secondary = linked()
    offered = 256 << 20
    block = os.urandom(1 << 20)
    pushed = [0]

    def push() -> None:
        with contextlib.suppress(OSError):
            while pushed[0] < offered:
                primary.app.sendall(block)
                pushed[0] += len(block)

    in_thread(push)
    # Nobody reads at the secondary: everything must stop at the sizes of the buffers.
    time.sleep(1.0)
    plateau = primary.link.status().bytes_sent
    time.sleep(1.0)
    assert primary.link.status().bytes_sent == plateau
    assert pushed[0] < 64 << 20, f"{pushed[0] >> 20} MiB taken from a source nobody drains"
    # A consumer that is merely slow is not a lost peer, though silence_timeout is 1 s.
    assert primary.link.status().connected
    assert secondary.link.status().connected
    # And the stream resumes intact once the reader reads.
    taken = pushed[0]
    assert read_exactly(secondary.app, taken) == block * (taken // len(block))


# --- losing the peer --------------------------------------------------------------------------


class FreezableProxy:
    """A TCP hop between the replicators that can stop forwarding (a frozen peer or path)."""

    def __init__(self) -> None:
        self.frozen = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._server.getsockname()[1]
        self._sockets: list[socket.socket] = [self._server]

    def to(self, target_port: int) -> int:
        in_thread(lambda: self._accept(target_port))
        return self.port

    def _accept(self, target_port: int) -> None:
        client, _ = self._server.accept()
        upstream = socket.create_connection(("127.0.0.1", target_port))
        self._sockets += [client, upstream]
        in_thread(lambda: self._pump(client, upstream))
        in_thread(lambda: self._pump(upstream, client))

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while True:
                while self.frozen.is_set():
                    time.sleep(0.05)
                data = src.recv(1 << 16)
                if not data:
                    return
                while self.frozen.is_set():
                    time.sleep(0.05)
                dst.sendall(data)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()


def test_a_frozen_peer_is_noticed_by_heartbeat_silence_on_both_sides(linked):
    proxy = FreezableProxy()
    try:
        primary, secondary = linked(via=proxy.to)
        primary.app.sendall(b"x" * 1000)
        read_exactly(secondary.app, 1000)
        time.sleep(0.3)  # heartbeats flow: nobody is silent
        assert primary.link.status().connected
        assert secondary.link.status().connected
        assert primary.link.status().last_heartbeat_monotonic is not None
        proxy.frozen.set()
        frozen_at = time.monotonic()
        wait_for(lambda: primary.downs != [] and secondary.downs != [], timeout=10)
        detected = time.monotonic() - frozen_at
        assert primary.downs[0].startswith("heartbeat silence")
        assert secondary.downs[0].startswith("heartbeat silence")
        assert detected < 5  # loose: the machine is shared; the point is that it fires
    finally:
        proxy.close()


def test_a_peer_that_goes_away_is_reported_once(linked):
    primary, secondary = linked()
    secondary.link.close("peer process died")
    wait_for(lambda: primary.downs != [])
    time.sleep(0.2)
    assert len(primary.downs) == 1
    assert primary.link.status().down_monotonic is not None
    # The primary's local stream ends too, so xl's transport sees the loss.
    primary.link.close()
    assert secondary.downs == ["peer process died"]


def test_garbage_from_the_peer_drops_the_link_without_crashing(ca):
    p_tls, s_tls = tls_pair(ca)
    side = make_side(p_tls, FrameType.DATA, FAST)
    try:
        s_tls.sendall(b"\x09\x00\x00\x00\x01z")
        wait_for(lambda: side.downs != [])
        assert side.downs[0].startswith("protocol error")
    finally:
        side.link.close()
        side.app.close()
        s_tls.close()


def test_data_flowing_the_wrong_way_is_a_protocol_error(ca):
    p_tls, s_tls = tls_pair(ca)
    side = make_side(p_tls, FrameType.DATA, FAST)
    try:
        s_tls.sendall(frames.encode(FrameType.DATA, b"a secondary never sends DATA"))
        wait_for(lambda: side.downs != [])
        assert "flows the other way" in side.downs[0]
    finally:
        side.link.close()
        side.app.close()
        s_tls.close()


# --- connecting -------------------------------------------------------------------------------


def test_a_hello_for_another_replication_is_refused(ca):
    primary, secondary = materials(ca)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    errors: list[BaseException] = []

    def serve() -> None:
        raw, _ = listener.accept()
        tls = accept_tls(raw, context=server_context(secondary, UID), peer_node="xen-a", timeout=5)
        try:
            exchange_hello(
                tls, uid=UID, node="xen-b", role="secondary", peer_role="primary", timeout=5
            )
        except HelloError as e:
            errors.append(e)
        tls.close()

    thread = in_thread(serve)
    client = dial(f"127.0.0.1:{port}", uid=UID, material=primary, peer_node="xen-b", timeout=5)
    with pytest.raises(HelloError):
        # Right CA and SNI, but it claims to be the secondary too.
        exchange_hello(
            client, uid=UID, node="xen-a", role="secondary", peer_role="primary", timeout=5
        )
    thread.join(5)
    assert errors
    client.close()
    listener.close()


def test_the_dialer_refuses_a_server_that_is_not_the_expected_node(ca):
    primary, secondary = materials(ca)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        raw, _ = listener.accept()
        with contextlib.suppress(OSError):
            accept_tls(raw, context=server_context(secondary, UID), peer_node="xen-a", timeout=5)

    thread = in_thread(serve)
    with pytest.raises(PeerRejected):
        dial(f"127.0.0.1:{port}", uid=UID, material=primary, peer_node="xen-c", timeout=5)
    thread.join(5)
    listener.close()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="xr", dir="/tmp") as path:
        yield Path(path)


@pytest.fixture
def node_listener(run_dir: Path) -> Iterator[NodeListener]:
    loop = asyncio.new_event_loop()
    listener = NodeListener(run_dir, "127.0.0.1:0", hello_timeout=2)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(listener.start(), loop).result(5)
    yield listener
    asyncio.run_coroutine_threadsafe(listener.close(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_one_node_port_routes_two_replications_by_sni(node_listener, run_dir):
    cas = {UID: TestCA("replication-a"), UID2: TestCA("replication-b")}
    results: dict[str, str] = {}

    def replicator(uid: str, handoff: HandoffServer) -> None:
        # What a secondary replicator does with a handed-over connection.
        node_b = cas[uid].issue("xen-b")
        material = TlsMaterial(node_b.ca_pem, node_b.cert_pem, node_b.key_pem)
        raw = handoff.accept()
        tls = accept_tls(raw, context=server_context(material, uid), peer_node="xen-a", timeout=5)
        hello = exchange_hello(
            tls, uid=uid, node="xen-b", role="secondary", peer_role="primary", timeout=5
        )
        results[uid] = str(hello["uid"])
        tls.close()

    handoffs = {uid: HandoffServer(accept_socket_path(run_dir, uid)) for uid in cas}
    threads = [in_thread(functools.partial(replicator, uid, handoffs[uid])) for uid in cas]
    try:
        for uid, issuer in cas.items():
            node_a = issuer.issue("xen-a")
            material = TlsMaterial(node_a.ca_pem, node_a.cert_pem, node_a.key_pem)
            tls = dial(
                f"127.0.0.1:{node_listener.port}",
                uid=uid,
                material=material,
                peer_node="xen-b",
                timeout=5,
            )
            exchange_hello(
                tls, uid=uid, node="xen-a", role="primary", peer_role="secondary", timeout=5
            )
            tls.close()
        for thread in threads:
            thread.join(5)
    finally:
        for handoff in handoffs.values():
            handoff.close()
    assert results == {UID: UID, UID2: UID2}
    assert node_listener.routed == 2


def test_the_node_port_drops_connections_for_replications_it_does_not_serve(node_listener, ca):
    primary, _ = materials(ca)
    with pytest.raises((ssl.SSLError, OSError)):
        dial(
            f"127.0.0.1:{node_listener.port}",
            uid=UID,
            material=primary,
            peer_node="xen-b",
            timeout=5,
        )
    wait_for(lambda: node_listener.refused == 1)


def test_the_node_port_drops_what_is_not_tls(node_listener):
    with socket.create_connection(("127.0.0.1", node_listener.port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        sock.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(100) == b""
    wait_for(lambda: node_listener.refused == 1)


def dial_and_read(port: int, material: TlsMaterial) -> None:
    tls = dial(f"127.0.0.1:{port}", uid=UID, material=material, peer_node="xen-b", timeout=5)
    # TLS 1.3: the client may finish before the server has judged its certificate.
    tls.settimeout(5)
    tls.recv(1)


def test_a_peer_with_the_wrong_ca_is_refused_behind_the_node_port(node_listener, run_dir):
    right, wrong = TestCA("right"), TestCA("wrong")
    handoff = HandoffServer(accept_socket_path(run_dir, UID))
    errors: list[BaseException] = []

    def replicator() -> None:
        node_b = right.issue("xen-b")
        material = TlsMaterial(node_b.ca_pem, node_b.cert_pem, node_b.key_pem)
        raw = handoff.accept()
        try:
            accept_tls(raw, context=server_context(material, UID), peer_node="xen-a", timeout=5)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    thread = in_thread(replicator)
    try:
        intruder = wrong.issue("xen-a")
        material = TlsMaterial(right.pem, intruder.cert_pem, intruder.key_pem)
        with pytest.raises((ssl.SSLError, OSError)):
            dial_and_read(node_listener.port, material)
        thread.join(5)
    finally:
        handoff.close()
    assert errors


# --- checkpoint statistics ----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_checkpoint_statistics_follow_the_stream_as_it_goes_by():
    clock = FakeClock()
    stats = CheckpointStats(clock=clock, wall=lambda: 1_700_000_000.0)
    first, second, third = remus_stream(3)
    stats.observe(memoryview(first))
    assert stats.snapshot().total == 1
    assert stats.snapshot().last_pause_ms is None  # the first one carries the pre-copy
    clock.now += 0.180  # the checkpoint interval: the guest runs
    half = len(second) // 2
    stats.observe(memoryview(second)[:half])  # the guest is paused from here ...
    clock.now += 0.020
    stats.observe(memoryview(second)[half:])  # ... to the end of the checkpoint
    snap = stats.snapshot()
    assert snap.total == 2
    assert snap.interval_ms == pytest.approx(200)
    assert snap.last_pause_ms == pytest.approx(20)
    assert snap.last_bytes == len(second)
    assert snap.last_time_unix == 1_700_000_000.0
    clock.now += 1.0
    stats.observe(memoryview(third))
    snap = stats.snapshot()
    assert snap.total == 3
    assert snap.stream_bytes == len(first) + len(second) + len(third)
    assert snap.bytes_per_second > 0


def checkpoints_every(interval: float, *, seconds: float, clock: FakeClock) -> CheckpointStats:
    """A stream that has carried a checkpoint every `interval` seconds for `seconds`, the
    clock at the last one."""
    stats = CheckpointStats(clock=clock)
    count = int(seconds / interval) + 1
    for piece in remus_stream(count):
        stats.observe(memoryview(piece))
        clock.now += interval
    clock.now -= interval
    return stats


STEADY = pytest.mark.parametrize(
    "interval",
    [
        pytest.param(0.2, id="Remus: every 200 ms"),
        pytest.param(3.0, id="COLO: seconds apart"),
        pytest.param(25.0, id="COLO: further apart than the averaging window"),
    ],
)


@STEADY
def test_the_byte_rate_is_the_streams_while_it_flows_wherever_between_bursts_it_is_read(
    interval: float,
) -> None:
    clock = FakeClock()
    stats = checkpoints_every(interval, seconds=max(60.0, 8 * interval), clock=clock)
    one = len(list(remus_stream(2))[1])  # the size of any later checkpoint
    true_rate = one / interval
    after_burst = clock.now
    for phase in (0.0, 0.25, 0.5, 0.75, 0.99):
        clock.now = after_burst + phase * interval
        rate = stats.snapshot().bytes_per_second
        assert true_rate / 2 < rate < true_rate * 2, (phase, rate, true_rate)


def test_a_stream_has_a_byte_rate_from_its_first_burst() -> None:
    clock = FakeClock()
    stats = CheckpointStats(clock=clock)
    first = next(remus_stream(1))
    stats.observe(memoryview(first))
    clock.now += 0.1
    assert stats.snapshot().bytes_per_second > 0
    assert stats.snapshot().to_json()["bytesPerSecond"] != 0


@STEADY
def test_a_stream_idle_for_two_checkpoint_intervals_and_the_window_has_no_byte_rate(
    interval: float,
) -> None:
    clock = FakeClock()
    stats = checkpoints_every(interval, seconds=max(60.0, 8 * interval), clock=clock)
    clock.now += max(10.0, 2 * interval) + 1
    assert stats.snapshot().bytes_per_second == 0


def test_a_stream_the_parser_cannot_follow_stops_the_counting_not_the_relay():
    stats = CheckpointStats()
    stats.observe(memoryview(b"this is not an xl stream header, not at all....."))
    snap = stats.snapshot()
    assert snap.parse_error is not None
    assert snap.total == 0
    stats.observe(memoryview(b"more bytes"))  # still accepted, still counted as bytes
    assert stats.snapshot().stream_bytes == 58


def test_the_status_uses_xennode_field_names():
    assert set(CheckpointStats().snapshot().to_json()) >= {
        "total",
        "lastTimeUnix",
        "intervalMs",
        "lastPauseMs",
        "lastBytes",
        "bytesPerSecond",
    }


# --- the transport pipe (xl's side) -------------------------------------------------------------


def test_the_pipe_delivers_the_back_channel_while_the_forward_stream_is_idle(run_dir):
    # xl remus waits for the receiver's banner before it writes anything: the pipe must
    # hand the banner over while its forward direction is blocked waiting for xl.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run_dir / "xl.sock"))
    listener.listen(1)
    pipe = subprocess.Popen(
        [sys.executable, "-m", "xenha_agent.pipe", "--socket", str(run_dir / "xl.sock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert pipe.stdin is not None
    assert pipe.stdout is not None
    try:
        conn, _ = listener.accept()
        conn.sendall(b"xl migration receiver ready, send binary domain data.\n")
        stdout = pipe.stdout
        lines: list[bytes] = []
        reader = in_thread(lambda: lines.append(stdout.readline()))
        reader.join(5)
        assert lines == [b"xl migration receiver ready, send binary domain data.\n"], (
            "the banner did not reach xl"
        )
        pipe.stdin.write(b"forward stream")
        pipe.stdin.flush()
        conn.settimeout(5)
        assert conn.recv(100) == b"forward stream"
        # The replicator closing the socket ends the pipe, so xl sees its transport fail.
        conn.close()
        assert pipe.wait(5) == 0
    finally:
        if pipe.poll() is None:
            pipe.kill()
        listener.close()


def test_the_pipe_passes_the_end_of_xls_stream_on_and_exits(run_dir):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(run_dir / "xl.sock"))
    listener.listen(1)
    pipe = subprocess.Popen(
        [sys.executable, "-m", "xenha_agent.pipe", "--socket", str(run_dir / "xl.sock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    try:
        conn, _ = listener.accept()
        data = os.urandom(8 << 20)
        stdin = pipe.stdin
        assert stdin is not None

        def xl_writes_and_closes() -> None:
            stdin.write(data)
            stdin.close()

        in_thread(xl_writes_and_closes)
        received = read_exactly(conn, len(data))
        assert received == data
        assert conn.recv(1) == b""  # half-closed after the last byte
        assert pipe.wait(5) == 0
    finally:
        if pipe.poll() is None:
            pipe.kill()
        listener.close()


def test_the_transport_command_is_a_shell_line_for_xl():
    command = transport_command("/run/xenha/u 1.xl.sock")
    assert command.endswith("-m xenha_agent.pipe --socket '/run/xenha/u 1.xl.sock'")
