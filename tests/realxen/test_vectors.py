"""The codec against bytes real Xen wrote (tests/vectors/realxen/, see its README.md).

Recorded on host B while Debian's Xen 4.17.5 ran `xl remus -F -n -d -e -i 500` of a PV guest
from host A (xenha.realxen.record); cut with xenha.realxen.vectors: page contents zeroed,
everything else as sent. No QEMU needed: this runs in CI.
"""

from __future__ import annotations

import json
import lzma
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from xenha.realxen.vectors import summarize, walk
from xenha.stream import (
    BackChannelParser,
    BannerReceived,
    CheckpointComplete,
    DomainType,
    Layer,
    LibxcRecord,
    LibxlRecord,
    Record,
    StreamParser,
    TruncatedStream,
)
from xenha.stream.format import MIGRATE_RECEIVER_BANNER

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "realxen"

# What every later (periodic) checkpoint of a PV guest looks like on the wire.
PERIODIC = [
    "libxc:Page data",
    "libxc:x86 TSC info",
    "libxc:Shared info",
    "libxc:x86 PV vcpu basic",
    "libxc:x86 PV vcpu extended",
    "libxc:Checkpoint",
    "libxl:Checkpoint end",
]


@cache
def stream() -> bytes:
    return lzma.decompress((VECTORS / "stream-checkpoints.bin.xz").read_bytes())


@cache
def described() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((VECTORS / "stream.json").read_text())
    return data


def test_vectors_are_small() -> None:
    for path in VECTORS.iterdir():
        assert path.stat().st_size < 200 << 10, path


def test_head_headers() -> None:
    """The first 64 KiB, byte for byte as recorded: xl, libxl and libxc headers."""
    head = (VECTORS / "stream-head.bin").read_bytes()
    parser = StreamParser()
    parser.feed(head)
    xl = parser.xl_header
    assert xl is not None
    assert xl.mandatory_flags == 3  # JSON config + stream v2
    assert xl.optional_flags == 0
    config = json.loads(xl.config_json())
    assert config["c_info"]["type"] == "pv"
    assert config["c_info"]["name"] == "counter"
    assert xl.optional_data_len == 4 + len(xl.config)
    x = parser.libxc_header
    assert x is not None
    assert (x.version, x.domain_type, x.page_shift) == (3, DomainType.X86_PV, 12)
    assert (x.xen_major, x.xen_minor) == (4, 17)
    assert x.options == 0  # little-endian
    # The head ends inside the first PAGE_DATA batch; closing there is a truncation.
    assert not parser.at_boundary
    with pytest.raises(TruncatedStream, match="Page data"):
        parser.close()


def test_header_offsets() -> None:
    """libxl header right after the xl header and config; libxc right after LIBXC_CONTEXT."""
    d = walk(stream()[: 64 << 10])
    xl_end = 48 + d["xl_header"]["optional_data_len"]
    assert d["libxl_header"] == {"offset": xl_end, "version": 2, "options": 0}
    first = d["records"][0]
    assert (first["layer"], first["type"], first["length"]) == (
        "libxl",
        LibxlRecord.LIBXC_CONTEXT,
        0,
    )
    assert first["offset"] == xl_end + 16
    assert d["libxc_header"]["offset"] == xl_end + 16 + 8


def test_first_checkpoint_sequence() -> None:
    """Seeding: static data, the live pre-copy rounds, then the first consistent state."""
    first = summarize(walk(stream()))[0]
    assert first["sequence"] == [
        "libxl:Libxc context",
        "libxc:x86 PV info",
        "libxc:x86 CPUID policy",
        "libxc:x86 MSR policy",
        "libxc:Static data end",
        "libxc:x86 PV P2M frames",
        "libxc:Page data",
        *PERIODIC[1:],
    ]
    # At most 1024 pages per PAGE_DATA record, and the whole guest is sent at least once.
    memory_pages = described()["run"].get("guest_memory_mib", 96) * 256
    assert first["pages"] >= memory_pages * 0.9
    assert first["page_data_records"] >= first["pages"] // 1024


def test_periodic_checkpoints() -> None:
    """Every later checkpoint: one dirty-page batch (or more), the vCPU state, then the two
    end markers; no new headers and no LIBXC_CONTEXT (after CHECKPOINT_END it is libxc's turn)."""
    later = summarize(walk(stream()))[1:]
    assert len(later) >= 2
    for cp in later:
        assert cp["sequence"] == PERIODIC, cp
        assert 0 < cp["pages"] < 4096


def test_record_by_record_matches_description() -> None:
    """Our parser today agrees with what was recorded (offsets, lengths, page counts)."""
    d = walk(stream())
    assert d["at_boundary"]
    assert d["records"] == described()["records"]
    assert [c["end"] for c in d["checkpoints"]] == [c["end"] for c in walk(stream())["checkpoints"]]
    assert d["parsed_bytes"] == described()["vector_bytes"]


def test_incremental_feeding_in_small_chunks() -> None:
    """The relay sees TCP-sized pieces: the result must not depend on the chunking."""
    data = stream()
    whole = [e for e in StreamParser().feed(data) if isinstance(e, CheckpointComplete)]
    parser = StreamParser()
    chunked: list[CheckpointComplete] = []
    step = 1448  # one TCP segment's payload
    for i in range(0, len(data), step):
        chunked += [e for e in parser.feed(data[i : i + step]) if isinstance(e, CheckpointComplete)]
    parser.close()
    assert chunked == whole
    assert len(whole) == len(described()["checkpoints"])


def test_no_libxl_end_in_a_remus_stream() -> None:
    records = [e for e in StreamParser().feed(stream()) if isinstance(e, Record)]
    assert not any(r.is_(Layer.LIBXL, LibxlRecord.END) for r in records)
    assert not any(r.is_(Layer.LIBXC, LibxcRecord.END) for r in records)


def test_back_channel_is_the_banner_alone() -> None:
    """`xl migrate-receive -r` writes its banner and then nothing, however many checkpoints
    it receives: real Remus has no per-checkpoint acknowledgement on the back channel."""
    back = (VECTORS / "back-channel.bin").read_bytes()
    assert back == MIGRATE_RECEIVER_BANNER
    events = BackChannelParser().feed(back)
    assert [type(e) for e in events] == [BannerReceived]
    assert len(described()["checkpoints"]) >= 8  # while this many checkpoints went forward
