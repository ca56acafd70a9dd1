"""Prometheus metrics of the operator.

One `OperatorMetrics` per process, on its own registry (not the client's global one), so tests
can build as many as they like and read them back.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from time import perf_counter

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

PHASES = ("Pending", "Seeding", "Protected", "Degraded", "FailingOver", "Suspended", "Failed")


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reconciles = Counter(
            "xenha_operator_reconciles",
            "Reconcile passes over one XenReplication, by outcome.",
            ["result"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "xenha_operator_reconcile_duration_seconds",
            "Time spent in one reconcile pass (observing, deciding, writing).",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.replications = Gauge(
            "xenha_operator_replications",
            "XenReplications served by this operator, by phase.",
            ["phase"],
            registry=self.registry,
        )
        self.transitions = Counter(
            "xenha_operator_transitions",
            "Transitions announced as Events, by reason (Protected, FailedOver, ...).",
            ["reason"],
            registry=self.registry,
        )
        self.status_writes = Counter(
            "xenha_operator_status_writes",
            "Status patches of XenReplications, by outcome (written, conflict).",
            ["result"],
            registry=self.registry,
        )
        for phase in PHASES:
            self.replications.labels(phase).set(0)
        self._phases: dict[str, str] = {}

    @contextmanager
    def reconcile(self) -> Iterator[None]:
        """Time one pass and count it as ok, or as error if it raises."""
        start = perf_counter()
        try:
            yield
        except BaseException:
            self.reconciles.labels("error").inc()
            raise
        else:
            self.reconciles.labels("ok").inc()
        finally:
            self.reconcile_seconds.observe(perf_counter() - start)

    def set_phase(self, key: str, phase: str | None) -> None:
        """Record the phase of one replication (None: it is gone)."""
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        self._refresh()

    def phase_counts(self) -> Mapping[str, int]:
        counts = dict.fromkeys(PHASES, 0)
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        return counts

    def _refresh(self) -> None:
        for phase, count in self.phase_counts().items():
            self.replications.labels(phase).set(count)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)
