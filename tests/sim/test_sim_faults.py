"""Faults: a power cut takes every process of a host, a hang freezes them, and a network
path can go silent and come back."""

from __future__ import annotations

import contextlib
import socket
import subprocess
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


def recv_within(sock: socket.socket, seconds: float) -> bytes | None:
    sock.settimeout(seconds)
    try:
        return sock.recv(4096)
    except TimeoutError:
        return None


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
