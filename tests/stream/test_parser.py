"""The incremental parsers: any chunking gives the same events; bad input gives typed errors."""

from __future__ import annotations

import contextlib
import random
import struct
from collections.abc import Iterable, Sequence

import pytest

from xenha.stream import format as fmt
from xenha.stream import pv
from xenha.stream.errors import (
    BadMagic,
    BadRecord,
    StreamError,
    TrailingData,
    TruncatedStream,
    UnexpectedRecord,
)
from xenha.stream.format import CheckpointState, Layer, LibxcRecord, LibxlRecord
from xenha.stream.parser import (
    BackChannelParser,
    BannerReceived,
    CheckpointComplete,
    Event,
    LibxcHeaderParsed,
    LibxlHeaderParsed,
    Record,
    StreamEnd,
    StreamParser,
    XlHeaderParsed,
)

PAGES = 3000  # three PAGE_DATA records in the first round


def guest_memory(pages: int = PAGES) -> bytearray:
    rng = random.Random(7)
    return bytearray(rng.randbytes(pages * fmt.PAGE_SIZE))


def remus_stream(memory: bytearray, dirty: Sequence[Sequence[int]], *, colo: bool = False) -> bytes:
    """A checkpointed stream: the whole memory, then one checkpoint per `dirty` entry."""
    view = memoryview(memory)
    pages = len(memory) // fmt.PAGE_SIZE
    out = [pv.stream_start(fmt.xl_config_bytes('{"c_info": {"name": "g"}}'))]
    out += pv.prologue_records(pages)
    rounds = [list(range(pages)), *dirty]
    for epoch, pfns in enumerate(rounds):
        if colo and epoch > 0:
            out.append(fmt.checkpoint_state_record(CheckpointState.NEW))
        for parts in pv.page_records(view, pfns):
            out.append(b"".join(parts))
        out += pv.checkpoint_tail_records(epoch, vcpus=1, nsec=epoch)
    return b"".join(out)


def parse(data: bytes, chunks: Iterable[int] | None = None, **kwargs: object) -> list[Event]:
    parser = StreamParser(**kwargs)  # type: ignore[arg-type]
    events: list[Event] = []
    if chunks is None:
        events += parser.feed(data)
    else:
        pos = 0
        for size in chunks:
            events += parser.feed(data[pos : pos + size])
            pos += size
            if pos >= len(data):
                break
        events += parser.feed(data[pos:])
    parser.close()
    return events


def names(events: Sequence[Event]) -> list[str]:
    out = []
    for e in events:
        if isinstance(e, Record):
            out.append(f"{e.layer.value}:{e.name}")
        elif isinstance(e, CheckpointComplete):
            out.append(f"checkpoint {e.number}")
        else:
            out.append(type(e).__name__)
    return out


