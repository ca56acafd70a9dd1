"""The chart against a real kube-apiserver: accepted as rendered, installable, least privilege.

No kubelet runs, so the pods never start; what is checked is what the API server decides:
schemas, field validation, RBAC and admission. The ServiceAccount checks use tokens of the
chart's own accounts (TokenRequest), never impersonation, so they see exactly what a pod
would.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from xenha.controlplane.cluster import ControlPlane
from xenha.controlplane.kubeconfig import write_kubeconfig

from .helm import CHART, helm, template

pytestmark = pytest.mark.integration

CRDS = CHART / "crds"

# Just enough of the Prometheus Operator's CRD for the API server to accept ServiceMonitors,
# so that `serviceMonitor.enabled=true` is checked server-side like everything else.
SERVICE_MONITOR_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "servicemonitors.monitoring.coreos.com"},
    "spec": {
        "group": "monitoring.coreos.com",
        "scope": "Namespaced",
        "names": {
            "kind": "ServiceMonitor",
            "plural": "servicemonitors",
            "singular": "servicemonitor",
            "listKind": "ServiceMonitorList",
        },
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def eventually(check: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.25)


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


class Namespaces:
    """Namespaces made for one module, deleted after it (not waited for)."""

    def __init__(self, api: ApiClient) -> None:
        self.core = client.CoreV1Api(api)
        self.names: list[str] = []

    def __call__(self, prefix: str) -> str:
        name = unique(prefix)
        body: Any = {"metadata": {"name": name, "labels": {"xenha.io/test": "true"}}}
        self.core.create_namespace(body)
        self.names.append(name)
        return name

    def cleanup(self) -> None:
        for name in self.names:
            try:
                self.core.delete_namespace(name)
            except ApiException as exc:
                if exc.status != 404:
                    raise


@pytest.fixture(scope="module")
def namespaces(kube_api: ApiClient) -> Iterator[Namespaces]:
    made = Namespaces(kube_api)
    try:
        yield made
    finally:
        made.cleanup()


@pytest.fixture(scope="module")
def chart_crds(control_plane: ControlPlane) -> None:
    """The chart's CRDs, as `helm install` would apply them before the templates."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(CRDS))


@pytest.fixture(scope="module")
def service_monitor_crd(control_plane: ControlPlane) -> Iterator[None]:
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(SERVICE_MONITOR_CRD))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com",
    )
    try:
        yield
    finally:
        control_plane.kubectl(
            "delete", "crd", "servicemonitors.monitoring.coreos.com", "--wait=false", check=False
        )


# -- rendered manifests, judged by the API server ------------------------------------------


@pytest.mark.parametrize(
    "variant",
    ["defaults", "agents-apart-one-replica-monitored-process-launcher-extra-mounts"],
)
def test_the_api_server_accepts_the_rendered_chart(
    variant: str,
    control_plane: ControlPlane,
    namespaces: Namespaces,
    chart_crds: None,
    service_monitor_crd: None,
) -> None:
    release_namespace = namespaces("chart-dry")
    values: dict[str, Any] = {}
    if variant != "defaults":
        values = {
            "operator": {"replicas": 1},
            "agent": {
                "namespace": namespaces("chart-dry-agents"),
                "replicators": {"launcher": "process"},
                "extraHostPaths": [
                    {
                        "name": "xen-dump",
                        "hostPath": "/var/lib/xen/dump",
                        "mountPath": "/var/xen/dump",
                        "type": "DirectoryOrCreate",
                    }
                ],
                "extraEnv": [{"name": "XENHA_HEARTBEAT_TIMEOUT", "value": "1.0"}],
            },
            "serviceMonitor": {"enabled": True},
            "logLevel": "DEBUG",
        }
    rendered = template(values, release=unique("xenha-dry"), namespace=release_namespace).stdout
    if variant != "defaults":
        assert "kind: ServiceMonitor" in rendered
    # Strict field validation: a misspelt field in a template is an error, not a warning.
    result = control_plane.kubectl(
        "apply", "--dry-run=server", "--validate=strict", "-f", "-", input=rendered, check=False
    )
    if "privileged: Forbidden: disallowed by cluster policy" in result.stderr:
        pytest.fail(
            "the test control plane must run kube-apiserver with --allow-privileged=true, as "
            "every cluster that runs privileged DaemonSets (CNI, CSI, xenha's agents) does",
            pytrace=False,
        )
    assert result.returncode == 0, result.stderr
    assert "(server dry run)" in result.stdout


