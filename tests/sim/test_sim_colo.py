"""`xl remus -c` (COLO) between two simulated hosts: the checkpoint protocol on both
channels, the proxy that compares outputs, and failover to the running secondary."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from xenha.sim import ledger
from xenha.sim.client import ServiceClient
from xenha.sim.host import SimHost
from xenha.sim.tap import StreamTap
from xenha.stream import format as fmt
from xenha.stream.format import CheckpointState, Layer, LibxcRecord, LibxlRecord
from xenha.stream.parser import BannerReceived, CheckpointComplete, Record

from .simlab import Lab, Proc, lab, wait_for

__all__ = ["lab"]

# Starts simulated Xen hosts (processes): see the marker in pyproject.toml.
pytestmark = pytest.mark.integration


def start_colo(
    lab: Lab, *, interval: float, divergence: float = 0.0
) -> tuple[SimHost, SimHost, Proc, Proc, StreamTap]:
    a = lab.host("xen-a", colo_interval=interval)
    b = lab.host("xen-b", colo_interval=interval)
    a.create_guest("db1", memory_mib=16, dirty_rate=200, divergence=divergence)
    receiver, sock = lab.receive(b, "--colo")
    tap = lab.tap(sock)
    sender = lab.remus(a, "db1", "-c", "-u", to=Path(tap.path))
    return a, b, receiver, sender, tap


def back_channel_words(tap: StreamTap) -> list[str]:
    words = []
    for _, event in tap.seen.back:
        if isinstance(event, BannerReceived):
            words.append("banner")
        elif isinstance(event, Record) and event.rtype == LibxlRecord.CHECKPOINT_STATE:
            words.append(CheckpointState(fmt.decode_checkpoint_state(event.body or b"")).name)
        elif isinstance(event, Record):
            words.append(event.name)
    return words


def test_the_checkpoint_protocol_on_both_channels(lab: Lab) -> None:
    _a, b, _receiver, sender, tap = start_colo(lab, interval=0.2)
    # Checkpoint 4 is over when the secondary says it runs again, on the back channel.
    wait_for(lambda: len(back_channel_words(tap)) >= 15, what="4 COLO checkpoints")
    cycle = ["SVM_SUSPENDED", "Checkpoint dirty pfn list", "SVM_READY", "SVM_RESUMED"]
    words = back_channel_words(tap)
    # The first checkpoint finds no secondary running yet: it only becomes ready.
    assert words[:3] == ["banner", "SVM_READY", "SVM_RESUMED"]
    assert words[3:15] == cycle * 3

    forward = [e for _, e in tap.seen.forward]
    for i, event in enumerate(forward[:-1]):
        if isinstance(event, CheckpointComplete) and i + 1 < len(forward):
            after = forward[i + 1]
            assert isinstance(after, Record)
            assert after.is_(Layer.LIBXL, LibxlRecord.CHECKPOINT_STATE)
            assert fmt.decode_checkpoint_state(after.body or b"") == CheckpointState.NEW
            assert forward[i + 2].is_(Layer.LIBXC, LibxcRecord.PAGE_DATA)  # type: ignore[union-attr]

    secondary = b.domain("db1--incoming")
    assert secondary is not None
    assert secondary["colo_secondary"]
    assert not secondary["paused"]
    assert "COLO can't be used with memory compression" not in sender.stderr


def test_matching_outputs_leave_at_once_and_do_not_force_checkpoints(lab: Lab) -> None:
    # A long periodic interval, so that any checkpoint during the requests would be forced.
    a, _b, _receiver, _sender, tap = start_colo(lab, interval=30.0)
    wait_for(lambda: len(tap.seen.checkpoints()) >= 1, what="the first checkpoint")
    wait_for(lambda: len(back_channel_words(tap)) >= 3, what="the secondary to run")
    before = len(tap.seen.checkpoints())
    with ServiceClient(a.service_address("db1")) as client:
        values = [client.next() for _ in range(10)]
    assert values == list(range(1, 11))
    replies = lab.events("reply")
    assert [r["matched"] for r in replies] == [True] * 10
    assert len(tap.seen.checkpoints()) == before


def test_divergent_outputs_force_a_checkpoint_each(lab: Lab) -> None:
    a, _b, _receiver, _sender, tap = start_colo(lab, interval=30.0, divergence=1.0)
    wait_for(lambda: len(back_channel_words(tap)) >= 3, what="the secondary to run")
    before = len(tap.seen.checkpoints())
    with ServiceClient(a.service_address("db1"), timeout=10) as client:
        values = [client.next() for _ in range(4)]
    assert values == [1, 2, 3, 4]
    # Without the divergence the next checkpoint would be 30 s away.
    assert len(tap.seen.checkpoints()) >= before + 4
    replies = lab.events("reply")
    assert all(not r["matched"] and r["epoch"] is not None for r in replies)


def test_failover_continues_on_the_running_secondary(lab: Lab) -> None:
    a, b, receiver, _sender, tap = start_colo(lab, interval=0.2)
    uuid = a.domain("db1")["uuid"]  # type: ignore[index]
    wait_for(lambda: len(tap.seen.checkpoints()) >= 3, what="3 checkpoints")
    with ServiceClient(a.service_address("db1"), ledger_path=lab.ledger, uuid=uuid) as client:
        before = [client.next() for _ in range(3)]
    a.kill()
    assert receiver.wait() == 0
    assert "migration target: COLO Failover for domain" in receiver.stderr
    survivor = b.domain("db1")
    assert survivor is not None
    assert survivor["active"]
    assert not survivor["colo_secondary"]
    with ServiceClient(b.service_address("db1"), ledger_path=lab.ledger, uuid=uuid) as client:
        after = client.next()
    assert after is not None
    assert after > max(v for v in before if v is not None)
    ledger.assert_never_two_active(lab.ledger)
    ledger.assert_client_view_clean(lab.ledger)


def test_a_host_without_colo_refuses_it_as_debian_does(lab: Lab) -> None:
    a = lab.host("xen-a", colo=False)
    a.create_guest("db1")
    banner = fmt.MIGRATE_RECEIVER_BANNER.decode().strip()
    fake = f"printf '{banner}\\n'; cat >/dev/null"
    result = a.xl("remus", "-c", "-u", "-s", "", "db1", fake)
    assert result.returncode == 1
    assert "COLO is not supported" in result.stderr
    assert "COLO: Backup failed? resuming domain at primary." in result.stderr
    time.sleep(0.1)
    assert a.domain("db1")["active"]  # type: ignore[index]
