"""kopf wiring: watch, decide (status.reconcile), write; the only I/O around the pure parts.

Shape of the operator:

- **Indexes** (kopf, in memory) of XenNode reports, fencing Leases (server-side filtered by the
  `xenha.io/replication` label) and XenReplications. Each XenNode event also records when that
  node's heartbeat last changed (`observe.HeartbeatTracker`), and wakes the replications that
  involve the node.
- **One daemon per XenReplication** runs the reconcile pass whenever something it depends on
  changes, and at least every `resync_interval` (staleness is time passing, not an event).
  A pass: build the `Observation` from the indexes, `status.reconcile` it, make sure the owned
  objects exist (fencing Lease, TLS Secrets, Role/RoleBinding), write the status if it changed
  (optimistic concurrency on resourceVersion, re-deciding from a fresh read on conflict), and
  post the transitions as Events — after the status write succeeded, so a transition is
  announced by whoever recorded it, once.
- **The deletion handler** (kopf finalizer `xenha.io/stop-replication`) keeps reconciling with
  `deleting=True` — standbyNode empty, phase Suspended, so the agents stop and the standby
  destroys its copy — until the standby reports it let go (or stopped reporting, or the
  deletion timeout passed); then kopf releases the finalizer. Owned objects go with the
  garbage collector.

Level-triggered throughout: every pass starts from what is observed (the fencing Lease is the
truth about who runs), so a restarted operator or the other replica taking over continues
where the last one stopped, never repeating a failover or a switchover.

The operator writes `status` and nothing else of a XenReplication (kopf adds and removes its
finalizer). kopf's own bookkeeping goes to `status.kopf` (progress of the deletion handler),
never to annotations; kopf's diff-base is not stored at all, as no handler reacts to diffs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf

from xenha.api import GROUP, VERSION
from xenha.api.fencing import HOST_LEASE_LABEL, host_lease_node

from . import certs, events, fencing, observe, status
from .kube import (
    EVENTS,
    LEASES,
    ROLEBINDINGS,
    ROLES,
    SECRETS,
    XENREPLICATIONS,
    Conflict,
    Kube,
    KubeError,
    connection_info,
    load_configuration,
    owned_copy,
)
from .metrics import OperatorMetrics
from .owned import REPLICATION_LABEL, Owner, is_owned_by, owned_metadata
from .settings import OperatorSettings

registry = kopf.OperatorRegistry()
log = logging.getLogger(__name__)

XR: tuple[str, str, str] = (GROUP, VERSION, "xenreplications")
XENNODE: tuple[str, str, str] = (GROUP, VERSION, "xennodes")
LEASE: tuple[str, str, str] = ("coordination.k8s.io", "v1", "leases")

#: Attempts at writing a status that keeps meeting newer versions of the object.
WRITE_ATTEMPTS = 4


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Context:
    """Everything the handlers share, passed through kopf's memo (`memo.ctx`)."""

    settings: OperatorSettings
    kube: Kube
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    clock: Callable[[], datetime] = utcnow
    heartbeats: observe.HeartbeatTracker = field(default_factory=observe.HeartbeatTracker)
    renewals: observe.HeartbeatTracker = field(default_factory=observe.HeartbeatTracker)
    instance: str = field(default_factory=events.reporting_instance)
    _wakeups: dict[str, asyncio.Event] = field(default_factory=dict)
    _interest: dict[str, frozenset[str]] = field(default_factory=dict)
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    #: uid -> (nodes, when to look at the Secrets again): renewal, or the next ownership check.
    _tls: dict[str, tuple[frozenset[str], datetime]] = field(default_factory=dict)
    #: uid -> when to look at the Role/RoleBinding again.
    _rbac: dict[str, datetime] = field(default_factory=dict)
    _stats_written: dict[str, datetime] = field(default_factory=dict)
    _last_error: dict[str, str] = field(default_factory=dict)
    _owned_error: dict[str, str] = field(default_factory=dict)

    @property
    def timing(self) -> status.Timing:
        return status.Timing(
            stale_after=self.settings.report_stale_after,
            switchover_timeout=self.settings.switchover_timeout,
        )

    # --- wake-ups ---------------------------------------------------------------------------

    def wakeup(self, uid: str) -> asyncio.Event:
        return self._wakeups.setdefault(uid, asyncio.Event())

    def wake(self, uid: str) -> None:
        event = self._wakeups.get(uid)
        if event is not None:
            event.set()

    def wake_node(self, node: str) -> None:
        for uid, nodes in self._interest.items():
            if node in nodes:
                self.wake(uid)

    def wake_all(self) -> None:
        for event in self._wakeups.values():
            event.set()

    def forget(self, uid: str) -> None:
        tables: tuple[dict[str, Any], ...] = (
            self._wakeups,
            self._interest,
            self._locks,
            self._tls,
            self._rbac,
            self._stats_written,
        )
        for table in tables:
            table.pop(uid, None)
        self._last_error.pop(uid, None)
        self._owned_error.pop(uid, None)
        self.metrics.set_phase(uid, None)

    async def wait(self, uid: str, stopped: kopf.DaemonStopped | None = None) -> None:
        """Until something about `uid` changes, the resync interval passes, or we must stop."""
        event = self.wakeup(uid)
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(event.wait())]
        if stopped is not None:
            waiters.append(asyncio.ensure_future(_until(stopped)))
        try:
            await asyncio.wait(
                waiters,
                timeout=self.settings.resync_interval.total_seconds(),
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for waiter in waiters:
                waiter.cancel()
            event.clear()

    # --- one pass ---------------------------------------------------------------------------

    async def reconcile(
        self, body: Mapping[str, Any], indices: Mapping[str, Any], *, deleting: bool = False
    ) -> tuple[status.Observation, status.Outcome]:
        uid = body["metadata"]["uid"]
        lock = self._locks.setdefault(uid, asyncio.Lock())
        async with lock:
            with self.metrics.reconcile():
                return await self._reconcile(body, indices, deleting)

    def _observe(
        self, body: Mapping[str, Any], indices: Mapping[str, Any], deleting: bool
    ) -> status.Observation:
        replications = [r for store in indices["replications"].values() for r in store]
        return observe.observation(
            body,
            xennodes=indices["xennode_reports"],
            leases=indices["fence_leases"],
            replications=replications,
            heartbeats=self.heartbeats,
            renewals=self.renewals,
            now=self.clock(),
            deleting=True if deleting else None,
        )

    async def _reconcile(
        self, body: Mapping[str, Any], indices: Mapping[str, Any], deleting: bool
    ) -> tuple[status.Observation, status.Outcome]:
        obs = self._observe(body, indices, deleting)
        outcome = status.reconcile(obs, self.timing)
        self._interest[obs.uid] = frozenset(obs.nodes)
        problems: list[status.Transition] = []
        if not obs.deleting and obs.spec is not None:
            problems = await self._ensure_owned(body, obs, outcome)
            # Said once per distinct problem, not on every pass while it lasts.
            told = "\n".join(p.message for p in problems)
            if told == self._owned_error.get(obs.uid, ""):
                problems = []
            self._owned_error[obs.uid] = told
        if self._needs_write(obs, outcome):
            obs, outcome = await self._write(body, indices, deleting, outcome)
        for transition in problems:
            await self.post(body, transition)
        self.metrics.set_phase(
            obs.uid, outcome.status.phase.value if outcome.status.phase else None
        )
        self._last_error.pop(obs.uid, None)
        return obs, outcome

    def _needs_write(self, obs: status.Observation, outcome: status.Outcome) -> bool:
        if outcome.status == obs.previous:
            return False
        if status.only_stats_changed(obs.previous, outcome.status):
            last = self._stats_written.get(obs.uid)
            return last is None or obs.now - last >= self.settings.stats_interval
        return True

    async def _write(
        self,
        body: Mapping[str, Any],
        indices: Mapping[str, Any],
        deleting: bool,
        outcome: status.Outcome,
    ) -> tuple[status.Observation, status.Outcome]:
        """Write the status decided from a fresh read, retrying on concurrent changes."""
        meta = body["metadata"]
        obs = None
        for _ in range(WRITE_ATTEMPTS):
            fresh = await self.kube.get(XENREPLICATIONS, meta["namespace"], meta["name"])
            if fresh is None or fresh["metadata"]["uid"] != meta["uid"]:
                break  # gone: nothing to write to
            obs = self._observe(fresh, indices, deleting)
            outcome = status.reconcile(obs, self.timing)
            if outcome.status == obs.previous:
                # Already written (by us a moment ago, or by the other replica): nothing to
                # tell either, the writer told it.
                return obs, status.Outcome(outcome.status, [])
            replacement = dict(fresh)
            new_status = outcome.status.to_api()
            kopf_state = (fresh.get("status") or {}).get(observe.KOPF_FIELD)
            if kopf_state is not None:
                new_status[observe.KOPF_FIELD] = kopf_state
            replacement["status"] = new_status
            # Announce first, under names derived from the status being left behind: if this
            # replica dies before the write, whoever decides the same transition next posts
            # under the same names and finds them taken — told once, never lost.
            for number, transition in enumerate(outcome.transitions):
                key = events.transition_key(meta["uid"], obs.previous.to_api(), number)
                await self.post(fresh, transition, key=key)
            try:
                await self.kube.replace_status(
                    XENREPLICATIONS, meta["namespace"], meta["name"], replacement
                )
            except Conflict:
                self.metrics.status_writes.labels("conflict").inc()
                continue
            self.metrics.status_writes.labels("written").inc()
            self._stats_written[obs.uid] = obs.now
            return obs, outcome
        if obs is None:
            obs = self._observe(body, indices, deleting)
        return obs, status.Outcome(outcome.status, [])

    async def post(
        self, obj: Mapping[str, Any], transition: status.Transition, key: str | None = None
    ) -> None:
        """Post an Event; with a `key`, at most once per key (a fixed name, 409 = done)."""
        body = events.event_body(
            obj,
            transition,
            component=self.settings.reporting_component,
            instance=self.instance,
            now=self.clock(),
            key=key,
        )
        try:
            await self.kube.create(EVENTS, obj["metadata"]["namespace"], body)
        except Conflict:
            return  # the same transition was announced already (by the other replica?)
        except KubeError as exc:
            log.warning("could not post Event %s: %s", transition.reason, exc)
            return
        self.metrics.transitions.labels(transition.reason).inc()

    async def report_error(self, body: Mapping[str, Any], exc: BaseException) -> None:
        """A pass failed: say so once per distinct error, as a Warning Event."""
        uid = body["metadata"]["uid"]
        message = f"{type(exc).__name__}: {exc}"
        if self._last_error.get(uid) == message:
            log.debug("reconcile of %s still failing: %s", body["metadata"].get("name"), message)
            return
        log.error("reconcile of %s failed: %s", body["metadata"].get("name"), message)
        self._last_error[uid] = message
        with contextlib.suppress(Exception):
            await self.post(body, status.Transition("ReconcileError", message, warning=True))

    # --- owned objects ----------------------------------------------------------------------

    async def _ensure_owned(
        self, body: Mapping[str, Any], obs: status.Observation, outcome: status.Outcome
    ) -> list[status.Transition]:
        owner = Owner.of(body)
        problems = []
        steps: tuple[tuple[str, Callable[[], Awaitable[None]]], ...] = (
            ("fencing Lease", lambda: self._ensure_lease(owner, obs, outcome)),
            ("TLS Secrets", lambda: self._ensure_tls(owner, obs, outcome)),
            ("agent Role", lambda: self._ensure_rbac(owner, obs.now)),
        )
        for what, step in steps:
            try:
                await step()
            except KubeError as exc:
                problems.append(
                    status.Transition(
                        "OwnedObjectError", f"cannot create the {what}: {exc}", warning=True
                    )
                )
        return problems

    async def _ensure_lease(
        self, owner: Owner, obs: status.Observation, outcome: status.Outcome
    ) -> None:
        if obs.lease_holder is not None or obs.spec is None:
            return
        # First creation names the primary; a Lease deleted by hand comes back naming the
        # node that runs the guest now, never moving it.
        holder = outcome.status.active_node or obs.spec.primary_node
        lease = fencing.fence_lease(
            owner=owner,
            holder=holder,
            lease_duration_seconds=obs.spec.failover.lease_duration_seconds,
            now=obs.now,
        )
        # A Lease left by a deleted replication of the same name is not ours (observe ignores
        # it) and not ours to change either (only agents move a holder; the operator has no
        # `update` on Leases): the garbage collector removes it, the Lease index sees it go,
        # and the next pass creates ours.
        await self.kube.create_or_get(LEASES, owner.namespace, lease)

    async def _ensure_tls(
        self, owner: Owner, obs: status.Observation, outcome: status.Outcome
    ) -> None:
        assert obs.spec is not None
        wanted = {
            obs.spec.primary_node,
            obs.spec.secondary_node,
            outcome.status.active_node,
            outcome.status.standby_node,
        }
        nodes = frozenset(n for n in wanted if n)
        cached = self._tls.get(owner.uid)
        if cached is not None and cached[0] == nodes and obs.now < cached[1]:
            return
        tls_name, ca_name = certs.tls_secret_name(owner.name), certs.ca_secret_name(owner.name)
        tls_secret = await self.kube.get(SECRETS, owner.namespace, tls_name)
        ca_secret = await self.kube.get(SECRETS, owner.namespace, ca_name)
        plan = certs.plan_tls(
            # Material of a deleted replication of the same name is not reused: fresh keys.
            ca_data=_secret_data(ca_secret) if _owned(ca_secret, owner) else None,
            tls_data=_secret_data(tls_secret) if _owned(tls_secret, owner) else None,
            nodes=nodes,
            ca_name=f"xenha {owner.key} CA",
            now=obs.now,
            cert_validity=self.settings.cert_validity,
            ca_validity=self.settings.ca_validity,
            renew_fraction=self.settings.renew_fraction,
        )
        if plan.changed:
            # The CA first: a node certificate must never be stored without its issuer.
            await self._put_secret(owner, ca_name, ca_secret, plan.ca_data)
            await self._put_secret(owner, tls_name, tls_secret, plan.tls_data)
        # Not trusted forever: the Secrets are not watched, and may go (garbage collector).
        self._tls[owner.uid] = (nodes, min(plan.renew_at, obs.now + self._owned_check))

    async def _put_secret(
        self,
        owner: Owner,
        name: str,
        existing: Mapping[str, Any] | None,
        data: Mapping[str, bytes],
    ) -> None:
        desired = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": owned_metadata(owner, name),
            "data": {k: _b64(v) for k, v in data.items()},
        }
        if existing is None:
            await self.kube.create(SECRETS, owner.namespace, desired)
        elif existing.get("data") != desired["data"] or not is_owned_by(existing, owner):
            # Also takes over a Secret left by a deleted replication of the same name (new
            # owner, new data), guarded by its resourceVersion against the garbage collector.
            await self.kube.replace(SECRETS, owner.namespace, name, owned_copy(existing, desired))

    @property
    def _owned_check(self) -> timedelta:
        return self.settings.owned_check_interval

    async def _ensure_rbac(self, owner: Owner, now: datetime) -> None:
        check_at = self._rbac.get(owner.uid)
        if check_at is not None and now < check_at:
            return
        role = certs.agent_role(owner)
        binding = certs.agent_role_binding(
            owner, self.settings.agent_service_account, self.settings.agent_namespace
        )
        name = role["metadata"]["name"]
        for kind, desired, field_ in ((ROLES, role, "rules"), (ROLEBINDINGS, binding, "subjects")):
            existing = await self.kube.create_or_get(kind, owner.namespace, desired)
            if existing.get(field_) != desired[field_] or not is_owned_by(existing, owner):
                # Also takes over one left by a deleted replication of the same name.
                await self.kube.replace(kind, owner.namespace, name, owned_copy(existing, desired))
        # Not trusted forever: they are not watched, and may go (garbage collector).
        self._rbac[owner.uid] = now + self._owned_check


