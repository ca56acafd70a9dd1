"""Fixtures for running the operator against the real control plane.

- ``operator_crds`` (session): XenReplication and XenNode CRDs (generated from the models) and
  kopf's peering CRDs, installed and Established.
- ``admin``: an ``Admin`` with the admin's credentials, for setting scenes (acting as the
  user and as the agents) and checking.
- ``start_operator``: factory starting ``python -m xenha_operator`` as a subprocess with exactly
  the operator's RBAC (``xenha_operator.rbac.OPERATOR_RULES``) and short test timings;
  stopped after the test.
- ``agents``: fake agents writing XenNode reports (heartbeat every 0.5 s) for the test's nodes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from xenha.api import API_VERSION, GROUP, VERSION
from xenha.api.fencing import HOST_LEASE, HOST_LEASE_LABEL, LEASE_KIND_LABEL, host_lease_name

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

    from xenha.controlplane.cluster import ControlPlane
    from xenha.testing.fixtures import ServiceAccountFactory

REPO = Path(__file__).resolve().parents[2]


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class Admin:
    """Synchronous admin access through the kubernetes client, dicts in and out."""

    def __init__(self, api: ApiClient) -> None:
        from kubernetes import client

        self.api = api
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.rbac = client.RbacAuthorizationV1Api(api)

    def plain(self, obj: Any) -> dict[str, Any]:
        return dict(self.api.sanitize_for_serialization(obj))  # type: ignore[no-untyped-call]

    # --- generic ------------------------------------------------------------------------

    def get(self, group: str, version: str, plural: str, ns: str | None, name: str) -> Any:
        from kubernetes.client.exceptions import ApiException

        try:
            if ns is None:
                return self.custom.get_cluster_custom_object(group, version, plural, name)
            return self.custom.get_namespaced_custom_object(group, version, ns, plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # --- XenReplication -----------------------------------------------------------------

    def create_xr(self, ns: str, name: str, spec: Mapping[str, Any], **meta: Any) -> Any:
        body = {
            "apiVersion": API_VERSION,
            "kind": "XenReplication",
            "metadata": {"name": name, "namespace": ns, **meta},
            "spec": dict(spec),
        }
        return self.custom.create_namespaced_custom_object(
            GROUP, VERSION, ns, "xenreplications", body
        )

    def xr(self, ns: str, name: str) -> Any:
        return self.get(GROUP, VERSION, "xenreplications", ns, name)

    def patch_xr(self, ns: str, name: str, patch: Mapping[str, Any]) -> Any:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, ns, "xenreplications", name, dict(patch)
        )

    def delete_xr(self, ns: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, ns, "xenreplications", name)

    def strip_finalizers(self, ns: str) -> None:
        """Let a test's leftovers go even if the operator is no longer there to release them."""
        items: Any = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, ns, "xenreplications"
        )
        for item in items.get("items", []):
            with contextlib.suppress(Exception):
                self.patch_xr(ns, item["metadata"]["name"], {"metadata": {"finalizers": None}})

    # --- XenNode (as the agents) --------------------------------------------------------

    def report(self, node: str, status: Mapping[str, Any]) -> None:
        from kubernetes.client.exceptions import ApiException

        if self.get(GROUP, VERSION, "xennodes", None, node) is None:
            with contextlib.suppress(ApiException):
                self.custom.create_cluster_custom_object(
                    GROUP,
                    VERSION,
                    "xennodes",
                    {"apiVersion": API_VERSION, "kind": "XenNode", "metadata": {"name": node}},
                )
        current = self.get(GROUP, VERSION, "xennodes", None, node)
        current["status"] = dict(status)
        self.custom.replace_cluster_custom_object_status(GROUP, VERSION, "xennodes", node, current)

    def delete_xennode(self, node: str) -> None:
        with contextlib.suppress(Exception):
            self.custom.delete_cluster_custom_object(GROUP, VERSION, "xennodes", node)

    # --- Leases, Secrets, Events --------------------------------------------------------

    def lease(self, ns: str, name: str) -> Any:
        return self.get("coordination.k8s.io", "v1", "leases", ns, name)

    def take_lease(self, ns: str, name: str, holder: str) -> None:
        """What an agent does when it acquires the fencing Lease (optimistic update)."""
        lease = self.lease(ns, name)
        spec = lease["spec"]
        spec["holderIdentity"] = holder
        spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        spec["acquireTime"] = spec["renewTime"] = now_iso()
        self.custom.replace_namespaced_custom_object(
            "coordination.k8s.io", "v1", ns, "leases", name, lease
        )

    def renew_host_lease(self, ns: str, node: str) -> None:
        """What a node's agent does every D/4: create or renew its host Lease."""
        name = host_lease_name(node)
        lease = self.lease(ns, name)
        if lease is None:
            spec = {"holderIdentity": node, "leaseDurationSeconds": 2, "renewTime": now_iso()}
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": name,
                    "labels": {HOST_LEASE_LABEL: "true", LEASE_KIND_LABEL: HOST_LEASE},
                },
                "spec": spec,
            }
            self.custom.create_namespaced_custom_object(
                "coordination.k8s.io", "v1", ns, "leases", body
            )
            return
        lease["spec"]["renewTime"] = now_iso()
        self.custom.replace_namespaced_custom_object(
            "coordination.k8s.io", "v1", ns, "leases", name, lease
        )

    def secret(self, ns: str, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self.plain(self.core.read_namespaced_secret(name, ns))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def role(self, ns: str, name: str) -> Any:
        return self.get("rbac.authorization.k8s.io", "v1", "roles", ns, name)

    def rolebinding(self, ns: str, name: str) -> Any:
        return self.get("rbac.authorization.k8s.io", "v1", "rolebindings", ns, name)

    def events(self, ns: str, name: str) -> list[dict[str, Any]]:
        items = self.plain(
            self.core.list_namespaced_event(ns, field_selector=f"involvedObject.name={name}")
        )["items"]
        return sorted(items, key=lambda e: e.get("eventTime") or e.get("firstTimestamp") or "")

    def peers(self, ns: str) -> dict[str, Any]:
        """Operator replicas in the namespace's kopf peering (identity -> record)."""
        peering = self.get("kopf.dev", "v1", "kopfpeerings", ns, "xenha-operator")
        return dict((peering or {}).get("status") or {})

    def event_reasons(self, ns: str, name: str) -> list[str]:
        return [e["reason"] for e in self.events(ns, name)]

    def reporters(self, ns: str, name: str) -> dict[str, str]:
        """Which operator replica posted each Event reason (the last one, if repeated)."""
        return {e["reason"]: e.get("reportingInstance", "") for e in self.events(ns, name)}


def wait_for(
    what: str, check: Callable[[], Any], timeout: float = 60, interval: float = 0.2
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="session")
def operator_crds(control_plane: ControlPlane) -> None:
    import yaml
    from xenha_operator.peering import PEERING_CRDS

    from xenha.api.crd import xennode_crd, xenreplication_crd

    crds = [xenreplication_crd(), xennode_crd(), *PEERING_CRDS]
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(crds))
    for crd in crds:
        name = crd["metadata"]["name"]
        control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{name}")


