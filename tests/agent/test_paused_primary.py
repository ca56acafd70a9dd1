"""A primary whose guest is paused with no replicator left to protect it (plan.Unpause).

Paused by this agent's own fence, the guest is fencing's to resume (test_agent.py). Paused by
anything else — its replicator's self-fence that the agent never adopted, an activation whose
unpause failed, `xl remus` giving up on a guest it could not suspend — it would otherwise stay
paused for good: nothing resumes it and no replicator is started for a paused guest. The agent
unpauses it once that is safe (the fencing Lease is this node's and names no standby, its
renewals are fresh) and protects it again; never while the Lease names another node.

The agent under test is real, on a simulated host, against a real kube-apiserver; the test
plays the operator and the replicator (fake_replicator.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from .fake_replicator import FakeLauncher
from .scene import Scene, active_agent, has_event, paused, until

pytestmark = pytest.mark.integration


def test_a_guest_paused_not_by_a_fence_is_unpaused_and_protected_again(
    scene: Scene, host: Any, run: Callable[..., Any]
) -> None:
    launcher = FakeLauncher()

    async def scenario() -> None:
        async with active_agent(scene, host, launcher, designated=False) as (_, primary):
            primary.connect(checkpoints=0)
            # Paused by someone else, and xl remus gives up on it (a paused guest cannot
            # be suspended for a checkpoint).
            assert host.xl("pause", scene.domain).returncode == 0
            primary.state, primary.reason = "Failed", "XlExited"
            await until(lambda: has_event(scene, "GuestUnpaused"), seconds=15)
            await until(lambda: not paused(host, scene.domain))
            # And protected again: a new primary replicator for the running guest.
            await until(lambda: len(launcher.launched) == 2, seconds=15)
            assert "stop" in primary.calls
            assert not await has_event(scene, "SelfFenced")
            assert await scene.holder() == scene.a

    run(scenario())


def test_a_paused_guest_whose_lease_is_held_elsewhere_is_never_unpaused(
    scene: Scene, host: Any, run: Callable[..., Any]
) -> None:
    launcher = FakeLauncher()

    async def scenario() -> None:
        async with active_agent(scene, host, launcher, designated=False) as (_, primary):
            primary.connect(checkpoints=0)
            assert host.xl("pause", scene.domain).returncode == 0
            await scene.set_holder(scene.b)  # the standby took over meanwhile
            primary.state, primary.reason = "Failed", "XlExited"
            # The copy is destroyed, as any copy the Lease does not name; it never ran.
            await until(lambda: host.domain(scene.domain) is None, seconds=15)
            assert not await has_event(scene, "GuestUnpaused")
            await asyncio.sleep(1)
            assert len(launcher.launched) == 1

    run(scenario())


def test_a_paused_guest_with_a_designated_standby_is_unpaused_once_it_is_revoked(
    scene: Scene, host: Any, run: Callable[..., Any]
) -> None:
    """The standby may take over while the Lease names it: fencing revokes it first (the plan
    waits for that, see test_plan.py), then the guest runs again here."""
    launcher = FakeLauncher()

    async def scenario() -> None:
        async with active_agent(scene, host, launcher, designated=True) as (_, primary):
            primary.connect(checkpoints=3)
            assert host.xl("pause", scene.domain).returncode == 0
            primary.lose_peer()
            primary.state, primary.reason = "Failed", "XlExited"
            await until(lambda: has_event(scene, "GuestUnpaused"), seconds=15)
            assert await scene.designated() is None
            await until(lambda: not paused(host, scene.domain))
            assert await scene.holder() == scene.a

    run(scenario())
