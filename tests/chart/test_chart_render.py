"""What `helm template` makes of the chart, checked against what the components actually read.

The chart and the Python code meet at environment variables, arguments, ports and paths; each
test here feeds the rendered container to the component's own settings parser, so a renamed
variable or a moved port fails here rather than on a Xen host.
"""

from __future__ import annotations

from typing import Any

import pytest
from xenha_agent.config import AgentSettings
from xenha_operator.settings import PEERING_NAME, parse_args

from .helm import CHART, NAMESPACE, REPO, find, helm, one, render, template

OPERATOR = "xenha-operator"
AGENT = "xenha-agent"


def container(workload: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = workload["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def environment(c: dict[str, Any], downward: dict[str, str] | None = None) -> dict[str, str]:
    """The container's env as the process would see it, with downward-API fields filled in."""
    downward = downward or {}
    env: dict[str, str] = {}
    for var in c.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
        else:
            field = var["valueFrom"]["fieldRef"]["fieldPath"]
            env[var["name"]] = downward[field]
    return env


def port(c: dict[str, Any], name: str) -> int:
    return int(next(p["containerPort"] for p in c["ports"] if p["name"] == name))


def host_paths(workload: dict[str, Any]) -> dict[str, str]:
    """mountPath -> hostPath of every hostPath volume the container mounts."""
    spec = workload["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {
        m["mountPath"]: volumes[m["name"]]["hostPath"]["path"]
        for m in container(workload)["volumeMounts"]
        if "hostPath" in volumes[m["name"]]
    }


@pytest.fixture(scope="module")
def default() -> list[dict[str, Any]]:
    return render()


# -- lint ----------------------------------------------------------------------------------


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
def test_helm_lint_finds_nothing_to_complain_about(strict: bool) -> None:
    result = helm("lint", str(CHART), *(["--strict"] if strict else []))
    assert "0 chart(s) failed" in result.stdout


# -- the operator --------------------------------------------------------------------------


def test_operator_runs_two_peered_replicas_under_the_settings_the_operator_reads(
    default: list[dict[str, Any]],
) -> None:
    deployment = one(default, "Deployment", OPERATOR)
    daemonset = one(default, "DaemonSet", AGENT)
    c = container(deployment)
    assert deployment["spec"]["replicas"] == 2
    assert c["command"] == ["xenha"]
    assert c["args"][0] == "operator"

    settings = parse_args(c["args"][1:], environ=environment(c, {"metadata.name": "op-0"}))
    assert settings.peering_name == PEERING_NAME
    assert not settings.standalone
    assert settings.clusterwide
    # The per-replication RoleBinding must name the account the agents really run as.
    assert settings.agent_namespace == daemonset["metadata"]["namespace"]
    assert (
        settings.agent_service_account
        == (daemonset["spec"]["template"]["spec"]["serviceAccountName"])
    )
    assert settings.liveness_endpoint == f"http://0.0.0.0:{port(c, 'health')}/healthz"
    assert settings.metrics_port == port(c, "metrics")
    # kopf's peer identity is the pod name, so `kubectl get clusterkopfpeering` names pods.
    assert environment(c, {"metadata.name": "op-0"})["POD_ID"] == "op-0"


def test_operator_pod_is_locked_down(default: list[dict[str, Any]]) -> None:
    pod = one(default, "Deployment", OPERATOR)["spec"]["template"]["spec"]
    c = container(one(default, "Deployment", OPERATOR))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostNetwork" not in pod
    assert c["resources"]["requests"]
    assert c["resources"]["limits"]


def test_operator_is_probed_on_kopfs_health_endpoint(default: list[dict[str, Any]]) -> None:
    c = container(one(default, "Deployment", OPERATOR))
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}, probe


def test_a_drain_evicts_one_operator_replica_at_a_time(default: list[dict[str, Any]]) -> None:
    pdb = one(default, "PodDisruptionBudget", OPERATOR)
    deployment = one(default, "Deployment", OPERATOR)
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == deployment["spec"]["selector"]


def test_one_operator_replica_still_renders_a_pdb_that_lets_a_drain_proceed() -> None:
    manifests = render({"operator": {"replicas": 1}})
    assert one(manifests, "Deployment", OPERATOR)["spec"]["replicas"] == 1
    assert one(manifests, "PodDisruptionBudget", OPERATOR)["spec"]["maxUnavailable"] == 1


# -- the agent -----------------------------------------------------------------------------

DOWNWARD = {"spec.nodeName": "xen-a", "metadata.namespace": NAMESPACE, "status.hostIP": "10.0.0.5"}


def test_agent_runs_on_every_labelled_xen_host_one_node_at_a_time(
    default: list[dict[str, Any]],
) -> None:
    daemonset = one(default, "DaemonSet", AGENT)
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"xenha.io/xen-host": "true"}
    assert {"operator": "Exists"} in pod["tolerations"]
    assert daemonset["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 1},
    }
    assert pod["terminationGracePeriodSeconds"] > 0
    assert pod["hostNetwork"] is True
    assert container(daemonset)["command"] == ["xenha"]
    assert container(daemonset)["args"] == ["agent"]


