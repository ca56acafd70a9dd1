"""The agent's side of a replicator: start it, and talk to it over its control socket.

Protocol on `$XENHA_RUN_DIR/<uid>.sock` (Unix stream socket, JSON lines): one request object
per line, one response object per line, as many requests per connection as wanted.

    {"op": "status"}      -> {"ok": true, "status": ReplicatorStatus}
    {"op": "lease", "lastRenewedMonotonic": <CLOCK_MONOTONIC s>, "durationS": <D>}
                          -> {"ok": true}
    {"op": "activate"}    -> {"ok": true, "state": "Activating"}    (secondary, peer lost)
    {"op": "drop"}        -> {"ok": true, "state": "Dropped", "destroyExit": int | null}
    {"op": "degrade", "reason": "StandbyRevoked"?}
                          -> {"ok": true, "state": "Degraded" | ...}   (primary, peer lost:
                             close xl's transport, so xl resumes the guest unprotected)
    {"op": "fence"}       -> {"ok": true, "state": "Fenced", "pauseExit": int}   (primary)
    {"op": "unfence"}     -> {"ok": true, "state": ..., "unpauseExit": int}      (primary)
    {"op": "stop"}        -> {"ok": true, "state": "Stopped" | "Active"}; then the process
                             exits (a standby that was not activated drops its replica first;
                             a primary closes xl's transport, so xl resumes the guest)
    anything refused      -> {"ok": false, "error": "<why>", "state": "<state>"}

The replicator's rules, which hold whatever the agent asks:
- `activate` only once the relay has lost the peer (the standby never activates under a live
  stream); it closes migrate-receive's stdin, so xl restores the last complete checkpoint.
- `drop` SIGKILLs migrate-receive *before* its stdin closes, then `xl destroy <dom>--incoming`.
- A primary that lost the peer keeps xl's transport open and stops reading it, so xl
  blocks and releases no output the standby lacks, until `degrade` (or `stop`).
- `fence` pauses the guest once; repeating it does not stack Xen's pause count. It keeps the
  transport (the output stays held until `degrade`).
- A primary that has lost the peer self-fences when the last renewal the agent reported
  through `lease` is older than D - max(D/4, 0.3 s) (docs/design.md "Fencing").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, TypedDict, cast

from xenha_agent.replicator_config import (
    ReplicatorConfig,
    config_path,
    control_socket_path,
)

State = Literal[
    "Starting",  # dialing / waiting for the peer
    "Seeding",  # connected, no complete checkpoint yet
    "Replicating",  # at least one complete checkpoint
    # Stream lost. Secondary: stdin held open, waiting for activate or drop. Primary: xl's
    # transport held open (output held), waiting for degrade (or fence, stop).
    "PeerLost",
    "Activating",  # secondary: stdin closed, xl restoring the last checkpoint
    "Active",  # secondary: xl failed over, the guest runs here
    "Dropped",  # secondary: replica destroyed
    "Degraded",  # primary: after degrade, xl resumed the guest unprotected
    "Fenced",  # primary: guest paused (by the agent, or self-fenced)
    "Stopping",
    "Stopped",  # orderly end (stop, or xl remus ended with the stream)
    "Failed",  # see reason/message
]


class CheckpointsStatus(TypedDict):
    total: int
    lastTimeUnix: float | None
    lastMonotonic: float | None
    intervalMs: int | None
    lastPauseMs: int | None
    lastBytes: int | None
    bytesPerSecond: int
    streamBytes: int
    parseError: str | None


class ReplicatorEvent(TypedDict):
    time: float  # unix seconds
    monotonic: float  # CLOCK_MONOTONIC seconds (comparable with the agent's)
    event: str  # kebab-case: connected, peer-lost, xl-exited, fenced, ...
    message: str


class ReplicatorStatus(TypedDict):
    uid: str
    role: Literal["primary", "secondary"]
    state: State
    reason: str  # CamelCase, for conditions: LostConnection, HeartbeatTimeout, ...
    message: str
    pid: int
    peerConnected: bool
    everConnected: bool
    peerLostMonotonic: float | None  # when the relay lost the peer (fencing's peer_lost_at)
    lastHeartbeatAgeMs: int | None
    peerCheckpoints: int | None  # what the peer reported in its last heartbeat
    checkpoints: CheckpointsStatus
    bytesSent: int
    bytesReceived: int
    listenPort: int | None  # secondary with its own listener
    xlPid: int | None
    xlExit: int | None
    xlOutput: list[str]  # last lines xl printed
    fenced: bool
    outputHeld: bool | None  # primary: stream lost, xl's transport still held open
    coloRefused: str | None  # the line in which xl refused COLO (see colo_refusal)
    lease: dict[str, float] | None
    events: list[ReplicatorEvent]


# What xl prints when COLO cannot run, on either side; retrying cannot help. Debian builds
# libxl without COLO (libxl_no_colo.c: "COLO is not supported", although `xl help remus` lists
# -c), and libxl restores only HVM guests with COLO ("COLO only supports HVM, unable to restore
# domain"). libxl's LOGD prefixes the domain: "libxl: error: <file>:<line>:<func>: Domain 3:...".
COLO_NOT_BUILT = "COLO is not supported"
COLO_HVM_ONLY = "COLO only supports HVM"
_LOG_DOMAIN = re.compile(r"\bDomain (\d+):")

ColoRefusal = Literal["host", "guest"]


def colo_refusal(line: str) -> ColoRefusal | None:
    """Whether an xl line refuses COLO: "host" (this host's libxl lacks it), "guest" (not
    for this guest), or None."""
    if COLO_NOT_BUILT in line:
        return "host"
    if COLO_HVM_ONLY in line:
        return "guest"
    return None


def colo_message(node: str, line: str) -> str:
    """Why COLO does not run, for XenNode.status (and from there the user)."""
    if colo_refusal(line) == "host":
        why = f"libxl on {node} is built without COLO"
    else:
        why = "COLO replicates HVM guests only"
    return f"{why}: not retried; use mode remus ({line.strip()})"


def logged_domid(line: str) -> int | None:
    """The domain a libxl log line is about, if it names one."""
    match = _LOG_DOMAIN.search(line)
    return int(match[1]) if match else None


class ReplicatorError(RuntimeError):
    """The replicator refused the request (`ok: false`)."""

    def __init__(self, error: str, response: dict[str, Any]) -> None:
        super().__init__(error)
        self.response = response


class ReplicatorUnavailable(ConnectionError):
    """Nobody answers on the control socket (not started, exited, or hung)."""


class ReplicatorClient:
    """Async client: one short connection per request, so agent restarts need no state."""

    def __init__(self, path: Path, *, timeout: float = 5.0) -> None:
        self.path = path
        self.timeout = timeout

    @classmethod
    def for_uid(cls, run_dir: Path, uid: str, *, timeout: float = 5.0) -> ReplicatorClient:
        return cls(control_socket_path(run_dir, uid), timeout=timeout)

    async def request(self, message: dict[str, Any]) -> dict[str, Any]:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_unix_connection(str(self.path), limit=1 << 20)
        except (OSError, TimeoutError) as e:
            raise ReplicatorUnavailable(f"{self.path}: {e}") from None
        try:
            writer.write(json.dumps(message).encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(self.timeout):
                line = await reader.readline()
        except (OSError, TimeoutError) as e:
            raise ReplicatorUnavailable(f"{self.path}: {e}") from None
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return _parse(line)

    async def status(self) -> ReplicatorStatus:
        return cast(ReplicatorStatus, (await self.request({"op": "status"}))["status"])

    async def lease(self, last_renewed_monotonic: float, duration_s: float) -> None:
        await self.request(
            {
                "op": "lease",
                "lastRenewedMonotonic": last_renewed_monotonic,
                "durationS": duration_s,
            }
        )

    async def activate(self) -> dict[str, Any]:
        return await self.request({"op": "activate"})

    async def drop(self) -> dict[str, Any]:
        return await self.request({"op": "drop"})

    async def degrade(self, reason: str = "") -> dict[str, Any]:
        return await self.request({"op": "degrade", "reason": reason})

    async def fence(self) -> dict[str, Any]:
        return await self.request({"op": "fence"})

    async def unfence(self) -> dict[str, Any]:
        return await self.request({"op": "unfence"})

    async def stop(self) -> dict[str, Any]:
        return await self.request({"op": "stop"})


def request_sync(path: Path, message: dict[str, Any], *, timeout: float = 5.0) -> dict[str, Any]:
    """The same request, blocking (scripts, tests, `xenha agent` debugging)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            line = b""
            while not line.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                line += chunk
    except OSError as e:
        raise ReplicatorUnavailable(f"{path}: {e}") from None
    return _parse(line)


def _parse(line: bytes) -> dict[str, Any]:
    if not line:
        raise ReplicatorUnavailable("replicator closed the connection without answering")
    response = json.loads(line)
    if not isinstance(response, dict):
        raise ReplicatorUnavailable("replicator answered something that is not an object")
    if not response.get("ok"):
        raise ReplicatorError(str(response.get("error", "refused")), response)
    return response


def spawn_replicator(
    config: ReplicatorConfig,
    *,
    command: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Write the config and start the replicator in a session of its own.

    `command` defaults to this interpreter running the module (no PATH lookups); the
    replicator redirects its own output to `<uid>.log` in the run dir. The caller may
    forget the Popen: the process is not tied to the agent's lifetime.
    """
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = config_path(config.run_dir, config.uid)
    config.write(path)
    argv = [*(command or [sys.executable, "-m", "xenha_agent.replicator"]), "--config", str(path)]
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        env=env if env is not None else dict(os.environ),
    )
