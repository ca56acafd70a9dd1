"""XenNode.status: built from local observations (pure), written by `NodeReporter` (I/O).

The agent is the only writer of its XenNode's status. It writes every `period` (the heartbeat
the operator judges the agent by) and soon after anything *significant* changes: a state, a
role, the peer link, a domain appearing or going. Counters and timestamps (checkpoints, free
memory) ride along but do not trigger writes, or a 200 ms checkpoint interval would become a
200 ms API write rate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from xenha.api.models import (
    DomainInfo,
    FailoverRecord,
    NodeReplication,
    ReplicationRole,
    ReplicationState,
    XenNodeStatus,
)
from xenha.api.models import (
    XenInfo as XenInfoModel,
)
from xenha_agent.kube import ApiError, Conflict, KubeClient, NotFound, Obj, xennodes_path
from xenha_agent.plan import COLO_UNSUPPORTED, INCOMING_SUFFIX, ReplicationView
from xenha_agent.replicators import (
    ColoRefused,
    ReplicatorStatus,
    Role,
    api_state,
    last_heartbeat_time,
)
from xenha_agent.state import CopyRecord
from xenha_agent.xen.xl import Domain, XenInfo

log = logging.getLogger(__name__)

AGENT_VERSION = "0.1.0"
NODE_LABEL = "xenha.io/node"


def domain_info(domain: Domain) -> DomainInfo:
    return DomainInfo(
        name=domain.name, domid=domain.domid, state=domain.state, memory_mib=domain.memory_mib
    )


def build_status(
    *,
    relay_endpoint: str,
    info: XenInfo | None,
    colo_supported: bool | None,
    domains: Sequence[Domain],
    replications: Sequence[NodeReplication],
    agent_version: str = AGENT_VERSION,
    heartbeat: datetime | None = None,
) -> XenNodeStatus:
    """XenNode.status from what `xl` and the replicators said. `info` None: xl unavailable."""
    xen = None
    if info is not None:
        xen = XenInfoModel(
            version=info.version,
            free_memory_mib=info.free_memory_mib,
            total_memory_mib=info.total_memory_mib,
            colo_supported=colo_supported,
        )
    return XenNodeStatus(
        heartbeat_time=heartbeat,
        agent_version=agent_version,
        relay_endpoint=relay_endpoint,
        xen=xen,
        # Domain-0 is the host itself, not a guest anyone could protect.
        domains=[domain_info(d) for d in sorted(domains, key=lambda d: d.domid) if d.domid != 0],
        replications=sorted(replications, key=lambda r: (r.namespace, r.name)),
    )


def entry_state(
    record: CopyRecord | None,
    status: ReplicatorStatus | None,
    copy: Domain | None,
    refused: ColoRefused | None = None,
) -> tuple[ReplicationState, str | None, str | None]:
    """(state, reason, message) of a replication on this node.

    The agent's own acts come first (a fence is the agent's, whatever the replicator says);
    then the replicator's state; then a refusal of COLO (it outlives the replicator that met
    it: nothing is retried); a copy without a replicator is Degraded.
    """
    if record is not None and record.fenced and record.handover_paused_at is not None:
        return (ReplicationState.FENCED, "SwitchoverPaused", "guest paused for a switchover")
    if record is not None and record.fenced:
        return (
            ReplicationState.FENCED,
            "SelfFenced",
            "guest paused: the host Lease was not renewed in time (the standby may take over)",
        )
    if status is not None and status.state is not None:
        return api_state(status.state), status.reason, status.message
    if refused is not None:
        return ReplicationState.FAILED, COLO_UNSUPPORTED, refused.message
    if status is None and record is not None and copy is not None:
        return (
            ReplicationState.DEGRADED,
            "ReplicatorNotRunning",
            "the guest runs here without a replicator",
        )
    return ReplicationState.STARTING, None, None


def replication_entry(
    *,
    uid: str,
    view: ReplicationView | None,
    record: CopyRecord | None,
    status: ReplicatorStatus | None,
    domains: Mapping[str, Domain],
    now: datetime,
    refused: ColoRefused | None = None,
) -> NodeReplication | None:
    """This node's part in one replication, for XenNode.status.replications."""
    namespace = view.namespace if view else record.namespace if record else ""
    name = view.name if view else record.name if record else ""
    if not namespace or not name:
        return None
    role = (
        (status.role if status else None)
        or (record.role if record else None)
        or (refused.role if refused else Role.PRIMARY)
    )
    domain = view.domain if view else record.domain if record else ""
    copy = domains.get(domain) or domains.get(domain + INCOMING_SUFFIX)
    state, reason, message = entry_state(record, status, copy, refused)
    failover = record.failover if record else None
    return NodeReplication(
        namespace=namespace,
        name=name,
        uid=uid,
        role=ReplicationRole(role.value),
        state=state,
        domid=copy.domid if copy else None,
        peer_connected=status.peer_connected if status else False,
        last_heartbeat_time=last_heartbeat_time(status, now) if status else None,
        checkpoints=status.checkpoints if status else None,
        message=message,
        reason=reason,
        failover=FailoverRecord.model_validate(failover) if failover else None,
    )


