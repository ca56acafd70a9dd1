"""From what the operator observes to `XenReplication.status` and the Events to post. Pure.

`reconcile(observation, timing)` is the whole decision of one pass: the handlers gather an
`Observation` (the object, the two nodes' XenNode reports, the fencing Lease holder, the other
replications, the clock), call it, write the status if it differs and post the transitions.
Nothing here reads the API or the clock, so every rule is table-tested
(tests/operator/test_operator_status.py) and a second operator replica computes the same
status from the same observations.

Phases (`status.phase`), in the order they are decided:

- Suspended: `spec.suspended`, or the replication is being deleted (replication stops).
- Failed: a blocking problem: an invalid spec, the domain is not on the active node, another
  replication protects it, the active node cannot do COLO.
- FailingOver: the active agent fenced itself, the standby is activating, or a switchover is
  in progress.
- Protected: the standby reports Replicating with the link up.
- Seeding: a standby is assigned and the agents are starting or seeding it.
- Degraded: replication ran before, but the guest is unprotected now (no usable standby, lost
  connection, checkpoint errors, unresponsive standby).
- Pending: nothing has started yet: waiting for the agents, or for a usable secondary.

Conditions (Kubernetes conventions; `lastTransitionTime` moves only when `status` moves):

- `Ready`: the guest is up on the active node (reasons Running, DomainNotFound, Fenced,
  DomainPaused, NodeUnresponsive, NodeNotFound, FailingOver, SwitchingOver, DomainNotRunning).
- `Protected`: a standby holds a complete, current copy (True: Replicating; False: the reasons
  of vSphere FT's "Not Protected" — Initializing, Seeding, NeedSecondary, LostConnection,
  CheckpointError, NodeUnresponsive, Suspended, UserAction (deleting), FailingOver,
  SwitchingOver, or a validation reason).
- `Validated`: the spec fits the cluster (Valid; InvalidSpec, DomainNotFound,
  ConflictingReplication, InsufficientMemory, ColoUnsupported, CopyStillPresent).
- `NodesAvailable`: the nodes involved run an agent that reports (AgentsReporting;
  NodeNotFound, NodeUnresponsive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from xenha.api import (
    Condition,
    ConditionStatus,
    DomainInfo,
    FailoverRecord,
    NodeReplication,
    Phase,
    ReplicationState,
    Switchover,
    SwitchoverState,
    XenReplicationSpec,
    XenReplicationStatus,
)

from . import decide, switchover, validate
from .validate import NodeView, OtherReplication, Problem, Reason, Validation

READY = "Ready"
PROTECTED = "Protected"
VALIDATED = "Validated"
NODES_AVAILABLE = "NodesAvailable"
CONDITION_TYPES = (READY, PROTECTED, VALIDATED, NODES_AVAILABLE)

#: Entry states in which a node's part of the replication is not healthy.
_TROUBLED = frozenset(
    {
        ReplicationState.DEGRADED,
        ReplicationState.FAILED,
        ReplicationState.STOPPING,
        ReplicationState.STOPPED,
        ReplicationState.FENCED,
    }
)
_STARTING = frozenset({ReplicationState.STARTING, ReplicationState.SEEDING})
#: Entry states that mean the standby has let go of its copy (deletion may finish).
_RELEASED = frozenset({ReplicationState.STOPPED, ReplicationState.FAILED})
#: Phases that mean replication has run at some point.
_STARTED_PHASES = frozenset(
    {Phase.SEEDING, Phase.PROTECTED, Phase.DEGRADED, Phase.FAILING_OVER, Phase.SUSPENDED}
)
#: Domain states (as xl reports them) in which the guest does not serve. Only the Ready
#: condition reads this: a paused guest still exists (validation must not call it missing,
#: a fenced primary's paused copy may be the one to resume) but serves nobody.
_DOWN_DOMAIN_STATES = frozenset({"shutdown", "crashed", "dying", "paused"})
#: The reason agents give in their failover record when a planned handover moved the guest.
SWITCHOVER_REASON = "Switchover"


@dataclass(frozen=True, kw_only=True)
class Observation:
    namespace: str
    name: str
    uid: str
    generation: int
    created: datetime
    #: The parsed spec, or None with `spec_error` saying why it could not be parsed.
    spec: XenReplicationSpec | None
    spec_error: str | None = None
    annotations: Mapping[str, str] = field(default_factory=dict)
    deleting: bool = False
    #: The fencing Lease's holderIdentity; None when there is no Lease (yet).
    lease_holder: str | None = None
    previous: XenReplicationStatus = field(default_factory=XenReplicationStatus)
    nodes: Mapping[str, NodeView] = field(default_factory=dict)
    others: Sequence[OtherReplication] = ()
    now: datetime

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def entry(self, node: str | None) -> NodeReplication | None:
        view = self.nodes.get(node) if node else None
        return view.replication(self.uid, self.namespace, self.name) if view else None


@dataclass(frozen=True)
class Timing:
    stale_after: timedelta = timedelta(seconds=15)
    switchover_timeout: timedelta = timedelta(seconds=120)


@dataclass(frozen=True)
class Transition:
    """Something that happened, to be posted as an Event on the XenReplication."""

    reason: str
    message: str
    warning: bool = False

    @property
    def type(self) -> str:
        return "Warning" if self.warning else "Normal"


@dataclass(frozen=True)
class Outcome:
    status: XenReplicationStatus
    transitions: list[Transition]


@dataclass(frozen=True)
class _Verdict:
    """What the pass concluded before it is written down."""

    phase: Phase
    protected: bool
    reason: str
    message: str


def reconcile(obs: Observation, timing: Timing) -> Outcome:
    if obs.spec is None:
        return _invalid(obs)
    spec = obs.spec
    prev = obs.previous

    active = obs.lease_holder or prev.active_node or spec.primary_node
    candidates = decide.candidates(spec.primary_node, spec.secondary_node, active)
    subject = validate.Subject(
        key=obs.key,
        uid=obs.uid,
        created=obs.created,
        spec=spec,
        active=active,
        standby=prev.standby_node,
        candidates=candidates,
        lease_holder=obs.lease_holder,
    )
    found = validate.validate(
        subject, obs.nodes, obs.others, now=obs.now, stale_after=timing.stale_after
    )
    started = _started(obs, active)
    blocking = found.blocking
    # A conflict means this replication must not touch the guest at all; other blocking
    # problems only keep a replication from *starting* (a running standby is never dropped
    # because of one report: it may hold the last good copy).
    hold = blocking is not None and (
        blocking.reason is Reason.CONFLICTING_REPLICATION or not started
    )
    roles = decide.decide_roles(
        decide.RoleInputs(
            primary_node=spec.primary_node,
            secondary_node=spec.secondary_node,
            suspended=spec.suspended,
            deleting=obs.deleting or hold,
            lease_holder=obs.lease_holder,
            previous_active=prev.active_node,
            previous_standby=prev.standby_node,
            responsive=found.responsive,
            usable=found.usable,
        )
    )
    verdict = _assess(obs, spec, roles, found, started)

    blocked_by = None
    if obs.deleting:
        blocked_by = "the replication is being deleted"
    elif spec.suspended:
        blocked_by = "replication is suspended"
    elif blocking is not None:
        blocked_by = blocking.message
    record = switchover.next_switchover(
        switchover.SwitchoverInputs(
            request=switchover.requested_target(dict(obs.annotations)),
            previous=prev.switchover,
            active=roles.active,
            standby=roles.standby,
            active_changed=roles.active_changed,
            protected=verdict.protected,
            blocked_by=blocked_by,
            now=obs.now,
            timeout=timing.switchover_timeout,
        )
    )
    if (
        verdict.phase in (Phase.PROTECTED, Phase.SEEDING, Phase.DEGRADED, Phase.FAILING_OVER)
        and record is not None
        and record.state is SwitchoverState.IN_PROGRESS
    ):
        verdict = _Verdict(
            Phase.FAILING_OVER,
            False,
            "SwitchingOver",
            f"switching over from {roles.active} to {record.target}",
        )

    status = _status(obs, spec, roles, found, verdict, record)
    return Outcome(status=status, transitions=_transitions(obs, roles, status, timing))


# --- assessment ----------------------------------------------------------------------------


def _started(obs: Observation, active: str) -> bool:
    prev = obs.previous
    if prev.phase in _STARTED_PHASES or prev.last_failover is not None:
        return True
    return any(obs.entry(n) is not None for n in (active, prev.standby_node))


def _assess(
    obs: Observation,
    spec: XenReplicationSpec,
    roles: decide.Roles,
    found: Validation,
    started: bool,
) -> _Verdict:
    a, s = roles.active, roles.standby
    a_rep, s_rep = obs.entry(a), obs.entry(s)
    unprotected = Phase.DEGRADED if started else Phase.PENDING

    if obs.deleting:
        return _Verdict(
            Phase.SUSPENDED, False, "UserAction", "the replication is being deleted: stopping"
        )
    if spec.suspended:
        return _Verdict(
            Phase.SUSPENDED, False, "Suspended", f"replication suspended; {a} runs unprotected"
        )
    blocking = found.blocking
    if blocking is not None:
        return _Verdict(Phase.FAILED, False, blocking.reason, blocking.message)
    if a_rep is not None and a_rep.state is ReplicationState.FENCED:
        return _Verdict(
            Phase.FAILING_OVER,
            False,
            "FailingOver",
            f"{a} lost its peer and fenced itself (guest paused)",
        )
    if s_rep is not None and s_rep.state in (ReplicationState.ACTIVATING, ReplicationState.ACTIVE):
        return _Verdict(Phase.FAILING_OVER, False, "FailingOver", f"{s} is taking over from {a}")
    if s is None:
        candidates = [p for found_ in found.standby_problems.values() for p in found_]
        problem = next(iter(candidates or found.problems), None)
        if problem is not None:
            return _Verdict(unprotected, False, problem.reason, f"no standby: {problem.message}")
        return _Verdict(unprotected, False, "NeedSecondary", "no node can hold the standby")
    if s not in found.responsive:
        own = found.standby_problems.get(s) or []
        message = own[0].message if own else f"the agent on {s} does not report"
        return _Verdict(unprotected, False, Reason.NODE_UNRESPONSIVE, message)
    refused = next(
        (p for p in found.standby_problems.get(s, []) if p.reason is Reason.COLO_UNSUPPORTED),
        None,
    )
    if refused is not None and (s_rep is None or s_rep.state is not ReplicationState.REPLICATING):
        # Whatever the two replicators report meanwhile (a stream that broke, a retry
        # starting), nothing changes until the standby can run COLO: one stable reason.
        return _Verdict(unprotected, False, refused.reason, refused.message)
    if (
        s_rep is not None
        and s_rep.state is ReplicationState.REPLICATING
        and s_rep.peer_connected is not False
        and (a_rep is None or a_rep.state not in _TROUBLED)
    ):
        return _Verdict(
            Phase.PROTECTED, True, "Replicating", f"{s} holds a current copy of {spec.domain}"
        )
    if s_rep is not None and s_rep.state in _TROUBLED:
        return _troubled(s, s_rep)
    if s_rep is None:
        if a_rep is not None and a_rep.state in _TROUBLED:
            return _troubled(a, a_rep)
        # A standby that has not picked the replication up yet; whatever the active side says
        # about its peer is about the previous one.
        phase = Phase.SEEDING if started else Phase.PENDING
        return _Verdict(phase, False, "Initializing", f"waiting for the agents on {a} and {s}")
    if s_rep.state in _STARTING:
        # A new session is being set up: the link comes up during it, and what the active
        # side still says (a peer lost, a stream stopped) is about the previous session.
        return _Verdict(Phase.SEEDING, False, "Seeding", f"seeding the standby on {s} from {a}")
    if a_rep is not None and a_rep.state in _TROUBLED:
        return _troubled(a, a_rep)
    for node, rep in ((s, s_rep), (a, a_rep)):
        if rep is not None and rep.peer_connected is False:
            return _Verdict(
                Phase.DEGRADED,
                False,
                rep.reason or "LostConnection",
                rep.message or f"{node} lost the connection to its peer",
            )
    return _Verdict(Phase.SEEDING, False, "Seeding", f"seeding the standby on {s} from {a}")


def _troubled(node: str, rep: NodeReplication) -> _Verdict:
    reason = rep.reason or _default_reason(rep)
    return _Verdict(
        Phase.DEGRADED, False, reason, rep.message or f"{node} reports {rep.state.value}"
    )


def _default_reason(rep: NodeReplication) -> str:
    if rep.state is ReplicationState.FAILED:
        return "CheckpointError"
    if rep.state is ReplicationState.FENCED:
        return "Fenced"
    if rep.state in (ReplicationState.STOPPING, ReplicationState.STOPPED):
        return "Stopped"
    return "LostConnection" if rep.peer_connected is False else "ReplicationDegraded"


# --- status --------------------------------------------------------------------------------


def _condition(
    prev: XenReplicationStatus,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    obs: Observation,
) -> Condition:
    old = next((c for c in prev.conditions if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else obs.now
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=obs.generation,
    )


def _ready(
    obs: Observation,
    spec: XenReplicationSpec,
    roles: decide.Roles,
    found: Validation,
    verdict: _Verdict,
    record: Switchover | None,
) -> tuple[ConditionStatus, str, str]:
    a = roles.active
    view = obs.nodes.get(a)
    a_rep, s_rep = obs.entry(a), obs.entry(roles.standby)
    if verdict.phase is Phase.FAILING_OVER:
        return ConditionStatus.FALSE, verdict.reason, verdict.message
    if view is None or not view.exists:
        return ConditionStatus.FALSE, Reason.NODE_NOT_FOUND, f"no XenNode {a}"
    silent = _renewals_silent_for(obs, view, spec)
    if silent is not None:
        # The agent's watchdog pauses the guest at D - margin without a renewal whenever a
        # standby could take over: whatever its last report said, it is not running now.
        fate = (
            f"by the fencing protocol it has paused {spec.domain}, unless {roles.standby} "
            "has taken over"
            if verdict.protected
            else f"what {spec.domain} does there is unknown"
        )
        return (
            ConditionStatus.UNKNOWN,
            Reason.NODE_UNRESPONSIVE,
            f"the agent on {a} has not renewed its host Lease for {silent:.0f}s; {fate}",
        )
    if a not in found.responsive:
        if (
            s_rep is not None
            and s_rep.state is ReplicationState.REPLICATING
            and s_rep.peer_connected is not False
        ):
            # The agent is away (a restart), but checkpoints only come from a running guest.
            return (
                ConditionStatus.TRUE,
                "Running",
                f"{spec.domain} runs on {a} (its agent is not reporting; checkpoints arrive)",
            )
        return (
            ConditionStatus.UNKNOWN,
            Reason.NODE_UNRESPONSIVE,
            f"the agent on {a} does not report",
        )
    if a_rep is not None and a_rep.state is ReplicationState.FENCED:
        return ConditionStatus.FALSE, "Fenced", f"{a} paused {spec.domain} to fence it"
    domain = view.domain(spec.domain) or view.domain(spec.domain + validate.INCOMING_SUFFIX)
    if domain is None:
        return (
            ConditionStatus.FALSE,
            Reason.DOMAIN_NOT_FOUND,
            f"domain {spec.domain} is not running on {a}",
        )
    if (domain.state or "").lower() in _DOWN_DOMAIN_STATES:
        return ConditionStatus.FALSE, *_not_serving(spec.domain, a, domain, record)
    return ConditionStatus.TRUE, "Running", f"{spec.domain} runs on {a}"


def _not_serving(
    name: str, node: str, domain: DomainInfo, record: Switchover | None
) -> tuple[str, str]:
    """(reason, message) of a guest the active node lists but that does not serve."""
    if (domain.state or "").lower() != "paused":
        return "DomainNotRunning", f"domain {name} on {node} is {domain.state}"
    if domain.name.endswith(validate.INCOMING_SUFFIX):
        # The standby's Remus copy on the node that just took the Lease: activation
        # unpauses it and gives it the guest's name.
        planned = (
            record is not None
            and record.state is SwitchoverState.SUCCEEDED
            and record.target == node
        )
        return (
            "SwitchingOver" if planned else "FailingOver",
            f"{node} is taking over {name}: its copy is not running yet",
        )
    # An agent's fence shows as its entry's Fenced state (handled before): this one was
    # paused by hand, or the report of a fence has not arrived yet.
    return "DomainPaused", f"domain {name} on {node} is paused"


def _nodes_available(
    obs: Observation, roles: decide.Roles, found: Validation
) -> tuple[ConditionStatus, str, str]:
    involved = [roles.active]
    if roles.standby is not None:
        involved.append(roles.standby)
    else:
        involved += [n for n in found.standby_problems if n != roles.active]
    problems = [
        p
        for p in found.relevant(roles.standby)
        if p.reason in validate.AVAILABILITY and p.node in involved
    ]
    if problems:
        return ConditionStatus.FALSE, problems[0].reason, "; ".join(p.message for p in problems)
    return ConditionStatus.TRUE, "AgentsReporting", f"agents on {', '.join(involved)} report"


def _validated(roles: decide.Roles, found: Validation) -> tuple[ConditionStatus, str, str]:
    problems = [p for p in found.relevant(roles.standby) if p.reason not in validate.AVAILABILITY]
    # Blocking problems first: they are why the replication is Failed.
    problems.sort(key=lambda p: not p.blocking)
    if problems:
        return ConditionStatus.FALSE, problems[0].reason, "; ".join(p.message for p in problems)
    return ConditionStatus.TRUE, "Valid", "the spec fits the cluster"


def _stats_source(
    obs: Observation, roles: decide.Roles, found: Validation
) -> NodeReplication | None:
    """The active node's view of the stream, unless the standby's is newer.

    The two agents report on their own clocks: the standby can say Replicating (and so make
    the replication Protected) before the active's next report counts the checkpoint it
    acknowledged. Status never shows Protected with zero checkpoints for that reason.
    """
    if roles.standby is None:
        return None
    views = [
        rep
        for node in (roles.active, roles.standby)
        if (rep := obs.entry(node)) is not None
        and rep.checkpoints is not None
        and node in found.responsive
    ]
    if not views:
        return None
    # max() keeps the first of equals: the active's view wins a tie.
    return max(views, key=_checkpoints_counted)


def _checkpoints_counted(rep: NodeReplication) -> int:
    return (rep.checkpoints.total or 0) if rep.checkpoints is not None else 0


def _renewals_silent_for(
    obs: Observation, view: NodeView, spec: XenReplicationSpec
) -> float | None:
    """Seconds without a host-Lease renewal of `view`'s node, once that is longer than D;
    None before (or if never seen). The agent pauses at D - margin after its last renewal was
    *sent*; judged from when the operator *saw* one, the margin absorbs the watch's lag."""
    if view.renewal_seen is None:
        return None
    silent = (obs.now - view.renewal_seen).total_seconds()
    return silent if silent > spec.failover.lease_duration_seconds else None