async def _until(stopped: kopf.DaemonStopped) -> None:
    await stopped.wait()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _owned(obj: Mapping[str, Any] | None, owner: Owner) -> bool:
    return obj is not None and is_owned_by(obj, owner)


def _secret_data(secret: Mapping[str, Any] | None) -> dict[str, bytes] | None:
    if secret is None:
        return None
    return {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}


def context(memo: Any) -> Context:
    ctx = memo.get("ctx") if isinstance(memo, Mapping) else getattr(memo, "ctx", None)
    assert isinstance(ctx, Context), "the operator was started without xenha's Context"
    return ctx


# --- kopf handlers -------------------------------------------------------------------------


@kopf.on.login(registry=registry)
def login(memo: Any, **_: Any) -> kopf.ConnectionInfo:
    # Re-read each time kopf asks (it asks again on 401): in-cluster tokens rotate.
    return connection_info(load_configuration(context(memo).settings.kubeconfig))


@kopf.index(*XENNODE, registry=registry)
def xennode_reports(
    name: str, status: Mapping[str, Any], memo: Any, **_: Any
) -> dict[str, dict[str, Any]]:
    ctx = context(memo)
    ctx.heartbeats.observe(name, status.get("heartbeatTime"), ctx.clock())
    ctx.wake_node(name)
    return {name: dict(status)}