def test_agent_settings_come_from_the_downward_api_and_match_the_mounts(
    default: list[dict[str, Any]],
) -> None:
    daemonset = one(default, "DaemonSet", AGENT)
    c = container(daemonset)
    settings = AgentSettings.from_env(environment(c, DOWNWARD))
    mounts = host_paths(daemonset)
    assert settings.node_name == "xen-a"
    assert settings.namespace == NAMESPACE
    # Peers dial the node address on the relay port the pod declares (host network).
    assert settings.relay_endpoint == f"10.0.0.5:{port(c, 'relay')}"
    assert settings.health_port == port(c, "metrics")
    # The run dir must be the host's: the next agent finds the replicators' sockets there.
    assert mounts[str(settings.run_dir)] == str(settings.run_dir)
    assert mounts[str(settings.xenstore_socket.parent)] == "/var/run/xenstored"


def test_agent_reaches_xen_through_host_mounts_and_privilege(
    default: list[dict[str, Any]],
) -> None:
    daemonset = one(default, "DaemonSet", AGENT)
    mounts = host_paths(daemonset)
    for path in ("/dev/xen", "/proc/xen", "/var/run/xenstored", "/etc/xen", "/var/lib/xen"):
        assert mounts[path] == path
    sc = container(daemonset)["securityContext"]
    assert sc["privileged"] is True
    assert sc["runAsUser"] == 0
    # Replicators may outlive this container's writable layer: nothing may depend on it.
    assert sc["readOnlyRootFilesystem"] is True


def test_agent_probes_ask_the_agents_own_health_server(default: list[dict[str, Any]]) -> None:
    from xenha_agent.metrics import AgentMetrics, Health, HealthServer

    server = HealthServer(Health(), AgentMetrics(), host="127.0.0.1", port=0)
    served = {route.resource.canonical for route in server.app().router.routes() if route.resource}
    c = container(one(default, "DaemonSet", AGENT))
    assert c["startupProbe"]["httpGet"]["path"] in served
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Readiness paces the rolling update: the next node waits until this agent re-attached.
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert {"/healthz", "/readyz"} <= served
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["port"] == "metrics"


def test_replicators_outlive_the_agent_container_by_default(
    default: list[dict[str, Any]],
) -> None:
    daemonset = one(default, "DaemonSet", AGENT)
    pod = daemonset["spec"]["template"]["spec"]
    settings = AgentSettings.from_env(environment(container(daemonset), DOWNWARD))
    assert settings.replicator_launcher == "systemd-scope"
    # Without the host PID namespace the kernel kills every replicator with the container.
    assert pod["hostPID"] is True
    assert host_paths(daemonset)["/run/systemd"] == "/run/systemd"


def test_process_launcher_keeps_replicators_in_the_container() -> None:
    daemonset = one(render({"agent": {"replicators": {"launcher": "process"}}}), "DaemonSet")
    settings = AgentSettings.from_env(environment(container(daemonset), DOWNWARD))
    assert settings.replicator_launcher == "process"
    assert daemonset["spec"]["template"]["spec"]["hostPID"] is False
    assert "/run/systemd" not in host_paths(daemonset)


