"""Host Leases and fencing Leases against a real kube-apiserver, under the agent's own RBAC."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.fencing import HolderObservation
from xenha_agent.kube import ApiUnavailable, Conflict, Connection, KubeClient, leases_path
from xenha_agent.leases import (
    STANDBY_ANNOTATION,
    Cas,
    HostLeaseRenewer,
    HostLeaseWatcher,
    Outcome,
    acquire_fencing_lease,
    designate_standby,
    lease_standby,
    micro_time,
    reassert_holder,
    resource_version,
    revoke_standby,
    transfer_fencing_lease,
)

from xenha.api.fencing import HOST_LEASE_LABEL

pytestmark = pytest.mark.integration

A, B, C = "xen-a", "xen-b", "xen-c"


class FakeClock:
    """Monotonic time that moves only when told (or by `step` per reading)."""

    def __init__(self, start: float = 1000.0, step: float = 0.0) -> None:
        self.now = start
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def fence_lease(
    namespace: str, name: str, holder: str, standby: str | None = None
) -> dict[str, Any]:
    """The fencing Lease as the operator creates it (and, with `standby`, as the active has
    annotated it once its standby acknowledged a checkpoint)."""
    from datetime import UTC, datetime

    now = micro_time(datetime.now(UTC))
    annotations = {STANDBY_ANNOTATION: standby} if standby else {}
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 2,
            "acquireTime": now,
            "renewTime": now,
            "leaseTransitions": 0,
        },
    }


@pytest.fixture
def agent_client(namespace: str, agent_kubeconfig: Callable[..., Path]) -> Callable[[], KubeClient]:
    """A KubeClient holding only the agent's RBAC."""
    kubeconfig = agent_kubeconfig(namespace)
    return lambda: KubeClient.from_kubeconfig(kubeconfig)


@pytest.fixture
def admin(admin_kubeconfig: Path) -> Callable[[], KubeClient]:
    return lambda: KubeClient.from_kubeconfig(admin_kubeconfig)


def test_renewer_creates_its_host_lease_then_renews_it(namespace, agent_client, run):
    clock = FakeClock()

    async def scenario() -> None:
        kube = agent_client()
        renewer = HostLeaseRenewer(kube, namespace=namespace, node=A, clock=clock)
        renewer.set_durations([2.0, 8.0])
        try:
            assert renewer.last_renewal is None
            assert await renewer.renew_once()
            created = await kube.get(leases_path(namespace, "xenha-node-xen-a"))
            assert created["spec"]["holderIdentity"] == A
            assert created["spec"]["leaseDurationSeconds"] == 2
            assert created["metadata"]["labels"][HOST_LEASE_LABEL] == "true"
            first = renewer.last_renewal
            assert first == 1000.0

            clock.now = 1000.5
            assert await renewer.renew_once()
            renewed = await kube.get(leases_path(namespace, "xenha-node-xen-a"))
            assert renewed["spec"]["renewTime"] > created["spec"]["renewTime"]
            assert renewed["metadata"]["resourceVersion"] != created["metadata"]["resourceVersion"]
            # The send time, not the time the answer came back.
            assert renewer.last_renewal == 1000.5
        finally:
            await kube.close()

    run(scenario())


def test_renewal_period_is_a_quarter_of_the_shortest_lease(namespace, agent_client, run):
    async def scenario() -> None:
        kube = agent_client()
        renewer = HostLeaseRenewer(kube, namespace=namespace, node=A, idle_duration=20.0)
        try:
            assert renewer.period == 5.0
            renewer.set_durations([2.0, 10.0])
            assert renewer.period == 0.5
            task = asyncio.create_task(renewer.run())
            await asyncio.sleep(2.2)
            task.cancel()
            lease = await kube.get(leases_path(namespace, "xenha-node-xen-a"))
            # Created once, then renewed about every 0.5 s.
            assert int(lease["metadata"]["resourceVersion"]) > 0
            assert renewer.last_renewal is not None
        finally:
            await kube.close()

    run(scenario())


