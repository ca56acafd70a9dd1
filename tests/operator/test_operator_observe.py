"""From API objects to observations; Event names; settings; metrics."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from xenha_operator.events import event_body, transition_key
from xenha_operator.metrics import OperatorMetrics
from xenha_operator.observe import (
    HeartbeatTracker,
    LeaseRecord,
    lease_record,
    observation,
    replication_record,
)
from xenha_operator.settings import OperatorSettings, parse_args
from xenha_operator.status import Transition

from xenha.api import Phase

NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
UID = "6f1c0000-0000-0000-0000-000000000001"


def xr(**status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "xenha.io/v1alpha1",
        "kind": "XenReplication",
        "metadata": {
            "namespace": "prod",
            "name": "db1",
            "uid": UID,
            "generation": 3,
            "resourceVersion": "42",
            "creationTimestamp": "2026-11-26T05:00:00Z",
            "annotations": {"xenha.io/switchover-to": "xen-b"},
        },
        "spec": {
            "domain": "db1",
            "mode": "remus",
            "primaryNode": "xen-a",
            "secondaryNode": "xen-b",
        },
        "status": status,
    }


class TestHeartbeats:
    def test_a_change_is_seen_when_it_is_observed(self) -> None:
        tracker = HeartbeatTracker()
        tracker.observe("xen-a", "2026-11-26T05:59:59Z", NOW)
        tracker.observe("xen-a", "2026-11-26T06:00:09Z", NOW + timedelta(seconds=10))
        assert tracker.seen("xen-a") == NOW + timedelta(seconds=10)

    def test_the_same_heartbeat_again_is_no_sign_of_life(self) -> None:
        tracker = HeartbeatTracker()
        tracker.observe("xen-a", "2026-11-26T05:59:59Z", NOW)
        tracker.observe("xen-a", "2026-11-26T05:59:59Z", NOW + timedelta(minutes=5))
        assert tracker.seen("xen-a") == datetime(2026, 11, 26, 5, 59, 59, tzinfo=UTC)

    def test_on_first_sight_an_old_report_counts_from_its_own_time(self) -> None:
        tracker = HeartbeatTracker()
        tracker.observe("xen-a", "2026-11-26T04:00:00Z", NOW)
        assert tracker.seen("xen-a") == datetime(2026, 11, 26, 4, 0, tzinfo=UTC)

    def test_on_first_sight_a_clock_ahead_of_ours_counts_from_now(self) -> None:
        tracker = HeartbeatTracker()
        tracker.observe("xen-a", "2026-11-26T07:00:00Z", NOW)
        assert tracker.seen("xen-a") == NOW
        tracker.observe("xen-b", None, NOW)
        assert tracker.seen("xen-b") == NOW


def test_an_observation_is_built_from_the_indexes() -> None:
    tracker = HeartbeatTracker()
    tracker.observe("xen-a", "2026-11-26T05:59:59Z", NOW)
    other = replication_record({**xr(), "metadata": {**xr()["metadata"], "uid": "other"}})
    assert other is not None
    obs = observation(
        xr(activeNode="xen-a", phase="Protected", kopf={"progress": {}}),
        xennodes={"xen-a": [{"heartbeatTime": "2026-11-26T05:59:59Z", "domains": []}]},
        leases={("prod", "db1-fence"): [LeaseRecord(holder="xen-a", owners=frozenset({UID}))]},
        replications=[other, replication_record(xr())],  # type: ignore[list-item]
        heartbeats=tracker,
        now=NOW,
    )
    assert obs.lease_holder == "xen-a"
    assert obs.previous.phase is Phase.PROTECTED
    assert obs.generation == 3
    assert set(obs.nodes) == {"xen-a", "xen-b"}
    assert obs.nodes["xen-a"].exists
    assert not obs.nodes["xen-b"].exists
    # Itself is not among the others it could conflict with.
    assert [o.uid for o in obs.others] == ["other"]
    assert obs.annotations == {"xenha.io/switchover-to": "xen-b"}
    assert not obs.deleting


def test_a_lease_left_by_an_earlier_object_of_the_same_name_is_ignored() -> None:
    obs = observation(
        xr(),
        xennodes={},
        leases={("prod", "db1-fence"): [LeaseRecord(holder="xen-b", owners=frozenset({"old"}))]},
        replications=[],
        heartbeats=HeartbeatTracker(),
        now=NOW,
    )
    assert obs.lease_holder is None


def test_an_unparsable_spec_is_reported_not_raised() -> None:
    body = xr()
    body["spec"] = {**body["spec"], "secondaryNode": "xen-a"}
    obs = observation(
        body, xennodes={}, leases={}, replications=[], heartbeats=HeartbeatTracker(), now=NOW
    )
    assert obs.spec is None
    assert obs.spec_error is not None
    assert "secondaryNode" in obs.spec_error


def test_lease_records_name_holder_and_owners() -> None:
    lease = {
        "metadata": {"ownerReferences": [{"uid": UID, "kind": "XenReplication"}]},
        "spec": {"holderIdentity": "xen-b"},
    }
    assert lease_record(lease) == LeaseRecord(holder="xen-b", owners=frozenset({UID}))
    assert lease_record({"metadata": {}, "spec": {}}).holder is None


class TestEvents:
    def test_the_same_transition_from_the_same_status_has_the_same_name(self) -> None:
        previous = {"phase": "Protected", "activeNode": "xen-a"}
        assert transition_key(UID, previous, 0) == transition_key(UID, dict(previous), 0)
        assert transition_key(UID, previous, 0) != transition_key(UID, previous, 1)
        moved = {**previous, "activeNode": "xen-b"}
        assert transition_key(UID, previous, 0) != transition_key(UID, moved, 0)

    def test_an_event_names_its_object_and_reporter(self) -> None:
        body = event_body(
            xr(),
            Transition("FailedOver", "db1 failed over", warning=True),
            component="xenha-operator",
            instance="pod-1",
            now=NOW,
            key="abc",
        )
        assert body["metadata"] == {"name": "db1.failedover.abc", "namespace": "prod"}
        assert body["type"] == "Warning"
        assert body["involvedObject"]["uid"] == UID
        assert body["reportingInstance"] == "pod-1"
        assert body["eventTime"] == "2026-11-26T06:00:00.000000Z"


def test_settings_from_the_command_line_and_the_environment() -> None:
    settings = parse_args(
        ["-n", "prod", "-n", "lab", "--report-stale-after", "5", "--priority", "7"],
        {"XENHA_NAMESPACE": "ha", "XENHA_AGENT_SERVICE_ACCOUNT": "agent"},
    )
    assert settings.namespaces == ("prod", "lab")
    assert not settings.clusterwide
    assert settings.report_stale_after == timedelta(seconds=5)
    assert settings.priority == 7
    assert (settings.agent_namespace, settings.agent_service_account) == ("ha", "agent")
    assert parse_args([], {}).clusterwide


def test_replicas_draw_different_peering_priorities() -> None:
    assert len({OperatorSettings().priority for _ in range(20)}) > 1


def test_metrics_count_replications_by_phase() -> None:
    metrics = OperatorMetrics()
    metrics.set_phase("a", "Protected")
    metrics.set_phase("b", "Protected")
    metrics.set_phase("c", "Degraded")
    metrics.set_phase("b", None)
    assert (
        metrics.registry.get_sample_value("xenha_operator_replications", {"phase": "Protected"})
        == 1
    )
    assert (
        metrics.registry.get_sample_value("xenha_operator_replications", {"phase": "Degraded"}) == 1
    )
    with metrics.reconcile():
        pass
    assert (
        metrics.registry.get_sample_value("xenha_operator_reconciles_total", {"result": "ok"}) == 1
    )
