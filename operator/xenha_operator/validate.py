"""Checks of a replication against the cluster, beyond what the CRD schema can say.

The API server already rejects what one object can get wrong by itself (CEL rules in the CRD).
What is left needs other objects: the nodes' reports (`XenNode.status`) and the other
XenReplications. Pure functions over those observations; the results become the `Validated`
and `NodesAvailable` conditions and decide which nodes may become the standby.

Node freshness is judged by the operator's own clock, not by comparing `heartbeatTime` with
ours: the observer records when it last saw a node's heartbeat *change* (client-go style), so
a host with a skewed clock is neither dead nor immortal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum

from xenha.api import (
    DomainInfo,
    Mode,
    NodeReplication,
    ReplicationState,
    XenNodeStatus,
    XenReplicationSpec,
)

INCOMING_SUFFIX = "--incoming"
#: A node's copy in these states is taking over as the guest (the agents' failover record).
_TAKING_OVER = frozenset({ReplicationState.ACTIVATING, ReplicationState.ACTIVE})


class Reason(StrEnum):
    """Reasons found by validation (CamelCase, as they appear in conditions and Events)."""

    NODE_NOT_FOUND = "NodeNotFound"
    NODE_UNRESPONSIVE = "NodeUnresponsive"
    DOMAIN_NOT_FOUND = "DomainNotFound"
    CONFLICTING_REPLICATION = "ConflictingReplication"
    INSUFFICIENT_MEMORY = "InsufficientMemory"
    COLO_UNSUPPORTED = "ColoUnsupported"
    #: The node still holds a copy of the guest (e.g. the old active after a failover, before
    #: its agent destroyed the fenced copy): it cannot receive a new one yet.
    COPY_STILL_PRESENT = "CopyStillPresent"


#: Problems that stop replication until the user (or the cluster) changes something; the
#: replication is Failed while one holds. The others only keep a node from being used.
BLOCKING = frozenset(
    {Reason.DOMAIN_NOT_FOUND, Reason.CONFLICTING_REPLICATION, Reason.COLO_UNSUPPORTED}
)
#: Problems about the nodes' agents rather than the spec (the NodesAvailable condition).
AVAILABILITY = frozenset({Reason.NODE_NOT_FOUND, Reason.NODE_UNRESPONSIVE})


@dataclass(frozen=True)
class Problem:
    reason: Reason
    message: str
    node: str | None = None

    @property
    def blocking(self) -> bool:
        return self.reason in BLOCKING


@dataclass(frozen=True)
class NodeView:
    """One node as the operator sees it."""

    name: str
    #: The XenNode's status; None when there is no XenNode (no agent ever ran there).
    status: XenNodeStatus | None
    #: When the operator last saw the heartbeat change, by its own clock; None: never.
    heartbeat_seen: datetime | None = None
    #: When the operator last saw the node's host Lease renewed, by its own clock; None: never
    #: (or the Lease is outside what the operator watches).
    renewal_seen: datetime | None = None

    @property
    def exists(self) -> bool:
        return self.status is not None

    def fresh(self, now: datetime, stale_after: timedelta) -> bool:
        return (
            self.status is not None
            and self.heartbeat_seen is not None
            and now - self.heartbeat_seen <= stale_after
        )

    def domain(self, name: str) -> DomainInfo | None:
        if self.status is None:
            return None
        return next((d for d in self.status.domains if d.name == name), None)

    def replication(self, uid: str, namespace: str, name: str) -> NodeReplication | None:
        """This node's entry for a replication: by uid, or by name when the agent gave none."""
        if self.status is None:
            return None
        for entry in self.status.replications:
            if entry.uid is not None:
                if entry.uid == uid:
                    return entry
            elif entry.namespace == namespace and entry.name == name:
                return entry
        return None


@dataclass(frozen=True)
class OtherReplication:
    """Another XenReplication, as far as conflicts go."""

    key: str  # namespace/name
    uid: str
    domain: str
    nodes: frozenset[str]
    created: datetime