def test_renewer_survives_someone_else_rewriting_its_lease(namespace, agent_client, admin, run):
    async def scenario() -> None:
        kube, root = agent_client(), admin()
        renewer = HostLeaseRenewer(kube, namespace=namespace, node=A)
        try:
            assert await renewer.renew_once()
            path = leases_path(namespace, "xenha-node-xen-a")
            lease = await root.get(path)
            lease["spec"]["holderIdentity"] = "someone"
            await root.replace(path, lease)
            # Its cached copy is stale now: the renewal re-reads and still succeeds, at once.
            assert await renewer.renew_once()
            assert (await root.get(path))["spec"]["holderIdentity"] == A
            await root.request("DELETE", path)
            # Deleted: within two attempts it is there again.
            assert await renewer.renew_once() or await renewer.renew_once()
            assert (await root.get(path))["spec"]["holderIdentity"] == A
        finally:
            await kube.close()
            await root.close()

    run(scenario())


def test_no_api_means_no_renewal(run):
    async def scenario() -> None:
        dead = KubeClient(Connection(host="http://127.0.0.1:9", ssl_context=False), timeout=1.0)
        renewer = HostLeaseRenewer(dead, namespace="xenha-system", node=A)
        try:
            assert not await renewer.renew_once()
            assert renewer.last_renewal is None
            assert renewer.first_attempt.is_set()
            assert renewer.last_error
        finally:
            await dead.close()

    run(scenario())


def test_watcher_times_other_nodes_leases_by_its_own_clock(namespace, agent_client, run):
    clock = FakeClock(start=50.0)

    async def scenario() -> None:
        kube = agent_client()
        renewer_a = HostLeaseRenewer(kube, namespace=namespace, node=A)
        assert await renewer_a.renew_once()
        watcher = HostLeaseWatcher(kube, namespace=namespace, clock=clock)
        assert watcher.observation(A) is None  # nothing listed yet
        task = asyncio.create_task(watcher.run())
        try:
            await asyncio.wait_for(watcher.synced.wait(), 10)
            # First sight starts the clock; it is not a change.
            assert watcher.observation(A) == HolderObservation(since=50.0)
            # A node without a host Lease: silent since we first looked.
            assert watcher.observation(B) == HolderObservation(since=50.0)

            clock.now = 51.0
            watcher.changed.clear()
            assert await renewer_a.renew_once()
            await asyncio.wait_for(watcher.changed.wait(), 10)
            assert watcher.observation(A) == HolderObservation(since=50.0, last_change=51.0)

            # B's agent starts: its Lease appearing is a sign of life, like a renewal.
            clock.now = 52.0
            watcher.changed.clear()
            assert await HostLeaseRenewer(kube, namespace=namespace, node=B).renew_once()
            await asyncio.wait_for(watcher.changed.wait(), 10)
            assert watcher.observation(B) == HolderObservation(since=50.0, last_change=52.0)
        finally:
            task.cancel()
            await kube.close()

    run(scenario())


def test_recheck_catches_a_renewal_the_watch_has_not_delivered(namespace, agent_client, run):
    clock = FakeClock(start=10.0)

    async def scenario() -> None:
        kube = agent_client()
        renewer = HostLeaseRenewer(kube, namespace=namespace, node=A)
        watcher = HostLeaseWatcher(kube, namespace=namespace, clock=clock)
        try:
            assert await renewer.renew_once()
            # Not watching: just the direct reads an acquisition makes.
            assert not await watcher.recheck(A)  # first read: seen, not a change
            assert not await watcher.recheck(A)  # unchanged
            clock.now = 12.0
            assert await renewer.renew_once()
            assert await watcher.recheck(A)
            assert watcher.observation(A) == HolderObservation(since=10.0, last_change=12.0)
            assert not await watcher.recheck(C)  # no Lease at all: no sign of life
        finally:
            await kube.close()

    run(scenario())


def test_the_last_look_counts_a_renewal_the_watch_delivered_after_the_decision(
    namespace, agent_client, run
):
    """The standby decided on an old observation; the watch then delivered a renewal. The
    last look reads the same version the watch recorded — no change by that read — and must
    still call the takeover off: the holder renewed less than D ago."""
    clock = FakeClock(start=10.0)

    async def scenario() -> None:
        kube = agent_client()
        renewer = HostLeaseRenewer(kube, namespace=namespace, node=A)
        watcher = HostLeaseWatcher(kube, namespace=namespace, clock=clock)
        try:
            assert await renewer.renew_once()
            await watcher.recheck(A)  # first sight at 10.0
            clock.now = 12.5
            assert await watcher.silent_for(A, 2.0)  # 2.5 s unchanged: silent
            assert await renewer.renew_once()
            await watcher.recheck(A)  # what the watch would record: a change at 12.5
            clock.now = 13.0
            assert not await watcher.silent_for(A, 2.0)
            clock.now = 14.5
            assert await watcher.silent_for(A, 2.0)
            assert not await watcher.silent_for(C, 2.0)  # never seen, never listed
        finally:
            await kube.close()

    run(scenario())


