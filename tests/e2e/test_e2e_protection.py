"""End to end, one two-host stack for the module: what protection promises when something
other than a dead host happens — a COLO replication beside a Remus one, the host-to-host path
cut, protection suspended and resumed, a planned switchover, the active agent cut off from the
Kubernetes API, and the active host cut off from both the API and its peer (alive, isolated).

Replications (each test makes sure of what it stands on, so that one test can run alone; the
active node is wherever the previous test left it):

- `demo1`: Remus, xen-a -> xen-b, the one the faults are aimed at;
- `web2`: COLO between the same hosts (its own guest on xen-a), which must not notice.

A client calls demo1 throughout the faults; the ledger judges afterwards that no two copies
ever released output and that no answer was lost, repeated or taken back. How long things
took is reported (E2E-MEASURE lines), never asserted. Power cuts, agent restarts, deletion and
the operator's own bookkeeping are specified elsewhere (tests/lab, tests/operator, tests/agent,
tests/gitops). Issues 5 (agent) and 6 (operator).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from xenha.lab import kube
from xenha.lab.stack import Stack

from .e2e_support import (
    LONG,
    SETTLE,
    ClientLoop,
    PhaseWatch,
    condition,
    domains,
    event_counts,
    lease_holder,
    lease_of,
    lease_transitions,
    ledger_copies,
    measure,
    patch_spec,
    replication,
    replicator,
    replicator_processes,
    running,
    status,
    tls_secret,
    uid_of,
    until,
    violation,
    wait_events,
)

# Waits are generous (a loaded 2-core machine); let them, not pytest-timeout, tell a failure.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(1200)]

# Longer than the 2 s default: a lease is what pauses a guest whose agent's renewals stall,
# and on this small shared machine they stall for seconds now and then.
LEASE_SECONDS = 5
SPECS = {
    "demo1": replication("demo1", mode="remus", lease_seconds=LEASE_SECONDS),
    "web2": replication("web2", mode="colo", lease_seconds=LEASE_SECONDS),
}
STANDBY_ANNOTATION = "xenha.io/standby"


def ensure(stack: Stack, name: str) -> dict[str, Any]:
    """The replication exists and is Protected (created if missing); returns it."""
    if name == "web2" and "web2" not in stack.guests:
        add_guest(stack, "xen-a", "web2")
    if stack.replication(name) is None:
        stack.apply_replication(SPECS[name])
    return stack.wait_for(name, phase="Protected", timeout=SETTLE)


def add_guest(stack: Stack, host: str, name: str) -> None:
    """A user protects a guest that runs: it runs, and the host's agent reports it."""
    stack.create_guest(host, name)
    until(
        lambda: any(
            d.get("name") == name
            for d in (kube.xennodes(stack.api)[host].get("status") or {}).get("domains", [])
        ),
        f"{host}'s agent to report the new guest {name}",
    )


def roles(stack: Stack, name: str) -> tuple[str, str]:
    st = status(stack, name)
    return str(st["activeNode"]), str(st["standbyNode"])


def standby_is(node: str) -> Any:
    return lambda o: (o.get("status") or {}).get("standbyNode") == node


def incoming(stack: Stack, host: str, domain: str) -> bool:
    return f"{domain}--incoming" in domains(stack, host)


def paused_on(stack: Stack, host: str, domain: str) -> bool:
    return bool((domains(stack, host).get(domain) or {}).get("paused"))


def reported_since(stack: Stack, host: str, moment: float) -> bool:
    """The host's agent has written its XenNode status since `moment` (wall clock)."""
    stamp = ((kube.xennodes(stack.api).get(host) or {}).get("status") or {}).get("heartbeatTime")
    return bool(stamp) and datetime.fromisoformat(str(stamp)).timestamp() > moment


def designated(stack: Stack, name: str) -> str | None:
    annotations = (lease_of(stack, name).get("metadata") or {}).get("annotations") or {}
    return annotations.get(STANDBY_ANNOTATION) or None


@contextlib.contextmanager
def client_of(stack: Stack, guest: str) -> Iterator[ClientLoop]:
    """A client calling the guest; it has had answers before the block starts."""
    with ClientLoop(stack, guest) as loop:
        until(lambda: len(loop.answers) >= 10, f"the first answers from {guest}")
        yield loop


# --- COLO beside Remus ------------------------------------------------------------------------


