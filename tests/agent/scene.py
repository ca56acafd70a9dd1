"""The scene of the agent tests: the test plays the operator, the agent under test is real.

`Scene` creates what the operator would (a XenReplication with its status, the fencing Lease,
the TLS Secret and the Role that lets the agents read it) and reads back what agents wrote.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xenha_agent.agent import Agent
from xenha_agent.config import AgentSettings
from xenha_agent.kube import (
    ApiError,
    KubeClient,
    leases_path,
    xennodes_path,
    xenreplications_path,
)
from xenha_agent.leases import STANDBY_ANNOTATION, HostLeaseRenewer, lease_standby, micro_time
from xenha_agent.report import xennode

from .fake_replicator import FakeLauncher, FakeReplicator

# Lease duration of every scene, seconds.
D = 2


class Scene:
    """One replication `db1` of guest `domain`, active on `a`, standby on `b`."""

    def __init__(self, namespace: str, admin: KubeClient, kubeconfig: Path, tmp: Path) -> None:
        suffix = namespace[-6:]
        self.ns = namespace
        self.admin = admin
        self.kubeconfig = kubeconfig
        self.tmp = tmp
        self.a, self.b = f"a-{suffix}", f"b-{suffix}"
        self.domain = f"db-{suffix}"
        self.uid = ""

    def settings(self, node: str, host: Any, **overrides: Any) -> AgentSettings:
        settings = AgentSettings(
            node_name=node,
            namespace=self.ns,
            kubeconfig=self.kubeconfig,
            xl_path=str(host.xl_path),
            xl_env=host.env,
            xenstore_socket=host.xenstore_path,
            # Short: AF_UNIX socket paths (the run dir holds them) are limited to 107 bytes.
            run_dir=self.tmp / node,
            relay_bind_address="127.0.0.1",
            relay_port_min=0,
            relay_port_max=0,
            health_bind_address="127.0.0.1",
            health_port=0,
            report_period=0.5,
            tick=0.05,
        )
        return dataclasses.replace(settings, **overrides)

    async def create(
        self, *, automatic: bool = True, lease_seconds: int = D, designated: bool = True
    ) -> None:
        """`designated`: the fencing Lease names b as the valid standby (as the active agent
        does once b acknowledged a checkpoint)."""
        xr = {
            "apiVersion": "xenha.io/v1alpha1",
            "kind": "XenReplication",
            "metadata": {"name": "db1", "namespace": self.ns},
            "spec": {
                "domain": self.domain,
                "mode": "remus",
                "primaryNode": self.a,
                "secondaryNode": self.b,
                "failover": {"leaseDurationSeconds": lease_seconds, "automatic": automatic},
            },
        }
        created = await self.admin.create(xenreplications_path(self.ns), xr)
        self.uid = created["metadata"]["uid"]
        await self.set_roles(self.a, self.b)
        now = micro_time(datetime.now(UTC))
        annotations = {STANDBY_ANNOTATION: self.b} if designated else {}
        await self.admin.create(
            leases_path(self.ns),
            {
                "metadata": {"name": "db1-fence", "namespace": self.ns, "annotations": annotations},
                "spec": {
                    "holderIdentity": self.a,
                    "leaseDurationSeconds": lease_seconds,
                    "acquireTime": now,
                    "renewTime": now,
                    "leaseTransitions": 0,
                },
            },
        )
        pem = base64.b64encode(b"not really PEM: the fake replicator never reads it").decode()
        data = {"ca.crt": pem}
        for node in (self.a, self.b):
            data[f"{node}.crt"] = data[f"{node}.key"] = pem
        await self.admin.create(
            f"/api/v1/namespaces/{self.ns}/secrets", {"metadata": {"name": "db1-tls"}, "data": data}
        )
        # What the operator's per-replication Role grants the agents.
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{self.ns}"
        await self.admin.create(
            f"{rbac}/roles",
            {
                "metadata": {"name": "db1-tls"},
                "rules": [
                    {
                        "apiGroups": [""],
                        "resources": ["secrets"],
                        "resourceNames": ["db1-tls"],
                        "verbs": ["get"],
                    }
                ],
            },
        )
        await self.admin.create(
            f"{rbac}/rolebindings",
            {
                "metadata": {"name": "db1-tls"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Role",
                    "name": "db1-tls",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "xenha-agent", "namespace": self.ns}
                ],
            },
        )

    async def set_roles(self, active: str, standby: str | None) -> None:
        status = {"activeNode": active, "standbyNode": standby, "phase": "Protected"}
        await self.admin.patch(f"{xenreplications_path(self.ns)}/db1/status", {"status": status})

    async def peer_xennode(self, node: str) -> None:
        """A XenNode for a node whose agent is not running (where a primary dials)."""
        await self.admin.create(xennodes_path(), xennode(node))
        await self.admin.patch(
            xennodes_path(node, status=True), {"status": {"relayEndpoint": "127.0.0.1:1"}}
        )

    async def holder(self) -> str:
        lease = await self.admin.get(leases_path(self.ns, "db1-fence"))
        return str(lease["spec"]["holderIdentity"])

    async def holder_is(self, node: str) -> bool:
        return await self.holder() == node

    async def switchover_to(self, target: str) -> None:
        """What the operator writes once a switchover request is under way."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        switchover = {"target": target, "state": "InProgress", "time": now}
        await self.admin.patch(
            f"{xenreplications_path(self.ns)}/db1/status", {"status": {"switchover": switchover}}
        )

    async def designated(self) -> str | None:
        return lease_standby(await self.admin.get(leases_path(self.ns, "db1-fence")))

    async def revoke(self) -> None:
        """What the active agent does when it loses the stream."""
        path = leases_path(self.ns, "db1-fence")
        lease = await self.admin.get(path)
        lease["metadata"].setdefault("annotations", {}).pop(STANDBY_ANNOTATION, None)
        await self.admin.replace(path, lease)

    async def set_holder(self, node: str) -> None:
        path = leases_path(self.ns, "db1-fence")
        lease = await self.admin.get(path)
        lease["spec"]["holderIdentity"] = node
        await self.admin.replace(path, lease)

    async def event_reasons(self) -> list[str]:
        events = await self.admin.get(f"/api/v1/namespaces/{self.ns}/events")
        return [e["reason"] for e in events.get("items", [])]

    async def entry(self, node: str) -> dict[str, Any] | None:
        try:
            status = (await self.admin.get(xennodes_path(node))).get("status") or {}
        except ApiError:
            return None
        return next(iter(status.get("replications") or []), None)

    async def cleanup(self) -> None:
        for node in (self.a, self.b):
            with contextlib.suppress(ApiError):
                await self.admin.request("DELETE", xennodes_path(node))


