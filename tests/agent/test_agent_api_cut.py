"""Issue #5: the primary cut off from the Kubernetes API only, its stream to the standby alive.

Two agents, real replicators, two simulated hosts, a real kube-apiserver (as in
test_agent_replicators.py); the primary's agent reaches the API server through a `NetPath`
that the test cuts: silence, as from a dead switch, while the host-to-host path stays up.

What must hold ("the active side pauses or hands over before its own lease can expire"):
- the primary's copy is paused before its host Lease could be judged expired: before D after
  the send time of its last successful renewal (the standby judges by its own observation of
  that renewal, which comes later);
- the simulated hosts' ledger never sees two active copies, and no client sees a reply the
  surviving copy does not hold;
- once the API is back, the primary resumes protected — the same replicators, the stream
  going on without a reseed — or there was exactly one clean handover.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.agent import Agent

from .scene import Scene, has_event, paused, running, state_is, until
from .test_agent_replicators import _dump_logs, real_tls

pytestmark = pytest.mark.integration

# D: long enough that the margin (D/4 = 2 s) absorbs a slow `xl pause` on a loaded machine.
LEASE = 8


class Users(threading.Thread):
    """The guest's users: ask whichever host runs it for the next counter value, twenty times
    a second; every answer goes to the ledger (`client_reply`)."""

    def __init__(self, hosts: list[Any], name: str) -> None:
        super().__init__(name="users", daemon=True)
        self.hosts = hosts
        self.guest = name
        self.done = threading.Event()
        self.answers = 0

    def _where(self) -> tuple[tuple[str, int], str] | None:
        for host in self.hosts:
            info = host.domain(self.guest)
            if info is not None and info.get("active"):
                ip, _, port = str(info["service"]).rpartition(":")
                return (ip, int(port)), str(info["uuid"])
        return None

    def run(self) -> None:
        from xenha.sim.client import ServiceClient

        client: ServiceClient | None = None
        while not self.done.wait(0.05):
            where = self._where()
            if where is None:
                continue
            if client is None or client.address != where[0]:
                if client is not None:
                    client.close()
                client = ServiceClient(
                    where[0],
                    ledger_path=self.hosts[0].ledger_path,
                    uuid=where[1],
                    name=self.guest,
                    timeout=1.0,
                )
            if client.next() is not None:
                self.answers += 1
        if client is not None:
            client.close()


def replicators(scene: Scene) -> dict[str, dict[str, Any]]:
    """role -> status of every replicator of the scene."""
    from xenha_agent.replicator_client import request_sync

    found = {}
    for sock in Path(scene.tmp).rglob("*.sock"):
        if sock.name.endswith((".xl.sock", ".accept.sock")):
            continue
        status = request_sync(sock, {"op": "status"}, timeout=5)["status"]
        found[str(status["role"])] = status
    return found


def first_passive_copy(ledger: Path, host: str, uuid: str, after_ns: int) -> int | None:
    """CLOCK_MONOTONIC ns at which `host`'s copy of the guest stopped being active."""
    for line in ledger.read_text().splitlines():
        event = json.loads(line)
        if (
            event.get("kind") == "copy"
            and event.get("host") == host
            and event.get("uuid") == uuid
            and event.get("state") == "passive"
            and int(event["t"]) >= after_ns
        ):
            return int(event["t"])
    return None