def test_colo_is_protected_beside_remus_between_the_same_hosts(module_stack: Stack) -> None:
    stack = module_stack
    ensure(stack, "demo1")
    demo1_uid = uid_of(stack, "demo1")
    demo1_procs = replicator_processes(stack, demo1_uid)
    demo1_events = event_counts(stack, "demo1")
    if "web2" not in stack.guests:
        add_guest(stack, "xen-a", "web2")

    with PhaseWatch(stack, "web2") as watch:
        started = time.time()
        stack.apply_replication(SPECS["web2"])
        obj = stack.wait_for("web2", phase="Protected", active="xen-a", timeout=SETTLE)
    measure(
        "create->Protected (COLO beside Remus, 16 MiB guest)",
        seconds=round(time.time() - started, 2),
        phases=watch.phases(),
    )

    # A fresh replication seeds and is protected; it is never called unprotected on the way.
    assert set(watch.phases()) <= {None, "Pending", "Seeding", "Protected"}, watch.seen
    st = obj["status"]
    assert (st["activeNode"], st["standbyNode"]) == ("xen-a", "xen-b"), st
    assert st.get("checkpointsTotal", 0) > 0, st
    counts = wait_events(stack, "web2", "Protected")
    assert counts["Protected"] == 1, counts
    # The guest runs on xen-a, xen-b holds the standby's copy, and the Lease names it.
    until(lambda: designated(stack, "web2") == "xen-b", "web2's Lease to designate xen-b")
    assert running(stack, "xen-a", "web2")
    assert incoming(stack, "xen-b", "web2")
    with stack.client("web2") as client:
        assert client.next() is not None

    # Isolated: its own replicators on both hosts, its own CA.
    web2_procs = replicator_processes(stack, uid_of(stack, "web2"))
    assert set(web2_procs) == {"xen-a", "xen-b"}, web2_procs
    assert not {pid for pid, _ in web2_procs.values()} & {pid for pid, _ in demo1_procs.values()}
    tls1, tls2 = tls_secret(stack, "demo1"), tls_secret(stack, "web2")
    assert tls1["ca.crt"] != tls2["ca.crt"]
    # The Remus replication did not notice: same processes, still Protected, no new Events.
    assert replicator_processes(stack, demo1_uid) == demo1_procs
    assert status(stack, "demo1")["phase"] == "Protected"
    assert event_counts(stack, "demo1") == demo1_events
    stack.check_invariants()


# --- the host-to-host path --------------------------------------------------------------------


def test_cutting_the_host_to_host_path_degrades_without_failover_then_reprotects(
    module_stack: Stack,
) -> None:
    stack = module_stack
    names = ("demo1", "web2")
    for name in names:
        ensure(stack, name)
    roles0 = {name: roles(stack, name) for name in names}
    transitions0 = {name: lease_transitions(stack, name) for name in names}
    counts0 = {name: event_counts(stack, name) for name in names}
    active, standby = roles0["demo1"]
    uuid = stack.guests["demo1"].uuid

    seen: dict[str, Any] = {}
    with PhaseWatch(stack, "demo1") as watch, client_of(stack, "demo1") as loop:
        try:
            cut = time.time()
            stack.cut_path()
            try:
                until(
                    lambda: (
                        not incoming(stack, standby, "demo1")
                        and not incoming(stack, roles0["web2"][1], "web2")
                    ),
                    "the standbys to drop their copies",
                )
                dropped = time.time()
                seen["standbyDroppedAfterS"] = round(dropped - cut, 2)
                # The primary keeps running and serving, unprotected; the Lease says so ...
                until(lambda: loop.answered_after(dropped), "demo1 to answer, unprotected")
                assert running(stack, active, "demo1")
                assert lease_holder(stack, "demo1") == active
                assert designated(stack, "demo1") is None, (
                    "the standby's copy is gone but the Lease still designates it: "
                    f"{lease_of(stack, 'demo1')}"
                )
                # ... and so does the status, while the path is down.
                for name in names:
                    stack.wait_for(name, phase="Degraded", active=roles0[name][0], timeout=120)
                seen["degradedAfterS"] = round(time.time() - cut, 2)
                seen["protectedReasonWhileCut"] = condition(stack, "demo1", "Protected").get(
                    "reason"
                )
            finally:
                restored = time.time()
                stack.restore_path()
            for name in names:
                primary, secondary = roles0[name]
                stack.wait_for(
                    name,
                    phase="Protected",
                    active=primary,
                    predicate=standby_is(secondary),
                    timeout=LONG,
                )
            reprotected = time.time()
            seen["reprotectedAfterRestoreS"] = round(reprotected - restored, 2)
            until(lambda: loop.answered_after(reprotected), "demo1 to answer once reprotected")
        finally:
            measure(
                "host-to-host path cut (Remus and COLO)",
                clientLongestGapS=round(loop.longest_gap(), 2),
                phases=watch.phases(),
                **seen,
            )

    assert standby not in {row[2] for row in watch.seen}, f"the guest moved: {watch.seen}"
    assert not ledger_copies(stack, uuid, host=standby, state="active", after=cut - 1)
    for name in names:
        assert lease_transitions(stack, name) == transitions0[name], name
        counts, was = event_counts(stack, name), counts0[name]
        assert counts["Degraded"] > was["Degraded"], (name, counts)
        assert counts["FailedOver"] == was["FailedOver"], (name, counts)
        assert counts["FailingOver"] == was["FailingOver"], (name, counts)
        assert counts["Reprotected"] + counts["Protected"] > (
            was["Reprotected"] + was["Protected"]
        ), (name, counts)
    stack.check_invariants()