@dataclass(frozen=True, kw_only=True)
class Subject:
    """The replication being checked."""

    key: str
    uid: str
    created: datetime
    spec: XenReplicationSpec
    active: str
    standby: str | None
    candidates: Sequence[str] = ()
    #: The fencing Lease's holderIdentity; None when the Lease is not known (yet).
    lease_holder: str | None = None

    def entry(self, view: NodeView | None) -> NodeReplication | None:
        """The node's report of this replication."""
        namespace, _, name = self.key.partition("/")
        return view.replication(self.uid, namespace, name) if view is not None else None


@dataclass(frozen=True)
class Validation:
    #: Problems of the replication itself and of its active node.
    problems: list[Problem] = field(default_factory=list)
    #: For every node that is or could become the standby: its problems (none: usable).
    standby_problems: dict[str, list[Problem]] = field(default_factory=dict)
    #: Nodes whose agent reports freshly.
    responsive: frozenset[str] = frozenset()

    @property
    def usable(self) -> frozenset[str]:
        """Nodes that could become the standby right now."""
        return frozenset(n for n, found in self.standby_problems.items() if not found)

    @property
    def blocking(self) -> Problem | None:
        return next((p for p in self.problems if p.blocking), None)

    def relevant(self, standby: str | None) -> list[Problem]:
        """What users should hear about: with a standby, its problems; without one, why
        none of the candidates could be it."""
        if standby is not None:
            return self.problems + self.standby_problems.get(standby, [])
        return self.problems + [p for found in self.standby_problems.values() for p in found]


def _availability(
    view: NodeView | None, node: str, now: datetime, stale: timedelta
) -> Problem | None:
    if view is None or not view.exists:
        return Problem(
            Reason.NODE_NOT_FOUND,
            f"no XenNode {node}: is the xenha agent running on that node?",
            node,
        )
    if not view.fresh(now, stale):
        return Problem(
            Reason.NODE_UNRESPONSIVE,
            f"the agent on {node} has not reported for more than {stale.total_seconds():g}s",
            node,
        )
    return None


def conflicts(subject: Subject, others: Sequence[OtherReplication]) -> list[Problem]:
    """Another replication of the same domain name on any of our nodes.

    Domain names are unique per host, and a replica takes the guest's name when it activates,
    so two replications of one name may not share a host. The older one keeps going; the newer
    one reports the conflict (ties broken by name, so exactly one of them yields).
    """
    mine = {subject.spec.primary_node, subject.spec.secondary_node, subject.active}
    if subject.standby:
        mine.add(subject.standby)
    found = []
    for other in others:
        if other.uid == subject.uid or other.domain != subject.spec.domain:
            continue
        shared = sorted(mine & other.nodes)
        if not shared:
            continue
        if (other.created, other.key) < (subject.created, subject.key):
            found.append(
                Problem(
                    Reason.CONFLICTING_REPLICATION,
                    f"XenReplication {other.key} already protects domain "
                    f"{subject.spec.domain} on {', '.join(shared)}",
                )
            )
    return found


def _guest_memory(subject: Subject, nodes: Mapping[str, NodeView]) -> int | None:
    active = nodes.get(subject.active)
    if active is None:
        return None
    domain = active.domain(subject.spec.domain) or active.domain(
        subject.spec.domain + INCOMING_SUFFIX
    )
    return domain.memory_mib if domain is not None else None


def check_active(
    subject: Subject,
    view: NodeView | None,
    now: datetime,
    stale: timedelta,
    moving_elsewhere: bool = False,
) -> list[Problem]:
    """The active node: answers, runs the domain, can do COLO if asked.

    `moving_elsewhere`: another node reports taking over the guest.
    """
    node = subject.active
    problem = _availability(view, node, now, stale)
    if problem is not None or view is None or view.status is None:
        return [problem] if problem else []
    found = []
    domain = subject.spec.domain
    # Mid-failover the reports and the Lease are never seen at one instant, and the guest is
    # found under another name, or on another node, for a moment: that is no missing domain.
    if view.domain(domain) is None and not moving_elsewhere and not _taking_over(subject, view):
        found.append(
            Problem(Reason.DOMAIN_NOT_FOUND, f"domain {domain} is not running on {node}", node)
        )
    if _colo_refused(subject, view):
        found.append(_colo_problem(node))
    return found