# -- a real install ------------------------------------------------------------------------


@dataclass(frozen=True)
class Install:
    release: str
    namespace: str
    agent_namespace: str
    other_namespace: str
    kubeconfig: Path

    @property
    def operator(self) -> str:
        return f"{self.release}-operator"

    @property
    def agent(self) -> str:
        return f"{self.release}-agent"


@pytest.fixture(scope="module")
def installed(
    control_plane: ControlPlane, namespaces: Namespaces, chart_crds: None
) -> Iterator[Install]:
    install = Install(
        release=unique("xenha-it"),
        namespace=namespaces("chart-release"),
        agent_namespace=namespaces("chart-agents"),
        other_namespace=namespaces("chart-tenant"),
        kubeconfig=control_plane.kubeconfig,
    )
    helm(
        "install",
        install.release,
        str(CHART),
        "--namespace",
        install.namespace,
        values={"agent": {"namespace": install.agent_namespace}},
        kubeconfig=install.kubeconfig,
    )
    try:
        yield install
    finally:
        helm(
            "uninstall",
            install.release,
            "--namespace",
            install.namespace,
            kubeconfig=install.kubeconfig,
            check=False,
        )


def test_helm_install_creates_every_object(installed: Install, kube_api: ApiClient) -> None:
    status = json.loads(
        helm(
            "status",
            installed.release,
            "--namespace",
            installed.namespace,
            "--output",
            "json",
            kubeconfig=installed.kubeconfig,
        ).stdout
    )
    assert status["info"]["status"] == "deployed"

    apps = client.AppsV1Api(kube_api)
    core = client.CoreV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    policy = client.PolicyV1Api(kube_api)
    admission = client.AdmissionregistrationV1Api(kube_api)
    extensions = client.ApiextensionsV1Api(kube_api)

    deployment = apps.read_namespaced_deployment(installed.operator, installed.namespace)
    assert deployment.spec.replicas == 2
    daemonset = apps.read_namespaced_daemon_set(installed.agent, installed.agent_namespace)
    assert daemonset.spec.template.spec is not None
    assert daemonset.spec.template.spec.node_selector == {"xenha.io/xen-host": "true"}
    core.read_namespaced_service_account(installed.operator, installed.namespace)
    core.read_namespaced_service_account(installed.agent, installed.agent_namespace)
    core.read_namespaced_service(f"{installed.operator}-metrics", installed.namespace)
    core.read_namespaced_service(f"{installed.agent}-metrics", installed.agent_namespace)
    policy.read_namespaced_pod_disruption_budget(installed.operator, installed.namespace)
    for name in (installed.operator, installed.agent):
        rbac.read_cluster_role(name)
        rbac.read_cluster_role_binding(name)
    rbac.read_namespaced_role(installed.agent, installed.agent_namespace)
    rbac.read_namespaced_role_binding(installed.agent, installed.agent_namespace)
    admission.read_validating_admission_policy(f"{installed.release}-spec-is-the-users")
    admission.read_validating_admission_policy_binding(f"{installed.release}-spec-is-the-users")
    for crd in (
        "xenreplications.xenha.io",
        "xennodes.xenha.io",
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ):
        extensions.read_custom_resource_definition(crd)


# -- least privilege, with the chart's own ServiceAccounts ---------------------------------


class Identity:
    """A kubeconfig carrying a TokenRequest token of one of the chart's ServiceAccounts."""

    def __init__(
        self, plane: ControlPlane, api: ApiClient, namespace: str, name: str, path: Path
    ) -> None:
        request: Any = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest"}
        request["spec"] = {}
        token = client.CoreV1Api(api).create_namespaced_service_account_token(
            name, namespace, request
        )
        assert token.status is not None
        self.plane = plane
        self.kubeconfig = write_kubeconfig(
            path,
            server=plane.server,
            ca_pem=plane.ca_pem,
            user=name,
            token=str(token.status.token),
            namespace=namespace,
        )

    def kubectl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.plane.kubectl(*args, kubeconfig=self.kubeconfig, check=False)

    def can(self, verb: str, resource: str, *where: str) -> bool:
        result = self.kubectl("auth", "can-i", verb, resource, *where)
        answer = result.stdout.strip()
        assert answer in ("yes", "no"), result.stderr
        return answer == "yes"