@pytest.fixture
def admin(kube_api: ApiClient) -> Admin:
    return Admin(kube_api)


class OperatorProcess:
    def __init__(self, argv: list[str], log: Path, name: str) -> None:
        self.log = log
        self.name = name
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            argv,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            # POD_NAME becomes the Events' reportingInstance: which replica said what.
            env={**os.environ, "PYTHONUNBUFFERED": "1", "POD_NAME": name},
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL: the replica vanishes without a goodbye (no peering record removal)."""
        if self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()
        self._out.close()

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def start_operator(
    operator_crds: None,
    service_account_kubeconfig: ServiceAccountFactory,
    namespace: str,
    admin: Admin,
    tmp_path: Path,
) -> Iterator[Callable[..., OperatorProcess]]:
    from xenha_operator.rbac import OPERATOR_RULES

    kubeconfig = service_account_kubeconfig(namespace, "xenha-operator", (), OPERATOR_RULES)
    started: list[OperatorProcess] = []

    def start(*extra: str, name: str = "operator") -> OperatorProcess:
        argv = [
            sys.executable,
            "-m",
            "xenha_operator",
            f"--kubeconfig={kubeconfig}",
            f"--namespace={namespace}",
            "--report-stale-after=3",
            "--resync-interval=0.5",
            "--stats-interval=1",
            "--switchover-timeout=30",
            "--deletion-timeout=30",
            "--agent-namespace=xenha-system",
            "--agent-service-account=xenha-agent",
            *extra,
        ]
        proc = OperatorProcess(argv, tmp_path / f"{name}.log", name)
        started.append(proc)
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()
        admin.strip_finalizers(namespace)
        for proc in started:
            sys.stderr.write(f"--- {proc.log.name} (tail) ---\n{proc.output()[-6000:]}\n")


class FakeAgents:
    """XenNode reports as agents would write them, renewed every 0.5 s while `alive`."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin
        self.reports: dict[str, dict[str, Any]] = {}
        self.alive: set[str] = set()
        self._lock = threading.Lock()
        # One writer at a time: the heartbeat thread and set() both read-modify-write the
        # XenNode, and two interleaved writes conflict (409) like two agents would.
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def set(self, node: str, *, alive: bool = True, **status: Any) -> None:
        """Replace what `node` reports (and whether its agent is alive)."""
        with self._lock:
            self.reports[node] = dict(status)
            (self.alive.add if alive else self.alive.discard)(node)
        self._write(node)

    def silence(self, node: str) -> None:
        with self._lock:
            self.alive.discard(node)

    def revive(self, node: str) -> None:
        with self._lock:
            self.alive.add(node)
        self._write(node)

    def _write(self, node: str) -> None:
        with self._write_lock:
            with self._lock:
                status = {**self.reports.get(node, {}), "heartbeatTime": now_iso()}
            self.admin.report(node, status)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                nodes = list(self.alive)
            for node in nodes:
                with contextlib.suppress(Exception):
                    self._write(node)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for node in self.reports:
            self.admin.delete_xennode(node)