def _taking_over(subject: Subject, view: NodeView) -> bool:
    """The active node holds the standby's copy, under its incoming name, because it takes
    over: the fencing Lease names it (it won the takeover or was handed the Lease, and its
    report has not caught up), or its agent reports activating it. The rename to the guest's
    name comes last."""
    if view.domain(subject.spec.domain + INCOMING_SUFFIX) is None:
        return False
    if subject.lease_holder == subject.active:
        return True
    entry = subject.entry(view)
    return entry is not None and entry.state in _TAKING_OVER


def _moving_elsewhere(subject: Subject, nodes: Mapping[str, NodeView]) -> bool:
    """Another node reports taking over the guest: the old active's copy may be gone (a
    hand-over destroys it) before the Lease watch shows the new holder."""
    for name, view in nodes.items():
        entry = subject.entry(view) if name != subject.active else None
        if entry is not None and entry.state in _TAKING_OVER:
            return True
    return False


def _colo_refused(subject: Subject, view: NodeView) -> bool:
    """COLO asked, and the node says it cannot: in its Xen facts, or by failing this
    replication for that reason (its agent found out by trying: libxl without COLO)."""
    if subject.spec.mode is not Mode.COLO:
        return False
    xen = view.status.xen if view.status else None
    if xen is not None and xen.colo_supported is False:
        return True
    entry = subject.entry(view)
    return (
        entry is not None
        and entry.state is ReplicationState.FAILED
        and entry.reason == Reason.COLO_UNSUPPORTED
    )


def _colo_problem(node: str) -> Problem:
    return Problem(
        Reason.COLO_UNSUPPORTED,
        f"{node} cannot run COLO (needs HVM, upstream QEMU with block replication and a "
        "COLO proxy); use mode remus or another node",
        node,
    )


def check_standby(
    subject: Subject,
    node: str,
    nodes: Mapping[str, NodeView],
    now: datetime,
    stale: timedelta,
) -> list[Problem]:
    """A node that is, or could become, the standby: answers, has room, can do COLO."""
    view = nodes.get(node)
    problem = _availability(view, node, now, stale)
    if problem is not None or view is None or view.status is None:
        return [problem] if problem else []
    found = []
    domain = subject.spec.domain
    if _colo_refused(subject, view):
        found.append(_colo_problem(node))
    if view.domain(domain) is not None and node != subject.standby:
        found.append(
            Problem(
                Reason.COPY_STILL_PRESENT,
                f"{node} still holds a copy of {domain}; waiting for its agent to remove it",
                node,
            )
        )
    elif view.domain(domain + INCOMING_SUFFIX) is None:
        # A node already receiving has the memory allocated; only a fresh one must have room.
        need = _guest_memory(subject, nodes)
        free = view.status.xen.free_memory_mib if view.status.xen else None
        if need is not None and free is not None and free < need:
            found.append(
                Problem(
                    Reason.INSUFFICIENT_MEMORY,
                    f"{node} has {free} MiB free, {domain} needs {need} MiB",
                    node,
                )
            )
    return found


def validate(
    subject: Subject,
    nodes: Mapping[str, NodeView],
    others: Sequence[OtherReplication],
    *,
    now: datetime,
    stale_after: timedelta,
) -> Validation:
    """Every problem with this replication right now, and who could stand by."""
    problems = conflicts(subject, others)
    problems += check_active(
        subject,
        nodes.get(subject.active),
        now,
        stale_after,
        moving_elsewhere=_moving_elsewhere(subject, nodes),
    )
    possible = [n for n in (subject.standby, *subject.candidates) if n and n != subject.active]
    standby_problems = {
        node: check_standby(subject, node, nodes, now, stale_after)
        for node in dict.fromkeys(possible)
    }
    responsive = frozenset(n for n, v in nodes.items() if v.fresh(now, stale_after))
    return Validation(problems=problems, standby_problems=standby_problems, responsive=responsive)
