"""`xl remus` between two simulated hosts: what is replicated, when output leaves, and what
happens when either side dies."""

from __future__ import annotations

import os
import signal
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from xenha.sim import guest, ledger
from xenha.sim.client import ServiceClient
from xenha.sim.host import SimHost
from xenha.sim.tap import StreamTap
from xenha.stream import format as fmt
from xenha.stream.parser import CheckpointComplete, Record, XlHeaderParsed

from .simlab import PY, Lab, Proc, lab, wait_for

__all__ = ["lab"]

# Starts simulated Xen hosts (processes): see the marker in pyproject.toml.
pytestmark = pytest.mark.integration

TAIL = [
    "libxc:x86 TSC info",
    "libxc:Shared info",
    "libxc:x86 PV vcpu basic",
    "libxc:x86 PV vcpu extended",
    "libxc:Checkpoint",
    "libxl:Checkpoint end",
]


def record_names(events: Sequence[object]) -> list[str]:
    return [f"{e.layer.value}:{e.name}" for e in events if isinstance(e, Record)]


def start_replication(
    lab: Lab, *remus_options: str, dirty_rate: float = 1000, **host_options: Any
) -> tuple[SimHost, SimHost, Proc, Proc, StreamTap]:
    a = lab.host("xen-a", **host_options)
    b = lab.host("xen-b", **host_options)
    a.create_guest("db1", memory_mib=16, dirty_rate=dirty_rate)
    receiver, sock = lab.receive(b, "-r")
    tap = lab.tap(sock)
    sender = lab.remus(a, "db1", *remus_options, to=Path(tap.path))
    return a, b, receiver, sender, tap


def test_remus_replicates_memory_byte_exactly_at_every_checkpoint(lab: Lab) -> None:
    _a, b, _receiver, _sender, _tap = start_replication(lab, "-i", "50", digests=True)
    wait_for(lambda: len(lab.events("checkpoint_applied")) >= 8, what="8 checkpoints")
    sent = {e["number"]: e["crc"] for e in lab.events("checkpoint_sent")}
    applied = {e["number"]: e["crc"] for e in lab.events("checkpoint_applied")}
    assert applied
    for number, crc in applied.items():
        assert sent[number] == crc, f"checkpoint {number} differs"
    incoming = b.domain("db1--incoming")
    assert incoming is not None
    assert incoming["flags"] == "--p---"
    assert not incoming["active"]


# The transports `xl remus` runs in this project: the simulator's, and the agent's (to its
# replicator's socket). xl reads the receiver's banner from the transport's stdout before it
# sends anything, so a transport that sits on what it has already read hangs seeding.
TRANSPORTS = {
    "sim-pipe": f"{PY} -m xenha.sim.pipe connect",
    "agent-pipe": f"{PY} -m xenha_agent.pipe --socket",
}


