"""Planned switchover requests (operator/xenha_operator/switchover.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from xenha_operator.switchover import SwitchoverInputs, next_switchover, requested_target

from xenha.api import Switchover, SwitchoverState

NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
A, B, C = "xen-a", "xen-b", "xen-c"
REQ, RUN, OK, FAIL = (
    SwitchoverState.REQUESTED,
    SwitchoverState.IN_PROGRESS,
    SwitchoverState.SUCCEEDED,
    SwitchoverState.FAILED,
)


def record(target: str, state: SwitchoverState, ago: float = 0) -> Switchover:
    return Switchover(target=target, state=state, time=NOW - timedelta(seconds=ago))


def given(**kw: Any) -> SwitchoverInputs:
    base: dict[str, Any] = {
        "request": None,
        "previous": None,
        "active": A,
        "standby": B,
        "active_changed": False,
        "protected": True,
        "blocked_by": None,
        "now": NOW,
        "timeout": timedelta(seconds=60),
    }
    base.update(kw)
    return SwitchoverInputs(**base)


# (story, inputs, expected (target, state) or None)
TABLE = [
    ("no annotation, nothing recorded", given(), None),
    ("a request while protected starts at once", given(request=B), (B, RUN)),
    ("a request while seeding waits", given(request=B, protected=False), (B, REQ)),
    ("the waiting request starts once protected", given(previous=record(B, REQ)), (B, RUN)),
    (
        "the waiting request gives up after the timeout",
        given(previous=record(B, REQ, ago=61), protected=False),
        (B, FAIL),
    ),
    ("in progress, the Lease has not moved yet", given(previous=record(B, RUN)), (B, RUN)),
    (
        "in progress, the Lease names the target: done",
        given(previous=record(B, RUN), active=B, standby=None, active_changed=True),
        (B, OK),
    ),
    (
        "in progress too long",
        given(previous=record(B, RUN, ago=61)),
        (B, FAIL),
    ),
    (
        "a failover moved the guest elsewhere meanwhile",
        given(request=C, previous=record(C, RUN), standby=C, active=B, active_changed=True),
        (C, FAIL),
    ),
    ("the target is not the standby", given(request=C), (C, FAIL)),
    ("the target is the active node already", given(request=A), (A, OK)),
    ("suspended", given(request=B, blocked_by="replication is suspended"), (B, FAIL)),
    (
        "a handled request whose annotation lingers is not repeated",
        given(request=B, previous=record(B, OK, ago=3600), active=B, standby=A),
        (B, OK),
    ),
    (
        "a failed request is not retried by itself",
        given(request=C, previous=record(C, FAIL, ago=10)),
        (C, FAIL),
    ),
    (
        "a different target is a new request",
        given(request=A, previous=record(B, OK, ago=3600), active=B, standby=A),
        (A, RUN),
    ),
]


@pytest.mark.parametrize(("story", "inputs", "expected"), TABLE, ids=[r[0] for r in TABLE])
def test_switchover(
    story: str, inputs: SwitchoverInputs, expected: tuple[str, SwitchoverState] | None
) -> None:
    got = next_switchover(inputs)
    assert (None if got is None else (got.target, got.state)) == expected, story


def test_a_state_change_is_stamped_and_a_steady_state_is_left_alone() -> None:
    started = next_switchover(given(request=B))
    assert started is not None
    assert started.time == NOW
    assert started.message == "handing over from xen-a to xen-b"
    later = given(previous=started, now=NOW + timedelta(seconds=5))
    assert next_switchover(later) is started


@pytest.mark.parametrize(
    ("annotations", "target"),
    [
        (None, None),
        ({}, None),
        ({"xenha.io/switchover-to": ""}, None),
        ({"xenha.io/switchover-to": " xen-b "}, "xen-b"),
        ({"other": "x"}, None),
    ],
)
def test_the_request_comes_from_the_annotation(
    annotations: dict[str, str] | None, target: str | None
) -> None:
    assert requested_target(annotations) == target
