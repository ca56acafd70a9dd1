"""The agent's view of its replicator processes: what they say, how to start and find them.

The replicator itself, its config file and its control protocol belong to the data plane
(`replicator.py`, `replicator_config.py`, `replicator_client.py`). This module adds what only
the agent needs: a typed reading of `status`, the mapping of the replicator's states onto the
API's, starting replicators so that they outlive the agent (systemd scope or own session), and
finding them again after a restart. Files in the run dir, per replication:

    <uid>.sock / .json / .log / .xl.sock / .accept.sock   the replicator's (data plane)
    <uid>.tls/{ca.crt,tls.crt,tls.key}                     TLS material, written by the agent
    <uid>.agent.json                                       the agent's record (state.py)
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from xenha.api.models import CheckpointStats, ReplicationState
from xenha_agent.relay_listener import accept_socket_path
from xenha_agent.replicator_client import spawn_replicator
from xenha_agent.replicator_config import (
    ReplicatorConfig,
    config_path,
    control_socket_path,
    xl_socket_path,
)

log = logging.getLogger(__name__)

LauncherKind = Literal["systemd-scope", "process"]


class Role(enum.StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class ReplicatorState(enum.StrEnum):
    """The replicator's own states (replicator_client.State)."""

    STARTING = "Starting"
    SEEDING = "Seeding"
    REPLICATING = "Replicating"
    # Stream lost. Secondary: stdin held open, waiting for activate or drop. Primary: xl's
    # transport held open (the guest's output stays held), waiting for degrade or fence.
    PEER_LOST = "PeerLost"
    ACTIVATING = "Activating"
    ACTIVE = "Active"
    DROPPED = "Dropped"
    DEGRADED = "Degraded"  # primary: stream lost, guest resumed unprotected
    FENCED = "Fenced"
    STOPPING = "Stopping"
    STOPPED = "Stopped"
    FAILED = "Failed"


# XenNode.status has no PeerLost/Dropped: both are a standby without a usable stream.
_API_STATE = {
    ReplicatorState.PEER_LOST: ReplicationState.DEGRADED,
    ReplicatorState.DROPPED: ReplicationState.DEGRADED,
}


def api_state(state: ReplicatorState) -> ReplicationState:
    return _API_STATE.get(state) or ReplicationState(state.value)


# -- what a replicator says -------------------------------------------------------------------


@dataclass(frozen=True)
class ReplicatorStatus:
    """A replicator's `status`, read tolerantly: unknown or missing fields become None."""

    uid: str | None = None
    role: Role | None = None
    state: ReplicatorState | None = None
    reason: str | None = None
    message: str | None = None
    peer_connected: bool = False
    ever_connected: bool = False
    # CLOCK_MONOTONIC seconds (system-wide: comparable with the agent's time.monotonic()).
    peer_lost_at: float | None = None
    last_heartbeat_age_ms: int | None = None
    # Checkpoints the peer reported seeing in its last heartbeat.
    peer_checkpoints: int | None = None
    checkpoints: CheckpointStats | None = None
    last_checkpoint_at: float | None = None
    fenced: bool = False
    # Primary: xl's transport is held open after the loss (output held until `degrade`).
    # None when the replicator does not say; the agent then infers it (Agent._output_held).
    output_held: bool | None = None
    # The line in which xl refused COLO (replicator_client.colo_refusal); None if it did not.
    colo_refused: str | None = None

    @property
    def has_checkpoint(self) -> bool:
        return bool(self.checkpoints and self.checkpoints.total)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def parse_status(data: Mapping[str, Any]) -> ReplicatorStatus:
    role, state = data.get("role"), data.get("state")
    raw_cp = data.get("checkpoints")
    checkpoints, last_at = None, None
    if isinstance(raw_cp, Mapping):
        last_unix = _number(raw_cp.get("lastTimeUnix"))
        checkpoints = CheckpointStats(
            total=_int(raw_cp.get("total")),
            last_time=datetime.fromtimestamp(last_unix, UTC) if last_unix else None,
            interval_ms=_int(raw_cp.get("intervalMs")),
            last_pause_ms=_int(raw_cp.get("lastPauseMs")),
            last_bytes=_int(raw_cp.get("lastBytes")),
            bytes_per_second=_int(raw_cp.get("bytesPerSecond")),
        )
        last_at = _number(raw_cp.get("lastMonotonic"))
    return ReplicatorStatus(
        uid=data.get("uid") if isinstance(data.get("uid"), str) else None,
        role=Role(role) if role in set(Role) else None,
        state=ReplicatorState(state) if state in set(ReplicatorState) else None,
        reason=data.get("reason") or None,
        message=data.get("message") or None,
        peer_connected=data.get("peerConnected") is True,
        ever_connected=data.get("everConnected") is True,
        peer_lost_at=_number(data.get("peerLostMonotonic")),
        last_heartbeat_age_ms=_int(data.get("lastHeartbeatAgeMs")),
        peer_checkpoints=_int(data.get("peerCheckpoints")),
        checkpoints=checkpoints,
        last_checkpoint_at=last_at,
        fenced=data.get("fenced") is True,
        output_held=data["outputHeld"] if isinstance(data.get("outputHeld"), bool) else None,
        colo_refused=data.get("coloRefused") if isinstance(data.get("coloRefused"), str) else None,
    )


