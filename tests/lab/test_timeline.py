"""The failover timeline and the client's view, from hand-written sources."""

from __future__ import annotations

from typing import Any

from xenha.lab.timeline import Observation, client_view, failover_timeline, parse_time

U = "5f1c0d6e-0000-4000-8000-000000000001"
T0 = 1_800_000_000.0  # the power cut


def ev(kind: str, at_ms: float, **fields: Any) -> dict[str, Any]:
    return {"kind": kind, "wall": T0 + at_ms / 1000, "uuid": U, **fields}


def iso(at_ms: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(T0 + at_ms / 1000, UTC).isoformat().replace("+00:00", "Z")


def timeline(**sources: Any) -> list[tuple[int, str, str]]:
    entries = failover_timeline(
        fault_at=T0, fault="power cut", old="xen-a", new="xen-b", uuid=U, **sources
    )
    return [(round((e.at - T0) * 1000), e.what, e.source) for e in entries]


class TestFailoverTimeline:
    def test_orders_every_milestone_by_when_it_happened_relative_to_the_fault(self) -> None:
        got = timeline(
            ledger=[
                ev("client_reply", -50, client="c1", value=41),
                ev("copy", 2450, host="xen-b", state="active", domid=3),
                ev("restore", 2440, host="xen-b", number=12, counter=41),
                ev("reply", 2470, host="xen-b", value=42),
                ev("client_reply", 2480, client="c1", value=42),
            ],
            lease={"spec": {"holderIdentity": "xen-b", "acquireTime": iso(2400)}},
            status={
                "lastFailover": {
                    "time": iso(2430),
                    "from": "xen-a",
                    "to": "xen-b",
                    "durationMs": 1830,
                },
                "protectedSince": iso(9000),
            },
        )
        assert got == [
            (0, "power cut", "lab"),
            (600, "xen-b detects the loss of xen-a", "status"),
            (2400, "xen-b acquires the fencing Lease", "lease"),
            (2430, "xen-b's agent activates its copy", "status"),
            (2440, "xen-b restores checkpoint 12 (counter 41)", "ledger"),
            (2450, "the copy on xen-b runs and answers", "ledger"),
            (2470, "first answer from xen-b: 42", "ledger"),
            (2480, "the client gets an answer from xen-b: 42", "client"),
            (9000, "Protected again (xen-b -> xen-a)", "status"),
        ]

    def test_phases_come_from_watching_the_status(self) -> None:
        got = timeline(
            ledger=[],
            observations=[
                Observation(T0 - 0.1, "Protected", "xen-a", "xen-b"),
                Observation(T0 + 1.0, "Degraded", "xen-a", "xen-b"),
                Observation(T0 + 2.5, "FailingOver", "xen-b", "xen-a"),
                Observation(T0 + 5.0, "Seeding", "xen-b", "xen-a"),
                Observation(T0 + 8.0, "Protected", "xen-b", "xen-a"),
            ],
        )
        assert [what for _, what, _ in got] == [
            "power cut",
            "phase Degraded",
            "phase FailingOver",
            "status.activeNode = xen-b",
            "phase Seeding",
            "re-protection starts (standby xen-a)",
            "phase Protected",
            "Protected again (standby xen-a)",
        ]

    def test_the_operators_protected_since_replaces_the_watched_moment(self) -> None:
        got = timeline(
            ledger=[],
            observations=[
                Observation(T0 + 2.5, "Seeding", "xen-b", "xen-a"),
                Observation(T0 + 8.1, "Protected", "xen-b", "xen-a"),
            ],
            status={"protectedSince": iso(8000)},
        )
        assert [(ms, what) for ms, what, _ in got if what.startswith("Protected again")] == [
            (8000, "Protected again (xen-b -> xen-a)")
        ]

    def test_ignores_what_happened_before_the_fault_or_to_other_guests(self) -> None:
        got = timeline(
            ledger=[
                ev("copy", -5000, host="xen-b", state="active", domid=1),
                {**ev("reply", 100, host="xen-b", value=7), "uuid": "another-guest"},
            ],
            lease={"spec": {"holderIdentity": "xen-a", "acquireTime": iso(-60000)}},
        )
        assert got == [(0, "power cut", "lab")]

    def test_a_switchover_shows_the_old_copy_stopping_before_the_new_one_runs(self) -> None:
        got = timeline(
            ledger=[
                ev("copy", 300, host="xen-a", state="passive", domid=1),
                ev("copy", 500, host="xen-b", state="active", domid=4),
                # The old node's new standby copy, later: not the old copy stopping.
                ev("copy", 5000, host="xen-a", state="passive", domid=2),
            ]
        )
        stops = [(ms, what) for ms, what, _ in got if "stops" in what]
        assert stops == [(300, "the copy on xen-a stops answering")]

    def test_events_with_whole_second_times_are_kept_from_the_faults_second(self) -> None:
        got = timeline(
            ledger=[],
            events=[
                {
                    "reason": "FailedOver",
                    "message": "demo1 failed over",
                    "lastTimestamp": iso(3000),
                },
                {"reason": "Protected", "message": "old news", "lastTimestamp": iso(-5000)},
            ],
        )
        assert [what for _, what, _ in got] == ["power cut", "Event FailedOver: demo1 failed over"]

    def test_events_stamped_in_whole_seconds_are_placed_when_first_seen(self) -> None:
        activated = {
            "metadata": {"uid": "e1"},
            "reason": "FailoverActivated",
            "message": "activated",
            "lastTimestamp": iso(1000).replace(".000000", ""),
        }
        got = timeline(ledger=[], events=[activated], events_seen={"e1": T0 + 1.8})
        assert (1800, "Event FailoverActivated: activated", "event (seen)") in got


class TestClientView:
    def test_counts_answers_and_the_longest_wait(self) -> None:
        view = client_view(
            [
                ev("client_reply", -40, client="c1", value=10),
                ev("client_reply", -20, client="c1", value=11),
                ev("client_reply", 2480, client="c1", value=12),
                ev("client_reply", 2500, client="other", value=13),
            ],
            uuid=U,
            client="c1",
            fault_at=T0,
            requests=90,
        )
        assert (view.requests, view.answers, view.values) == (90, 3, [10, 11, 12])
        assert (view.last_before, view.first_after) == (11, 12)
        assert view.longest_gap_ms == 2500
        assert view.clean

    def test_a_counter_going_backwards_or_repeating_is_a_violation(self) -> None:
        view = client_view(
            [
                ev("client_reply", -40, client="c1", value=10),
                ev("client_reply", 100, client="c1", value=10),
                ev("client_reply", 200, client="c1", value=9),
            ],
            uuid=U,
            client="c1",
            fault_at=T0,
        )
        assert view.violations == [
            "the counter went from 10 to 10",
            "the counter went from 10 to 9",
        ]


def test_parse_time_reads_rfc3339_with_and_without_fractions() -> None:
    assert parse_time("2027-01-15T08:00:00Z") == 1_800_000_000.0
    assert parse_time("2027-01-15T08:00:00.250000Z") == 1_800_000_000.25
    assert parse_time(None) is None
    assert parse_time("not a time") is None