@kopf.index(*LEASE, labels={REPLICATION_LABEL: kopf.PRESENT}, registry=registry)
def fence_leases(
    namespace: str | None, name: str, body: Mapping[str, Any], memo: Any, **_: Any
) -> dict[tuple[str, str], observe.LeaseRecord]:
    record = observe.lease_record(body)
    namespace = namespace or ""
    ctx = context(memo)
    for uid in record.owners:
        ctx.wake(uid)
    return {(namespace, name): record}


@kopf.index(*LEASE, labels={HOST_LEASE_LABEL: "true"}, registry=registry)
def host_lease_renewals(
    name: str, spec: Mapping[str, Any], memo: Any, **_: Any
) -> dict[str, object] | None:
    """Each agent's host Lease: when it was last seen renewed. No wake-up: renewals are the
    normal case, and the resync notices the lack of them (status: the active's Ready)."""
    node = host_lease_node(name)
    if node is None:
        return None
    ctx = context(memo)
    renewed = spec.get("renewTime")
    ctx.renewals.observe(node, renewed, ctx.clock())
    return {node: renewed}


@kopf.index(*XR, registry=registry)
def replications(
    body: Mapping[str, Any], uid: str, memo: Any, **_: Any
) -> dict[str, status.OtherReplication] | None:
    context(memo).wake(uid)
    record = observe.replication_record(body)
    return {uid: record} if record is not None else None