async def _lease(root: KubeClient, namespace: str, name: str) -> dict[str, Any]:
    return await root.get(leases_path(namespace, name))


def test_the_designated_standby_takes_over_and_the_transition_is_recorded(
    namespace, agent_client, admin, run
):
    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A, B))
        try:
            got = await acquire_fencing_lease(kube, namespace, "db1-fence", B, expected_holder=A)
            assert got.outcome is Outcome.DONE
            lease = await _lease(root, namespace, "db1-fence")
            spec = lease["spec"]
            assert spec["holderIdentity"] == B
            assert spec["leaseTransitions"] == 1
            assert spec["acquireTime"] == spec["renewTime"]
            # The new holder has no valid standby yet.
            assert lease_standby(lease) is None
            # Asking again (an agent restarted between acquiring and activating): no write.
            again = await acquire_fencing_lease(kube, namespace, "db1-fence", B, expected_holder=A)
            assert again.won
            assert (await _lease(root, namespace, "db1-fence"))["metadata"]["resourceVersion"] == (
                lease["metadata"]["resourceVersion"]
            )
        finally:
            await kube.close()
            await root.close()

    run(scenario())


@pytest.mark.parametrize(
    ("holder", "designated", "winner"),
    [
        pytest.param(A, None, A, id="revoked: no standby may take over"),
        pytest.param(A, C, A, id="another node is the designated standby"),
        pytest.param(C, B, C, id="held by a node that was not judged"),
    ],
)
def test_a_takeover_needs_the_judged_holder_and_the_designation(
    namespace, agent_client, admin, run, holder, designated, winner
):
    async def scenario() -> None:
        root, kube = admin(), agent_client()
        body = fence_lease(namespace, "db1-fence", holder, designated)
        await root.create(leases_path(namespace), body)
        try:
            got = await acquire_fencing_lease(kube, namespace, "db1-fence", B, expected_holder=A)
            assert got.outcome is Outcome.LOST
            assert got.holder == winner
            lease = await _lease(root, namespace, "db1-fence")
            assert lease["spec"]["holderIdentity"] == winner
            assert lease["spec"]["leaseTransitions"] == 0
        finally:
            await kube.close()
            await root.close()

    run(scenario())


def test_the_last_look_at_the_holder_can_call_a_takeover_off(namespace, agent_client, admin, run):
    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A, B))

        async def alive() -> bool:
            return False

        try:
            got = await acquire_fencing_lease(
                kube, namespace, "db1-fence", B, expected_holder=A, holder_silent=alive
            )
            assert got.outcome is Outcome.HOLDER_ALIVE
            assert (await _lease(root, namespace, "db1-fence"))["spec"]["holderIdentity"] == A
        finally:
            await kube.close()
            await root.close()

    run(scenario())


def test_missing_lease_and_missing_api_never_acquire(namespace, agent_client, run):
    async def scenario() -> None:
        kube = agent_client()
        dead = KubeClient(Connection(host="http://127.0.0.1:9", ssl_context=False), timeout=1.0)
        try:
            missing = await acquire_fencing_lease(kube, namespace, "nope", B, expected_holder=A)
            assert missing.outcome is Outcome.MISSING
            assert not missing.won
            cut_off = await acquire_fencing_lease(dead, namespace, "db1", B, expected_holder=A)
            assert cut_off.outcome is Outcome.UNAVAILABLE
            assert not cut_off.won
            with pytest.raises(ApiUnavailable):
                await dead.get(leases_path(namespace, "db1-fence"))
        finally:
            await kube.close()
            await dead.close()

    run(scenario())


