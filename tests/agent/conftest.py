"""Fixtures for the agent's tests against the real control plane.

- ``xenha_crds`` (session): the generated XenReplication and XenNode CRDs, installed and
  Established.
- ``agent_kubeconfig``: factory ``(namespace, name="xenha-agent") -> Path`` of a kubeconfig
  holding exactly the agent's RBAC (``xenha_agent.rbac``): its cluster rules, and its
  namespaced rules in ``namespace``.
- ``admin_kubeconfig``: the control plane's admin kubeconfig.
- ``run``: runs coroutines on one event loop kept for the whole test.
- ``scene``: a ``Scene`` (scene.py) in a fresh namespace: the test plays the operator.
- ``host`` (module): one simulated Xen host, ``sim-a``.
- ``pair``: two simulated Xen hosts, ``ha`` and ``hb``, on one fabric (their guests can
  reach each other's services).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from xenha_agent.kube import Conflict, KubeClient
from xenha_agent.rbac import AGENT_CLUSTER_RULES, AGENT_NAMESPACE_RULES

from .scene import Scene

if TYPE_CHECKING:
    from xenha.controlplane.cluster import ControlPlane
    from xenha.testing.fixtures import ServiceAccountFactory


async def _install_crds(kubeconfig: Path, crds: list[dict[str, Any]]) -> None:
    kube = KubeClient.from_kubeconfig(kubeconfig)
    base = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
    try:
        for crd in crds:
            name = crd["metadata"]["name"]
            try:
                await kube.create(base, crd)
            except Conflict:
                current = await kube.get(f"{base}/{name}")
                meta = {
                    **crd["metadata"],
                    "resourceVersion": current["metadata"]["resourceVersion"],
                }
                await kube.replace(f"{base}/{name}", {**crd, "metadata": meta})
            for _ in range(600):
                if _established(await kube.get(f"{base}/{name}")):
                    break
                await asyncio.sleep(0.1)
            else:
                raise TimeoutError(f"CRD {name} not Established after 60 s")
    finally:
        await kube.close()


def _established(crd: dict[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="session")
def xenha_crds(control_plane: ControlPlane) -> None:
    from xenha.api.crd import xennode_crd, xenreplication_crd

    crds = [xenreplication_crd(), xennode_crd()]
    asyncio.run(_install_crds(Path(control_plane.kubeconfig), crds))


@pytest.fixture
def agent_kubeconfig(
    service_account_kubeconfig: ServiceAccountFactory,
) -> Callable[..., Path]:
    def make(namespace: str, name: str = "xenha-agent") -> Path:
        creds = service_account_kubeconfig.credentials(
            namespace, name, AGENT_NAMESPACE_RULES, AGENT_CLUSTER_RULES
        )
        return creds.kubeconfig

    return make


@pytest.fixture
def admin_kubeconfig(control_plane: ControlPlane) -> Path:
    return Path(control_plane.kubeconfig)


@pytest.fixture
def run() -> Iterator[Callable[..., Any]]:
    """Run a coroutine to completion on one event loop kept for the whole test."""
    loop = asyncio.new_event_loop()
    try:
        yield loop.run_until_complete
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture
def scene(
    namespace: str,
    xenha_crds: None,
    agent_kubeconfig: Callable[..., Path],
    admin_kubeconfig: Path,
    run: Callable[..., Any],
) -> Iterator[Scene]:
    """A replication `db1` between two fresh node names, with what the operator would make."""
    admin = KubeClient.from_kubeconfig(admin_kubeconfig)
    # Short: AF_UNIX socket paths (the agents' run dirs hold them) are limited to 107 bytes.
    short = Path(tempfile.mkdtemp(prefix="xa-", dir="/tmp"))
    made = Scene(namespace, admin, agent_kubeconfig(namespace), short)
    try:
        yield made
    finally:
        run(made.cleanup())
        run(admin.close())
        shutil.rmtree(short, ignore_errors=True)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from xenha.sim.host import SimHost

    started = SimHost.start(tmp_path_factory.mktemp("sim-a"), "sim-a")
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from xenha.sim.host import SimHost

    fabric = tmp_path_factory.mktemp("fabric")
    started: dict[str, Any] = {}
    try:
        for name in ("ha", "hb"):
            started[name] = SimHost.start(tmp_path_factory.mktemp(name), name, fabric_dir=fabric)
        yield started
    finally:
        for one in started.values():
            one.stop()
