"""The fencing contract's names and timing, shared by the agent (which keeps it) and the
operator (which reports on it). docs/design.md "Fencing" is the contract itself.

Each agent renews its node's host Lease `xenha-node-<node>`; a standby judges the active by how
long it has seen no renewal, as client-go's leader election does. The active pauses its guest
once its renewals are older than D - margin (D: the replication's leaseDurationSeconds), so that
it is paused before any standby may take over at D.
"""

from __future__ import annotations

HOST_LEASE_LABEL = "xenha.io/host-lease"
HOST_LEASE_PREFIX = "xenha-node-"
#: On every Lease of xenha's ("fencing": one per replication; "host": one per node), so that one
#: server-side label selector watches exactly those (label selectors cannot say "a or b").
LEASE_KIND_LABEL = "xenha.io/lease"
FENCING_LEASE = "fencing"
HOST_LEASE = "host"


def host_lease_name(node: str) -> str:
    return f"{HOST_LEASE_PREFIX}{node}"


def host_lease_node(name: str) -> str | None:
    """The node whose host Lease this is; None for any other Lease."""
    return name.removeprefix(HOST_LEASE_PREFIX) if name.startswith(HOST_LEASE_PREFIX) else None


def margin(lease_duration: float) -> float:
    """Safety margin the active keeps between its last renewal and the standby's expiry."""
    return max(lease_duration / 4, 0.3)


def pause_after(lease_duration: float) -> float:
    """How old the active's renewals may grow before it pauses its guest: D - margin."""
    return lease_duration - margin(lease_duration)
