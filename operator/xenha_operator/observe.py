"""From API objects (as kopf's indexes hold them) to the pure `status.Observation`.

The only state kept here is `HeartbeatTracker`: when the operator last saw something of each
node's change (its XenNode heartbeat; its host Lease renewal), by its own clock. That is how
staleness is judged without trusting that a node's clock agrees with ours.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from xenha.api import XenNodeStatus, XenReplicationSpec, XenReplicationStatus, parse_spec

from .fencing import fence_lease_name
from .status import NodeView, Observation, OtherReplication

#: Fields of XenReplication.status that belong to kopf, not to the status model.
KOPF_FIELD = "kopf"


def parse_time(value: object) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@dataclass
class HeartbeatTracker:
    """When a value of each node's (`heartbeatTime`, a Lease's `renewTime`) last changed, by
    the operator's clock."""

    _last: dict[str, tuple[object, datetime]] = field(default_factory=dict)

    def observe(self, node: str, heartbeat: object, now: datetime) -> None:
        previous = self._last.get(node)
        if previous is not None and previous[0] == heartbeat:
            return
        if previous is None:
            # First sight (operator start): a report from long ago is stale at once, and one
            # from a clock ahead of ours counts from now.
            reported = parse_time(heartbeat)
            seen = min(now, reported) if reported is not None else now
        else:
            seen = now
        self._last[node] = (heartbeat, seen)

    def seen(self, node: str) -> datetime | None:
        last = self._last.get(node)
        return last[1] if last is not None else None

    def forget(self, node: str) -> None:
        self._last.pop(node, None)


@dataclass(frozen=True)
class LeaseRecord:
    """A fencing Lease as the index keeps it."""

    holder: str | None
    owners: frozenset[str]


def lease_record(body: Mapping[str, Any]) -> LeaseRecord:
    refs = body.get("metadata", {}).get("ownerReferences") or []
    holder = (body.get("spec") or {}).get("holderIdentity") or None
    return LeaseRecord(holder=holder, owners=frozenset(r.get("uid", "") for r in refs))


def replication_record(body: Mapping[str, Any]) -> OtherReplication | None:
    """What other replications need to know about this one (conflict checks)."""
    meta = body.get("metadata", {})
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if not spec.get("domain"):
        return None
    nodes = {
        spec.get("primaryNode"),
        spec.get("secondaryNode"),
        status.get("activeNode"),
        status.get("standbyNode"),
    }
    return OtherReplication(
        key=f"{meta.get('namespace')}/{meta.get('name')}",
        uid=str(meta.get("uid", "")),
        domain=str(spec["domain"]),
        nodes=frozenset(n for n in nodes if n),
        created=parse_time(meta.get("creationTimestamp")) or datetime.min.replace(tzinfo=UTC),
    )


def previous_status(body: Mapping[str, Any]) -> XenReplicationStatus:
    raw = {k: v for k, v in (body.get("status") or {}).items() if k != KOPF_FIELD}
    try:
        return XenReplicationStatus.model_validate(raw)
    except ValidationError:
        # Unreadable (hand-edited?): start over; the next write replaces it.
        return XenReplicationStatus()


def parse(body: Mapping[str, Any]) -> tuple[XenReplicationSpec | None, str | None]:
    try:
        return parse_spec(body.get("spec") or {}), None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'spec'}: {err['msg']}"
            for err in exc.errors()
        )
        return None, problems


def observation(
    body: Mapping[str, Any],
    *,
    xennodes: Mapping[str, Iterable[Mapping[str, Any]]],
    leases: Mapping[tuple[str, str], Iterable[LeaseRecord]],
    replications: Iterable[OtherReplication],
    heartbeats: HeartbeatTracker,
    now: datetime,
    renewals: HeartbeatTracker | None = None,
    deleting: bool | None = None,
) -> Observation:
    meta = body["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    spec, spec_error = parse(body)
    prev = previous_status(body)

    holder = None
    for record in leases.get((namespace, fence_lease_name(name)), ()):
        # A Lease left over from an earlier object of the same name is not ours to follow.
        if uid in record.owners:
            holder = record.holder

    wanted = {prev.active_node, prev.standby_node, holder}
    if spec is not None:
        wanted |= {spec.primary_node, spec.secondary_node}
    nodes = {}
    for node in sorted(n for n in wanted if n):
        reports = list(xennodes.get(node, ()))
        status = None
        if reports:
            try:
                status = XenNodeStatus.model_validate(reports[-1])
            except ValidationError:
                status = XenNodeStatus()
        nodes[node] = NodeView(
            name=node,
            status=status,
            heartbeat_seen=heartbeats.seen(node),
            renewal_seen=renewals.seen(node) if renewals is not None else None,
        )

    return Observation(
        namespace=namespace,
        name=name,
        uid=uid,
        generation=int(meta.get("generation") or 0),
        created=parse_time(meta.get("creationTimestamp")) or now,
        spec=spec,
        spec_error=spec_error,
        annotations=dict(meta.get("annotations") or {}),
        deleting=bool(meta.get("deletionTimestamp")) if deleting is None else deleting,
        lease_holder=holder,
        previous=prev,
        nodes=nodes,
        others=[r for r in replications if r.uid != uid],
        now=now,
    )
