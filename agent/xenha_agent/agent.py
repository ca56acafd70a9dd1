"""`xenha agent`: the node agent's main loop.

It watches XenReplications, runs a replicator for each one this node takes part in, keeps the
host Lease renewed, judges the peers' host Leases, applies the fencing decisions (fencing.py)
through compare-and-swap writes of the fencing Lease (leases.py), routes relay connections to
replicators (the node listener) and reports XenNode.status. Decisions are pure functions
(fencing.py, plan.py); this module gathers their inputs and carries them out.

A pass of the loop, every `tick` or sooner when something changes:
1. ask every replicator for its status, and feed it the latest host-Lease renewal (with it a
   primary replicator fences on its own if the agent goes quiet);
2. per replication, fencing first — standby: activate (after taking the Lease) or drop;
   active: designate the standby, revoke it when the stream is lost, then release the held
   output (degrade), pause, resume, destroy, hand over — each as a task of its own so that a
   slow `xl destroy` never delays another replication's fence;
3. then replicator lifecycles (launch / stop) for replications with no action in flight.

Restarting the agent changes nothing by itself: replicators keep streaming; while the stream
is alive no standby acts; the active side decides nothing before its first renewal attempt;
and a standby starts judging a holder only D after it first saw its host Lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from xenha.api.fencing import pause_after
from xenha.api.models import FailoverRecord, Mode, NodeReplication, XenNodeStatus
from xenha_agent import events as ev
from xenha_agent import launch, state
from xenha_agent.config import AgentSettings
from xenha_agent.events import EventRecorder
from xenha_agent.fencing import (
    ActiveAction,
    ActiveView,
    FencingLease,
    StandbyAction,
    StandbyView,
    decide_active,
    decide_standby,
    renewal_fresh,
    takeover_possible,
)
from xenha_agent.kube import (
    ApiError,
    KubeClient,
    NotFound,
    Obj,
    Reflector,
    leases_path,
    xenreplications_path,
)
from xenha_agent.leases import (
    Cas,
    HostLeaseRenewer,
    HostLeaseWatcher,
    Outcome,
    acquire_fencing_lease,
    designate_standby,
    lease_holder,
    lease_standby,
    reassert_holder,
    resource_version,
    revoke_standby,
    transfer_fencing_lease,
)
from xenha_agent.metrics import AgentMetrics, Health, HealthServer
from xenha_agent.plan import (
    INCOMING_SUFFIX,
    ClearIncoming,
    Guard,
    Launch,
    LocalReplicator,
    ReplicationView,
    Stop,
    Unpause,
    plan,
    replication_view,
)
from xenha_agent.relay_listener import NodeListener
from xenha_agent.replicator_client import (
    ReplicatorClient,
    ReplicatorError,
    ReplicatorUnavailable,
    colo_message,
    colo_refusal,
)
from xenha_agent.replicator_config import control_socket_path
from xenha_agent.replicators import (
    ColoRefused,
    Launcher,
    ReplicatorControl,
    ReplicatorLauncher,
    ReplicatorState,
    ReplicatorStatus,
    Role,
    colo_refused_before,
    existing_uids,
    forget,
    parse_status,
    save_colo_refusal,
    socket_alive,
)
from xenha_agent.report import NodeReporter, build_status, replication_entry
from xenha_agent.state import CopyRecord
from xenha_agent.xen.xenstore import XenStore
from xenha_agent.xen.xl import Domain, DomainNotFound, XenInfo, Xl, XlError

log = logging.getLogger(__name__)

Connect = Callable[[Path], ReplicatorControl]

# Relaunch spacing after a replicator ended: seeds are expensive, a dead peer makes them fail.
LAUNCH_BACKOFF = (2.0, 5.0, 10.0, 30.0, 60.0)

# `xl info` (free memory) is refreshed this often; `xl list` on every report.
INFO_PERIOD = 10.0

# How long a launched replicator may take to open its control socket.
REPLICATOR_START_GRACE = 15.0

# Why a guest is paused again: the record says fenced, xl says running (a crash between the
# record and the pause, or a pause undone by someone else).
FENCE_NOT_IN_PLACE = "FenceNotInPlace"

# Event reason: a primary's guest paused by something other than our fence was unpaused
# (plan.Unpause), or could not be (retried).
GUEST_UNPAUSED = "GuestUnpaused"

# Event reason: a self-fenced guest could not be resumed (retried; the guest stays paused).
FENCE_LIFT_FAILED = "FenceLiftFailed"

# A fencing write (or resume) that fails is tried again after 50 ms, doubling up to 1 s:
# while the API is down the loop would otherwise retry (and log) on every pass. A pause that
# fails is retried sooner: it is the safety action.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0
PAUSE_RETRY_MAX = 0.2

# A standby's copy exists (incoming) in these states; fencing decides its fate.
_STANDBY_STATES = frozenset(
    {
        ReplicatorState.STARTING,
        ReplicatorState.SEEDING,
        ReplicatorState.REPLICATING,
        ReplicatorState.PEER_LOST,
    }
)


@dataclass
class Attached:
    """A replicator this agent talks to."""

    client: ReplicatorControl
    status: ReplicatorStatus | None = None
    failures: int = 0
    lease_sent: float | None = None
    dropped: bool = False
    # Actions on its replication completed before `status` was read (see Agent.completed):
    # a status read before the last action finished must not drive the next decision.
    seen_actions: int = 0
    # Monotonic time this agent started it; None when found at start-up (already running).
    launched_at: float | None = None
    # It confirmed `degrade`: the output it held after the loss is released.
    degraded: bool = False


@dataclass
class Retry:
    """A fencing action that keeps failing: when to try again, and what was logged."""

    failures: int = 0
    not_before: float = 0.0
    error: str = ""


class Agent:
    def __init__(
        self,
        settings: AgentSettings,
        *,
        kube: KubeClient | None = None,
        xl: Xl | None = None,
        xenstore: XenStore | None = None,
        launcher: ReplicatorLauncher | None = None,
        connect: Connect | None = None,
        clock: Callable[[], float] = time.monotonic,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        s = self.settings = settings
        self.me = s.node_name
        self.kube = kube or KubeClient.from_kubeconfig(s.kubeconfig)
        self.xl = xl or Xl(s.xl_path, env=s.xl_env)
        self.xenstore = xenstore or XenStore(s.xenstore_socket)
        self.launcher: ReplicatorLauncher = launcher or Launcher(
            kind=s.replicator_launcher,
            command=list(s.replicator_command) if s.replicator_command else None,
            env=s.xl_env,
        )
        self.connect: Connect = connect or (lambda path: ReplicatorClient(path, timeout=2.0))
        self.clock = clock
        self.wallclock = wallclock
        self.metrics = AgentMetrics()
        self.health = Health()
        self.renewer = HostLeaseRenewer(
            self.kube,
            namespace=s.namespace,
            node=self.me,
            idle_duration=s.idle_lease_duration,
            clock=clock,
            wallclock=wallclock,
            on_renewed=self._renewed,
        )
        self.hosts = HostLeaseWatcher(self.kube, namespace=s.namespace, clock=clock)
        self.xrs = Reflector(self.kube, xenreplications_path(), on_change=self._xr_changed)
        self.reporter = NodeReporter(
            self.kube, self.me, period=s.report_period, clock=clock, wallclock=wallclock
        )
        self.events = EventRecorder(self.kube, self.me, wallclock=wallclock)
        self.listener: NodeListener | None = None
        self.relay_port: int | None = None
        self.views: dict[str, ReplicationView] = {}
        self.records: dict[str, CopyRecord] = {}
        self.replicators: dict[str, Attached] = {}
        self.fence_leases: dict[str, tuple[Reflector, asyncio.Task[None]]] = {}
        self.domains: dict[str, Domain] = {}
        self.info: XenInfo | None = None
        self.colo_supported: bool | None = None
        # uid -> xl refused COLO for it here (not retried while the replication asks for COLO).
        self.colo_refused: dict[str, ColoRefused] = {}
        self.actions: dict[str, asyncio.Task[None]] = {}
        self.peer_lost_seen: dict[str, float] = {}
        self.next_launch: dict[str, float] = {}
        self.launch_attempts: dict[str, int] = {}
        self.wake = asyncio.Event()
        self.discovered = False
        self.health_port: int | None = None
        self._flush: asyncio.Task[None] | None = None
        # uid -> the renewal news being sent to that replicator (see _push_lease_news).
        self.lease_pushes: dict[str, asyncio.Task[None]] = {}
        self._info_at = 0.0
        # `xl list` runs started, and which of them `domains` comes from (see _refresh_domains).
        self._listings = 0
        self._domains_from = 0
        # Per replication: how many actions have completed (see Attached.seen_actions).
        self.completed: dict[str, int] = {}
        # (uid, action) -> spacing of retries after failures (see RETRY_FIRST).
        self.retries: dict[tuple[str, str], Retry] = {}
        # uid -> resourceVersion a designation of ours was based on, when it got no answer:
        # it may still land while the fencing Lease is at that version (leases.Cas).
        self.designation_doubt: dict[str, str] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Until `stop` is set (or cancelled). Replicators are left running on the way out."""
        stop = stop or asyncio.Event()
        server = HealthServer(
            self.health,
            self.metrics,
            host=self.settings.health_bind_address,
            port=self.settings.health_port,
            clock=self.clock,
        )
        tasks: list[asyncio.Task[Any]] = []
        try:
            if self.settings.health_port >= 0:
                self.health_port = await server.start()
            await self._start_listener()
            self.records = state.load_all(self.settings.run_dir)
            await self.refresh_host()
            await self.discover()
            for name, coro in (
                ("renewer", self.renewer.run()),
                ("host-leases", self.hosts.run()),
                ("xenreplications", self.xrs.run()),
                ("report", self.reporter.run(self.collect_status)),
                ("xenstore", self._watch_xenstore()),
                ("loop", self._loop()),
            ):
                tasks.append(asyncio.create_task(coro, name=name))
            stopper = asyncio.create_task(stop.wait(), name="stop")
            done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            for task in done:
                if task is not stopper and not task.cancelled() and task.exception():
                    raise RuntimeError(f"agent task {task.get_name()} died") from task.exception()
        finally:
            pending = [
                *tasks,
                *self.actions.values(),
                *self.lease_pushes.values(),
                *(t for _, t in self.fence_leases.values()),
            ]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            if self.listener is not None:
                await self.listener.close()
            await server.stop()
            await self.kube.close()

    async def _start_listener(self) -> None:
        """The node's relay port: the first free one in the configured range."""
        self.settings.run_dir.mkdir(parents=True, exist_ok=True)
        host = self.settings.relay_bind_address
        if ":" in host:
            host = f"[{host}]"
        last: OSError | None = None
        for port in range(self.settings.relay_port_min, self.settings.relay_port_max + 1):
            listener = NodeListener(self.settings.run_dir, f"{host}:{port}")
            try:
                await listener.start()
            except OSError as e:
                last = e
                continue
            self.listener, self.relay_port = listener, listener.port
            log.info(
                "relay listener on %s",
                self.settings.relay_endpoint_for(self.relay_port or self.settings.relay_port_min),
            )
            return
        raise OSError(f"no free relay port in the configured range: {last}")

    async def _watch_xenstore(self) -> None:
        if not self.settings.xenstore_socket.exists():
            log.info("no XenStore socket at %s; domains are polled", self.settings.xenstore_socket)
            await asyncio.Event().wait()
        await self.xenstore.watch_domains(self._domains_changed)

    def _domains_changed(self) -> None:
        self.reporter.wake.set()
        self.wake.set()

    def _xr_changed(self, key: str, obj: Obj | None) -> None:
        self.views = {
            v.uid: v for o in self.xrs.items.values() if (v := replication_view(o)) is not None
        }
        self.wake.set()

    def _renewed(self, ok: bool) -> None:
        self.metrics.lease_renewals.labels("success" if ok else "failure").inc()
        if ok and self.events.backlog and (self._flush is None or self._flush.done()):
            # The API answers again: post the Events of what happened without it.
            self._flush = asyncio.create_task(self.events.flush(), name="events-backlog")
        if ok:
            self._push_lease_news()
        self.wake.set()

    def _push_lease_news(self, only: str | None = None) -> None:
        """Tell every replicator about a renewal as soon as it happened.

        Replicators pause their guest on stale renewal news, so the news must not wait for the
        loop: one pass waits for the slowest of the host's replicators (seconds under load),
        and with it every guest on the host would go stale and pause. Each replicator gets its
        own send; a slow one delays only itself. The loop's poll calls it too, for a
        replicator that missed the news (just launched, or busy when it was sent)."""
        for uid in [u for u, t in self.lease_pushes.items() if t.done()]:
            if uid not in self.replicators:
                del self.lease_pushes[uid]
        for uid, att in list(self.replicators.items()):
            if only is not None and uid != only:
                continue
            in_flight = self.lease_pushes.get(uid)
            if in_flight is None or in_flight.done():
                self.lease_pushes[uid] = asyncio.create_task(
                    self._send_lease_news(uid, att), name=f"lease-news-{uid}"
                )

    async def _send_lease_news(self, uid: str, att: Attached) -> None:
        # Loop so that a renewal landing while a send is in flight is sent right after it.
        while True:
            renewed = self.renewer.last_renewal
            if renewed is None or renewed == att.lease_sent or self.replicators.get(uid) is not att:
                return
            try:
                await att.client.lease(renewed, self._lease_duration(uid))
            except (ReplicatorUnavailable, ReplicatorError):
                return  # the loop's poll retries
            att.lease_sent = renewed

    async def refresh_host(self) -> None:
        """Domains, and Xen info now and then; on xl errors the last known values stay."""
        await self._refresh_domains()
        now = self.clock()
        if self.info is not None and now - self._info_at < INFO_PERIOD:
            return
        try:
            self.info = await self.xl.info()
            self._info_at = now
        except (XlError, ValueError, OSError) as e:
            log.warning("xl info failed: %s", e)
        if self.colo_supported is None and self.info is not None:
            # `xl help remus` lists -c even where libxl is built without COLO (Debian): what
            # xl said when it was asked for COLO before (see _note_refusals) overrides it.
            if colo_refused_before(self.settings.run_dir, _xen_build(self.info)) is not None:
                self.colo_supported = False
            else:
                caps = self.info.virt_caps
                self.colo_supported = await self.xl.supports_colo() and "hvm" in caps

    async def _refresh_domains(self) -> None:
        self._listings += 1
        started = self._listings
        try:
            listed = {d.name: d for d in await self.xl.list_domains()}
        except (XlError, ValueError, OSError) as e:
            log.warning("xl list failed: %s", e)
            return
        # Listings overlap (the reporter's, an action's): one that began before the listing
        # in use may predate a pause or a destroy in between, and must not undo it.
        if started > self._domains_from:
            self.domains, self._domains_from = listed, started

    async def discover(self) -> None:
        """Attach to replicators left by a previous agent (their sockets in the run dir)."""
        run_dir = self.settings.run_dir
        for uid in existing_uids(run_dir):
            path = control_socket_path(run_dir, uid)
            if await asyncio.to_thread(socket_alive, path) is False:
                log.info("replicator uid=%s is gone; removing its files", uid)
                forget(run_dir, uid)
                continue
            att = Attached(self.connect(path))
            with contextlib.suppress(ReplicatorUnavailable, ReplicatorError):
                att.status = parse_status(await att.client.status())
            self.replicators[uid] = att
            log.info(
                "re-attached replicator uid=%s state=%s",
                uid,
                att.status.state if att.status else "unknown",
            )
        self.discovered = True

    # -- the loop ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            self.wake.clear()
            self.health.last_tick = self.clock()
            await self._poll_replicators()
            self._sync_fence_leases()
            self.renewer.set_durations(self._lease_duration(u) for u in self._participating())
            if self.xrs.synced.is_set() and self.discovered:
                self._decide()
            self._housekeeping()
            self._update_health_and_metrics()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.tick):
                    await self.wake.wait()

    async def _poll_replicators(self) -> None:
        async def poll(uid: str, att: Attached) -> None:
            completed = self.completed.get(uid, 0)
            try:
                att.status = parse_status(await att.client.status())
                att.failures = 0
                att.seen_actions = completed
            except ReplicatorUnavailable as e:
                path = control_socket_path(self.settings.run_dir, uid)
                starting = (
                    att.launched_at is not None
                    and self.clock() - att.launched_at < REPLICATOR_START_GRACE
                )
                # A replicator just launched has no socket yet: that is not an exit.
                if not starting and await asyncio.to_thread(socket_alive, path) is False:
                    log.info("replicator uid=%s exited", uid)
                    self.replicators.pop(uid, None)
                    forget(self.settings.run_dir, uid)
                    self._schedule_launch(uid)
                    return
                att.failures += 1
                if att.failures in (1, 10, 100):
                    log.warning("replicator uid=%s does not answer: %s", uid, e)
                return
            except ReplicatorError as e:
                log.warning("replicator uid=%s refused status: %s", uid, e)
                return
            self._push_lease_news(uid)

        await asyncio.gather(*(poll(uid, att) for uid, att in list(self.replicators.items())))

    def _lease_duration(self, uid: str) -> float:
        view, record = self.views.get(uid), self.records.get(uid)
        if view is not None:
            return view.lease_duration
        if record is not None:
            return record.lease_duration
        return self.settings.idle_lease_duration

    def _participating(self) -> dict[str, tuple[str, str]]:
        """uid -> (namespace, name) of every replication this node has to do with."""
        out = {uid: (r.namespace, r.name) for uid, r in self.records.items()}
        for uid, view in self.views.items():
            if view.takes_part(self.me):
                out[uid] = (view.namespace, view.name)
        return out

    def _sync_fence_leases(self) -> None:
        wanted = self._participating()
        for uid in list(self.fence_leases):
            if uid not in wanted:
                _, task = self.fence_leases.pop(uid)
                task.cancel()
        for uid, (namespace, name) in wanted.items():
            if uid in self.fence_leases:
                continue
            reflector = Reflector(
                self.kube,
                leases_path(namespace),
                name=f"{name}-fence",
                on_change=lambda key, obj: self.wake.set(),
            )
            task = asyncio.create_task(reflector.run(), name=f"fence-lease-{namespace}-{name}")
            self.fence_leases[uid] = (reflector, task)

    def _fence_lease_object(self, uid: str) -> Obj | None:
        entry = self.fence_leases.get(uid)
        if entry is None or not entry[0].synced.is_set():
            return None
        return next(iter(entry[0].items.values()), None)

    def _fence_lease(self, uid: str) -> FencingLease | None:
        """The fencing Lease as last seen; None before the first read (or if it is gone)."""
        lease = self._fence_lease_object(uid)
        if lease is None:
            return None
        return FencingLease(holder=lease_holder(lease), standby=lease_standby(lease))

    def _designation_in_doubt(self, uid: str) -> bool:
        """A designation of ours got no answer and may still land: the Lease is still at the
        version it was based on. Any other version settles it (landed, and shown; or never)."""
        base = self.designation_doubt.get(uid)
        if base is None:
            return False
        lease = self._fence_lease_object(uid)
        if lease is not None and resource_version(lease) != base:
            del self.designation_doubt[uid]
            return False
        return True

    def _fencing_due(self, uid: str) -> bool:
        """The watchdog: this node runs the guest, unpaused, its host-Lease renewals are older
        than D - margin, and a standby could take over. Checked on every pass, even while
        another action on the replication is in flight (that action is then called off)."""
        record = self.records.get(uid)
        if record is None or record.fenced or not self.renewer.first_attempt.is_set():
            return False
        copy = self.domains.get(record.domain)
        if copy is None or copy.paused:
            return False
        lease = self._fence_lease(uid)
        if lease is not None and lease.holder not in (None, self.me):
            return False  # not ours to pause: the ordinary decision destroys it
        view = self._renewals_view(uid, lease, self._designation_in_doubt(uid))
        return not renewal_fresh(view) and takeover_possible(view)

    def _renewal_fresh(self, uid: str) -> bool:
        return renewal_fresh(self._renewals_view(uid))

    def _renewals_view(
        self, uid: str, lease: FencingLease | None = None, designation_in_doubt: bool = False
    ) -> ActiveView:
        """What the watchdog weighs: this node's renewals against the replication's D."""
        return ActiveView(
            now=self.clock(),
            me=self.me,
            lease_duration=self._lease_duration(uid),
            peer_lost_at=None,
            own_last_renewal=self.renewer.last_renewal,
            lease=lease,
            designation_in_doubt=designation_in_doubt,
        )

    # -- retries ----------------------------------------------------------------------------

    def _may_try(self, uid: str, what: str) -> bool:
        retry = self.retries.get((uid, what))
        return retry is None or self.clock() >= retry.not_before

    def _failed(self, uid: str, what: str, error: str, *, longest: float = RETRY_MAX) -> bool:
        """Space the next attempt out; log when the failure starts or changes, not on every
        attempt. True when this is news (a first failure, or a different one)."""
        retry = self.retries.setdefault((uid, what), Retry())
        retry.failures += 1
        delay = min(RETRY_FIRST * 2 ** min(retry.failures - 1, 10), longest)
        retry.not_before = self.clock() + delay
        if error == retry.error:
            return False
        log.warning(
            "uid=%s: %s failed: %s (retrying, at most %gs apart)", uid, what, error, longest
        )
        retry.error = error
        return True

    def _succeeded(self, uid: str, what: str) -> None:
        retry = self.retries.pop((uid, what), None)
        if retry is not None:
            log.info("uid=%s: %s done after %d failed attempts", uid, what, retry.failures)

    def _answered(self, uid: str, what: str, got: Cas) -> bool:
        """Whether a fencing-Lease write got an answer (any: won, lost, refused); if not, the
        next attempt is spaced out as `_failed` says."""
        if got.outcome is Outcome.UNAVAILABLE:
            self._failed(uid, what, f"{got.outcome.value} {got.reason}".strip())
            return False
        self._succeeded(uid, what)
        return True

    # -- decisions --------------------------------------------------------------------------

    def _decide(self) -> None:
        stale = {
            uid
            for uid, att in self.replicators.items()
            if att.seen_actions != self.completed.get(uid, 0)
        }
        for uid in sorted(set(self._participating()) | set(self.replicators)):
            if uid not in self.actions and uid not in stale:
                self._decide_fencing(uid)
            elif uid not in self.actions and self._fencing_due(uid) and self._may_try(uid, "pause"):
                # The status predates the last action; the pause needs none of it.
                self._act(uid, self._fence(uid, "LeaseRenewalStale"), watchdog=False)
        # Not acted on this pass: an action runs, or its effect is not in a status read yet.
        busy = set(self.actions) | stale
        self._note_refusals()
        local = {}
        for uid, att in self.replicators.items():
            st, record = att.status, self.records.get(uid)
            role = st.role if st is not None and st.role else record.role if record else None
            if role is None:
                continue
            # Settled: the Lease is ours and names no standby, so nobody can take over and
            # the replicator's self-fence is no longer needed.
            lease = self._fence_lease(uid)
            settled = lease is not None and lease.holder == self.me and lease.standby is None
            local[uid] = LocalReplicator(
                uid,
                role,
                st.state if st is not None else None,
                st.peer_connected if st is not None else False,
                settled,
                st.reason if st is not None else None,
            )
        steps = plan(
            me=self.me,
            replications=self.views,
            replicators=local,
            domains={name: d.state for name, d in self.domains.items()},
            guards={
                uid: self._guard(uid)
                for uid, view in self.views.items()
                if uid not in self.replicators and view.role_of(self.me) is Role.PRIMARY
            },
            colo_supported=self.colo_supported,
            colo_refused=set(self.colo_refused),
        )
        now = self.clock()
        for step in steps:
            if step.uid in busy:
                continue
            if not isinstance(step, Stop) and step.uid in self.replicators:
                continue  # one replicator per replication; its incoming copy is its own
            if isinstance(step, Launch):
                if now < self.next_launch.get(step.uid, 0.0):
                    continue
                self._act(step.uid, self._launch(step.uid, step.role))
            elif isinstance(step, Stop):
                self._act(step.uid, self._stop(step.uid, step.reason))
            elif isinstance(step, ClearIncoming):
                self._act(step.uid, self._destroy_domain(step.domain))
            elif isinstance(step, Unpause) and self._may_try(step.uid, "unpause"):
                self._act(step.uid, self._unpause_guest(step.uid, step.domain))

    def _guard(self, uid: str) -> Guard:
        """What the plan may know of fencing's view of a copy here (see plan.Guard)."""
        lease, record = self._fence_lease(uid), self.records.get(uid)
        return Guard(
            holder=lease.holder if lease is not None else None,
            standby=lease.standby if lease is not None else None,
            renewal_fresh=self._renewal_fresh(uid),
            fenced=record is not None and (record.fenced or record.handover_paused_at is not None),
            recorded=record is not None,
            designation_in_doubt=self._designation_in_doubt(uid),
        )

    def _note_refusals(self) -> None:
        """Learn from replicators whose xl refused COLO: the replication is not retried
        (until its mode changes) and, when this host's libxl lacks COLO, the XenNode says so
        (xen.coloSupported: false), for good."""
        for uid, att in self.replicators.items():
            st = att.status
            if st is None or st.colo_refused is None or uid in self.colo_refused:
                continue
            record = self.records.get(uid)
            role = st.role or (record.role if record is not None else Role.PRIMARY)
            self.colo_refused[uid] = ColoRefused(
                role, st.colo_refused, colo_message(self.me, st.colo_refused)
            )
            log.warning("uid=%s: xl refused COLO; not retried: %s", uid, st.colo_refused)
            if colo_refusal(st.colo_refused) == "host" and self.colo_supported is not False:
                self.colo_supported = False
                if self.info is not None:
                    save_colo_refusal(
                        self.settings.run_dir,
                        xen_version=_xen_build(self.info),
                        line=st.colo_refused,
                    )
                log.warning("this host's libxl lacks COLO (coloSupported: false)")
            self.reporter.wake.set()
        for uid, xr in self.views.items():
            # Known before any xl was asked (after a restart, say): nothing starts, and the
            # entry says why rather than that no replicator runs.
            wanted = xr.role_of(self.me)
            if (
                self.colo_supported is False
                and xr.spec.mode is Mode.COLO
                and wanted is not None
                and uid not in self.colo_refused
                and uid not in self.replicators
            ):
                self.colo_refused[uid] = ColoRefused(
                    wanted,
                    "",
                    f"{self.me} cannot run COLO (xen.coloSupported: false): not started; "
                    "use mode remus",
                )
        for uid in list(self.colo_refused):
            known = self.views.get(uid)
            gone = known is None and self.xrs.synced.is_set()
            if gone or (
                known is not None
                and (known.spec.mode is not Mode.COLO or not known.takes_part(self.me))
            ):
                del self.colo_refused[uid]  # deleted, moved, or no longer asking for COLO

    async def _unpause_guest(self, uid: str, domain: str) -> None:
        """The plan's Unpause: the primary's guest is paused, though not by a fence of ours,
        and running it is safe. As for lifting a fence, first a write of the fencing Lease
        that lands only while it is ours (a takeover in flight makes it fail), then unpause."""
        record = self.records.get(uid)
        if record is None or record.fenced:
            return
        got = await reassert_holder(
            self.kube, record.namespace, record.fence_lease, self.me, wallclock=self.wallclock
        )
        if not got.won:
            self._failed(uid, "unpause", f"fencing Lease: {got.outcome.value} {got.reason}")
            return
        error = await self._unpause(uid, record)
        await self._refresh_domains()
        if error is not None:
            if self._failed(uid, "unpause", error):
                await self._emit(
                    uid, GUEST_UNPAUSED, f"{domain} stays paused: {error}; retrying", warning=True
                )
            return
        self._succeeded(uid, "unpause")
        await self._emit(
            uid,
            GUEST_UNPAUSED,
            f"unpaused {domain} on {self.me}: paused, not by this agent's fence, while the "
            "fencing Lease is ours and names no standby; it will be protected again",
        )

    def _act(self, uid: str, coro: Coroutine[Any, Any, None], *, watchdog: bool = True) -> None:
        """Run one action on a replication; none other runs on it meanwhile.

        `watchdog`: the action is called off as soon as the watchdog wants the guest paused
        (see `_fencing_due`), so that no API call hanging on an unreachable server (10 s)
        holds a pause up. Pauses and destroys themselves are never called off.
        """

        async def guarded() -> None:
            task = asyncio.ensure_future(coro)
            try:
                while True:
                    done, _ = await asyncio.wait({task}, timeout=min(self.settings.tick, 0.1))
                    if done:
                        task.result()
                        break
                    if watchdog and self._fencing_due(uid):
                        log.warning(
                            "uid=%s: %s called off: host-Lease renewals are stale, the guest "
                            "is paused first",
                            uid,
                            getattr(coro, "__name__", "action"),
                        )
                        task.cancel()
                        # Not `await task`: its CancelledError would hide our own.
                        await asyncio.wait({task})
                        break
            except asyncio.CancelledError:
                task.cancel()
                raise
            except Exception:
                log.exception("action on replication uid=%s failed", uid)
            finally:
                self.completed[uid] = self.completed.get(uid, 0) + 1
                self.actions.pop(uid, None)
                self.reporter.wake.set()
                self.wake.set()

        self.actions[uid] = asyncio.create_task(guarded(), name=f"action-{uid}")

    def _peer_lost_at(self, uid: str, status: ReplicatorStatus | None) -> float | None:
        """When the relay lost the peer; None while connected or before it ever connected."""
        if status is not None:
            if status.peer_connected or not status.ever_connected:
                self.peer_lost_seen.pop(uid, None)
                return None
            if status.peer_lost_at is not None:
                return status.peer_lost_at
        # No replicator (or one that does not say): lost since we noticed.
        return self.peer_lost_seen.setdefault(uid, self.clock())

    def _decide_fencing(self, uid: str) -> None:
        record, view = self.records.get(uid), self.views.get(uid)
        att = self.replicators.get(uid)
        status = att.status if att else None
        if record is None:
            return  # no copy of ours: nothing to fence
        lease = self._fence_lease(uid)
        duration = self._lease_duration(uid)
        now = self.clock()
        if (
            att is not None
            and status is not None
            and status.role is Role.SECONDARY
            and status.state in _STANDBY_STATES
            and not att.dropped
        ):
            self._decide_standby(uid, view, record, status, lease, duration, now)
            return
        copy = self.domains.get(record.domain)
        if copy is not None:
            self._decide_active(uid, view, record, status, copy, lease, duration, now)

    def _decide_standby(
        self,
        uid: str,
        view: ReplicationView | None,
        record: CopyRecord,
        status: ReplicatorStatus,
        lease: FencingLease | None,
        duration: float,
        now: float,
    ) -> None:
        holder = lease.holder if lease is not None else None
        decision = decide_standby(
            StandbyView(
                now=now,
                me=self.me,
                lease_duration=duration,
                peer_lost_at=self._peer_lost_at(uid, status),
                lease=lease,
                holder_lease=self.hosts.observation(holder) if holder else None,
                automatic=record.automatic,
                has_checkpoint=status.has_checkpoint or status.state is ReplicatorState.REPLICATING,
            )
        )
        if decision.action is StandbyAction.ACQUIRE:
            if not self._may_try(uid, "take over"):
                return
            # A hand-over: the active gave us the Lease during a switchover it was asked for.
            planned = view is not None and view.switchover_target == self.me and holder == self.me
            if (uid, "take over") not in self.retries:
                log.info("standby uid=%s: acquire (%s)", uid, decision.reason)
            self._act(uid, self._activate(uid, judged=holder, planned=planned))
        elif decision.action is StandbyAction.DROP_COPY:
            log.info("standby uid=%s: drop copy (%s)", uid, decision.reason)
            self._act(uid, self._drop(uid, decision.reason))

    def _decide_active(
        self,
        uid: str,
        view: ReplicationView | None,
        record: CopyRecord,
        status: ReplicatorStatus | None,
        copy: Domain,
        lease: FencingLease | None,
        duration: float,
        now: float,
    ) -> None:
        if not self.renewer.first_attempt.is_set():
            return
        holder = lease.holder if lease is not None else None
        if status is not None and status.fenced and not record.fenced:
            # The replicator paused the guest on its own (its deadline passed while no agent
            # fed it renewals): adopt that pause, so exactly one unpause lifts it.
            record.fenced = True
            state.save(self.settings.run_dir, record)
        if record.fenced and not copy.paused and holder in (self.me, None):
            # Recorded as fenced but running (the pause never happened): pause it now.
            if self._may_try(uid, "pause"):
                self._act(uid, self._fence(uid, FENCE_NOT_IN_PLACE), watchdog=False)
            return
        primary = status is not None and status.role is Role.PRIMARY
        standby = view.standby_node if view is not None else None
        handing_over = self._handing_over(view, record)
        decision = decide_active(
            ActiveView(
                now=now,
                me=self.me,
                lease_duration=duration,
                peer_lost_at=self._peer_lost_at(uid, status),
                own_last_renewal=self.renewer.last_renewal,
                lease=lease,
                standby=standby if standby != self.me else None,
                standby_has_checkpoint=primary
                and status is not None
                and (status.peer_checkpoints or 0) > 0,
                output_held=self._output_held(uid),
                fenced=record.fenced,
                designation_in_doubt=self._designation_in_doubt(uid),
            )
        )
        action = decision.action
        retried = {
            ActiveAction.DESTROY: "destroy",
            ActiveAction.PAUSE: "pause",
            ActiveAction.REVOKE: "revoke standby",
            ActiveAction.DEGRADE: "degrade",
            ActiveAction.RESUME: "resume",
            ActiveAction.DESIGNATE: "designate standby",
        }.get(action)
        if retried is not None and not self._may_try(uid, retried):
            return
        if action is ActiveAction.DESTROY:
            self._act(uid, self._destroy(uid, holder), watchdog=False)
        elif action is ActiveAction.PAUSE:
            self._act(uid, self._fence(uid, decision.reason), watchdog=False)
        elif action is ActiveAction.REVOKE:
            self._act(uid, self._revoke(uid))
        elif action is ActiveAction.DEGRADE:
            self._act(uid, self._degrade(uid))
        elif action is ActiveAction.RESUME and not handing_over:
            self._act(uid, self._resume(uid))
        elif action is ActiveAction.DESIGNATE and standby is not None and not handing_over:
            self._act(uid, self._designate(uid, standby))
        elif (
            handing_over
            and holder == self.me
            and standby is not None
            and self._may_try(uid, "hand over")
        ):
            self._act(uid, self._hand_over(uid, standby))

    def _output_held(self, uid: str) -> bool:
        """Whether the primary replicator still holds the output it buffered at the loss."""
        att = self.replicators.get(uid)
        status = att.status if att is not None else None
        if att is None or status is None or status.role is not Role.PRIMARY:
            return False
        if status.output_held is not None:
            return status.output_held
        # A fence pauses the guest but keeps the transport: held until degraded.
        return (
            not att.degraded
            and status.ever_connected
            and not status.peer_connected
            and status.state in (ReplicatorState.PEER_LOST, ReplicatorState.FENCED)
        )

    def _handing_over(self, view: ReplicationView | None, record: CopyRecord) -> bool:
        """A planned switchover from this node to its standby is in progress, and possible:
        the stream to the standby is up."""
        if view is None or view.switchover_target is None:
            if record.handover_paused_at is not None:
                # The switchover ended without the hand-over (it failed or was withdrawn):
                # the guest is ours again, and resumes by the ordinary rule.
                record.handover_paused_at = None
                state.save(self.settings.run_dir, record)
            return False
        att = self.replicators.get(record.uid)
        status = att.status if att is not None else None
        # Without the stream the standby's copy is no longer current: the ordinary rules take
        # over (revoke it, release the held output, resume the guest), and the hand-over
        # starts again, with a new pause, once a new stream is up.
        return (
            view.active_node == self.me
            and view.switchover_target == view.standby_node
            and status is not None
            and status.peer_connected
        )

    # -- actions ----------------------------------------------------------------------------

    async def _emit(self, uid: str, reason: str, message: str, warning: bool = False) -> None:
        namespace, name = self._participating().get(uid, ("", ""))
        if namespace:
            await self.events.emit(
                namespace=namespace,
                name=name,
                uid=uid,
                reason=reason,
                message=message,
                type_="Warning" if warning else "Normal",
            )

    async def _activate(self, uid: str, *, judged: str | None, planned: bool) -> None:
        """Take the fencing Lease (unless it names us already), then activate the copy."""
        record, att = self.records.get(uid), self.replicators.get(uid)
        if record is None or att is None or judged is None:
            return
        if judged != self.me:

            async def holder_silent() -> bool:
                # The watch may lag, or have been cut off while the API was unreachable, or
                # have delivered a renewal since we decided: any renewal within the last D
                # calls the takeover off.
                if not await self.hosts.silent_for(judged, self._lease_duration(uid)):
                    log.info("uid=%s: %s renewed after all; no takeover", uid, judged)
                    return False
                return True

            got = await acquire_fencing_lease(
                self.kube,
                record.namespace,
                record.fence_lease,
                self.me,
                expected_holder=judged,
                holder_silent=holder_silent,
                wallclock=self.wallclock,
            )
            if not self._answered(uid, "take over", got):
                return
            if not got.won:
                log.info("uid=%s: no takeover: %s %s", uid, got.outcome.value, got.reason)
                if got.outcome is Outcome.LOST and got.holder not in (None, self.me):
                    await self._emit(
                        uid,
                        ev.FENCING_LEASE_LOST,
                        f"{got.holder} holds the fencing Lease; not activating",
                        warning=True,
                    )
                return
        else:
            # The Lease named us when we decided; a fresh read must say so too.
            try:
                lease = await self.kube.get(leases_path(record.namespace, record.fence_lease))
            except ApiError as e:
                self._failed(uid, "take over", f"fencing Lease unreadable: {e}")
                return
            self._succeeded(uid, "take over")
            if lease_holder(lease) != self.me:
                return
        # Whom we take over from: the holder we judged; when the Lease named us already (a
        # hand-over, or a retry after a restart), the node the status still calls active.
        previous = judged if judged != self.me else None
        view = self.views.get(uid)
        if previous is None and view is not None and view.active_node != self.me:
            previous = view.active_node
        lost_at = self._peer_lost_at(uid, att.status)
        try:
            await att.client.activate()
        except (ReplicatorError, ReplicatorUnavailable) as e:
            # Holding the Lease, so retried on the next pass (AlreadyHolder).
            log.warning("uid=%s: replicator did not activate: %s", uid, e)
            return
        failover = FailoverRecord.model_validate(
            {
                "time": self.wallclock(),
                "from": previous or "",
                "to": self.me,
                "reason": "Switchover" if planned else "NodeLost",
                "durationMs": int(max(0.0, self.clock() - lost_at) * 1000) if lost_at else None,
            }
        )
        record.failover = failover.to_api()
        state.save(self.settings.run_dir, record)
        self.metrics.failovers.labels(record.namespace, record.name).inc()
        if planned:
            await self._emit(
                uid, ev.SWITCHOVER_ACTIVATED, f"took over {record.domain} from {previous}"
            )
        else:
            await self._emit(
                uid,
                ev.FAILOVER_ACTIVATED,
                f"activated the copy of {record.domain} on {self.me}: {previous} silent for "
                f"{record.lease_duration:g}s and the relay lost it",
            )

    async def _designate(self, uid: str, standby: str) -> None:
        record = self.records[uid]
        got = await designate_standby(
            self.kube, record.namespace, record.fence_lease, self.me, standby
        )
        if not self._answered(uid, "designate standby", got):
            if got.in_doubt_at is not None:
                # Sent, unanswered: until the Lease moves past the version this write was
                # conditional on, a standby may be named without our knowing it.
                self.designation_doubt[uid] = got.in_doubt_at
            return
        self.designation_doubt.pop(uid, None)
        if got.won:
            log.info("uid=%s: %s designated as the valid standby", uid, standby)
        else:
            log.info("uid=%s: designate %s: %s %s", uid, standby, got.outcome.value, got.reason)

    async def _revoke(self, uid: str) -> None:
        """The stream is lost: make any takeover impossible before the output is released."""
        record = self.records[uid]
        # A designation in doubt is killed by any write that moves the Lease on.
        in_doubt = self._designation_in_doubt(uid)
        got = await revoke_standby(
            self.kube,
            record.namespace,
            record.fence_lease,
            self.me,
            touch=in_doubt,
            wallclock=self.wallclock,
        )
        if not self._answered(uid, "revoke standby", got):
            return
        if got.won:
            self.designation_doubt.pop(uid, None)
            log.info("uid=%s: standby revoked: no takeover is possible any more", uid)
        else:
            # LOST: the next pass reads the new holder and destroys this copy.
            log.info("uid=%s: revoke standby: %s %s", uid, got.outcome.value, got.reason)

    async def _degrade(self, uid: str) -> None:
        """Release the output the replicator held: the guest runs on, unprotected."""
        att = self.replicators.get(uid)
        if att is None:
            return
        try:
            await att.client.request({"op": "degrade"})
        except (ReplicatorError, ReplicatorUnavailable) as e:
            self._failed(uid, "degrade", str(e))
            return
        self._succeeded(uid, "degrade")
        att.degraded = True
        record = self.records[uid]
        await self._emit(
            uid,
            ev.DEGRADED,
            f"{record.domain} runs unprotected on {self.me}: the stream to the standby is "
            "lost and the standby's copy is no longer valid",
            warning=True,
        )

    async def _drop(self, uid: str, reason: str) -> None:
        att, record = self.replicators.get(uid), self.records.get(uid)
        if att is None or record is None:
            return
        # Last look: a hand-over (or a takeover already won) makes this copy the one to keep.
        with contextlib.suppress(ApiError):
            lease = await self.kube.get(leases_path(record.namespace, record.fence_lease))
            if lease_holder(lease) == self.me:
                return
        await att.client.drop()
        att.dropped = True
        self.metrics.copies_dropped.labels(record.namespace, record.name).inc()
        await self._emit(
            uid,
            ev.COPY_DROPPED,
            f"dropped the standby copy on {self.me} ({reason}): the active node is alive and "
            "runs unprotected until re-protection",
            warning=True,
        )

    async def _pause(self, uid: str, record: CopyRecord) -> bool:
        """Pause the guest once: through a primary replicator (which checks that it will
        not pause twice), else with xl; then check with xl that it is paused. Then list the
        domains again: every decision after a pause must see it (a guest recorded as fenced
        but listed as running is paused again, as a fence that is not in place).
        True when the listing shows the guest paused (or gone)."""
        try:
            att = self.replicators.get(uid)
            if att is not None and att.status is not None and att.status.role is Role.PRIMARY:
                try:
                    reply = await att.client.fence()
                    if reply.get("pauseExit", 0) != 0:
                        log.warning(
                            "uid=%s: replicator's xl pause exited %s; pausing with xl",
                            uid,
                            reply.get("pauseExit"),
                        )
                except (ReplicatorError, ReplicatorUnavailable) as e:
                    log.warning("uid=%s: replicator could not fence (%s); pausing with xl", uid, e)
            # xl pause nests: pause only what xl shows running (`--pss-`, paused mid-checkpoint,
            # reads as paused).
            domain = await self.xl.domain(record.domain)
            if domain is not None and not domain.paused:
                await self.xl.pause(record.domain)
        except XlError as e:
            log.warning("uid=%s: xl could not pause %s: %s", uid, record.domain, e)
        finally:
            await self._refresh_domains()
        copy = self.domains.get(record.domain)
        return copy is None or copy.paused

    async def _fence(self, uid: str, reason: str) -> None:
        record = self.records[uid]
        # Written before the pause: after a crash in between, the record says fenced and the
        # loop pauses a running guest, never the other way round.
        record.fenced = True
        state.save(self.settings.run_dir, record)
        if not await self._pause(uid, record):
            # Still running: FenceNotInPlace on the next passes, spaced and logged once.
            self._failed(uid, "pause", "the guest still runs", longest=PAUSE_RETRY_MAX)
            return
        self._succeeded(uid, "pause")
        self.metrics.fences.labels(record.namespace, record.name, "pause").inc()
        if reason == FENCE_NOT_IN_PLACE:
            why = "it was recorded as fenced but found running"
        else:
            stale = pause_after(record.lease_duration)
            why = f"no host Lease renewal for {stale:g}s and a standby could take over"
        await self._emit(
            uid,
            ev.SELF_FENCED,
            f"paused {record.domain} on {self.me}: {why} ({reason})",
            warning=True,
        )

    async def _resume(self, uid: str) -> None:
        """Lift our own fence: renewals are fresh and the fencing Lease is ours.

        First a write of the fencing Lease that lands only while it is ours: a standby that
        judged us silent may have its takeover in flight, and this write makes exactly one of
        the two land. Then unpause (the replicator first: its own watchdog trusts its flag),
        and check with xl. A failure leaves the guest paused and is retried, spaced out.
        """
        record = self.records[uid]
        got = await reassert_holder(
            self.kube, record.namespace, record.fence_lease, self.me, wallclock=self.wallclock
        )
        if not got.won:
            # LOST: the next pass reads the new holder and destroys this copy.
            self._failed(uid, "resume", f"fencing Lease: {got.outcome.value} {got.reason}".strip())
            return
        error = await self._unpause(uid, record)
        if error is not None:
            if self._failed(uid, "resume", error):
                await self._emit(
                    uid,
                    FENCE_LIFT_FAILED,
                    f"{record.domain} stays paused on {self.me}: {error}; retrying",
                    warning=True,
                )
            return
        self._succeeded(uid, "resume")
        record.fenced = False
        state.save(self.settings.run_dir, record)
        await self._refresh_domains()
        await self._emit(
            uid, ev.FENCE_LIFTED, f"resumed {record.domain}: the fencing Lease is still ours"
        )

    async def _unpause(self, uid: str, record: CopyRecord) -> str | None:
        """Unpause the guest; None when xl shows it running, else why not."""
        stale = "host-Lease renewals went stale again"
        if not self._renewal_fresh(uid):
            return stale
        att = self.replicators.get(uid)
        if att is not None and att.status is not None and att.status.role is Role.PRIMARY:
            try:
                # With the renewal it may rely on: it refuses to unpause on stale news.
                reply = await att.client.request(
                    {
                        "op": "unfence",
                        "lastRenewedMonotonic": self.renewer.last_renewal,
                        "durationS": self._lease_duration(uid),
                    }
                )
            except (ReplicatorError, ReplicatorUnavailable) as e:
                return f"the replicator did not unfence: {e}"
            if reply.get("unpauseExit", 0) != 0:
                return f"the replicator's xl unpause exited {reply.get('unpauseExit')}"
        # Unpause until it runs: a pause of unknown origin (or a nested one) must not leave it
        # stuck.
        try:
            for _ in range(3):
                domain = await self.xl.domain(record.domain)
                if domain is None or not domain.paused:
                    return None
                if not self._renewal_fresh(uid):
                    return stale
                await self.xl.unpause(record.domain)
            domain = await self.xl.domain(record.domain)
        except XlError as e:
            return f"xl: {e}"
        if domain is None or not domain.paused:
            return None
        return "still paused after three unpauses"

    async def _destroy(self, uid: str, holder: str | None) -> None:
        record = self.records[uid]
        # Last look, destroying being final: the Lease as watched may lag our own takeover
        # (a copy just activated here). Unreadable: pause the copy instead, which is as safe
        # and can be undone, and destroy once the Lease can be read.
        try:
            lease = await self.kube.get(leases_path(record.namespace, record.fence_lease))
        except NotFound:
            pass
        except ApiError as e:
            self._failed(uid, "destroy", f"fencing Lease unreadable: {e}")
            copy = self.domains.get(record.domain)
            if copy is not None and not copy.paused and not record.fenced:
                await self._fence(uid, "LeaseHeldElsewhere")
            return
        else:
            holder = lease_holder(lease)
            if holder in (self.me, None):
                log.info("uid=%s: the fencing Lease names %s after all; copy kept", uid, holder)
                return
        self._succeeded(uid, "destroy")
        await self._destroy_domain(record.domain)
        record.fenced = False
        record.handover_paused_at = None
        state.save(self.settings.run_dir, record)
        att = self.replicators.get(uid)
        if att is not None:
            with contextlib.suppress(ReplicatorError, ReplicatorUnavailable):
                await att.client.stop()
        self.metrics.fences.labels(record.namespace, record.name, "destroy").inc()
        await self._emit(
            uid,
            ev.COPY_DESTROYED,
            f"destroyed the copy of {record.domain} on {self.me}: the fencing Lease names {holder}",
            warning=True,
        )

    async def _destroy_domain(self, domain: str) -> None:
        with contextlib.suppress(DomainNotFound):
            await self.xl.destroy(domain)
        await self._refresh_domains()

    async def _hand_over(self, uid: str, to: str) -> None:
        """Planned switchover, the active side: pause the guest, wait until the standby has
        acknowledged every checkpoint sent, then give it the fencing Lease (it activates from
        its last checkpoint; we destroy our copy).

        No checkpoint follows the pause: xl suspends the guest for each one, and a paused
        guest never acknowledges the suspend request (libxl gives up after its suspend
        timeout and ends the stream). What the guest did since its last checkpoint is lost
        with our copy, and so is its output: released only once the standby acknowledged a
        checkpoint holding it, it never was.
        """
        record, att = self.records[uid], self.replicators.get(uid)
        status = att.status if att else None
        if att is None or status is None:
            return
        copy = self.domains.get(record.domain)
        if copy is None:
            return
        if record.handover_paused_at is None or not copy.paused:
            # Recorded as a fence of ours: if the switchover is called off, the ordinary
            # resume rule (fencing Lease still ours, renewals fresh) lifts exactly this pause.
            # Paused again when it runs after all (resumed while the stream was down).
            record.fenced = True
            record.handover_paused_at = self.clock()
            state.save(self.settings.run_dir, record)
            await self._pause(uid, record)
            log.info("uid=%s: switchover to %s: guest paused", uid, to)
            return
        # A status read after the pause (see Attached.seen_actions). A checkpoint that began
        # before the pause and is still on its way may reach the standby or be lost with our
        # copy: either way the standby activates from a checkpoint it acknowledged, and no
        # output it lacks was released.
        sent = status.checkpoints.total if status.checkpoints is not None else None
        if (status.peer_checkpoints or 0) < (sent or 0):
            return
        got = await transfer_fencing_lease(
            self.kube, record.namespace, record.fence_lease, self.me, to, wallclock=self.wallclock
        )
        if not self._answered(uid, "hand over", got):
            return
        log.info(
            "uid=%s: switchover: hand the fencing Lease to %s: %s %s",
            uid,
            to,
            got.outcome.value,
            got.reason,
        )

    # -- replicator lifecycle ---------------------------------------------------------------

    def _schedule_launch(self, uid: str) -> None:
        attempt = self.launch_attempts.get(uid, 0)
        delay = LAUNCH_BACKOFF[min(attempt, len(LAUNCH_BACKOFF) - 1)]
        self.next_launch[uid] = self.clock() + delay
        self.launch_attempts[uid] = attempt + 1

    async def _launch(self, uid: str, role: Role) -> None:
        view = self.views.get(uid)
        if view is None:
            return
        self._schedule_launch(uid)
        config = await launch.prepare(self.kube, view, role, self.settings)
        if config is None:
            return
        record = self.records.get(uid) or CopyRecord(
            uid=uid,
            namespace=view.namespace,
            name=view.name,
            domain=view.domain,
            role=role,
            lease_duration=view.lease_duration,
        )
        record.role = role
        record.lease_duration = view.lease_duration
        record.automatic = view.spec.failover.automatic
        record.handover_paused_at = None
        self.records[uid] = record
        state.save(self.settings.run_dir, record)
        pid = self.launcher.launch(config)
        path = control_socket_path(self.settings.run_dir, uid)
        self.replicators[uid] = Attached(self.connect(path), launched_at=self.clock())
        log.info("uid=%s: started %s replicator pid=%s", uid, role.value, pid)
        await self._emit(uid, ev.REPLICATOR_STARTED, f"{role.value} replicator started")

    async def _stop(self, uid: str, reason: str) -> None:
        att = self.replicators.get(uid)
        if att is None:
            return
        try:
            await att.client.stop()
        except ReplicatorError as e:
            log.warning("uid=%s: replicator refused to stop: %s", uid, e)
            return
        except ReplicatorUnavailable:
            pass
        self.replicators.pop(uid, None)
        self._schedule_launch(uid)
        await self._emit(uid, ev.REPLICATOR_STOPPED, f"replicator stopped ({reason})")

    def _housekeeping(self) -> None:
        self.launcher.reap()
        for uid, att in self.replicators.items():
            if att.status is not None and att.status.state is ReplicatorState.REPLICATING:
                self.launch_attempts.pop(uid, None)
        for uid, record in list(self.records.items()):
            view = self.views.get(uid)
            seen = view.last_failover if view is not None else None
            if record.failover is not None and seen and seen.to_api() == record.failover:
                # The operator has it in the replication's status: our part is done.
                record.failover = None
                state.save(self.settings.run_dir, record)
            if uid in self.replicators or uid in self.actions:
                continue
            here = record.domain in self.domains or (
                record.domain + INCOMING_SUFFIX in self.domains
            )
            deleted = view is None and self.xrs.synced.is_set() and not record.fenced
            if (not here and record.failover is None) or deleted:
                # Nothing of it is left here, or the user deleted the protection: the guest
                # (if any) runs on, no longer ours to fence. A fenced guest stays paused
                # (and reported) for a human to decide.
                del self.records[uid]
                state.delete(self.settings.run_dir, uid)

    # -- reporting --------------------------------------------------------------------------

    def _entries(self) -> list[NodeReplication]:
        now = self.wallclock()
        entries = []
        refused = {uid for uid in self.colo_refused if uid in self.views}
        for uid in sorted(set(self.records) | set(self.replicators) | refused):
            att = self.replicators.get(uid)
            entry = replication_entry(
                uid=uid,
                view=self.views.get(uid),
                record=self.records.get(uid),
                status=att.status if att else None,
                domains=self.domains,
                now=now,
                refused=self.colo_refused.get(uid),
            )
            if entry is not None:
                entries.append(entry)
        return entries

    async def collect_status(self) -> XenNodeStatus:
        await self.refresh_host()
        return build_status(
            relay_endpoint=self.settings.relay_endpoint_for(
                self.relay_port or self.settings.relay_port_min
            ),
            info=self.info,
            colo_supported=self.colo_supported,
            domains=list(self.domains.values()),
            replications=self._entries(),
        )

    def _update_health_and_metrics(self) -> None:
        detail = {}
        if not self.xrs.synced.is_set():
            detail["xenreplications"] = "not listed yet"
        if not self.discovered:
            detail["replicators"] = "not re-attached yet"
        if self.renewer.last_renewal is None:
            detail["host-lease"] = self.renewer.last_error or "not renewed yet"
        if self.reporter.writes == 0:
            detail["xennode"] = self.reporter.last_error or "not reported yet"
        self.health.detail = detail
        self.health.ready = not detail
        if self.renewer.last_renewal is not None:
            self.metrics.lease_age.set(self.clock() - self.renewer.last_renewal)
        self.metrics.replicators.set(len(self.replicators))
        where_all = self._participating()
        keep = set()
        for uid, att in self.replicators.items():
            where = where_all.get(uid)
            if where is None or att.status is None:
                continue
            keep.add(where)
            cp = att.status.checkpoints
            self.metrics.observe_replication(
                *where,
                peer_connected=att.status.peer_connected,
                checkpoints=cp.total if cp else None,
                interval_ms=cp.interval_ms if cp else None,
                pause_ms=cp.last_pause_ms if cp else None,
                bytes_per_second=cp.bytes_per_second if cp else None,
            )
        self.metrics.forget_others(keep)


def _xen_build(info: XenInfo) -> str:
    """Xen's version with its extra (4.17 + .5-1): what a libxl upgrade may change."""
    return info.version + info.fields.get("xen_extra", "")