def _last_failover(
    obs: Observation, roles: decide.Roles, record: Switchover | None
) -> FailoverRecord | None:
    prev = obs.previous.last_failover
    reported = obs.entry(roles.active)
    agent_record = reported.failover if reported is not None else None
    if agent_record is not None and agent_record.to_node == roles.active:
        # The agent that activated knows the details (when, why, how long): mirror them. It
        # keeps its record until it sees it here, planned handovers (reason Switchover) too.
        return agent_record
    if roles.active_changed and not _switched_over(obs, roles, record):
        return FailoverRecord(
            time=obs.now,
            from_node=obs.previous.active_node or "",
            to_node=roles.active,
            reason="LeaseTransferred",
        )
    return prev


def _switched_over(obs: Observation, roles: decide.Roles, record: Switchover | None) -> bool:
    """This pass saw the active node move because of the switchover it was running."""
    before = obs.previous.switchover
    return (
        roles.active_changed
        and record is not None
        and record.state is SwitchoverState.SUCCEEDED
        and record.target == roles.active
        and before is not None
        and before.target == record.target
        and before.state in (SwitchoverState.REQUESTED, SwitchoverState.IN_PROGRESS)
    )


def _status(
    obs: Observation,
    spec: XenReplicationSpec,
    roles: decide.Roles,
    found: Validation,
    verdict: _Verdict,
    record: Switchover | None,
) -> XenReplicationStatus:
    prev = obs.previous
    ready = _ready(obs, spec, roles, found, verdict, record)
    protected = (
        (ConditionStatus.TRUE, verdict.reason, verdict.message)
        if verdict.protected
        else (ConditionStatus.FALSE, verdict.reason, verdict.message)
    )
    conditions = [
        _condition(prev, READY, *ready, obs=obs),
        _condition(prev, PROTECTED, *protected, obs=obs),
        _condition(prev, VALIDATED, *_validated(roles, found), obs=obs),
        _condition(prev, NODES_AVAILABLE, *_nodes_available(obs, roles, found), obs=obs),
    ]
    stats = _stats_source(obs, roles, found)
    checkpoints = stats.checkpoints if stats is not None else None
    protected_since = None
    if verdict.phase is Phase.PROTECTED:
        keep = prev.phase is Phase.PROTECTED and prev.protected_since is not None
        protected_since = prev.protected_since if keep else obs.now
    return XenReplicationStatus(
        phase=verdict.phase,
        message=verdict.message,
        active_node=roles.active,
        standby_node=roles.standby,
        lease_holder=obs.lease_holder,
        protected_since=protected_since,
        conditions=conditions,
        observed_generation=obs.generation,
        last_checkpoint_time=checkpoints.last_time if checkpoints else None,
        checkpoints_total=checkpoints.total if checkpoints else None,
        checkpoint_interval_ms=checkpoints.interval_ms if checkpoints else None,
        last_pause_ms=checkpoints.last_pause_ms if checkpoints else None,
        bytes_per_second=checkpoints.bytes_per_second if checkpoints else None,
        last_failover=_last_failover(obs, roles, record),
        switchover=record,
    )


