"""The fencing Lease `<xr>-fence`: the one record of which node's copy may run.

The operator creates it once, naming `spec.primaryNode` (where the guest runs when the user
creates the replication), with `leaseDurationSeconds` from the spec. From then on only agents
change `holderIdentity` — the standby when it takes over after the holder went silent for the
lease duration, or on a planned switchover (docs/operator.md). The operator never writes the
Lease again: it reads the holder and makes `status.activeNode` follow it. If the Lease is
deleted by hand the operator recreates it naming the *current* `status.activeNode`, never the
spec's primary, so a deletion cannot move the guest back.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from xenha.api.fencing import FENCING_LEASE, LEASE_KIND_LABEL

from .owned import Owner, owned_metadata


def fence_lease_name(xr_name: str) -> str:
    return f"{xr_name}-fence"


def _micro_time(now: datetime) -> str:
    # coordination.k8s.io MicroTime: RFC 3339 with microseconds, UTC.
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def fence_lease(
    *, owner: Owner, holder: str, lease_duration_seconds: int, now: datetime
) -> dict[str, Any]:
    """The Lease as first created: held by `holder`, no transitions yet."""
    metadata = owned_metadata(owner, fence_lease_name(owner.name))
    metadata["labels"][LEASE_KIND_LABEL] = FENCING_LEASE
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": metadata,
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": lease_duration_seconds,
            "acquireTime": _micro_time(now),
            "renewTime": _micro_time(now),
            "leaseTransitions": 0,
        },
    }


def lease_holder(lease: Mapping[str, Any] | None) -> str | None:
    """Who may run the guest according to the Lease (None: no Lease, or nobody)."""
    if lease is None:
        return None
    holder = (lease.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def lease_transitions(lease: Mapping[str, Any] | None) -> int:
    if lease is None:
        return 0
    return int((lease.get("spec") or {}).get("leaseTransitions") or 0)
