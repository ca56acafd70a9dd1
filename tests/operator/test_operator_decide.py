"""Role assignment: who is active, who is standby (operator/xenha_operator/decide.py)."""

from __future__ import annotations

import pytest
from xenha_operator.decide import RoleInputs, Roles, candidates, decide_roles

A, B, C = "xen-a", "xen-b", "xen-c"
BOTH = frozenset({A, B})


def inputs(**kw: object) -> RoleInputs:
    base: dict[str, object] = {"primary_node": A, "secondary_node": B}
    base.update(kw)
    return RoleInputs(**base)  # type: ignore[arg-type]


# (story, inputs, expected active, expected standby)
CASES = [
    (
        "new replication, no Lease yet: the spec's primary is active, a usable secondary stands by",
        inputs(usable=frozenset({B}), responsive=BOTH),
        A,
        B,
    ),
    (
        "new replication whose secondary has no agent yet: no standby until it is usable",
        inputs(responsive=frozenset({A})),
        A,
        None,
    ),
    (
        "steady state: the Lease names the primary, the standby stays",
        inputs(lease_holder=A, previous_active=A, previous_standby=B, responsive=BOTH),
        A,
        B,
    ),
    (
        "the standby's agent restarts (no fresh report) and no one else could stand by: it stays",
        inputs(lease_holder=A, previous_active=A, previous_standby=B, responsive=frozenset({A})),
        A,
        B,
    ),
    (
        "failover: the Lease names the old standby, which becomes active; the dead primary is "
        "not usable, so nobody stands by",
        inputs(lease_holder=B, previous_active=A, previous_standby=B, responsive=frozenset({B})),
        B,
        None,
    ),
    (
        "re-protection: the old primary reports again and is usable: it becomes the standby",
        inputs(
            lease_holder=B,
            previous_active=B,
            previous_standby=None,
            responsive=BOTH,
            usable=frozenset({A}),
        ),
        B,
        A,
    ),
    (
        "re-protection onto a new spec.secondaryNode after a failover to the old secondary",
        inputs(
            secondary_node=C,
            lease_holder=B,
            previous_active=B,
            responsive=frozenset({B, C}),
            usable=frozenset({C}),
        ),
        B,
        C,
    ),
    (
        "a new spec.secondaryNode is preferred over the old primary when both are usable",
        inputs(
            secondary_node=C,
            lease_holder=B,
            previous_active=B,
            responsive=frozenset({A, B, C}),
            usable=frozenset({A, C}),
        ),
        B,
        C,
    ),
    (
        "an unresponsive standby gives way when another candidate is usable",
        inputs(
            secondary_node=C,
            lease_holder=B,
            previous_active=B,
            previous_standby=A,
            responsive=frozenset({B, C}),
            usable=frozenset({C}),
        ),
        B,
        C,
    ),
    (
        "a standby that left the spec is replaced",
        inputs(
            secondary_node=C,
            lease_holder=A,
            previous_active=A,
            previous_standby=B,
            responsive=frozenset({A, B, C}),
            usable=frozenset({B, C}),
        ),
        A,
        C,
    ),
    (
        "switchover completed: the Lease names the target, the old active is the way back",
        inputs(
            lease_holder=B,
            previous_active=A,
            previous_standby=B,
            responsive=BOTH,
            usable=frozenset({A}),
        ),
        B,
        A,
    ),
    (
        "suspended: no standby, the active keeps running",
        inputs(suspended=True, lease_holder=A, previous_active=A, previous_standby=B, usable=BOTH),
        A,
        None,
    ),
    (
        "being deleted: no standby",
        inputs(deleting=True, lease_holder=A, previous_active=A, previous_standby=B, usable=BOTH),
        A,
        None,
    ),
    (
        "the Lease vanished (deleted by hand): the last known active stays active",
        inputs(previous_active=B, previous_standby=A, responsive=BOTH),
        B,
        A,
    ),
]


@pytest.mark.parametrize(
    ("story", "given", "active", "standby"), CASES, ids=[c[0][:60] for c in CASES]
)
def test_roles(story: str, given: RoleInputs, active: str, standby: str | None) -> None:
    roles = decide_roles(given)
    assert (roles.active, roles.standby) == (active, standby), story


def test_a_move_of_the_active_node_is_reported_once_per_observation() -> None:
    moved = decide_roles(inputs(lease_holder=B, previous_active=A, previous_standby=B))
    assert moved == Roles(active=B, standby=None, active_changed=True, standby_changed=False)
    # The next pass starts from the status that recorded the move: nothing moves again.
    again = decide_roles(inputs(lease_holder=B, previous_active=B))
    assert not again.active_changed


def test_candidates_prefer_the_secondary_and_never_name_the_active_node() -> None:
    assert candidates(A, B, A) == [B]
    assert candidates(A, B, B) == [A]
    assert candidates(A, C, B) == [C, A]
    assert candidates(A, B, C) == [B, A]
