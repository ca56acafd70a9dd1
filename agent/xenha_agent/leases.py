"""Lease I/O: this node's host Lease, the other nodes' host Leases, and fencing Leases.

- `HostLeaseRenewer` keeps `xenha-node-<node>` renewed and remembers the *send* time (monotonic)
  of the last renewal the API server accepted; the active side fences itself on that clock.
- `HostLeaseWatcher` remembers, per node, when this agent last saw that node's host Lease
  change (client-go style: by our own clock, never by comparing renewTime with our wall clock).
- `acquire_fencing_lease` moves a fencing Lease to this node with a resourceVersion
  precondition, so of two racing writers exactly one wins; `revoke_standby`,
  `designate_standby`, `reassert_holder` (before a self-fenced active resumes) and
  `transfer_fencing_lease` are the holder's writes, under the same precondition.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from xenha.api.fencing import (
    HOST_LEASE,
    HOST_LEASE_LABEL,
    LEASE_KIND_LABEL,
    host_lease_name,
    host_lease_node,
)
from xenha_agent.fencing import HolderObservation, renew_period
from xenha_agent.kube import (
    ApiError,
    Conflict,
    KubeClient,
    NotFound,
    Obj,
    Reflector,
    leases_path,
)

log = logging.getLogger(__name__)

Clock = Callable[[], float]
WallClock = Callable[[], datetime]

NODE_LABEL = "xenha.io/node"


def micro_time(moment: datetime) -> str:
    """coordination.k8s.io MicroTime: RFC 3339, microseconds, UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def host_lease(node: str, *, namespace: str, duration: float, now: datetime) -> Obj:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": host_lease_name(node),
            "namespace": namespace,
            "labels": {HOST_LEASE_LABEL: "true", LEASE_KIND_LABEL: HOST_LEASE, NODE_LABEL: node},
        },
        "spec": {
            "holderIdentity": node,
            "leaseDurationSeconds": max(1, math.ceil(duration)),
            "acquireTime": micro_time(now),
            "renewTime": micro_time(now),
        },
    }


