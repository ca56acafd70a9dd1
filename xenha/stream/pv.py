"""Bodies of the x86 PV records that a libxc save writes around the page data.

Layouts from xg_sr_stream_format.h; sizes match what Xen 4.17 writes for a 64-bit PV guest so
that byte counts per checkpoint look like the real thing. Contents are plausible, not a
bootable guest: the simulator keeps its guest's state in memory pages.

`prologue_records`, `checkpoint_tail_records` and `StreamSequence` give the record order
observed on real Xen (shared/reference, "Observed on real Xen"):
  before the first checkpoint: LIBXC_CONTEXT | X86_PV_INFO, X86_CPUID_POLICY, X86_MSR_POLICY,
  STATIC_DATA_END, X86_PV_P2M_FRAMES, PAGE_DATA..., then the tail;
  every checkpoint's tail: X86_TSC_INFO, SHARED_INFO, X86_PV_VCPU_BASIC,
  X86_PV_VCPU_EXTENDED (per vcpu), CHECKPOINT | CHECKPOINT_END.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from xenha.stream.format import (
    PAGE_DATA_MAX_BATCH,
    PAGE_SIZE,
    LibxcHeader,
    LibxcRecord,
    LibxlHeader,
    LibxlRecord,
    XlHeader,
    page_data_parts,
    record,
)

# sizeof(vcpu_guest_context_x86_64_t) and of the extended context libxc saves (64 bytes, as
# recorded from Xen 4.17.5: tests/vectors/realxen/).
VCPU_CONTEXT_SIZE = 5168
VCPU_EXTENDED_SIZE = 64
P2M_ENTRIES_PER_FRAME = PAGE_SIZE // 8

# CPUID leaves (leaf, subleaf) of a modest x86-64 policy; values are illustrative.
_CPUID_LEAVES: tuple[tuple[int, int], ...] = (
    *((leaf, 0xFFFFFFFF) for leaf in (0x0, 0x1, 0x2, 0x3, 0x5, 0x6, 0xA)),
    *((0x4, sub) for sub in range(4)),
    *((0x7, sub) for sub in range(2)),
    *((0xB, sub) for sub in range(2)),
    *((0xD, sub) for sub in range(4)),
    *((leaf, 0xFFFFFFFF) for leaf in range(0x80000000, 0x80000009)),
)
# MSR_INTEL_PLATFORM_INFO and MSR_ARCH_CAPABILITIES.
_MSRS: tuple[tuple[int, int], ...] = ((0xCE, 0), (0x10A, 0))


def pv_info(guest_width: int = 8, pt_levels: int = 4) -> bytes:
    return struct.pack("<BB6x", guest_width, pt_levels)


def cpuid_policy() -> bytes:
    return b"".join(
        struct.pack("<IIIIII", leaf, sub, leaf ^ 0x0D, sub & 0xFF, 0x7FFAFBFF, 0x178BFBFF)
        for leaf, sub in _CPUID_LEAVES
    )


def msr_policy() -> bytes:
    return b"".join(struct.pack("<IIQ", idx, 0, val) for idx, val in _MSRS)


def p2m_frames(nr_pages: int) -> bytes:
    frames = max(1, -(-nr_pages // P2M_ENTRIES_PER_FRAME))
    # The p2m lives in guest frames just past the guest's own memory in this model.
    return struct.pack(f"<II{frames}Q", 0, nr_pages - 1, *range(nr_pages, nr_pages + frames))


def tsc_info(nsec: int, *, khz: int = 2_000_000, incarnation: int = 0) -> bytes:
    return struct.pack("<IIQII", 0, khz, nsec, incarnation, 0)


def shared_info(epoch: int) -> bytes:
    # wc_sec / wc_nsec-like fields somewhere in the page, rest zero.
    page = bytearray(PAGE_SIZE)
    struct.pack_into("<QQ", page, 0x800, epoch, epoch * 1000)
    return bytes(page)


def vcpu_basic(vcpu: int, rip: int) -> bytes:
    context = bytearray(VCPU_CONTEXT_SIZE)
    struct.pack_into("<Q", context, 0x80, rip)
    return struct.pack("<II", vcpu, 0) + bytes(context)


def vcpu_extended(vcpu: int) -> bytes:
    return struct.pack("<II", vcpu, 0) + bytes(VCPU_EXTENDED_SIZE)


def prologue_records(nr_pages: int) -> list[bytes]:
    """libxc's static data, after the image and domain headers."""
    return [
        record(LibxcRecord.X86_PV_INFO, pv_info()),
        record(LibxcRecord.X86_CPUID_POLICY, cpuid_policy()),
        record(LibxcRecord.X86_MSR_POLICY, msr_policy()),
        record(LibxcRecord.STATIC_DATA_END),
        record(LibxcRecord.X86_PV_P2M_FRAMES, p2m_frames(nr_pages)),
    ]


def checkpoint_tail_records(epoch: int, vcpus: int, *, nsec: int) -> list[bytes]:
    """What libxc writes after a checkpoint's pages, ending with CHECKPOINT, and libxl's
    CHECKPOINT_END (a PV guest has no emulator records)."""
    out = [
        record(LibxcRecord.X86_TSC_INFO, tsc_info(nsec)),
        record(LibxcRecord.SHARED_INFO, shared_info(epoch)),
    ]
    for vcpu in range(vcpus):
        out.append(record(LibxcRecord.X86_PV_VCPU_BASIC, vcpu_basic(vcpu, rip=epoch)))
        out.append(record(LibxcRecord.X86_PV_VCPU_EXTENDED, vcpu_extended(vcpu)))
    out.append(record(LibxcRecord.CHECKPOINT))
    out.append(record(LibxlRecord.CHECKPOINT_END))
    return out


def stream_start(config: bytes, *, xen_major: int = 4, xen_minor: int = 17) -> bytes:
    """Everything up to and including libxc's domain header."""
    return (
        XlHeader(config).encode()
        + LibxlHeader().encode()
        + record(LibxlRecord.LIBXC_CONTEXT)
        + LibxcHeader(xen_major=xen_major, xen_minor=xen_minor).encode()
    )


def page_batches(pfns: Sequence[int]) -> Iterator[Sequence[int]]:
    """PFNs in libxc's batch size (at most 1024 pages per PAGE_DATA record)."""
    for start in range(0, len(pfns), PAGE_DATA_MAX_BATCH):
        yield pfns[start : start + PAGE_DATA_MAX_BATCH]


def page_runs(memory: memoryview, pfns: Sequence[int]) -> list[memoryview]:
    """Views of the pages of `pfns`, one per run of consecutive PFNs."""
    views: list[memoryview] = []
    if not pfns:
        return views
    start = prev = pfns[0]
    for pfn in pfns[1:]:
        if pfn != prev + 1:
            views.append(memory[start * PAGE_SIZE : (prev + 1) * PAGE_SIZE])
            start = pfn
        prev = pfn
    views.append(memory[start * PAGE_SIZE : (prev + 1) * PAGE_SIZE])
    return views


def page_records(memory: memoryview, pfns: Sequence[int]) -> Iterator[list[bytes | memoryview]]:
    """PAGE_DATA records (as writev buffers) for `pfns` of a guest memory image."""
    for batch in page_batches(pfns):
        yield page_data_parts(batch, page_runs(memory, batch))
