"""The simulated Xen hosts of a stack and what it knows about each.

A host is a simulator daemon (`xenha.sim.host.SimHost`: hypervisor, XenStore, `xl`), its
agent, and its network as peers see it: a `NetPath` on the host's own loopback address
(127.0.0.11 for xen-a, ...) forwarding to the agent's relay, which a test can cut and which
goes silent when the host dies. What the host's replicators dialed runs through the peers'
paths; `SimHost.kill` silences those connections too (it finds them by their sockets'
owners), so a survivor learns of a power cut only from heartbeat silence.
"""

from __future__ import annotations

import errno
import hashlib
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xenha.controlplane.cluster import free_port
from xenha.lab.procs import Child
from xenha.sim.host import SimHost
from xenha.sim.ledger import Ledger
from xenha.sim.netpath import NetPath

# Hosts' addresses as peers dial them: 127.0.0.11, 127.0.0.12, ...
RELAY_IP_BASE = 10
SUN_PATH_MAX = 107
# The longest name the agent gives a socket in its run dir.
_LONGEST_SOCKET = "/00000000-0000-0000-0000-000000000000.accept.sock"


def host_names(count: int) -> list[str]:
    return [f"xen-{chr(ord('a') + i)}" for i in range(count)]


@dataclass
class Guest:
    name: str
    host: str
    uuid: str
    address: tuple[str, int]


@dataclass
class Host:
    """One simulated Xen host and what runs on it."""

    name: str
    index: int
    state_dir: Path
    relay_port: int = 0
    health_port: int = 0
    sim: SimHost | None = None
    agent: Child | None = None
    netpath: NetPath | None = None
    up: bool = False
    boots: int = 0

    @property
    def relay_ip(self) -> str:
        return f"127.0.0.{RELAY_IP_BASE + self.index + 1}"

    @property
    def relay_endpoint(self) -> str:
        return f"{self.relay_ip}:{self.relay_port}"

    @property
    def run_dir(self) -> Path:
        """The agent's run dir: like /run on a real host, emptied when the host boots.

        It holds Unix sockets, whose paths have at most 107 bytes: under a deep work dir
        (pytest's) it moves to a short one in /tmp.
        """
        local = self.state_dir / "agent-run"
        if len(str(local)) + len(_LONGEST_SOCKET) <= SUN_PATH_MAX:
            return local
        digest = hashlib.sha1(str(local).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"xenha-run-{digest}"

    def boot(self, fabric_dir: Path, log_level: str) -> SimHost:
        """Start the simulator on an empty host: nothing of a previous life (domains, the
        agent's run dir) survives a power cycle."""
        shutil.rmtree(self.state_dir, ignore_errors=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.boots += 1
        self.sim = SimHost.start(
            self.state_dir, self.name, fabric_dir=fabric_dir, log_level=log_level
        )
        return self.sim

    def open_relay_path(self, ledger_path: Path) -> NetPath:
        """A NetPath on the host's address forwarding to its agent's relay port (the same
        port on 127.0.0.1), registered with the simulator so that a power cut silences it."""
        if self.netpath is not None:
            self.netpath.close()
        assert self.sim is not None
        for _attempt in range(20):
            port = self.relay_port or free_port()
            try:
                path = NetPath(
                    ("127.0.0.1", port),
                    (self.relay_ip, port),
                    name=f"to-{self.name}",
                    ledger=Ledger(ledger_path, host=self.name),
                )
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                self.relay_port = 0
                continue
            self.relay_port = port
            self.netpath = path.start()
            self.sim.add_netpath(path)
            return path
        raise OSError(errno.EADDRINUSE, f"no free relay port for {self.name}")

    def agent_env(
        self, *, kubeconfig: Path, namespace: str, log_level: str, extra: Mapping[str, str]
    ) -> dict[str, str]:
        """The agent's environment, as the DaemonSet sets it, pointed at this host."""
        assert self.sim is not None
        return {
            # The simulator's: `xl` and XenStore of this host, and its tag, so that a power
            # cut takes the agent and everything it starts.
            **self.sim.env,
            "NODE_NAME": self.name,
            "KUBECONFIG": str(kubeconfig),
            "XENHA_NAMESPACE": namespace,
            "XENHA_XL": str(self.sim.xl_path),
            "XENSTORED_PATH": str(self.sim.xenstore_path),
            "XENHA_RUN_DIR": str(self.run_dir),
            "XENHA_RELAY_ADDRESS": "127.0.0.1",
            "XENHA_RELAY_ADVERTISE": self.relay_ip,
            "XENHA_RELAY_PORTS": str(self.relay_port),
            "XENHA_HEALTH_ADDRESS": "127.0.0.1",
            "XENHA_HEALTH_PORT": str(self.health_port),
            "XENHA_REPLICATOR_LAUNCHER": "process",
            "XENHA_LOG_LEVEL": log_level,
            "XENHA_LOG_FORMAT": "kv",
            **extra,
        }

    def agent_answers_ready(self) -> bool:
        """The agent's /readyz: watches synced, replicators re-attached, host Lease renewed."""
        try:
            url = f"http://127.0.0.1:{self.health_port}/readyz"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def keep_replicator_logs(self, logs: Path) -> None:
        """Replicators log into the agent's run dir, which a boot or a stop removes."""
        for log in self.run_dir.glob("*.log"):
            target = logs / f"replicator-{self.name}-boot{self.boots}-{log.name}"
            try:
                shutil.copyfile(log, target)
            except OSError:
                continue
