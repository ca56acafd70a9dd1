"""The operator against a real kube-apiserver, with the test playing user and agents.

The operator runs as a subprocess with exactly its RBAC; the test writes XenReplications (as
the user), XenNode reports and fencing-Lease takeovers (as the agents would) and watches what
the operator makes of them: owned objects, status, Events.
"""

from __future__ import annotations

import base64
import time
import urllib.request
from typing import Any

import pytest
from cryptography import x509

pytestmark = pytest.mark.integration

XR = "db1"


def owned_by(obj: dict[str, Any] | None, uid: str) -> bool:
    assert obj is not None
    refs = obj["metadata"].get("ownerReferences") or []
    return any(r["uid"] == uid and r["kind"] == "XenReplication" for r in refs)


def test_a_replication_from_creation_through_failover_and_reprotection_to_deletion(
    scene, admin, agents, start_operator
):
    ns, a, b = scene.ns, scene.a, scene.b
    agents.set(a, **scene.report(("db1",)))
    agents.set(b, **scene.report())
    start_operator("--standalone")
    scene.create()

    # Owned objects: fencing Lease naming the primary, TLS material, the agents' Role.
    lease = scene.wait_for("fencing Lease", lambda: admin.lease(ns, "db1-fence"))
    assert lease["spec"]["holderIdentity"] == a
    assert lease["spec"]["leaseDurationSeconds"] == 2
    assert owned_by(lease, scene.uid)
    tls = scene.wait_for("TLS Secret", lambda: admin.secret(ns, "db1-tls"))
    assert owned_by(tls, scene.uid)
    assert set(tls["data"]) == {"ca.crt", f"{a}.crt", f"{a}.key", f"{b}.crt", f"{b}.key"}
    ca = x509.load_pem_x509_certificate(base64.b64decode(tls["data"]["ca.crt"]))
    leaf = x509.load_pem_x509_certificate(base64.b64decode(tls["data"][f"{b}.crt"]))
    leaf.verify_directly_issued_by(ca)
    assert owned_by(admin.secret(ns, "db1-tls-ca"), scene.uid)
    role = scene.wait_for("agent Role", lambda: admin.role(ns, "db1-agent-tls"))
    assert owned_by(role, scene.uid)
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["db1-tls"],
            "verbs": ["get"],
        }
    ]
    binding = scene.wait_for("agent RoleBinding", lambda: admin.rolebinding(ns, "db1-agent-tls"))
    assert owned_by(binding, scene.uid)
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "xenha-agent", "namespace": "xenha-system"}
    ]
    assert "xenha.io/stop-replication" in scene.xr()["metadata"]["finalizers"]

    # Pending -> Seeding -> Protected, from the agents' reports.
    scene.wait_phase("Pending", activeNode=a, standbyNode=b, leaseHolder=a)
    agents.set(a, **scene.report(("db1",), (scene.entry("primary", "Seeding"),)))
    agents.set(b, **scene.report(("db1--incoming",), (scene.entry("secondary", "Seeding"),)))
    scene.wait_phase("Seeding")
    scene.replicating(a, b)
    status = scene.wait_phase("Protected", checkpointsTotal=42)
    assert status["observedGeneration"] == 1
    assert scene.condition("Protected") == ("True", "Replicating")
    assert scene.condition("Ready") == ("True", "Running")
    scene.wait_event("Protected")

    # The standby's agent goes silent: NodeUnresponsive, Degraded; back: Protected again.
    agents.silence(b)
    scene.wait_phase("Degraded", standbyNode=b)
    assert scene.condition("Protected") == ("False", "NodeUnresponsive")
    scene.wait_event("NodeUnresponsive")
    agents.revive(b)
    scene.wait_phase("Protected")

    # Failover: the primary dies, the standby takes the fencing Lease and activates.
    agents.silence(a)
    took_over = {"time": scene.now(), "from": a, "to": b, "reason": "NodeLost", "durationMs": 2400}
    agents.set(
        b,
        **scene.report(
            ("db1",), (scene.entry("secondary", "Active", failover=took_over, peerConnected=False),)
        ),
    )
    admin.take_lease(ns, "db1-fence", b)
    status = scene.wait_phase("Degraded", activeNode=b, standbyNode=None)
    assert status["lastFailover"]["from"] == a
    assert status["lastFailover"]["to"] == b
    assert status["lastFailover"]["reason"] == "NodeLost"
    scene.wait_event("FailedOver")

    # The old primary comes back without its copy: it becomes the standby (reverse seeding).
    agents.set(a, **scene.report())
    scene.wait_phase("Seeding", activeNode=b, standbyNode=a)
    scene.replicating(b, a, total=7)
    scene.wait_phase("Protected", activeNode=b, standbyNode=a, checkpointsTotal=7)
    scene.wait_event("Reprotected")
    assert admin.event_reasons(ns, XR).count("FailedOver") == 1

    # Suspend and resume: the spec says so, the operator follows.
    admin.patch_xr(ns, XR, {"spec": {"suspended": True}})
    scene.wait_phase("Suspended", standbyNode=None, observedGeneration=2)
    scene.wait_event("Suspended")
    admin.patch_xr(ns, XR, {"spec": {"suspended": False}})
    scene.wait_phase("Protected", standbyNode=a)
    scene.wait_event("Resumed")

    # Deletion: replication stops, the object stays until the standby let go of its copy.
    admin.delete_xr(ns, XR)
    scene.wait_phase("Suspended", standbyNode=None, activeNode=b)
    assert scene.condition("Protected") == ("False", "UserAction")
    assert admin.xr(ns, XR) is not None  # held by the finalizer
    agents.set(a, **scene.report((), (scene.entry("secondary", "Stopped", peerConnected=False),)))
    scene.wait_for("the XenReplication to be gone", lambda: admin.xr(ns, XR) is None)
    assert "Stopped" in admin.event_reasons(ns, XR)
    # Owned objects go with it (garbage collector).
    scene.wait_for("the Lease to be collected", lambda: admin.lease(ns, "db1-fence") is None)
    scene.wait_for("the Secret to be collected", lambda: admin.secret(ns, "db1-tls") is None)


