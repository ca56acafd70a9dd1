"""What the agent tells a replicator, and where a replicator's files live.

The agent writes one JSON file per replication and starts `xenha agent replicator --config
<file>`. Everything the replicator does is in that file; it reads no environment and no API.

    {
      "uid": "6f1c...",                  # XenReplication metadata.uid
      "namespace": "prod", "name": "db1",  # for logs only
      "role": "primary" | "secondary",
      "domain": "db1",
      "node": "xen-a", "peerNode": "xen-b",
      "command": ["xl", "remus", ..., "-s", "", "db1", "<transport>"],
                                         # primary: xenha.api.xlargs.sender_argv(spec,
                                         #   transport_command(xl_socket_path(runDir, uid)))
                                         # secondary: xenha.api.xlargs.receiver_argv(spec)
      "tls": {"caFile": ..., "certFile": ..., "keyFile": ...},
      "runDir": "/run/xenha",
      "peerAddress": "10.0.0.2:7443",    # primary: the peer's XenNode.status.relayEndpoint
      "listen": null,                    # secondary: null = behind the node listener (SNI
                                         #   handoff); "host:port" = a port of its own
      "xl": "xl", "xlEnv": {},           # for xl pause/unpause/destroy, and the children's env
      "heartbeatIntervalMs": 100, "heartbeatTimeoutMs": 600, "connectTimeoutS": 60
    }
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from xenha_agent.relay import LinkSettings, parse_address
from xenha_agent.relay_listener import accept_socket_path
from xenha_agent.tls import TlsMaterial, server_name

Role = Literal["primary", "secondary"]

# `struct sockaddr_un.sun_path` on Linux: a Unix socket's path and its terminating NUL.
SUN_PATH_MAX = 108
# Kubernetes UIDs (metadata.uid) are RFC 4122 UUIDs in their 36-character text form.
_SOME_UID = "00000000-0000-0000-0000-000000000000"


class ConfigError(ValueError):
    pass


def control_socket_path(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.sock"


def xl_socket_path(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.xl.sock"


def socket_paths(run_dir: Path, uid: str) -> tuple[Path, ...]:
    """The Unix sockets a replicator binds in the run dir."""
    return (
        control_socket_path(run_dir, uid),
        xl_socket_path(run_dir, uid),
        accept_socket_path(run_dir, uid),
    )


def check_run_dir(run_dir: Path, uid: str = _SOME_UID) -> None:
    """Raise ConfigError, naming the path and the limit, if a replicator's sockets in `run_dir`
    would have paths too long to bind. Checked before anything starts: otherwise the first
    replicator would fail on its own, detached, when it binds (`AF_UNIX path too long`)."""
    longest = max(socket_paths(run_dir, uid), key=lambda path: len(os.fsencode(path)))
    size = len(os.fsencode(longest))
    if size >= SUN_PATH_MAX:
        room = SUN_PATH_MAX - 1 - (size - len(os.fsencode(run_dir)))
        raise ConfigError(
            f"run dir {run_dir} is too long for the Unix sockets it holds: {longest} is "
            f"{size} bytes, and a Unix socket path must fit in {SUN_PATH_MAX} bytes with its "
            f"terminating NUL; use a run dir of at most {room} bytes"
        )


def config_path(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.json"


def log_path(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.log"


@dataclass(frozen=True)
class ReplicatorConfig:
    uid: str
    role: Role
    domain: str
    node: str
    peer_node: str
    command: list[str]
    ca_file: Path
    cert_file: Path
    key_file: Path
    run_dir: Path
    peer_address: str | None = None
    listen: str | None = None
    xl: str = "xl"
    xl_env: dict[str, str] = field(default_factory=dict)
    heartbeat_interval_ms: int = 100
    heartbeat_timeout_ms: int = 600
    connect_timeout_s: float = 60.0
    namespace: str = ""
    name: str = ""

    def __post_init__(self) -> None:
        try:
            server_name(self.uid)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_run_dir(self.run_dir, self.uid)
        if self.role not in ("primary", "secondary"):
            raise ConfigError(f"role must be primary or secondary, not {self.role!r}")
        for key in ("domain", "node", "peer_node"):
            if not getattr(self, key):
                raise ConfigError(f"{key} is required")
        if not self.command or not all(isinstance(a, str) for a in self.command):
            raise ConfigError("command must be a non-empty list of strings")
        if self.role == "primary":
            if not self.peer_address:
                raise ConfigError("a primary needs peerAddress")
            if str(xl_socket_path(self.run_dir, self.uid)) not in self.command[-1]:
                raise ConfigError(
                    "the primary's command must end with the transport for "
                    f"{xl_socket_path(self.run_dir, self.uid)} (see pipe.transport_command)"
                )
        for address in (self.peer_address, self.listen):
            if address is not None:
                try:
                    parse_address(address)
                except ValueError as e:
                    raise ConfigError(str(e)) from None
        try:
            self.link_settings()
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def link_settings(self) -> LinkSettings:
        return LinkSettings(
            heartbeat_interval=self.heartbeat_interval_ms / 1000,
            silence_timeout=self.heartbeat_timeout_ms / 1000,
        )

    def tls_material(self) -> TlsMaterial:
        return TlsMaterial.from_files(self.ca_file, self.cert_file, self.key_file)

    @property
    def control_socket(self) -> Path:
        return control_socket_path(self.run_dir, self.uid)

    @property
    def xl_socket(self) -> Path:
        return xl_socket_path(self.run_dir, self.uid)

    @property
    def log_file(self) -> Path:
        return log_path(self.run_dir, self.uid)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ReplicatorConfig:
        try:
            tls = data["tls"]
            return cls(
                uid=data["uid"],
                role=data["role"],
                domain=data["domain"],
                node=data["node"],
                peer_node=data["peerNode"],
                command=list(data["command"]),
                ca_file=Path(tls["caFile"]),
                cert_file=Path(tls["certFile"]),
                key_file=Path(tls["keyFile"]),
                run_dir=Path(data.get("runDir") or os.environ.get("XENHA_RUN_DIR", "/run/xenha")),
                peer_address=data.get("peerAddress"),
                listen=data.get("listen"),
                xl=data.get("xl", "xl"),
                xl_env=dict(data.get("xlEnv") or {}),
                heartbeat_interval_ms=int(data.get("heartbeatIntervalMs", 100)),
                heartbeat_timeout_ms=int(data.get("heartbeatTimeoutMs", 600)),
                connect_timeout_s=float(data.get("connectTimeoutS", 60.0)),
                namespace=data.get("namespace", ""),
                name=data.get("name", ""),
            )
        except (KeyError, TypeError) as e:
            raise ConfigError(f"replicator config: missing or malformed {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "namespace": self.namespace,
            "name": self.name,
            "role": self.role,
            "domain": self.domain,
            "node": self.node,
            "peerNode": self.peer_node,
            "command": self.command,
            "tls": {
                "caFile": str(self.ca_file),
                "certFile": str(self.cert_file),
                "keyFile": str(self.key_file),
            },
            "runDir": str(self.run_dir),
            "peerAddress": self.peer_address,
            "listen": self.listen,
            "xl": self.xl,
            "xlEnv": self.xl_env,
            "heartbeatIntervalMs": self.heartbeat_interval_ms,
            "heartbeatTimeoutMs": self.heartbeat_timeout_ms,
            "connectTimeoutS": self.connect_timeout_s,
        }

    @classmethod
    def load(cls, path: Path) -> ReplicatorConfig:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a JSON object")
        return cls.from_json(data)

    def write(self, path: Path) -> None:
        """Atomically, owner-only (it names the key file)."""
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.to_json(), f, indent=2)
        os.replace(tmp, path)
