"""Which replicators a node runs (plan.py), one row per situation.

Node `me` = xen-a; the replication `u1` protects guest db1 between xen-a and xen-b.
"""

from __future__ import annotations

from typing import Any

import pytest
from xenha_agent.plan import (
    ClearIncoming,
    Guard,
    Launch,
    LocalReplicator,
    ReplicationView,
    Step,
    Stop,
    Unpause,
    plan,
    replication_view,
)
from xenha_agent.replicators import ReplicatorState, Role

from xenha.api.models import Phase, parse_spec

ME, PEER = "xen-a", "xen-b"
S = ReplicatorState


def view(
    active: str | None = ME,
    standby: str | None = PEER,
    phase: Phase | None = Phase.PROTECTED,
    suspended: bool = False,
    mode: str = "remus",
) -> ReplicationView:
    spec = parse_spec(
        {
            "domain": "db1",
            "mode": mode,
            "primaryNode": ME,
            "secondaryNode": PEER,
            "suspended": suspended,
        }
    )
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
    role: Role,
    state: ReplicatorState,
    *,
    peer: bool = True,
    settled: bool = True,
    reason: str | None = None,
) -> LocalReplicator:
    return LocalReplicator("u1", role, state, peer_connected=peer, settled=settled, reason=reason)


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


# -- a primary whose guest is paused, with no replicator ---------------------------------------
# Safe to run: the fencing Lease is ours and names no standby, renewals are fresh.
SAFE = Guard(holder=ME, standby=None, renewal_fresh=True, recorded=True)
PAUSED = {"db1": "paused"}

PAUSED_TABLE: list[tuple[str, Any, Any, dict[str, str], Guard | None, list[Step]]] = [
    (
        "paused, not by our fence, Lease ours, no standby, renewals fresh: unpause it",
        view(),
        None,
        PAUSED,
        SAFE,
        [Unpause("u1", "db1")],
    ),
    ("once it runs again: replicate it", view(), None, RUNNING, SAFE, [Launch("u1", P)]),
    (
        "the fencing Lease names another node: never (fencing destroys this copy)",
        view(),
        None,
        PAUSED,
        Guard(holder=PEER, renewal_fresh=True, recorded=True),
        [],
    ),
    (
        "the fencing Lease not read yet: wait",
        view(),
        None,
        PAUSED,
        Guard(holder=None, renewal_fresh=True, recorded=True),
        [],
    ),
    (
        "a standby is still designated (it could take over): wait for the revoke",
        view(),
        None,
        PAUSED,
        Guard(holder=ME, standby=PEER, renewal_fresh=True, recorded=True),
        [],
    ),
    (
        "a designation of ours may still land: wait",
        view(),
        None,
        PAUSED,
        Guard(holder=ME, renewal_fresh=True, recorded=True, designation_in_doubt=True),
        [],
    ),
    (
        "renewals stale (the Lease as seen may be old news): wait",
        view(),
        None,
        PAUSED,
        Guard(holder=ME, renewal_fresh=False, recorded=True),
        [],
    ),
    (
        "paused by our own fence: fencing lifts it, one unpause for one pause",
        view(),
        None,
        PAUSED,
        Guard(holder=ME, renewal_fresh=True, recorded=True, fenced=True),
        [],
    ),
    (
        "paused before this node ever protected it: its owner's pause",
        view(),
        None,
        PAUSED,
        Guard(holder=ME, renewal_fresh=True, recorded=False),
        [],
    ),
    ("no guard at all: nothing is unpaused", view(), None, PAUSED, None, []),
    (
        "a replicator runs (fenced): fencing's business, not the plan's",
        view(),
        rep(P, S.FENCED, peer=False),
        PAUSED,
        SAFE,
        [],
    ),
    (
        "standby here, the old active's copy paused here: never unpaused",
        view(PEER, ME),
        None,
        PAUSED,
        SAFE,
        [],
    ),
    ("suspended replication: left alone", view(suspended=True), None, PAUSED, SAFE, []),
    ("shut down, not paused: nothing to unpause", view(), None, {"db1": "shutdown"}, SAFE, []),
]


