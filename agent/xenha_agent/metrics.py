"""Prometheus metrics and the health endpoints (`/healthz`, `/readyz`, `/metrics`).

Each agent owns a registry (not prometheus_client's global one) so that tests and the lab can
run several agents in one process.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import generate_latest

log = logging.getLogger(__name__)

REPLICATION = ("namespace", "name")


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.failovers = Counter(
            "xenha_agent_failovers", "Standby copies this agent activated.", REPLICATION, registry=r
        )
        self.fences = Counter(
            "xenha_agent_fences",
            "Fencing actions on a local copy (pause: self-fence, destroy: lease elsewhere).",
            (*REPLICATION, "action"),
            registry=r,
        )
        self.copies_dropped = Counter(
            "xenha_agent_copies_dropped",
            "Standby copies dropped because the holder was alive.",
            REPLICATION,
            registry=r,
        )
        self.lease_renewals = Counter(
            "xenha_agent_lease_renewals", "Host Lease renewal attempts.", ("result",), registry=r
        )
        self.lease_age = Gauge(
            "xenha_agent_lease_renewal_age_seconds",
            "Seconds since the send time of the last successful host Lease renewal.",
            registry=r,
        )
        self.replicators = Gauge(
            "xenha_agent_replicators", "Replicator processes this agent controls.", registry=r
        )
        self.peer_connected = Gauge(
            "xenha_agent_peer_connected", "Relay link to the peer is up.", REPLICATION, registry=r
        )
        self.checkpoints = Gauge(
            "xenha_agent_checkpoints",
            "Checkpoints completed (replicator's count).",
            REPLICATION,
            registry=r,
        )
        self.checkpoint_interval = Gauge(
            "xenha_agent_checkpoint_interval_milliseconds",
            "Observed time between checkpoints.",
            REPLICATION,
            registry=r,
        )
        self.checkpoint_pause = Gauge(
            "xenha_agent_checkpoint_pause_milliseconds",
            "Guest pause of the last checkpoint.",
            REPLICATION,
            registry=r,
        )
        self.stream_bytes_per_second = Gauge(
            "xenha_agent_stream_bytes_per_second",
            "Replication stream throughput.",
            REPLICATION,
            registry=r,
        )
        self._per_replication = (
            self.peer_connected,
            self.checkpoints,
            self.checkpoint_interval,
            self.checkpoint_pause,
            self.stream_bytes_per_second,
        )
        self._known: set[tuple[str, str]] = set()

    def observe_replication(
        self,
        namespace: str,
        name: str,
        *,
        peer_connected: bool,
        checkpoints: int | None,
        interval_ms: int | None,
        pause_ms: int | None,
        bytes_per_second: int | None,
    ) -> None:
        key = (namespace, name)
        self._known.add(key)
        self.peer_connected.labels(*key).set(1 if peer_connected else 0)
        for gauge, value in (
            (self.checkpoints, checkpoints),
            (self.checkpoint_interval, interval_ms),
            (self.checkpoint_pause, pause_ms),
            (self.stream_bytes_per_second, bytes_per_second),
        ):
            if value is not None:
                gauge.labels(*key).set(value)

    def forget_others(self, keep: set[tuple[str, str]]) -> None:
        """Drop the per-replication series of replications this node no longer serves."""
        for key in self._known - keep:
            for gauge in self._per_replication:
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)
        self._known &= keep

    def render(self) -> bytes:
        data: bytes = generate_latest(self.registry)
        return data


@dataclass
class Health:
    """What the probes answer from; the agent updates it."""

    # The main loop's last pass (monotonic); liveness fails when it stops passing.
    last_tick: float = field(default_factory=time.monotonic)
    stall_after: float = 30.0
    # Readiness: watches synced, replicators re-attached, host Lease renewed, XenNode reported.
    ready: bool = False
    detail: dict[str, str] = field(default_factory=dict)

    def alive(self, now: float) -> bool:
        return now - self.last_tick < self.stall_after


class HealthServer:
    def __init__(
        self,
        health: Health,
        metrics: AgentMetrics,
        *,
        host: str,
        port: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.health = health
        self.metrics = metrics
        self.host = host
        self.port = port
        self.clock = clock
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        return app

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.health.alive(self.clock()):
            return web.Response(text="ok\n")
        return web.Response(status=503, text="main loop stalled\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        if self.health.ready:
            return web.Response(text="ok\n")
        lines = "".join(f"{k}: {v}\n" for k, v in sorted(self.health.detail.items()))
        return web.Response(status=503, text="not ready\n" + lines)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def start(self) -> int:
        """Listen; returns the port (useful with port 0)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