# Fields whose changes alone do not warrant an immediate write.
_VOLATILE_TOP = ("heartbeatTime",)
_VOLATILE_XEN = ("freeMemoryMiB",)
_VOLATILE_REPLICATION = ("checkpoints", "lastHeartbeatTime", "message")


def significant(status: XenNodeStatus) -> dict[str, Any]:
    """The part of a status whose change is news: write it now rather than at the next beat."""
    data = status.to_api()
    for key in _VOLATILE_TOP:
        data.pop(key, None)
    for key in _VOLATILE_XEN:
        (data.get("xen") or {}).pop(key, None)
    for entry in data.get("replications") or []:
        for key in _VOLATILE_REPLICATION:
            entry.pop(key, None)
    return data


def xennode(node: str) -> Obj:
    return {
        "apiVersion": "xenha.io/v1alpha1",
        "kind": "XenNode",
        "metadata": {"name": node, "labels": {NODE_LABEL: node}},
        "spec": {},
    }


class NodeReporter:
    """Creates the XenNode `<node>` if missing and keeps its status current."""

    def __init__(
        self,
        kube: KubeClient,
        node: str,
        *,
        period: float = 2.0,
        min_interval: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.node = node
        self.period = period
        self.min_interval = min_interval
        self.clock = clock
        self.wallclock = wallclock
        self.wake = asyncio.Event()
        self._exists = False
        self._last_written: dict[str, Any] | None = None
        self._last_write_at: float | None = None
        self.writes = 0
        self.last_error: str | None = None

    async def ensure_node(self) -> None:
        try:
            await self.kube.create(xennodes_path(), xennode(self.node))
        except Conflict as e:
            if not e.already_exists:
                raise
        self._exists = True

    def due(self, status: XenNodeStatus) -> bool:
        """Write now? At every period, and on a significant change (rate-limited)."""
        if self._last_write_at is None:
            return True
        since = self.clock() - self._last_write_at
        if since >= self.period:
            return True
        return since >= self.min_interval and significant(status) != self._last_written

    async def write(self, status: XenNodeStatus) -> None:
        """Write `status` with heartbeatTime = now."""
        stamped = status.model_copy(update={"heartbeat_time": self.wallclock()})
        body = {"status": stamped.to_api()}
        if not self._exists:
            await self.ensure_node()
        try:
            await self.kube.patch(xennodes_path(self.node, status=True), body)
        except NotFound:
            # Deleted behind our back (or the CRD was reinstalled): recreate, then report.
            self._exists = False
            await self.ensure_node()
            await self.kube.patch(xennodes_path(self.node, status=True), body)
        self._last_written = significant(status)
        self._last_write_at = self.clock()
        self.writes += 1

    async def run(self, collect: Callable[[], Awaitable[XenNodeStatus]]) -> None:
        """Until cancelled: collect, write when due, sleep until woken or the next beat."""
        while True:
            self.wake.clear()
            pending = False
            try:
                status = await collect()
                if self.due(status):
                    await self.write(status)
                    self.last_error = None
                else:
                    pending = significant(status) != self._last_written
            except ApiError as e:
                self.last_error = str(e)
                pending = True
                log.warning("XenNode status write failed: %s", e)
            if pending:
                timeout = self.min_interval
            elif self._last_write_at is None:
                timeout = self.period
            else:
                timeout = max(self.min_interval, self._last_write_at + self.period - self.clock())
            try:
                async with asyncio.timeout(timeout):
                    await self.wake.wait()
                # Coalesce bursts of changes into one write.
                await asyncio.sleep(self.min_interval)
            except TimeoutError:
                pass
