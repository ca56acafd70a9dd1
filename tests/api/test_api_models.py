"""Defaulting, error wording and the wire spelling of the API models."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from xenha.api import (
    CheckpointSpec,
    Condition,
    ConditionStatus,
    ConditionType,
    FailoverRecord,
    Mode,
    Phase,
    ReplicationRole,
    ReplicationState,
    XenNode,
    XenReplication,
    XenReplicationSpec,
    XenReplicationStatus,
    parse_spec,
)

BASE = {"domain": "db1", "primaryNode": "xen-a", "secondaryNode": "xen-b"}


def remus(**extra: Any) -> dict[str, Any]:
    return {**BASE, "mode": "remus", **extra}


def colo(**extra: Any) -> dict[str, Any]:
    return {**BASE, "mode": "colo", **extra}


def errors_of(raw: dict[str, Any], **kwargs: Any) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        parse_spec(raw, **kwargs)
    return [(".".join(map(str, e["loc"])), e["msg"]) for e in caught.value.errors()]


# ---- defaulting ------------------------------------------------------------------------------


def test_remus_defaults_to_200ms_with_compression() -> None:
    checkpoint = parse_spec(remus()).checkpoint
    assert checkpoint.interval_ms == 200
    assert checkpoint.compression is True


def test_colo_defaults_to_no_interval_and_no_compression() -> None:
    checkpoint = parse_spec(colo()).checkpoint
    assert checkpoint.interval_ms is None
    assert checkpoint.compression is False


def test_explicit_remus_values_are_kept() -> None:
    checkpoint = parse_spec(remus(checkpoint={"intervalMs": 40, "compression": False})).checkpoint
    assert (checkpoint.interval_ms, checkpoint.compression) == (40, False)


def test_static_defaults() -> None:
    spec = parse_spec(remus())
    assert spec.unsafe.to_api() == {
        "allow": False,
        "blackhole": False,
        "disableNetworkBuffering": False,
        "disableDiskReplication": False,
    }
    assert spec.colo.userspace_proxy is False
    assert spec.failover.automatic is True
    assert spec.failover.lease_duration_seconds == 2
    assert spec.suspended is False
    assert spec.network_buffer_script is None


def test_defaulted_spec_in_api_spelling() -> None:
    assert parse_spec(colo()).to_api() == {
        **BASE,
        "mode": "colo",
        "checkpoint": {"compression": False},
        "unsafe": {
            "allow": False,
            "blackhole": False,
            "disableNetworkBuffering": False,
            "disableDiskReplication": False,
        },
        "colo": {"userspaceProxy": False},
        "failover": {"automatic": True, "leaseDurationSeconds": 2},
        "suspended": False,
    }


def test_defaulting_is_idempotent() -> None:
    for raw in (remus(), colo(), remus(checkpoint={"compression": False})):
        once = parse_spec(raw).to_api()
        assert parse_spec(once).to_api() == once


def test_python_construction_defaults_too_and_leaves_the_callers_object_alone() -> None:
    mine = CheckpointSpec()
    spec = XenReplicationSpec(
        domain="db1",
        mode=Mode.REMUS,
        primary_node="xen-a",
        secondary_node="xen-b",
        checkpoint=mine,
    )
    assert spec.checkpoint.interval_ms == 200
    assert mine.interval_ms is None


def test_mode_is_an_enum_that_compares_to_its_api_value() -> None:
    mode = parse_spec(colo()).mode
    assert mode == "colo"
    assert mode is Mode.COLO


# ---- errors name the field and the rule -----------------------------------------------------


def test_colo_with_interval_names_field_and_xl_conflict() -> None:
    assert errors_of(colo(checkpoint={"intervalMs": 200})) == [
        (
            "checkpoint.intervalMs",
            "COLO takes no checkpoint interval (xl remus -c conflicts with -i): "
            "remove checkpoint.intervalMs",
        )
    ]


def test_every_broken_rule_is_reported_not_just_the_first() -> None:
    fields = [field for field, _ in errors_of(colo(unsafe={"blackhole": True}))]
    assert fields == ["unsafe.blackhole", "unsafe.blackhole"]


def test_types_are_checked_as_strictly_as_the_api_server_does() -> None:
    assert errors_of(remus(checkpoint={"intervalMs": "200"}))[0][0] == "checkpoint.intervalMs"
    assert errors_of(remus(suspended=1))[0][0] == "suspended"
    assert errors_of(remus(checkpoint={"intervalMs": True}))[0][0] == "checkpoint.intervalMs"


def test_unknown_fields_are_ignored_by_readers_and_rejected_on_request() -> None:
    raw = remus(futureField=1, failover={"automatic": True, "futureToo": 2})
    assert parse_spec(raw).failover.automatic is True
    assert errors_of(raw, reject_unknown=True) == [("futureField", 'unknown field "futureField"')]


def test_python_names_are_not_api_names_for_a_strict_check() -> None:
    raw = {**remus(), "primary_node": "xen-a"}
    assert errors_of(raw, reject_unknown=True) == [("primary_node", 'unknown field "primary_node"')]


# ---- status and XenNode ------------------------------------------------------------------------

NOW = datetime(2026, 11, 26, 6, 0, 0, tzinfo=UTC)


def test_status_serialises_in_api_spelling_with_utc_z_times() -> None:
    status = XenReplicationStatus(
        phase=Phase.PROTECTED,
        active_node="xen-a",
        standby_node="xen-b",
        conditions=[
            Condition(
                type=ConditionType.PROTECTED,
                status=ConditionStatus.TRUE,
                reason="CheckpointsFlowing",
                message="",
                last_transition_time=NOW,
                observed_generation=3,
            )
        ],
        last_failover=FailoverRecord(time=NOW, from_node="xen-b", to_node="xen-a", duration_ms=900),
        last_checkpoint_time=NOW,
    )
    assert status.to_api() == {
        "phase": "Protected",
        "activeNode": "xen-a",
        "standbyNode": "xen-b",
        "conditions": [
            {
                "type": "Protected",
                "status": "True",
                "reason": "CheckpointsFlowing",
                "message": "",
                "lastTransitionTime": "2026-11-26T06:00:00Z",
                "observedGeneration": 3,
            }
        ],
        "lastFailover": {
            "time": "2026-11-26T06:00:00Z",
            "from": "xen-b",
            "to": "xen-a",
            "durationMs": 900,
        },
        "lastCheckpointTime": "2026-11-26T06:00:00Z",
    }


def test_status_round_trips_through_the_api_spelling() -> None:
    status = XenReplicationStatus(phase=Phase.FAILING_OVER, lease_holder="xen-b", message="x")
    assert XenReplicationStatus.model_validate(status.to_api()) == status


def test_condition_reason_must_be_camel_case_like_kubernetes_wants() -> None:
    with pytest.raises(ValidationError, match="reason"):
        Condition.model_validate(
            {
                "type": "Ready",
                "status": "True",
                "reason": "not camel case",
                "message": "",
                "lastTransitionTime": "2026-11-26T06:00:00Z",
            }
        )


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError):
        FailoverRecord(time=datetime(2026, 1, 1), from_node="a", to_node="b")


def test_xennode_reads_the_agent_report_of_the_design() -> None:
    node = XenNode.model_validate(
        {
            "apiVersion": "xenha.io/v1alpha1",
            "kind": "XenNode",
            "metadata": {"name": "xen-a"},
            "spec": {},
            "status": {
                "heartbeatTime": "2026-11-26T06:00:00.000000Z",
                "agentVersion": "0.1.0",
                "relayEndpoint": "127.0.0.11:7443",
                "xen": {
                    "version": "4.17",
                    "freeMemoryMiB": 900,
                    "totalMemoryMiB": 2048,
                    "coloSupported": True,
                },
                "domains": [{"name": "db1", "domid": 3, "state": "running", "memoryMiB": 128}],
                "replications": [
                    {
                        "namespace": "prod",
                        "name": "db1",
                        "uid": "6f1c",
                        "role": "primary",
                        "state": "Replicating",
                        "peerConnected": True,
                        "checkpoints": {"total": 120, "intervalMs": 205, "lastBytes": 1810432},
                        "failover": {
                            "time": "2026-11-26T06:00:00Z",
                            "from": "xen-b",
                            "to": "xen-a",
                        },
                    }
                ],
            },
        }
    )
    assert node.status is not None
    assert node.status.xen is not None
    assert node.status.xen.free_memory_mib == 900
    assert node.status.domains[0].memory_mib == 128
    replication = node.status.replications[0]
    assert replication.role is ReplicationRole.PRIMARY
    assert replication.state is ReplicationState.REPLICATING
    assert replication.checkpoints is not None
    assert replication.checkpoints.interval_ms == 205
    assert replication.failover is not None
    assert replication.failover.from_node == "xen-b"
    assert node.to_api()["status"]["xen"]["freeMemoryMiB"] == 900


def test_a_whole_xenreplication_object_validates_its_spec() -> None:
    with pytest.raises(ValidationError, match="secondaryNode must differ"):
        XenReplication.model_validate(
            {"metadata": {"name": "db1"}, "spec": {**remus(), "secondaryNode": "xen-a"}}
        )
    xr = XenReplication.model_validate({"metadata": {"name": "db1"}, "spec": remus()})
    assert xr.spec.checkpoint.interval_ms == 200
    assert xr.to_api()["apiVersion"] == "xenha.io/v1alpha1"