def _condition_of(status: XenReplicationStatus, type_: str) -> Condition | None:
    return next((c for c in status.conditions if c.type == type_), None)


def _invalid(obs: Observation) -> Outcome:
    """A spec the models reject (an object stored before a rule existed, say)."""
    prev = obs.previous
    message = f"invalid spec: {obs.spec_error}"
    unknown = (ConditionStatus.UNKNOWN, "InvalidSpec", message)
    conditions = [
        _condition(prev, READY, *unknown, obs=obs),
        _condition(prev, PROTECTED, ConditionStatus.FALSE, "InvalidSpec", message, obs=obs),
        _condition(prev, VALIDATED, ConditionStatus.FALSE, "InvalidSpec", message, obs=obs),
        _condition(prev, NODES_AVAILABLE, *unknown, obs=obs),
    ]
    status = prev.model_copy(
        update={
            "phase": Phase.FAILED,
            "message": message,
            "standby_node": None,
            "lease_holder": obs.lease_holder,
            "protected_since": None,
            "conditions": conditions,
            "observed_generation": obs.generation,
        }
    )
    transitions = []
    old = _condition_of(prev, VALIDATED)
    if old is None or old.reason != "InvalidSpec":
        transitions.append(Transition("InvalidSpec", message, warning=True))
    return Outcome(status=status, transitions=transitions)


