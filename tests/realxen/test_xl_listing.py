"""How the real-Xen suite reads `xl list`: a guest is running unless paused, shut down or dying."""

from __future__ import annotations

import pytest

from xenha.realxen.qemu import domain_running

LISTING = """Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0   640     1     r-----      44.4
counter                                      1    96     1     {state}       4.0
"""


@pytest.mark.parametrize(
    ("state", "running"),
    [
        ("r-----", True),  # on a CPU
        ("-b----", True),  # blocked: idle, waiting for an event
        ("------", True),  # runnable, waiting for a CPU (TCG with a busy dom0)
        ("---ss-", True),  # suspended for a Remus checkpoint
        ("--p---", False),
        ("--pss-", False),  # paused while suspended: a fenced primary
        ("---s--", False),  # shut down
        ("---sc-", False),  # crashed
        ("-----d", False),  # dying
    ],
)
def test_a_guest_runs_unless_paused_shut_down_or_dying(state: str, running: bool) -> None:
    assert domain_running(LISTING.format(state=state), "counter") is running


def test_a_guest_not_listed_is_not_running() -> None:
    assert domain_running(LISTING.format(state="r-----"), "other") is False