@pytest.fixture
def agents(admin: Admin) -> Iterator[FakeAgents]:
    fake = FakeAgents(admin)
    try:
        yield fake
    finally:
        fake.close()


XR = "db1"


def report(
    domains: tuple[str, ...] = (), entries: tuple[dict[str, Any], ...] = (), free: int = 4096
) -> dict[str, Any]:
    return {
        "agentVersion": "0.1.0-test",
        "xen": {
            "version": "4.17",
            "freeMemoryMiB": free,
            "totalMemoryMiB": 8192,
            "coloSupported": True,
        },
        "domains": [{"name": d, "state": "running", "memoryMiB": 512} for d in domains],
        "replications": list(entries),
    }


class Scene:
    """One replication `db1` between two fresh nodes, and what its agents report."""

    report = staticmethod(report)
    wait_for = staticmethod(wait_for)
    now = staticmethod(now_iso)

    def __init__(self, admin: Admin, agents: FakeAgents, namespace: str) -> None:
        self.admin, self.agents, self.ns = admin, agents, namespace
        self.a, self.b = f"{namespace}-a", f"{namespace}-b"
        self.uid = ""

    def create(self, **spec: Any) -> None:
        body = {"domain": "db1", "mode": "remus", "primaryNode": self.a, "secondaryNode": self.b}
        created = self.admin.create_xr(self.ns, XR, {**body, **spec})
        self.uid = created["metadata"]["uid"]

    def entry(self, role: str, state: str, **extra: Any) -> dict[str, Any]:
        return {
            "namespace": self.ns,
            "name": XR,
            "uid": self.uid,
            "role": role,
            "state": state,
            "peerConnected": True,
            **extra,
        }

    def xr(self) -> dict[str, Any]:
        got = self.admin.xr(self.ns, XR)
        assert got is not None, "the XenReplication is gone"
        return dict(got)

    def status(self) -> dict[str, Any]:
        return dict(self.xr().get("status") or {})

    def condition(self, type_: str) -> tuple[str, str] | None:
        for c in self.status().get("conditions", []):
            if c["type"] == type_:
                return c["status"], c["reason"]
        return None

    def wait_phase(self, phase: str, timeout: float = 30, **fields: Any) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        def check() -> dict[str, Any] | None:
            status = self.status()
            seen.update(last=status)
            got = {k: status.get(k) for k in fields}
            return status if status.get("phase") == phase and got == fields else None

        try:
            return dict(wait_for(f"phase {phase} with {fields}", check, timeout))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nlast status: {seen.get('last')}") from None

    def wait_event(self, reason: str, timeout: float = 30) -> None:
        wait_for(
            f"Event {reason}",
            lambda: reason in self.admin.event_reasons(self.ns, XR),
            timeout,
        )

    def replicating(self, active: str, standby: str, total: int = 42) -> None:
        stats = {"total": total, "lastTime": now_iso(), "intervalMs": 200, "lastPauseMs": 9}
        self.agents.set(
            active,
            **self.report(("db1",), (self.entry("primary", "Replicating", checkpoints=stats),)),
        )
        self.agents.set(
            standby,
            **self.report(
                ("db1--incoming",), (self.entry("secondary", "Replicating", checkpoints=stats),)
            ),
        )


@pytest.fixture
def scene(admin: Admin, agents: FakeAgents, namespace: str) -> Scene:
    return Scene(admin, agents, namespace)
