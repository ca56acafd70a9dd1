"""kopf's peering resources, which the cluster must have for operator replicas to take turns.

kopf does not install them; the Helm chart (and the tests) apply `PEERING_CRDS`, and the
operator creates its own peering object at start-up if it is missing.
"""

from __future__ import annotations

from typing import Any

PEERING_GROUP = "kopf.dev"
PEERING_VERSION = "v1"

_SCHEMA: dict[str, Any] = {
    "openAPIV3Schema": {
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": True,
    }
}


def _crd(kind: str, plural: str, scope: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{PEERING_GROUP}"},
        "spec": {
            "group": PEERING_GROUP,
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {"name": PEERING_VERSION, "served": True, "storage": True, "schema": _SCHEMA}
            ],
        },
    }


PEERING_CRDS: tuple[dict[str, Any], ...] = (
    _crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
    _crd("KopfPeering", "kopfpeerings", "Namespaced"),
)


def peering_object(name: str, namespace: str | None = None) -> dict[str, Any]:
    """The peering object itself: cluster-wide when `namespace` is None."""
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {
        "apiVersion": f"{PEERING_GROUP}/{PEERING_VERSION}",
        "kind": "KopfPeering" if namespace is not None else "ClusterKopfPeering",
        "metadata": metadata,
    }
