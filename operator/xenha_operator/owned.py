"""What every object the operator creates for a replication carries: owner and labels.

The ownerReference makes the garbage collector delete the Secret, Role, RoleBinding and Lease
with their XenReplication; the operator itself never deletes them. `blockOwnerDeletion` is
left unset: it would need `update` on `xenreplications/finalizers` wherever the
OwnerReferencesPermissionEnforcement admission plugin is on, and nothing waits on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xenha.api import API_VERSION

XR_KIND = "XenReplication"

MANAGED_BY = "xenha-operator"
REPLICATION_LABEL = "xenha.io/replication"


@dataclass(frozen=True)
class Owner:
    """The XenReplication an object belongs to."""

    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(namespace=meta["namespace"], name=meta["name"], uid=meta["uid"])

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


def owner_reference(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": XR_KIND,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
    }


def owned_metadata(owner: Owner, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {
            "app.kubernetes.io/managed-by": MANAGED_BY,
            REPLICATION_LABEL: owner.name,
        },
        "ownerReferences": [owner_reference(owner)],
    }


def is_owned_by(body: Mapping[str, Any], owner: Owner) -> bool:
    refs = body.get("metadata", {}).get("ownerReferences") or []
    return any(ref.get("uid") == owner.uid for ref in refs)
