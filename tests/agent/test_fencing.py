"""The fencing table (docs/design.md "Fencing"), one row per situation an agent can be in.

Times are seconds on the deciding node's monotonic clock. D = 10 s throughout unless a row says
otherwise, so margin = 2.5 s: the active pauses 7.5 s after its last good renewal.
`lease(holder, standby)` is the fencing Lease as read: its holder and its `xenha.io/standby`.
"""

from __future__ import annotations

import itertools

import pytest
from xenha_agent.fencing import (
    ActiveAction,
    ActiveView,
    FencingLease,
    HolderObservation,
    StandbyAction,
    StandbyView,
    decide_active,
    decide_standby,
    renew_period,
)

from xenha.api.fencing import margin

D = 10.0
ME, PEER, OTHER = "xen-b", "xen-a", "xen-c"


def lease(holder: str | None = PEER, standby: str | None = ME) -> FencingLease:
    return FencingLease(holder=holder, standby=standby)


UNREAD = None
# The usual Leases: as the standby reads it (held by the active, naming us), as the active does.
STANDBY_SEES = lease(PEER, ME)
ACTIVE_SEES = lease(ME, PEER)


def standby(
    *,
    now: float = 100.0,
    peer_lost_at: float | None = 95.0,
    fencing: FencingLease | None = STANDBY_SEES,
    since: float | None = 0.0,
    last_change: float | None = None,
    lease_duration: float = D,
    automatic: bool = True,
    has_checkpoint: bool = True,
) -> StandbyView:
    return StandbyView(
        now=now,
        me=ME,
        lease_duration=lease_duration,
        peer_lost_at=peer_lost_at,
        lease=fencing,
        holder_lease=None if since is None else HolderObservation(since, last_change),
        automatic=automatic,
        has_checkpoint=has_checkpoint,
    )


STANDBY_TABLE = [
    # -- the stream is alive: the standby never acts
    (
        "peer connected, holder long silent",
        standby(peer_lost_at=None, last_change=50.0),
        StandbyAction.WAIT,
        "PeerConnected",
    ),
    (
        "peer connected, API unreachable",
        standby(peer_lost_at=None, fencing=UNREAD, since=None),
        StandbyAction.WAIT,
        "PeerConnected",
    ),
    # -- peer lost: the annotation says whether this copy is still a valid standby
    (
        "the active revoked us: the copy is stale",
        standby(fencing=lease(PEER, None), last_change=20.0),
        StandbyAction.DROP_COPY,
        "NotDesignatedStandby",
    ),
    (
        "another node is the designated standby",
        standby(fencing=lease(PEER, OTHER)),
        StandbyAction.DROP_COPY,
        "NotDesignatedStandby",
    ),
    (
        "designated, but no complete checkpoint",
        standby(has_checkpoint=False),
        StandbyAction.DROP_COPY,
        "NoCompleteCheckpoint",
    ),
    # -- designated: judge the holder by its host Lease, on our own clock
    (
        "holder renewed 2 s ago",
        standby(now=100.0, last_change=98.0),
        StandbyAction.WAIT,
        "WaitingForHolderExpiry",
    ),
    (
        "holder silent for just under D",
        standby(now=100.0, last_change=90.01),
        StandbyAction.WAIT,
        "WaitingForHolderExpiry",
    ),
    (
        "holder silent for exactly D",
        standby(now=101.0, last_change=91.0),
        StandbyAction.ACQUIRE,
        "HolderExpired",
    ),
    (
        "holder silent for much longer than D",
        standby(now=500.0, last_change=91.0),
        StandbyAction.ACQUIRE,
        "HolderExpired",
    ),
    # -- client-go style: the clock starts when *this* agent first saw the Lease
    (
        "agent just (re)started, holder long dead",
        standby(now=100.0, since=99.0),
        StandbyAction.WAIT,
        "WaitingForHolderExpiry",
    ),
    (
        "agent watching for D without a change",
        standby(now=109.0, since=99.0),
        StandbyAction.ACQUIRE,
        "HolderExpired",
    ),
    # -- no API: nobody activates blind
    (
        "fencing Lease unreadable",
        standby(fencing=UNREAD, now=500.0),
        StandbyAction.WAIT,
        "LeaseUnknown",
    ),
    (
        "holder's host Lease never observed",
        standby(since=None, now=500.0),
        StandbyAction.WAIT,
        "HolderNotObserved",
    ),
    # -- already ours: a hand-over, or a restart between acquiring and activating
    (
        "fencing Lease names me",
        standby(fencing=lease(ME, None), last_change=99.0),
        StandbyAction.ACQUIRE,
        "AlreadyHolder",
    ),
    # -- spec.failover.automatic: false: a human decides; the copy is kept
    (
        "automatic failover off, holder expired",
        standby(now=130.0, last_change=91.0, automatic=False),
        StandbyAction.WAIT,
        "AutomaticFailoverDisabled",
    ),
]


