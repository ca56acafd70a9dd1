"""The agent's control loop on a simulated Xen host, against a real kube-apiserver.

The test plays the operator (XenReplication status, the fencing Lease, the TLS Secret and its
Role) and the relay (a fake replicator speaking the real control protocol, whose peer link the
test cuts). The agent under test is the real one: its RBAC, its Leases, its decisions.
Every scenario uses a lease duration D of 2 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from xenha_agent.agent import Agent
from xenha_agent.config import AgentSettings
from xenha_agent.kube import KubeClient, leases_path, xennodes_path
from xenha_agent.leases import HostLeaseRenewer
from xenha_agent.xen.xl import Domain, Xl

from .fake_replicator import FakeLauncher
from .scene import (
    D,
    active_agent,
    api_cut,
    has_event,
    host_lease_renewed_once,
    paused,
    running,
    state_is,
    until,
    wait_entry,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from xenha.sim.host import SimHost

    started = {n: SimHost.start(tmp_path_factory.mktemp(n), n) for n in ("sim-a", "sim-b")}
    try:
        yield started
    finally:
        for host in started.values():
            host.stop()


async def _designated_is(scene: Any, node: str | None) -> bool:
    return bool(await scene.designated() == node)


def fake(launcher: FakeLauncher) -> Callable[[], bool]:
    return lambda: bool(launcher.replicators)


def test_agent_reports_its_host_and_becomes_ready(scene, hosts, run):
    async def scenario() -> None:
        agent = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=FakeLauncher())
        async with running(agent):
            await until(lambda: agent.health.ready)
            node = await scene.admin.get(xennodes_path(scene.b))
            status = node["status"]
            assert status["xen"]["version"] == "4.17"
            assert status["relayEndpoint"] == f"127.0.0.1:{agent.relay_port}"
            lease = await scene.admin.get(leases_path(scene.ns, f"xenha-node-{scene.b}"))
            assert lease["spec"]["holderIdentity"] == scene.b
            async with aiohttp.ClientSession() as http:
                base = f"http://127.0.0.1:{agent.health_port}"
                for probe in ("/healthz", "/readyz"):
                    async with http.get(base + probe) as resp:
                        assert resp.status == 200
                async with http.get(base + "/metrics") as resp:
                    text = await resp.text()
                    assert 'xenha_agent_lease_renewals_total{result="success"}' in text

    run(scenario())


@pytest.mark.parametrize(
    ("task_name", "wake"),
    [
        ("loop", lambda agent: agent.wake),
        ("renewer", lambda agent: agent.renewer._wake),
        ("report", lambda agent: agent.reporter.wake),
    ],
)
def test_a_loop_cancelled_just_as_it_is_woken_stops(scene, hosts, run, task_name, wake):
    # Stopping the agent cancels its loops; a loop that is woken in the same instant must not
    # take the wake-up and drop the cancel (it would run on and hold the shutdown up).
    async def scenario() -> None:
        agent = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=FakeLauncher())
        async with running(agent):
            await until(lambda: agent.health.ready)
            (task,) = [t for t in asyncio.all_tasks() if t.get_name() == task_name]
            await asyncio.sleep(0.05)  # the loop is between passes, waiting to be woken
            wake(agent).set()
            task.cancel()
            await asyncio.wait({task}, timeout=5)
            assert task.done(), f"{task_name} ran on after its cancel"

    run(scenario())


def test_standby_takes_over_when_the_holder_goes_silent(scene, hosts, run):
    launcher = FakeLauncher()

    async def scenario() -> None:
        await scene.create()
        await host_lease_renewed_once(scene.admin, scene.ns, scene.a)
        agent = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=launcher)
        async with running(agent):
            await until(fake(launcher))
            replica = launcher.by_role("secondary")
            assert launcher.launched[0].command[:2] == [
                str(hosts["sim-b"].xl_path),
                "migrate-receive",
            ]
            replica.connect()
            await until(lambda: state_is(scene, scene.b, "Replicating"))
            replica.lose_peer()
            await until(lambda: "activate" in replica.calls, seconds=D + 8)
            assert await scene.holder() == scene.b
            lease = await scene.admin.get(leases_path(scene.ns, "db1-fence"))
            assert lease["spec"]["leaseTransitions"] == 1
            await until(lambda: has_event(scene, "FailoverActivated"))
            entry = await wait_entry(scene, scene.b, lambda e: e.get("failover"))
            assert entry["failover"]["from"] == scene.a
            assert entry["failover"]["to"] == scene.b
            assert "drop" not in replica.calls

    run(scenario())


def test_standby_holds_its_copy_until_the_active_revokes_it(scene, hosts, run):
    launcher = FakeLauncher()

    async def scenario() -> None:
        await scene.create()
        holder_agent = HostLeaseRenewer(scene.admin, namespace=scene.ns, node=scene.a)
        holder_agent.set_durations([D])
        renewing = asyncio.create_task(holder_agent.run())
        agent = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=launcher)
        try:
            async with running(agent):
                await until(fake(launcher))
                replica = launcher.by_role("secondary")
                replica.connect()
                replica.lose_peer()
                # The active is alive (it renews) and still names us: keep the copy, wait.
                await asyncio.sleep(D + 1)
                assert replica.calls.count("activate") == replica.calls.count("drop") == 0
                # The active revokes us (it runs on unprotected): our copy is stale.
                await scene.revoke()
                await until(lambda: "drop" in replica.calls, seconds=5)
                assert "activate" not in replica.calls
                assert await scene.holder() == scene.a
                await until(lambda: has_event(scene, "CopyDropped"))
        finally:
            renewing.cancel()

    run(scenario())


def test_no_takeover_while_the_stream_is_alive_even_if_the_holder_is_silent(scene, hosts, run):
    launcher = FakeLauncher()

    async def scenario() -> None:
        await scene.create()
        await host_lease_renewed_once(scene.admin, scene.ns, scene.a)
        agent = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=launcher)
        async with running(agent):
            await until(fake(launcher))
            replica = launcher.by_role("secondary")
            replica.connect()
            await asyncio.sleep(3 * D)
            assert replica.calls.count("activate") == replica.calls.count("drop") == 0
            assert await scene.holder() == scene.a

    run(scenario())


def test_restarting_the_standby_agent_changes_nothing(scene, hosts, run):
    launcher = FakeLauncher()

    async def scenario() -> None:
        await scene.create()
        await host_lease_renewed_once(scene.admin, scene.ns, scene.a)
        settings = scene.settings(scene.b, hosts["sim-b"])
        async with running(Agent(settings, launcher=launcher)):
            await until(fake(launcher))
            replica = launcher.by_role("secondary")
            replica.connect()
            await until(lambda: replica.lease is not None)
        # The agent is gone; its replicator is not. A new agent finds it in the run dir.
        calls_before = list(replica.calls)
        async with running(Agent(settings, launcher=launcher)) as second:
            await until(lambda: scene.uid in second.replicators)
            await asyncio.sleep(2 * D)
            assert len(launcher.launched) == 1
            new_calls = replica.calls[len(calls_before) :]
            assert set(new_calls) <= {"lease"}
            assert await scene.holder() == scene.a
            entry = await wait_entry(scene, scene.b, lambda e: e["state"] == "Replicating")
            assert entry["role"] == "secondary"

    run(scenario())


def test_active_designates_its_standby_once_a_checkpoint_is_acknowledged(scene, hosts, run):
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher, designated=False) as (_, primary):
            assert primary.config.peer_address == "127.0.0.1:1"
            primary.connect(checkpoints=0)  # seeding: no valid standby yet
            await asyncio.sleep(1)
            assert await scene.designated() is None
            primary.checkpoints = 1
            await until(lambda: _designated_is(scene, scene.b))

    run(scenario())


def test_active_revokes_the_standby_before_releasing_held_output(scene, hosts, run):
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher) as (_, primary):
            primary.connect()
            primary.lose_peer()
            await until(lambda: "degrade" in primary.calls)
            # The revoke landed before the release.
            assert await scene.designated() is None
            assert await scene.holder() == scene.a
            assert "fence" not in primary.calls
            assert not paused(host, scene.domain)
            await until(lambda: has_event(scene, "RunningUnprotected"))

    run(scenario())


def test_active_fences_itself_without_api_and_peer_then_resumes(scene, hosts, run):
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher) as (agent, primary):
            primary.connect()
            await until(lambda: primary.lease is not None)
            # Cut this agent off from the API server, then lose the peer too: it cannot
            # revoke, so it holds the output and pauses before the standby may take over.
            with api_cut(agent):
                primary.lose_peer()
                await until(lambda: "fence" in primary.calls, seconds=D + 5)
                assert paused(host, scene.domain)
                assert "degrade" not in primary.calls
            # Back on the API: revoke, release, resume (the fencing Lease is still ours).
            await until(lambda: not paused(host, scene.domain), seconds=D + 10)
            assert "degrade" in primary.calls
            assert await scene.designated() is None
            if "unfence" in primary.calls:
                assert primary.calls.index("degrade") < primary.calls.index("unfence")
            # (Or, if the renewal came back after the release, the broken stream's
            # replicator was stopped first and the guest unpaused with xl.)
            await until(lambda: has_event(scene, "SelfFenced"))
            await until(lambda: has_event(scene, "FenceLifted"))

    run(scenario())


def test_active_cut_off_from_the_api_only_pauses_with_the_stream_alive_then_resumes(
    scene, hosts, run
):
    """Issue #5: the stream is alive, so the standby cannot act *now*; but it acts as soon as
    it sees the stream end, and by then the host Lease may have been silent for D. So the
    active pauses once its renewals are older than D - margin, stream or not; back on the
    API it moves the fencing Lease on (a takeover in flight would fail), then unpauses, and
    the stream (the same replicator) goes on."""
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher) as (agent, primary):
            primary.connect()
            await until(lambda: primary.lease is not None)
            before = await scene.admin.get(leases_path(scene.ns, "db1-fence"))
            with api_cut(agent):
                await until(lambda: "fence" in primary.calls, seconds=D + 5)
                assert paused(host, scene.domain)
                assert primary.peer_connected
                assert "degrade" not in primary.calls
            await until(lambda: "unfence" in primary.calls, seconds=D + 10)
            await until(lambda: not paused(host, scene.domain))
            after = await scene.admin.get(leases_path(scene.ns, "db1-fence"))
            # The resume wrote the Lease (a new version) and kept the designation.
            assert after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]
            assert await scene.designated() == scene.b
            assert await scene.holder() == scene.a
            assert launcher.launched == [primary.config]  # no new replicator: no reseed
            await until(lambda: has_event(scene, "SelfFenced"))
            await until(lambda: has_event(scene, "FenceLifted"))

    run(scenario())


def test_a_resume_that_fails_is_reported_and_retried_and_the_guest_stays_paused(scene, hosts, run):
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher) as (agent, primary):
            primary.connect()
            await until(lambda: primary.lease is not None)
            with api_cut(agent):
                await until(lambda: "fence" in primary.calls, seconds=D + 5)
                answer = primary.handle

                def refuse_unfence(request: dict[str, Any]) -> dict[str, Any]:
                    if request.get("op") == "unfence":
                        primary.calls.append("unfence")
                        return {"ok": False, "error": "xl unpause failed", "state": "Fenced"}
                    return answer(request)

                primary.handle = refuse_unfence  # type: ignore[method-assign]
            await until(lambda: has_event(scene, "FenceLiftFailed"), seconds=D + 10)
            await until(lambda: primary.calls.count("unfence") >= 3)
            # Not lifted behind the replicator's back: still paused, still recorded fenced.
            assert paused(host, scene.domain)
            assert not await has_event(scene, "FenceLifted")
            primary.handle = answer  # type: ignore[method-assign]
            await until(lambda: not paused(host, scene.domain))
            await until(lambda: has_event(scene, "FenceLifted"))
            reasons = await scene.event_reasons()
            assert reasons.count("FenceLiftFailed") == 1  # the same failure, told once

    run(scenario())


def test_an_unreachable_api_is_retried_spaced_out_and_logged_once(scene, hosts, run, caplog):
    """Peer lost and no API: the revoke cannot land. It is retried (50 ms doubling to 1 s),
    and the failure is logged when it starts, not on every attempt."""
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher) as (agent, primary):
            primary.connect()
            await until(lambda: primary.lease is not None)
            # Cut for good: a restored API would let the revoke land and log once more.
            agent.kube.connection.host = "https://127.0.0.1:1"
            primary.lose_peer()
            await until(lambda: "fence" in primary.calls, seconds=D + 5)
            await until(lambda: agent.retries.get((scene.uid, "revoke standby")) is not None)
            await until(lambda: agent.retries[(scene.uid, "revoke standby")].failures >= 6)

    with caplog.at_level("INFO", logger="xenha_agent.agent"):
        run(scenario())
    revokes = [r for r in caplog.records if "revoke standby" in r.getMessage()]
    assert len(revokes) == 1, [r.getMessage() for r in revokes]


def test_old_active_destroys_its_copy_once_the_lease_names_the_standby(scene, hosts, run):
    launcher = FakeLauncher()
    host = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host, launcher) as (_, primary):
            primary.connect()
            primary.lose_peer()
            await scene.set_holder(scene.b)  # the standby took over
            await until(lambda: host.domain(scene.domain) is None, seconds=10)
            await until(lambda: has_event(scene, "CopyDestroyed"))
            assert "stop" in primary.calls

    run(scenario())


def test_automatic_failover_off_keeps_the_copy_and_waits(scene, hosts, run):
    launcher = FakeLauncher()

    async def scenario() -> None:
        await scene.create(automatic=False)
        await host_lease_renewed_once(scene.admin, scene.ns, scene.a)
        agent = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=launcher)
        async with running(agent):
            await until(fake(launcher))
            replica = launcher.by_role("secondary")
            replica.connect()
            replica.lose_peer()
            await asyncio.sleep(2 * D)
            assert replica.calls.count("activate") == replica.calls.count("drop") == 0
            assert await scene.holder() == scene.a

    run(scenario())


def test_planned_switchover_hands_the_lease_over(scene, hosts, run):
    launcher_a, launcher_b = FakeLauncher(), FakeLauncher()
    host_a = hosts["sim-a"]

    async def scenario() -> None:
        await scene.create()
        host_a.create_guest(scene.domain, memory_mib=16)
        agent_a = Agent(scene.settings(scene.a, host_a), launcher=launcher_a)
        agent_b = Agent(scene.settings(scene.b, hosts["sim-b"]), launcher=launcher_b)
        try:
            async with running(agent_b), running(agent_a):
                await until(fake(launcher_b))
                await until(fake(launcher_a))
                primary, replica = launcher_a.by_role("primary"), launcher_b.by_role("secondary")
                primary.connect(checkpoints=5)
                replica.connect(checkpoints=4)
                primary.acknowledged = 4  # the fifth checkpoint is still on its way
                await scene.switchover_to(scene.b)
                # The active pauses first: no checkpoint follows (a paused guest cannot be
                # suspended for one), so it waits only for the one in flight.
                await until(lambda: "fence" in primary.calls)
                assert paused(host_a, scene.domain)
                await asyncio.sleep(0.5)
                assert await scene.holder() == scene.a
                assert not await has_event(scene, "SelfFenced"), "a hand-over is no fence"
                primary.acknowledged = replica.checkpoints = 5
                await until(lambda: scene.holder_is(scene.b))
                # The old active destroys its paused copy; the stream ends; the standby runs.
                await until(lambda: host_a.domain(scene.domain) is None)
                replica.lose_peer()
                await until(lambda: "activate" in replica.calls)
                entry = await wait_entry(scene, scene.b, lambda e: e.get("failover"))
                assert entry["failover"]["reason"] == "Switchover"
                assert entry["failover"]["from"] == scene.a
                await until(lambda: has_event(scene, "SwitchoverActivated"))
                await until(lambda: has_event(scene, "CopyDestroyed"))
                assert "drop" not in replica.calls
                assert "unfence" not in primary.calls
        finally:
            host_a.xl("destroy", scene.domain)

    run(scenario())


def test_a_switchover_whose_stream_is_lost_resumes_the_guest_where_it_ran(scene, hosts, run):
    """Without the stream the standby's copy is not current: it must not get the Lease."""
    launcher = FakeLauncher()
    host_a = hosts["sim-a"]

    async def scenario() -> None:
        async with active_agent(scene, host_a, launcher) as (_, primary):
            primary.connect(checkpoints=5)
            primary.acknowledged = 4
            await scene.switchover_to(scene.b)
            await until(lambda: "fence" in primary.calls)
            primary.lose_peer()
            # The standby's copy is revoked, the held output released, the guest resumed.
            await until(lambda: _designated_is(scene, None), seconds=5)
            await until(lambda: "unfence" in primary.calls, seconds=5)
            assert not paused(host_a, scene.domain)
            assert "degrade" in primary.calls
            assert await scene.holder() == scene.a
            assert not await has_event(scene, "SelfFenced")

    run(scenario())