@kopf.daemon(*XR, registry=registry, cancellation_backoff=None)
async def replicate(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    uid: str,
    memo: Any,
    **kwargs: Any,
) -> None:
    """Keep this replication's status, owned objects and Events current until it is deleted."""
    ctx = context(memo)
    while not stopped:
        if body.metadata.get("deletionTimestamp"):
            break  # the deletion handler takes over
        try:
            await ctx.reconcile(body, kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await ctx.report_error(body, exc)
        await ctx.wait(uid, stopped)


@kopf.on.delete(*XR, registry=registry, id="stop-replication")
async def stop_replication(body: kopf.Body, uid: str, memo: Any, **kwargs: Any) -> None:
    """Stop replicating cleanly before the object goes: the guest keeps running on the active
    node, the standby destroys its copy. Never raises: kopf would retry through progress
    storage; this handler is idempotent and simply starts over after a restart."""
    ctx = context(memo)
    deadline = ctx.clock() + ctx.settings.deletion_timeout
    try:
        while True:
            try:
                obs, outcome = await ctx.reconcile(body, kwargs, deleting=True)
            except Exception as exc:
                await ctx.report_error(body, exc)
            else:
                done, _ = status.copies_released(obs, ctx.settings.report_stale_after)
                if done:
                    active = outcome.status.active_node
                    await ctx.post(
                        body,
                        status.Transition(
                            "Stopped",
                            f"replication stopped; the guest keeps running on {active}",
                        ),
                        key=events.transition_key(uid, {"deleted": True}, 0),
                    )
                    return
            if ctx.clock() >= deadline:
                await ctx.post(
                    body,
                    status.Transition(
                        "StopTimedOut",
                        "the standby did not confirm that its copy is gone within "
                        f"{ctx.settings.deletion_timeout.total_seconds():g}s; releasing "
                        "(its agent drops copies of replications that no longer exist)",
                        warning=True,
                    ),
                    key=events.transition_key(uid, {"deleted": True}, 1),
                )
                return
            await ctx.wait(uid)
    finally:
        ctx.forget(uid)