# --- transitions ---------------------------------------------------------------------------


def _moved_since_protection_was_lost(
    prev: XenReplicationStatus, new: XenReplicationStatus, slack: timedelta
) -> bool:
    old = _condition_of(prev, PROTECTED)
    if old is None or old.status is ConditionStatus.TRUE:
        return False
    lost = old.last_transition_time - slack
    moves = []
    if new.last_failover is not None:
        moves.append(new.last_failover.time)
    if (
        new.switchover is not None
        and new.switchover.state is SwitchoverState.SUCCEEDED
        and new.switchover.time is not None
    ):
        moves.append(new.switchover.time)
    return any(t >= lost for t in moves)


def _transitions(
    obs: Observation, roles: decide.Roles, new: XenReplicationStatus, timing: Timing
) -> list[Transition]:
    prev = obs.previous
    out: list[Transition] = []
    domain = obs.spec.domain if obs.spec else obs.name

    # Moves of the active copy.
    if roles.active_changed:
        before = prev.active_node
        if _switched_over(obs, roles, new.switchover):
            out.append(
                Transition(
                    "SwitchedOver",
                    f"{domain} moved from {before} to {roles.active} as requested",
                )
            )
        else:
            fo = new.last_failover
            why = f" ({fo.reason})" if fo is not None and fo.reason else ""
            took = (
                f" in {fo.duration_ms} ms" if fo is not None and fo.duration_ms is not None else ""
            )
            out.append(
                Transition(
                    "FailedOver",
                    f"{domain} failed over from {before} to {roles.active}{why}{took}",
                    warning=True,
                )
            )

    # The switchover record's own story.
    old_sw, new_sw = prev.switchover, new.switchover
    if new_sw is not None and (
        old_sw is None or (old_sw.target, old_sw.state) != (new_sw.target, new_sw.state)
    ):
        if new_sw.state is SwitchoverState.IN_PROGRESS:
            out.append(Transition("SwitchingOver", new_sw.message or ""))
        elif new_sw.state is SwitchoverState.FAILED:
            out.append(Transition("SwitchoverFailed", new_sw.message or "", warning=True))
        elif new_sw.state is SwitchoverState.SUCCEEDED and not roles.active_changed:
            out.append(Transition("SwitchedOver", new_sw.message or ""))

    # Phases.
    if new.phase != prev.phase:
        out += _phase_transition(obs, prev, new, timing)

    # Problems that are not phases of their own.
    for type_ in (VALIDATED, NODES_AVAILABLE):
        old_c, new_c = _condition_of(prev, type_), _condition_of(new, type_)
        if new_c is None or new_c.status is ConditionStatus.TRUE:
            continue
        if old_c is None or (old_c.status, old_c.reason, old_c.message) != (
            new_c.status,
            new_c.reason,
            new_c.message,
        ):
            out.append(Transition(new_c.reason, new_c.message, warning=True))
    return out


