"""Faults: a power cut takes every process of a host, a hang freezes them, and a network
path can go silent and come back."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest

from xenha.sim import faults
from xenha.sim.client import ServiceClient
from xenha.sim.netpath import NetPath

from .simlab import Lab, lab, wait_for

__all__ = ["lab"]

# Starts simulated Xen hosts (processes): see the marker in pyproject.toml.
pytestmark = pytest.mark.integration


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    def echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(4096):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield server.getsockname()
    finally:
        server.close()


@pytest.fixture
def server() -> Iterator[socket.socket]:
    """A listener whose accepted sockets the test holds (a survivor's relay)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        yield listener


def recv_within(sock: socket.socket, seconds: float) -> bytes | None:
    sock.settimeout(seconds)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


def heard_until_quiet(sock: socket.socket, quiet: float = 1.0, limit: float = 10.0) -> bytes:
    """What arrives until nothing has for `quiet` seconds. An EOF or a reset fails: that is
    the far side's kernel speaking, which a dead host's cannot."""
    got = b""
    sock.settimeout(quiet)
    deadline = time.monotonic() + limit
    while True:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return got
        except ConnectionResetError:
            pytest.fail("the survivor's connection was reset")
        assert chunk, "the survivor's connection saw an EOF"
        got += chunk
        assert time.monotonic() < deadline, "the far side still talks"


def is_established(sock: socket.socket) -> bool:
    tcpi_state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]
    return tcpi_state == 1  # TCP_ESTABLISHED


class TestNetPath:
    def test_forwards_both_ways(self, echo_server: tuple[str, int]) -> None:
        with NetPath(echo_server) as path, socket.create_connection(path.address) as c:
            c.sendall(b"ping")
            assert recv_within(c, 2) == b"ping"

    def test_a_cut_is_silent_and_a_restore_delivers_what_waited(
        self, echo_server: tuple[str, int]
    ) -> None:
        with NetPath(echo_server) as path, socket.create_connection(path.address) as c:
            c.sendall(b"a")
            assert recv_within(c, 2) == b"a"
            path.cut()
            c.sendall(b"b")
            assert recv_within(c, 0.3) is None  # no answer, and no EOF or reset either
            path.restore()
            assert recv_within(c, 2) == b"b"

    def test_new_connections_during_a_cut_see_nothing(self, echo_server: tuple[str, int]) -> None:
        with NetPath(echo_server) as path:
            path.cut()
            with socket.create_connection(path.address, timeout=1) as c:
                c.sendall(b"x")
                assert recv_within(c, 0.3) is None
                path.restore()
                assert recv_within(c, 2) == b"x"

    def test_reset_aborts_connections(self, echo_server: tuple[str, int]) -> None:
        with NetPath(echo_server) as path, socket.create_connection(path.address) as c:
            c.sendall(b"a")
            assert recv_within(c, 2) == b"a"
            path.reset()
            c.settimeout(2)
            with pytest.raises(ConnectionResetError):
                c.recv(1)

    def test_a_silenced_connection_never_tells_the_survivor_what_became_of_the_dead_side(
        self, server: socket.socket
    ) -> None:
        with NetPath(server.getsockname()) as path:
            dead = socket.create_connection(path.address)
            survivor, _ = server.accept()
            dead.sendall(b"last words")
            assert recv_within(survivor, 2) == b"last words"

            assert path.silence({(dead.getsockname(), dead.getpeername())}) == 1
            dead.close()  # the dead host's kernel: a FIN (an RST with unread data)
            assert heard_until_quiet(survivor, quiet=0.5) == b""
            survivor.sendall(b"anyone?")  # retransmitted into the void, no error
            assert heard_until_quiet(survivor, quiet=0.5) == b""
            path.cut()
            path.restore()  # healing the network does not bring the dead back
            assert heard_until_quiet(survivor, quiet=0.3) == b""
            assert is_established(survivor)

            # The dead host rebooted: its kernel answers the survivor's packets with an RST.
            path.reset()
            survivor.settimeout(2)
            with pytest.raises(ConnectionResetError):
                survivor.recv(1)
            survivor.close()

    def test_silencing_leaves_the_other_connections_alone(
        self, echo_server: tuple[str, int]
    ) -> None:
        with (
            NetPath(echo_server) as path,
            socket.create_connection(path.address) as dead,
            socket.create_connection(path.address) as alive,
        ):
            assert path.silence({(dead.getsockname(), dead.getpeername())}) == 1
            alive.sendall(b"ping")
            assert recv_within(alive, 2) == b"ping"
            assert path.silence({(("127.0.0.1", 1), ("127.0.0.1", 2))}) == 0

    def test_a_reset_meeting_traffic_does_not_stop_the_path(self, server: socket.socket) -> None:
        with NetPath(server.getsockname()) as path:
            # The target's RST and the client's bytes reach the path together; whichever it
            # handles first, the pair goes and the path keeps serving (tried a few times: the
            # order is the kernel's).
            for _ in range(20):
                with socket.create_connection(path.address) as client:
                    target, _ = server.accept()
                    path.cut()
                    target.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    target.close()
                    client.sendall(b"x")
                    time.sleep(0.01)
                    path.restore()
            with socket.create_connection(path.address) as client:
                target, _ = server.accept()
                client.sendall(b"still there")
                assert recv_within(target, 2) == b"still there"
                target.close()

    def test_half_close_travels_through(self, echo_server: tuple[str, int]) -> None:
        with NetPath(echo_server) as path, socket.create_connection(path.address) as c:
            c.sendall(b"bye")
            c.shutdown(socket.SHUT_WR)
            c.settimeout(2)
            got = b""
            while chunk := c.recv(4096):
                got += chunk
            assert got == b"bye"