def test_agents_can_live_in_their_own_namespace() -> None:
    manifests = render({"agent": {"namespace": "xenha-agents"}})
    daemonset = one(manifests, "DaemonSet", AGENT)
    assert daemonset["metadata"]["namespace"] == "xenha-agents"
    assert one(manifests, "ServiceAccount", AGENT)["metadata"]["namespace"] == "xenha-agents"
    assert one(manifests, "Role", AGENT)["metadata"]["namespace"] == "xenha-agents"
    binding = one(manifests, "ClusterRoleBinding", AGENT)
    assert binding["subjects"][0]["namespace"] == "xenha-agents"
    # The agents learn their namespace from where they run, the operator from the chart.
    namespace_var = next(v for v in container(daemonset)["env"] if v["name"] == "XENHA_NAMESPACE")
    assert namespace_var["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    operator = container(one(manifests, "Deployment", OPERATOR))
    settings = parse_args([], environ=environment(operator, {"metadata.name": "op"}))
    assert settings.agent_namespace == "xenha-agents"
    # The operator itself stays in the release namespace.
    assert one(manifests, "Deployment", OPERATOR)["metadata"]["namespace"] == NAMESPACE


# -- everything ----------------------------------------------------------------------------


def test_every_namespaced_object_names_its_namespace(default: list[dict[str, Any]]) -> None:
    cluster_scoped = {
        "ClusterRole",
        "ClusterRoleBinding",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    }
    for manifest in default:
        has_namespace = "namespace" in manifest["metadata"]
        assert has_namespace == (manifest["kind"] not in cluster_scoped), manifest["kind"]


def test_metrics_services_select_their_pods(default: list[dict[str, Any]]) -> None:
    for name, kind in ((OPERATOR, "Deployment"), (AGENT, "DaemonSet")):
        service = one(default, "Service", f"{name}-metrics")
        workload = one(default, kind, name)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_service_monitors_only_when_asked(default: list[dict[str, Any]]) -> None:
    assert find(default, "ServiceMonitor") == []
    manifests = render({"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}})
    monitors = find(manifests, "ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == [AGENT, OPERATOR]
    for monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "prom"
        assert monitor["spec"]["endpoints"][0]["port"] == "metrics"


def test_images_default_to_the_app_version_and_can_be_pinned_by_digest(
    default: list[dict[str, Any]],
) -> None:
    assert container(one(default, "Deployment", OPERATOR))["image"].endswith("xenha-operator:0.1.0")
    digest = "sha256:" + "ab" * 32
    manifests = render({"agent": {"image": {"digest": digest}}})
    assert container(one(manifests, "DaemonSet", AGENT))["image"].endswith(f"xenha-agent@{digest}")


def test_spec_guard_covers_exactly_xenhas_own_accounts(default: list[dict[str, Any]]) -> None:
    policy = one(default, "ValidatingAdmissionPolicy")
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert f"system:serviceaccount:{NAMESPACE}:{OPERATOR}" in condition
    assert f"system:serviceaccount:{NAMESPACE}:{AGENT}" in condition
    rules = policy["spec"]["matchConstraints"]["resourceRules"]
    # The main resource only: status writes (the operator's job) never reach the policy.
    assert [r["resources"] for r in rules] == [["xenreplications"]]
    binding = one(default, "ValidatingAdmissionPolicyBinding")
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]


def test_chart_ships_the_crds_generated_from_the_models() -> None:
    for name in ("xenreplications.xenha.io.yaml", "xennodes.xenha.io.yaml"):
        shipped = CHART / "crds" / name
        assert shipped.read_text() == (REPO / "crds" / name).read_text(), name


def test_install_notes_say_what_to_do_next() -> None:
    out = helm("install", "xenha", str(CHART), "--namespace", NAMESPACE, "--dry-run=client").stdout
    notes = out[out.index("NOTES:") :]
    assert "kubectl label node <xen-host-a> <xen-host-b> xenha.io/xen-host=true\n" in notes
    assert "kind: XenReplication" in notes
    assert "kubectl get xr -A -w" in notes
    process = helm(
        "install",
        "xenha",
        str(CHART),
        "--namespace",
        NAMESPACE,
        "--dry-run=client",
        values={"agent": {"replicators": {"launcher": "process"}}},
    ).stdout
    assert "an agent restart interrupts protection" in process


# -- values.schema.json --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"operator": {"replicas": "two"}}, "operator/replicas"),
        ({"operator": {"replicas": 0}}, "operator/replicas"),
        ({"agent": {"replicators": {"launcher": "nohup"}}}, "agent/replicators/launcher"),
        ({"agent": {"relay": {"port": 70000}}}, "agent/relay/port"),
        ({"agent": {"hostPaths": {"runDir": "run/xenha"}}}, "agent/hostPaths/runDir"),
        ({"operator": {"replicsa": 2}}, "replicsa"),
        ({"logLevel": "LOUD"}, "logLevel"),
    ],
    ids=[
        "replicas-not-a-number",
        "zero-replicas",
        "unknown-launcher",
        "port-out-of-range",
        "relative-host-path",
        "misspelt-key",
        "unknown-log-level",
    ],
)
def test_schema_rejects_bad_values_naming_the_key(values: dict[str, Any], complaint: str) -> None:
    result = template(values, check=False)
    assert result.returncode != 0, f"helm accepted {values}"
    assert "values don't meet the specifications of the schema" in result.stderr
    assert complaint in result.stderr, result.stderr
