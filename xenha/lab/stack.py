"""The whole system on one machine: the one orchestration behind the lab and the e2e tests.

``Stack(workdir).start()`` brings up, in order:

1. a control plane (etcd, kube-apiserver, kube-controller-manager; ``xenha.controlplane``);
2. the CRDs from ``crds/`` and kopf's peering CRDs (what the Helm chart installs);
3. the agents' namespace and the replications' namespace;
4. ServiceAccounts holding exactly the operator's and the agents' RBAC rules (the constants
   the chart renders) and a kubeconfig for each, so nothing runs with more than a real
   install grants;
5. Node objects ``xen-a``, ``xen-b``, ... labelled ``xenha.io/xen-host=true``;
6. one simulated Xen host per node (``xenha.sim``) with a demo guest each, all sharing one
   ledger, and in front of each host's relay a ``NetPath`` that can be cut;
7. the operator and one agent per host, as subprocesses, each in its own process group with
   its log in ``<workdir>/logs``; each agent reaches the apiserver through a ``NetPath`` of
   its own, which a test can cut to take that agent (and only it) off the API.

Then it applies replications, waits for phases, and injects faults: a power cut (the host's
simulator, agent, replicators and xl all die at once), a hung host, a rolling restart of an
agent, a cut network path, an agent cut off from the API. ``stop()`` ends everything it
started; a reaper process does the same if the owner dies first. ``<workdir>/stack.json``
says where everything is, for other processes (``xenha lab status``, tests).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import functools
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import yaml

from xenha.controlplane.cluster import ControlPlane, close_client, free_port
from xenha.lab import cluster, kube, procs
from xenha.lab.hosts import Guest, Host, host_names
from xenha.lab.procs import Child, Processes, write_json
from xenha.sim import ledger as ledger_mod
from xenha.sim import paths as sim_paths
from xenha.sim.client import ServiceClient
from xenha.sim.host import SimHost
from xenha.sim.netpath import NetPath

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

EXAMPLES_DIR = cluster.REPO_ROOT / "examples"
STATE_FILE = "stack.json"

# (step, detail): called when a step starts ("..." detail) and when it is done.
Progress = Callable[[str, str], None]


def _xenha_command() -> list[str]:
    """``xenha`` from this installation (the tests and the lab run what users run)."""
    exe = Path(sys.executable).with_name("xenha")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "xenha.cli"]


@dataclass
class StackOptions:
    hosts: int = 2
    agent_namespace: str = "xenha-system"
    namespace: str = "lab"
    # Guests created at start: host -> names; None gives each host one demo guest.
    guests: Mapping[str, Sequence[str]] | None = None
    guest_memory_mib: int = 16
    guest_dirty_rate: float = 100.0
    log_level: str = "INFO"
    # Extra environment for the agents (e.g. XENHA_HEARTBEAT_TIMEOUT) and operator flags.
    agent_env: Mapping[str, str] = field(default_factory=dict)
    operator_args: Sequence[str] = ()
    # Prebuilt control plane binaries (tests pass the session's); None: build/find them.
    binaries: Mapping[str, Path] | None = None
    timeout: float = 180.0


class StackError(RuntimeError):
    pass


class Stack:
    def __init__(
        self,
        workdir: Path,
        options: StackOptions | None = None,
        *,
        progress: Progress | None = None,
        tag: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.options = options or StackOptions()
        self.progress: Progress = progress or (lambda step, detail: None)
        self.tag = tag or os.environ.get(procs.STACK_ENV) or secrets.token_hex(6)
        self.procs = Processes(self.workdir, self.tag)
        self.plane: ControlPlane | None = None
        self.operator: Child | None = None
        self.hosts: dict[str, Host] = {}
        self.guests: dict[str, Guest] = {}
        self.operator_kubeconfig = Path()
        # The agents' ServiceAccount; each agent dials the apiserver through its own API path.
        self.agent_kubeconfig = Path()
        self.api_paths: dict[str, NetPath] = {}
        self._api: ApiClient | None = None
        # Kept after stop, so that whoever checks for leftovers knows what to look for.
        self._plane_pids: dict[str, int] = {}
        self._lock = threading.RLock()
        self._stopped = False

    # --- where things are --------------------------------------------------------------------

    @property
    def fabric_dir(self) -> Path:
        return self.workdir / "fabric"

    @property
    def ledger_path(self) -> Path:
        return self.fabric_dir / ledger_mod.LEDGER_NAME

    @property
    def kubeconfig(self) -> Path:
        """The admin's kubeconfig (what a person uses with kubectl)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def kubectl_path(self) -> Path:
        assert self.plane is not None
        assert self.plane.binaries is not None
        return Path(self.plane.binaries["kubectl"])

    @property
    def namespace(self) -> str:
        return self.options.namespace

    @property
    def api(self) -> ApiClient:
        if self._api is None:
            assert self.plane is not None, "not started"
            self._api = self.plane.api_client(self.kubeconfig)
        return self._api

    # --- start and stop ----------------------------------------------------------------------

    def start(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # An owner that returns without stopping us stops us on its way out; one that is
        # killed leaves it to the reaper (and the control plane's watchdog).
        atexit.register(self.stop)
        self.procs.start_reaper()
        try:
            self._step("control plane", self._start_control_plane)
            assert self.plane is not None
            self._step("CRDs", functools.partial(cluster.install_crds, self.plane))
            self._step(
                "namespaces",
                lambda: cluster.create_namespaces(
                    self.api, (self.options.agent_namespace, self.namespace)
                ),
            )
            self._step("service accounts", self._create_service_accounts)
            self._step(
                "nodes",
                lambda: cluster.register_xen_nodes(self.api, host_names(self.options.hosts)),
            )
            for name in host_names(self.options.hosts):
                self._step(f"xen host {name}", functools.partial(self._start_host, name))
            self._step("guests", self._create_guests)
            self._step("operator", self._start_operator)
            for name in self.hosts:
                self._step(f"agent {name}", functools.partial(self._start_agent, self.hosts[name]))
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Every live agent answers /readyz and has reported its XenNode."""
        for host in self.hosts.values():
            if host.up:
                self._step(
                    f"agent {host.name} ready", functools.partial(self._wait_agent, host, timeout)
                )

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            # Agents and operator first (orderly, like a drain), then every host (its
            # replicators and xl go with it), the control plane, and a sweep for strays.
            with contextlib.suppress(Exception):
                self.procs.stop_all(order=("agent-", "operator"))
            for host in self.hosts.values():
                if host.sim is not None:
                    with contextlib.suppress(Exception):
                        host.sim.stop(timeout=5)
                if host.netpath is not None:
                    host.netpath.close()
                if host.name in self.api_paths:
                    self.api_paths[host.name].close()
                host.keep_replicator_logs(self.procs.logs)
                for run in (host.run_dir, sim_paths.run_dir(host.state_dir)):
                    if not run.is_relative_to(self.workdir):
                        shutil.rmtree(run, ignore_errors=True)
            if self._api is not None:
                close_client(self._api)
                self._api = None
            if self.plane is not None:
                self.plane.stop()
            self.procs.sweep()
            self.procs.close_reaper()
            self._save()
            atexit.unregister(self.stop)

    def replicator_logs(self) -> list[Path]:
        return sorted(
            log
            for host in self.hosts.values()
            for log in [
                *host.run_dir.glob("*.log"),
                *self.procs.logs.glob(f"replicator-{host.name}-*.log"),
            ]
        )

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _step(self, name: str, action: Callable[[], object]) -> None:
        self.progress(name, "...")
        started = time.monotonic()
        action()
        self._save()
        self.progress(name, f"done in {time.monotonic() - started:.1f}s")

    # --- the cluster -------------------------------------------------------------------------

    def _start_control_plane(self) -> None:
        self.plane = ControlPlane(
            binaries=self.options.binaries,
            base_dir=self.workdir,
            timeout=self.options.timeout,
        )
        self.plane.start()
        self._plane_pids = dict(self.plane.pids)
        # A stable path: the control plane's own directory name is random.
        shutil.copyfile(self.plane.kubeconfig, self.kubeconfig)
        self.kubeconfig.chmod(0o600)

    def _create_service_accounts(self) -> None:
        assert self.plane is not None
        self.operator_kubeconfig, self.agent_kubeconfig = cluster.service_accounts(
            self.api, self.plane, self.options.agent_namespace, self.workdir / "kubeconfigs"
        )

    # --- hosts -------------------------------------------------------------------------------

    def _start_host(self, name: str) -> Host:
        host = self.hosts.get(name) or Host(
            name=name, index=len(self.hosts), state_dir=self.workdir / "hosts" / name
        )
        self.hosts[name] = host
        host.keep_replicator_logs(self.procs.logs)
        sim = host.boot(self.fabric_dir, self.options.log_level)
        assert sim.process is not None
        self.procs.adopt(f"host-{name}", sim.process, host.state_dir / "host.log", host=name)
        self.procs.watch_env(f"XENHA_SIM_HOST_TAG={sim.tag}")
        host.open_relay_path(self.ledger_path)
        host.up = True
        return host

    def _create_guests(self) -> None:
        wanted = self.options.guests
        if wanted is None:
            wanted = {name: [f"demo{host.index + 1}"] for name, host in self.hosts.items()}
        for host_name, names in wanted.items():
            for guest in names:
                self.create_guest(host_name, guest)

    def create_guest(self, host_name: str, name: str, **options: Any) -> Guest:
        """A running guest on a host; its counter service on a free loopback port."""
        sim = self._sim(host_name)
        settings: dict[str, Any] = {
            "memory_mib": self.options.guest_memory_mib,
            "dirty_rate": self.options.guest_dirty_rate,
            **options,
        }
        info = sim.create_guest(name, **settings)
        ip, _, port = str(info["service"]).rpartition(":")
        guest = Guest(name=name, host=host_name, uuid=str(info["uuid"]), address=(ip, int(port)))
        self.guests[name] = guest
        self._save()
        return guest

    def _sim(self, host_name: str) -> SimHost:
        host = self.hosts[host_name]
        if host.sim is None or not host.up:
            raise StackError(f"host {host_name} is down")
        return host.sim

    # --- operator and agents -----------------------------------------------------------------

    def _start_operator(self) -> None:
        env = {
            "KUBECONFIG": str(self.operator_kubeconfig),
            "XENHA_NAMESPACE": self.options.agent_namespace,
            "XENHA_AGENT_SERVICE_ACCOUNT": cluster.AGENT_ACCOUNT,
            "XENHA_LOG_LEVEL": self.options.log_level,
            "XENHA_LOG_FORMAT": "kv",
            "POD_ID": f"operator-{self.tag}",
        }
        argv = [*_xenha_command(), "operator", *self.options.operator_args]
        self.operator = self.procs.spawn("operator", argv, env=env)

    def _start_agent(self, host: Host) -> Child:
        host.health_port = host.health_port or free_port()
        host.run_dir.mkdir(parents=True, exist_ok=True)
        host.agent = self.procs.spawn(
            f"agent-{host.name}",
            [*_xenha_command(), "agent"],
            env=host.agent_env(
                kubeconfig=self._agent_kubeconfig_via_path(host.name),
                namespace=self.options.agent_namespace,
                log_level=self.options.log_level,
                extra=self.options.agent_env,
            ),
            host=host.name,
        )
        return host.agent

    def _agent_kubeconfig_via_path(self, host_name: str) -> Path:
        """The agents' kubeconfig with the server behind this host's API path, made at the
        agent's first start and kept across its restarts and power cycles (a cut stays cut)."""
        target = self.workdir / "kubeconfigs" / f"agent-{host_name}.kubeconfig"
        if host_name in self.api_paths and target.exists():
            return target
        doc = yaml.safe_load(self.agent_kubeconfig.read_text())
        path = self.api_paths.get(host_name)
        for entry in doc["clusters"]:
            scheme, _, hostport = str(entry["cluster"]["server"]).partition("://")
            api_host, _, api_port = hostport.rstrip("/").rpartition(":")
            if path is None:
                path = NetPath((api_host, int(api_port)), name=f"api-{host_name}").start()
                self.api_paths[host_name] = path
            # The path listens on 127.0.0.1 as well: the apiserver's certificate still fits.
            entry["cluster"]["server"] = f"{scheme}://{path.address[0]}:{path.address[1]}"
        target.write_text(yaml.safe_dump(doc))
        target.chmod(0o600)
        return target

    def _agent_ready(self, host: Host) -> bool:
        if host.agent is None or not host.agent.alive():
            raise StackError(f"agent on {host.name} exited ({self.log_tail(f'agent-{host.name}')})")
        return host.agent_answers_ready() and host.name in kube.xennodes(self.api)

    def _wait_agent(self, host: Host, timeout: float) -> None:
        kube.wait_until(
            lambda: self._agent_ready(host),
            timeout=timeout,
            what=f"the agent on {host.name} to be ready",
            describe=lambda: self.log_tail(f"agent-{host.name}"),
        )

    # --- replications ------------------------------------------------------------------------

    def replication_manifest(
        self,
        source: Path | Mapping[str, Any] | None = None,
        *,
        mode: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
    ) -> dict[str, Any]:
        """A XenReplication from a file (default: ``examples/xenreplication-<mode>.yaml``
        protecting the primary node's demo guest) or a dict."""
        if source is None:
            source = EXAMPLES_DIR / f"xenreplication-{mode or 'remus'}.yaml"
            manifest = yaml.safe_load(source.read_text())
            primary = manifest["spec"]["primaryNode"]
            demo = next((g.name for g in self.guests.values() if g.host == primary), None)
            if demo is not None:
                manifest["spec"]["domain"] = demo
                manifest["metadata"]["name"] = demo
        elif isinstance(source, Path):
            manifest = yaml.safe_load(source.read_text())
        else:
            manifest = copy.deepcopy(dict(source))
        if mode is not None:
            manifest["spec"]["mode"] = mode
        if name is not None:
            manifest["metadata"]["name"] = name
        manifest["metadata"]["namespace"] = (
            namespace or manifest["metadata"].get("namespace") or self.namespace
        )
        return dict(manifest)

    def apply_replication(
        self,
        source: Path | Mapping[str, Any] | None = None,
        *,
        mode: str | None = None,
        name: str | None = None,
        namespace: str | None = None,
    ) -> tuple[str, str]:
        """``kubectl apply`` a XenReplication, as a user would; returns (namespace, name)."""
        manifest = self.replication_manifest(source, mode=mode, name=name, namespace=namespace)
        assert self.plane is not None
        self.plane.kubectl("apply", "--filename=-", input=json.dumps(manifest))
        return manifest["metadata"]["namespace"], manifest["metadata"]["name"]

    def replication(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return kube.get_replication(self.api, namespace or self.namespace, name)

    def wait_for(
        self,
        name: str,
        *,
        namespace: str | None = None,
        phase: str | None = None,
        condition: tuple[str, str] | None = None,
        active: str | None = None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 120.0,
    ) -> dict[str, Any]:
        """Wait until the replication matches every criterion given; returns it."""
        ns = namespace or self.namespace

        def matches() -> dict[str, Any] | None:
            obj = self.replication(name, ns)
            if obj is None:
                return None
            status = obj.get("status") or {}
            if phase is not None and status.get("phase") != phase:
                return None
            if active is not None and status.get("activeNode") != active:
                return None
            if condition is not None:
                cond = kube.condition(obj, condition[0])
                if cond is None or cond.get("status") != condition[1]:
                    return None
            if predicate is not None and not predicate(obj):
                return None
            return obj

        wanted = ", ".join(
            f"{k}={v}"
            for k, v in {"phase": phase, "condition": condition, "active": active}.items()
            if v is not None
        )
        return kube.wait_until(
            matches,
            timeout=timeout,
            what=f"XenReplication {ns}/{name} {wanted or 'predicate'}",
            describe=lambda: self.describe(name, ns),
        )

    def request_switchover(self, name: str, namespace: str | None, target: str) -> None:
        """What a person does for a planned move: annotate the replication."""
        assert self.plane is not None
        self.plane.kubectl(
            "annotate",
            "--overwrite",
            f"--namespace={namespace or self.namespace}",
            f"xenreplication/{name}",
            f"{kube.SWITCHOVER_ANNOTATION}={target}",
        )

    def fence_lease(self, name: str, namespace: str | None = None) -> dict[str, Any] | None:
        return kube.fence_lease(self.api, namespace or self.namespace, name)

    def events(self, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
        return kube.events_about(self.api, namespace or self.namespace, name)

    def guest(self, domain: str) -> tuple[tuple[str, int], str]:
        """(service address, uuid) of a guest."""
        info = self.guests[domain]
        return info.address, info.uuid

    def describe(self, name: str, namespace: str | None = None) -> str:
        """Status, recent Events and log tails: what a failed wait should show."""
        ns = namespace or self.namespace
        parts: list[str] = []
        with contextlib.suppress(Exception):
            obj = self.replication(name, ns)
            parts.append("status: " + json.dumps((obj or {}).get("status"), indent=1))
        with contextlib.suppress(Exception):
            for event in kube.events_about(self.api, ns, name)[-10:]:
                parts.append(f"event {event.get('reason')}: {event.get('message')}")
        for child in [self.operator, *(h.agent for h in self.hosts.values())]:
            if child is not None:
                parts.append(f"--- {child.name} ({child.log})\n{_tail(child.log, 15)}")
        for log in self.replicator_logs():
            parts.append(f"--- replicator ({log})\n{_tail(log, 15)}")
        return "\n".join(parts)

    # --- faults ------------------------------------------------------------------------------

    def kill_host(self, name: str) -> float:
        """Power cut: the simulator, the agent, its replicators and xl die in one instant, and
        the host's network goes silent (no FIN, no RST). Returns when (wall clock)."""
        host = self.hosts[name]
        if host.sim is not None:
            host.sim.kill()
        if host.agent is not None:
            # Reap it (SimHost.kill killed it: it carries the host's tag).
            with contextlib.suppress(subprocess.TimeoutExpired):
                host.agent.popen.wait(timeout=5)
        host.up = False
        self._save()
        killed = ledger_mod.of_kind(self.ledger_path, "host_killed", host=name)
        return float(killed[-1]["wall"]) if killed else time.time()

    def power_on(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> Host:
        """A killed host boots again: an empty simulator and a fresh agent (ready, unless
        ``wait`` is false)."""
        host = self.hosts[name]
        if host.up:
            raise StackError(f"host {name} is up")
        self._start_host(name)
        self._start_agent(host)
        self._save()
        if wait:
            self._wait_agent(host, timeout)
        return host

    def pause_host(self, name: str) -> None:
        """Hung host: every process of it stops where it is (SIGSTOP)."""
        self._sim(name).pause()

    def resume_host(self, name: str) -> None:
        self._sim(name).resume()

    def restart_agent(self, name: str, *, wait: bool = True, timeout: float = 60.0) -> Child:
        """A rolling update of one agent: SIGTERM, wait for it to exit, start a new one with
        the same settings, wait until it is ready. Its replicators keep running."""
        host = self.hosts[name]
        if host.agent is not None:
            self.procs.stop(host.agent, timeout=30)
        self._start_agent(host)
        if wait:
            self._wait_agent(host, timeout)
        return host.agent  # type: ignore[return-value]  # set by _start_agent

    def restart_operator(self) -> Child:
        if self.operator is not None:
            self.procs.stop(self.operator, timeout=30)
        self._start_operator()
        assert self.operator is not None
        return self.operator

    def cut_path(self, *names: str) -> None:
        """Silence the network into these hosts (default: all), as a dead switch would. With
        two hosts this is the host-to-host path; the API stays reachable."""
        for host in self._hosts(names):
            if host.netpath is not None:
                host.netpath.cut()

    def restore_path(self, *names: str) -> None:
        for host in self._hosts(names):
            if host.netpath is not None:
                host.netpath.restore()

    def cut_api(self, *names: str) -> None:
        """Silence the way from these hosts' agents (default: all) to the apiserver, as a dead
        link on the management network would: their requests and watches hang. The
        host-to-host paths, the other agents and the operator keep theirs."""
        for host in self._hosts(names):
            if host.name in self.api_paths:
                self.api_paths[host.name].cut()
        self._save()

    def restore_api(self, *names: str) -> None:
        for host in self._hosts(names):
            if host.name in self.api_paths:
                self.api_paths[host.name].restore()
        self._save()

    def _hosts(self, names: Sequence[str]) -> list[Host]:
        return [self.hosts[n] for n in names] if names else list(self.hosts.values())

    # --- clients and checks ------------------------------------------------------------------

    def client(self, guest: str, *, timeout: float = 1.0) -> ServiceClient:
        """A client of the guest's counter service whose replies go to the ledger."""
        info = self.guests[guest]
        return ServiceClient(
            info.address, ledger_path=self.ledger_path, uuid=info.uuid, name=guest, timeout=timeout
        )

    def check_invariants(self) -> None:
        """Never two active copies; the client view clean (raises LedgerViolation)."""
        ledger_mod.assert_never_two_active(self.ledger_path)
        ledger_mod.assert_client_view_clean(self.ledger_path)

    def log_tail(self, name: str, lines: int = 30) -> str:
        return _tail(self.procs.logs / f"{name}.log", lines)

    # --- the state file ----------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        plane = self.plane
        return {
            "tag": self.tag,
            "owner": os.getpid(),
            "workdir": str(self.workdir),
            "kubeconfig": str(self.kubeconfig),
            "server": plane.server if plane else None,
            "kubectl": str(self.kubectl_path) if plane and plane.binaries else None,
            "controlPlane": self._plane_pids,
            "ledger": str(self.ledger_path),
            "namespace": self.namespace,
            "agentNamespace": self.options.agent_namespace,
            "operator": self.operator.record() if self.operator else None,
            "hosts": {
                name: {
                    "up": host.up,
                    "stateDir": str(host.state_dir),
                    "runDir": str(host.run_dir),
                    "relayEndpoint": host.relay_endpoint,
                    "healthPort": host.health_port,
                    "simPid": host.sim.pid if host.sim else None,
                    "agent": host.agent.record() if host.agent else None,
                    "pathCut": bool(host.netpath and host.netpath.is_cut),
                    "apiCut": bool(name in self.api_paths and self.api_paths[name].is_cut),
                }
                for name, host in self.hosts.items()
            },
            "guests": {
                name: {
                    **dataclasses.asdict(guest),
                    "address": f"{guest.address[0]}:{guest.address[1]}",
                }
                for name, guest in self.guests.items()
            },
            "stopped": self._stopped,
        }

    def _save(self) -> None:
        with contextlib.suppress(OSError):
            write_json(self.workdir / STATE_FILE, self.state())


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def leftovers(workdir: Path) -> list[dict[str, Any]]:
    """Processes of a stopped stack that still run: recorded children (by process group),
    control plane processes, and anything carrying the stack's tag."""
    left = procs.leftovers(workdir)
    state = read_state(workdir) or {}
    for name, pid in (state.get("controlPlane") or {}).items():
        if procs.group_alive(int(pid)) and all(p["pgid"] != pid for p in left):
            left.append({"name": name, "pid": pid, "pgid": pid})
    return left


def remove_run_dirs(workdir: Path) -> None:
    """Remove the hosts' socket dirs that live outside the work dir (in /tmp, when its path is
    too long for Unix sockets): what a stack that was killed leaves behind."""
    for host in ((read_state(workdir) or {}).get("hosts") or {}).values():
        for run in (sim_paths.run_dir(Path(host["stateDir"])), Path(host["runDir"])):
            if not run.is_relative_to(workdir):
                shutil.rmtree(run, ignore_errors=True)


def read_state(workdir: Path) -> dict[str, Any] | None:
    try:
        document: dict[str, Any] = json.loads((Path(workdir) / STATE_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return document
