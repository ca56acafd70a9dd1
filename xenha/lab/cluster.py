"""The cluster side of a stack: what `helm install` and a cluster admin would have done.

The CRDs come from `crds/` (plus kopf's peering CRDs, which the chart ships), and the operator
and the agents get ServiceAccounts holding exactly the rules the chart renders
(`xenha_operator.rbac`, `xenha_agent.rbac`), with a kubeconfig each: nothing in a stack runs
with more than a real install grants.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from xenha.controlplane import nodes, rbac
from xenha.controlplane.cluster import ControlPlane
from xenha.lab import kube

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = REPO_ROOT / "crds"
XEN_HOST_LABEL = "xenha.io/xen-host"
OPERATOR_ACCOUNT = "xenha-operator"
AGENT_ACCOUNT = "xenha-agent"


def install_crds(plane: ControlPlane) -> None:
    """`kubectl apply` the CRDs and wait until they are Established."""
    from xenha_operator.peering import PEERING_CRDS

    files = sorted(CRD_DIR.glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRDs in {CRD_DIR}")
    crds = [yaml.safe_load(f.read_text()) for f in files] + list(PEERING_CRDS)
    # One kubectl apply for all: each kubectl run costs a process start and discovery.
    plane.kubectl("apply", "--filename=-", input=kube.list_document(crds))
    plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=120s",
        *(f"crd/{crd['metadata']['name']}" for crd in crds),
        timeout=150,
    )


def create_namespaces(api: ApiClient, names: Iterable[str]) -> None:
    from kubernetes import client

    core = client.CoreV1Api(api)
    for name in dict.fromkeys(names):
        core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))


def service_accounts(
    api: ApiClient, plane: ControlPlane, namespace: str, directory: Path
) -> tuple[Path, Path]:
    """The operator's and the agents' ServiceAccounts in ``namespace`` (the chart's release
    namespace), bound to their rules; returns their kubeconfigs (operator, agent)."""
    from xenha_agent.rbac import AGENT_CLUSTER_RULES, AGENT_NAMESPACE_RULES
    from xenha_operator.rbac import OPERATOR_RULES

    operator = rbac.service_account_kubeconfig(
        api,
        server=plane.server,
        ca_pem=plane.ca_pem,
        namespace=namespace,
        name=OPERATOR_ACCOUNT,
        cluster_rules=OPERATOR_RULES,
        path=directory / "operator.kubeconfig",
    )
    agent = rbac.service_account_kubeconfig(
        api,
        server=plane.server,
        ca_pem=plane.ca_pem,
        namespace=namespace,
        name=AGENT_ACCOUNT,
        rules=AGENT_NAMESPACE_RULES,
        cluster_rules=AGENT_CLUSTER_RULES,
        path=directory / "agent.kubeconfig",
    )
    return operator.kubeconfig, agent.kubeconfig


def register_xen_nodes(api: ApiClient, names: Iterable[str]) -> None:
    """Node objects for the simulated hosts (no kubelet), labelled as Xen hosts."""
    for name in names:
        nodes.register_node(api, name, {XEN_HOST_LABEL: "true"})
