"""The primary's self-fence never races a stop: a stopped replicator does not pause the guest.

Focused on the decision, with the replicator's own stop and tick code and no simulator: the
tick sees a lost stream and stale lease renewals, then waits for the request lock that a slow
stop holds (it waits up to 30 s for `xl remus` to exit). Once the stop is done the replicator
no longer speaks for the guest, so the tick must not fence.
"""

from __future__ import annotations

import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.pipe import transport_command
from xenha_agent.replicator import Replicator
from xenha_agent.replicator_config import ReplicatorConfig, xl_socket_path

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
    rep.link = DownLink()  # type: ignore[assignment]
    rep._lease = (time.monotonic() - 60, 2.0)
    yield rep, commands
    rep.finished.set()


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
