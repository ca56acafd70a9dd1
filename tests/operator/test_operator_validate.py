"""Checks of a replication against the cluster (operator/xenha_operator/validate.py)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from xenha_operator.validate import (
    NodeView,
    OtherReplication,
    Reason,
    Subject,
    validate,
)

from xenha.api import (
    DomainInfo,
    NodeReplication,
    ReplicationRole,
    ReplicationState,
    XenInfo,
    XenNodeStatus,
    parse_spec,
)

NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
STALE = timedelta(seconds=15)
A, B, C = "xen-a", "xen-b", "xen-c"


def node(
    name: str,
    *,
    domains: Sequence[tuple[str, int]] = (),
    free: int | None = 2048,
    colo: bool | None = None,
    age: float | None = 1,
    state: ReplicationState | None = None,
) -> NodeView:
    """`state`: the node reports replication prod/db1 in that state."""
    entries = []
    if state is not None:
        entries.append(
            NodeReplication(
                namespace="prod",
                name="db1",
                uid="me",
                role=ReplicationRole.SECONDARY,
                state=state,
            )
        )
    status = XenNodeStatus(
        xen=XenInfo(free_memory_mib=free, colo_supported=colo),
        domains=[DomainInfo(name=d, state="running", memory_mib=m) for d, m in domains],
        replications=entries,
    )
    return NodeView(name, status, None if age is None else NOW - timedelta(seconds=age))


def subject(**kw: Any) -> Subject:
    spec = {"domain": "db1", "mode": "remus", "primaryNode": A, "secondaryNode": B}
    spec.update(kw.pop("spec", {}))
    base: dict[str, Any] = {
        "key": "prod/db1",
        "uid": "me",
        "created": NOW - timedelta(hours=1),
        "spec": parse_spec(spec),
        "active": A,
        "standby": None,
        "candidates": [B],
    }
    base.update(kw)
    return Subject(**base)


def run(subj: Subject, *nodes: NodeView, others: Sequence[OtherReplication] = ()) -> Any:
    return validate(subj, {n.name: n for n in nodes}, others, now=NOW, stale_after=STALE)


PRIMARY = node(A, domains=[("db1", 512)])

# (story, subject, nodes, problem reasons of the replication, standby problem reasons, usable)
TABLE = [
    ("all well", subject(), [PRIMARY, node(B)], [], {B: []}, {B}),
    (
        "no XenNode for the secondary: it cannot stand by",
        subject(),
        [PRIMARY],
        [],
        {B: [Reason.NODE_NOT_FOUND]},
        set(),
    ),
    (
        "the secondary's agent is silent",
        subject(),
        [PRIMARY, node(B, age=16)],
        [],
        {B: [Reason.NODE_UNRESPONSIVE]},
        set(),
    ),
    (
        "a node never seen changing is silent",
        subject(),
        [PRIMARY, node(B, age=None)],
        [],
        {B: [Reason.NODE_UNRESPONSIVE]},
        set(),
    ),
    (
        "the domain is not on the active node",
        subject(),
        [node(A), node(B)],
        [Reason.DOMAIN_NOT_FOUND],
        {B: []},
        {B},
    ),
    (
        "no room for the guest on the secondary",
        subject(),
        [PRIMARY, node(B, free=511)],
        [],
        {B: [Reason.INSUFFICIENT_MEMORY]},
        set(),
    ),
    (
        "a secondary already receiving has its memory allocated",
        subject(standby=B),
        [PRIMARY, node(B, free=10, domains=[("db1--incoming", 512)])],
        [],
        {B: []},
        {B},
    ),
    (
        "COLO on a secondary that cannot",
        subject(spec={"mode": "colo"}),
        [PRIMARY, node(B, colo=False)],
        [],
        {B: [Reason.COLO_UNSUPPORTED]},
        set(),
    ),
    (
        "COLO on an active node that cannot: blocking",
        subject(spec={"mode": "colo"}),
        [node(A, domains=[("db1", 512)], colo=False), node(B)],
        [Reason.COLO_UNSUPPORTED],
        {B: []},
        {B},
    ),
    (
        "unknown COLO support is no objection",
        subject(spec={"mode": "colo"}),
        [PRIMARY, node(B, colo=None)],
        [],
        {B: []},
        {B},
    ),
    (
        "the old active still holds its fenced copy",
        subject(active=B, candidates=[A]),
        [node(A, domains=[("db1", 512)]), node(B, domains=[("db1", 512)])],
        [],
        {A: [Reason.COPY_STILL_PRESENT]},
        set(),
    ),
    (
        "the Lease moved to the standby, whose copy still carries its incoming name",
        subject(active=B, candidates=[A], lease_holder=B),
        [node(A), node(B, domains=[("db1--incoming", 512)])],
        [],
        {A: []},
        {A},
    ),
    (
        "the Lease is not known, but the active node's agent says it activates its copy",
        subject(active=B, candidates=[A]),
        [node(A), node(B, domains=[("db1--incoming", 512)], state=ReplicationState.ACTIVATING)],
        [],
        {A: []},
        {A},
    ),
    (
        "an incoming copy nobody activates is no guest",
        subject(active=B, candidates=[A]),
        [node(A), node(B, domains=[("db1--incoming", 512)], state=ReplicationState.DEGRADED)],
        [Reason.DOMAIN_NOT_FOUND],
        {A: []},
        {A},
    ),
    (
        "the Lease holder has neither the guest nor a copy of it",
        subject(lease_holder=A),
        [node(A), node(B, domains=[("db1--incoming", 512)])],
        [Reason.DOMAIN_NOT_FOUND],
        {B: []},
        {B},
    ),
    (
        "the old active destroyed its copy after the hand-over; the Lease watch lags",
        subject(lease_holder=A),
        [node(A), node(B, domains=[("db1", 512)], state=ReplicationState.ACTIVE)],
        [],
        {B: [Reason.COPY_STILL_PRESENT]},
        set(),
    ),
]


@pytest.mark.parametrize(
    ("story", "subj", "nodes", "problems", "standby", "usable"),
    TABLE,
    ids=[row[0] for row in TABLE],
)
def test_validation(
    story: str,
    subj: Subject,
    nodes: list[NodeView],
    problems: list[Reason],
    standby: dict[str, list[Reason]],
    usable: set[str],
) -> None:
    found = run(subj, *nodes)
    assert [p.reason for p in found.problems] == problems, story
    assert {n: [p.reason for p in ps] for n, ps in found.standby_problems.items()} == standby
    assert found.usable == usable


def other(key: str, nodes: set[str], created: datetime, domain: str = "db1") -> OtherReplication:
    return OtherReplication(
        key=key, uid=key, domain=domain, nodes=frozenset(nodes), created=created
    )


def test_the_newer_of_two_replications_of_one_domain_on_a_shared_node_yields() -> None:
    older = other("prod/old", {B, C}, NOW - timedelta(days=1))
    found = run(subject(), PRIMARY, node(B), others=[older])
    assert [p.reason for p in found.problems] == [Reason.CONFLICTING_REPLICATION]
    assert found.blocking is not None
    assert "prod/old" in found.blocking.message
    newer = other("prod/new", {B, C}, NOW)
    assert run(subject(), PRIMARY, node(B), others=[newer]).problems == []


@pytest.mark.parametrize(
    ("story", "conflicting"),
    [
        ("another domain name on the same nodes", other("p/x", {A, B}, NOW, domain="web")),
        ("the same domain name on other nodes", other("p/y", {C}, NOW - timedelta(days=1))),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_no_conflict(story: str, conflicting: OtherReplication) -> None:
    assert run(subject(), PRIMARY, node(B), others=[conflicting]).problems == [], story
