"""Node objects for hosts that have no kubelet here (the Xen hosts are simulated or remote).

The control plane runs no node lifecycle controller, so a Node stays exactly as registered:
its Ready condition changes only when someone calls ``set_ready``.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kubernetes.client import ApiClient


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def register_node(
    api: ApiClient,
    name: str,
    labels: Mapping[str, str] | None = None,
    *,
    ready: bool = True,
    address: str = "127.0.0.1",
) -> None:
    """Create (or relabel) a Node and set its Ready condition and address."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api)
    meta = client.V1ObjectMeta(name=name, labels=dict(labels or {}))
    try:
        core.create_node(client.V1Node(metadata=meta))
    except ApiException as exc:
        if exc.status != 409:
            raise
        core.patch_node(name, {"metadata": {"labels": dict(labels or {})}})
    set_ready(api, name, ready, address=address)


def set_ready(api: ApiClient, name: str, ready: bool, *, address: str = "127.0.0.1") -> None:
    from kubernetes import client

    now = _now()
    condition: dict[str, Any] = {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": "KubeletReady" if ready else "KubeletNotReady",
        "message": "registered by xenha.controlplane.nodes",
        "lastHeartbeatTime": now,
        "lastTransitionTime": now,
    }
    client.CoreV1Api(api).patch_node_status(
        name,
        {
            "status": {
                "conditions": [condition],
                "addresses": [
                    {"type": "InternalIP", "address": address},
                    {"type": "Hostname", "address": name},
                ],
            }
        },
    )


def delete_node(api: ApiClient, name: str) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        client.CoreV1Api(api).delete_node(name)
    except ApiException as exc:
        if exc.status != 404:
            raise
