"""The few Kubernetes reads and writes the stack makes, with the admin's credentials.

Writes go through kubectl where a person would use kubectl (applying CRDs and replications,
annotating), so the lab exercises exactly what users run; reads use the Python client.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from xenha.api.models import GROUP, VERSION

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

Obj = dict[str, Any]
T = TypeVar("T")

XR_PLURAL = "xenreplications"
XN_PLURAL = "xennodes"
SWITCHOVER_ANNOTATION = "xenha.io/switchover-to"


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


def get_replication(api: ApiClient, namespace: str, name: str) -> Obj | None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            GROUP, VERSION, namespace, XR_PLURAL, name
        )
    except ApiException as exc:
        if _not_found(exc):
            return None
        raise
    return cast(Obj, obj)


def list_replications(api: ApiClient) -> list[Obj]:
    from kubernetes import client

    found = cast(
        Obj, client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, XR_PLURAL)
    )
    return list(found.get("items", []))


def xennodes(api: ApiClient) -> dict[str, Obj]:
    from kubernetes import client

    found = cast(
        Obj, client.CustomObjectsApi(api).list_cluster_custom_object(GROUP, VERSION, XN_PLURAL)
    )
    return {item["metadata"]["name"]: item for item in found.get("items", [])}


def fence_lease(api: ApiClient, namespace: str, name: str) -> Obj | None:
    """The replication's fencing Lease `<name>-fence`, as the API spells it (camelCase)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    try:
        lease = client.CoordinationV1Api(api).read_namespaced_lease(f"{name}-fence", namespace)
    except ApiException as exc:
        if _not_found(exc):
            return None
        raise
    return _plain(api, lease)


def events_about(api: ApiClient, namespace: str, name: str) -> list[Obj]:
    """Events whose involved object is the replication, oldest first."""
    from kubernetes import client

    found = client.CoreV1Api(api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name},involvedObject.kind=XenReplication"
    )
    items = [_plain(api, item) for item in found.items]
    items.sort(key=event_time)
    return items


def event_time(event: Mapping[str, Any]) -> str:
    return str(
        event.get("eventTime")
        or event.get("lastTimestamp")
        or event.get("firstTimestamp")
        or event.get("metadata", {}).get("creationTimestamp")
        or ""
    )


def _plain(api: ApiClient, model: object) -> Obj:
    """A client model as the API server spells it (camelCase keys, RFC 3339 strings)."""
    return cast(Obj, api.sanitize_for_serialization(model))  # type: ignore[no-untyped-call]


def phase_of(obj: Mapping[str, Any] | None) -> str | None:
    if not obj:
        return None
    phase = (obj.get("status") or {}).get("phase")
    return str(phase) if phase else None


def condition(obj: Mapping[str, Any] | None, type_: str) -> Obj | None:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def wait_until(
    probe: Callable[[], T | None],
    *,
    timeout: float,
    interval: float = 0.2,
    what: str = "condition",
    describe: Callable[[], str] = lambda: "",
) -> T:
    """Poll ``probe`` until it returns something other than None (or False)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            detail = describe()
            raise TimeoutError(
                f"timed out after {timeout:.0f}s waiting for {what}"
                + (f"\n{detail}" if detail else "")
            )
        time.sleep(interval)


def list_document(objects: Sequence[Mapping[str, Any]]) -> str:
    """A v1 List, as kubectl apply -f - takes it (JSON is YAML)."""
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