@pytest.mark.parametrize("transport", list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def test_the_handshake_and_acks_get_through_a_back_channel_that_comes_a_byte_at_a_time(
    lab: Lab, transport: str
) -> None:
    a = lab.host("xen-a")
    b = lab.host("xen-b")
    a.create_guest("db1", memory_mib=16, dirty_rate=1000)
    receiver, sock = lab.receive(b, "-r")
    tap = lab.tap(sock, dribble_back=(1, 0.005))
    sender = lab.remus(a, "db1", "-i", "50", to=Path(tap.path), transport=transport)
    try:
        wait_for(lambda: len(lab.events("checkpoint_applied")) >= 3, 60, "3 checkpoints")
        # Output leaves only on the receiver's acknowledgement: acks got through too.
        with ServiceClient(a.service_address("db1"), timeout=10) as client:
            assert client.next() is not None
    except AssertionError as e:
        raise AssertionError(
            f"{e}\n--- xl remus\n{sender.stderr}\n--- xl migrate-receive\n{receiver.stderr}"
        ) from None
    assert sender.poll() is None
    assert not tap.seen.errors


@pytest.mark.parametrize("transport", list(TRANSPORTS.values()), ids=list(TRANSPORTS))
def test_xl_gets_the_banner_even_if_it_reads_it_only_once_the_transport_waits_for_more(
    lab: Lab, transport: str
) -> None:
    """A transport that keeps its stdout pipe locked while it waits for more input (a
    splice from a socket into the pipe does) starves a reader that comes late: xl, busy
    or descheduled when the banner arrived, would block on the banner forever."""
    a = lab.host("xen-a")
    b = lab.host("xen-b")
    a.create_guest("db1", memory_mib=16, dirty_rate=1000)
    receiver, sock = lab.receive(b, "-r")
    tap = lab.tap(sock)
    sender = lab.remus(a, "db1", "-i", "50", to=Path(tap.path), transport=transport)
    # The receiver needs a few hundred ms to start and send its banner: plenty to stop xl
    # once its transport is connected.
    assert tap.connected.wait(30), sender.stderr
    os.kill(sender.popen.pid, signal.SIGSTOP)
    try:
        banner = len(fmt.MIGRATE_RECEIVER_BANNER)
        wait_for(lambda: tap.seen.back_bytes >= banner, 30, "the receiver's banner")
        time.sleep(0.5)  # the transport has passed it on and waits for more
    finally:
        os.kill(sender.popen.pid, signal.SIGCONT)
    try:
        wait_for(lambda: lab.events("checkpoint_applied"), 60, "the first checkpoint")
    except AssertionError as e:
        raise AssertionError(
            f"{e}\n--- xl remus\n{sender.stderr}\n--- xl migrate-receive\n{receiver.stderr}"
        ) from None


def test_the_stream_has_the_record_sequence_of_real_xen(lab: Lab) -> None:
    _a, _b, _receiver, _sender, tap = start_replication(lab, "-i", "50")
    wait_for(lambda: len(tap.seen.checkpoints()) >= 3, what="3 checkpoints")
    events = [e for _, e in tap.seen.forward]
    assert isinstance(events[0], XlHeaderParsed)
    assert '"name": "db1"' in events[0].header.config_json()
    first_end = next(i for i, e in enumerate(events) if isinstance(e, CheckpointComplete))
    first = record_names(events[:first_end])
    pages = first.count("libxc:Page data")
    assert first == [
        "libxl:Libxc context",
        "libxc:x86 PV info",
        "libxc:x86 CPUID policy",
        "libxc:x86 MSR policy",
        "libxc:Static data end",
        "libxc:x86 PV P2M frames",
        *["libxc:Page data"] * pages,
        *TAIL,
    ]
    # 4096 pages in records of at most 1024: four for the first round, then dirty rounds.
    assert pages >= 4
    page_records = [e for e in events[:first_end] if isinstance(e, Record) and e.count]
    assert all(r.count <= 1024 for r in page_records)
    assert sum(r.count for r in page_records[:4]) == 4096
    second_end = next(
        i for i, e in enumerate(events) if isinstance(e, CheckpointComplete) and e.number == 2
    )
    second = record_names(events[first_end + 1 : second_end])
    assert second == ["libxc:Page data", *TAIL]
    assert not tap.seen.errors


def test_output_leaves_only_once_the_backup_acknowledged_its_checkpoint(lab: Lab) -> None:
    a, _b, _receiver, _sender, _tap = start_replication(lab, "-i", "100")
    wait_for(lambda: lab.events("checkpoint_applied"), what="the first checkpoint")
    with ServiceClient(a.service_address("db1")) as client:
        values = [client.next() for _ in range(5)]
    assert None not in values
    assert values == sorted(v for v in values if v is not None)
    applied = {e["number"]: e["t"] for e in lab.events("checkpoint_applied")}
    replies = lab.events("reply")
    assert len(replies) == 5
    for reply in replies:
        assert reply["mode"] == "remus"
        assert reply["epoch"] is not None
        # The receiver held the checkpoint that contains this reply's state before it left.
        assert applied[reply["epoch"]] < reply["t"]


def test_a_second_remus_session_releases_output_on_its_own_acknowledgements(lab: Lab) -> None:
    """Re-protection: the first `xl remus` of a guest ends when its backup dies, a second one
    protects it anew to another host. The second run numbers its checkpoints from 1; a reply
    the guest produces in it leaves once *that* run's backup acknowledged the checkpoint
    holding its state, and not before."""
    a = lab.host("xen-a")
    b = lab.host("xen-b")
    c = lab.host("xen-c")
    a.create_guest("db1", memory_mib=16, dirty_rate=1000)
    uuid = a.domain("db1")["uuid"]  # type: ignore[index]

    receiver, sock = lab.receive(b, "-r")
    first = lab.remus(a, "db1", "-i", "20", to=Path(lab.tap(sock).path))
    wait_for(lambda: len(lab.events("checkpoint_applied", host="xen-b")) >= 8, 60, "8 checkpoints")
    b.kill()
    assert first.wait() == 1
    assert "Remus: Backup failed? resuming domain at primary." in first.stderr

    # A request that the guest can only serve once the second run buffers its output: the
    # guest is paused until then (the connection was made while it ran).
    client = ServiceClient(a.service_address("db1"), ledger_path=lab.ledger, uuid=uuid, timeout=60)
    before = client.next()
    assert before is not None
    assert a.xl("pause", "db1").returncode == 0
    answers: list[int | None] = []
    asking = threading.Thread(target=lambda: answers.append(client.next()))
    asking.start()

    # The second run's backup gets checkpoints 1-3 and acknowledges them; nothing later.
    receiver, sock = lab.receive(c, "-r")
    tap = StreamTap(lab.root / "tap2.sock", receiver=sock)
    tap.hold_after_checkpoint(3, extra_bytes=0, keep_back_channel=True)
    tap.start()
    second = lab.remus(a, "db1", "-i", "100", to=Path(tap.path))
    try:
        wait_for(lambda: a.domain("db1")["output_mode"] == "remus", 60, "buffering")  # type: ignore[index]
        assert a.xl("unpause", "db1").returncode == 0
        asking.join(timeout=60)
        assert answers == [before + 1], f"{second.stderr}\n--- receiver\n{receiver.stderr}"

        (reply,) = lab.events("reply", value=before + 1)
        assert (reply["mode"], reply["session"]) == ("remus", 2)
        applied = {e["number"]: e["t"] for e in lab.events("checkpoint_applied", host="xen-c")}
        assert reply["epoch"] in applied
        assert applied[reply["epoch"]] < reply["t"]

        # Past checkpoint 3 the guest's output waits for acknowledgements that never come.
        tap.wait_held(timeout=60)
        with ServiceClient(a.service_address("db1"), timeout=1) as late:
            assert late.next() is None
        assert [e["value"] for e in lab.events("reply")] == [before, before + 1]
        assert second.poll() is None
    finally:
        client.close()
        tap.close()


def test_with_network_buffering_disabled_output_leaves_at_once(lab: Lab) -> None:
    a, _b, _receiver, sender, _tap = start_replication(lab, "-F", "-n", "-i", "100")
    wait_for(lambda: lab.events("checkpoint_applied"), what="the first checkpoint")
    with ServiceClient(a.service_address("db1")) as client:
        assert [client.next() for _ in range(3)] == [1, 2, 3]
    assert all(r["epoch"] is None for r in lab.events("reply"))
    assert sender.poll() is None


def test_killing_the_primary_mid_checkpoint_fails_over_to_the_last_complete_one(
    lab: Lab,
) -> None:
    a, b, receiver, _sender, tap = start_replication(lab, "-i", "50", digests=True)
    tap.hold_after_checkpoint(3, extra_bytes=2000)  # inside checkpoint 4's first PAGE_DATA
    uuid = a.domain("db1")["uuid"]  # type: ignore[index]
    stop = threading.Event()

    def use_the_service() -> None:
        with ServiceClient(
            a.service_address("db1"), ledger_path=lab.ledger, uuid=uuid, timeout=0.5
        ) as client:
            while not stop.is_set():
                client.next()

    user = threading.Thread(target=use_the_service)
    user.start()
    try:
        tap.wait_held(timeout=30)
        a.kill()
    finally:
        stop.set()
        user.join()
    tap.close_receiver()

    assert receiver.wait() == 0
    err = receiver.stderr
    assert "Failed to read" in err
    assert "(0x00000001, Page data)" in err
    assert "xc: info: Restore successful" in err
    failed_over = b.domain("db1")
    assert failed_over is not None
    assert f"migration target: Remus Failover for domain {failed_over['domid']}" in err
    assert failed_over["active"]
    assert failed_over["flags"] != "--p---"

    (restore,) = lab.events("restore")
    assert restore["number"] == 3
    sent = {e["number"]: e for e in lab.events("checkpoint_sent")}
    (applied,) = [e for e in lab.events("checkpoint_applied") if e["number"] == 3]
    assert applied["crc"] == sent[3]["crc"]
    assert restore["counter"] == applied["counter"]

    with ServiceClient(b.service_address("db1"), ledger_path=lab.ledger, uuid=uuid) as client:
        after = client.next()
    assert after == restore["counter"] + 1
    ledger.assert_never_two_active(lab.ledger)
    ledger.assert_client_view_clean(lab.ledger)


def test_destroying_the_primary_is_the_documented_way_to_force_failover(lab: Lab) -> None:
    a, b, receiver, sender, _tap = start_replication(lab, "-i", "50")
    wait_for(lambda: len(lab.events("checkpoint_applied")) >= 2, what="2 checkpoints")
    assert a.xl("destroy", "db1").returncode == 0
    assert sender.wait() == 0
    assert "Remus: Primary domain has been destroyed." in sender.stderr
    assert "Backup failed" not in sender.stderr
    assert receiver.wait() == 0
    assert "migration target: Remus Failover for domain" in receiver.stderr
    assert b.domain("db1") is not None
    ledger.assert_never_two_active(lab.ledger)


def test_a_dead_backup_leaves_the_primary_running_unprotected(lab: Lab) -> None:
    a, b, _receiver, sender, _tap = start_replication(lab, "-i", "50")
    wait_for(lambda: len(lab.events("checkpoint_applied")) >= 2, what="2 checkpoints")
    b.kill()
    assert sender.wait() == 1
    assert "Remus: Backup failed? resuming domain at primary." in sender.stderr
    info = a.domain("db1")
    assert info is not None
    assert info["active"]
    assert info["output_mode"] == "direct"
    with ServiceClient(a.service_address("db1")) as client:
        assert client.next() is not None
    assert lab.events("reply")[-1]["epoch"] is None


def test_the_stream_ending_before_the_first_checkpoint_leaves_nothing_behind(lab: Lab) -> None:
    a = lab.host("xen-a")
    b = lab.host("xen-b")
    a.create_guest("db1", memory_mib=64, dirty_rate=0)
    receiver, sock = lab.receive(b, "-r")
    tap = lab.tap(sock)
    tap.hold_after_checkpoint(0, extra_bytes=0)  # never reached: cut by hand below
    sender = lab.remus(a, "db1", "-i", "50", to=Path(tap.path))
    wait_for(lambda: tap.seen.forward_bytes > 1 << 20, what="the first megabyte")
    sender.popen.kill()
    assert receiver.wait() == 1
    assert "migration target: Domain creation failed (code -3)." in receiver.stderr
    assert b.domain("db1--incoming") is None


def test_guest_memory_helpers_read_what_the_guest_wrote() -> None:
    memory = bytearray(16 * 4096)
    guest.initialise(memory, seed=42)
    marks: set[int] = set()
    guest.tick(memory, 16, 5, marks.add)
    value, reply = guest.serve(memory, marks.add)
    assert (value, reply) == (1, b"1\n")
    assert guest.counter(memory) == 1
    assert 0 in marks
    assert len(marks) > 1
    assert zlib.crc32(memory) != 0


@pytest.mark.parametrize("divergence", [0.0, 1.0])
def test_divergent_replies_carry_the_same_counter(divergence: float) -> None:
    memory = bytearray(4096)
    guest.initialise(memory, seed=1)
    _, reply = guest.serve(memory, lambda _pfn: None, divergence=divergence)
    assert guest.parse_reply(reply) == 1
    assert (reply == b"1\n") == (divergence == 0.0)