def test_a_power_cut_kills_every_process_of_the_host(lab: Lab) -> None:
    a = lab.host("xen-a")
    b = lab.host("xen-b")
    helper = subprocess.Popen(["sleep", "600"], env=a.env)  # e.g. the host's agent
    bystander = subprocess.Popen(["sleep", "600"], env=b.env)
    try:
        assert helper.pid in a.processes()
        assert a.pid in a.processes()
        a.kill()
        assert helper.wait(timeout=5) == -9
        assert a.processes() == []
        assert not a.alive
        assert bystander.poll() is None
        assert b.alive
        assert lab.events("host_killed", host="xen-a")
    finally:
        for p in (helper, bystander):
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait()


def test_a_power_cut_silences_the_hosts_network_paths(
    lab: Lab, echo_server: tuple[str, int]
) -> None:
    a = lab.host("xen-a")
    with NetPath(echo_server) as path, socket.create_connection(path.address) as c:
        a.add_netpath(path)
        a.kill()
        c.sendall(b"anyone?")
        assert recv_within(c, 0.3) is None
        assert path.is_cut


# A process of the host with a connection each way through the network: it dials argv[1]
# (the survivor's relay), then accepts one connection, and sends heartbeats on both.
HEARTBEATS = """
import socket, sys, time
dialed = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
accepted, _ = listener.accept()
while True:
    for conn in (dialed, accepted):
        conn.sendall(b"beat")
    time.sleep(0.05)
"""


def test_a_power_cut_is_only_heartbeat_silence_to_the_survivor(
    lab: Lab, server: socket.socket
) -> None:
    """Neither the connection the host dialed nor the one it accepted ends: no FIN, no
    RST. The survivor's sockets stay open and the beats just stop."""
    a = lab.host("xen-a")
    # The survivor's side of the network, as in the lab: nothing registers these with `a`.
    with (
        NetPath(server.getsockname(), name="to-survivor") as to_survivor,
        contextlib.ExitStack() as stack,
    ):
        agent = subprocess.Popen(
            [sys.executable, "-c", HEARTBEATS, str(to_survivor.address[1])],
            env=a.env,
            stdout=subprocess.PIPE,
        )
        try:
            dialed_by_a, _ = server.accept()
            stack.enter_context(dialed_by_a)
            assert agent.stdout is not None
            port = int(agent.stdout.readline())
            with (
                NetPath(("127.0.0.1", port), name="to-a") as to_a,
                socket.create_connection(to_a.address) as dialed_by_survivor,
            ):
                survivor_ends = [dialed_by_a, dialed_by_survivor]
                for sock in survivor_ends:
                    assert recv_within(sock, 5), "no heartbeat before the power cut"
                a.kill()
                assert agent.wait(timeout=5) == -9
                for sock in survivor_ends:
                    heard_until_quiet(sock)  # beats already on the wire still arrive
                    sock.sendall(b"are you there?")
                    assert heard_until_quiet(sock, quiet=0.5) == b""
                    assert is_established(sock)
        finally:
            with contextlib.suppress(ProcessLookupError):
                agent.kill()
            agent.wait()


def test_a_hung_host_answers_nothing_until_it_resumes(lab: Lab) -> None:
    a = lab.host("xen-a")
    a.create_guest("db1")
    address = a.service_address("db1")
    with ServiceClient(address, timeout=0.5) as client:
        assert client.next() == 1
        a.pause()
        try:
            assert client.next() is None
        finally:
            a.resume()
        value = wait_for(client.next, 5, "an answer after resuming")
        assert value is not None
        assert value >= 2
    kinds = [e["kind"] for e in lab.events("host_stopped") + lab.events("host_continued")]
    assert kinds == ["host_stopped", "host_continued"]


def test_tagged_processes_are_found_by_environment(lab: Lab) -> None:
    a = lab.host("xen-a")
    child = subprocess.Popen(["sh", "-c", "sleep 600 & wait"], env=a.env)
    try:
        wait_for(lambda: len(faults.tagged_pids(a.tag)) >= 3, 5, "sh and its sleep")
    finally:
        faults.kill_tagged(a.tag)
    child.wait(timeout=5)
    time.sleep(0.05)
    assert faults.tagged_pids(a.tag) == []
