"""Does the simulator write what real Xen writes? Its record builders (xenha.stream.pv) against
the stream recorded from Debian's Xen 4.17.5 (tests/vectors/realxen/). No QEMU needed.

Page contents and the CPUID policy's size (it follows the CPU) may differ; everything else
must match.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from xenha.stream import pv
from xenha.stream.format import decode_record_header

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "realxen"
GUEST_PAGES = 96 * 256


@cache
def real() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / "stream.json").read_text())
    return data


def real_records(checkpoint: int) -> list[tuple[int, int]]:
    """(type, length) of the records of one checkpoint, PAGE_DATA left out."""
    # stream.json lists every record; a checkpoint ends at each libxl CHECKPOINT_END.
    groups: list[list[dict[str, Any]]] = [[]]
    for rec in real()["records"]:
        groups[-1].append(rec)
        if rec["layer"] == "libxl" and rec["name"] == "Checkpoint end":
            groups.append([])
    return [(r["type"], r["length"]) for r in groups[checkpoint] if r["name"] != "Page data"]


def sim(records: list[bytes]) -> list[tuple[int, int]]:
    return [decode_record_header(r[:8]) for r in records]


def test_prologue_order_and_sizes_but_cpuid() -> None:
    """LIBXC_CONTEXT, PV_INFO, CPUID, MSR, STATIC_DATA_END, P2M_FRAMES: same order and sizes,
    except the CPUID policy, whose size follows the CPU (real: qemu64,+svm under TCG)."""
    want = real_records(0)[1:6]  # after LIBXC_CONTEXT, before the page data
    got = sim(pv.prologue_records(GUEST_PAGES))
    assert [t for t, _ in got] == [t for t, _ in want]
    assert [n for t, n in got if t != 0x11] == [n for t, n in want if t != 0x11]


def test_checkpoint_tail_sizes() -> None:
    """TSC_INFO 24, SHARED_INFO 4096, VCPU_BASIC 5176, VCPU_EXTENDED 72, CHECKPOINT 0,
    CHECKPOINT_END 0, as every periodic checkpoint of the recording."""
    want = real_records(2)
    got = sim(pv.checkpoint_tail_records(1, 1, nsec=0))
    assert got == want


def test_checkpoint_tail_order() -> None:
    want = real_records(2)
    got = sim(pv.checkpoint_tail_records(1, 1, nsec=0))
    assert [t for t, _ in got] == [t for t, _ in want]


def test_every_periodic_checkpoint_has_the_same_tail() -> None:
    """Only the page data varies between checkpoints (so a simulator may fix the rest)."""
    tails = {tuple(real_records(i)) for i in range(1, len(real()["checkpoints"]))}
    assert len(tails) == 1