@pytest.mark.parametrize(
    ("view", "action", "reason"),
    [pytest.param(v, a, r, id=name) for name, v, a, r in STANDBY_TABLE],
)
def test_standby_decision(view: StandbyView, action: StandbyAction, reason: str) -> None:
    decision = decide_standby(view)
    assert (decision.action, decision.reason) == (action, reason)


def active(
    *,
    now: float = 100.0,
    peer_lost_at: float | None = 99.0,
    own_last_renewal: float | None = 99.0,
    fencing: FencingLease | None = ACTIVE_SEES,
    standby_node: str | None = PEER,
    standby_has_checkpoint: bool = True,
    output_held: bool = True,
    fenced: bool = False,
    lease_duration: float = D,
    designation_in_doubt: bool = False,
) -> ActiveView:
    return ActiveView(
        now=now,
        me=ME,
        lease_duration=lease_duration,
        peer_lost_at=peer_lost_at,
        own_last_renewal=own_last_renewal,
        lease=fencing,
        standby=standby_node,
        standby_has_checkpoint=standby_has_checkpoint,
        output_held=output_held,
        fenced=fenced,
        designation_in_doubt=designation_in_doubt,
    )


ACTIVE_TABLE = [
    # -- the stream is alive: keep running; name the standby once it holds a checkpoint
    (
        "peer connected, standby designated",
        active(peer_lost_at=None),
        ActiveAction.KEEP,
        "PeerConnected",
    ),
    # -- the watchdog does not wait for the stream to end (issue #5): a standby that sees the
    #    stream end after D of silence takes over at once, maybe before we see the loss
    (
        "peer connected, API gone for minutes (outage, or an agent restart)",
        active(peer_lost_at=None, own_last_renewal=-200.0, fencing=UNREAD),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
    (
        "peer connected, cut off from the API only, just past D - margin",
        active(peer_lost_at=None, own_last_renewal=92.4),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
    (
        "peer connected, renewed exactly D - margin ago",
        active(peer_lost_at=None, own_last_renewal=92.5),
        ActiveAction.KEEP,
        "PeerConnected",
    ),
    (
        "peer connected, paused by the watchdog, API still gone",
        active(peer_lost_at=None, own_last_renewal=80.0, fenced=True),
        ActiveAction.KEEP,
        "Fenced",
    ),
    (
        "peer connected, paused by the watchdog, renewing again: resume (stream kept)",
        active(peer_lost_at=None, own_last_renewal=99.9, fenced=True),
        ActiveAction.RESUME,
        "LeaseRenewed",
    ),
    (
        "peer connected, still seeding, nobody designated: nobody can take over",
        active(
            peer_lost_at=None,
            own_last_renewal=80.0,
            fencing=lease(ME, None),
            standby_has_checkpoint=False,
        ),
        ActiveAction.KEEP,
        "PeerConnected",
    ),
    (
        "checkpoint acknowledged but renewals stale: no designation (it opens a takeover)",
        active(peer_lost_at=None, own_last_renewal=80.0, fencing=lease(ME, None)),
        ActiveAction.KEEP,
        "PeerConnected",
    ),
    (
        "peer connected, a designation of ours unanswered: it may have landed",
        active(
            peer_lost_at=None,
            own_last_renewal=80.0,
            fencing=lease(ME, None),
            designation_in_doubt=True,
        ),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
    (
        "first checkpoint acknowledged: designate the standby",
        active(peer_lost_at=None, fencing=lease(ME, None)),
        ActiveAction.DESIGNATE,
        "CheckpointAcknowledged",
    ),
    (
        "a new standby after re-protection: designate it",
        active(peer_lost_at=None, fencing=lease(ME, OTHER)),
        ActiveAction.DESIGNATE,
        "CheckpointAcknowledged",
    ),
    (
        "still seeding: nothing to designate",
        active(peer_lost_at=None, fencing=lease(ME, None), standby_has_checkpoint=False),
        ActiveAction.KEEP,
        "PeerConnected",
    ),
    # -- peer lost: revoke (CAS), then release the held output, never the other way round
    (
        "peer lost, standby still designated: revoke",
        active(),
        ActiveAction.REVOKE,
        "PeerLost",
    ),
    (
        "revoked: release the held output",
        active(fencing=lease(ME, None)),
        ActiveAction.DEGRADE,
        "StandbyRevoked",
    ),
    (
        "revoked and released: run on unprotected",
        active(fencing=lease(ME, None), output_held=False),
        ActiveAction.KEEP,
        "PeerLost",
    ),
    (
        "lost while seeding (never designated): release at once",
        active(fencing=lease(ME, None), standby_has_checkpoint=False),
        ActiveAction.DEGRADE,
        "StandbyRevoked",
    ),
    (
        "lost while a designation of ours is unanswered: revoke before releasing",
        active(fencing=lease(ME, None), designation_in_doubt=True),
        ActiveAction.REVOKE,
        "PeerLost",
    ),
    # -- peer lost and no renewals: pause before the standby may take over
    (
        "renewed exactly D - margin ago: still revoking",
        active(own_last_renewal=92.5),
        ActiveAction.REVOKE,
        "PeerLost",
    ),
    (
        "renewal just older than D - margin",
        active(own_last_renewal=92.4),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
    (
        "never renewed since start",
        active(own_last_renewal=None),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
    (
        "fencing Lease never read, renewals stale",
        active(own_last_renewal=80.0, fencing=UNREAD),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
    (
        "renewals stale but no standby designated: nobody can take over",
        active(own_last_renewal=80.0, fencing=lease(ME, None), output_held=False),
        ActiveAction.KEEP,
        "PeerLost",
    ),
    # -- pause once (xl pause nests); a fenced guest resumes only after the revoke
    (
        "already fenced, still stale",
        active(own_last_renewal=80.0, fenced=True),
        ActiveAction.REVOKE,
        "PeerLost",
    ),
    (
        "already fenced, API unreachable",
        active(own_last_renewal=80.0, fenced=True, fencing=UNREAD),
        ActiveAction.KEEP,
        "Fenced",
    ),
    (
        "fenced, renewing again, standby still designated: revoke first",
        active(own_last_renewal=99.5, fenced=True),
        ActiveAction.REVOKE,
        "PeerLost",
    ),
    (
        "fenced, revoked, output released: resume",
        active(own_last_renewal=99.5, fenced=True, fencing=lease(ME, None), output_held=False),
        ActiveAction.RESUME,
        "LeaseRenewed",
    ),
    (
        "fenced during a switchover that was called off (stream up)",
        active(peer_lost_at=None, own_last_renewal=99.5, fenced=True),
        ActiveAction.RESUME,
        "LeaseRenewed",
    ),
    # -- someone else won the fencing Lease: this copy must go, whatever else holds
    (
        "Lease names the standby",
        active(fencing=lease(PEER, None)),
        ActiveAction.DESTROY,
        "LeaseHeldElsewhere",
    ),
    (
        "Lease names a third node while the peer is connected",
        active(fencing=lease(OTHER, None), peer_lost_at=None),
        ActiveAction.DESTROY,
        "LeaseHeldElsewhere",
    ),
    (
        "fenced copy, Lease now names the standby",
        active(fencing=lease(PEER, None), fenced=True),
        ActiveAction.DESTROY,
        "LeaseHeldElsewhere",
    ),
    # -- the margin has a floor of 0.3 s for short leases
    (
        "D=1: renewal 0.65 s old is still fine",
        active(lease_duration=1.0, own_last_renewal=99.35),
        ActiveAction.REVOKE,
        "PeerLost",
    ),
    (
        "D=1: renewal 0.75 s old is stale",
        active(lease_duration=1.0, own_last_renewal=99.25),
        ActiveAction.PAUSE,
        "LeaseRenewalStale",
    ),
]


@pytest.mark.parametrize(
    ("view", "action", "reason"),
    [pytest.param(v, a, r, id=name) for name, v, a, r in ACTIVE_TABLE],
)
def test_active_decision(view: ActiveView, action: ActiveAction, reason: str) -> None:
    decision = decide_active(view)
    assert (decision.action, decision.reason) == (action, reason)


@pytest.mark.parametrize(
    ("durations", "period"),
    [
        pytest.param([10.0], 2.5, id="D/4"),
        pytest.param([10.0, 4.0, 30.0], 1.0, id="shortest D wins"),
        pytest.param([0.5], 0.25, id="clamped below at 0.25 s"),
        pytest.param([60.0], 5.0, id="clamped above at 5 s"),
        pytest.param([], 5.0, id="no replications: idle duration (20 s) -> 5 s"),
    ],
)
def test_renew_period(durations: list[float], period: float) -> None:
    assert renew_period(durations, idle_duration=20.0) == period


@pytest.mark.parametrize(("d", "m"), [(10.0, 2.5), (1.0, 0.3), (0.8, 0.3), (2.0, 0.5)])
def test_margin_is_quarter_of_d_with_a_floor(d: float, m: float) -> None:
    assert margin(d) == m


@pytest.mark.parametrize("active_sees_loss", [True, False], ids=["loss seen", "stream alive"])
@pytest.mark.parametrize("d", [1.0, 2.0, 10.0, 40.0])
def test_active_pauses_before_standby_may_acquire(d: float, active_sees_loss: bool) -> None:
    """Both clocks start at the same renewal: the active's send time is earlier than the
    standby's observation of it, so pausing at send + D - margin precedes acquiring at
    observation + D — also when the standby sees the stream end before the active does."""
    sent, ticks = 0.0, [t / 100 for t in range(0, int(d * 200))]
    pause_at = min(
        t
        for t in ticks
        if decide_active(
            active(
                now=t,
                own_last_renewal=sent,
                peer_lost_at=0.0 if active_sees_loss else None,
                lease_duration=d,
            )
        ).action
        is ActiveAction.PAUSE
    )
    acquire_at = min(
        t
        for t in ticks
        if decide_standby(
            standby(
                now=t, since=-100.0, last_change=sent + 0.001, peer_lost_at=0.0, lease_duration=d
            )
        ).action
        is StandbyAction.ACQUIRE
    )
    assert pause_at <= acquire_at - margin(d) + 0.011


# -- the watchdog, over every combination ----------------------------------------------------
#
# Renewal ages around D - margin (7.5 s for D = 10), the stream alive or lost, the fencing
# Lease held by us, by another node or unread, a standby designated or not, paused or not.

AGES = {
    "renewed 1 s ago": 99.0,
    "renewed D - margin ago": 92.5,
    "renewed just over D - margin ago": 92.4,
    "renewed D ago": 90.0,
    "never renewed": None,
}
STREAMS = {"stream alive": None, "stream lost": 99.0}
LEASES = {
    "Lease ours, standby designated": lease(ME, PEER),
    "Lease ours, nobody designated": lease(ME, None),
    "Lease unread": UNREAD,
    "Lease held elsewhere": lease(OTHER, None),
}
PAUSED = {"running": False, "paused by us": True}

WATCHDOG_CASES = [
    pytest.param(AGES[a], STREAMS[s], LEASES[le], PAUSED[f], id=f"{a}, {s}, {le}, {f}")
    for a, s, le, f in itertools.product(AGES, STREAMS, LEASES, PAUSED)
]


def _fresh(renewed: float | None) -> bool:
    return renewed is not None and 100.0 - renewed <= D - margin(D)


@pytest.mark.parametrize(("renewed", "lost_at", "fencing", "fenced"), WATCHDOG_CASES)
def test_the_watchdog_pauses_on_stale_renewals_whatever_the_stream(
    renewed: float | None, lost_at: float | None, fencing: FencingLease | None, fenced: bool
) -> None:
    view = active(own_last_renewal=renewed, peer_lost_at=lost_at, fencing=fencing, fenced=fenced)
    action = decide_active(view).action
    if fencing is not None and fencing.holder not in (ME, None):
        # Someone else won: the copy goes, paused or not.
        assert action is ActiveAction.DESTROY
        return
    takeover_possible = fencing is None or fencing.standby is not None
    if not _fresh(renewed) and not fenced and takeover_possible:
        assert action is ActiveAction.PAUSE
    else:
        assert action is not ActiveAction.PAUSE
    if not _fresh(renewed) or fencing is None:
        # A paused guest stays paused until renewals are fresh and the Lease is read as ours.
        assert action is not ActiveAction.RESUME
    if fenced and _fresh(renewed) and fencing is not None and fencing.standby is None:
        # Nothing stands between a fresh, undisputed holder and its guest.
        assert action is ActiveAction.RESUME or (lost_at is not None and view.output_held)
