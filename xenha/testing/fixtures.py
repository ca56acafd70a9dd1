"""pytest plugin: a real control plane per session and what tests need on top of it.

Load it with ``pytest_plugins = ["xenha.testing.fixtures"]``. Fixtures:

- ``control_plane`` (session): a running ``ControlPlane``.
- ``kube_api`` (session): a ``kubernetes.client.ApiClient`` for the admin (system:masters).
- ``namespace``: a fresh namespace for one test, deleted after it.
- ``service_account_kubeconfig``: factory ``(namespace, name, rules, cluster_rules=()) -> Path``
  of a kubeconfig whose token carries exactly those RBAC rules.
- ``register_nodes``: factory ``(names_or_mapping, labels=None, ready=True) -> list[str]`` of
  Node objects (deleted after the test); ``register_nodes.set_ready(name, bool)``.

``control_plane_binaries(config)`` gives the session's binaries to plugins that start control
planes of their own (``xenha.testing.stack_fixtures``).

Missing binaries: locally they are built on demand (once, before the first test, outside any
test timeout); with CI=true the tests that need them fail, never skip.
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from xenha.controlplane import build, nodes, rbac
from xenha.controlplane.cluster import ControlPlane, close_client

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

_BINARIES_KEY = pytest.StashKey[dict[str, Path] | str]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs the real control plane (kube-apiserver + etcd)"
    )


def _wants_control_plane(items: Iterable[pytest.Item]) -> bool:
    return any("control_plane" in getattr(item, "fixturenames", ()) for item in items)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Make sure the binaries exist before any test runs.

    Done here rather than in the fixture so that a cold build (tens of minutes) is not cut
    short by a per-test timeout, and so that its progress reaches the terminal.
    """
    if session.config.option.collectonly or not _wants_control_plane(session.items):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    suspend = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    result: dict[str, Path] | str
    try:
        with suspend:
            result = build.ensure(build.CONTROL_PLANE, build=build.build_allowed())
    except (build.MissingBinaryError, build.BuildError) as exc:
        result = str(exc)
    session.config.stash[_BINARIES_KEY] = result


def control_plane_binaries(config: pytest.Config) -> dict[str, Path]:
    """The control plane's binaries for this session (what ``control_plane`` runs), for other
    plugins that start control planes of their own; fails the calling test without them."""
    result = config.stash.get(_BINARIES_KEY, None)
    if result is None:
        try:
            result = build.ensure(build.CONTROL_PLANE, build=build.build_allowed())
        except (build.MissingBinaryError, build.BuildError) as exc:
            result = str(exc)
    if isinstance(result, str):
        ci = "" if build.build_allowed() else " (CI=true: binaries must be prebuilt)"
        pytest.fail(f"control plane binaries unavailable{ci}: {result}", pytrace=False)
    return result


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config) -> Iterator[ControlPlane]:
    plane = ControlPlane(binaries=control_plane_binaries(pytestconfig))
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[ApiClient]:
    api = control_plane.api_client()
    try:
        yield api
    finally:
        close_client(api)


def _namespace_name(test_name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")
    return f"t-{slug[:48].rstrip('-')}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(kube_api: ApiClient, request: pytest.FixtureRequest) -> Iterator[str]:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(kube_api)
    name = _namespace_name(request.node.name)
    core.create_namespace(
        client.V1Namespace(
            metadata=client.V1ObjectMeta(name=name, labels={"xenha.io/test": "true"})
        )
    )
    try:
        yield name
    finally:
        # Not waited for: the namespace controller empties it in the background, and the
        # random suffix keeps the next test from colliding with what is left.
        try:
            core.delete_namespace(name)
        except ApiException as exc:
            if exc.status != 404:
                raise


class ServiceAccountFactory:
    def __init__(self, plane: ControlPlane, api: ApiClient, directory: Path) -> None:
        self.plane = plane
        self.api = api
        self.directory = directory
        self.created: list[rbac.ServiceAccountCredentials] = []

    def __call__(
        self,
        namespace: str,
        name: str,
        rules: Sequence[rbac.Rule] = (),
        cluster_rules: Sequence[rbac.Rule] = (),
        **kwargs: Any,
    ) -> Path:
        return self.credentials(namespace, name, rules, cluster_rules, **kwargs).kubeconfig

    def credentials(
        self,
        namespace: str,
        name: str,
        rules: Sequence[rbac.Rule] = (),
        cluster_rules: Sequence[rbac.Rule] = (),
        **kwargs: Any,
    ) -> rbac.ServiceAccountCredentials:
        creds = rbac.service_account_kubeconfig(
            self.api,
            server=self.plane.server,
            ca_pem=self.plane.ca_pem,
            namespace=namespace,
            name=name,
            rules=rules,
            cluster_rules=cluster_rules,
            path=self.directory / f"{namespace}.{name}.kubeconfig",
            **kwargs,
        )
        self.created.append(creds)
        return creds

    def cleanup(self) -> None:
        for creds in self.created:
            rbac.delete_cluster_roles(self.api, creds.cluster_roles)


@pytest.fixture
def service_account_kubeconfig(
    control_plane: ControlPlane, kube_api: ApiClient, tmp_path: Path
) -> Iterator[ServiceAccountFactory]:
    factory = ServiceAccountFactory(control_plane, kube_api, tmp_path)
    try:
        yield factory
    finally:
        factory.cleanup()


class NodeFactory:
    def __init__(self, api: ApiClient) -> None:
        self.api = api
        self.names: list[str] = []

    def __call__(
        self,
        names: Iterable[str] | Mapping[str, Mapping[str, str]],
        labels: Mapping[str, str] | None = None,
        *,
        ready: bool = True,
    ) -> list[str]:
        """Register Nodes; ``names`` may map each name to its own labels (merged over
        ``labels``)."""
        per_node: dict[str, dict[str, str]] = (
            {n: {**(labels or {}), **own} for n, own in names.items()}
            if isinstance(names, Mapping)
            else {n: dict(labels or {}) for n in names}
        )
        for name, node_labels in per_node.items():
            nodes.register_node(self.api, name, node_labels, ready=ready)
            if name not in self.names:
                self.names.append(name)
        return list(per_node)

    def set_ready(self, name: str, ready: bool) -> None:
        nodes.set_ready(self.api, name, ready)

    def cleanup(self) -> None:
        for name in self.names:
            nodes.delete_node(self.api, name)


@pytest.fixture
def register_nodes(kube_api: ApiClient) -> Iterator[NodeFactory]:
    factory = NodeFactory(kube_api)
    try:
        yield factory
    finally:
        factory.cleanup()