class OverlappingXl:
    """`xl list` answers that take their time: each call gets the next (delay, flags)."""

    def __init__(self, *answers: tuple[float, str]) -> None:
        self.answers = list(answers)

    async def list_domains(self) -> list[Domain]:
        delay, flags = self.answers.pop(0)
        await asyncio.sleep(delay)
        return [Domain("db1", 3, 128, 1, flags, 1.0)]


def test_a_domain_listing_begun_before_a_pause_never_undoes_it(run):
    """The reporter lists the domains while an action pauses the guest and lists them again:
    the slower, older listing must not leave the agent believing the guest still runs."""
    xl = OverlappingXl((0.3, "-b----"), (0.0, "--p---"))
    settings = AgentSettings(node_name="xen-a", run_dir=Path("/nonexistent"), health_port=-1)
    agent = Agent(settings, kube=cast(KubeClient, object()), xl=cast(Xl, xl))

    async def after_the_pause() -> None:
        await asyncio.sleep(0.1)
        await agent._refresh_domains()

    async def scenario() -> None:
        await asyncio.gather(agent._refresh_domains(), after_the_pause())

    run(scenario())
    assert agent.domains["db1"].paused


def test_a_copy_that_came_up_without_the_lease_is_destroyed(scene, hosts, run):
    """If a standby's replicator dies, its receiver's input closes and xl fails over on its
    own: the guest comes up without the fencing Lease. Its agent destroys it."""
    launcher = FakeLauncher()
    host_b = hosts["sim-b"]

    async def scenario() -> None:
        await scene.create()
        agent = Agent(scene.settings(scene.b, host_b), launcher=launcher)
        try:
            async with running(agent):
                await until(fake(launcher))
                replica = launcher.by_role("secondary")
                replica.connect()
                await until(lambda: state_is(scene, scene.b, "Replicating"))
                replica.close()  # the replicator dies...
                host_b.create_guest(scene.domain, memory_mib=16)  # ...and xl failed over
                await until(lambda: host_b.domain(scene.domain) is None, seconds=15)
                await until(lambda: has_event(scene, "CopyDestroyed"))
                assert await scene.holder() == scene.a
        finally:
            host_b.xl("destroy", scene.domain)

    run(scenario())
