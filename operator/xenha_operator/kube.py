"""The operator's own API calls (kopf does the watching): a thin, dict-based REST layer.

Everything the operator reads often (XenNodes, fencing Leases, XenReplications) comes from kopf's
in-memory indexes; this module is for the few writes and the reads that happen on changes only:
status replacement with optimistic concurrency, owned objects, TLS Secrets. Calls are the
synchronous `kubernetes` client run in worker threads — a handful per transition, not per pass.

The same kubeconfig (or in-cluster ServiceAccount) drives kopf's login, so the operator never
runs with two identities.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kubernetes import client, config

from xenha.api import GROUP, VERSION

Body = dict[str, Any]


class KubeError(Exception):
    def __init__(self, status: int, reason: str, body: str = "") -> None:
        super().__init__(f"{status} {reason}: {body[:500]}")
        self.status = status
        self.reason = reason
        self.body = body


class Conflict(KubeError):
    """409: the object changed since it was read, or already exists."""


@dataclass(frozen=True)
class Kind:
    """Where a kind of object lives in the REST API."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{name}"
        if sub is not None:
            base += f"/{sub}"
        return base


FIELD_MANAGER = "xenha-operator"

XENREPLICATIONS = Kind(GROUP, VERSION, "xenreplications")
XENNODES = Kind(GROUP, VERSION, "xennodes")
LEASES = Kind("coordination.k8s.io", "v1", "leases")
SECRETS = Kind("", "v1", "secrets")
ROLES = Kind("rbac.authorization.k8s.io", "v1", "roles")
ROLEBINDINGS = Kind("rbac.authorization.k8s.io", "v1", "rolebindings")
EVENTS = Kind("", "v1", "events")


def load_configuration(kubeconfig: str | None) -> client.Configuration:
    """A kubeconfig file if given (or $KUBECONFIG), else the in-cluster ServiceAccount."""
    configuration = client.Configuration()
    if kubeconfig or os.environ.get("KUBECONFIG") or not os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
    else:
        config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return configuration


def connection_info(configuration: client.Configuration) -> kopf.ConnectionInfo:
    """The same credentials, in the form kopf's login handler returns."""
    token = None
    auth = configuration.api_key.get("authorization") or configuration.api_key.get("BearerToken")
    if auth:
        token = auth.removeprefix("Bearer ").strip()
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        scheme="Bearer" if token else None,
        token=token,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
    )


class Kube:
    def __init__(self, configuration: client.Configuration) -> None:
        self._configuration = configuration
        self._api = client.ApiClient(configuration)

    def close(self) -> None:
        self._api.close()  # type: ignore[no-untyped-call]

    def _refresh_token(self) -> None:
        # In-cluster tokens are projected and rotate; the client's refresh hook re-reads them.
        hook = getattr(self._configuration, "refresh_api_key_hook", None)
        if hook is not None:
            hook(self._configuration)

    def _call(self, method: str, path: str, body: Body | None = None) -> Body:
        self._refresh_token()
        if method in ("POST", "PUT", "PATCH"):
            # Shows as the manager in managedFields: who wrote what, for users and tests.
            path += f"?fieldManager={FIELD_MANAGER}"
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        _, url, headers, serialized, _ = self._api.param_serialize(
            method=method,
            resource_path=path,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(method, url, header_params=headers, body=serialized)
        except client.ApiException as exc:
            raise _error(int(exc.status or 0), str(exc.reason or ""), str(exc.body or "")) from exc
        data = response.read()  # type: ignore[no-untyped-call]
        text = data.decode() if isinstance(data, bytes) else str(data or "")
        if response.status >= 400:
            raise _error(response.status, str(response.reason), text)
        return dict(json.loads(text)) if text else {}

    async def get(self, kind: Kind, namespace: str | None, name: str) -> Body | None:
        try:
            return await asyncio.to_thread(self._call, "GET", kind.path(namespace, name))
        except KubeError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, kind: Kind, namespace: str | None, body: Body) -> Body:
        return await asyncio.to_thread(self._call, "POST", kind.path(namespace), body)

    async def replace(self, kind: Kind, namespace: str | None, name: str, body: Body) -> Body:
        """PUT: fails with Conflict unless metadata.resourceVersion is still current."""
        return await asyncio.to_thread(self._call, "PUT", kind.path(namespace, name), body)

    async def replace_status(
        self, kind: Kind, namespace: str | None, name: str, body: Body
    ) -> Body:
        path = kind.path(namespace, name, "status")
        return await asyncio.to_thread(self._call, "PUT", path, body)

    async def create_or_get(self, kind: Kind, namespace: str | None, body: Body) -> Body:
        """Create it, or return the existing one (another replica may have been quicker)."""
        try:
            return await self.create(kind, namespace, body)
        except Conflict:
            existing = await self.get(kind, namespace, body["metadata"]["name"])
            if existing is None:
                raise
            return existing


def _error(status: int, reason: str, body: str) -> KubeError:
    return (Conflict if status == 409 else KubeError)(status, reason, body)


def owned_copy(existing: Mapping[str, Any], desired: Mapping[str, Any]) -> Body:
    """`desired` as a PUT body replacing `existing` (keeps resourceVersion for concurrency)."""
    body = dict(desired)
    metadata = dict(desired.get("metadata") or {})
    metadata["resourceVersion"] = existing["metadata"]["resourceVersion"]
    body["metadata"] = metadata
    return body