@pytest.fixture(scope="module")
def operator(
    installed: Install, control_plane: ControlPlane, kube_api: ApiClient, tmp_path_factory: Any
) -> Identity:
    path = tmp_path_factory.mktemp("operator") / "kubeconfig"
    me = Identity(control_plane, kube_api, installed.namespace, installed.operator, path)
    # RBAC reads bindings from a cache: wait until the chart's binding counts.
    eventually(lambda: me.can("watch", "xennodes.xenha.io"), "operator's ClusterRoleBinding")
    return me


@pytest.fixture(scope="module")
def agent(
    installed: Install, control_plane: ControlPlane, kube_api: ApiClient, tmp_path_factory: Any
) -> Identity:
    path = tmp_path_factory.mktemp("agent") / "kubeconfig"
    me = Identity(control_plane, kube_api, installed.agent_namespace, installed.agent, path)
    eventually(lambda: me.can("create", "xennodes.xenha.io"), "agent's ClusterRoleBinding")
    eventually(
        lambda: me.can("create", "leases.coordination.k8s.io", "-n", installed.agent_namespace),
        "agent's RoleBinding",
    )
    return me


def test_agent_reads_replications_and_reports_on_its_own_objects(
    agent: Identity, installed: Install
) -> None:
    assert agent.can("list", "xenreplications.xenha.io", "--all-namespaces")
    assert agent.can("watch", "xenreplications.xenha.io", "--all-namespaces")
    assert agent.can("patch", "xennodes.xenha.io", "--subresource=status")
    assert agent.can("update", "leases.coordination.k8s.io", "-n", installed.other_namespace)
    assert agent.can("create", "events", "-n", installed.other_namespace)


def test_agent_cannot_read_secrets_anywhere_on_its_own_account(
    agent: Identity, installed: Install
) -> None:
    # Its TLS Secrets come one by one through the operator's per-replication Roles.
    for namespace in (installed.other_namespace, installed.namespace, "kube-system"):
        assert not agent.can("get", "secrets", "-n", namespace), namespace
    assert not agent.can("get", "secrets", "-n", installed.agent_namespace)
    assert not agent.can("list", "secrets", "--all-namespaces")


def test_agent_cannot_touch_a_replications_spec_or_status(
    agent: Identity, installed: Install
) -> None:
    where = ("-n", installed.other_namespace)
    for verb in ("create", "update", "patch", "delete"):
        assert not agent.can(verb, "xenreplications.xenha.io", *where), verb
    assert not agent.can("patch", "xenreplications.xenha.io", "--subresource=status", *where)


def test_agent_creates_host_leases_only_in_its_own_namespace(
    agent: Identity, installed: Install
) -> None:
    assert agent.can("create", "leases.coordination.k8s.io", "-n", installed.agent_namespace)
    # Fencing Leases are the operator's to create; agents only move their holder.
    assert not agent.can("create", "leases.coordination.k8s.io", "-n", installed.other_namespace)
    assert not agent.can("delete", "leases.coordination.k8s.io", "-n", installed.agent_namespace)


def test_operator_owns_status_but_cannot_replace_or_create_replications(
    operator: Identity, installed: Install
) -> None:
    where = ("-n", installed.other_namespace)
    assert operator.can("patch", "xenreplications.xenha.io", "--subresource=status", *where)
    # patch: its finalizer. Spec changes through patch are refused by the spec guard (below).
    assert operator.can("patch", "xenreplications.xenha.io", *where)
    for verb in ("create", "update", "delete"):
        assert not operator.can(verb, "xenreplications.xenha.io", *where), verb