def _phase_transition(
    obs: Observation, prev: XenReplicationStatus, new: XenReplicationStatus, timing: Timing
) -> list[Transition]:
    message = new.message or ""
    phase = new.phase
    out: list[Transition] = []
    if prev.phase is Phase.SUSPENDED and phase is not Phase.SUSPENDED and not obs.deleting:
        out.append(Transition("Resumed", "replication resumes"))
    if phase is Phase.SEEDING:
        out.append(Transition("Seeding", message))
    elif phase is Phase.PROTECTED:
        again = _moved_since_protection_was_lost(prev, new, timing.stale_after)
        out.append(Transition("Reprotected" if again else "Protected", message))
    elif phase is Phase.DEGRADED:
        out.append(Transition("Degraded", message, warning=True))
    elif phase is Phase.FAILING_OVER:
        # A switchover announces itself (SwitchingOver); only unplanned trouble warns here.
        sw = new.switchover
        if sw is None or sw.state is not SwitchoverState.IN_PROGRESS:
            out.append(Transition("FailingOver", message, warning=True))
    elif phase is Phase.SUSPENDED:
        out.append(Transition("Stopping" if obs.deleting else "Suspended", message))
    return out


# --- writing ------------------------------------------------------------------------------

#: Fields that change with every checkpoint report; a change in these alone can wait.
STATS_FIELDS = frozenset(
    {
        "last_checkpoint_time",
        "checkpoints_total",
        "checkpoint_interval_ms",
        "last_pause_ms",
        "bytes_per_second",
    }
)


