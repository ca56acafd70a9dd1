"""Which replicators a node runs (plan.py), one row per situation.

Node `me` = xen-a; the replication `u1` protects guest db1 between xen-a and xen-b.
"""

from __future__ import annotations

from typing import Any

import pytest
from xenha_agent.plan import (
    ClearIncoming,
    Launch,
    LocalReplicator,
    ReplicationView,
    Step,
    Stop,
    plan,
    replication_view,
)
from xenha_agent.replicators import ReplicatorState, Role

from xenha.api.models import Phase, parse_spec

ME, PEER = "xen-a", "xen-b"
S = ReplicatorState
SPEC = parse_spec({"domain": "db1", "mode": "remus", "primaryNode": ME, "secondaryNode": PEER})


def view(
    active: str | None = ME,
    standby: str | None = PEER,
    phase: Phase | None = Phase.PROTECTED,
    suspended: bool = False,
) -> ReplicationView:
    spec = SPEC.model_copy(update={"suspended": suspended})
    return ReplicationView(
        uid="u1",
        namespace="prod",
        name="db1",
        spec=spec,
        active_node=active,
        standby_node=standby,
        phase=phase,
    )


def rep(
    role: Role, state: ReplicatorState, *, peer: bool = True, settled: bool = True
) -> LocalReplicator:
    return LocalReplicator("u1", role, state, peer_connected=peer, settled=settled)


P, SEC = Role.PRIMARY, Role.SECONDARY
RUNNING = {"db1": "running"}

TABLE: list[tuple[str, Any, Any, dict[str, str], list[Step]]] = [
    # -- starting
    ("active here, guest running: start the primary", view(), None, RUNNING, [Launch("u1", P)]),
    ("active here, guest not here (yet)", view(), None, {}, []),
    ("active here, guest paused (fenced)", view(), None, {"db1": "paused"}, []),
    (
        "standby here, nothing of the guest here",
        view(PEER, ME),
        None,
        {},
        [Launch("u1", SEC)],
    ),
    ("standby here, but a copy still runs here (old active)", view(PEER, ME), None, RUNNING, []),
    (
        "standby here, a dead replicator's incoming copy is left",
        view(PEER, ME),
        None,
        {"db1--incoming": "paused"},
        [ClearIncoming("u1", "db1--incoming")],
    ),
    ("not part of it", view(PEER, "xen-c"), None, RUNNING, []),
    # -- no replication wanted
    ("suspended by the user", view(suspended=True), None, RUNNING, []),
    ("phase Suspended", view(phase=Phase.SUSPENDED), None, RUNNING, []),
    ("no standby (after a failover, before re-protection)", view(standby=None), None, RUNNING, []),
    # -- running replicators
    ("primary replicating, as wanted", view(), rep(P, S.REPLICATING), RUNNING, []),
    ("secondary replicating, as wanted", view(PEER, ME), rep(SEC, S.REPLICATING), {}, []),
    (
        "secondary waiting after losing the peer: fencing decides, not the plan",
        view(PEER, ME),
        rep(SEC, S.PEER_LOST, peer=False),
        {},
        [],
    ),
    (
        "replication deleted",
        None,
        rep(P, S.REPLICATING),
        RUNNING,
        [Stop("u1", "ReplicationDeleted")],
    ),
    (
        "suspended while replicating",
        view(suspended=True),
        rep(P, S.REPLICATING),
        RUNNING,
        [Stop("u1", "NotReplicating")],
    ),
    (
        "primary here but the operator now says standby",
        view(PEER, ME),
        rep(P, S.DEGRADED),
        RUNNING,
        [Stop("u1", "RoleChanged")],
    ),
    (
        "activated secondary, now the active node: retire it",
        view(ME, None),
        rep(SEC, S.ACTIVE, peer=False),
        RUNNING,
        [Stop("u1", "Activated")],
    ),
    ("activating: never interrupted", view(ME, None), rep(SEC, S.ACTIVATING, peer=False), {}, []),
    (
        "dropped copy: start over",
        view(PEER, ME),
        rep(SEC, S.DROPPED, peer=False),
        {},
        [Stop("u1", "Finished")],
    ),
    (
        "replicator failed: start over",
        view(),
        rep(P, S.FAILED, peer=False),
        RUNNING,
        [Stop("u1", "Finished")],
    ),
    (
        "stream lost, settled by a renewal after the loss: start over",
        view(),
        rep(P, S.DEGRADED, peer=False),
        RUNNING,
        [Stop("u1", "StreamLost")],
    ),
    (
        "stream lost, not settled: keep it (it self-fences if the agent dies)",
        view(),
        rep(P, S.DEGRADED, peer=False, settled=False),
        RUNNING,
        [],
    ),
]


@pytest.mark.parametrize(
    ("xr", "local", "domains", "steps"),
    [pytest.param(x, lo, d, s, id=name) for name, x, lo, d, s in TABLE],
)
def test_plan(
    xr: ReplicationView | None,
    local: LocalReplicator | None,
    domains: dict[str, str],
    steps: list[Step],
) -> None:
    got = plan(
        me=ME,
        replications={} if xr is None else {"u1": xr},
        replicators={} if local is None else {"u1": local},
        domains=domains,
    )
    assert got == steps


def test_roles_come_from_the_status_not_the_spec() -> None:
    after_failover = view(active=PEER, standby=ME)
    assert after_failover.role_of(ME) is Role.SECONDARY
    assert after_failover.role_of(PEER) is Role.PRIMARY
    assert view(active=None, standby=None).role_of(ME) is None
    # Before the operator wrote a status, the spec's nodes take part (fencing watches).
    assert view(active=None, standby=None).takes_part(ME)


def test_replication_view_reads_the_object() -> None:
    obj = {
        "apiVersion": "xenha.io/v1alpha1",
        "kind": "XenReplication",
        "metadata": {"name": "db1", "namespace": "prod", "uid": "u1"},
        "spec": {"domain": "db1", "mode": "colo", "primaryNode": ME, "secondaryNode": PEER},
        "status": {
            "activeNode": ME,
            "standbyNode": PEER,
            "phase": "Protected",
            "switchover": {"target": PEER, "state": "InProgress"},
        },
    }
    got = replication_view(obj)
    assert got is not None
    assert (got.uid, got.namespace, got.name, got.domain) == ("u1", "prod", "db1", "db1")
    assert got.lease_duration == 2.0
    assert got.switchover_target == PEER
    assert got.replicating


def test_an_invalid_spec_is_ignored_not_fatal() -> None:
    obj = {
        "metadata": {"name": "bad", "namespace": "prod", "uid": "u2"},
        "spec": {"domain": "db1", "mode": "colo", "primaryNode": ME, "secondaryNode": ME},
    }
    assert replication_view(obj) is None
