"""Two agents, real replicators, two simulated hosts, a real kube-apiserver.

The test still plays the operator (roles in XenReplication.status, the fencing Lease, the TLS
Secret with real certificates and the Role that lets the agents read it); everything below
that is real: the agents launch `xenha_agent.replicator` processes, which run the simulated
hosts' `xl remus` / `xl migrate-receive` over the TLS relay through the node listeners.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.agent import Agent
from xenha_agent.kube import leases_path

from .scene import Scene, has_event, paused, running, state_is, until, wait_entry

pytestmark = pytest.mark.integration

LEASE = 5


async def real_tls(scene: Scene) -> None:
    """Replace the Secret's placeholder with what the operator issues."""
    from xenha_operator.certs import plan_tls

    tls = plan_tls(
        ca_data=None,
        tls_data=None,
        nodes=[scene.a, scene.b],
        ca_name=f"xenha {scene.ns}/db1",
        now=datetime.now(UTC),
        cert_validity=timedelta(days=1),
        ca_validity=timedelta(days=10),
        renew_fraction=0.3,
    )
    path = f"/api/v1/namespaces/{scene.ns}/secrets/db1-tls"
    data = {k: base64.b64encode(v).decode() for k, v in tls.tls_data.items()}
    await scene.admin.patch(path, {"data": data})


def test_failover_to_the_standby_when_the_active_host_dies(
    scene: Scene, pair: dict[str, Any], run: Callable[..., Any]
) -> None:
    ha, hb = pair["ha"], pair["hb"]

    async def scenario() -> None:
        # Generous timings: two agents, two hosts and the test share one loaded machine.
        await scene.create(lease_seconds=LEASE)
        await real_tls(scene)
        ha.create_guest(scene.domain, memory_mib=16, dirty_rate=50)
        agent_b = Agent(scene.settings(scene.b, hb, heartbeat_timeout=2.0, report_period=2.0))
        agent_a = Agent(scene.settings(scene.a, ha, heartbeat_timeout=2.0, report_period=2.0))
        async with running(agent_b), running(agent_a):
            try:
                await until(lambda: state_is(scene, scene.b, "Replicating"), seconds=60)
                await until(lambda: state_is(scene, scene.a, "Replicating"), seconds=30)
            except AssertionError:
                _dump_logs(scene)
                raise
            # Power cut on xen-a: its replicator and xl die with it, and its agent can no
            # longer renew (it keeps running here, but it is cut off from everything).
            ha.kill()
            agent_a.kube.connection.host = "https://127.0.0.1:1"
            try:
                await until(_holder_is(scene, scene.b), seconds=LEASE + 15)
                await until(lambda: hb.domain(scene.domain) is not None, seconds=20)
                await until(lambda: not paused(hb, scene.domain), seconds=20)
                await until(lambda: has_event(scene, "FailoverActivated"))
                entry = await wait_entry(scene, scene.b, lambda e: e.get("failover"))
                assert entry["failover"]["from"] == scene.a
                assert entry["failover"]["reason"] == "NodeLost"
            except AssertionError:
                _dump_logs(scene)
                raise

    run(scenario())
    # What the simulated hosts recorded: never two copies releasing output, and no client
    # saw a reply from state the failover lost.
    from xenha.sim import ledger

    assert ha.ledger_path is not None
    ledger.assert_never_two_active(ha.ledger_path)
    ledger.assert_client_view_clean(ha.ledger_path)


def _holder_is(scene: Scene, node: str) -> Callable[[], Any]:
    async def check() -> bool:
        lease = await scene.admin.get(leases_path(scene.ns, "db1-fence"))
        return bool(lease["spec"]["holderIdentity"] == node)

    return check


def _dump_logs(scene: Scene) -> None:
    """What the replicators said, for the failure report."""
    from xenha_agent.replicator_client import ReplicatorUnavailable, request_sync

    for log in sorted(Path(scene.tmp).rglob("*.log")):
        print(f"==== {log}\n{log.read_text()[-3000:]}")
    for sock in sorted(Path(scene.tmp).rglob("*.sock")):
        if sock.name.endswith((".xl.sock", ".accept.sock")):
            continue
        try:
            status = request_sync(sock, {"op": "status"}, timeout=2)["status"]
        except (ReplicatorUnavailable, OSError) as e:
            print(f"==== {sock}: {e}")
            continue
        status.pop("events", None)
        print(f"==== {sock}\n{status}")


def test_restarting_both_agents_keeps_the_stream_and_fails_nothing_over(
    scene: Scene, pair: dict[str, Any], run: Callable[..., Any]
) -> None:
    ha, hb = pair["ha"], pair["hb"]

    def settings(node: str, host: Any) -> Any:
        return scene.settings(node, host, heartbeat_timeout=2.0, report_period=2.0)

    def replicator_pids() -> set[int]:
        from xenha_agent.replicator_client import request_sync

        socks = [
            p
            for p in Path(scene.tmp).rglob("*.sock")
            if not p.name.endswith((".xl.sock", ".accept.sock"))
        ]
        return {int(request_sync(p, {"op": "status"})["status"]["pid"]) for p in socks}

    async def scenario() -> None:
        await scene.create(lease_seconds=LEASE)
        await real_tls(scene)
        ha.create_guest(scene.domain, memory_mib=16, dirty_rate=50)
        async with running(Agent(settings(scene.b, hb))), running(Agent(settings(scene.a, ha))):
            try:
                await until(lambda: state_is(scene, scene.b, "Replicating"), seconds=60)
            except AssertionError:
                _dump_logs(scene)
                raise
            before = replicator_pids()
        # Both agents are gone (a rolling upgrade, say); their replicators are not.
        await asyncio.sleep(LEASE + 1)
        async with running(Agent(settings(scene.b, hb))), running(Agent(settings(scene.a, ha))):
            await asyncio.sleep(LEASE + 1)
            try:
                # No renewal for longer than D - margin: the primary's replicator paused the
                # guest (issue #5); the new agent renews, resumes it, and the same stream goes
                # on.
                await until(lambda: state_is(scene, scene.a, "Replicating"), seconds=30)
                await until(lambda: not paused(ha, scene.domain), seconds=30)
                assert replicator_pids() == before
                assert await state_is(scene, scene.b, "Replicating")
                assert await scene.holder() == scene.a
                assert not await has_event(scene, "FailoverActivated")
            except AssertionError:
                _dump_logs(scene)
                raise

    run(scenario())