# --- suspend and resume -----------------------------------------------------------------------


def test_suspend_stops_protection_and_keeps_the_guest_then_resume_protects_again(
    module_stack: Stack,
) -> None:
    stack = module_stack
    ensure(stack, "demo1")
    ensure(stack, "web2")
    active, standby = roles(stack, "demo1")
    uid = uid_of(stack, "demo1")
    uuid = stack.guests["demo1"].uuid
    neighbour = replicator_processes(stack, uid_of(stack, "web2"))
    counts0 = event_counts(stack, "demo1")

    seen: dict[str, Any] = {}
    with client_of(stack, "demo1") as loop:
        try:
            suspended = time.time()
            patch_spec(stack, "demo1", {"suspended": True})
            st = stack.wait_for(
                "demo1",
                phase="Suspended",
                predicate=lambda o: not (o.get("status") or {}).get("standbyNode"),
                timeout=SETTLE,
            )["status"]
            assert st["activeNode"] == active, st
            cond = condition(stack, "demo1", "Protected")
            assert (cond.get("status"), cond.get("reason")) == ("False", "Suspended"), cond
            until(
                lambda: not incoming(stack, standby, "demo1"),
                f"{standby} to destroy its copy of demo1",
            )
            gone = time.time()
            seen["standbyCopyGoneAfterS"] = round(gone - suspended, 2)
            until(
                lambda: replicator(stack, standby, uid) is None,
                "the standby's replicator of demo1 to end",
            )
            assert running(stack, active, "demo1"), "the guest keeps running while suspended"
            until(lambda: loop.answered_after(gone + 1), "demo1 to answer while suspended")
            wait_events(stack, "demo1", "Suspended")
            # The spec is the user's: nobody but the user touched it.
            assert (stack.replication("demo1") or {})["spec"]["suspended"] is True

            resumed = time.time()
            patch_spec(stack, "demo1", {"suspended": False})
            stack.wait_for(
                "demo1",
                phase="Protected",
                active=active,
                predicate=standby_is(standby),
                timeout=SETTLE,
            )
            protected = time.time()
            seen["reprotectedAfterResumeS"] = round(protected - resumed, 2)
            until(lambda: loop.answered_after(protected), "demo1 to answer after resume")
        finally:
            measure(
                "suspend/resume (Remus)",
                clientLongestGapS=round(loop.longest_gap(), 2),
                **seen,
            )

    counts = wait_events(stack, "demo1", "Suspended", "Resumed")
    assert counts["Seeding"] > counts0["Seeding"], counts
    assert counts["Protected"] + counts["Reprotected"] > (
        counts0["Protected"] + counts0["Reprotected"]
    ), counts
    assert counts["FailedOver"] == counts0["FailedOver"], counts
    assert not ledger_copies(stack, uuid, host=standby, state="active", after=suspended - 1)
    # The other replication between the same hosts did not notice.
    assert status(stack, "web2")["phase"] == "Protected"
    assert replicator_processes(stack, uid_of(stack, "web2")) == neighbour
    stack.check_invariants()


# --- planned switchover -----------------------------------------------------------------------