def test_a_primary_cut_off_from_the_api_only_pauses_in_time_then_resumes_protected(
    scene: Scene, pair: dict[str, Any], run: Any
) -> None:
    from xenha.sim import ledger
    from xenha.sim.netpath import NetPath

    ha, hb = pair["ha"], pair["hb"]
    users = Users([ha, hb], scene.domain)

    def settings(node: str, host: Any) -> Any:
        return scene.settings(node, host, heartbeat_timeout=2.0, report_period=2.0)

    async def scenario() -> None:
        await scene.create(lease_seconds=LEASE)
        await real_tls(scene)
        uuid = ha.create_guest(scene.domain, memory_mib=16, dirty_rate=50)["uuid"]
        agent_b = Agent(settings(scene.b, hb))
        agent_a = Agent(settings(scene.a, ha))
        # Only agent_a's own API traffic goes through the path; its replicators, the peer,
        # agent_b and the test do not.
        scheme, _, hostport = agent_a.kube.connection.host.partition("://")
        api_host, _, api_port = hostport.rpartition(":")
        api = NetPath((api_host, int(api_port)), name="api-a", ledger=None).start()
        agent_a.kube.connection.host = f"{scheme}://{api_host}:{api.address[1]}"
        try:
            async with running(agent_b), running(agent_a):
                try:
                    await until(lambda: state_is(scene, scene.b, "Replicating"), seconds=60)
                    await until(lambda: _designated_is(scene, scene.b), seconds=30)
                except AssertionError:
                    _dump_logs(scene)
                    raise
                users.start()
                await until(lambda: users.answers >= 10, seconds=30)
                before = await asyncio.to_thread(replicators, scene)

                cut_ns = time.monotonic_ns()
                api.cut()
                try:
                    await until(lambda: paused(ha, scene.domain), seconds=LEASE + 30)
                except AssertionError:
                    _dump_logs(scene)
                    raise
                last_renewal = agent_a.renewer.last_renewal
                assert last_renewal is not None
                assert last_renewal * 1e9 < cut_ns  # nothing got through since the cut
                assert ha.ledger_path is not None
                paused_ns = first_passive_copy(ha.ledger_path, ha.name, uuid, cut_ns)
                assert paused_ns is not None
                # Paused before the standby could judge the host Lease expired: that needs D
                # of silence after it *saw* the last renewal, which was sent at last_renewal.
                assert paused_ns / 1e9 < last_renewal + LEASE, (
                    f"paused {paused_ns / 1e9 - last_renewal:.2f}s after the last renewal "
                    f"was sent; the lease is {LEASE}s"
                )
                # The stream is alive: nobody takes over however long the silence lasts.
                await asyncio.sleep(max(0.0, last_renewal + LEASE + 2 - time.monotonic()))
                assert await scene.holder() == scene.a
                assert hb.domain(scene.domain) is None
                ledger.assert_never_two_active(ha.ledger_path)

                api.restore()
                try:
                    await until(lambda: _resumed_or_handed_over(scene, ha, hb), seconds=LEASE + 60)
                except AssertionError:
                    _dump_logs(scene)
                    raise
                if await scene.holder() == scene.a:
                    # Resumed protected: the same replicators, the stream went on (no reseed).
                    await until(lambda: state_is(scene, scene.a, "Replicating"), seconds=30)
                    sent = int(before["primary"]["checkpoints"]["total"])

                    async def stream_goes_on() -> bool:
                        return await _checkpoints(scene, "secondary") > sent + 2

                    await until(stream_goes_on, seconds=30)
                    after = await asyncio.to_thread(replicators, scene)
                    assert {r: s["pid"] for r, s in after.items()} == {
                        r: s["pid"] for r, s in before.items()
                    }
                    assert after["secondary"]["state"] == "Replicating"
                    assert not await has_event(scene, "FailoverActivated")
                    assert await has_event(scene, "SelfFenced")
                    await until(lambda: has_event(scene, "FenceLifted"))
                else:
                    # One clean handover: the standby holds the guest, the old copy is gone.
                    await until(lambda: ha.domain(scene.domain) is None, seconds=30)
                    reasons = await scene.event_reasons()
                    assert reasons.count("FailoverActivated") == 1, reasons
                # The users were answered again after the resume (or by the new active).
                answered = users.answers
                await until(lambda: users.answers > answered + 5, seconds=30)
        finally:
            users.done.set()
            users.join(10)
            api.close()

    run(scenario())
    assert ha.ledger_path is not None
    ledger.assert_never_two_active(ha.ledger_path)
    ledger.assert_client_view_clean(ha.ledger_path)


async def _designated_is(scene: Scene, node: str) -> bool:
    return await scene.designated() == node


async def _resumed_or_handed_over(scene: Scene, ha: Any, hb: Any) -> bool:
    holder = await scene.holder()
    if holder == scene.a:
        copy = ha.domain(scene.domain)
        return copy is not None and not paused(ha, scene.domain)
    copy = hb.domain(scene.domain)
    return copy is not None and bool(copy.get("active"))


async def _checkpoints(scene: Scene, role: str) -> int:
    status = (await asyncio.to_thread(replicators, scene)).get(role) or {}
    return int((status.get("checkpoints") or {}).get("total") or 0)
