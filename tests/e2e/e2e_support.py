"""What the end-to-end specifications share: manifests, reads of what the system shows a user
(status, Events), what a host shows (domains, replicator processes), a phase watcher, a client
of a guest, and measurements (of time and of what the stack's processes cost).

Every wait here is generous (the machine is small and shared): a wait says *that* something
happens, never how fast. How fast is measured and reported (`measure`), not asserted.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenha.lab import kube
from xenha.lab.stack import Stack
from xenha.sim import ledger as ledger_mod

Obj = dict[str, Any]

# Generous bounds for a loaded 2-core machine; a test that needs them is slow, not wrong.
SETTLE = 240.0
LONG = 360.0

MEASUREMENTS_ENV = "XENHA_E2E_MEASUREMENTS"


def until(probe: Callable[[], Any], what: str, timeout: float = SETTLE) -> Any:
    """Poll until `probe` returns something truthy (an empty list is not); returns it."""
    return kube.wait_until(lambda: probe() or None, timeout=timeout, what=what)


# --- manifests ----------------------------------------------------------------------------


def replication(
    name: str,
    *,
    domain: str | None = None,
    mode: str = "remus",
    primary: str = "xen-a",
    secondary: str = "xen-b",
    interval_ms: int | None = 200,
    lease_seconds: int,
    **spec: Any,
) -> Obj:
    """A XenReplication manifest (the namespace is the stack's). The lease is the caller's
    choice: it decides when a guest whose agent's renewals stall is paused."""
    body: Obj = {
        "domain": domain or name,
        "mode": mode,
        "primaryNode": primary,
        "secondaryNode": secondary,
        "failover": {"automatic": True, "leaseDurationSeconds": lease_seconds},
        **spec,
    }
    if mode == "remus" and interval_ms is not None:
        body["checkpoint"] = {"intervalMs": interval_ms}
    if mode == "colo":
        body.setdefault("colo", {"userspaceProxy": True})
    return {
        "apiVersion": "xenha.io/v1alpha1",
        "kind": "XenReplication",
        "metadata": {"name": name},
        "spec": body,
    }


# --- what a user sees -----------------------------------------------------------------------


def status(stack: Stack, name: str) -> Obj:
    return dict(((stack.replication(name) or {}).get("status")) or {})


def condition(stack: Stack, name: str, type_: str) -> Obj:
    return kube.condition(stack.replication(name), type_) or {}


def from_agent(event: Obj) -> bool:
    """Agents post node-local Events about a replication too (some with the same reasons,
    e.g. Degraded); the operator's transitions are the ones the specifications count."""
    source = str((event.get("source") or {}).get("component") or "")
    return "agent" in source or "agent" in str(event.get("reportingComponent") or "")


def event_counts(stack: Stack, name: str) -> collections.Counter[str]:
    """The operator's Events about the replication by reason, counting a repeated Event
    (`count`, `series.count`) as many."""
    counts: collections.Counter[str] = collections.Counter()
    for event in stack.events(name):
        if from_agent(event):
            continue
        series = (event.get("series") or {}).get("count")
        counts[str(event.get("reason"))] += max(int(event.get("count") or 1), int(series or 1))
    return counts


def wait_events(stack: Stack, name: str, *reasons: str, timeout: float = 60.0) -> Obj:
    """Until an Event of each reason exists; returns the counts."""
    return kube.wait_until(
        lambda: counts if all((counts := event_counts(stack, name))[r] for r in reasons) else None,
        timeout=timeout,
        what=f"Events {', '.join(reasons)} about {name}",
        describe=lambda: f"events: {dict(event_counts(stack, name))}\n" + stack.describe(name),
    )


def lease_of(stack: Stack, name: str) -> Obj:
    return stack.fence_lease(name) or {}


def lease_holder(stack: Stack, name: str) -> str | None:
    return (lease_of(stack, name).get("spec") or {}).get("holderIdentity")


def lease_transitions(stack: Stack, name: str) -> int:
    return int((lease_of(stack, name).get("spec") or {}).get("leaseTransitions") or 0)


def patch_spec(stack: Stack, name: str, spec: Obj) -> None:
    """`kubectl patch --type=merge` of the spec, as a person would."""
    assert stack.plane is not None
    stack.plane.kubectl(
        "patch",
        f"--namespace={stack.namespace}",
        f"xenreplication/{name}",
        "--type=merge",
        f"--patch={json.dumps({'spec': spec})}",
    )


def tls_secret(stack: Stack, name: str) -> dict[str, bytes]:
    from kubernetes import client

    secret = client.CoreV1Api(stack.api).read_namespaced_secret(f"{name}-tls", stack.namespace)
    return {k: base64.b64decode(v) for k, v in (secret.data or {}).items()}


# --- what a host shows ------------------------------------------------------------------------


def domains(stack: Stack, host: str) -> dict[str, Obj]:
    sim = stack.hosts[host].sim
    assert sim is not None
    return {d["name"]: d for d in sim.domains()}


def running(stack: Stack, host: str, domain: str) -> bool:
    """The domain exists on the host, unpaused and releasing output."""
    info = domains(stack, host).get(domain)
    return bool(info and not info.get("paused") and info.get("active"))


def replicator_request(stack: Stack, host: str, uid: str, op: str = "status") -> Obj | None:
    """One request on the replicator's control socket; None when nobody answers."""
    path = stack.hosts[host].run_dir / f"{uid}.sock"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(str(path))
            sock.sendall(json.dumps({"op": op}).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    try:
        answer: Obj = json.loads(data)
    except json.JSONDecodeError:
        return None
    return answer


def replicator(stack: Stack, host: str, uid: str) -> Obj | None:
    answer = replicator_request(stack, host, uid)
    if not answer or not answer.get("ok"):
        return None
    return dict(answer["status"])


def replicator_processes(stack: Stack, uid: str) -> dict[str, tuple[int, int | None]]:
    """Per host: (replicator pid, xl pid) of the replication's replicator."""
    out = {}
    for host in stack.hosts:
        if not stack.hosts[host].up:
            continue
        state = replicator(stack, host, uid)
        if state is not None:
            out[host] = (int(state["pid"]), state.get("xlPid"))
    return out


def uid_of(stack: Stack, name: str) -> str:
    obj = stack.replication(name)
    assert obj is not None, name
    return str(obj["metadata"]["uid"])


def ledger_copies(stack: Stack, uuid: str, *, host: str, state: str, after: float) -> list[Obj]:
    """`copy` events of a domain on a host since a wall-clock time."""
    return [
        e
        for e in ledger_mod.of_kind(stack.ledger_path, "copy", uuid=uuid, host=host, state=state)
        if float(e["wall"]) >= after
    ]


def violation(stack: Stack) -> str | None:
    """The ledger's invariant checks as a value: None when they hold, else the violation."""
    try:
        stack.check_invariants()
    except ledger_mod.LedgerViolation as exc:
        return str(exc)
    return None


# --- watching and measuring --------------------------------------------------------------


class PhaseWatch:
    """Records (wall time, phase, active, standby) every `interval` s on a thread."""

    def __init__(self, stack: Stack, name: str, interval: float = 0.2) -> None:
        self.stack, self.name, self.interval = stack, name, interval
        self.seen: list[tuple[float, str | None, str | None, str | None]] = []
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{name}", daemon=True)

    def __enter__(self) -> PhaseWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(Exception):
                st = status(self.stack, self.name)
                row = (time.time(), st.get("phase"), st.get("activeNode"), st.get("standbyNode"))
                if not self.seen or self.seen[-1][1:] != row[1:]:
                    self.seen.append(row)
            self._halt.wait(self.interval)

    def phases(self) -> list[str | None]:
        return [row[1] for row in self.seen]

    def first(self, predicate: Callable[[tuple[Any, ...]], bool]) -> float | None:
        return next((row[0] for row in self.seen if predicate(row)), None)


def measure(what: str, **values: Any) -> None:
    """A measured number for the report: printed (pytest -s shows it) and, when
    XENHA_E2E_MEASUREMENTS names a file, appended to it as one JSON line."""
    line = {"what": what, **values}
    print(f"E2E-MEASURE {json.dumps(line, sort_keys=True)}", flush=True)
    target = os.environ.get(MEASUREMENTS_ENV)
    if target:
        with open(target, "a") as handle:
            handle.write(json.dumps(line, sort_keys=True) + "\n")


class ClientLoop(threading.Thread):
    """A user of the guest's counter service: asks every `interval` s, answers in the ledger."""

    def __init__(self, stack: Stack, guest: str, interval: float = 0.05) -> None:
        super().__init__(name=f"client-{guest}", daemon=True)
        self.client = stack.client(guest, timeout=1.0)
        self.interval = interval
        self.answers: list[tuple[float, int]] = []
        self.requests = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.requests += 1
            value = self.client.next()
            if value is not None:
                self.answers.append((time.time(), value))
            self._halt.wait(self.interval)

    def __enter__(self) -> ClientLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(timeout=15)
        self.client.close()

    def answered_after(self, moment: float) -> bool:
        return any(t > moment for t, _ in self.answers)

    def longest_gap(self) -> float:
        times = [t for t, _ in self.answers]
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


# --- resources a stack costs ----------------------------------------------------------------


def _proc_read(pid: int, name: str) -> str:
    try:
        return Path(f"/proc/{pid}/{name}").read_text(errors="replace")
    except OSError:
        return ""


def stack_pids(stack: Stack) -> list[int]:
    from xenha.lab import procs
    from xenha.sim import faults

    pids = set(procs.tagged(stack.tag))
    for host in stack.hosts.values():
        if host.sim is not None:
            pids.update(faults.tagged_pids(host.sim.tag))
    if stack.plane is not None:
        pids.update(int(p) for p in stack.plane.pids.values())
    return sorted(pids)


def _kind(cmdline: str) -> str:
    for needle, kind in (
        ("kube-apiserver", "kube-apiserver"),
        ("kube-controller-manager", "kube-controller-manager"),
        ("etcd", "etcd"),
        ("xenha_agent.replicator", "replicator"),
        # Before the pipe: `xl remus` names the pipe command in its argv.
        (" remus ", "xl remus"),
        ("migrate-receive", "xl migrate-receive"),
        ("xenha_agent.pipe", "xl transport pipe"),
        ("xenha.sim.host", "sim host"),
        (" operator", "operator"),
        (" agent", "agent"),
    ):
        if needle in cmdline:
            return kind
    return "other"


Sample = dict[int, tuple[str, float, float]]


def sample(stack: Stack) -> Sample:
    """Every process of the stack: pid -> (kind, resident MiB, CPU seconds used so far).
    Short-lived ones (`xl list`, `xl pause`, ... run by agents and replicators) are missed
    unless they happen to run at that instant."""
    ticks = os.sysconf("SC_CLK_TCK")
    out: Sample = {}
    for pid in stack_pids(stack):
        cmdline = _proc_read(pid, "cmdline").replace("\0", " ")
        stat = _proc_read(pid, "stat")
        if not stat or not cmdline:
            continue
        rss_kib = next(
            (
                int(line.split()[1])
                for line in _proc_read(pid, "status").splitlines()
                if line.startswith("VmRSS:")
            ),
            0,
        )
        fields = stat.rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / ticks
        out[pid] = (_kind(cmdline), rss_kib / 1024, cpu)
    return out


def by_kind(now: Sample) -> dict[str, dict[str, float]]:
    """Per process kind: count and resident MiB."""
    out: dict[str, dict[str, float]] = {}
    for kind, rss, _ in now.values():
        row = out.setdefault(kind, {"count": 0, "rssMiB": 0.0})
        row["count"] += 1
        row["rssMiB"] = round(row["rssMiB"] + rss, 1)
    return out


def cores(before: Sample, after: Sample, seconds: float) -> dict[str, float]:
    """CPU cores used per kind between two samples (processes present in both)."""
    out: dict[str, float] = collections.defaultdict(float)
    for pid, (kind, _, cpu) in after.items():
        if pid in before:
            out[kind] += (cpu - before[pid][2]) / seconds
    return {k: round(v, 3) for k, v in sorted(out.items())}


def totals(now: Sample) -> dict[str, float]:
    return {
        "processes": len(now),
        "rssMiB": round(sum(rss for _, rss, _ in now.values())),
        "cpuS": round(sum(cpu for _, _, cpu in now.values()), 1),
    }
