"""All of the agent's Kubernetes API I/O: a small async client over aiohttp.

Why not the `kubernetes` client in threads: the agent's safety depends on timely host-Lease
renewals, and blocking watches in a shared thread pool could delay them; aiohttp requests have
real timeouts and can be cancelled. The `kubernetes` package is still used to *load* a
kubeconfig or the in-cluster service account (certificates, tokens, token refresh).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

log = logging.getLogger(__name__)

Obj = dict[str, Any]

GROUP = "xenha.io"
VERSION = "v1alpha1"


# -- paths ------------------------------------------------------------------------------------


def leases_path(namespace: str, name: str | None = None) -> str:
    base = f"/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases"
    return base if name is None else f"{base}/{quote(name)}"


def xennodes_path(name: str | None = None, *, status: bool = False) -> str:
    base = f"/apis/{GROUP}/{VERSION}/xennodes"
    if name is None:
        return base
    return f"{base}/{quote(name)}" + ("/status" if status else "")


def xenreplications_path(namespace: str | None = None) -> str:
    if namespace is None:
        return f"/apis/{GROUP}/{VERSION}/xenreplications"
    return f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/xenreplications"


def events_path(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/events"


def secret_path(namespace: str, name: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets/{quote(name)}"


# -- errors -----------------------------------------------------------------------------------


class ApiError(Exception):
    """The API server answered with an error status (or could not be reached: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status = status
        self.reason = reason
        self.message = message
        super().__init__(f"{status} {reason}: {message}")


class ApiUnavailable(ApiError):
    """No answer: connection refused or reset, TLS failure, timeout."""


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    """409: a resourceVersion precondition failed, or (AlreadyExists) a create collided."""

    @property
    def already_exists(self) -> bool:
        return self.reason == "AlreadyExists"


class Gone(ApiError):
    """410: a watch's resourceVersion is too old; list again."""


def _error(status: int, body: str) -> ApiError:
    reason, message = "", body.strip()[:500]
    try:
        payload = json.loads(body)
        reason = str(payload.get("reason") or "")
        message = str(payload.get("message") or message)
    except (ValueError, AttributeError):
        pass
    cls = {404: NotFound, 409: Conflict, 410: Gone}.get(status, ApiError)
    return cls(status, reason, message)


# -- connection -------------------------------------------------------------------------------


@dataclass
class Connection:
    """Where the API server is and how to authenticate (loaded by the `kubernetes` package)."""

    host: str
    ssl_context: ssl.SSLContext | bool
    # Returns the Authorization header value (re-read for in-cluster token rotation).
    authorization: Callable[[], str | None] = field(default=lambda: None)

    @classmethod
    def load(cls, kubeconfig: Path | None) -> Connection:
        """From a kubeconfig file, or the pod's service account when `kubeconfig` is None."""
        from kubernetes import client, config

        cfg = client.Configuration()
        if kubeconfig is None:
            config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(kubeconfig), client_configuration=cfg, persist_config=False
            )
        ctx: ssl.SSLContext | bool
        if cfg.host.startswith("https"):
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert)
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
            if not cfg.verify_ssl:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        else:
            ctx = False

        def authorization() -> str | None:
            auth = cfg.auth_settings().get("BearerToken")
            return str(auth["value"]) if auth and auth.get("value") else None

        return cls(host=cfg.host.rstrip("/"), ssl_context=ctx, authorization=authorization)


class KubeClient:
    """JSON over HTTP to the API server. One per agent; close() it on the way out."""

    def __init__(self, connection: Connection, *, timeout: float = 10.0) -> None:
        self.connection = connection
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_kubeconfig(cls, kubeconfig: Path | None, **kwargs: Any) -> KubeClient:
        return cls(Connection.load(kubeconfig), **kwargs)

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self.connection.ssl_context, limit=32),
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        auth = self.connection.authorization()
        if auth:
            headers["Authorization"] = auth
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Obj | None = None,
        content_type: str = "application/json",
        request_timeout: float | None = None,
    ) -> Obj:
        data = None if body is None else json.dumps(body)
        try:
            async with self._client().request(
                method,
                self.connection.host + path,
                params=dict(params or {}),
                data=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=aiohttp.ClientTimeout(total=request_timeout or self.timeout),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _error(resp.status, text)
                result: Obj = json.loads(text) if text else {}
                return result
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiUnavailable(0, type(e).__name__, str(e) or type(e).__name__) from e

    async def get(self, path: str, **kw: Any) -> Obj:
        return await self.request("GET", path, **kw)

    async def create(self, path: str, body: Obj, **kw: Any) -> Obj:
        return await self.request("POST", path, body=body, **kw)

    async def replace(self, path: str, body: Obj, **kw: Any) -> Obj:
        """PUT; with metadata.resourceVersion set this is an optimistic-concurrency update."""
        return await self.request("PUT", path, body=body, **kw)

    async def patch(self, path: str, body: Obj, **kw: Any) -> Obj:
        """JSON merge patch."""
        return await self.request(
            "PATCH", path, body=body, content_type="application/merge-patch+json", **kw
        )

    async def watch(
        self,
        path: str,
        *,
        resource_version: str | None = None,
        params: Mapping[str, str] | None = None,
        server_timeout: int = 60,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """Yield (type, object) until the server ends the watch; ERROR events raise."""
        query = {"watch": "1", "timeoutSeconds": str(server_timeout), **(params or {})}
        query["allowWatchBookmarks"] = "true"
        if resource_version:
            query["resourceVersion"] = resource_version
        try:
            async with self._client().get(
                self.connection.host + path,
                params=query,
                headers=self._headers(None),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=self.timeout, sock_read=server_timeout + 15
                ),
            ) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, await resp.text())
                async for line in resp.content:
                    if not line.strip():
                        continue
                    event = json.loads(line)
                    kind, obj = str(event.get("type")), event.get("object") or {}
                    if kind == "ERROR":
                        raise _error(int(obj.get("code") or 500), json.dumps(obj))
                    yield kind, obj
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ApiUnavailable(0, type(e).__name__, str(e) or type(e).__name__) from e


