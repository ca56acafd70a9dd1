"""The replicator pair end to end on two simulated Xen hosts.

Real `xl remus` / `xl migrate-receive` of the simulator, the real pipe, the node listener on
the secondary's port, a network path between the hosts that a power cut silences. What is
checked is what the agent relies on: the stream flows and is counted; on a lost stream the
standby holds its replica (xl does *not* fail over on its own) until told to activate or
drop; the primary resumes unprotected, and fences itself when its lease renewals stop too.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.pipe import transport_command
from xenha_agent.relay_listener import NodeListener
from xenha_agent.replicator_client import (
    ReplicatorClient,
    ReplicatorError,
    ReplicatorStatus,
    ReplicatorUnavailable,
    request_sync,
    spawn_replicator,
)
from xenha_agent.replicator_config import ReplicatorConfig, xl_socket_path

from xenha.sim import ledger
from xenha.sim.host import SimHost
from xenha.sim.netpath import NetPath

from .certs import TestCA

pytestmark = pytest.mark.integration

UID = "5e1f0000-aaaa-4bbb-8ccc-000000000001"


def wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Node:
    """One simulated host with its run dir and (once started) its replicator."""

    def __init__(self, root: Path, name: str, fabric: Path) -> None:
        self.name = name
        self.host = SimHost.start(root / name, name, fabric_dir=fabric)
        # Unix socket paths are limited to 107 bytes: keep the run dir short.
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"xr-{name}-", dir="/tmp"))
        self.process: Any = None

    @property
    def control(self) -> Path:
        return self.run_dir / f"{UID}.sock"

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        return request_sync(self.control, {"op": op, **fields})

    def status(self) -> ReplicatorStatus:
        status: ReplicatorStatus = self.request("status")["status"]
        return status

    def state(self) -> str:
        return str(self.status()["state"])

    def log(self) -> str:
        try:
            return (self.run_dir / f"{UID}.log").read_text()
        except FileNotFoundError:
            return ""

    def close(self) -> None:
        with contextlib.suppress(ReplicatorUnavailable, ReplicatorError, OSError):
            self.request("stop")
        if self.process is not None:
            with contextlib.suppress(Exception):
                self.process.wait(10)
            if self.process.poll() is None:
                self.process.kill()
        with contextlib.suppress(Exception):
            self.host.stop(timeout=3)
        shutil.rmtree(self.run_dir, ignore_errors=True)


class Pair:
    def __init__(self, root: Path, mode: str) -> None:
        self.mode = mode
        fabric = root / "fabric"
        self.ledger = fabric / ledger.LEDGER_NAME
        self.a = Node(root, "xen-a", fabric)
        self.b = Node(root, "xen-b", fabric)
        self.ca = TestCA("replication-db1")
        self.loop = asyncio.new_event_loop()
        self.listener = NodeListener(self.b.run_dir, "127.0.0.1:0")
        self._loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._loop_thread.start()
        asyncio.run_coroutine_threadsafe(self.listener.start(), self.loop).result(5)
        # The network between the hosts: a power cut of either host silences it.
        self.path = NetPath(("127.0.0.1", self.listener.port), name="a->b").start()
        self.a.host.add_netpath(self.path)
        self.b.host.add_netpath(self.path)

    def config(self, node: Node, peer: Node, role: str, **extra: Any) -> ReplicatorConfig:
        cert = self.ca.issue(node.name)
        ca_file, cert_file, key_file = cert.write(node.run_dir / "tls")
        xl = str(node.host.xl_path)
        if role == "primary":
            transport = transport_command(str(xl_socket_path(node.run_dir, UID)))
            options = ["-c"] if self.mode == "colo" else ["-i", "50"]
            command = [xl, "remus", *options, "-s", "", "db1", transport]
        else:
            command = [xl, "migrate-receive", "--colo" if self.mode == "colo" else "-r", "-e"]
        host, port = self.path.address
        return ReplicatorConfig(
            uid=UID,
            role=role,  # type: ignore[arg-type]
            domain="db1",
            node=node.name,
            peer_node=peer.name,
            command=command,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
            run_dir=node.run_dir,
            peer_address=f"{host}:{port}" if role == "primary" else None,
            xl=xl,
            heartbeat_interval_ms=100,
            # Generous: the machine is shared, and a starved test process stalls the NetPath.
            heartbeat_timeout_ms=2000,
            connect_timeout_s=30,
            **extra,
        )

    def start(self, **primary_extra: Any) -> None:
        self.a.host.create_guest("db1", memory_mib=16, dirty_rate=500)
        # The agent's order: the secondary first, so the primary finds it listening.
        secondary = self.config(self.b, self.a, "secondary")
        self.b.process = spawn_replicator(secondary, env=self.b.host.env)
        wait_for(self.b.control.exists, 20, "the secondary's control socket")
        wait_for(lambda: (self.b.run_dir / f"{UID}.accept.sock").exists(), 20, "its handoff")
        config = self.config(self.a, self.b, "primary", **primary_extra)
        self.a.process = spawn_replicator(config, env=self.a.host.env)
        wait_for(self.a.control.exists, 20, "the primary's control socket")

    def replicating(self, checkpoints: int = 3) -> None:
        def both() -> bool:
            a, b = self.a.status(), self.b.status()
            return (
                a["state"] == b["state"] == "Replicating"
                and b["checkpoints"]["total"] >= checkpoints
            )

        try:
            wait_for(both, 60, f"{checkpoints} checkpoints on both sides")
        except AssertionError:
            raise AssertionError(self.diagnose()) from None

    def diagnose(self) -> str:
        return f"--- primary log\n{self.a.log()}\n--- secondary log\n{self.b.log()}"

    def close(self) -> None:
        self.path.close()
        asyncio.run_coroutine_threadsafe(self.listener.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(5)
        self.loop.close()
        for node in (self.a, self.b):
            node.close()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[..., Pair]]:
    made: list[Pair] = []

    def make(mode: str = "remus") -> Pair:
        p = Pair(tmp_path, mode)
        made.append(p)
        return p

    yield make
    for p in made:
        p.close()


# --- replicating ------------------------------------------------------------------------------


def test_both_replicators_reach_replicating_and_count_the_same_checkpoints(pair):
    p = pair()
    p.start()
    p.replicating(3)
    a, b = p.a.status(), p.b.status()
    assert a["role"] == "primary"
    assert b["role"] == "secondary"
    assert a["peerConnected"]
    assert b["peerConnected"]
    assert a["lastHeartbeatAgeMs"] is not None
    assert a["lastHeartbeatAgeMs"] < 1000
    assert a["xlPid"] is not None
    assert b["xlPid"] is not None
    assert a["xlExit"] is None
    # Each side counts from its own copy of the stream; the peer's count rides heartbeats.
    assert a["checkpoints"]["total"] >= 3
    assert a["checkpoints"]["parseError"] is None
    assert b["checkpoints"]["lastBytes"] > 0
    assert b["checkpoints"]["intervalMs"] is not None
    wait_for(lambda: (p.a.status()["peerCheckpoints"] or 0) >= 3, 10, "heartbeat counts")
    # And the receiver really applied them: the replica exists, paused.
    incoming = p.b.host.domain("db1--incoming")
    assert incoming is not None
    assert incoming["paused"]
    assert ledger.of_kind(p.ledger, "checkpoint_applied")


def test_the_async_client_reads_the_same_status(pair):
    p = pair()
    p.start()
    p.replicating(1)
    client = ReplicatorClient.for_uid(p.b.run_dir, UID)
    status = asyncio.run(client.status())
    assert status["uid"] == UID
    assert status["state"] == "Replicating"
    assert {e["event"] for e in status["events"]} >= {"listening", "connected", "xl-started"}


def test_a_second_replicator_for_the_same_replication_refuses_to_start(pair):
    p = pair()
    p.start()
    p.replicating(1)
    config = p.config(p.b, p.a, "secondary")
    second = spawn_replicator(config, env=p.b.host.env)
    assert second.wait(20) == 3
    assert p.b.state() == "Replicating"


def test_activation_is_refused_while_the_stream_is_alive(pair):
    p = pair()
    p.start()
    p.replicating(1)
    with pytest.raises(ReplicatorError, match="lost peer"):
        p.b.request("activate")
    assert p.b.state() == "Replicating"


# --- the primary's host dies ------------------------------------------------------------------


def test_the_standby_holds_its_replica_after_the_primary_dies_until_told_to_activate(pair):
    p = pair()
    p.start()
    p.replicating(3)
    p.a.host.kill()
    wait_for(lambda: p.b.state() == "PeerLost", 20, "PeerLost")
    status = p.b.status()
    assert status["reason"] == "HeartbeatTimeout"  # a power cut is silence, not a reset
    assert status["peerLostMonotonic"] is not None
    # xl would fail over the moment its stdin closed; it must still be waiting.
    time.sleep(1.5)
    status = p.b.status()
    assert status["state"] == "PeerLost"
    assert status["xlExit"] is None
    assert p.b.host.domain("db1") is None
    assert p.b.host.domain("db1--incoming") is not None

    assert p.b.request("activate")["state"] == "Activating"
    wait_for(lambda: p.b.state() == "Active", 30, "Active")
    status = p.b.status()
    assert status["xlExit"] == 0
    assert any("Failover for domain" in line for line in status["xlOutput"])
    assert "xl-failover" in {e["event"] for e in status["events"]}
    running = p.b.host.domain("db1")
    assert running is not None
    assert running["active"]
    ledger.assert_never_two_active(p.ledger)


def test_dropping_kills_the_receiver_before_its_input_closes_and_destroys_the_replica(pair):
    p = pair()
    p.start()
    p.replicating(2)
    p.a.host.kill()
    wait_for(lambda: p.b.state() == "PeerLost", 20, "PeerLost")
    response = p.b.request("drop")
    assert response["state"] == "Dropped"
    assert response["destroyExit"] == 0
    status = p.b.status()
    assert status["xlExit"] == -signal.SIGKILL
    # Killed, not failed over: no "Failover" line, no domain left on the standby.
    assert not any("Failover" in line for line in status["xlOutput"])
    assert p.b.host.domain("db1") is None
    assert p.b.host.domain("db1--incoming") is None
    # A dropped replica cannot be activated any more.
    with pytest.raises(ReplicatorError):
        p.b.request("activate")


# --- the secondary's host dies ----------------------------------------------------------------


def test_the_primary_holds_the_guests_output_when_the_standby_dies_until_degraded(pair):
    p = pair()
    p.start()
    p.replicating(2)
    p.b.host.kill()
    wait_for(lambda: p.a.state() == "PeerLost", 20, "PeerLost")
    status = p.a.status()
    assert status["reason"] == "HeartbeatTimeout"
    assert status["outputHeld"]
    # xl is stuck writing to its transport: it has not given up, nor resumed the guest.
    time.sleep(1.0)
    status = p.a.status()
    assert status["xlExit"] is None
    assert not any("Backup failed" in line for line in status["xlOutput"])

    assert p.a.request("degrade", reason="StandbyRevoked")["state"] == "Degraded"
    wait_for(lambda: p.a.status()["xlExit"] is not None, 20, "xl remus to return")
    status = p.a.status()
    assert status["reason"] == "StandbyRevoked"
    assert not status["outputHeld"]
    assert any("Backup failed? resuming domain at primary" in ln for ln in status["xlOutput"])
    guest = p.a.host.domain("db1")
    assert guest is not None
    assert guest["active"]
    assert not status["fenced"]


def test_degrade_is_refused_while_the_stream_is_alive(pair):
    p = pair()
    p.start()
    p.replicating(1)
    with pytest.raises(ReplicatorError, match="alive"):
        p.a.request("degrade")
    assert p.a.state() == "Replicating"


def test_the_primary_fences_itself_on_stale_lease_renewals_even_with_the_stream_alive(pair):
    """Issue #5. The stream is alive, so the standby cannot act now; but it may the moment it
    sees the stream end (before we do), its holder's host Lease silent for D already. So the
    guest is paused once renewals are older than D - margin, stream or not; fresh renewals
    resume it, and the same stream goes on, without a reseed."""
    p = pair()
    p.start()
    p.replicating(1)
    xl_pid = p.a.status()["xlPid"]
    # The agent last renewed 100 s ago (it is down, or cut off from the API).
    p.a.request("lease", lastRenewedMonotonic=time.monotonic() - 100, durationS=10)
    wait_for(lambda: p.a.state() == "Fenced", 20, "Fenced")
    status = p.a.status()
    assert status["fenced"]
    assert status["reason"] == "SelfFence"
    assert status["peerConnected"]
    wait_for(lambda: p.a.host.domain("db1")["paused"], 10, "the guest paused")
    with pytest.raises(ReplicatorError, match="too old"):
        p.a.request("unfence")  # stale news: its own watchdog would pause it again
    sent = p.b.status()["checkpoints"]["total"]
    answer = p.a.request("unfence", lastRenewedMonotonic=time.monotonic(), durationS=10)
    assert answer["unpauseExit"] == 0
    assert not p.a.host.domain("db1")["paused"]
    wait_for(lambda: p.b.status()["checkpoints"]["total"] > sent + 2, 30, "more checkpoints")
    assert p.a.state() == p.b.state() == "Replicating"
    assert p.a.status()["xlPid"] == xl_pid
    ledger.assert_never_two_active(p.ledger)


def test_the_primary_fences_itself_when_stream_and_lease_renewals_are_both_lost(pair):
    p = pair()
    p.start()
    p.replicating(1)
    p.a.request("lease", lastRenewedMonotonic=time.monotonic(), durationS=10)
    p.b.host.kill()
    # No renewal news after that one (the agent is down, or cut off from the API as well):
    # D - margin after it the guest is paused, whether the loss was seen before or after.
    wait_for(lambda: p.a.state() == "Fenced", 30, "Fenced")
    status = p.a.status()
    assert status["fenced"]
    assert status["reason"] == "SelfFence"
    wait_for(lambda: p.a.host.domain("db1")["paused"], 10, "the guest paused")
    # The transport is kept (the output held): the agent still decides what comes next.
    wait_for(lambda: p.a.status()["outputHeld"], 20, "the output held")
    assert not p.a.status()["peerConnected"]


def test_fence_pauses_once_and_unfence_resumes(pair):
    p = pair()
    p.start()
    p.replicating(1)
    p.b.host.kill()
    wait_for(lambda: p.a.state() == "PeerLost", 20, "PeerLost")
    assert p.a.request("fence")["state"] == "Fenced"
    assert p.a.request("fence")["pauseExit"] == 0
    assert [e["event"] for e in p.a.status()["events"]].count("fenced") == 1
    assert p.a.host.domain("db1")["paused"]
    assert p.a.status()["outputHeld"]  # a fence keeps the transport
    assert p.a.request("unfence")["unpauseExit"] == 0
    # One unpause undoes the one pause: a stacked second pause would leave it paused.
    assert not p.a.host.domain("db1")["paused"]
    assert p.a.state() == "PeerLost"


def test_a_renewing_agent_keeps_a_primary_that_lost_its_standby_running(pair):
    p = pair()
    p.start()
    p.replicating(1)
    p.b.host.kill()
    wait_for(lambda: p.a.state() == "PeerLost", 20, "PeerLost")
    for _ in range(10):
        p.a.request("lease", lastRenewedMonotonic=time.monotonic(), durationS=2)
        time.sleep(0.2)
    assert p.a.state() == "PeerLost"
    assert not p.a.host.domain("db1")["paused"]


# --- orderly stops ----------------------------------------------------------------------------


def test_stopping_the_primary_tells_the_standby_which_holds_until_told(pair):
    p = pair()
    p.start()
    p.replicating(2)
    assert p.a.request("stop")["state"] == "Stopped"
    wait_for(lambda: p.a.process.poll() is not None, 20, "the primary to exit")
    wait_for(lambda: p.b.state() == "PeerLost", 20, "PeerLost")
    assert p.b.status()["reason"] == "PeerStopped"
    guest = p.a.host.domain("db1")
    assert guest is not None
    assert guest["active"]
    assert p.b.request("drop")["state"] == "Dropped"
    ledger.assert_never_two_active(p.ledger)


def test_stopping_a_standby_drops_its_replica_first(pair):
    p = pair()
    p.start()
    p.replicating(1)
    assert p.b.request("stop")["state"] == "Stopped"
    wait_for(lambda: p.b.process.poll() is not None, 20, "the secondary to exit")
    assert p.b.host.domain("db1--incoming") is None
    assert p.b.host.domain("db1") is None
    wait_for(lambda: p.a.state() == "PeerLost", 20, "the primary to notice")
    assert p.a.status()["reason"] == "PeerStopped"


# --- COLO -------------------------------------------------------------------------------------


def test_colo_replicates_and_fails_over_on_activate(pair):
    p = pair("colo")
    p.start()
    p.replicating(2)
    p.a.host.kill()
    wait_for(lambda: p.b.state() == "PeerLost", 20, "PeerLost")
    p.b.request("activate")
    wait_for(lambda: p.b.state() == "Active", 30, "Active")
    running = p.b.host.domain("db1")
    assert running is not None
    assert running["active"]
    ledger.assert_never_two_active(p.ledger)