@asynccontextmanager
async def running(agent: Agent) -> AsyncIterator[Agent]:
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        yield agent
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)


@asynccontextmanager
async def active_agent(
    scene: Scene, host: Any, launcher: FakeLauncher, **create: Any
) -> AsyncIterator[tuple[Agent, FakeReplicator]]:
    """Node a as the operator leaves it: the XenReplication (`create` passes on), b's XenNode,
    the guest on `host`, and the agent under test running with its (fake) primary replicator
    launched. The guest is destroyed afterwards."""
    await scene.create(**create)
    await scene.peer_xennode(scene.b)
    host.create_guest(scene.domain, memory_mib=16)
    agent = Agent(scene.settings(scene.a, host), launcher=launcher)
    try:
        async with running(agent):
            await until(lambda: bool(launcher.replicators))
            yield agent, launcher.by_role("primary")
    finally:
        host.xl("destroy", scene.domain)


@contextlib.contextmanager
def api_cut(agent: Agent) -> Iterator[None]:
    """Inside the block the agent's API server is unreachable (connection refused)."""
    real = agent.kube.connection.host
    agent.kube.connection.host = "https://127.0.0.1:1"
    try:
        yield
    finally:
        agent.kube.connection.host = real


async def until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], seconds: float = 20.0
) -> None:
    for _ in range(int(seconds / 0.05)):
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {seconds}s: {getattr(check, '__name__', check)}")


async def host_lease_renewed_once(admin: KubeClient, ns: str, node: str) -> None:
    """A node whose agent renewed once and then went silent."""
    assert await HostLeaseRenewer(admin, namespace=ns, node=node).renew_once()


def paused(host: Any, domain: str) -> bool:
    """`xl list`'s third state flag."""
    return str(host.domain(domain)["flags"])[2] == "p"


async def state_is(scene: Scene, node: str, state: str) -> bool:
    entry = await scene.entry(node)
    return entry is not None and entry.get("state") == state


async def has_event(scene: Scene, reason: str) -> bool:
    return reason in await scene.event_reasons()


async def wait_entry(
    scene: Scene, node: str, predicate: Callable[[dict[str, Any]], Any]
) -> dict[str, Any]:
    found: dict[str, Any] = {}

    async def check() -> bool:
        entry = await scene.entry(node)
        if entry is not None and predicate(entry):
            found.update(entry)
            return True
        return False

    await until(check)
    return found
