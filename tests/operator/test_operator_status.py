"""From observations to XenReplication.status and Events (operator/xenha_operator/status.py).

Each test is one situation the operator can find itself in; the table-driven ones say what
phase, conditions and roles follow from what the agents report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from xenha_operator.status import (
    NODES_AVAILABLE,
    PROTECTED,
    READY,
    VALIDATED,
    NodeView,
    Observation,
    OtherReplication,
    Outcome,
    Timing,
    copies_released,
    reconcile,
)

from xenha.api import (
    CheckpointStats,
    ConditionStatus,
    DomainInfo,
    FailoverRecord,
    NodeReplication,
    Phase,
    ReplicationRole,
    ReplicationState,
    Switchover,
    SwitchoverState,
    XenInfo,
    XenNodeStatus,
    XenReplicationStatus,
    parse_spec,
)

NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
A, B, C = "xen-a", "xen-b", "xen-c"
UID = "6f1c0000-0000-0000-0000-000000000001"
TIMING = Timing(stale_after=timedelta(seconds=15), switchover_timeout=timedelta(seconds=60))
SPEC = {"domain": "db1", "mode": "remus", "primaryNode": A, "secondaryNode": B}


def entry(
    role: str,
    state: ReplicationState,
    *,
    peer: bool | None = True,
    reason: str | None = None,
    message: str | None = None,
    total: int | None = None,
    failover: FailoverRecord | None = None,
) -> NodeReplication:
    return NodeReplication(
        namespace="prod",
        name="db1",
        uid=UID,
        role=ReplicationRole(role),
        state=state,
        peer_connected=peer,
        reason=reason,
        message=message,
        checkpoints=(
            CheckpointStats(
                total=total,
                last_time=NOW,
                interval_ms=205,
                last_pause_ms=12,
                bytes_per_second=total * 1000,
            )
            if total is not None
            else None
        ),
        failover=failover,
    )


def node(
    name: str,
    *,
    domains: Sequence[str] = (),
    free: int = 2048,
    colo: bool | None = True,
    entries: Sequence[NodeReplication] = (),
    age: float | None = 1.0,
    states: Mapping[str, str] | None = None,
) -> NodeView:
    """A node whose agent last changed its report `age` seconds ago (None: never seen).
    Its domains are running unless `states` says otherwise (as the agent reads xl list)."""
    states = states or {}
    status = XenNodeStatus(
        heartbeat_time=NOW,
        xen=XenInfo(free_memory_mib=free, colo_supported=colo),
        domains=[
            DomainInfo(name=d, state=states.get(d, "running"), memory_mib=512) for d in domains
        ],
        replications=list(entries),
    )
    seen = None if age is None else NOW - timedelta(seconds=age)
    return NodeView(name=name, status=status, heartbeat_seen=seen)


def absent(name: str) -> NodeView:
    return NodeView(name=name, status=None)


def observe(
    *nodes: NodeView,
    spec: dict[str, Any] | None = None,
    previous: XenReplicationStatus | None = None,
    **kw: Any,
) -> Observation:
    # Node ages are relative to the observation's clock, so a later pass sees them as fresh.
    shift = kw.get("now", NOW) - NOW
    nodes = tuple(
        replace(n, heartbeat_seen=n.heartbeat_seen + shift) if n.heartbeat_seen else n
        for n in nodes
    )
    base: dict[str, Any] = {
        "namespace": "prod",
        "name": "db1",
        "uid": UID,
        "generation": 1,
        "created": NOW - timedelta(hours=1),
        "spec": parse_spec({**SPEC, **(spec or {})}),
        "previous": previous or XenReplicationStatus(),
        "nodes": {n.name: n for n in nodes},
        "now": NOW,
    }
    base.update(kw)
    return Observation(**base)


def condition(out: Outcome, type_: str) -> tuple[ConditionStatus, str]:
    c = next(c for c in out.status.conditions if c.type == type_)
    return c.status, c.reason


def reasons(out: Outcome) -> list[str]:
    return [t.reason for t in out.transitions]


# A healthy pair at each stage of a replication's life.
PRIMARY_UP = node(A, domains=["db1"])
SECONDARY_UP = node(B)
SEEDING = (
    node(A, domains=["db1"], entries=[entry("primary", ReplicationState.SEEDING)]),
    node(B, domains=["db1--incoming"], entries=[entry("secondary", ReplicationState.SEEDING)]),
)
REPLICATING = (
    node(A, domains=["db1"], entries=[entry("primary", ReplicationState.REPLICATING, total=120)]),
    node(
        B,
        domains=["db1--incoming"],
        entries=[entry("secondary", ReplicationState.REPLICATING, total=119)],
    ),
)


def protected_status() -> XenReplicationStatus:
    return reconcile(observe(*REPLICATING, lease_holder=A), TIMING).status


# (story, observation, phase, Protected reason, active, standby)
TABLE = [
    (
        "no agent has reported yet: Pending, and nobody can stand by",
        observe(absent(A), absent(B)),
        Phase.PENDING,
        "NodeNotFound",
        A,
        None,
    ),
    (
        "both agents report, nothing started: Pending until they pick it up",
        observe(PRIMARY_UP, SECONDARY_UP, lease_holder=A),
        Phase.PENDING,
        "Initializing",
        A,
        B,
    ),
    (
        "the agents seed the standby",
        observe(*SEEDING, lease_holder=A),
        Phase.SEEDING,
        "Seeding",
        A,
        B,
    ),
    (
        "the standby replicates with the link up: Protected",
        observe(*REPLICATING, lease_holder=A),
        Phase.PROTECTED,
        "Replicating",
        A,
        B,
    ),
    (
        "the active agent restarts (no reports) while checkpoints keep arriving: still Protected",
        observe(
            replace(REPLICATING[0], heartbeat_seen=NOW - timedelta(seconds=40)),
            REPLICATING[1],
            lease_holder=A,
            previous=XenReplicationStatus(phase=Phase.PROTECTED, active_node=A, standby_node=B),
        ),
        Phase.PROTECTED,
        "Replicating",
        A,
        B,
    ),
    (
        "the standby's agent stops reporting: Degraded, NodeUnresponsive, the standby is kept",
        observe(
            REPLICATING[0],
            replace(REPLICATING[1], heartbeat_seen=NOW - timedelta(seconds=16)),
            lease_holder=A,
            previous=XenReplicationStatus(phase=Phase.PROTECTED, active_node=A, standby_node=B),
        ),
        Phase.DEGRADED,
        "NodeUnresponsive",
        A,
        B,
    ),
    (
        "the standby lost the stream and dropped its copy: Degraded with the agent's reason",
        observe(
            REPLICATING[0],
            node(
                B,
                entries=[
                    entry(
                        "secondary",
                        ReplicationState.DEGRADED,
                        peer=False,
                        reason="LostConnection",
                        message="relay EOF",
                    )
                ],
            ),
            lease_holder=A,
            previous=XenReplicationStatus(phase=Phase.PROTECTED, active_node=A, standby_node=B),
        ),
        Phase.DEGRADED,
        "LostConnection",
        A,
        B,
    ),
    (
        "the checkpoint stream fails on the primary: Degraded, CheckpointError",
        observe(
            node(A, domains=["db1"], entries=[entry("primary", ReplicationState.FAILED)]),
            REPLICATING[1],
            lease_holder=A,
            previous=XenReplicationStatus(phase=Phase.PROTECTED, active_node=A, standby_node=B),
        ),
        Phase.DEGRADED,
        "CheckpointError",
        A,
        B,
    ),
    (
        "the standby is activating: FailingOver",
        observe(
            replace(REPLICATING[0], heartbeat_seen=NOW - timedelta(seconds=5)),
            node(
                B,
                domains=["db1--incoming"],
                entries=[entry("secondary", ReplicationState.ACTIVATING, peer=False)],
            ),
            lease_holder=A,
            previous=XenReplicationStatus(phase=Phase.PROTECTED, active_node=A, standby_node=B),
        ),
        Phase.FAILING_OVER,
        "FailingOver",
        A,
        B,
    ),
    (
        "the active agent fenced itself: FailingOver",
        observe(
            node(
                A, domains=["db1"], entries=[entry("primary", ReplicationState.FENCED, peer=False)]
            ),
            REPLICATING[1],
            lease_holder=A,
            previous=XenReplicationStatus(phase=Phase.PROTECTED, active_node=A, standby_node=B),
        ),
        Phase.FAILING_OVER,
        "FailingOver",
        A,
        B,
    ),
    (
        "suspended: no standby, the active node runs unprotected",
        observe(*REPLICATING, spec={"suspended": True}, lease_holder=A),
        Phase.SUSPENDED,
        "Suspended",
        A,
        None,
    ),
    (
        "the domain does not exist on the primary: Failed before anything starts",
        observe(node(A), SECONDARY_UP, lease_holder=A),
        Phase.FAILED,
        "DomainNotFound",
        A,
        None,
    ),
    (
        "the secondary has no room for the guest: Pending",
        observe(PRIMARY_UP, node(B, free=256), lease_holder=A),
        Phase.PENDING,
        "InsufficientMemory",
        A,
        None,
    ),
    (
        "COLO asked, the secondary cannot do it: Pending with ColoUnsupported",
        observe(PRIMARY_UP, node(B, colo=False), spec={"mode": "colo"}, lease_holder=A),
        Phase.PENDING,
        "ColoUnsupported",
        A,
        None,
    ),
    (
        "COLO asked, the primary cannot do it: Failed",
        observe(node(A, domains=["db1"], colo=False), SECONDARY_UP, spec={"mode": "colo"}),
        Phase.FAILED,
        "ColoUnsupported",
        A,
        None,
    ),
    (
        "an older replication protects a domain of the same name on our nodes: Failed",
        observe(
            PRIMARY_UP,
            SECONDARY_UP,
            others=[
                OtherReplication(
                    key="prod/db1-old",
                    uid="other",
                    domain="db1",
                    nodes=frozenset({A, C}),
                    created=NOW - timedelta(days=1),
                )
            ],
        ),
        Phase.FAILED,
        "ConflictingReplication",
        A,
        None,
    ),
    (
        "a newer replication of the same name is the one that yields",
        observe(
            PRIMARY_UP,
            SECONDARY_UP,
            lease_holder=A,
            others=[
                OtherReplication(
                    key="prod/db1-new",
                    uid="other",
                    domain="db1",
                    nodes=frozenset({A, C}),
                    created=NOW,
                )
            ],
        ),
        Phase.PENDING,
        "Initializing",
        A,
        B,
    ),
]


@pytest.mark.parametrize(
    ("story", "obs", "phase", "reason", "active", "standby"),
    TABLE,
    ids=[row[0][:70] for row in TABLE],
)
def test_phase_and_roles(
    story: str, obs: Observation, phase: Phase, reason: str, active: str, standby: str | None
) -> None:
    out = reconcile(obs, TIMING)
    got = (
        out.status.phase,
        condition(out, PROTECTED)[1],
        out.status.active_node,
        out.status.standby_node,
    )
    assert got == (phase, reason, active, standby), story


def test_a_standby_ahead_of_the_active_report_supplies_the_checkpoint_stats() -> None:
    # The agents report on their own clocks: the standby says Replicating after the first
    # acknowledged checkpoint while the active's last report still counts none.
    fresh = (
        node(A, domains=["db1"], entries=[entry("primary", ReplicationState.SEEDING, total=0)]),
        node(
            B,
            domains=["db1--incoming"],
            entries=[entry("secondary", ReplicationState.REPLICATING, total=1)],
        ),
    )
    status = reconcile(observe(*fresh, lease_holder=A), TIMING).status
    assert status.phase is Phase.PROTECTED
    assert status.checkpoints_total == 1


def test_protected_status_carries_the_checkpoint_stats_of_the_active_node() -> None:
    status = protected_status()
    assert status.checkpoints_total == 120
    assert status.last_checkpoint_time == NOW
    assert status.checkpoint_interval_ms == 205
    assert status.last_pause_ms == 12
    assert status.bytes_per_second == 120_000
    assert status.protected_since == NOW
    assert status.lease_holder == A
    assert status.observed_generation == 1
    assert condition(Outcome(status, []), READY) == (ConditionStatus.TRUE, "Running")
    assert condition(Outcome(status, []), PROTECTED) == (ConditionStatus.TRUE, "Replicating")
    assert condition(Outcome(status, []), VALIDATED) == (ConditionStatus.TRUE, "Valid")
    assert condition(Outcome(status, []), NODES_AVAILABLE) == (
        ConditionStatus.TRUE,
        "AgentsReporting",
    )


def test_the_way_to_protection_is_told_as_events() -> None:
    pending = reconcile(observe(PRIMARY_UP, SECONDARY_UP, lease_holder=A), TIMING)
    assert reasons(pending) == []
    seeding = reconcile(observe(*SEEDING, lease_holder=A, previous=pending.status), TIMING)
    assert reasons(seeding) == ["Seeding"]
    protected = reconcile(observe(*REPLICATING, lease_holder=A, previous=seeding.status), TIMING)
    assert reasons(protected) == ["Protected"]
    assert [t.type for t in protected.transitions] == ["Normal"]


def test_nothing_changes_and_nothing_is_told_while_the_situation_holds() -> None:
    first = protected_status()
    later = reconcile(
        observe(*REPLICATING, lease_holder=A, previous=first, now=NOW + timedelta(minutes=5)),
        TIMING,
    )
    assert later.transitions == []
    assert later.status == first


def test_last_transition_time_moves_only_when_the_condition_status_moves() -> None:
    seeding = reconcile(observe(*SEEDING, lease_holder=A), TIMING).status
    lost = reconcile(
        observe(
            SEEDING[0],
            node(B, entries=[entry("secondary", ReplicationState.DEGRADED, peer=False)]),
            lease_holder=A,
            previous=seeding,
            now=NOW + timedelta(seconds=30),
        ),
        TIMING,
    ).status
    before = next(c for c in seeding.conditions if c.type == PROTECTED)
    after = next(c for c in lost.conditions if c.type == PROTECTED)
    assert (before.reason, after.reason) == ("Seeding", "LostConnection")
    assert after.last_transition_time == before.last_transition_time == NOW


def test_generation_is_observed_in_status_and_every_condition() -> None:
    status = reconcile(observe(*REPLICATING, lease_holder=A, generation=7), TIMING).status
    assert status.observed_generation == 7
    assert {c.observed_generation for c in status.conditions} == {7}


def test_a_stale_standby_is_announced_once() -> None:
    stale = (REPLICATING[0], replace(REPLICATING[1], heartbeat_seen=NOW - timedelta(seconds=20)))
    first = reconcile(observe(*stale, lease_holder=A, previous=protected_status()), TIMING)
    assert reasons(first) == ["Degraded", "NodeUnresponsive"]
    assert all(t.warning for t in first.transitions)
    again = reconcile(observe(*stale, lease_holder=A, previous=first.status), TIMING)
    assert again.transitions == []


# --- failover and re-protection ------------------------------------------------------------

AGENT_FAILOVER = FailoverRecord(
    time=NOW - timedelta(seconds=1), from_node=A, to_node=B, reason="NodeLost", duration_ms=2600
)


def test_failover_the_active_node_follows_the_fencing_lease() -> None:
    dead_a = node(A, domains=["db1"], age=30)
    b_active = node(
        B,
        domains=["db1"],
        entries=[entry("secondary", ReplicationState.ACTIVE, peer=False, failover=AGENT_FAILOVER)],
    )
    out = reconcile(observe(dead_a, b_active, lease_holder=B, previous=protected_status()), TIMING)
    assert (out.status.active_node, out.status.standby_node) == (B, None)
    assert out.status.phase is Phase.DEGRADED
    assert out.status.last_failover == AGENT_FAILOVER
    assert condition(out, READY) == (ConditionStatus.TRUE, "Running")
    assert condition(out, PROTECTED) == (ConditionStatus.FALSE, "NodeUnresponsive")
    assert reasons(out)[:2] == ["FailedOver", "Degraded"]
    failed_over = out.transitions[0]
    assert failed_over.warning
    assert failed_over.message == "db1 failed over from xen-a to xen-b (NodeLost) in 2600 ms"


def test_failover_seen_before_the_agent_reports_details_is_recorded_by_the_operator() -> None:
    out = reconcile(
        observe(
            node(A, age=30), node(B, domains=["db1"]), lease_holder=B, previous=protected_status()
        ),
        TIMING,
    )
    assert out.status.last_failover == FailoverRecord(
        time=NOW, from_node=A, to_node=B, reason="LeaseTransferred"
    )
    # The agent's record, once reported, replaces it without a second FailedOver.
    later = reconcile(
        observe(
            node(A, age=30),
            node(
                B,
                domains=["db1"],
                entries=[entry("secondary", ReplicationState.ACTIVE, failover=AGENT_FAILOVER)],
            ),
            lease_holder=B,
            previous=out.status,
        ),
        TIMING,
    )
    assert later.status.last_failover == AGENT_FAILOVER
    assert "FailedOver" not in reasons(later)


def test_a_second_operator_pass_does_not_repeat_the_failover() -> None:
    nodes = (node(A, age=30), node(B, domains=["db1"]))
    first = reconcile(observe(*nodes, lease_holder=B, previous=protected_status()), TIMING)
    second = reconcile(observe(*nodes, lease_holder=B, previous=first.status), TIMING)
    assert "FailedOver" not in reasons(second)
    assert second.status == first.status


def test_reprotection_once_the_old_primary_reports_again_without_its_copy() -> None:
    after_failover = reconcile(
        observe(
            node(A, age=30), node(B, domains=["db1"]), lease_holder=B, previous=protected_status()
        ),
        TIMING,
    ).status
    # The old primary is back but still holds its fenced copy: not yet.
    holding = reconcile(
        observe(
            node(A, domains=["db1"]),
            node(B, domains=["db1"]),
            lease_holder=B,
            previous=after_failover,
            now=NOW + timedelta(seconds=30),
        ),
        TIMING,
    )
    assert holding.status.standby_node is None
    assert condition(holding, PROTECTED)[1] == "CopyStillPresent"
    # Its agent destroyed the copy: it becomes the standby, the agents seed in reverse.
    back = reconcile(
        observe(
            node(A),
            node(B, domains=["db1"]),
            lease_holder=B,
            previous=holding.status,
            now=NOW + timedelta(seconds=40),
        ),
        TIMING,
    )
    assert (back.status.active_node, back.status.standby_node) == (B, A)
    reverse = (
        node(
            A,
            domains=["db1--incoming"],
            entries=[entry("secondary", ReplicationState.REPLICATING, total=9)],
        ),
        node(
            B, domains=["db1"], entries=[entry("primary", ReplicationState.REPLICATING, total=10)]
        ),
    )
    protected = reconcile(
        observe(*reverse, lease_holder=B, previous=back.status, now=NOW + timedelta(seconds=60)),
        TIMING,
    )
    assert protected.status.phase is Phase.PROTECTED
    assert reasons(protected) == ["Reprotected"]
    assert protected.status.checkpoints_total == 10


def test_protection_regained_without_a_move_is_protected_not_reprotected() -> None:
    blip = reconcile(
        observe(
            REPLICATING[0],
            node(B, entries=[entry("secondary", ReplicationState.DEGRADED, peer=False)]),
            lease_holder=A,
            previous=protected_status(),
            now=NOW + timedelta(hours=1),
        ),
        TIMING,
    )
    back = reconcile(
        observe(
            *REPLICATING,
            lease_holder=A,
            previous=blip.status,
            now=NOW + timedelta(hours=1, minutes=1),
        ),
        TIMING,
    )
    assert reasons(back) == ["Protected"]


# --- suspend, resume, delete ---------------------------------------------------------------


def test_suspend_and_resume_are_events() -> None:
    suspended = reconcile(
        observe(
            *REPLICATING, spec={"suspended": True}, lease_holder=A, previous=protected_status()
        ),
        TIMING,
    )
    assert reasons(suspended) == ["Suspended"]
    assert condition(suspended, READY) == (ConditionStatus.TRUE, "Running")
    resumed = reconcile(
        observe(PRIMARY_UP, SECONDARY_UP, lease_holder=A, previous=suspended.status), TIMING
    )
    assert resumed.status.standby_node == B
    assert reasons(resumed) == ["Resumed", "Seeding"]


def test_deletion_stops_replication_and_waits_for_the_standby() -> None:
    deleting = observe(*REPLICATING, lease_holder=A, previous=protected_status(), deleting=True)
    out = reconcile(deleting, TIMING)
    assert (out.status.phase, out.status.active_node, out.status.standby_node) == (
        Phase.SUSPENDED,
        A,
        None,
    )
    assert condition(out, PROTECTED) == (ConditionStatus.FALSE, "UserAction")
    assert reasons(out) == ["Stopping"]
    assert copies_released(deleting, TIMING.stale_after) == (False, [B])
    stopped = replace(
        deleting,
        nodes={
            A: REPLICATING[0],
            B: node(B, entries=[entry("secondary", ReplicationState.STOPPED, peer=False)]),
        },
    )
    assert copies_released(stopped, TIMING.stale_after) == (True, [])
    gone = replace(deleting, nodes={A: REPLICATING[0], B: node(B)})
    assert copies_released(gone, TIMING.stale_after) == (True, [])
    dead = replace(
        deleting, nodes={A: REPLICATING[0], B: replace(REPLICATING[1], heartbeat_seen=None)}
    )
    assert copies_released(dead, TIMING.stale_after) == (True, [])


def test_an_invalid_spec_fails_with_a_reason() -> None:
    out = reconcile(replace(observe(PRIMARY_UP), spec=None, spec_error="domain: too long"), TIMING)
    assert out.status.phase is Phase.FAILED
    assert condition(out, VALIDATED) == (ConditionStatus.FALSE, "InvalidSpec")
    assert reasons(out) == ["InvalidSpec"]


# --- switchover ----------------------------------------------------------------------------

ASK_B = {"xenha.io/switchover-to": B}


def record(out: Outcome) -> Switchover:
    assert out.status.switchover is not None
    return out.status.switchover


def test_switchover_runs_once_protected_and_completes_when_the_lease_moves() -> None:
    asked = reconcile(
        observe(*REPLICATING, lease_holder=A, annotations=ASK_B, previous=protected_status()),
        TIMING,
    )
    sw = record(asked)
    assert (sw.target, sw.state) == (B, SwitchoverState.IN_PROGRESS)
    assert asked.status.phase is Phase.FAILING_OVER
    assert condition(asked, PROTECTED) == (ConditionStatus.FALSE, "SwitchingOver")
    assert reasons(asked) == ["SwitchingOver"]
    # The standby took the fencing Lease: done; the old primary still holds its paused copy.
    moved = reconcile(
        observe(
            node(A, domains=["db1"]),
            node(B, domains=["db1"]),
            lease_holder=B,
            annotations=ASK_B,
            previous=asked.status,
            now=NOW + timedelta(seconds=2),
        ),
        TIMING,
    )
    sw = record(moved)
    assert sw.state is SwitchoverState.SUCCEEDED
    assert moved.status.active_node == B
    assert moved.status.last_failover is None
    assert reasons(moved)[0] == "SwitchedOver"
    assert "FailedOver" not in reasons(moved)
    # The annotation stays (it is the user's); nothing happens again.
    later = reconcile(
        observe(
            node(A),
            node(B, domains=["db1"]),
            lease_holder=B,
            annotations=ASK_B,
            previous=moved.status,
            now=NOW + timedelta(seconds=10),
        ),
        TIMING,
    )
    assert later.status.switchover == moved.status.switchover
    assert later.status.standby_node == A


def test_switchover_waits_for_protection_then_times_out() -> None:
    asked = reconcile(
        observe(
            *SEEDING,
            lease_holder=A,
            annotations=ASK_B,
            previous=reconcile(observe(*SEEDING, lease_holder=A), TIMING).status,
        ),
        TIMING,
    )
    sw = record(asked)
    assert sw.state is SwitchoverState.REQUESTED
    assert asked.status.phase is Phase.SEEDING
    late = reconcile(
        observe(
            *SEEDING,
            lease_holder=A,
            annotations=ASK_B,
            previous=asked.status,
            now=NOW + timedelta(seconds=61),
        ),
        TIMING,
    )
    sw = record(late)
    assert sw.state is SwitchoverState.FAILED
    assert reasons(late) == ["SwitchoverFailed"]


def test_switchover_to_a_node_that_is_not_the_standby_fails() -> None:
    out = reconcile(
        observe(
            *REPLICATING,
            lease_holder=A,
            annotations={"xenha.io/switchover-to": C},
            previous=protected_status(),
        ),
        TIMING,
    )
    sw = record(out)
    assert sw.state is SwitchoverState.FAILED
    assert sw.message == "xen-c is not the standby node (standby: xen-b)"
    assert out.status.phase is Phase.PROTECTED


def test_switchover_to_the_active_node_is_a_no_op() -> None:
    out = reconcile(
        observe(
            *REPLICATING,
            lease_holder=A,
            annotations={"xenha.io/switchover-to": A},
            previous=protected_status(),
        ),
        TIMING,
    )
    sw = record(out)
    assert sw.state is SwitchoverState.SUCCEEDED
    assert out.status.active_node == A


def test_the_agents_record_of_a_switchover_is_mirrored_without_a_failover_event() -> None:
    asked = reconcile(
        observe(*REPLICATING, lease_holder=A, annotations=ASK_B, previous=protected_status()),
        TIMING,
    )
    handed_over = FailoverRecord(time=NOW, from_node=A, to_node=B, reason="Switchover")
    moved = reconcile(
        observe(
            node(A),
            node(
                B,
                domains=["db1"],
                entries=[entry("secondary", ReplicationState.ACTIVE, failover=handed_over)],
            ),
            lease_holder=B,
            annotations=ASK_B,
            previous=asked.status,
        ),
        TIMING,
    )
    assert moved.status.last_failover == handed_over
    assert "FailedOver" not in reasons(moved)
    assert "SwitchedOver" in reasons(moved)


def test_the_primary_pausing_for_a_switchover_is_switching_over_not_failing_over() -> None:
    asked = reconcile(
        observe(*REPLICATING, lease_holder=A, annotations=ASK_B, previous=protected_status()),
        TIMING,
    )
    paused = reconcile(
        observe(
            node(
                A,
                domains=["db1"],
                entries=[
                    entry("primary", ReplicationState.FENCED, reason="SwitchoverPaused", total=121)
                ],
            ),
            REPLICATING[1],
            lease_holder=A,
            annotations=ASK_B,
            previous=asked.status,
        ),
        TIMING,
    )
    assert paused.status.phase is Phase.FAILING_OVER
    assert condition(paused, PROTECTED) == (ConditionStatus.FALSE, "SwitchingOver")
    assert reasons(paused) == []


# --- the guest moves: pass by pass, as the operator sees it ---------------------------------
#
# Mid-move the fencing Lease and the two agents' reports are never seen at one instant: the
# Lease names the new node before its report shows the copy under the guest's name. None of
# these in-between views is a missing domain, and none may be called Failed.


@dataclass(frozen=True)
class Pass:
    story: str
    a: NodeView
    b: NodeView
    lease_holder: str
    seconds: float
    phase: Phase


def _a(*entries: NodeReplication, domains: Sequence[str] = ("db1",), age: float = 1) -> NodeView:
    return node(A, domains=domains, entries=entries, age=age)


def _b(*entries: NodeReplication, domains: Sequence[str] = ("db1--incoming",)) -> NodeView:
    return node(B, domains=domains, entries=entries)


S = ReplicationState
A_REPLICATING = entry("primary", S.REPLICATING, total=120)
B_REPLICATING = entry("secondary", S.REPLICATING, total=119)
B_PEER_LOST = entry("secondary", S.DEGRADED, peer=False, reason="HeartbeatTimeout")
B_ACTIVATING = entry("secondary", S.ACTIVATING, peer=False)
B_ACTIVE = entry("secondary", S.ACTIVE, peer=False)
A_PAUSED = entry("primary", S.FENCED, reason="SwitchoverPaused", total=121)
REVERSE_SEEDING = (
    _a(entry("secondary", S.SEEDING), domains=["db1--incoming"]),
    _b(entry("primary", S.SEEDING), domains=["db1"]),
)
REVERSE_REPLICATING = (
    _a(entry("secondary", S.REPLICATING, total=3), domains=["db1--incoming"]),
    _b(entry("primary", S.REPLICATING, total=4), domains=["db1"]),
)

POWER_CUT_OF_A = [
    Pass("protected", _a(A_REPLICATING), _b(B_REPLICATING), A, 0, Phase.PROTECTED),
    Pass(
        "xen-a is cut off; xen-b lost its peer and waits out the Lease; xen-a's last report stands",
        _a(A_REPLICATING, age=2),
        _b(B_PEER_LOST),
        A,
        1,
        Phase.DEGRADED,
    ),
    Pass(
        "xen-b took the Lease; its report still shows the peer lost and the incoming copy",
        _a(A_REPLICATING, age=4),
        _b(B_PEER_LOST),
        B,
        3,
        Phase.DEGRADED,
    ),
    Pass(
        "xen-b activates its copy, still under the incoming name",
        _a(A_REPLICATING, age=4.2),
        _b(B_ACTIVATING),
        B,
        3.2,
        Phase.DEGRADED,
    ),
    Pass(
        "xen-b runs the guest under its name",
        _a(A_REPLICATING, age=5),
        _b(B_ACTIVE, domains=["db1"]),
        B,
        4,
        Phase.DEGRADED,
    ),
    Pass(
        "xen-a is back, empty: it becomes the standby",
        _a(domains=[]),
        _b(B_ACTIVE, domains=["db1"]),
        B,
        30,
        Phase.SEEDING,
    ),
    Pass("seeding xen-a from xen-b", *REVERSE_SEEDING, B, 35, Phase.SEEDING),
    Pass("xen-a holds a current copy", *REVERSE_REPLICATING, B, 40, Phase.PROTECTED),
]

SWITCHOVER_TO_B = [
    Pass(
        "protected, switchover asked",
        _a(A_REPLICATING),
        _b(B_REPLICATING),
        A,
        0,
        Phase.FAILING_OVER,
    ),
    Pass("xen-a paused its guest", _a(A_PAUSED), _b(B_REPLICATING), A, 1, Phase.FAILING_OVER),
    Pass(
        "xen-a handed the Lease over; xen-b's report still shows the incoming copy replicating",
        _a(A_PAUSED),
        _b(B_REPLICATING),
        B,
        2,
        Phase.DEGRADED,
    ),
    Pass(
        "xen-a destroyed its copy; xen-b saw the stream end",
        _a(domains=[]),
        _b(entry("secondary", S.DEGRADED, peer=False, reason="PeerEnded")),
        B,
        2.5,
        Phase.DEGRADED,
    ),
    Pass("xen-b activates its copy", _a(domains=[]), _b(B_ACTIVATING), B, 2.6, Phase.SEEDING),
    Pass(
        "xen-b runs the guest", _a(domains=[]), _b(B_ACTIVE, domains=["db1"]), B, 3, Phase.SEEDING
    ),
    Pass("seeding xen-a from xen-b", *REVERSE_SEEDING, B, 6, Phase.SEEDING),
    Pass("xen-a holds a current copy", *REVERSE_REPLICATING, B, 10, Phase.PROTECTED),
]


@pytest.mark.parametrize(
    ("passes", "annotations"),
    [
        pytest.param(POWER_CUT_OF_A, {}, id="failover after a power cut of the active node"),
        pytest.param(SWITCHOVER_TO_B, ASK_B, id="planned switchover"),
    ],
)
def test_a_move_of_the_guest_is_never_called_failed(
    passes: list[Pass], annotations: dict[str, str]
) -> None:
    previous = None
    for step in passes:
        out = reconcile(
            observe(
                step.a,
                step.b,
                lease_holder=step.lease_holder,
                annotations=annotations,
                previous=previous,
                now=NOW + timedelta(seconds=step.seconds),
            ),
            TIMING,
        )
        assert out.status.phase is step.phase, (step.story, out.status.message)
        assert "DomainNotFound" not in reasons(out), step.story
        previous = out.status
    assert previous is not None
    assert (previous.active_node, previous.standby_node) == (B, A)


# --- a new session starting --------------------------------------------------------------


@pytest.mark.parametrize("state", [ReplicationState.STARTING, ReplicationState.SEEDING])
@pytest.mark.parametrize(
    ("story", "active", "standby", "lease_holder", "previous"),
    [
        (
            "re-protection after a failover: xen-b runs the guest, the old primary is the new "
            "standby",
            node(
                B,
                domains=["db1"],
                entries=[entry("secondary", ReplicationState.ACTIVE, peer=False)],
            ),
            A,
            B,
            XenReplicationStatus(phase=Phase.DEGRADED, active_node=B, standby_node=A),
        ),
        (
            "re-protection after the standby was lost: the primary still reports the old stream",
            node(
                A,
                domains=["db1"],
                entries=[entry("primary", ReplicationState.REPLICATING, peer=False, total=40)],
            ),
            B,
            A,
            XenReplicationStatus(phase=Phase.DEGRADED, active_node=A, standby_node=B),
        ),
        (
            "a new replication: both sides start, no link yet",
            node(
                A,
                domains=["db1"],
                entries=[entry("primary", ReplicationState.STARTING, peer=False)],
            ),
            B,
            A,
            XenReplicationStatus(phase=Phase.PENDING, active_node=A, standby_node=B),
        ),
    ],
)
def test_a_standby_starting_or_seeding_without_a_link_yet_is_seeding_not_degraded(
    state: ReplicationState,
    story: str,
    active: NodeView,
    standby: str,
    lease_holder: str,
    previous: XenReplicationStatus,
) -> None:
    new_standby = node(standby, entries=[entry("secondary", state, peer=False)])
    out = reconcile(
        observe(active, new_standby, lease_holder=lease_holder, previous=previous), TIMING
    )
    assert (out.status.phase, condition(out, PROTECTED)) == (
        Phase.SEEDING,
        (ConditionStatus.FALSE, "Seeding"),
    ), story
    assert out.status.standby_node == standby, story
    assert reasons(out) == ["Seeding"], story


# --- a paused guest on the active node -------------------------------------------------------

FENCED_A = entry("primary", ReplicationState.FENCED, peer=False, reason="SelfFenced")
PAUSED_DB1 = {"db1": "paused"}

# (story, observation, Ready, phase, Validated reason)
READY_TABLE = [
    (
        "the guest runs: Ready",
        observe(*REPLICATING, lease_holder=A),
        (ConditionStatus.TRUE, "Running"),
        Phase.PROTECTED,
        "Valid",
    ),
    (
        "the primary fenced itself, its guest is paused: not Ready, failing over, still valid",
        observe(
            node(A, domains=["db1"], states=PAUSED_DB1, entries=[FENCED_A]),
            REPLICATING[1],
            lease_holder=A,
            previous=protected_status(),
        ),
        (ConditionStatus.FALSE, "FailingOver"),
        Phase.FAILING_OVER,
        "Valid",
    ),
    (
        "a fenced guest while replication is suspended: not Ready, Fenced",
        observe(
            node(A, domains=["db1"], states=PAUSED_DB1, entries=[FENCED_A]),
            SECONDARY_UP,
            spec={"suspended": True},
            lease_holder=A,
            previous=protected_status(),
        ),
        (ConditionStatus.FALSE, "Fenced"),
        Phase.SUSPENDED,
        "Valid",
    ),
    (
        "the guest paused by hand while the standby is current: not Ready, still Protected",
        observe(
            node(
                A,
                domains=["db1"],
                states=PAUSED_DB1,
                entries=[entry("primary", ReplicationState.REPLICATING, total=120)],
            ),
            REPLICATING[1],
            lease_holder=A,
            previous=protected_status(),
        ),
        (ConditionStatus.FALSE, "DomainPaused"),
        Phase.PROTECTED,
        "Valid",
    ),
    (
        "the guest is paused and the agent's report of a fence has not arrived: DomainPaused",
        observe(
            node(
                A,
                domains=["db1"],
                states=PAUSED_DB1,
                entries=[entry("primary", ReplicationState.REPLICATING, peer=False, total=120)],
            ),
            node(
                B,
                domains=["db1--incoming"],
                entries=[
                    entry("secondary", ReplicationState.DEGRADED, peer=False, reason="PeerLost")
                ],
            ),
            lease_holder=A,
            previous=protected_status(),
        ),
        (ConditionStatus.FALSE, "DomainPaused"),
        Phase.DEGRADED,
        "Valid",
    ),
    (
        "the new active node still holds the paused incoming copy it is activating",
        observe(
            node(A, domains=["db1"], states=PAUSED_DB1, entries=[FENCED_A], age=20),
            node(
                B,
                domains=["db1--incoming"],
                states={"db1--incoming": "paused"},
                entries=[entry("secondary", ReplicationState.ACTIVATING, peer=False)],
            ),
            lease_holder=B,
            previous=protected_status(),
        ),
        (ConditionStatus.FALSE, "FailingOver"),
        Phase.DEGRADED,
        "Valid",
    ),
    (
        "the guest crashed: not Ready, DomainNotRunning",
        observe(
            node(A, domains=["db1"], states={"db1": "crashed"}),
            SECONDARY_UP,
            lease_holder=A,
        ),
        (ConditionStatus.FALSE, "DomainNotRunning"),
        Phase.PENDING,
        "Valid",
    ),
]


@pytest.mark.parametrize(
    ("story", "obs", "ready", "phase", "validated"),
    READY_TABLE,
    ids=[row[0][:70] for row in READY_TABLE],
)
def test_ready_says_whether_the_guest_serves_and_a_paused_guest_is_not_missing(
    story: str,
    obs: Observation,
    ready: tuple[ConditionStatus, str],
    phase: Phase,
    validated: str,
) -> None:
    out = reconcile(obs, TIMING)
    got = (condition(out, READY), out.status.phase, condition(out, VALIDATED)[1])
    assert got == (ready, phase, validated), story
    assert "DomainNotFound" not in reasons(out), story


# --- COLO asked of a node that cannot run it ------------------------------------------------

COLO = {"mode": "colo"}
NO_COLO = entry(
    "secondary",
    ReplicationState.FAILED,
    peer=False,
    reason="ColoUnsupported",
    message="xl migrate-receive --colo: COLO is not supported",
)


def colo_seeding() -> XenReplicationStatus:
    return reconcile(observe(*SEEDING, spec=COLO, lease_holder=A), TIMING).status


# What the two agents report, pass after pass, once the standby found it cannot run COLO:
# the primary's stream broke, the standby's agent may try again; its XenNode says so too,
# or not yet.
STANDBY_WITHOUT_COLO = [
    (
        "the standby's receiver failed; its XenNode says so in the same report",
        SEEDING[0],
        node(B, colo=False, entries=[NO_COLO]),
    ),
    (
        "the primary's stream broke: it lost its peer",
        node(
            A,
            domains=["db1"],
            entries=[
                entry("primary", ReplicationState.DEGRADED, peer=False, reason="LostConnection")
            ],
        ),
        node(B, colo=False, entries=[NO_COLO]),
    ),
    (
        "the primary fails its xl remus",
        node(A, domains=["db1"], entries=[entry("primary", ReplicationState.FAILED, peer=False)]),
        node(B, colo=False, entries=[NO_COLO]),
    ),
    (
        "the agents try again: both start, no link",
        node(A, domains=["db1"], entries=[entry("primary", ReplicationState.STARTING, peer=False)]),
        node(B, colo=False, entries=[entry("secondary", ReplicationState.STARTING, peer=False)]),
    ),
    (
        "the standby's report names the reason before its Xen facts do",
        node(A, domains=["db1"], entries=[entry("primary", ReplicationState.SEEDING, peer=False)]),
        node(B, colo=None, entries=[NO_COLO]),
    ),
]


@pytest.mark.parametrize(
    ("story", "a", "b"), STANDBY_WITHOUT_COLO, ids=[r[0][:70] for r in STANDBY_WITHOUT_COLO]
)
def test_a_standby_that_cannot_run_colo_is_one_stable_reason(
    story: str, a: NodeView, b: NodeView
) -> None:
    out = reconcile(observe(a, b, spec=COLO, lease_holder=A, previous=colo_seeding()), TIMING)
    assert out.status.phase is Phase.DEGRADED, story
    assert condition(out, PROTECTED) == (ConditionStatus.FALSE, "ColoUnsupported"), story
    assert condition(out, VALIDATED) == (ConditionStatus.FALSE, "ColoUnsupported"), story
    assert condition(out, READY) == (ConditionStatus.TRUE, "Running"), story


def test_colo_unsupported_on_the_standby_is_told_once_whatever_the_agents_report_next() -> None:
    previous = colo_seeding()
    told: list[str] = []
    statuses = []
    for i, (_story, a, b) in enumerate(STANDBY_WITHOUT_COLO):
        out = reconcile(
            observe(
                a,
                b,
                spec=COLO,
                lease_holder=A,
                previous=previous,
                now=NOW + timedelta(seconds=2 * (i + 1)),
            ),
            TIMING,
        )
        told += reasons(out)
        statuses.append(out.status)
        previous = out.status
    # The phase change is told, and the problem once; the reports that follow change nothing.
    assert told == ["Degraded", "ColoUnsupported"]
    assert all(s.message == statuses[0].message for s in statuses)
    assert "COLO" in (statuses[0].message or "")


def test_colo_unsupported_on_the_active_node_fails_the_replication_with_one_event() -> None:
    previous = colo_seeding()
    a_no_colo = entry(
        "primary",
        ReplicationState.FAILED,
        peer=False,
        reason="ColoUnsupported",
        message="xl remus -c: COLO is not supported",
    )
    passes = [
        (node(A, domains=["db1"], colo=False, entries=[a_no_colo]), SEEDING[1]),
        (
            node(A, domains=["db1"], colo=False, entries=[a_no_colo]),
            node(
                B,
                domains=["db1--incoming"],
                entries=[
                    entry("secondary", ReplicationState.DEGRADED, peer=False, reason="PeerEnded")
                ],
            ),
        ),
        (
            node(A, domains=["db1"], colo=None, entries=[a_no_colo]),
            node(B, entries=[entry("secondary", ReplicationState.STARTING, peer=False)]),
        ),
    ]
    told: list[str] = []
    for i, (a, b) in enumerate(passes):
        out = reconcile(
            observe(
                a,
                b,
                spec=COLO,
                lease_holder=A,
                previous=previous,
                now=NOW + timedelta(seconds=2 * (i + 1)),
            ),
            TIMING,
        )
        assert out.status.phase is Phase.FAILED
        assert condition(out, PROTECTED) == (ConditionStatus.FALSE, "ColoUnsupported")
        assert condition(out, VALIDATED) == (ConditionStatus.FALSE, "ColoUnsupported")
        told += reasons(out)
        previous = out.status
    assert told == ["ColoUnsupported"]


# --- the active's host Lease --------------------------------------------------------------
# Its agent pauses the guest once its renewals are older than D - margin and a standby could
# take over: once the operator has seen none for D (10 s here), the active's last report no
# longer says what runs there.


def renewed(view: NodeView, seconds_ago: float) -> NodeView:
    return replace(view, renewal_seen=NOW - timedelta(seconds=seconds_ago))


def ready_with_renewals(seconds_ago: float, *, a_report_age: float = 1.0) -> Outcome:
    a, b = REPLICATING
    a = replace(renewed(a, seconds_ago), heartbeat_seen=NOW - timedelta(seconds=a_report_age))
    spec = {"failover": {"leaseDurationSeconds": 10}}
    return reconcile(observe(a, b, lease_holder=A, spec=spec), TIMING)


def test_the_active_is_ready_while_its_host_lease_is_renewed() -> None:
    out = ready_with_renewals(9.5)
    assert condition(out, READY) == (ConditionStatus.TRUE, "Running")


def test_an_active_whose_host_lease_goes_unrenewed_for_d_is_not_called_running() -> None:
    out = ready_with_renewals(10.5)
    assert condition(out, READY) == (ConditionStatus.UNKNOWN, "NodeUnresponsive")
    ready = next(c for c in out.status.conditions if c.type == READY)
    assert f"has paused db1, unless {B} has taken over" in ready.message
    # The standby still holds its copy: protection is not what changed.
    assert out.status.phase is Phase.PROTECTED


def test_checkpoints_from_a_silent_agent_do_not_outweigh_an_unrenewed_host_lease() -> None:
    # Its report is stale too; before the host Lease was read, the standby's checkpoints
    # made the guest count as running (an agent restart looks like that).
    out = ready_with_renewals(20.0, a_report_age=30.0)
    assert condition(out, READY) == (ConditionStatus.UNKNOWN, "NodeUnresponsive")
