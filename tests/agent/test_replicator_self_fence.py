"""The primary replicator's watchdog: the pause that holds when the agent is dead or cut off.

Focused on the decision, with the replicator's own tick, request and control-socket code and
no simulator (xl is a recorder):
- the watchdog pauses once the agent's last host-Lease renewal is older than D - margin,
  whether the stream is alive or not (a standby that sees the stream end first may take over
  at once), and only once a stream connected (before that no standby copy exists);
- `fence` checks with xl before trusting its own flag (xl pause nests: never twice, but a
  guest someone unpaused is paused again); `unfence` carries the agent's renewal and refuses
  stale news;
- it never races a stop: the tick sees a due fence, then waits for the request lock that a
  slow stop holds (up to 30 s for `xl remus` to exit); once stopped it no longer speaks for
  the guest, so it must not fence;
- an agent that hangs up before reading its answer is an ordinary disconnect.
"""

from __future__ import annotations

import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.pipe import transport_command
from xenha_agent.replicator import Replicator, _Handler
from xenha_agent.replicator_config import ReplicatorConfig, xl_socket_path

from xenha.api.fencing import margin

from .certs import TestCA

UID = "5e1f0000-aaaa-4bbb-8ccc-0000000000f1"


class DownLink:
    """A stream that is lost; tells when someone looked at it."""

    def __init__(self) -> None:
        self.looked = threading.Event()

    @property
    def is_down(self) -> bool:
        self.looked.set()
        return True

    def send_control(self, _control: Any) -> None:
        raise AssertionError("a lost link is not written to")

    def close(self, _reason: str) -> None:
        pass


class UpLink(DownLink):
    """A stream that is alive."""

    @property
    def is_down(self) -> bool:
        self.looked.set()
        return False