def test_switchover_by_annotation_runs_once_and_leaves_the_annotation_alone(
    scene, admin, agents, start_operator
):
    ns, a, b = scene.ns, scene.a, scene.b
    agents.set(a, **scene.report(("db1",)))
    agents.set(b, **scene.report())
    start_operator("--standalone")
    scene.create()
    scene.wait_for("fencing Lease", lambda: admin.lease(ns, "db1-fence"))
    scene.replicating(a, b)
    scene.wait_phase("Protected")

    admin.patch_xr(ns, XR, {"metadata": {"annotations": {"xenha.io/switchover-to": b}}})
    status = scene.wait_phase("FailingOver")
    assert status["switchover"]["target"] == b
    assert status["switchover"]["state"] == "InProgress"
    scene.wait_event("SwitchingOver")

    # The agents hand over: the standby takes the Lease and runs the guest; the old primary
    # destroys its paused copy.
    agents.set(
        b, **scene.report(("db1",), (scene.entry("secondary", "Active", peerConnected=False),))
    )
    admin.take_lease(ns, "db1-fence", b)
    agents.set(a, **scene.report())
    status = scene.wait_phase("Seeding", activeNode=b, standbyNode=a)
    assert status["switchover"]["state"] == "Succeeded"
    assert "lastFailover" not in status
    scene.wait_event("SwitchedOver")
    scene.replicating(b, a)
    scene.wait_phase("Protected", activeNode=b)
    scene.wait_event("Reprotected")

    xr = scene.xr()
    assert xr["metadata"]["annotations"]["xenha.io/switchover-to"] == b
    assert admin.event_reasons(ns, XR).count("SwitchingOver") == 1
    assert "FailedOver" not in admin.event_reasons(ns, XR)


def test_the_operator_writes_status_and_its_finalizer_only(scene, admin, agents, start_operator):
    agents.set(scene.a, **scene.report(("db1",)))
    agents.set(scene.b, **scene.report())
    start_operator("--standalone")
    scene.create(**{"failover": {"leaseDurationSeconds": 3}})
    admin.patch_xr(scene.ns, XR, {"metadata": {"labels": {"team": "db"}}})
    scene.replicating(scene.a, scene.b)
    scene.wait_phase("Protected")
    xr = scene.xr()
    assert xr["spec"] == {
        "domain": "db1",
        "mode": "remus",
        "primaryNode": scene.a,
        "secondaryNode": scene.b,
        # Static defaults come from the API server (CRD schema), not from the operator.
        "checkpoint": {},
        "unsafe": {
            "allow": False,
            "blackhole": False,
            "disableNetworkBuffering": False,
            "disableDiskReplication": False,
        },
        "colo": {"userspaceProxy": False},
        "failover": {"automatic": True, "leaseDurationSeconds": 3},
        "suspended": False,
    }
    assert xr["metadata"].get("labels") == {"team": "db"}
    assert not xr["metadata"].get("annotations")
    for entry in xr["metadata"]["managedFields"]:
        if entry["manager"] in ("kubectl", "Python") and entry["operation"] != "Update":
            continue
        fields = entry.get("fieldsV1", {})
        if entry.get("subresource") == "status":
            continue
        if "xenha-operator" in entry["manager"] or "kopf" in entry["manager"]:
            assert set(fields) <= {"f:metadata"}, entry
            assert set(fields.get("f:metadata", {})) <= {"f:finalizers"}, entry
    assert admin.lease(scene.ns, "db1-fence")["spec"]["leaseDurationSeconds"] == 3


