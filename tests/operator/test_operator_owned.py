"""Owned objects of a replication deleted and re-applied under the same name (GitOps).

The garbage collector deletes the old replication's Secrets, Lease, Role and RoleBinding some
time after the old object went; the new replication must not reuse them (the collector would
take them away later): it takes over the Secrets, Role and RoleBinding (new owner, fresh
material), leaves the Lease to the collector (the operator never changes a Lease), and brings
every one of them back whenever they go. The old owner is played by
a ConfigMap that still exists, so the collector leaves the leftovers alone until the test says.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

pytestmark = pytest.mark.integration

XR = "db1"
NAMES = {
    "lease": "db1-fence",
    "tls": "db1-tls",
    "ca": "db1-tls-ca",
    "role": "db1-agent-tls",
    "binding": "db1-agent-tls",
}


def refs(obj: dict[str, Any] | None) -> set[str]:
    if obj is None:
        return set()
    return {r["uid"] for r in obj["metadata"].get("ownerReferences") or []}


def owned_objects(admin, ns: str) -> dict[str, Any]:
    return {
        "lease": admin.lease(ns, NAMES["lease"]),
        "tls": admin.secret(ns, NAMES["tls"]),
        "ca": admin.secret(ns, NAMES["ca"]),
        "role": admin.role(ns, NAMES["role"]),
        "binding": admin.rolebinding(ns, NAMES["binding"]),
    }


def all_owned_by(admin, ns: str, uid: str, but: tuple[str, ...] = ()) -> dict[str, Any] | None:
    objects = owned_objects(admin, ns)
    if all(refs(obj) == {uid} for key, obj in objects.items() if key not in but):
        return objects
    return None


def leave_old_objects(admin, scene) -> tuple[str, dict[str, bytes]]:
    """What a deleted `db1` leaves behind until the collector catches up: valid material for
    the same nodes, a Lease held by the other node, the same Role and RoleBinding."""
    from kubernetes import client
    from xenha_operator import certs
    from xenha_operator.owned import REPLICATION_LABEL

    ns = scene.ns
    old = admin.core.create_namespaced_config_map(
        ns, client.V1ConfigMap(metadata=client.V1ObjectMeta(name="old-db1"))
    )
    old_ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "old-db1", "uid": old.metadata.uid}
    labels = {"app.kubernetes.io/managed-by": "xenha-operator", REPLICATION_LABEL: XR}

    def meta(name: str) -> dict[str, Any]:
        return {"name": name, "namespace": ns, "labels": labels, "ownerReferences": [old_ref]}

    plan = certs.plan_tls(
        ca_data=None,
        tls_data=None,
        nodes=frozenset({scene.a, scene.b}),
        ca_name=f"xenha {ns}/{XR} CA",
        now=datetime.now(UTC),
        cert_validity=timedelta(days=7),
        ca_validity=timedelta(days=365),
        renew_fraction=1 / 3,
    )
    for name, data in ((NAMES["ca"], plan.ca_data), (NAMES["tls"], plan.tls_data)):
        admin.core.create_namespaced_secret(
            ns,
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "type": "Opaque",
                "metadata": meta(name),
                "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
            },
        )
    now = scene.now()
    admin.custom.create_namespaced_custom_object(
        "coordination.k8s.io",
        "v1",
        ns,
        "leases",
        {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": meta(NAMES["lease"]),
            "spec": {
                "holderIdentity": scene.b,
                "leaseDurationSeconds": 2,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 3,
            },
        },
    )
    # Exactly what the operator wants (same rules, same subjects): only the owner differs.
    from xenha_operator.owned import Owner

    stand_in = Owner(ns, XR, old.metadata.uid)
    role = certs.agent_role(stand_in)
    role["metadata"] = meta(NAMES["role"])
    admin.rbac.create_namespaced_role(ns, role)
    binding = certs.agent_role_binding(stand_in, "xenha-agent", "xenha-system")
    binding["metadata"] = meta(NAMES["binding"])
    admin.rbac.create_namespaced_role_binding(ns, binding)
    return old.metadata.uid, plan.tls_data


def test_a_reapplied_replication_takes_over_leftovers_and_recreates_them_when_collected(
    scene, admin, agents, start_operator
):
    ns = scene.ns
    old_uid, old_tls = leave_old_objects(admin, scene)
    agents.set(scene.a, **scene.report(("db1",)))
    agents.set(scene.b, **scene.report())
    start_operator("--standalone", "--owned-check-interval=1")
    scene.create()
    assert scene.uid != old_uid

    # Taken over: owned by the new replication only, as if created for it.
    objects = scene.wait_for(
        "the leftovers to be owned by the new replication",
        lambda: all_owned_by(admin, ns, scene.uid, but=("lease",)),
        timeout=30,
    )
    # The Lease is never changed by the operator (only agents move its holder): it waits for
    # the collector, and the new replication does not follow it meanwhile.
    assert refs(objects["lease"]) == {old_uid}
    assert scene.xr().get("status", {}).get("leaseHolder") != scene.b
    tls = {k: base64.b64decode(v) for k, v in objects["tls"]["data"].items()}
    assert set(tls) == {
        "ca.crt",
        f"{scene.a}.crt",
        f"{scene.a}.key",
        f"{scene.b}.crt",
        f"{scene.b}.key",
    }
    assert tls["ca.crt"] != old_tls["ca.crt"]  # fresh material, not the old replication's
    assert objects["role"]["rules"][0]["resourceNames"] == [NAMES["tls"]]

    # The collector deleting them after all (it raced the takeover): they come back.
    admin.core.delete_namespaced_secret(NAMES["tls"], ns)
    admin.core.delete_namespaced_secret(NAMES["ca"], ns)
    admin.rbac.delete_namespaced_role(NAMES["role"], ns)
    admin.rbac.delete_namespaced_role_binding(NAMES["binding"], ns)
    admin.custom.delete_namespaced_custom_object(
        "coordination.k8s.io", "v1", ns, "leases", NAMES["lease"]
    )
    objects = scene.wait_for(
        "the owned objects to be recreated",
        lambda: all_owned_by(admin, ns, scene.uid),
        timeout=30,
    )
    assert objects["lease"]["spec"]["holderIdentity"] == scene.a  # the new spec's primary