def test_operator_cannot_browse_secrets_or_move_fencing_leases(
    operator: Identity, installed: Install
) -> None:
    assert not operator.can("list", "secrets", "--all-namespaces")
    assert not operator.can("watch", "secrets", "-n", installed.other_namespace)
    assert not operator.can("delete", "secrets", "-n", installed.other_namespace)
    # Only agents change a fencing Lease's holder.
    assert not operator.can("update", "leases.coordination.k8s.io", "-n", installed.other_namespace)
    # The agents' reports are theirs.
    assert not operator.can("patch", "xennodes.xenha.io", "--subresource=status")


XR = {
    "apiVersion": "xenha.io/v1alpha1",
    "kind": "XenReplication",
    "metadata": {"name": "db1"},
    "spec": {"domain": "db1", "mode": "remus", "primaryNode": "xen-a", "secondaryNode": "xen-b"},
}


def test_the_spec_stays_the_users_even_for_the_operator(
    operator: Identity, agent: Identity, installed: Install, control_plane: ControlPlane
) -> None:
    where = ("-n", installed.other_namespace)
    control_plane.kubectl("apply", *where, "-f", "-", input=json.dumps(XR))
    spec_change = json.dumps({"spec": {"secondaryNode": "xen-c"}})

    def operator_refused() -> bool:
        result = operator.kubectl("patch", "xr", "db1", *where, "--type=merge", "-p", spec_change)
        return result.returncode != 0 and "belongs to its user" in result.stderr

    # The policy reaches the API server's admission chain asynchronously after install.
    eventually(operator_refused, "the spec guard refusing the operator's spec change")

    finalizer = json.dumps({"metadata": {"finalizers": ["xenha.io/stop-replication"]}})
    result = operator.kubectl("patch", "xr", "db1", *where, "--type=merge", "-p", finalizer)
    assert result.returncode == 0, result.stderr
    result = operator.kubectl(
        "patch", "xr", "db1", *where, "--type=merge", "-p", '{"metadata":{"finalizers":null}}'
    )
    assert result.returncode == 0, result.stderr

    result = agent.kubectl("patch", "xr", "db1", *where, "--type=merge", "-p", spec_change)
    assert result.returncode != 0
    assert "forbidden" in result.stderr.lower()

    # The user (here the admin) changes the spec freely.
    control_plane.kubectl("patch", "xr", "db1", *where, "--type=merge", "-p", spec_change)
    spec = json.loads(control_plane.kubectl("get", "xr", "db1", *where, "-o", "json").stdout)
    assert spec["spec"]["secondaryNode"] == "xen-c"


def test_upgrade_then_uninstall_leaves_only_the_crds(
    control_plane: ControlPlane, kube_api: ApiClient, namespaces: Namespaces, chart_crds: None
) -> None:
    release, namespace = unique("xenha-up"), namespaces("chart-upgrade")
    kubeconfig = control_plane.kubeconfig
    apps = client.AppsV1Api(kube_api)
    rbac = client.RbacAuthorizationV1Api(kube_api)
    helm("install", release, str(CHART), "--namespace", namespace, kubeconfig=kubeconfig)

    helm(
        "upgrade",
        release,
        str(CHART),
        "--namespace",
        namespace,
        values={"operator": {"replicas": 1}, "agent": {"replicators": {"launcher": "process"}}},
        kubeconfig=kubeconfig,
    )
    deployment = apps.read_namespaced_deployment(f"{release}-operator", namespace)
    assert deployment.spec is not None
    assert deployment.spec.replicas == 1
    daemonset = apps.read_namespaced_daemon_set(f"{release}-agent", namespace)
    assert daemonset.spec is not None
    assert daemonset.spec.template.spec is not None
    assert not daemonset.spec.template.spec.host_pid

    helm("uninstall", release, "--namespace", namespace, kubeconfig=kubeconfig)
    # Cluster-scoped objects go with the release; the CRDs stay (and so do users' objects).
    for name in (f"{release}-operator", f"{release}-agent"):
        with pytest.raises(ApiException) as gone:
            rbac.read_cluster_role(name)
        assert gone.value.status == 404
    client.ApiextensionsV1Api(kube_api).read_custom_resource_definition("xenreplications.xenha.io")
