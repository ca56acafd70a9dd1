"""What happened during a failover or switchover, in milliseconds, from every source. Pure.

The sources disagree in precision, so each milestone takes the most precise one there is:

- the ledger (``xenha.sim.ledger``): the power cut, copies becoming active, the first reply a
  copy released, what the client received (wall clock with microseconds, one machine);
- the fencing Lease: ``acquireTime`` (MicroTime) of the new holder;
- the replication's ``status.lastFailover`` (set from the activating agent's report): when it
  activated and how long after it lost its peer (``durationMs``), hence when it detected it;
- the status as watched while it happened (our own clock, ~100 ms resolution): phases;
- Events (second resolution): the story as ``kubectl describe`` tells it.

Times are wall-clock seconds (``time.time()``); the timeline is relative to the fault.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Obj = Mapping[str, Any]


@dataclass(frozen=True, order=True)
class Entry:
    at: float  # wall-clock seconds
    what: str = field(compare=False)
    source: str = field(compare=False)


@dataclass(frozen=True)
class Observation:
    """One look at the replication's status while it happened (our own clock)."""

    at: float
    phase: str | None
    active: str | None
    standby: str | None = None


@dataclass
class ClientView:
    """What one client saw, from its ``client_reply`` events and its attempts."""

    requests: int = 0
    answers: int = 0
    values: list[int] = field(default_factory=list)
    last_before: int | None = None
    first_after: int | None = None
    longest_gap_ms: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.violations


