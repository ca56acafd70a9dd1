"""The failover and switchover demonstrations: a fault while a client keeps calling the guest.

Both run the same way: a client thread asks the guest's counter service for the next value
every few milliseconds (each answer goes to the ledger), the fault is injected, the
replication is watched until it is Protected again on the other node, then the timeline and
the client's view are assembled from the ledger, the fencing Lease, the status and Events,
and the ledger's invariant checkers give the verdict.

What the demo needs from a lab is small (``LabHandle``): read the replication, inject the
fault, power a host back on. ``xenha lab`` provides it over the supervisor's control socket
(``remote.RemoteLab``); a ``Stack`` is one too, for tests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from xenha.lab import kube
from xenha.lab.timeline import (
    ClientView,
    Entry,
    Observation,
    client_view,
    failover_timeline,
)
from xenha.sim import ledger as ledger_mod
from xenha.sim.client import ServiceClient

Obj = dict[str, Any]
T = TypeVar("T")


class NotReady(RuntimeError):
    """The replication is not in a state a demo can start from."""


class LabHandle(Protocol):
    @property
    def ledger_path(self) -> Path: ...

    def replication(self, name: str, namespace: str) -> Obj | None: ...

    def fence_lease(self, name: str, namespace: str) -> Obj | None: ...

    def events(self, name: str, namespace: str) -> list[Obj]: ...

    def guest(self, domain: str) -> tuple[tuple[str, int], str]:
        """(service address, uuid) of a guest."""
        ...

    def kill_host(self, host: str) -> float:
        """Power cut; returns when it happened (wall clock)."""
        ...

    def power_on(self, host: str) -> object: ...

    def request_switchover(self, name: str, namespace: str, target: str) -> None: ...


class ClientLoop(threading.Thread):
    """The guest's "user": asks for the next value every ``interval`` seconds."""

    def __init__(self, client: ServiceClient, interval: float = 0.02) -> None:
        super().__init__(name="lab-client", daemon=True)
        self.client = client
        self.interval = interval
        self.requests = 0
        # Not `_stop`: threading.Thread has a method of that name.
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.requests += 1
            self.client.next()
            self._halt.wait(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self.client.close()


@dataclass
class DemoResult:
    kind: str
    name: str
    namespace: str
    old: str
    new: str
    fault_at: float
    timeline: list[Entry] = field(default_factory=list)
    client: ClientView = field(default_factory=ClientView)
    checks: dict[str, str | None] = field(default_factory=dict)
    protected_again: bool = False
    # Whether the demo waited for re-protection (a host left off cannot be a standby).
    reprotect: bool = True
    error: str | None = None
    final: Obj | None = None

    @property
    def ok(self) -> bool:
        active = ((self.final or {}).get("status") or {}).get("activeNode")
        return (
            self.error is None
            and active == self.new
            and (self.protected_again or not self.reprotect)
            and self.client.clean
            and all(problem is None for problem in self.checks.values())
        )

    def to_json(self) -> dict[str, Any]:
        status = (self.final or {}).get("status") or {}
        return {
            "kind": self.kind,
            "replication": f"{self.namespace}/{self.name}",
            "from": self.old,
            "to": self.new,
            "ok": self.ok,
            "error": self.error,
            "protectedAgain": self.protected_again,
            "activeNode": status.get("activeNode"),
            "standbyNode": status.get("standbyNode"),
            "phase": status.get("phase"),
            "timeline": [
                {"ms": round((e.at - self.fault_at) * 1000), "what": e.what, "source": e.source}
                for e in self.timeline
            ],
            "client": {
                "requests": self.client.requests,
                "answers": self.client.answers,
                "longestGapMs": self.client.longest_gap_ms,
                "lastBefore": self.client.last_before,
                "firstAfter": self.client.first_after,
                "violations": self.client.violations,
            },
            "checks": self.checks,
        }


def check_ledger(path: Path) -> dict[str, str | None]:
    """The ledger's invariant checkers: None where one holds, the violation where not."""
    out: dict[str, str | None] = {}
    for name, check in (
        ("never two active copies", ledger_mod.assert_never_two_active),
        (
            "client view clean (no answer lost, repeated or going backwards)",
            ledger_mod.assert_client_view_clean,
        ),
    ):
        try:
            check(path)
            out[name] = None
        except ledger_mod.LedgerViolation as exc:
            out[name] = str(exc)
    return out


class _Watch:
    """Observes the replication every ``interval`` seconds (our clock) on a thread."""

    def __init__(
        self,
        lab: LabHandle,
        name: str,
        namespace: str,
        on_change: Callable[[Obj], None] | None,
        interval: float = 0.1,
    ) -> None:
        self.lab, self.name, self.namespace = lab, name, namespace
        self.on_change = on_change
        self.interval = interval
        self.observations: list[Observation] = []
        # Event uid -> when we first saw it: Events carry whole seconds at best.
        self.events_seen: dict[str, float] = {}
        self.latest: Obj | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lab-watch", daemon=True)

    def start(self) -> _Watch:
        self._thread.start()
        return self

    def _run(self) -> None:
        rounds = 0
        while not self._stop.is_set():
            try:
                obj = self.lab.replication(self.name, self.namespace)
                if rounds % 3 == 0:
                    self._see_events()
            except Exception:  # the API may be slow during a fault; look again
                obj = None
            rounds += 1
            if obj is not None:
                status = obj.get("status") or {}
                self.observations.append(
                    Observation(
                        time.time(),
                        status.get("phase"),
                        status.get("activeNode"),
                        status.get("standbyNode"),
                    )
                )
                self.latest = obj
                if self.on_change is not None:
                    self.on_change(obj)
            self._stop.wait(self.interval)

    def _see_events(self) -> None:
        now = time.time()
        for event in self.lab.events(self.name, self.namespace):
            uid = (event.get("metadata") or {}).get("uid")
            if uid:
                self.events_seen.setdefault(uid, now)

    def wait(self, predicate: Callable[[Obj], bool], timeout: float, what: str) -> Obj:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            latest = self.latest
            if latest is not None and predicate(latest):
                return latest
            time.sleep(self.interval / 2)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _status(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("status") or {}


def run(
    lab: LabHandle,
    *,
    kind: str,
    name: str,
    namespace: str,
    target: str | None = None,
    power_on_after: float | None = 2.0,
    reprotect: bool = True,
    timeout: float = 180.0,
    on_change: Callable[[Obj], None] | None = None,
    warmup: float = 1.0,
) -> DemoResult:
    """A failover (``kind="failover"``: power cut of the active host) or a switchover
    (``kind="switchover"``: the annotation), from Protected back to Protected (or, without
    ``reprotect``, until the other node is active)."""
    current = lab.replication(name, namespace)
    if current is None:
        raise NotReady(f"no XenReplication {namespace}/{name}")
    status = _status(current)
    old, standby = status.get("activeNode"), status.get("standbyNode")
    new = target or standby
    if status.get("phase") != "Protected" or not old or not new:
        raise NotReady(
            f"{namespace}/{name} is {status.get('phase')} (active {old}, standby {standby}); "
            "a demo starts from Protected"
        )
    address, uuid = lab.guest(current["spec"]["domain"])
    client = ServiceClient(
        address, ledger_path=lab.ledger_path, uuid=uuid, name=current["spec"]["domain"], timeout=1
    )
    loop = ClientLoop(client)
    watch = _Watch(lab, name, namespace, on_change).start()
    extra: list[Entry] = []
    result = DemoResult(
        kind, name, namespace, str(old), str(new), fault_at=time.time(), reprotect=reprotect
    )
    fault = kind
    loop.start()
    try:
        time.sleep(warmup)
        if kind == "failover":
            result.fault_at = lab.kill_host(str(old))
            fault = f"power cut: {old} dies (simulator, agent, replicators, xl)"
        else:
            result.fault_at = time.time()
            lab.request_switchover(name, namespace, str(new))
            fault = f"switchover to {new} requested ({kube.SWITCHOVER_ANNOTATION})"
        moved = watch.wait(
            lambda o: _status(o).get("activeNode") == new, timeout, f"{new} to be active"
        )
        if not reprotect:
            result.final = moved
            time.sleep(0.5)
            return _finish(lab, result, loop, watch, client, uuid, fault, extra)
        if kind == "failover" and power_on_after is not None:
            time.sleep(power_on_after)
            extra.append(
                Entry(time.time(), f"{old} powered on again (empty host, new agent)", "lab")
            )
            lab.power_on(str(old))
        final = watch.wait(
            lambda o: (
                _status(o).get("activeNode") == new and _status(o).get("phase") == "Protected"
            ),
            timeout,
            f"Protected again with {new} active",
        )
        result.protected_again = True
        result.final = final
        time.sleep(0.5)
    except (TimeoutError, OSError, RuntimeError) as exc:
        result.error = str(exc)
        result.final = watch.latest
    return _finish(lab, result, loop, watch, client, uuid, fault, extra)


def _finish(
    lab: LabHandle,
    result: DemoResult,
    loop: ClientLoop,
    watch: _Watch,
    client: ServiceClient,
    uuid: str,
    fault: str,
    extra: list[Entry],
) -> DemoResult:
    loop.stop()
    watch.stop()
    name, namespace = result.name, result.namespace
    events = ledger_mod.read(lab.ledger_path)
    result.timeline = failover_timeline(
        fault_at=result.fault_at,
        fault=fault,
        old=result.old,
        new=result.new,
        uuid=uuid,
        ledger=events,
        lease=_quietly(lambda: lab.fence_lease(name, namespace)),
        status=_status(result.final or {}),
        observations=watch.observations,
        events=_quietly(lambda: lab.events(name, namespace)) or [],
        events_seen=watch.events_seen,
        extra=extra,
    )
    result.client = client_view(
        events,
        uuid=uuid,
        client=client.client_id,
        fault_at=result.fault_at,
        requests=loop.requests,
    )
    result.checks = check_ledger(lab.ledger_path)
    return result


def _quietly(call: Callable[[], T]) -> T | None:
    try:
        return call()
    except Exception:  # a view of what happened must not fail on a missing source
        return None