class SlowXl:
    """`xl remus` taking `seconds` to exit after its transport closed."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def wait(self, timeout: float | None = None) -> int:
        time.sleep(self.seconds)
        return 0


@pytest.fixture
def primary() -> Iterator[tuple[Replicator, list[tuple[str, ...]]]]:
    run_dir = Path(tempfile.mkdtemp(prefix="xr-fence-", dir="/tmp"))
    ca_file, cert_file, key_file = TestCA("replication-db1").issue("xen-a").write(run_dir / "tls")
    config = ReplicatorConfig(
        uid=UID,
        role="primary",
        domain="db1",
        node="xen-a",
        peer_node="xen-b",
        command=["xl", "remus", "db1", transport_command(str(xl_socket_path(run_dir, UID)))],
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        run_dir=run_dir,
        peer_address="127.0.0.1:1",
    )
    rep = Replicator(config)
    commands: list[tuple[str, ...]] = []

    def xl_command(*args: str) -> int:
        commands.append(args)
        return 0

    rep._xl_command = xl_command  # type: ignore[method-assign]
    rep._set("Replicating", "CheckpointReceived")
    # Stream lost, and the last lease renewal long past its duration: fencing is due.
    rep._ever_connected = True
    rep.link = DownLink()  # type: ignore[assignment]
    rep._lease = (time.monotonic() - 60, 2.0)
    yield rep, commands
    rep.finished.set()


def renewed_ago(seconds: float, duration: float = 2.0) -> dict[str, Any]:
    return {"lastRenewedMonotonic": time.monotonic() - seconds, "durationS": duration}


def test_a_due_self_fence_pauses_the_guest(primary):
    rep, commands = primary
    rep._maybe_self_fence()
    assert commands == [("pause", "db1")]
    assert rep.state == "Fenced"


def test_a_slow_stop_is_never_followed_by_a_pause(primary):
    rep, commands = primary
    link: DownLink = rep.link
    rep.xl = SlowXl(1.5)
    real_stop = rep._op_stop
    holding = threading.Event()

    def stop() -> Any:
        # The stop holds the request lock; the tick decides fencing is due meanwhile and
        # blocks on the lock until the stop is done.
        holding.set()
        assert link.looked.wait(5), "the tick never looked at the stream"
        return real_stop()

    rep._op_stop = stop
    answers: list[dict[str, Any]] = []
    stopper = threading.Thread(target=lambda: answers.append(rep.handle({"op": "stop"})))
    stopper.start()
    assert holding.wait(5)
    ticker = threading.Thread(target=rep._maybe_self_fence)
    ticker.start()
    stopper.join(10)
    ticker.join(10)
    assert not stopper.is_alive()
    assert not ticker.is_alive()

    assert answers == [{"ok": True, "state": "Stopped"}]
    assert ("pause", "db1") not in commands
    assert rep.state == "Stopped"
    assert not rep._fenced


@pytest.mark.parametrize("state", ["Stopping", "Stopped", "Dropped"])
def test_a_stopping_or_stopped_primary_never_fences_itself(primary, state):
    rep, commands = primary
    rep._set(state, "StopRequested")
    rep._maybe_self_fence()
    assert commands == []
    rep._set("Replicating", "CheckpointReceived")
    rep.stopping.set()
    rep._maybe_self_fence()
    assert commands == []


@pytest.mark.parametrize("link", [DownLink, UpLink], ids=["stream lost", "stream alive"])
def test_stale_renewals_pause_the_guest_whatever_the_stream(primary, link):
    """Cut off from the API (or its agent dead), the primary must be paused before the
    standby may judge its host Lease expired, even while the stream still runs: the standby
    acts as soon as it sees the stream end, and may see that first."""
    rep, commands = primary
    rep.link = link()
    assert rep.handle({"op": "lease", **renewed_ago(0.0)}) == {"ok": True}
    rep._maybe_self_fence()
    assert commands == []
    duration = 2.0
    rep._lease = (time.monotonic() - (duration - margin(duration)) - 0.05, duration)
    rep._maybe_self_fence()
    assert commands == [("pause", "db1")]
    assert rep.state == "Fenced"
    assert rep._fenced
    rep._maybe_self_fence()
    assert commands == [("pause", "db1")]  # xl pause nests: once


def test_no_stream_ever_means_no_standby_to_fence_against(primary):
    rep, commands = primary
    rep._ever_connected = False
    rep._set("Starting", "Starting")
    rep._maybe_self_fence()
    assert commands == []


def test_older_lease_news_never_moves_the_last_renewal_back(primary):
    rep, commands = primary
    rep.handle({"op": "lease", **renewed_ago(0.0)})
    rep.handle({"op": "lease", **renewed_ago(30.0)})
    rep._maybe_self_fence()
    assert commands == []


@pytest.mark.parametrize(
    ("xl_says", "pauses"),
    [
        pytest.param(True, [], id="paused: not again"),
        pytest.param(False, [("pause", "db1")], id="running after all: paused again"),
    ],
)
def test_fence_checks_xl_before_trusting_its_flag(primary, xl_says, pauses):
    rep, commands = primary
    rep._maybe_self_fence()
    assert rep._fenced
    commands.clear()
    rep._domain_paused = lambda: xl_says
    answer = rep.handle({"op": "fence"})
    assert answer["ok"]
    assert answer["pauseExit"] == 0
    assert commands == pauses


def test_fence_that_cannot_be_checked_says_so(primary):
    rep, commands = primary
    rep._maybe_self_fence()
    commands.clear()
    rep._domain_paused = lambda: None
    answer = rep.handle({"op": "fence"})
    # Not 0: the agent then checks with xl itself.
    assert answer["ok"]
    assert answer["pauseExit"] != 0
    assert commands == []


def test_unfence_needs_fresh_renewal_news(primary):
    rep, commands = primary
    rep.link = UpLink()
    rep._maybe_self_fence()
    commands.clear()
    refused = rep.handle({"op": "unfence"})
    assert not refused["ok"]
    assert "too old" in refused["error"]
    assert commands == []
    answer = rep.handle({"op": "unfence", **renewed_ago(0.0)})
    assert answer["ok"]
    assert answer["unpauseExit"] == 0
    assert answer["state"] == "Seeding"  # the stream is alive; no checkpoint in this test
    assert commands == [("unpause", "db1")]
    assert not rep._fenced
    # The news came with the request: the watchdog does not pause it again.
    rep._maybe_self_fence()
    assert commands == [("unpause", "db1")]


def test_a_stream_lost_while_fenced_holds_the_output(primary):
    rep, _ = primary
    rep.link = UpLink()
    rep._maybe_self_fence()
    rep._transport = socket.socket(socket.AF_UNIX)
    try:
        rep._peer_lost("heartbeat silence for 600 ms")
        assert rep.state == "Fenced"
        assert rep._output_held
        rep.link = DownLink()
        answer = rep.handle({"op": "unfence", **renewed_ago(0.0)})
        # Resumed, but xl's transport is still held: the agent revokes, then degrades.
        assert answer["state"] == "PeerLost"
    finally:
        rep._transport.close()


class _Server:
    def __init__(self, rep: Replicator) -> None:
        self.replicator = rep


def test_an_agent_hanging_up_before_its_answer_is_a_normal_disconnect(primary):
    rep, _ = primary
    ours, theirs = socket.socketpair()
    theirs.sendall(json.dumps({"op": "lease", **renewed_ago(0.0)}).encode() + b"\n")
    theirs.close()  # gone before the answer is written
    try:
        _Handler(ours, "agent", _Server(rep))  # type: ignore[arg-type]
    finally:
        ours.close()