def test_designate_and_revoke_the_standby(namespace, agent_client, admin, run):
    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A))
        try:
            assert (await designate_standby(kube, namespace, "db1-fence", A, B)).won
            assert lease_standby(await _lease(root, namespace, "db1-fence")) == B
            assert (await designate_standby(kube, namespace, "db1-fence", A, B)).won  # no-op
            assert (await revoke_standby(kube, namespace, "db1-fence", A)).won
            lease = await _lease(root, namespace, "db1-fence")
            assert lease_standby(lease) is None
            assert lease["spec"]["holderIdentity"] == A
            assert (await revoke_standby(kube, namespace, "db1-fence", A)).won  # no-op
            # Only the holder writes these.
            not_ours = await designate_standby(kube, namespace, "db1-fence", B, C)
            assert (not_ours.outcome, not_ours.holder) == (Outcome.LOST, A)
        finally:
            await kube.close()
            await root.close()

    run(scenario())


def test_revoke_and_takeover_race_and_exactly_one_wins(namespace, agent_client, admin, run):
    """The heart of the fencing contract: the active, having lost its stream, revokes the
    standby before releasing its held output; the standby, having judged the active dead,
    takes the Lease before activating. Both are CAS writes on the same Lease: whatever the
    interleaving, exactly one of them lands."""

    async def scenario() -> None:
        root = admin()
        kube_a, kube_b = agent_client(), agent_client()
        try:
            for attempt in range(10):
                name = f"db{attempt}-fence"
                await root.create(leases_path(namespace), fence_lease(namespace, name, A, B))

                async def revoke(name: str = name, delay: float = 0.005 * (attempt % 3)) -> Cas:
                    await asyncio.sleep(delay)
                    return await revoke_standby(kube_a, namespace, name, A)

                revoked, took = await asyncio.gather(
                    revoke(), acquire_fencing_lease(kube_b, namespace, name, B, expected_holder=A)
                )
                assert revoked.won != took.won, (attempt, revoked, took)
                lease = await _lease(root, namespace, name)
                assert lease["spec"]["holderIdentity"] == (B if took.won else A)
                assert lease_standby(lease) is None
                if not revoked.won:
                    assert (revoked.outcome, revoked.holder) == (Outcome.LOST, B)
        finally:
            for c in (kube_a, kube_b, root):
                await c.close()

    run(scenario())


def test_switchover_hands_the_lease_to_the_standby(namespace, agent_client, admin, run):
    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A, B))
        try:
            assert (await transfer_fencing_lease(kube, namespace, "db1-fence", A, B)).won
            lease = await _lease(root, namespace, "db1-fence")
            assert lease["spec"]["holderIdentity"] == B
            assert lease["spec"]["leaseTransitions"] == 1
            assert lease_standby(lease) is None
            # The old holder cannot give it away twice, nor to anyone else.
            again = await transfer_fencing_lease(kube, namespace, "db1-fence", A, C)
            assert (again.outcome, again.holder) == (Outcome.LOST, B)
        finally:
            await kube.close()
            await root.close()

    run(scenario())


@pytest.mark.parametrize(
    "standby",
    [pytest.param(None, id="revoked: nobody"), pytest.param(C, id="another node")],
)
def test_switchover_never_hands_the_lease_to_a_copy_that_is_not_the_valid_standby(
    namespace, agent_client, admin, run, standby
):
    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A, standby))
        try:
            refused = await transfer_fencing_lease(kube, namespace, "db1-fence", A, B)
            assert (refused.outcome, refused.holder) == (Outcome.REFUSED, A)
            lease = await _lease(root, namespace, "db1-fence")
            assert lease["spec"]["holderIdentity"] == A
            assert lease_standby(lease) == standby
        finally:
            await kube.close()
            await root.close()

    run(scenario())


def test_the_agent_may_not_read_secrets_nor_create_leases_elsewhere(namespace, agent_client, run):
    from xenha_agent.kube import ApiError, NotFound, secret_path

    async def scenario() -> None:
        kube = agent_client()
        try:
            with pytest.raises(ApiError) as denied:
                await kube.get(secret_path(namespace, "db1-tls"))
            assert denied.value.status == 403
            # Outside the agents' namespace: fencing Leases are read and updated, never
            # created or listed.
            with pytest.raises(ApiError) as denied:
                await kube.create(leases_path("default"), fence_lease("default", "x-fence", B))
            assert denied.value.status == 403
            with pytest.raises(ApiError) as denied:
                await kube.get(leases_path("default"))
            assert denied.value.status == 403
            with pytest.raises(NotFound):
                await kube.get(leases_path("default", "x-fence"))
        finally:
            await kube.close()

    run(scenario())


async def _until(condition: Callable[[], bool], *, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_a_resume_and_a_takeover_in_flight_never_both_land(namespace, agent_client, admin, run):
    """A self-fenced active whose renewals came back resumes only after `reassert_holder`.
    A standby that judged it silent may be between its read and its write: the reassert
    moves the Lease on, so that write fails — and a takeover that landed first fails the
    reassert. Either way exactly one of them holds the guest."""

    async def scenario() -> None:
        root = admin()
        kube_a, kube_b = agent_client(), agent_client()
        try:
            await root.create(leases_path(namespace), fence_lease(namespace, "r1-fence", A, B))
            reasserted: list[Cas] = []

            async def resume_meanwhile() -> bool:
                reasserted.append(await reassert_holder(kube_a, namespace, "r1-fence", A))
                return True  # the standby's look at A's host Lease found nothing new

            took = await acquire_fencing_lease(
                kube_b, namespace, "r1-fence", B, expected_holder=A, holder_silent=resume_meanwhile
            )
            assert reasserted[0].won
            assert (took.outcome, took.holder) == (Outcome.LOST, A)
            lease = await _lease(root, namespace, "r1-fence")
            assert lease["spec"]["holderIdentity"] == A
            assert lease_standby(lease) == B  # the resume keeps the designation

            await root.create(leases_path(namespace), fence_lease(namespace, "r2-fence", A, B))
            assert (
                await acquire_fencing_lease(kube_b, namespace, "r2-fence", B, expected_holder=A)
            ).won
            late = await reassert_holder(kube_a, namespace, "r2-fence", A)
            assert (late.outcome, late.holder) == (Outcome.LOST, B)
        finally:
            for c in (kube_a, kube_b, root):
                await c.close()

    run(scenario())


def test_a_write_that_got_no_answer_is_in_doubt_at_the_version_it_was_based_on(
    namespace, agent_client, admin, run
):
    """The client is cut off between its read and its write: the write may land later, but
    only while the Lease is still at the version read."""

    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A, B))
        real_host = kube.connection.host

        async def cut_off() -> bool:
            kube.connection.host = "https://127.0.0.1:1"
            return True

        try:
            read = await _lease(root, namespace, "db1-fence")
            got = await acquire_fencing_lease(
                kube, namespace, "db1-fence", B, expected_holder=A, holder_silent=cut_off
            )
            assert got.outcome is Outcome.UNAVAILABLE
            assert got.in_doubt_at == resource_version(read)
            missing_api = await revoke_standby(kube, namespace, "db1-fence", A)
            assert missing_api.outcome is Outcome.UNAVAILABLE
            assert missing_api.in_doubt_at is None  # nothing was read, nothing written
        finally:
            kube.connection.host = real_host
            await kube.close()
            await root.close()

    run(scenario())


@pytest.mark.parametrize("touch", [True, False], ids=["touched", "not touched"])
def test_a_touching_revoke_stops_a_designation_still_in_flight(
    namespace, agent_client, admin, run, touch
):
    """A designation that got no answer may still land; the active that lost its stream
    cannot know. A revoke that writes even when it finds no annotation moves the Lease on,
    and the designation (conditional on the earlier version) can never land after it."""

    async def scenario() -> None:
        root, kube = admin(), agent_client()
        await root.create(leases_path(namespace), fence_lease(namespace, "db1-fence", A))
        path = leases_path(namespace, "db1-fence")
        try:
            in_flight = await _lease(root, namespace, "db1-fence")
            in_flight["metadata"].setdefault("annotations", {})[STANDBY_ANNOTATION] = B
            assert (await revoke_standby(kube, namespace, "db1-fence", A, touch=touch)).won
            if touch:
                with pytest.raises(Conflict):
                    await root.replace(path, in_flight)
                assert lease_standby(await _lease(root, namespace, "db1-fence")) is None
            else:
                await root.replace(path, in_flight)  # it lands: nothing had moved the Lease
                assert lease_standby(await _lease(root, namespace, "db1-fence")) == B
        finally:
            await kube.close()
            await root.close()

    run(scenario())
