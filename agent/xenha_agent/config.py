"""AgentSettings: everything the node agent needs to know about its host, in one explicit object.

The agent never reads the environment after start-up: `AgentSettings.from_env` is called once by
`main.py` and the result is passed down, so tests (and the lab, which runs several agents in one
machine) build settings directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from xenha.api.fencing import host_lease_name

DEFAULT_NAMESPACE = "xenha-system"
DEFAULT_XENSTORE_SOCKET = Path("/var/run/xenstored/socket")
DEFAULT_RUN_DIR = Path("/run/xenha")
# How long a replicator's relay may hear nothing from its peer before it calls the stream lost
# (issue 5: a few hundred ms). Raise it (XENHA_HEARTBEAT_TIMEOUT) on an oversubscribed dom0: a
# false loss costs a full re-seed of the standby. In a run of 50 replications on 2 saturated
# cores, relay threads stalled 600-720 ms with no fault injected, and 2 s held. A real failure
# is not noticed much later with a longer timeout: the standby also waits until it has seen the
# active host's Lease unrenewed for leaseDurationSeconds.
DEFAULT_HEARTBEAT_TIMEOUT = 0.6

LogFormat = Literal["json", "kv"]
LauncherKind = Literal["systemd-scope", "process"]


class SettingsError(ValueError):
    """The environment does not describe a usable agent (the message names the variable)."""


@dataclass(frozen=True)
class AgentSettings:
    node_name: str
    namespace: str = DEFAULT_NAMESPACE
    # None: in-cluster service account (the DaemonSet case).
    kubeconfig: Path | None = None
    xl_path: str = "xl"
    xenstore_socket: Path = DEFAULT_XENSTORE_SOCKET
    # Replicator control sockets and launch files live here; it must survive agent restarts
    # (a hostPath), since that is how a new agent finds the replicators of the old one.
    run_dir: Path = DEFAULT_RUN_DIR
    relay_bind_address: str = "0.0.0.0"
    # What peers dial; defaults to the bind address unless that is a wildcard.
    relay_advertise_address: str | None = None
    relay_port_min: int = 7443
    relay_port_max: int = 7443
    heartbeat_timeout: float = DEFAULT_HEARTBEAT_TIMEOUT
    report_period: float = 2.0
    # Renewal period of the host Lease when this node takes part in no replication.
    idle_lease_duration: float = 20.0
    health_bind_address: str = "0.0.0.0"
    health_port: int = 9464
    log_format: LogFormat = "kv"
    log_level: str = "INFO"
    # How often the main loop re-evaluates fencing; it also wakes on every watch event.
    tick: float = 0.1
    # Extra environment for the xl executable (the simulator is selected this way in tests).
    xl_env: Mapping[str, str] = field(default_factory=dict)
    # How replicators outlive the agent: `systemd-run --scope` (the DaemonSet) or plain
    # processes in their own session (tests, the lab, hosts without systemd).
    replicator_launcher: LauncherKind = "process"
    # argv prefix of `xenha agent replicator` (default: the xenha next to this Python).
    replicator_command: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not self.node_name:
            raise SettingsError("NODE_NAME is required (the Kubernetes node this agent runs on)")
        # 0: any free port (tests, several agents on one machine).
        if not 0 <= self.relay_port_min <= self.relay_port_max < 65536:
            raise SettingsError(
                f"relay port range {self.relay_port_min}-{self.relay_port_max} is not valid"
            )
        if self.heartbeat_timeout <= 0 or self.report_period <= 0 or self.tick <= 0:
            raise SettingsError("heartbeat timeout, report period and tick must be positive")
        # Imported here: `xenha agent pipe` (xl's transport) imports this module and should
        # not pay for the relay's imports at every start of xl remus.
        from xenha_agent.replicator_config import ConfigError, check_run_dir

        try:
            check_run_dir(self.run_dir)
        except ConfigError as e:
            raise SettingsError(f"XENHA_RUN_DIR: {e}") from None

    @property
    def relay_endpoint(self) -> str:
        """`host:port` peers dial (XenNode.status.relayEndpoint), for the configured port."""
        return self.relay_endpoint_for(self.relay_port_min)

    def relay_endpoint_for(self, port: int) -> str:
        """The same for the port the relay listener actually bound (from a range, or 0)."""
        host = self.relay_advertise_address or self.relay_bind_address
        if host in ("0.0.0.0", "::", ""):
            host = self.node_name
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{port}"

    @property
    def host_lease_name(self) -> str:
        return host_lease_name(self.node_name)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> AgentSettings:
        """Read XENHA_* (and NODE_NAME, KUBECONFIG, XENSTORED_PATH) variables."""
        env = os.environ if env is None else env

        def number(name: str, default: float) -> float:
            raw = env.get(name)
            if raw is None or raw == "":
                return default
            try:
                return float(raw)
            except ValueError:
                raise SettingsError(f"{name}={raw!r} is not a number") from None

        port_min, port_max = _port_range(env.get("XENHA_RELAY_PORTS", "7443"))
        log_format = env.get("XENHA_LOG_FORMAT", "kv")
        if log_format not in ("json", "kv"):
            raise SettingsError(f"XENHA_LOG_FORMAT={log_format!r}: expected json or kv")
        launcher = env.get("XENHA_REPLICATOR_LAUNCHER") or "process"
        if launcher not in ("systemd-scope", "process"):
            raise SettingsError(
                f"XENHA_REPLICATOR_LAUNCHER={launcher!r}: expected systemd-scope or process"
            )
        kubeconfig = env.get("KUBECONFIG")
        return cls(
            node_name=env.get("NODE_NAME", ""),
            namespace=env.get("XENHA_NAMESPACE") or DEFAULT_NAMESPACE,
            kubeconfig=Path(kubeconfig) if kubeconfig else None,
            xl_path=env.get("XENHA_XL") or "xl",
            xenstore_socket=Path(env.get("XENSTORED_PATH") or DEFAULT_XENSTORE_SOCKET),
            run_dir=Path(env.get("XENHA_RUN_DIR") or DEFAULT_RUN_DIR),
            relay_bind_address=env.get("XENHA_RELAY_ADDRESS") or "0.0.0.0",
            relay_advertise_address=env.get("XENHA_RELAY_ADVERTISE") or None,
            relay_port_min=port_min,
            relay_port_max=port_max,
            heartbeat_timeout=number("XENHA_HEARTBEAT_TIMEOUT", DEFAULT_HEARTBEAT_TIMEOUT),
            report_period=number("XENHA_REPORT_PERIOD", 2.0),
            health_bind_address=env.get("XENHA_HEALTH_ADDRESS") or "0.0.0.0",
            health_port=int(number("XENHA_HEALTH_PORT", 9464)),
            log_format=log_format,  # type: ignore[arg-type]  # checked just above
            log_level=env.get("XENHA_LOG_LEVEL") or "INFO",
            replicator_launcher=launcher,  # type: ignore[arg-type]  # checked just above
        )


def _port_range(raw: str) -> tuple[int, int]:
    """`7443` or `7443-7450`."""
    lo, _, hi = raw.partition("-")
    try:
        return int(lo), int(hi or lo)
    except ValueError:
        raise SettingsError(f"XENHA_RELAY_PORTS={raw!r}: expected PORT or MIN-MAX") from None