def only_stats_changed(old: XenReplicationStatus, new: XenReplicationStatus) -> bool:
    """True when the two differ in checkpoint statistics and nothing else."""
    if old == new:
        return False
    keep = set(XenReplicationStatus.model_fields) - STATS_FIELDS
    return old.model_dump(include=keep) == new.model_dump(include=keep)


# --- deletion ------------------------------------------------------------------------------


def copies_released(obs: Observation, stale_after: timedelta) -> tuple[bool, list[str]]:
    """Whether every node but the active one has let go of its copy (deletion may finish).

    A node counts as done when its report has no entry for this replication, or the entry is
    Stopped/Failed, or when its agent has stopped reporting (an agent that comes back drops
    copies of replications that no longer exist by itself). Returns the nodes still waited for.
    """
    active = obs.lease_holder or obs.previous.active_node
    waiting = []
    for name, view in obs.nodes.items():
        if name == active or not view.fresh(obs.now, stale_after):
            continue
        rep = view.replication(obs.uid, obs.namespace, obs.name)
        if rep is not None and rep.state not in _RELEASED:
            waiting.append(name)
    return not waiting, sorted(waiting)


__all__ = [
    "CONDITION_TYPES",
    "NODES_AVAILABLE",
    "PROTECTED",
    "READY",
    "VALIDATED",
    "NodeView",
    "Observation",
    "OtherReplication",
    "Outcome",
    "Problem",
    "Timing",
    "Transition",
    "copies_released",
    "only_stats_changed",
    "reconcile",
]