def test_a_paused_primary_whose_colo_was_refused_still_runs_unprotected() -> None:
    got = plan(
        me=ME,
        replications={"u1": view(mode="colo")},
        replicators={},
        domains=PAUSED,
        guards={"u1": SAFE},
        colo_supported=False,
        colo_refused={"u1"},
    )
    assert got == [Unpause("u1", "db1")]
    running = plan(
        me=ME,
        replications={"u1": view(mode="colo")},
        replicators={},
        domains=RUNNING,
        guards={"u1": SAFE},
        colo_supported=False,
        colo_refused={"u1"},
    )
    assert running == []


@pytest.mark.parametrize(
    ("xr", "local", "domains", "guard", "steps"),
    [pytest.param(x, lo, d, g, s, id=name) for name, x, lo, d, g, s in PAUSED_TABLE],
)
def test_plan_for_a_paused_primary(
    xr: ReplicationView,
    local: LocalReplicator | None,
    domains: dict[str, str],
    guard: Guard | None,
    steps: list[Step],
) -> None:
    got = plan(
        me=ME,
        replications={"u1": xr},
        replicators={} if local is None else {"u1": local},
        domains=domains,
        guards={} if guard is None else {"u1": guard},
    )
    assert got == steps


# -- COLO that xl refused, and failures that say why -----------------------------------------
COLO_TABLE: list[tuple[str, Any, Any, dict[str, str], bool | None, set[str], list[Step]]] = [
    (
        "COLO, this host can: start the primary",
        view(mode="colo"),
        None,
        RUNNING,
        True,
        set(),
        [Launch("u1", P)],
    ),
    (
        "COLO, this host's libxl lacks it: no primary",
        view(mode="colo"),
        None,
        RUNNING,
        False,
        set(),
        [],
    ),
    (
        "COLO, this host's libxl lacks it: no secondary either",
        view(PEER, ME, mode="colo"),
        None,
        {},
        False,
        set(),
        [],
    ),
    (
        "COLO refused for this guest (not HVM): not retried",
        view(PEER, ME, mode="colo"),
        None,
        {},
        True,
        {"u1"},
        [],
    ),
    (
        "COLO refused, a dead replicator's incoming copy is still cleared",
        view(PEER, ME, mode="colo"),
        None,
        {"db1--incoming": "paused"},
        False,
        {"u1"},
        [ClearIncoming("u1", "db1--incoming")],
    ),
    (
        "refused once, the mode is remus now: replicate",
        view(),
        None,
        RUNNING,
        False,
        {"u1"},
        [Launch("u1", P)],
    ),
    (
        "the replicator that met the refusal is stopped, with the reason",
        view(mode="colo"),
        rep(P, S.FAILED, peer=False, reason="ColoUnsupported"),
        RUNNING,
        False,
        {"u1"},
        [Stop("u1", "ColoUnsupported")],
    ),
    (
        "a seeding that failed: stopped with the reason (and started anew)",
        view(PEER, ME),
        rep(SEC, S.FAILED, peer=False, reason="SeedingFailed"),
        {},
        True,
        set(),
        [Stop("u1", "SeedingFailed")],
    ),
    (
        "any other failure: Finished",
        view(),
        rep(P, S.FAILED, peer=False, reason="XlExited"),
        RUNNING,
        True,
        set(),
        [Stop("u1", "Finished")],
    ),
]


@pytest.mark.parametrize(
    ("xr", "local", "domains", "colo", "refused", "steps"),
    [pytest.param(x, lo, d, c, r, s, id=name) for name, x, lo, d, c, r, s in COLO_TABLE],
)
def test_plan_with_colo_refused(
    xr: ReplicationView,
    local: LocalReplicator | None,
    domains: dict[str, str],
    colo: bool | None,
    refused: set[str],
    steps: list[Step],
) -> None:
    got = plan(
        me=ME,
        replications={"u1": xr},
        replicators={} if local is None else {"u1": local},
        domains=domains,
        colo_supported=colo,
        colo_refused=refused,
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
