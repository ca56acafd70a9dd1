"""The Helm chart as tests (and the end-to-end suite) see it: rendered by the real `helm`.

`chart_rbac()` answers "what may each component do, according to the chart?" so that a test
can run the operator or an agent under a ServiceAccount carrying exactly those rules
(`service_account_kubeconfig(namespace, name, rules=c.rules, cluster_rules=c.cluster_rules)`).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xenha.controlplane import build

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "xenha"
RELEASE = "xenha"
NAMESPACE = "xenha-system"
COMPONENTS = ("operator", "agent")

Manifest = dict[str, Any]


def tool(name: str) -> Path:
    """Path of a pinned binary (helm, kubectl), built on first use unless CI=true."""
    return build.ensure([name], build=build.build_allowed())[name]


def helm(
    *args: str,
    values: Mapping[str, Any] | None = None,
    kubeconfig: Path | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run helm; `values` go in as a values file on stdin (`--values -`)."""
    argv = [str(tool("helm")), *args]
    if values:
        argv += ["--values", "-"]
    if kubeconfig is not None:
        argv.append(f"--kubeconfig={kubeconfig}")
    result = subprocess.run(
        argv,
        input=json.dumps(values) if values else None,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
        )
    return result


def template(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra: Sequence[str] = (),
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return helm(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        *extra,
        values=values,
        check=check,
    )


def render(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    extra: Sequence[str] = (),
) -> list[Manifest]:
    """The manifests `helm template` produces (empty documents dropped)."""
    out = template(values, release=release, namespace=namespace, extra=extra).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def find(manifests: Iterable[Manifest], kind: str, name: str | None = None) -> list[Manifest]:
    return [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]


def one(manifests: Iterable[Manifest], kind: str, name: str | None = None) -> Manifest:
    found = find(manifests, kind, name)
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@dataclass(frozen=True)
class ComponentRBAC:
    """One component's identity and rights as the chart grants them."""

    component: str
    namespace: str
    service_account: str
    # Granted by ClusterRoleBindings: everywhere.
    cluster_rules: list[dict[str, Any]] = field(default_factory=list)
    # Granted by RoleBindings in the component's own namespace.
    rules: list[dict[str, Any]] = field(default_factory=list)


def rbac_of(manifests: Sequence[Manifest]) -> dict[str, ComponentRBAC]:
    """Component -> its ServiceAccount and the rules bound to it, read from rendered manifests."""
    result: dict[str, ComponentRBAC] = {}
    for component in COMPONENTS:
        workload = next(
            m
            for m in manifests
            if m["kind"] in ("Deployment", "DaemonSet")
            and m["metadata"]["labels"].get("app.kubernetes.io/component") == component
        )
        namespace = workload["metadata"]["namespace"]
        account = workload["spec"]["template"]["spec"]["serviceAccountName"]
        subject = {"kind": "ServiceAccount", "name": account, "namespace": namespace}
        cluster_rules: list[dict[str, Any]] = []
        rules: list[dict[str, Any]] = []
        for binding in manifests:
            if binding["kind"] not in ("ClusterRoleBinding", "RoleBinding"):
                continue
            if subject not in binding["subjects"]:
                continue
            ref = binding["roleRef"]
            role_namespace = binding["metadata"].get("namespace")
            role = next(
                m
                for m in manifests
                if m["kind"] == ref["kind"]
                and m["metadata"]["name"] == ref["name"]
                and m["metadata"].get("namespace") == role_namespace
            )
            if binding["kind"] == "ClusterRoleBinding":
                cluster_rules.extend(role["rules"])
            else:
                assert role_namespace == namespace, f"{component} bound in {role_namespace}"
                rules.extend(role["rules"])
        result[component] = ComponentRBAC(component, namespace, account, cluster_rules, rules)
    return result


def chart_rbac(
    values: Mapping[str, Any] | None = None,
    *,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
) -> dict[str, ComponentRBAC]:
    """The chart's RBAC per component ("operator", "agent"), rendered by `helm template`."""
    return rbac_of(render(values, release=release, namespace=namespace))