def parse_time(value: object) -> float | None:
    """RFC 3339 (with or without fractions) or epoch seconds -> epoch seconds."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    text = str(value).replace("Z", "+00:00")
    try:
        parsed = datetime.datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.UTC)
    return parsed.timestamp()


def failover_timeline(
    *,
    fault_at: float,
    fault: str,
    old: str,
    new: str,
    uuid: str,
    ledger: Sequence[Obj],
    lease: Obj | None = None,
    status: Obj | None = None,
    observations: Sequence[Observation] = (),
    events: Sequence[Obj] = (),
    events_seen: Mapping[str, float] | None = None,
    extra: Iterable[Entry] = (),
) -> list[Entry]:
    """The milestones of one failover (or switchover) from ``old`` to ``new``, in order."""
    entries: list[Entry] = [Entry(fault_at, fault, "lab")]
    after = [e for e in ledger if float(e.get("wall", 0)) >= fault_at]

    record = (status or {}).get("lastFailover") or {}
    activated = parse_time(record.get("time"))
    if activated is not None and activated >= fault_at - 1 and record.get("to") == new:
        took = record.get("durationMs")
        if took is not None:
            entries.append(
                Entry(activated - took / 1000, f"{new} detects the loss of {old}", "status")
            )
        entries.append(Entry(activated, f"{new}'s agent activates its copy", "status"))

    spec = (lease or {}).get("spec") or {}
    acquired = parse_time(spec.get("acquireTime"))
    if spec.get("holderIdentity") == new and acquired is not None and acquired >= fault_at - 1:
        entries.append(Entry(acquired, f"{new} acquires the fencing Lease", "lease"))

    def first(kind: str, **match: object) -> Obj | None:
        return next(
            (
                e
                for e in after
                if e.get("kind") == kind
                and e.get("uuid") == uuid
                and all(e.get(k) == v for k, v in match.items())
            ),
            None,
        )

    copy = first("copy", host=new, state="active")
    activated_copy = float(copy["wall"]) if copy is not None else float("inf")
    # The old copy stopping before the new one runs (a switchover's handover); later copy
    # events on the old node are its new standby copy.
    stopped = next(
        (
            e
            for e in after
            if e.get("kind") == "copy"
            and e.get("uuid") == uuid
            and e.get("host") == old
            and e.get("state") != "active"
            and float(e["wall"]) <= activated_copy
        ),
        None,
    )
    if stopped is not None:
        entries.append(
            Entry(float(stopped["wall"]), f"the copy on {old} stops answering", "ledger")
        )
    restore = first("restore", host=new)
    if restore is not None:
        entries.append(
            Entry(
                float(restore["wall"]),
                f"{new} restores checkpoint {restore.get('number')} "
                f"(counter {restore.get('counter')})",
                "ledger",
            )
        )
    if copy is not None:
        entries.append(Entry(float(copy["wall"]), f"the copy on {new} runs and answers", "ledger"))
    reply = first("reply", host=new)
    if reply is not None:
        entries.append(
            Entry(float(reply["wall"]), f"first answer from {new}: {reply['value']}", "ledger")
        )
    # The client's first answer once the new copy runs (before that it may still be the old
    # copy answering: a switchover hands over while the guest serves).
    client = next(
        (
            e
            for e in after
            if e.get("kind") == "client_reply"
            and e.get("uuid") == uuid
            and (copy is None or float(e["wall"]) >= activated_copy)
        ),
        None,
    )
    if client is not None:
        entries.append(
            Entry(
                float(client["wall"]),
                f"the client gets an answer from {new}: {client['value']}",
                "client",
            )
        )

    entries += _phases(observations, fault_at, new)
    protected_since = parse_time((status or {}).get("protectedSince"))
    if protected_since is not None and protected_since > fault_at:
        # Replaces the observed moment: the operator's stamp is closer to the truth.
        entries = [e for e in entries if not e.what.startswith("Protected again")]
        entries.append(Entry(protected_since, f"Protected again ({new} -> {old})", "status"))
    entries += _events(events, events_seen or {}, fault_at)
    entries += list(extra)
    return sorted(entries)


def _events(events: Sequence[Obj], seen: Mapping[str, float], fault_at: float) -> list[Entry]:
    """Events at their own time when it has sub-second precision, else when first seen
    (whole-second stamps would put an Event up to a second before what it reports)."""
    out: list[Entry] = []
    for event in events:
        stamp = str(event.get("eventTime") or event.get("lastTimestamp") or "")
        at = parse_time(stamp)
        source, since = "event", float(int(fault_at))
        first_seen = seen.get((event.get("metadata") or {}).get("uid", ""))
        if "." not in stamp and first_seen is not None:
            at, source, since = first_seen, "event (seen)", fault_at
        if at is None or at < since:
            continue
        out.append(Entry(at, f"Event {event.get('reason')}: {event.get('message', '')}", source))
    return out


def _phases(observations: Sequence[Observation], fault_at: float, new: str) -> list[Entry]:
    out: list[Entry] = []
    previous: Observation | None = None
    moved = False
    reprotecting = False
    for obs in observations:
        if obs.at < fault_at:
            previous = obs
            continue
        if previous is None or obs.phase != previous.phase:
            out.append(Entry(obs.at, f"phase {obs.phase}", "watch"))
        if not moved and obs.active == new and (previous is None or previous.active != new):
            moved = True
            out.append(Entry(obs.at, f"status.activeNode = {new}", "watch"))
        if moved and not reprotecting and obs.phase == "Seeding":
            reprotecting = True
            out.append(Entry(obs.at, f"re-protection starts (standby {obs.standby})", "watch"))
        if (
            moved
            and obs.phase == "Protected"
            and (previous is None or previous.phase != "Protected")
        ):
            out.append(Entry(obs.at, f"Protected again (standby {obs.standby})", "watch"))
        previous = obs
    return out


def client_view(
    ledger: Sequence[Obj], *, uuid: str, client: str, fault_at: float, requests: int = 0
) -> ClientView:
    """What one client saw around the fault: answers, the gap, and any value that went
    backwards or repeated (the ledger's checkers judge the whole history)."""
    replies = [
        e
        for e in ledger
        if e.get("kind") == "client_reply" and e.get("uuid") == uuid and e.get("client") == client
    ]
    view = ClientView(requests=requests, answers=len(replies))
    view.values = [int(e["value"]) for e in replies]
    previous: Obj | None = None
    for event in replies:
        wall = float(event["wall"])
        if wall < fault_at:
            view.last_before = int(event["value"])
        elif view.first_after is None:
            view.first_after = int(event["value"])
        if previous is not None:
            gap = int((wall - float(previous["wall"])) * 1000)
            view.longest_gap_ms = max(view.longest_gap_ms, gap)
            if int(event["value"]) <= int(previous["value"]):
                view.violations.append(
                    f"the counter went from {previous['value']} to {event['value']}"
                )
        previous = event
    return view