@pytest.mark.parametrize(
    "kill_before_takeover",
    [False, True],
    ids=["killed-as-the-lease-moves", "killed-before-the-lease-moves"],
)
def test_killing_the_acting_replica_mid_failover_neither_stalls_nor_repeats_it(
    scene, admin, agents, start_operator, kill_before_takeover
):
    ns, a, b = scene.ns, scene.a, scene.b
    agents.set(a, **scene.report(("db1",)))
    agents.set(b, **scene.report())
    first = start_operator("--priority=200", "--peering-lifetime=4", name="first")
    scene.create()
    scene.wait_phase("Pending", timeout=60)  # the first replica is up and acting
    second = start_operator("--priority=100", "--peering-lifetime=4", name="second")
    scene.wait_for("both replicas in the peering", lambda: len(admin.peers(ns)) == 2)
    scene.replicating(a, b)
    scene.wait_phase("Protected", timeout=60)

    # The primary dies; the standby takes over; the acting operator dies around that moment
    # (racing its own handling of the takeover, or before it could see anything of it).
    if kill_before_takeover:
        first.kill()
    agents.silence(a)
    agents.set(
        b, **scene.report(("db1",), (scene.entry("secondary", "Active", peerConnected=False),))
    )
    admin.take_lease(ns, "db1-fence", b)
    first.kill()

    scene.wait_phase("Degraded", timeout=60, activeNode=b, standbyNode=None)
    agents.set(a, **scene.report())
    scene.replicating(b, a)
    scene.wait_phase("Protected", timeout=30, activeNode=b, standbyNode=a)
    assert admin.event_reasons(ns, XR).count("FailedOver") == 1
    # The first replica acted while it lived (the second stood by); the second took over.
    reporters = admin.reporters(ns, XR)
    assert reporters["Protected"] == "first"
    assert reporters["Reprotected"] == "second"
    assert "Resuming operations after the pause" in second.output()
    assert second.proc.poll() is None


def test_liveness_and_metrics_endpoints(scene, admin, agents, start_operator):
    from xenha.controlplane.cluster import free_port

    live, metrics = free_port(), free_port()
    agents.set(scene.a, **scene.report(("db1",)))
    agents.set(scene.b, **scene.report())
    start_operator(
        "--standalone", f"--liveness=http://127.0.0.1:{live}/healthz", f"--metrics-port={metrics}"
    )
    scene.create()
    scene.replicating(scene.a, scene.b)
    scene.wait_phase("Protected")

    def get(url: str) -> str:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return str(response.read().decode()) if response.status == 200 else ""
        except OSError:
            return ""  # not listening yet

    scene.wait_for("liveness", lambda: get(f"http://127.0.0.1:{live}/healthz"))
    text = scene.wait_for(
        "the Protected gauge",
        lambda: (
            (t := get(f"http://127.0.0.1:{metrics}/metrics"))
            and 'xenha_operator_replications{phase="Protected"} 1.0' in t
            and t
        ),
    )
    assert 'xenha_operator_transitions_total{reason="Protected"} 1.0' in text
    assert "xenha_operator_reconcile_duration_seconds_count" in text


def test_an_active_whose_host_lease_goes_unrenewed_is_not_called_ready(
    scene, admin, agents, start_operator
):
    """Its agent pauses the guest once its renewals are older than D - margin (a standby could
    take over): its XenNode report, fresh or not, no longer says what runs there."""
    ns, a, b = scene.ns, scene.a, scene.b
    agents.set(a, **scene.report(("db1",)))
    agents.set(b, **scene.report())
    start_operator("--standalone")
    scene.create()
    scene.replicating(a, b)
    scene.wait_phase("Protected")

    def renewed_and_ready() -> bool:
        admin.renew_host_lease(ns, a)
        return bool(scene.condition("Ready") == ("True", "Running"))

    def ready_message() -> str:
        ready = [c for c in scene.status()["conditions"] if c["type"] == "Ready"]
        return str(ready[0]["message"])

    scene.wait_for("Ready while A renews", renewed_and_ready, interval=0.3)
    end = time.monotonic() + 4  # twice D (2 s): still Ready
    while time.monotonic() < end:
        assert renewed_and_ready(), ready_message()
        time.sleep(0.3)
    # A's agent loses the API: no more renewals, though its XenNode report stays fresh.
    scene.wait_for(
        "Ready to turn Unknown",
        lambda: scene.condition("Ready") == ("Unknown", "NodeUnresponsive"),
        timeout=15,
    )
    assert "has not renewed its host Lease" in ready_message()
    assert scene.status()["phase"] == "Protected"
    # Renewing again (the API is back): Ready again.
    scene.wait_for("Ready once A renews again", renewed_and_ready, timeout=15, interval=0.3)