class TestForwardStream:
    def test_a_remus_stream_reads_in_the_order_real_xen_writes_it(self) -> None:
        events = parse(remus_stream(guest_memory(), [[1, 2]]))
        tail = [
            "libxc:x86 TSC info",
            "libxc:Shared info",
            "libxc:x86 PV vcpu basic",
            "libxc:x86 PV vcpu extended",
            "libxc:Checkpoint",
            "libxl:Checkpoint end",
        ]
        assert names(events) == [
            "XlHeaderParsed",
            "LibxlHeaderParsed",
            "libxl:Libxc context",
            "LibxcHeaderParsed",
            "libxc:x86 PV info",
            "libxc:x86 CPUID policy",
            "libxc:x86 MSR policy",
            "libxc:Static data end",
            "libxc:x86 PV P2M frames",
            "libxc:Page data",
            "libxc:Page data",
            "libxc:Page data",
            *tail,
            "checkpoint 1",
            "libxc:Page data",
            *tail,
            "checkpoint 2",
        ]

    def test_headers_are_reported_with_their_contents(self) -> None:
        events = parse(remus_stream(guest_memory(8), []))
        xl, libxl, libxc = events[0], events[1], events[3]
        assert isinstance(xl, XlHeaderParsed)
        assert xl.header.config_json() == '{"c_info": {"name": "g"}}'
        assert isinstance(libxl, LibxlHeaderParsed)
        assert libxl.offset == 48 + 4 + len(xl.header.config)
        assert isinstance(libxc, LibxcHeaderParsed)
        assert (libxc.header.domain_type, libxc.header.xen_minor) == (fmt.DomainType.X86_PV, 17)

    def test_checkpoints_count_their_pages_bytes_and_records(self) -> None:
        data = remus_stream(guest_memory(), [[1, 2, 3], [4]])
        checkpoints = [e for e in parse(data) if isinstance(e, CheckpointComplete)]
        assert [c.number for c in checkpoints] == [1, 2, 3]
        assert [c.pages for c in checkpoints] == [PAGES, 3, 1]
        assert sum(c.bytes for c in checkpoints) == len(data)
        assert checkpoints[-1].offset == len(data)
        # 3 x PAGE_DATA + tail (6) in the first; 1 + 6 after.
        assert [c.records for c in checkpoints[1:]] == [7, 7]

    @pytest.mark.parametrize("seed", range(8))
    def test_any_chunking_gives_the_same_events(self, seed: int) -> None:
        data = remus_stream(guest_memory(1100), [[0, 5], [7]], colo=seed % 2 == 1)
        whole = parse(data)
        rng = random.Random(seed)
        sizes = [rng.choice([1, 2, 3, 7, 8, 9, 63, 4096, 4097, 65536]) for _ in range(100_000)]
        assert parse(data, sizes) == whole

    def test_a_reused_read_buffer_is_safe(self) -> None:
        # The relay reads into one buffer; the parser must keep no view into it.
        data = remus_stream(guest_memory(40), [[1, 2], [3]], colo=True)
        buffer = bytearray(3000)
        parser = StreamParser(capture_bodies=True)
        events: list[Event] = []
        for pos in range(0, len(data), len(buffer)):
            n = len(data[pos : pos + len(buffer)])
            buffer[:n] = data[pos : pos + n]
            events += parser.feed(memoryview(buffer)[:n])
            buffer[:] = b"\xee" * len(buffer)
        parser.close()
        assert events == parse(data, capture_bodies=True)

    def test_byte_at_a_time(self) -> None:
        data = remus_stream(guest_memory(4), [[1]])
        assert parse(data, [1] * len(data)) == parse(data)

    def test_page_bodies_are_skipped_unless_captured(self) -> None:
        memory = guest_memory(16)
        data = remus_stream(memory, [[3]])
        skipped = [e for e in parse(data) if isinstance(e, Record)]
        assert all(r.body is None for r in skipped if r.is_(Layer.LIBXC, LibxcRecord.PAGE_DATA))
        # Small records (TSC info: 24 bytes) always come with their body.
        assert all(r.body is not None for r in skipped if r.length <= 64)

        captured = [e for e in parse(data, capture_bodies=True) if isinstance(e, Record)]
        pages = [r for r in captured if r.is_(Layer.LIBXC, LibxcRecord.PAGE_DATA)]
        first = fmt.decode_page_data(pages[0].body or b"")
        assert first.pfns == list(range(16))
        assert bytes(first.data) == bytes(memory)

    def test_colo_checkpoint_state_after_checkpoint_end_is_libxl_then_libxc_resumes(
        self,
    ) -> None:
        events = parse(remus_stream(guest_memory(4), [[1]], colo=True))
        got = names(events)
        at = got.index("checkpoint 1")
        assert got[at + 1 : at + 3] == ["libxl:Checkpoint state", "libxc:Page data"]

    def test_a_plain_stream_ends_with_libxc_end_then_libxl_end(self) -> None:
        memory = guest_memory(2)
        data = (
            pv.stream_start(fmt.xl_config_bytes("{}"))
            + b"".join(pv.prologue_records(2))
            + b"".join(b"".join(p) for p in pv.page_records(memoryview(memory), [0, 1]))
            + fmt.record(LibxcRecord.END)
            + fmt.record(LibxlRecord.EMULATOR_CONTEXT, b"qemu")
            + fmt.record(LibxlRecord.END)
        )
        events = parse(data)
        assert names(events)[-3:] == ["libxl:Emulator context", "libxl:End", "StreamEnd"]
        assert isinstance(events[-1], StreamEnd)
        with pytest.raises(TrailingData):
            parse(data + b"x")

    def test_a_stream_may_start_at_the_libxl_header(self) -> None:
        data = remus_stream(guest_memory(2), [])
        events = parse(data[48 + 4 + 26 :], start=Layer.LIBXL)
        assert names(events)[0] == "LibxlHeaderParsed"
        assert names(events)[-1] == "checkpoint 1"