class HostLeaseRenewer:
    """Renews this node's host Lease every min(D)/4 (clamped 0.25..5 s)."""

    def __init__(
        self,
        kube: KubeClient,
        *,
        namespace: str,
        node: str,
        idle_duration: float = 20.0,
        clock: Clock = time.monotonic,
        wallclock: WallClock = _utcnow,
        on_renewed: Callable[[bool], None] | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.node = node
        self.idle_duration = idle_duration
        self.clock = clock
        self.wallclock = wallclock
        self.on_renewed = on_renewed or (lambda ok: None)
        self._durations: tuple[float, ...] = ()
        self._lease: Obj | None = None
        self._wake = asyncio.Event()
        # Monotonic send time of the last renewal the API server accepted.
        self.last_renewal: float | None = None
        self.last_error: str | None = None
        # Failed attempts since the last success.
        self.failures = 0
        # Set once the first attempt finished, successful or not: the active side decides
        # nothing before, so a restarted agent does not fence on a missing first renewal.
        self.first_attempt = asyncio.Event()

    @property
    def period(self) -> float:
        return renew_period(self._durations, self.idle_duration)

    @property
    def lease_duration(self) -> float:
        return min(self._durations, default=self.idle_duration)

    def set_durations(self, durations: Iterable[float]) -> None:
        """The lease durations of the replications this node takes part in."""
        new = tuple(sorted(durations))
        if new != self._durations:
            shorter = self.period > renew_period(new, self.idle_duration)
            self._durations = new
            if shorter:
                self._wake.set()

    async def renew_once(self) -> bool:
        sent = self.clock()
        # A renewal that takes longer than the period is worthless; do not let it pile up.
        request_timeout = max(1.0, 2 * self.period)
        try:
            await self._renew(request_timeout)
        except ApiError as e:
            # Logged when the failure starts or changes, not on every attempt of an outage.
            if str(e) != self.last_error:
                log.warning("host lease renewal failed: %s", e)
            self.last_error = str(e)
            self.failures += 1
            self.first_attempt.set()
            self.on_renewed(False)
            return False
        if self.failures:
            log.info("host lease renewed again after %d failed attempts", self.failures)
        self.last_renewal = sent
        self.last_error = None
        self.failures = 0
        self.first_attempt.set()
        self.on_renewed(True)
        return True

    async def _renew(self, request_timeout: float) -> None:
        path = leases_path(self.namespace, host_lease_name(self.node))
        kw = {"request_timeout": request_timeout}
        for attempt in range(2):
            if self._lease is None:
                try:
                    self._lease = await self.kube.get(path, **kw)
                except NotFound:
                    fresh = host_lease(
                        self.node,
                        namespace=self.namespace,
                        duration=self.lease_duration,
                        now=self.wallclock(),
                    )
                    try:
                        self._lease = await self.kube.create(
                            leases_path(self.namespace), fresh, **kw
                        )
                        return
                    except Conflict:
                        continue  # created meanwhile (a previous incarnation): read it
            body = _renewed(self._lease, self.node, self.lease_duration, self.wallclock())
            try:
                self._lease = await self.kube.replace(path, body, **kw)
                return
            except (Conflict, NotFound):
                # Our cached copy is stale: a write of ours that timed out but landed, a
                # previous incarnation, an admin, a deletion. Read again and retry once, now.
                self._lease = None
                if attempt:
                    raise

    async def run(self) -> None:
        """Until cancelled."""
        while True:
            ok = await self.renew_once()
            self._wake.clear()
            delay = self.period if ok else min(self.period, 0.5)
            if not ok and self._lease is None:
                # Conflict/NotFound: the next attempt re-reads; do it soon.
                delay = min(delay, 0.1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()


def _renewed(lease: Obj, node: str, duration: float, now: datetime) -> Obj:
    body = {**lease, "spec": dict(lease.get("spec") or {})}
    spec: dict[str, Any] = body["spec"]
    if spec.get("holderIdentity") != node:
        spec["holderIdentity"] = node
        spec["acquireTime"] = micro_time(now)
    spec["renewTime"] = micro_time(now)
    spec["leaseDurationSeconds"] = max(1, math.ceil(duration))
    metadata = dict(body.get("metadata") or {})
    labels = dict(metadata.get("labels") or {})
    if labels.get(LEASE_KIND_LABEL) != HOST_LEASE:
        # A Lease made by an agent from before the label: the operator watches by it.
        metadata["labels"] = {**labels, LEASE_KIND_LABEL: HOST_LEASE}
        body["metadata"] = metadata
    return body


@dataclass
class _Seen:
    version: str
    observation: HolderObservation


class HostLeaseWatcher:
    """When did each node's host Lease last change, by this agent's monotonic clock."""

    def __init__(self, kube: KubeClient, *, namespace: str, clock: Clock = time.monotonic) -> None:
        self.kube = kube
        self.namespace = namespace
        self.clock = clock
        self._seen: dict[str, _Seen] = {}
        self._synced_at: float | None = None
        self.changed = asyncio.Event()
        self.reflector = Reflector(
            kube,
            leases_path(namespace),
            label_selector=f"{HOST_LEASE_LABEL}=true",
            on_change=self._on_change,
            on_synced=self._on_synced,
        )

    @property
    def synced(self) -> asyncio.Event:
        return self.reflector.synced

    def observation(self, node: str) -> HolderObservation | None:
        """None until this agent has listed host Leases at least once."""
        seen = self._seen.get(node)
        if seen is not None:
            return seen.observation
        if self._synced_at is None:
            return None
        # Listed, and there is no Lease: nobody renews it. Its silence starts with our look.
        return HolderObservation(since=self._synced_at)

    def _on_synced(self) -> None:
        self._synced_at = self.clock()

    def record(self, node: str, version: str) -> bool:
        """Record what was read for `node` now; True if it is a change."""
        now = self.clock()
        seen = self._seen.get(node)
        if seen is None:
            if self._synced_at is None:
                # The first list: where each clock starts, not a renewal.
                self._seen[node] = _Seen(version, HolderObservation(since=now))
                return False
            # Absent when we listed, present now: its agent has (re)started, a sign of life.
            self._seen[node] = _Seen(
                version, HolderObservation(since=self._synced_at, last_change=now)
            )
            self.changed.set()
            return True
        if seen.version == version:
            return False
        seen.version = version
        seen.observation = HolderObservation(since=seen.observation.since, last_change=now)
        self.changed.set()
        return True

    def _on_change(self, key: str, obj: Obj | None) -> None:
        node = host_lease_node(key.rpartition("/")[2])
        if node is None:
            return
        if obj is None:
            # Deleted: nobody renews it now; not a sign of life, so no change is recorded.
            return
        self.record(node, _lease_version(obj))

    async def recheck(self, node: str) -> bool:
        """Read `node`'s host Lease now; True if it changed since last seen (it is alive).

        Called right before acquiring a fencing Lease: the watch may lag (or have been cut off
        while the API was unreachable), and a renewal we missed must stop a takeover.
        """
        try:
            obj = await self.kube.get(leases_path(self.namespace, host_lease_name(node)))
        except NotFound:
            return False
        return self.record(node, _lease_version(obj))

    async def silent_for(self, node: str, duration: float) -> bool:
        """The last look before a takeover: read `node`'s host Lease now, and whether it has
        still not changed for `duration` by our clock.

        Not just "did this read change it": the watch may have delivered a renewal after the
        decision to take over was made, and that renewal must call the takeover off too.
        """
        await self.recheck(node)
        observation = self.observation(node)
        if observation is None:
            return False
        return self.clock() - observation.unchanged_since >= duration

    async def run(self) -> None:
        await self.reflector.run()


def _lease_version(obj: Obj) -> str:
    spec = obj.get("spec") or {}
    rv = (obj.get("metadata") or {}).get("resourceVersion") or ""
    return f"{rv}|{spec.get('renewTime') or ''}|{spec.get('holderIdentity') or ''}"


# -- fencing Leases ---------------------------------------------------------------------------
#
# Every write is a compare-and-swap: read, decide on what was read, write with that read's
# resourceVersion. A 409 means another writer got in between; the caller reads and decides
# again (the agent's loop does that on its next pass).

STANDBY_ANNOTATION = "xenha.io/standby"


class Outcome(enum.Enum):
    # The write landed (or nothing needed writing: the Lease already says it).
    DONE = "done"
    # Another node holds the Lease (now, or after our write lost the race): never run.
    LOST = "lost"
    # The preconditions did not hold on the Lease as read (see the `reason`).
    REFUSED = "refused"
    # Acquire only: the last look found the holder alive after all.
    HOLDER_ALIVE = "holder-alive"
    MISSING = "missing"
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True)
class Cas:
    outcome: Outcome
    # The holder as last read (after a lost race: the winner).
    holder: str | None
    lease: Obj | None = field(default=None, repr=False)
    reason: str = ""
    # UNAVAILABLE after the write was sent: it may still land (a request can reach the API
    # server long after the client gave up on it), but only while the Lease is still at
    # this resourceVersion, the one the write is conditional on.
    in_doubt_at: str | None = None

    @property
    def won(self) -> bool:
        return self.outcome is Outcome.DONE


def fencing_lease_name(xr_name: str) -> str:
    return f"{xr_name}-fence"


def lease_holder(lease: Obj | None) -> str | None:
    if not lease:
        return None
    holder = (lease.get("spec") or {}).get("holderIdentity")
    return str(holder) if holder else None


def lease_standby(lease: Obj | None) -> str | None:
    """The `xenha.io/standby` annotation: the node whose copy is a valid standby."""
    if not lease:
        return None
    value = ((lease.get("metadata") or {}).get("annotations") or {}).get(STANDBY_ANNOTATION)
    return str(value) if value else None


def _with(lease: Obj, *, spec: dict[str, Any], standby: str | None) -> Obj:
    """`lease` with a new spec and the standby annotation set (or removed)."""
    meta = dict(lease.get("metadata") or {})
    annotations = dict(meta.get("annotations") or {})
    if standby:
        annotations[STANDBY_ANNOTATION] = standby
    else:
        annotations.pop(STANDBY_ANNOTATION, None)
    meta["annotations"] = annotations
    return {**lease, "metadata": meta, "spec": spec}


Mutation = Callable[[Obj], "Obj | str | None"]


async def _cas(
    kube: KubeClient,
    namespace: str,
    name: str,
    mutate: Mutation,
    *,
    me: str,
    last_look: Callable[[Obj], Awaitable[Outcome | None]] | None = None,
) -> Cas:
    """Read, `mutate` (a new object; None: nothing to write; str: refused, why), write.

    `last_look` runs between the read and the write and may call the write off.
    """
    path = leases_path(namespace, name)
    try:
        lease = await kube.get(path)
        if last_look is not None and (verdict := await last_look(lease)) is not None:
            return Cas(verdict, lease_holder(lease), lease)
    except NotFound:
        return Cas(Outcome.MISSING, None)
    except ApiError as e:
        return Cas(Outcome.UNAVAILABLE, None, reason=str(e))
    new = mutate(lease)
    holder = lease_holder(lease)
    if new is None:
        return Cas(Outcome.DONE, holder, lease)
    if isinstance(new, str):
        outcome = Outcome.LOST if holder not in (me, None) else Outcome.REFUSED
        return Cas(outcome, holder, lease, reason=new)
    # metadata.resourceVersion comes along from the read: the write is conditional on it.
    try:
        written = await kube.replace(path, new)
    except Conflict:
        try:
            current = await kube.get(path)
        except ApiError:
            return Cas(Outcome.UNAVAILABLE, None, reason="conflict, then no read")
        return Cas(Outcome.LOST, lease_holder(current), current, reason="conflict")
    except ApiError as e:
        # The write may or may not have landed, or land later; see Cas.in_doubt_at.
        return Cas(Outcome.UNAVAILABLE, None, reason=str(e), in_doubt_at=resource_version(lease))
    return Cas(Outcome.DONE, lease_holder(written), written)


def resource_version(obj: Obj | None) -> str | None:
    if not obj:
        return None
    rv = (obj.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def _transition(lease: Obj, to: str, now: str) -> Obj:
    spec = dict(lease.get("spec") or {})
    spec.update(
        holderIdentity=to,
        acquireTime=now,
        renewTime=now,
        leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1,
    )
    return _with(lease, spec=spec, standby=None)


async def acquire_fencing_lease(
    kube: KubeClient,
    namespace: str,
    name: str,
    me: str,
    *,
    expected_holder: str,
    holder_silent: Callable[[], Awaitable[bool]] | None = None,
    wallclock: WallClock = _utcnow,
) -> Cas:
    """The standby's takeover: holder := me, transitions + 1, standby annotation removed.

    Only from `expected_holder` (the node whose silence was judged) and only while the
    annotation names `me` (the active revokes it when it loses the stream, and from then on
    this CAS cannot succeed). `holder_silent` is a last look at the holder's host Lease,
    taken after the read and before the write, for a renewal the watch has not delivered yet.
    """

    def mutate(lease: Obj) -> Obj | str | None:
        holder = lease_holder(lease)
        if holder == me:
            return None
        if holder != expected_holder:
            return f"held by {holder}, not {expected_holder}"
        if lease_standby(lease) != me:
            return "not the designated standby"
        return _transition(lease, me, micro_time(wallclock()))

    async def look(lease: Obj) -> Outcome | None:
        if holder_silent is None or lease_holder(lease) != expected_holder:
            return None
        return None if await holder_silent() else Outcome.HOLDER_ALIVE

    result = await _cas(kube, namespace, name, mutate, me=me, last_look=look)
    if result.outcome is Outcome.REFUSED and result.holder == expected_holder:
        # Held by the expected node but we are no valid standby: as good as lost.
        return Cas(Outcome.LOST, result.holder, result.lease, reason=result.reason)
    return result


async def revoke_standby(
    kube: KubeClient,
    namespace: str,
    name: str,
    me: str,
    *,
    touch: bool = False,
    wallclock: WallClock = _utcnow,
) -> Cas:
    """The active lost its stream: remove the annotation, keep holding the Lease.

    Once this has landed no standby can take over (its CAS needs the annotation), so the
    replicator may release the output it held. LOST: someone else holds the Lease.
    `touch`: write even if the annotation is absent (a new resourceVersion), so that a
    designation of ours still in flight can never land after this.
    """

    def mutate(lease: Obj) -> Obj | str | None:
        holder = lease_holder(lease)
        if holder != me:
            return f"held by {holder}"
        spec = dict(lease.get("spec") or {})
        if lease_standby(lease) is None:
            if not touch:
                return None
            spec["renewTime"] = micro_time(wallclock())
        return _with(lease, spec=spec, standby=None)

    return await _cas(kube, namespace, name, mutate, me=me)


async def reassert_holder(
    kube: KubeClient, namespace: str, name: str, me: str, *, wallclock: WallClock = _utcnow
) -> Cas:
    """Before a self-fenced active resumes: a write that only lands while we hold the Lease.

    It moves the Lease to a new resourceVersion (renewTime := now, all else kept), so a
    takeover CAS based on an earlier read fails (409), and a takeover that landed first makes
    this one fail (LOST). Without it a resume could pass a standby's takeover in flight: the
    standby judged us silent, our renewals came back, and both copies would run.
    """

    def mutate(lease: Obj) -> Obj | str | None:
        holder = lease_holder(lease)
        if holder != me:
            return f"held by {holder}"
        spec = dict(lease.get("spec") or {})
        spec["renewTime"] = micro_time(wallclock())
        return _with(lease, spec=spec, standby=lease_standby(lease))

    return await _cas(kube, namespace, name, mutate, me=me)


async def designate_standby(
    kube: KubeClient, namespace: str, name: str, me: str, standby: str
) -> Cas:
    """The active's standby acknowledged a checkpoint: name it as the valid standby."""

    def mutate(lease: Obj) -> Obj | str | None:
        holder = lease_holder(lease)
        if holder != me:
            return f"held by {holder}"
        if lease_standby(lease) == standby:
            return None
        return _with(lease, spec=dict(lease.get("spec") or {}), standby=standby)

    return await _cas(kube, namespace, name, mutate, me=me)


async def transfer_fencing_lease(
    kube: KubeClient,
    namespace: str,
    name: str,
    me: str,
    to: str,
    *,
    wallclock: WallClock = _utcnow,
) -> Cas:
    """Planned switchover: the holder hands its Lease to `to` (annotation removed).

    Only the holder gives its Lease away, only after pausing its guest and seeing the standby
    acknowledge every checkpoint sent, and only while the annotation names `to`: the same
    condition as a takeover, so a copy the active has revoked (stream lost, copy dropped) is
    never handed the guest. The standby then activates because the Lease names it, without
    judging anyone's liveness.
    """

    def mutate(lease: Obj) -> Obj | str | None:
        holder = lease_holder(lease)
        if holder == to:
            return None
        if holder != me:
            return f"held by {holder}"
        if lease_standby(lease) != to:
            return f"{to} is not the designated standby"
        return _transition(lease, to, micro_time(wallclock()))

    return await _cas(kube, namespace, name, mutate, me=me)
