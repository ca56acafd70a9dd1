"""End to end at scale (issue 6): 50 XenReplications across 4 simulated hosts reach Protected
and stay there.

Each replication costs two replicator processes, an `xl remus` with its transport pipe and an
`xl migrate-receive` (and the simulator's work behind them): some 300 processes on the
project's 2-core machine, which they saturate. The replications are what a careful operator
would configure for hosts that busy: a checkpoint every 2 s (quiet 16 MiB guests), and a lease
of 20 s (the active side pauses its guest when its renewals are older than 3/4 of the lease, and
a saturated API server answers late), and agents that wait 2 s of heartbeat silence before they
call a stream lost (the default 0.6 s trips on relay threads stalled by the load: each false
loss is a full re-seed, which loads the machine further).

What must hold is the outcome — all Protected, then a steady window in which none leaves
Protected and no fencing Lease moves, and a clean ledger — never how fast. Timings and what
the stack's processes cost (by kind) are reported as E2E-MEASURE lines (`pytest -s`, or the
file named by XENHA_E2E_MEASUREMENTS). `XENHA_E2E_SCALE` sets N (default 50),
`XENHA_E2E_SCALE_MODE` the mode (`remus`, the default, or `colo`).
"""

from __future__ import annotations

import collections
import os
import time
from typing import Any

import pytest

from xenha.lab import kube
from xenha.lab.hosts import host_names
from xenha.lab.stack import Stack, StackOptions

from .e2e_support import by_kind, cores, measure, replication, sample, totals

SCALE = int(os.environ.get("XENHA_E2E_SCALE", "50"))
MODE = os.environ.get("XENHA_E2E_SCALE_MODE", "remus")
HOSTS = 4
LEASE_SECONDS = 20
INTERVAL_MS = 2000
# Generous: what the stack needs on a loaded machine is a report, not an assertion.
PROTECT_WAIT = 240.0 + 10.0 * SCALE
STEADY_SECONDS = 30.0

pytestmark = [
    pytest.mark.integration,
    # Above the project's 600 s default: the stack, the wait for Protected, the steady window.
    pytest.mark.timeout(int(PROTECT_WAIT + 600)),
]


def layout(n: int) -> list[tuple[str, str, str]]:
    """(guest, primary, secondary): guests spread round-robin, each protected on the next
    host, so that every host is primary for some and standby for others."""
    hosts = host_names(HOSTS)
    return [(f"g{i:02d}", hosts[i % HOSTS], hosts[(i + 1) % HOSTS]) for i in range(n)]


def phases(stack: Stack) -> dict[str, str | None]:
    return {
        obj["metadata"]["name"]: (obj.get("status") or {}).get("phase")
        for obj in kube.list_replications(stack.api)
        if obj["metadata"]["namespace"] == stack.namespace
    }


def lease_transitions(stack: Stack, names: list[str]) -> dict[str, int]:
    return {
        name: int(((stack.fence_lease(name) or {}).get("spec") or {}).get("leaseTransitions") or 0)
        for name in names
    }


def test_fifty_replications_across_four_hosts_reach_protected_and_stay(
    stack_factory: Any,
) -> None:
    plan = layout(SCALE)
    names = [guest for guest, _, _ in plan]
    guests: dict[str, list[str]] = collections.defaultdict(list)
    for guest, primary, _ in plan:
        guests[primary].append(guest)
    started = time.time()
    stack: Stack = stack_factory(
        StackOptions(
            hosts=HOSTS,
            guests=dict(guests),
            guest_memory_mib=16,
            guest_dirty_rate=5.0,
            timeout=300.0,
            agent_env={"XENHA_HEARTBEAT_TIMEOUT": "2.0"},
        )
    )
    up = time.time()
    idle = sample(stack)

    manifests = [
        stack.replication_manifest(
            replication(
                guest,
                mode=MODE,
                primary=primary,
                secondary=secondary,
                interval_ms=INTERVAL_MS,
                lease_seconds=LEASE_SECONDS,
            )
        )
        for guest, primary, secondary in plan
    ]
    assert stack.plane is not None
    applied = time.time()
    stack.plane.kubectl("apply", "--filename=-", input=kube.list_document(manifests))

    # 1. All reach Protected.
    reached: dict[str, float] = {}
    timeline: list[tuple[float, dict[str, int]]] = []
    current: dict[str, str | None] = {}
    deadline = time.monotonic() + PROTECT_WAIT
    while time.monotonic() < deadline:
        current = phases(stack)
        now = time.time()
        for name, phase in current.items():
            if phase == "Protected":
                reached.setdefault(name, now)
        timeline.append(
            (round(now - applied, 1), dict(collections.Counter(map(str, current.values()))))
        )
        if len(current) == SCALE and all(p == "Protected" for p in current.values()):
            break
        time.sleep(2)
    all_protected = time.time()
    protected_now = len(current) == SCALE and all(p == "Protected" for p in current.values())

    # 2. They stay: no replication leaves Protected, no fencing Lease moves.
    loaded = sample(stack)
    loaded_at = time.monotonic()
    transitions = lease_transitions(stack, names)
    left: collections.Counter[str] = collections.Counter()
    if protected_now:
        steady_end = time.monotonic() + STEADY_SECONDS
        while time.monotonic() < steady_end:
            for name, phase in phases(stack).items():
                if phase != "Protected":
                    left[f"{name}:{phase}"] += 1
            time.sleep(2)
    steady = sample(stack)
    steady_seconds = time.monotonic() - loaded_at
    moved = {
        name: (transitions[name], now)
        for name, now in lease_transitions(stack, names).items()
        if now != transitions[name]
    }

    cpu_rate = cores(loaded, steady, steady_seconds)
    measure(
        f"scale: {SCALE} replications ({MODE}, intervalMs {INTERVAL_MS}, "
        f"leaseDurationSeconds {LEASE_SECONDS}) on {HOSTS} hosts",
        stackStartS=round(up - started, 1),
        allProtectedAfterS=round(all_protected - applied, 1) if protected_now else None,
        protected=len(reached),
        firstProtectedAfterS=round(min(reached.values()) - applied, 1) if reached else None,
        medianProtectedAfterS=(
            round(sorted(reached.values())[len(reached) // 2] - applied, 1) if reached else None
        ),
        idle=totals(idle),
        loaded=totals(loaded),
        steadySeconds=round(steady_seconds, 1),
        steadyCoresUsed=round(sum(cpu_rate.values()), 2),
        steadyCoresByKind=cpu_rate,
        byKind=by_kind(steady),
        leftProtectedInSteadyWindow=dict(left),
        progress=timeline[:: max(1, len(timeline) // 15)],
    )

    stack.check_invariants()  # safety first: whatever else happened, never two active copies
    assert protected_now, (
        f"{len(reached)}/{SCALE} reached Protected; at the end of the wait: "
        f"{ {n: p for n, p in current.items() if p != 'Protected'} }"
    )
    assert not left, f"left Protected during {STEADY_SECONDS:.0f}s of steady state: {dict(left)}"
    assert not moved, f"fencing Leases moved (transitions before, after): {moved}"
