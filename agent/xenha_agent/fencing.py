"""Who may run the guest: pure decisions over what an agent has observed.

docs/design.md "Fencing" is the contract. The fencing Lease is the one compare-and-swap both
sides race for: `holderIdentity` (whose copy may run) and the annotation `xenha.io/standby`
(whose copy is a valid standby: set by the active once a checkpoint is acknowledged, removed
when that copy stops being valid). Every write is conditional on the resourceVersion read.

All times are seconds of this host's monotonic clock (CLOCK_MONOTONIC is system-wide, so a
replicator process and the agent compare them directly). Clocks are never compared across
hosts: like client-go's leader election, a standby judges the holder by how long *it* has
seen no change of the holder's host Lease.

standby (holds the incoming copy), in order:
  - peer connected                                  -> wait (the standby never acts then)
  - fencing Lease names me already                  -> acquire (idempotent; then activate)
  - fencing Lease unreadable                        -> wait (nobody activates blind)
  - `xenha.io/standby` does not name me             -> drop-copy (the copy is stale)
  - no complete checkpoint                          -> drop-copy (nothing to activate)
  - holder's host Lease not observed yet            -> wait
  - holder's host Lease unchanged for D             -> acquire, or wait if automatic failover
                                                       is off
  - otherwise                                       -> wait
active (runs the guest), in order:
  - fencing Lease names another node                -> destroy (someone else won)
  - the watchdog, whatever the stream does: renewals older than D - margin (or none), not
    paused yet, and a standby may take over (the annotation names one, the Lease is
    unread, or a designation of ours is in doubt)   -> pause (self-fence)
  - peer lost:
      `xenha.io/standby` names a node (or may)      -> revoke (CAS: remove it)
      the replicator still holds xl's output        -> degrade (release it: only after the
                                                       revoke made any takeover impossible)
      paused by us, renewals fresh, Lease ours      -> resume (after a CAS of the Lease)
  - peer connected:
      paused by us, renewals fresh, Lease ours      -> resume (after a CAS of the Lease)
      the standby acknowledged a checkpoint and is not designated, renewals fresh
                                                    -> designate (CAS: name it; never while
                                                       stale: it would open a takeover)
  - otherwise                                       -> keep

Why the watchdog ignores the stream: a standby acts as soon as *it* sees the stream end, and
by then it may have seen the holder's host Lease unchanged for D already (the active cut off
from the API only). The active sees the same loss at about the same time, so a pause that
waits for the loss races the activation. Paused at send + D - margin, the active is still
before the earliest takeover (observation + D >= send + D) whenever the stream ends.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from xenha.api.fencing import pause_after

RENEW_MIN = 0.25
RENEW_MAX = 5.0


class StandbyAction(enum.Enum):
    WAIT = "wait"
    ACQUIRE = "acquire"
    DROP_COPY = "drop-copy"


class ActiveAction(enum.Enum):
    # Leave the guest as it is: running, or paused if this agent already fenced it.
    KEEP = "keep-running"
    DESIGNATE = "designate"
    REVOKE = "revoke"
    DEGRADE = "degrade"
    PAUSE = "pause"
    DESTROY = "destroy"
    RESUME = "resume"


A = TypeVar("A", StandbyAction, ActiveAction)


@dataclass(frozen=True)
class Decision(Generic[A]):
    action: A
    # CamelCase, for logs, Events and status reasons.
    reason: str


def renew_period(lease_durations: Iterable[float], idle_duration: float) -> float:
    """Host-Lease renewal period: min(D over this node's replications)/4, clamped."""
    shortest = min(lease_durations, default=idle_duration)
    return min(max(shortest / 4, RENEW_MIN), RENEW_MAX)


@dataclass(frozen=True)
class FencingLease:
    """What an agent last read of a fencing Lease."""

    holder: str | None
    # The `xenha.io/standby` annotation; None when absent or empty.
    standby: str | None = None


@dataclass(frozen=True)
class HolderObservation:
    """This node's view of the holder's host Lease (`xenha-node-<holder>`)."""

    # When this agent started watching it (first list), by its own clock.
    since: float
    # When it last saw renewTime/resourceVersion change after that; None if not since `since`.
    last_change: float | None = None

    @property
    def unchanged_since(self) -> float:
        return self.since if self.last_change is None else self.last_change


@dataclass(frozen=True)
class StandbyView:
    now: float
    me: str
    lease_duration: float
    # When the relay lost the peer (EOF, reset, heartbeat silence); None while connected.
    peer_lost_at: float | None
    # None when the fencing Lease could not be read.
    lease: FencingLease | None
    # None until the holder's host Lease has been observed at all.
    holder_lease: HolderObservation | None
    # spec.failover.automatic: false leaves an expired holder to a human (the copy is kept).
    automatic: bool = True
    # The copy holds at least one complete checkpoint.
    has_checkpoint: bool = True


def decide_standby(v: StandbyView) -> Decision[StandbyAction]:
    if v.peer_lost_at is None:
        return Decision(StandbyAction.WAIT, "PeerConnected")
    if v.lease is None or v.lease.holder is None:
        return Decision(StandbyAction.WAIT, "LeaseUnknown")
    if v.lease.holder == v.me:
        return Decision(StandbyAction.ACQUIRE, "AlreadyHolder")
    if v.lease.standby != v.me:
        return Decision(StandbyAction.DROP_COPY, "NotDesignatedStandby")
    if not v.has_checkpoint:
        return Decision(StandbyAction.DROP_COPY, "NoCompleteCheckpoint")
    if v.holder_lease is None:
        return Decision(StandbyAction.WAIT, "HolderNotObserved")
    if v.now - v.holder_lease.unchanged_since < v.lease_duration:
        return Decision(StandbyAction.WAIT, "WaitingForHolderExpiry")
    if not v.automatic:
        return Decision(StandbyAction.WAIT, "AutomaticFailoverDisabled")
    return Decision(StandbyAction.ACQUIRE, "HolderExpired")


@dataclass(frozen=True)
class ActiveView:
    now: float
    me: str
    lease_duration: float
    peer_lost_at: float | None
    # Send time of this node's last successful host-Lease renewal; None if none yet.
    own_last_renewal: float | None
    # The fencing Lease as last read; None when it could not be read (yet).
    lease: FencingLease | None
    # The standby the operator assigned (status.standbyNode); None: none.
    standby: str | None = None
    # That standby has acknowledged a complete checkpoint (its copy is valid).
    standby_has_checkpoint: bool = False
    # After losing the peer the replicator keeps xl's transport open: the guest's output since
    # the last acknowledged checkpoint is held until told to degrade.
    output_held: bool = False
    # This agent has paused the guest to fence it (and not resumed it since).
    fenced: bool = False
    # A designation of ours may land although the Lease as read does not show it (the write
    # got no answer, and the Lease has not changed since the read it was based on).
    designation_in_doubt: bool = False


def renewal_fresh(v: ActiveView) -> bool:
    if v.own_last_renewal is None:
        return False
    return v.now - v.own_last_renewal <= pause_after(v.lease_duration)


def takeover_possible(v: ActiveView) -> bool:
    """Whether a standby could win the fencing Lease from us: only a designated one can, and
    a Lease we could not read, or a designation in doubt, counts as designated."""
    return v.lease is None or v.lease.standby is not None or v.designation_in_doubt


def decide_active(v: ActiveView) -> Decision[ActiveAction]:
    holder = v.lease.holder if v.lease is not None else None
    if holder is not None and holder != v.me:
        return Decision(ActiveAction.DESTROY, "LeaseHeldElsewhere")
    fresh = renewal_fresh(v)
    ours = holder == v.me
    designated = takeover_possible(v)
    # The watchdog comes before anything that depends on the stream (see the module doc).
    if not fresh and not v.fenced and designated:
        return Decision(ActiveAction.PAUSE, "LeaseRenewalStale")
    if v.peer_lost_at is not None:
        if ours and designated:
            return Decision(ActiveAction.REVOKE, "PeerLost")
        if ours and v.output_held:
            return Decision(ActiveAction.DEGRADE, "StandbyRevoked")
        if v.fenced and fresh and ours:
            return Decision(ActiveAction.RESUME, "LeaseRenewed")
        return Decision(ActiveAction.KEEP, "Fenced" if v.fenced else "PeerLost")
    if v.fenced:
        if fresh and ours:
            return Decision(ActiveAction.RESUME, "LeaseRenewed")
        return Decision(ActiveAction.KEEP, "Fenced")
    if (
        ours
        and fresh
        and v.standby is not None
        and v.standby_has_checkpoint
        and v.lease is not None
        and v.lease.standby != v.standby
    ):
        return Decision(ActiveAction.DESIGNATE, "CheckpointAcknowledged")
    return Decision(ActiveAction.KEEP, "PeerConnected")
