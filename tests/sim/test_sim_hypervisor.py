"""What the hypervisor tells the ledger, and in which order relative to what others see."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from xenha.sim.domstore import NullDomainStore
from xenha.sim.hypercall import HypercallError
from xenha.sim.hypervisor import HostSpec, Hypervisor
from xenha.sim.ledger import Event, NullLedger


class StarvedLedger(NullLedger):
    """Keeps events in memory; writing a copy's `gone` takes long, as in a daemon starved of
    CPU, which is when a reader can overtake the writer."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Event] = []

    def record(self, kind: str, **fields: Any) -> Event:
        if kind == "copy" and fields.get("state") == "gone":
            time.sleep(0.3)
        event: Event = {"kind": kind, **fields}
        self.events.append(event)
        return event


def test_a_destroyed_copy_is_gone_in_the_ledger_before_anyone_finds_it_gone(
    tmp_path: Path,
) -> None:
    # xl remus ends its stream the moment a hypercall misses the domain, and the backup then
    # makes its copy active: the primary's copy must already be `gone` in the ledger, or the
    # ledger shows two active copies that never were.
    ledger = StarvedLedger()
    hv = Hypervisor(HostSpec("xen-a", tmp_path), ledger=ledger, store=NullDomainStore())
    dom = hv.create({"c_info": {"name": "db1"}}, paused=False, incoming=False, colo=False)
    states_when_missed: list[list[str]] = []

    def look_until_missing() -> None:
        while True:
            try:
                hv.domain(dom.domid)
            except HypercallError:
                states_when_missed.append([e["state"] for e in ledger.events if "state" in e])
                return

    watcher = threading.Thread(target=look_until_missing)
    watcher.start()
    hv.destroy(dom.domid)
    watcher.join(timeout=10)
    assert states_when_missed == [["passive", "active", "gone"]]