@dataclass(frozen=True)
class ColoRefused:
    """xl refused COLO for a replication on this node: retrying cannot help, so it is not
    retried while the replication asks for COLO, and reported Failed (ColoUnsupported)."""

    role: Role
    # What xl said ("" when known before asking xl: xen.coloSupported false), and why, for
    # XenNode.status.
    line: str
    message: str


def last_heartbeat_time(status: ReplicatorStatus, now: datetime) -> datetime | None:
    if status.last_heartbeat_age_ms is None:
        return None
    return now - timedelta(milliseconds=status.last_heartbeat_age_ms)


# -- talking to one ---------------------------------------------------------------------------


class ReplicatorControl(Protocol):
    """The control operations (`replicator_client.ReplicatorClient` provides them)."""

    async def status(self) -> Any: ...

    async def lease(self, last_renewed_monotonic: float, duration_s: float) -> None: ...

    async def activate(self) -> dict[str, Any]: ...

    async def drop(self) -> dict[str, Any]: ...

    async def fence(self) -> dict[str, Any]: ...

    async def unfence(self) -> dict[str, Any]: ...

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Any op (`{"op": "degrade"}`: release the output a primary held after the loss)."""
        ...

    async def stop(self) -> dict[str, Any]: ...


def socket_alive(path: Path, timeout: float = 1.0) -> bool | None:
    """True: someone listens; False: nobody (the replicator is gone); None: cannot tell."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError:
            return None
    return True


# -- files ------------------------------------------------------------------------------------


def tls_dir(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.tls"


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, readable by its owner only.

    No fsync: these files must survive the agent, not the host (a host that restarts has no
    replicators and no guests left to be consistent with), and an fsync on a busy disk
    would stall the event loop that renews the host Lease.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_tls(run_dir: Path, uid: str, *, ca: bytes, cert: bytes, key: bytes) -> tuple[Path, ...]:
    """Install this node's TLS material for `uid`; returns (ca, cert, key) paths."""
    directory = tls_dir(run_dir, uid)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    paths = []
    for name, data in (("ca.crt", ca), ("tls.crt", cert), ("tls.key", key)):
        path = directory / name
        if not path.exists() or path.read_bytes() != data:
            write_private(path, data)
        paths.append(path)
    return tuple(paths)


def forget(run_dir: Path, uid: str) -> None:
    """Remove the files of a replicator that has exited (its log stays)."""
    for path in (
        control_socket_path(run_dir, uid),
        config_path(run_dir, uid),
        xl_socket_path(run_dir, uid),
        accept_socket_path(run_dir, uid),
    ):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    shutil.rmtree(tls_dir(run_dir, uid), ignore_errors=True)


def colo_refusal_path(run_dir: Path) -> Path:
    return run_dir / "xl-colo-refused.json"


def save_colo_refusal(run_dir: Path, *, xen_version: str, line: str) -> None:
    """Remember that this host's xl refused COLO (its libxl lacks it, although `xl help
    remus` offers -c): a restarted agent must not ask again, only to be refused again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"xenVersion": xen_version, "line": line}
    write_private(colo_refusal_path(run_dir), json.dumps(data).encode())


def colo_refused_before(run_dir: Path, xen_version: str) -> str | None:
    """The line in which xl refused COLO on this host, if it did under this Xen version (the
    run dir lives until the host reboots; an upgrade may bring a libxl with COLO)."""
    try:
        data = json.loads(colo_refusal_path(run_dir).read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("xenVersion") != xen_version:
        return None
    line = data.get("line")
    return line if isinstance(line, str) else None


def existing_uids(run_dir: Path) -> list[str]:
    """UIDs with a control socket in the run dir (live or stale)."""
    if not run_dir.is_dir():
        return []
    names = (p.name for p in run_dir.glob("*.sock"))
    return sorted(
        n.removesuffix(".sock")
        for n in names
        if not n.endswith((".xl.sock", ".accept.sock")) and not n.startswith(".")
    )


# -- starting one -----------------------------------------------------------------------------


def replicator_command(kind: LauncherKind, uid: str, base: list[str] | None = None) -> list[str]:
    """argv prefix that starts a replicator (`--config <file>` is appended by the spawner)."""
    command = base or [sys.executable, "-m", "xenha_agent.replicator"]
    if kind == "systemd-scope":
        # The host's systemd moves it into a scope of its own, out of the agent container's
        # cgroup, so a container restart does not take it along.
        unit = f"xenha-replicator-{uid}"
        return ["systemd-run", "--scope", "--collect", "--quiet", f"--unit={unit}", *command]
    return command


class ReplicatorLauncher(Protocol):
    def launch(self, config: ReplicatorConfig) -> int:
        """Start a replicator for `config` (its config file written); returns its pid."""
        ...

    def reap(self) -> None:
        """Collect replicators that exited (called every pass of the agent's loop)."""
        ...


class Launcher:
    """Starts replicators detached from the agent; reaps the ones that exit while it lives."""

    def __init__(
        self,
        *,
        kind: LauncherKind = "process",
        command: list[str] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.kind = kind
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self._children: list[subprocess.Popen[bytes]] = []

    def launch(self, config: ReplicatorConfig) -> int:
        proc = spawn_replicator(
            config,
            command=replicator_command(self.kind, config.uid, self.command),
            env=self.env,
        )
        self._children.append(proc)
        return proc.pid

    def reap(self) -> None:
        self._children = [p for p in self._children if p.poll() is None]