def test_a_switchover_by_annotation_hands_over_once_without_losing_an_answer(
    module_stack: Stack,
) -> None:
    stack = module_stack
    ensure(stack, "demo1")
    old, new = roles(stack, "demo1")
    uuid = stack.guests["demo1"].uuid
    transitions = lease_transitions(stack, "demo1")
    counts0 = event_counts(stack, "demo1")

    seen: dict[str, Any] = {}
    with PhaseWatch(stack, "demo1") as watch, client_of(stack, "demo1") as loop:
        requested = time.time()
        try:
            stack.request_switchover("demo1", None, new)
            final = stack.wait_for(
                "demo1", phase="Protected", active=new, predicate=standby_is(old), timeout=LONG
            )
            reprotected = time.time()
            seen["reprotectedAfterS"] = round(reprotected - requested, 2)
            until(lambda: loop.answered_after(reprotected), f"demo1 to answer from {new}")
        finally:
            activated = ledger_copies(stack, uuid, host=new, state="active", after=requested)
            record = status(stack, "demo1").get("lastFailover") or {}
            measure(
                "switchover (Remus)",
                events=dict(event_counts(stack, "demo1") - counts0),
                guestActiveOnNewAfterS=(
                    round(float(activated[0]["wall"]) - requested, 2) if activated else None
                ),
                agentDurationMs=record.get("durationMs"),
                agentReason=record.get("reason"),
                clientLongestGapS=round(loop.longest_gap(), 2),
                phases=watch.phases(),
                **seen,
            )

    st = final["status"]
    assert activated, f"the ledger shows no copy becoming active on {new}"
    assert st.get("switchover", {}).get("target") == new, st.get("switchover")
    assert st.get("switchover", {}).get("state") == "Succeeded", st.get("switchover")
    # A planned handover, not a failover that happened to go the same way.
    assert (record.get("from"), record.get("to"), record.get("reason")) == (
        old,
        new,
        "Switchover",
    ), record
    assert lease_holder(stack, "demo1") == new
    assert lease_transitions(stack, "demo1") == transitions + 1
    counts = wait_events(stack, "demo1", "SwitchedOver", "Reprotected")
    assert counts["SwitchedOver"] == counts0["SwitchedOver"] + 1, counts
    assert counts["FailedOver"] == counts0["FailedOver"], counts
    # The annotation is the user's: still there, and handled once.
    annotations = (stack.replication("demo1") or {})["metadata"].get("annotations") or {}
    assert annotations.get(kube.SWITCHOVER_ANNOTATION) == new
    assert running(stack, new, "demo1")
    assert not running(stack, old, "demo1")
    stack.check_invariants()  # no answer lost, repeated or taken back


# --- the active agent loses the API -----------------------------------------------------------


def test_an_active_node_cut_off_from_the_api_pauses_or_hands_over_never_two_copies(
    module_stack: Stack,
) -> None:
    """The active's agent cannot reach the API (its replicators, the host-to-host path, the
    other agent and the operator can): it must not outlive its lease — pause the guest, or
    hand over through the stream (shared/design/architecture.md, "Failover and fencing")."""
    stack = module_stack
    ensure(stack, "demo1")
    ensure(stack, "web2")
    active, standby = roles(stack, "demo1")
    uuid = stack.guests["demo1"].uuid
    counts0 = event_counts(stack, "demo1")

    seen: dict[str, Any] = {}
    outcome = None
    with PhaseWatch(stack, "demo1") as watch, client_of(stack, "demo1") as loop:
        cut = time.time()
        stack.cut_api(active)
        try:
            # Far beyond any bound the lease sets (D = 5 s): the question is whether, not when.
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if lease_holder(stack, "demo1") == standby and running(stack, standby, "demo1"):
                    outcome = f"handed over to {standby}"
                    break
                if paused_on(stack, active, "demo1"):
                    outcome = f"paused on {active}"
                    break
                time.sleep(0.2)
            seen["decidedAfterS"] = round(time.time() - cut, 2)
            if outcome is not None and outcome.startswith("paused"):
                # The status stops calling the guest running once the operator has seen no
                # renewal of the active's host Lease for D, though its last report said so.
                until(
                    lambda: condition(stack, "demo1", "Ready").get("reason") == "NodeUnresponsive",
                    "the status to stop calling demo1 Ready while it is paused",
                )
                seen["readyWhilePaused"] = condition(stack, "demo1", "Ready").get("message")
                seen["readyUnknownAfterS"] = round(time.time() - cut, 2)
            seen["whileCut"] = {
                active: domains(stack, active).get("demo1"),
                "leaseHolder": lease_holder(stack, "demo1"),
                "phase": status(stack, "demo1").get("phase"),
            }
            # Safety holds whatever happened, while the API is still cut ...
            seen["violationWhileCut"] = violation(stack)
            seen["copiesActiveSinceCut"] = {
                h: len(ledger_copies(stack, uuid, host=h, state="active", after=cut - 1))
                for h in (active, standby)
            }
        finally:
            stack.restore_api(active)
        restored = time.time()
        try:
            # The status said what the operator knew while the agent could not report.
            until(lambda: reported_since(stack, active, restored), f"{active}'s agent to report")
            for name in ("demo1", "web2"):
                stack.wait_for(name, phase="Protected", timeout=LONG)
            protected = time.time()
            seen["reprotectedAfterRestoreS"] = round(protected - restored, 2)
            until(lambda: loop.answered_after(protected), "demo1 to answer once protected")
        finally:
            measure(
                f"active node cut from the API (Remus, leaseDurationSeconds {LEASE_SECONDS})",
                outcome=outcome,
                phases=watch.phases(),
                clientLongestGapS=round(loop.longest_gap(), 2),
                **seen,
            )

    assert seen["violationWhileCut"] is None, (
        f"two active copies while {active} was cut off the API ({outcome}): "
        f"{seen['violationWhileCut']}"
    )
    assert outcome is not None, (
        f"{active}'s agent lost the API {seen['decidedAfterS']:.0f}s before and the guest "
        f"neither moved to {standby} nor was paused: {seen['whileCut']}"
    )
    counts = event_counts(stack, "demo1")
    moves = counts["SwitchedOver"] + counts["FailedOver"]
    moves0 = counts0["SwitchedOver"] + counts0["FailedOver"]
    assert moves - moves0 == (1 if outcome.startswith("handed over") else 0), counts
    # ... and after it came back: one copy runs, and answers.
    now_active = status(stack, "demo1")["activeNode"]
    assert running(stack, now_active, "demo1")
    assert not running(stack, standby if now_active == active else active, "demo1")
    stack.check_invariants()