# -- list + watch into a cache ----------------------------------------------------------------


def object_key(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


class Reflector:
    """Keeps `items` equal to a collection (or one named object) on the server.

    `on_change(key, obj_or_None)` runs (on the loop, synchronously) for every added, modified or
    deleted object, including the differences found when re-listing after an error; callers
    record the monotonic time of what they see there. `synced` is set, and `on_synced` called,
    right after the first list, before any watch event.
    """

    def __init__(
        self,
        kube: KubeClient,
        path: str,
        *,
        label_selector: str | None = None,
        name: str | None = None,
        on_change: Callable[[str, Obj | None], None] | None = None,
        on_synced: Callable[[], None] | None = None,
        retry: float = 1.0,
        server_timeout: int = 60,
    ) -> None:
        self.kube = kube
        self.path = path
        self.label_selector = label_selector
        # A single object: read with GET and watched with a metadata.name field selector, so
        # RBAC `get` + `watch` suffice (no `list`).
        self.name = name
        self.on_change = on_change or (lambda key, obj: None)
        self.on_synced = on_synced or (lambda: None)
        self.retry = retry
        self.server_timeout = server_timeout
        self.items: dict[str, Obj] = {}
        self.synced = asyncio.Event()
        self.healthy = False

    def _set(self, key: str, obj: Obj | None) -> None:
        old = self.items.get(key)
        if obj is None:
            if self.items.pop(key, None) is not None:
                self.on_change(key, None)
            return
        self.items[key] = obj
        if old is None or _rv(old) != _rv(obj):
            self.on_change(key, obj)

    async def _list(self) -> str:
        if self.name is not None:
            try:
                obj = await self.kube.get(f"{self.path}/{quote(self.name)}")
            except NotFound:
                fresh: dict[str, Obj] = {}
                rv = ""
            else:
                fresh = {object_key(obj): obj}
                rv = _rv(obj)
        else:
            params = {"labelSelector": self.label_selector} if self.label_selector else {}
            listing = await self.kube.get(self.path, params=params)
            fresh = {}
            for item in listing.get("items") or []:
                fresh[object_key(item)] = item
            rv = str((listing.get("metadata") or {}).get("resourceVersion") or "")
        for key in list(self.items):
            if key not in fresh:
                self._set(key, None)
        for key, obj in fresh.items():
            self._set(key, obj)
        return rv

    async def run(self) -> None:
        """Until cancelled."""
        params: dict[str, str] = {}
        if self.label_selector:
            params["labelSelector"] = self.label_selector
        if self.name is not None:
            params["fieldSelector"] = f"metadata.name={self.name}"
        rv = ""
        need_list = True
        while True:
            try:
                if need_list:
                    rv = await self._list()
                    if not self.synced.is_set():
                        self.synced.set()
                        self.on_synced()
                    self.healthy = True
                    need_list = False
                async for kind, obj in self.kube.watch(
                    self.path,
                    resource_version=rv or None,
                    params=params,
                    server_timeout=self.server_timeout,
                ):
                    if kind == "BOOKMARK":
                        rv = _rv(obj) or rv
                        continue
                    rv = _rv(obj) or rv
                    self._set(object_key(obj), None if kind == "DELETED" else obj)
            except Gone:
                need_list = True
            except ApiError as e:
                self.healthy = False
                need_list = True
                log.debug("watch %s: %s; listing again in %.1fs", self.path, e, self.retry)
                await asyncio.sleep(self.retry)


def _rv(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion") or "")
