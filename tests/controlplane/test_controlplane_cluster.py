"""Proof that the test control plane is a real one: CRDs, RBAC, garbage collection, namespace
deletion, TokenRequest, and that nothing it starts outlives its owner.

Waits poll the API with generous deadlines and assert on the final state only, never on how
long it took: two loaded cores may be slow, and slow must not mean red.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client import ApiClient, V1ObjectMeta
from kubernetes.client.exceptions import ApiException

from xenha.controlplane import build
from xenha.controlplane.cluster import ControlPlane, close_client
from xenha.testing.fixtures import NodeFactory, ServiceAccountFactory

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def eventually(check: Callable[[], bool], what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"never happened: {what}")
        time.sleep(0.25)


def meta(obj: Any) -> V1ObjectMeta:
    assert obj.metadata is not None
    return obj.metadata  # type: ignore[no-any-return]


def configmap(name: str, **metadata: Any) -> client.V1ConfigMap:
    return client.V1ConfigMap(metadata=client.V1ObjectMeta(name=name, **metadata))


def gone(read: Callable[[], Any]) -> Callable[[], bool]:
    def check() -> bool:
        try:
            read()
        except ApiException as exc:
            if exc.status == 404:
                return True
            raise
        return False

    return check


def test_server_is_the_pinned_version(control_plane: ControlPlane) -> None:
    out = control_plane.kubectl("version", "-o", "json").stdout
    expected = build.load_components()["kube"].version
    assert json.loads(out)["serverVersion"]["gitVersion"].startswith(expected)


def test_crd_installs_and_is_established(control_plane: ControlPlane, kube_api: ApiClient) -> None:
    ext = client.ApiextensionsV1Api(kube_api)
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.xenha.io"},
        "spec": {
            "group": "test.xenha.io",
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                    "additionalPrinterColumns": [
                        {"name": "Size", "type": "integer", "jsonPath": ".spec.size"}
                    ],
                }
            ],
        },
    }
    model = client.V1CustomResourceDefinition.from_dict(crd)
    assert model is not None
    ext.create_custom_resource_definition(model)
    try:

        def established() -> bool:
            status = ext.read_custom_resource_definition("widgets.test.xenha.io").status
            conditions = status.conditions or [] if status else []
            return any(c.type == "Established" and c.status == "True" for c in conditions)

        eventually(established, "CRD Established")
        custom = client.CustomObjectsApi(kube_api)
        body = {"apiVersion": "test.xenha.io/v1", "kind": "Widget", "metadata": {"name": "w"}}
        # Schema validation runs server-side: a real apiserver rejects size 0.
        with pytest.raises(ApiException) as rejected:
            custom.create_namespaced_custom_object(
                "test.xenha.io", "v1", "default", "widgets", {**body, "spec": {"size": 0}}
            )
        assert rejected.value.status == 422
        custom.create_namespaced_custom_object(
            "test.xenha.io", "v1", "default", "widgets", {**body, "spec": {"size": 3}}
        )
        table = control_plane.kubectl("get", "widgets", "-n", "default").stdout.splitlines()
        assert table[0].split() == ["NAME", "SIZE"]
        assert table[1].split() == ["w", "3"]
    finally:
        ext.delete_custom_resource_definition("widgets.test.xenha.io")


def test_service_account_without_rights_is_forbidden(
    control_plane: ControlPlane, namespace: str, service_account_kubeconfig: ServiceAccountFactory
) -> None:
    kubeconfig = service_account_kubeconfig(namespace, "nobody", rules=[])
    api = control_plane.api_client(kubeconfig)
    try:
        with pytest.raises(ApiException) as forbidden:
            client.CoreV1Api(api).list_namespaced_config_map(namespace)
    finally:
        close_client(api)
    assert forbidden.value.status == 403
    # Authenticated (a 401 would mean the token is bad), just not authorized.
    assert f"system:serviceaccount:{namespace}:nobody" in str(forbidden.value.body)


def test_service_account_gets_exactly_its_rules(
    control_plane: ControlPlane,
    kube_api: ApiClient,
    namespace: str,
    service_account_kubeconfig: ServiceAccountFactory,
) -> None:
    client.CoreV1Api(kube_api).create_namespaced_config_map(namespace, configmap("visible"))
    kubeconfig = service_account_kubeconfig(
        namespace,
        "reader",
        rules=[{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}],
        cluster_rules=[{"apiGroups": [""], "resources": ["nodes"], "verbs": ["list"]}],
    )
    api = control_plane.api_client(kubeconfig)
    try:
        core = client.CoreV1Api(api)
        names = [meta(cm).name for cm in core.list_namespaced_config_map(namespace).items]
        assert "visible" in names
        core.list_node()
        denied: list[Callable[[], object]] = [
            lambda: core.create_namespaced_config_map(namespace, configmap("x")),
            lambda: core.list_namespaced_secret(namespace),
            lambda: core.list_namespaced_config_map("default"),
        ]
        for call in denied:
            with pytest.raises(ApiException) as forbidden:
                call()
            assert forbidden.value.status == 403
    finally:
        close_client(api)

    whoami = control_plane.kubectl("auth", "whoami", "-o", "json", kubeconfig=kubeconfig)
    user = json.loads(whoami.stdout)["status"]["userInfo"]
    assert user["username"] == f"system:serviceaccount:{namespace}:reader"
    # Issued by the TokenRequest API: the token is bound to the ServiceAccount's uid.
    assert "authentication.kubernetes.io/credential-id" in user.get("extra", {})


def test_owned_object_is_garbage_collected(kube_api: ApiClient, namespace: str) -> None:
    core = client.CoreV1Api(kube_api)
    owner = core.create_namespaced_config_map(namespace, configmap("owner"))
    uid = meta(owner).uid
    assert uid is not None
    reference = client.V1OwnerReference(api_version="v1", kind="ConfigMap", name="owner", uid=uid)
    core.create_namespaced_config_map(
        namespace, configmap("dependent", owner_references=[reference])
    )
    core.create_namespaced_config_map(namespace, configmap("bystander"))
    core.delete_namespaced_config_map("owner", namespace, propagation_policy="Background")
    eventually(
        gone(lambda: core.read_namespaced_config_map("dependent", namespace)),
        "dependent collected after its owner was deleted",
    )
    core.read_namespaced_config_map("bystander", namespace)


def test_namespace_deletion_completes(kube_api: ApiClient) -> None:
    core = client.CoreV1Api(kube_api)
    name = f"t-ns-delete-{os.getpid()}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=name)))
    core.create_namespaced_config_map(name, configmap("content"))
    core.delete_namespace(name)
    # Without the namespace controller it would sit in Terminating forever.
    eventually(gone(lambda: core.read_namespace(name)), "namespace deleted")


def test_register_nodes(kube_api: ApiClient, register_nodes: NodeFactory) -> None:
    names = register_nodes(
        {"xen-a": {"xenha.io/site": "a"}, "xen-b": {"xenha.io/site": "b"}},
        labels={"xenha.io/xen": "true"},
    )
    assert names == ["xen-a", "xen-b"]
    core = client.CoreV1Api(kube_api)
    listed = core.list_node(label_selector="xenha.io/xen=true").items
    assert sorted(str(meta(n).name) for n in listed) == ["xen-a", "xen-b"]
    assert (meta(core.read_node("xen-a")).labels or {})["xenha.io/site"] == "a"
    assert ready_conditions(core.read_node("xen-a")) == [("Ready", "True")]
    register_nodes.set_ready("xen-b", False)
    assert ready_conditions(core.read_node("xen-b")) == [("Ready", "False")]


def ready_conditions(node: client.V1Node) -> list[tuple[str, str]]:
    assert node.status is not None
    return [(c.type, c.status) for c in node.status.conditions or []]


# --- nothing outlives its owner -------------------------------------------------------------

_CHILD = """
import json, sys, time
from pathlib import Path
from xenha.controlplane.cluster import ControlPlane
binaries = {k: Path(v) for k, v in json.loads(sys.argv[1]).items()}
plane = ControlPlane(binaries=binaries, wait_for_controllers=False).start()
print(json.dumps({"pids": plane.pids, "workdir": str(plane.workdir)}), flush=True)
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in {"Z", "X"}


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_owner_death_leaves_no_orphans(control_plane: ControlPlane, signum: int) -> None:
    assert control_plane.binaries is not None
    binaries = json.dumps({k: str(v) for k, v in control_plane.binaries.items()})
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", _CHILD, binaries],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert owner.stdout is not None
        started = json.loads(owner.stdout.readline())
        pids: dict[str, int] = started["pids"]
        assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager"}
        assert all(_running(p) for p in pids.values())
        owner.send_signal(signum)
        owner.wait(timeout=60)
        eventually(
            lambda: not any(_running(p) for p in pids.values()),
            f"control plane processes gone after the owner got {signal.Signals(signum).name}",
            timeout=60,
        )
        eventually(lambda: not Path(started["workdir"]).exists(), "workdir removed", timeout=30)
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()