class TestTruncationAndGarbage:
    def test_ending_between_records_is_not_an_error_a_remus_stream_just_stops(self) -> None:
        data = remus_stream(guest_memory(4), [[1]])
        parser = StreamParser()
        parser.feed(data)
        parser.close()
        assert parser.at_boundary
        assert parser.checkpoints == 2

    def test_ending_inside_page_data_says_what_libxc_says(self) -> None:
        data = remus_stream(guest_memory(4), [[1, 2]])
        cut = data.rindex(struct.pack("<II", LibxcRecord.PAGE_DATA, 8 + 16 + 8192)) + 100
        parser = StreamParser()
        parser.feed(data[:cut])
        with pytest.raises(TruncatedStream) as err:
            parser.close()
        assert "Failed to read 8216 bytes of data for record (0x00000001, Page data)" in str(
            err.value
        )

    def test_ending_inside_a_header_is_truncation(self) -> None:
        parser = StreamParser()
        parser.feed(fmt.XL_MAGIC[:10])
        with pytest.raises(TruncatedStream, match="xl header"):
            parser.close()

    def test_an_error_sticks(self) -> None:
        parser = StreamParser()
        with pytest.raises(BadMagic):
            parser.feed(b"\0" * 64)
        with pytest.raises(BadMagic):
            parser.feed(b"")

    def test_unknown_mandatory_records_are_refused_unless_not_strict(self) -> None:
        data = remus_stream(guest_memory(2), [])
        bogus = fmt.record(0x13, b"12345678")
        at = data.index(fmt.record(LibxcRecord.STATIC_DATA_END))
        spliced = data[:at] + bogus + data[at:]
        with pytest.raises(BadRecord, match="unknown mandatory libxc record type 0x00000013"):
            parse(spliced)
        assert "libxc:Unknown" in names(parse(spliced, strict=False))

    def test_optional_records_of_unknown_type_pass(self) -> None:
        data = remus_stream(guest_memory(2), [])
        at = data.index(fmt.record(LibxcRecord.STATIC_DATA_END))
        spliced = data[:at] + fmt.record(0x80000013, b"x") + data[at:]
        rec = [e for e in parse(spliced) if isinstance(e, Record) and e.optional]
        assert rec[0].rtype == 0x80000013

    def test_checkpoint_end_without_checkpoint_is_refused(self) -> None:
        data = pv.stream_start(b"") + fmt.record(LibxcRecord.CHECKPOINT)
        bad = pv.stream_start(b"")[:-48] + fmt.record(LibxlRecord.CHECKPOINT_END)
        assert "libxl:Checkpoint end" not in names(parse(data))
        with pytest.raises(UnexpectedRecord):
            parse(bad)

    @pytest.mark.parametrize("seed", range(40))
    def test_random_damage_raises_stream_errors_and_nothing_else(self, seed: int) -> None:
        rng = random.Random(seed)
        data = bytearray(remus_stream(guest_memory(3), [[1]]))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data))
            data[at : at + 4] = rng.randbytes(4)
        cut = rng.randrange(len(data) + 1)
        with contextlib.suppress(StreamError):
            parse(bytes(data[:cut]), [rng.randint(1, 5000) for _ in range(1000)])

    @pytest.mark.parametrize("seed", range(20))
    def test_pure_garbage_is_a_stream_error(self, seed: int) -> None:
        garbage = random.Random(seed).randbytes(4096)
        with pytest.raises(StreamError):
            parse(garbage)


class TestBackChannel:
    def test_colo_back_channel_banner_states_and_dirty_list(self) -> None:
        data = (
            fmt.MIGRATE_RECEIVER_BANNER
            + fmt.checkpoint_state_record(CheckpointState.SVM_READY)
            + fmt.checkpoint_state_record(CheckpointState.SVM_RESUMED)
            + fmt.checkpoint_state_record(CheckpointState.SVM_SUSPENDED)
            + fmt.dirty_pfn_list_record([3, 9])
            + fmt.record(LibxlRecord.CHECKPOINT_END)
        )
        parser = BackChannelParser()
        events: list[Event] = []
        for i in range(len(data)):
            events += parser.feed(data[i : i + 1])
        parser.close()
        assert isinstance(events[0], BannerReceived)
        records = [e for e in events if isinstance(e, Record)]
        assert [fmt.decode_checkpoint_state(r.body or b"") for r in records[:3]] == [2, 3, 1]
        assert records[3].layer is Layer.LIBXC
        assert fmt.decode_dirty_pfn_list(records[3].body or b"") == [3, 9]
        assert records[4].is_(Layer.LIBXL, LibxlRecord.CHECKPOINT_END)

    def test_a_wrong_banner_is_refused(self) -> None:
        with pytest.raises(BadMagic, match="instead of banner"):
            BackChannelParser().feed(b"ssh: connect to host xen-b port 22: Connection refused\n")

    def test_forward_stream_records_do_not_belong_on_the_back_channel(self) -> None:
        parser = BackChannelParser(expect_banner=False)
        with pytest.raises(UnexpectedRecord):
            parser.feed(fmt.record(LibxcRecord.PAGE_DATA, bytes(8)))
