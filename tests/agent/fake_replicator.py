"""A stand-in replicator for the agent's control-plane tests.

It serves the real control protocol (replicator_client's JSON lines) on the real socket path,
so the agent under test uses its real `ReplicatorClient`, discovery and launch paths. What it
does not do is move Xen's bytes: the test sets its state (`connect()`, `lose_peer()`, ...) the
way a relay would, and reads back which operations the agent asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from xenha_agent.replicator_config import ReplicatorConfig, control_socket_path


class FakeReplicator:
    def __init__(self, config: ReplicatorConfig) -> None:
        self.config = config
        self.uid = config.uid
        self.role = config.role
        self.state = "Starting"
        self.reason = "Starting"
        self.peer_connected = False
        self.ever_connected = False
        self.peer_lost_at: float | None = None
        self.checkpoints = 0
        # Checkpoints the peer said it holds (heartbeats); None: all of ours.
        self.acknowledged: int | None = None
        self.fenced = False
        self.lease: tuple[float, float] | None = None
        self.calls: list[str] = []
        # Set by the test: status requests go unanswered, as a busy or hung replicator's
        # would, until the agent gives up on them (hangs up).
        self.hold_status = False
        # What arrived, in order: (uid, what, value). Tests that need the order across
        # replicators give several fakes the same list; one event loop serves them all, so
        # the order of the list is the order of arrival.
        self.journal: list[tuple[str, str, Any]] = []
        self._held = 0
        self._server: asyncio.AbstractServer | None = None

    # -- what the test does to it (as the relay would) --------------------------------------

    def connect(self, checkpoints: int = 5) -> None:
        self.peer_connected = self.ever_connected = True
        self.peer_lost_at = None
        self.checkpoints = checkpoints
        self.state, self.reason = "Replicating", "CheckpointReceived"

    def lose_peer(self) -> None:
        # Both sides hold on: the secondary keeps migrate-receive's input open, the primary
        # keeps xl's transport open (the guest's output stays held) until the agent decides.
        self.peer_connected = False
        self.peer_lost_at = time.monotonic()
        self.state, self.reason = "PeerLost", "LostConnection"

    # -- the protocol -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "role": self.role,
            "state": self.state,
            "reason": self.reason,
            "message": f"fake {self.state}",
            "pid": 0,
            "peerConnected": self.peer_connected,
            "everConnected": self.ever_connected,
            "peerLostMonotonic": self.peer_lost_at,
            "lastHeartbeatAgeMs": 50 if self.peer_connected else None,
            "peerCheckpoints": (
                self.checkpoints if self.acknowledged is None else self.acknowledged
            ),
            "checkpoints": {
                "total": self.checkpoints,
                "lastTimeUnix": time.time() if self.checkpoints else None,
                "lastMonotonic": time.monotonic() if self.checkpoints else None,
                "intervalMs": 200,
                "lastPauseMs": 3,
                "lastBytes": 4096,
                "bytesPerSecond": 20480,
                "streamBytes": 4096 * self.checkpoints,
                "parseError": None,
            },
            "fenced": self.fenced,
            "lease": None
            if self.lease is None
            else {"lastRenewedMonotonic": self.lease[0], "durationS": self.lease[1]},
        }

    def _xl(self, *args: str) -> int:
        return subprocess.run(
            [self.config.xl, *args], env=self.config.xl_env or None, capture_output=True
        ).returncode

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = str(request.get("op"))
        if op != "status":
            self.calls.append(op)
        if op == "status":
            return {"ok": True, "status": self.status()}
        if op == "lease":
            self.lease = (float(request["lastRenewedMonotonic"]), float(request["durationS"]))
            self.journal.append((self.uid, "lease", self.lease[0]))
            return {"ok": True}
        if op == "activate":
            if self.state not in ("PeerLost", "Activating", "Active"):
                return {"ok": False, "error": "activation needs a lost peer", "state": self.state}
            self.state, self.reason = "Active", "FailedOver"
            return {"ok": True, "state": "Activating"}
        if op == "degrade":
            if self.role != "primary":
                return {"ok": False, "error": "only a primary", "state": self.state}
            self.state, self.reason = "Degraded", "StandbyRevoked"
            return {"ok": True, "state": "Degraded"}
        if op == "drop":
            self.state, self.reason = "Dropped", "DropRequested"
            return {"ok": True, "state": "Dropped", "destroyExit": None}
        if op == "fence":
            if self.role != "primary":
                return {"ok": False, "error": "only a primary", "state": self.state}
            if not self.fenced:
                code = self._xl("pause", self.config.domain)
                self.fenced = code == 0
                self.state = "Fenced" if self.fenced else self.state
                return {"ok": True, "state": self.state, "pauseExit": code}
            return {"ok": True, "state": self.state, "pauseExit": 0}
        if op == "unfence":
            if self.fenced:
                code = self._xl("unpause", self.config.domain)
                self.fenced = code != 0
                self.state = "Degraded"
                return {"ok": True, "state": self.state, "unpauseExit": code}
            return {"ok": True, "state": self.state, "unpauseExit": 0}
        if op == "stop":
            self.state, self.reason = "Stopped", "StopRequested"
            asyncio.get_running_loop().call_later(0.05, self.close)
            return {"ok": True, "state": "Stopped"}
        return {"ok": False, "error": f"unknown op {op}", "state": self.state}

    # -- serving ----------------------------------------------------------------------------

    async def serve(self) -> None:
        path = control_socket_path(self.config.run_dir, self.uid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._server = await asyncio.start_unix_server(self._client, path=str(path))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = json.loads(line)
                if request.get("op") == "status" and self.hold_status:
                    await self._hold_status(reader)
                    return
                writer.write(json.dumps(self.handle(request)).encode() + b"\n")
                await writer.drain()
        except (ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def _hold_status(self, reader: asyncio.StreamReader) -> None:
        """Answer nothing; the request is outstanding until the agent hangs up."""
        self._held += 1
        self.journal.append((self.uid, "status held", self._held))
        # The agent sends one request per connection: the next thing it does is hang up.
        await reader.read()
        self.journal.append((self.uid, "status given up", self._held))

    def close(self) -> None:
        """Exit, as the process would: nobody listens on the socket any more."""
        if self._server is not None:
            self._server.close()
        path = control_socket_path(self.config.run_dir, self.uid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        # A socket file nobody listens on is what a crashed replicator leaves.
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(path))


class FakeLauncher:
    """Launcher that "starts" FakeReplicators in this event loop; they outlive agents."""

    def __init__(self) -> None:
        self.replicators: dict[str, FakeReplicator] = {}
        self.launched: list[ReplicatorConfig] = []

    def launch(self, config: ReplicatorConfig) -> int:
        fake = FakeReplicator(config)
        self.replicators[config.uid] = fake
        self.launched.append(config)
        # Bound before the agent's next status call: the agent registers it at once.
        loop = asyncio.get_running_loop()
        task = loop.create_task(fake.serve())
        _background.add(task)
        task.add_done_callback(_background.discard)
        return 0

    def reap(self) -> None:
        pass

    def by_role(self, role: str) -> FakeReplicator:
        return next(r for r in self.replicators.values() if r.role == role)


_background: set[asyncio.Task[None]] = set()


def run_dir_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir())
