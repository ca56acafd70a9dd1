"""The ledger: what every simulated host and client did, in one append-only JSON-lines file.

All hosts of one lab share a fabric directory; the ledger is `<fabric>/ledger.jsonl`. Writers
are separate processes; each event is one small `write()` on an O_APPEND descriptor, which
Linux appends atomically, so lines never interleave. Every event carries `t` (CLOCK_MONOTONIC
in ns: one clock for every process on the machine, immune to wall-clock steps), `wall`,
`kind`, `pid` and usually `host`.

Event kinds and their fields (domain events carry `uuid`, `name`, `domid`):
- `host_start`, `host_stop` (graceful), `host_killed`, `host_stopped` (SIGSTOP: hung),
  `host_continued`: whole-host life, from the daemon or from `faults`.
- `copy` with `state` `active` | `passive` | `gone`: a domain copy starts or stops releasing
  output (active = network attached and not paused; an `--incoming` Remus copy is paused,
  a COLO secondary's output goes to the proxy, so both are passive until failover).
- `reply`: the guest service released a reply to a client: `value` (counter), `epoch` (the
  checkpoint whose acknowledgement released it, or null when unprotected), `session` (the
  domain's replication session that checkpoint belongs to: the first `xl remus` on it is 1,
  the next 2, ...; checkpoints are numbered per session), `mode`.
- `client_reply`: a client received `value` (written by `xenha.sim.client`), with `client`.
- `checkpoint_sent` / `checkpoint_applied`: sender / receiver, `number`, `pages`, and `crc`
  of the whole memory when the host runs with digests on.
- `restore`: a receiver failed over to checkpoint `number`, whose counter is `counter`.
- `failover`, `remus_failed`, `netpath_cut`, `netpath_restored`, `netpath_silenced`
  (`connections` of a dead host's, with `path`): for the story.

Checkers read the file and raise `LedgerViolation` with the offending events.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LEDGER_NAME = "ledger.jsonl"
LEDGER_ENV = "XENHA_SIM_LEDGER"

Event = dict[str, Any]


class LedgerViolation(AssertionError):
    """An invariant does not hold; `events` are the ones that show it."""

    def __init__(self, message: str, events: Iterable[Event] = ()) -> None:
        self.events = list(events)
        detail = "".join(f"\n  {json.dumps(e, sort_keys=True)}" for e in self.events)
        super().__init__(message + detail)


class Ledger:
    """Appends events; cheap to create, safe to use from several threads and processes."""

    def __init__(self, path: Path | str, *, host: str | None = None) -> None:
        self.path = Path(path)
        self.host = host
        self._fd: int | None = None

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    def record(self, kind: str, **fields: Any) -> Event:
        event: Event = {"t": time.monotonic_ns(), "wall": time.time(), "kind": kind}
        if self.host is not None:
            event["host"] = self.host
        event["pid"] = os.getpid()
        event.update(fields)
        line = (json.dumps(event, separators=(",", ":")) + "\n").encode()
        os.write(self._open(), line)
        return event

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class NullLedger(Ledger):
    """For hosts run without a fabric directory."""

    def __init__(self) -> None:
        super().__init__(os.devnull)

    def record(self, kind: str, **fields: Any) -> Event:
        return {"kind": kind, **fields}


def read(path: Path | str) -> list[Event]:
    """All events in time order (a torn last line from a killed writer is ignored)."""
    events = []
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    events.sort(key=lambda e: e["t"])
    return events


def _events(ledger: Path | str | Iterable[Event]) -> list[Event]:
    if isinstance(ledger, str | Path):
        return read(ledger)
    return sorted(ledger, key=lambda e: e["t"])


# --- invariant 1: never two active copies ------------------------------------------------


@dataclass
class _Copy:
    host: str
    active: bool = False
    # Active when its host froze (SIGSTOP): it counts again as soon as it releases output.
    dormant: bool = False


@dataclass
class _Domain:
    copies: dict[tuple[str, int], _Copy] = field(default_factory=dict)

    def active(self) -> list[tuple[str, int]]:
        return [key for key, copy in self.copies.items() if copy.active]


def active_intervals(ledger: Path | str | Iterable[Event]) -> dict[str, list[Event]]:
    """Per domain uuid, the `copy`/`reply`/host events that changed who is active."""
    out: dict[str, list[Event]] = defaultdict(list)
    for event in _events(ledger):
        if "uuid" in event and event["kind"] in ("copy", "reply"):
            out[event["uuid"]].append(event)
    return dict(out)


def assert_never_two_active(ledger: Path | str | Iterable[Event]) -> None:
    """Invariant 1: at no instant do two copies of one domain release output.

    A copy is active from its `copy active` event until `passive`/`gone` or its host's
    death. A host frozen by SIGSTOP stops counting; when it continues, its copies count again
    from the first reply they release (a hung host that wakes up and speaks is a second
    active copy; one that is fenced before it speaks is not).
    """
    domains: dict[str, _Domain] = defaultdict(_Domain)
    last_event: dict[tuple[str, tuple[str, int]], Event] = {}
    for event in _events(ledger):
        kind = event["kind"]
        host = event.get("host", "")
        if kind in ("host_killed", "host_stop", "host_start"):
            for dom in domains.values():
                for key in [k for k in dom.copies if k[0] == host]:
                    del dom.copies[key]
            continue
        if kind == "host_stopped":
            for dom in domains.values():
                for copy in dom.copies.values():
                    if copy.host == host and copy.active:
                        copy.active, copy.dormant = False, True
            continue
        if kind not in ("copy", "reply") or "uuid" not in event:
            continue
        dom = domains[event["uuid"]]
        key = (host, int(event["domid"]))
        copy = dom.copies.setdefault(key, _Copy(host))
        if kind == "copy":
            copy.dormant = False
            if event["state"] == "active":
                copy.active = True
            elif event["state"] == "gone":
                del dom.copies[key]
                continue
            else:
                copy.active = False
        elif not copy.active:
            # A reply from a copy not known to be active (dormant, or a bug): it is active now.
            copy.active, copy.dormant = True, False
        last_event[(event["uuid"], key)] = event
        active = dom.active()
        if len(active) > 1:
            raise LedgerViolation(
                f"two active copies of domain {event.get('name')} ({event['uuid']}): "
                + ", ".join(f"{h}/{d}" for h, d in active),
                [
                    last_event[(event["uuid"], k)]
                    for k in active
                    if (event["uuid"], k) in last_event
                ],
            )


# --- invariant 2: the client view -----------------------------------------------------------


def assert_client_view_clean(ledger: Path | str | Iterable[Event]) -> None:
    """Invariant 2 as clients see it: per domain, the counter never goes backwards or repeats
    across every reply released by any copy, and no reply came from state that a failover
    later lost (a `restore` to counter c after a reply of value > c)."""
    events = _events(ledger)
    last_reply: dict[str, Event] = {}
    highest: dict[str, Event] = {}
    per_client: dict[tuple[str, str], Event] = {}
    for event in events:
        kind = event["kind"]
        uuid = event.get("uuid")
        if uuid is None:
            continue
        if kind == "reply":
            prev = last_reply.get(uuid)
            if prev is not None and event["value"] <= prev["value"]:
                raise LedgerViolation(
                    f"counter of {event.get('name')} went from {prev['value']} to {event['value']}",
                    [prev, event],
                )
            last_reply[uuid] = event
            if uuid not in highest or event["value"] > highest[uuid]["value"]:
                highest[uuid] = event
        elif kind == "restore":
            top = highest.get(uuid)
            if top is not None and top["value"] > event["counter"]:
                raise LedgerViolation(
                    f"reply {top['value']} of {event.get('name')} came from state that the "
                    f"failover to checkpoint {event['number']} (counter {event['counter']}) lost",
                    [top, event],
                )
        elif kind == "client_reply":
            ckey = (uuid, str(event.get("client")))
            prev = per_client.get(ckey)
            if prev is not None and event["value"] <= prev["value"]:
                raise LedgerViolation(
                    f"client {event.get('client')} saw the counter go from {prev['value']} to "
                    f"{event['value']}",
                    [prev, event],
                )
            per_client[ckey] = event


def replies(ledger: Path | str | Iterable[Event], uuid: str | None = None) -> list[Event]:
    return [
        e
        for e in _events(ledger)
        if e["kind"] == "reply" and (uuid is None or e.get("uuid") == uuid)
    ]


def of_kind(ledger: Path | str | Iterable[Event], kind: str, **match: Any) -> list[Event]:
    return [
        e
        for e in _events(ledger)
        if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
    ]


def iter_lines(path: Path | str) -> Iterator[Mapping[str, Any]]:
    """Events in file order, for tailing a live ledger."""
    with open(path) as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue
