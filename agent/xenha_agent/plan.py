"""Which replicators this node should run: a pure function of the API and the host.

The operator decides roles (`status.activeNode` / `standbyNode`); the agent only follows:

- a node that is `activeNode` runs the primary replicator (`xl remus`) once the guest runs
  here; a node that is `standbyNode` runs the secondary (`xl migrate-receive`) once nothing of
  the guest is here;
- a replicator whose role the status no longer gives this node is stopped — except while it is
  activating, and an activated secondary is simply retired (the guest it restored keeps
  running: stopping it touches no domain);
- a replicator that finished (Stopped, Failed, Dropped), or a primary whose stream broke, is
  stopped so that a new one seeds again (the agent spaces relaunches out) — the primary only
  once a host-Lease renewal after the loss has settled that the standby will not take over;
- a primary whose guest is paused, not by this agent's own fence or hand-over (those are
  fencing's to lift) but by anything else (its replicator's self-fence the agent never
  adopted, an activation whose unpause failed, an admin), is unpaused once running it is
  safe, and replicated after: the fencing Lease names this node and no standby (nobody can
  take over, and nothing must be held back for one), the host Lease was renewed in time (so
  that view of the fencing Lease is current), and this agent protected the copy before (a
  guest paused before it was ever protected stays as its owner left it);
- COLO is not started where xl refused it for good (`libxl` without COLO, or a guest COLO
  cannot replicate): no relaunch loop, the refusal is reported instead (the guest runs on,
  unprotected, and is unpaused like any other);
- no roles at all while the replication is suspended or has no standby.

Fencing (fencing.py) is decided separately and first: whether a copy may *run* never waits
for this plan, and this plan never starts a replica next to a copy that still runs.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from xenha.api.models import (
    FailoverRecord,
    Mode,
    Phase,
    SwitchoverState,
    XenReplication,
    XenReplicationSpec,
)
from xenha_agent.replicators import ReplicatorState, Role

log = logging.getLogger(__name__)

INCOMING_SUFFIX = "--incoming"


@dataclass(frozen=True)
class ReplicationView:
    """What the agent reads from one XenReplication."""

    uid: str
    namespace: str
    name: str
    spec: XenReplicationSpec
    active_node: str | None
    standby_node: str | None
    phase: Phase | None
    last_failover: FailoverRecord | None = None
    # A planned switchover the operator has set in motion towards this node.
    switchover_target: str | None = None

    @property
    def domain(self) -> str:
        return self.spec.domain

    @property
    def lease_duration(self) -> float:
        return float(self.spec.failover.lease_duration_seconds)

    @property
    def replicating(self) -> bool:
        """Whether the operator wants a stream at all."""
        return (
            not self.spec.suspended
            and self.phase is not Phase.SUSPENDED
            and bool(self.active_node)
            and bool(self.standby_node)
        )

    def role_of(self, node: str) -> Role | None:
        if not self.replicating:
            return None
        if self.active_node == node:
            return Role.PRIMARY
        if self.standby_node == node:
            return Role.SECONDARY
        return None

    def takes_part(self, node: str) -> bool:
        """Whether `node` has anything to do with this replication (for fencing too)."""
        return node in (self.active_node, self.standby_node) or (
            self.active_node is None and node in (self.spec.primary_node, self.spec.secondary_node)
        )


def replication_view(obj: Mapping[str, Any]) -> ReplicationView | None:
    """None when the object cannot be read (its spec breaks the API's rules)."""
    try:
        xr = XenReplication.model_validate(obj)
    except ValidationError as e:
        meta = obj.get("metadata") or {}
        log.warning(
            "ignoring XenReplication %s/%s: %s",
            meta.get("namespace"),
            meta.get("name"),
            e.errors()[0]["msg"] if e.errors() else e,
        )
        return None
    meta = xr.metadata
    status = xr.status
    switchover = status.switchover if status else None
    target = None
    if switchover is not None and switchover.state is SwitchoverState.IN_PROGRESS:
        target = switchover.target
    return ReplicationView(
        uid=str(meta.get("uid") or ""),
        namespace=str(meta.get("namespace") or ""),
        name=str(meta.get("name") or ""),
        spec=xr.spec,
        active_node=(status.active_node or None) if status else None,
        standby_node=(status.standby_node or None) if status else None,
        phase=status.phase if status else None,
        last_failover=status.last_failover if status else None,
        switchover_target=target,
    )


@dataclass(frozen=True)
class LocalReplicator:
    """A replicator process this agent can talk to."""

    uid: str
    role: Role
    state: ReplicatorState | None
    peer_connected: bool = False
    # Primary only: a host-Lease renewal was sent after the peer was lost, so the standby
    # (which judges that Lease) can no longer take over. Until then this replicator is what
    # pauses the guest should the agent die too; it must not be stopped.
    settled: bool = True
    # Its CamelCase reason (why it failed, say).
    reason: str | None = None


@dataclass(frozen=True)
class Guard:
    """What fencing knows about this node's right to run a replication's guest."""

    # The fencing Lease's holder and `xenha.io/standby` as last read (None: unread / none).
    holder: str | None
    standby: str | None = None
    # This node's last host-Lease renewal is within D - margin.
    renewal_fresh: bool = False
    # Paused by this agent (a fence, a switchover's hand-over): only fencing lifts that.
    fenced: bool = False
    # The agent has a record of its copy: it protected this guest here before.
    recorded: bool = False
    # A designation of ours got no answer: a standby may be named without our knowing it.
    designation_in_doubt: bool = False

    def may_run(self, me: str) -> bool:
        """Running the guest here is safe: nobody else holds it or could take it over."""
        return (
            self.holder == me
            and self.standby is None
            and not self.designation_in_doubt
            and self.renewal_fresh
        )


# A replicator in one of these is done: stop it so that a fresh one can seed again.
FINISHED = frozenset({ReplicatorState.STOPPED, ReplicatorState.FAILED, ReplicatorState.DROPPED})

# Reasons a finished replicator gives that say more than "Finished" (for the stop's Event).
SEEDING_FAILED = "SeedingFailed"
COLO_UNSUPPORTED = "ColoUnsupported"
_TELLING = frozenset({SEEDING_FAILED, COLO_UNSUPPORTED})


@dataclass(frozen=True)
class Launch:
    uid: str
    role: Role


@dataclass(frozen=True)
class Stop:
    uid: str
    reason: str


@dataclass(frozen=True)
class ClearIncoming:
    """Destroy `<domain>--incoming` left behind by a replicator that is gone."""

    uid: str
    domain: str


@dataclass(frozen=True)
class Unpause:
    """Unpause the primary's guest, paused by something other than this agent's fence."""

    uid: str
    domain: str


Step = Launch | Stop | ClearIncoming | Unpause


def plan(
    *,
    me: str,
    replications: Mapping[str, ReplicationView],
    replicators: Mapping[str, LocalReplicator],
    domains: Mapping[str, str],
    guards: Mapping[str, Guard] | None = None,
    colo_supported: bool | None = None,
    colo_refused: Collection[str] = (),
) -> list[Step]:
    """Steps that bring this node's replicators in line with the API.

    `domains` maps each local domain name to its state as `xl list` reports it; `guards`
    what fencing knows per replication (none: nothing is unpaused); `colo_supported` whether
    this host can run COLO (False: as found, or as xl said); `colo_refused` replications
    whose COLO xl refused here.
    """
    guards = guards or {}
    steps: list[Step] = []
    for uid, rep in sorted(replicators.items()):
        view = replications.get(uid)
        if view is None:
            steps.append(Stop(uid, "ReplicationDeleted"))
            continue
        wanted = view.role_of(me)
        if wanted is rep.role:
            if rep.state in FINISHED:
                steps.append(Stop(uid, rep.reason if rep.reason in _TELLING else "Finished"))
            elif (
                rep.role is Role.PRIMARY
                and rep.state is ReplicatorState.DEGRADED
                and not rep.peer_connected
                and rep.settled
            ):
                # xl remus gave up and the guest runs unprotected: start over. (Never for a
                # secondary: its copy may be the one to activate; fencing decides about it.)
                steps.append(Stop(uid, "StreamLost"))
            continue
        if rep.state is ReplicatorState.ACTIVATING:
            continue  # let it finish; the guest's fate is being decided
        if rep.role is Role.SECONDARY and rep.state is ReplicatorState.ACTIVE:
            steps.append(Stop(uid, "Activated"))
        elif wanted is None:
            steps.append(Stop(uid, "NotReplicating"))
        else:
            steps.append(Stop(uid, "RoleChanged"))
    for uid, view in sorted(replications.items()):
        if uid in replicators:
            continue
        wanted = view.role_of(me)
        # xl would refuse it again: a retry would be a loop, not a recovery.
        refused = view.spec.mode is Mode.COLO and (colo_supported is False or uid in colo_refused)
        if wanted is Role.PRIMARY:
            state = domains.get(view.domain)
            guard = guards.get(uid)
            if state == "running":
                if not refused:
                    steps.append(Launch(uid, Role.PRIMARY))
            elif (
                state == "paused"
                and guard is not None
                and guard.recorded
                and not guard.fenced
                and guard.may_run(me)
            ):
                steps.append(Unpause(uid, view.domain))
        elif wanted is Role.SECONDARY:
            if view.domain in domains:
                # A copy is still here (the old active after a failover): never receive next
                # to it. Fencing destroys it once the fencing Lease names the other node.
                continue
            if view.domain + INCOMING_SUFFIX in domains:
                steps.append(ClearIncoming(uid, view.domain + INCOMING_SUFFIX))
            elif not refused:
                steps.append(Launch(uid, Role.SECONDARY))
    return steps