# --- the active node isolated: no API, no peer --------------------------------------------


def test_an_active_node_cut_off_from_the_api_and_its_peer_is_fenced_and_the_standby_takes_over(
    module_stack: Stack,
) -> None:
    """Split brain as it happens: the active host is alive but reaches neither the API nor its
    peer. The standby may take over only after the active has paused its copy; afterwards the
    replication is protected the other way."""
    stack = module_stack
    ensure(stack, "demo1")
    ensure(stack, "web2")
    active, standby = roles(stack, "demo1")
    uuid = stack.guests["demo1"].uuid
    transitions = lease_transitions(stack, "demo1")
    counts0 = event_counts(stack, "demo1")

    seen: dict[str, Any] = {}
    old: dict[str, Any] | None = None
    with PhaseWatch(stack, "demo1") as watch, client_of(stack, "demo1") as loop:
        cut = time.time()
        stack.cut_api(active)
        stack.cut_path()
        try:
            until(lambda: lease_holder(stack, "demo1") == standby, f"{standby} to take the Lease")
            until(lambda: running(stack, standby, "demo1"), f"demo1 to run on {standby}")
            took_over = time.time()
            until(lambda: loop.answered_after(took_over), f"demo1 to answer from {standby}")
            # The old active, alive but isolated, does not run its copy.
            old = domains(stack, active).get("demo1")
            seen["violationWhileIsolated"] = violation(stack)
        finally:
            stack.restore_api(active)
            stack.restore_path()
        healed = time.time()
        try:
            final = stack.wait_for(
                "demo1",
                phase="Protected",
                active=standby,
                predicate=standby_is(active),
                timeout=LONG,
            )
            stack.wait_for("web2", phase="Protected", timeout=LONG)
            seen["reprotectedAfterHealS"] = round(time.time() - healed, 2)
        finally:
            activated = ledger_copies(stack, uuid, host=standby, state="active", after=cut - 1)
            measure(
                f"active node cut from the API and its peer (Remus, leaseDurationSeconds "
                f"{LEASE_SECONDS})",
                guestActiveOnStandbyAfterS=(
                    round(float(activated[0]["wall"]) - cut, 2) if activated else None
                ),
                oldCopy=old,
                clientLongestGapS=round(loop.longest_gap(), 2),
                phases=watch.phases(),
                **seen,
            )

    assert seen["violationWhileIsolated"] is None, seen["violationWhileIsolated"]
    assert old is None or old.get("paused") or not old.get("active"), (
        f"{active} still ran its copy while {standby} did: {old}"
    )
    record = final["status"].get("lastFailover") or {}
    assert (record.get("from"), record.get("to")) == (active, standby), record
    assert record.get("reason") != "Switchover", record
    assert lease_transitions(stack, "demo1") == transitions + 1
    counts = wait_events(stack, "demo1", "FailedOver", "Reprotected")
    assert counts["FailedOver"] == counts0["FailedOver"] + 1, counts
    assert counts["SwitchedOver"] == counts0["SwitchedOver"], counts
    assert running(stack, standby, "demo1")
    assert not running(stack, active, "demo1")
    stack.check_invariants()
