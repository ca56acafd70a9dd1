"""Incremental parsers for the forward stream and the back channel of `xl remus`.

Feed bytes in chunks of any size; get events back. Page contents are skipped by length
through a memoryview and never copied unless asked for (`capture_bodies=True`), so the relay
can count checkpoints, their bytes and their spacing at memory speed.

The forward stream changes hands between libxl and libxc, and record type numbers overlap
between the two, so the parser tracks whose turn it is exactly as the restore side does:

    xl header, libxl header, libxl records ... LIBXC_CONTEXT
    libxc image + domain header, libxc records ... CHECKPOINT        (libxc hands back)
    libxl records (EMULATOR_*) ... CHECKPOINT_END                     (one checkpoint done)
    [COLO: libxl CHECKPOINT_STATE NEW]
    libxc records ... CHECKPOINT, libxl ... CHECKPOINT_END, ...

After CHECKPOINT_END the stream is libxc's again, except for COLO's CHECKPOINT_STATE (libxl
type 5, 4-byte body). libxc never opens a checkpoint with its own type 5 (X86_PV_VCPU_EXTENDED,
whose body is at least the 8-byte vcpu header), so a 4-byte type-5 record there is
unambiguously libxl's. A plain (non-checkpointed) stream ends with libxc END, then libxl
records, then libxl END.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from xenha.stream.errors import (
    BadMagic,
    BadRecord,
    StreamError,
    TrailingData,
    TruncatedStream,
    UnexpectedRecord,
)
from xenha.stream.format import (
    LIBXC_DOMAIN_HEADER_SIZE,
    LIBXC_IMAGE_HEADER_SIZE,
    LIBXL_HEADER_SIZE,
    MIGRATE_RECEIVER_BANNER,
    PAGE_DATA_HEADER_SIZE,
    REC_TYPE_OPTIONAL,
    RECORD_HEADER_SIZE,
    XL_HEADER_SIZE,
    CheckpointState,
    Layer,
    LibxcHeader,
    LibxcRecord,
    LibxlHeader,
    LibxlRecord,
    XlFixedHeader,
    XlHeader,
    decode_checkpoint_state,
    decode_record_header,
    decode_xl_fixed_header,
    decode_xl_optional_data,
    is_known,
    padding,
    page_data_count,
    record_name,
)

# xl itself would malloc whatever the header says; a relay should not.
XL_OPTIONAL_DATA_MAX = 16 << 20


# --- events ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XlHeaderParsed:
    header: XlHeader
    offset: int


@dataclass(frozen=True, slots=True)
class LibxlHeaderParsed:
    header: LibxlHeader
    offset: int


@dataclass(frozen=True, slots=True)
class LibxcHeaderParsed:
    header: LibxcHeader
    offset: int


@dataclass(frozen=True, slots=True)
class Record:
    """One record. `body` is set when captured (see the parsers' options), else None.

    `count` is the page count of a PAGE_DATA record (0 for others), read from its first bytes
    even when the body is skipped.
    """

    layer: Layer
    rtype: int
    length: int
    offset: int
    body: bytes | None = None
    count: int = 0

    @property
    def name(self) -> str:
        return record_name(self.layer, self.rtype)

    @property
    def optional(self) -> bool:
        return bool(self.rtype & REC_TYPE_OPTIONAL)

    @property
    def size(self) -> int:
        """Bytes on the wire: header, body and padding."""
        return RECORD_HEADER_SIZE + self.length + padding(self.length)

    def is_(self, layer: Layer, rtype: int) -> bool:
        return self.layer is layer and self.rtype == rtype


@dataclass(frozen=True, slots=True)
class CheckpointComplete:
    """A libxl CHECKPOINT_END: everything since the previous one is a consistent state.

    `number` counts from 1. `bytes`, `pages` and `records` cover the stream since the end of
    the previous checkpoint (for the first: since the start, headers included).
    """

    number: int
    offset: int
    bytes: int
    pages: int
    records: int


@dataclass(frozen=True, slots=True)
class StreamEnd:
    """libxl END: the stream is over (plain save/migrate only; Remus never sends it)."""

    offset: int


@dataclass(frozen=True, slots=True)
class BannerReceived:
    """The receiver's `xl migration receiver ready...` line on the back channel."""

    offset: int


Event = (
    XlHeaderParsed
    | LibxlHeaderParsed
    | LibxcHeaderParsed
    | Record
    | CheckpointComplete
    | StreamEnd
    | BannerReceived
)


# --- machinery shared by both directions ----------------------------------------------------


class _Step(enum.Enum):
    XL_HEADER = enum.auto()
    XL_OPTDATA = enum.auto()
    LIBXL_HEADER = enum.auto()
    LIBXC_IMAGE = enum.auto()
    LIBXC_DOMAIN = enum.auto()
    BANNER = enum.auto()
    RECORD_HEADER = enum.auto()
    DONE = enum.auto()


@dataclass(slots=True)
class _Pending:
    """The record whose body is being consumed."""

    layer: Layer
    rtype: int
    length: int
    offset: int
    capture: bytearray | None
    head: bytearray = field(default_factory=bytearray)


class _Reader:
    """Fixed-size items are gathered (rarely across chunks); record bodies are skipped or
    captured by length. Subclasses decide what the items mean."""

    def __init__(self, first: _Step, need: int, *, capture_bodies: bool, small_body: int) -> None:
        self._step = first
        self._need = need
        self._buf = bytearray()
        self._offset = 0
        self._body_left = 0  # body + padding bytes still to consume
        self._capture_left = 0
        self._head_left = 0
        self._pending: _Pending | None = None
        self._capture_bodies = capture_bodies
        self._small_body = small_body
        self._failed: StreamError | None = None

    @property
    def offset(self) -> int:
        """Bytes consumed so far."""
        return self._offset

    @property
    def at_boundary(self) -> bool:
        """True between records (or after END): the stream could stop here without cutting a
        header or record in half."""
        return (
            self._pending is None
            and not self._buf
            and self._step in (_Step.RECORD_HEADER, _Step.DONE)
        )

    def feed(self, data: bytes | bytearray | memoryview) -> list[Event]:
        if self._failed is not None:
            raise self._failed
        try:
            return self._feed(memoryview(data).cast("B"))
        except StreamError as e:
            self._failed = e
            raise

    def _feed(self, view: memoryview) -> list[Event]:
        events: list[Event] = []
        pos = 0
        end = len(view)
        while pos < end:
            if self._body_left:
                take = min(self._body_left, end - pos)
                pending = self._pending
                assert pending is not None
                if self._head_left:
                    h = min(self._head_left, take)
                    pending.head += view[pos : pos + h]
                    self._head_left -= h
                if self._capture_left:
                    c = min(self._capture_left, take)
                    assert pending.capture is not None
                    pending.capture += view[pos : pos + c]
                    self._capture_left -= c
                pos += take
                self._offset += take
                self._body_left -= take
                if not self._body_left:
                    self._finish(events)
                continue
            if self._step is _Step.DONE:
                raise TrailingData(
                    f"{end - pos} bytes after the end of the stream", offset=self._offset
                )
            need = self._need - len(self._buf)
            if need > end - pos:
                self._buf += view[pos:end]
                self._offset += end - pos
                return events
            item: bytes | memoryview
            if self._buf:
                self._buf += view[pos : pos + need]
                item = bytes(self._buf)
                self._buf.clear()
            else:
                item = view[pos : pos + need]
            pos += need
            start = self._offset - (self._need - need)
            self._offset += need
            self._item(item, start, events)
            if self._pending is not None and not self._body_left:
                # An empty record is complete as soon as its header is.
                self._finish(events)
        return events

    def _begin_record(self, layer: Layer, rtype: int, length: int, offset: int) -> None:
        capture = self._capture_bodies or length <= self._small_body
        self._pending = _Pending(layer, rtype, length, offset, bytearray() if capture else None)
        self._capture_left = length if capture else 0
        # The first bytes of a PAGE_DATA body say how many pages it carries.
        paged = layer is Layer.LIBXC and rtype == LibxcRecord.PAGE_DATA
        self._head_left = min(PAGE_DATA_HEADER_SIZE, length) if paged and not capture else 0
        self._body_left = length + padding(length)
        self._step = _Step.RECORD_HEADER
        self._need = RECORD_HEADER_SIZE

    def _finish(self, events: list[Event]) -> None:
        pending = self._pending
        assert pending is not None
        self._pending = None
        body = bytes(pending.capture) if pending.capture is not None else None
        count = 0
        if pending.layer is Layer.LIBXC and pending.rtype == LibxcRecord.PAGE_DATA:
            head = body if body is not None else bytes(pending.head)
            count = page_data_count(head, pending.length, offset=pending.offset)
        rec = Record(pending.layer, pending.rtype, pending.length, pending.offset, body, count)
        events.append(rec)
        self._record_done(rec, events)

    def _item(self, item: bytes | memoryview, offset: int, events: list[Event]) -> None:
        raise NotImplementedError

    def _record_done(self, rec: Record, events: list[Event]) -> None:
        raise NotImplementedError

    def _truncation_message(self) -> str:
        pending = self._pending
        if pending is not None:
            want = pending.length + padding(pending.length)
            return (
                f"Failed to read {want} bytes of data for record "
                f"(0x{pending.rtype:08x}, {record_name(pending.layer, pending.rtype)})"
            )
        return f"stream ended inside {self._step.name.lower().replace('_', ' ')}"

    def close(self) -> None:
        """Declare the end of input; TruncatedStream if it cut a header or record in half."""
        if self._failed is not None:
            raise self._failed
        if not self.at_boundary:
            raise TruncatedStream(self._truncation_message(), offset=self._offset)


# --- forward stream -------------------------------------------------------------------------


class StreamParser(_Reader):
    """The forward stream of `xl remus` / `xl migrate` / `xl save`, starting at the xl header
    (or at the libxl header with `start=Layer.LIBXL`).

    capture_bodies: keep every record body (the simulated receiver applies them); otherwise
    only bodies of at most `small_body` bytes are kept and the rest is skipped.
    strict: reject records whose type the layer does not define unless marked optional, as
    libxc/libxl restore does; a relay may prefer `strict=False` to pass newer streams along.
    """

    def __init__(
        self,
        *,
        start: Layer | None = None,
        capture_bodies: bool = False,
        small_body: int = 64,
        strict: bool = True,
    ) -> None:
        if start is Layer.LIBXL:
            super().__init__(
                _Step.LIBXL_HEADER,
                LIBXL_HEADER_SIZE,
                capture_bodies=capture_bodies,
                small_body=small_body,
            )
        elif start is None:
            super().__init__(
                _Step.XL_HEADER,
                XL_HEADER_SIZE,
                capture_bodies=capture_bodies,
                small_body=small_body,
            )
        else:
            raise ValueError("a stream starts at the xl header or at the libxl header")
        self._strict = strict
        self._xl_fixed: XlFixedHeader | None = None
        self._image = b""
        self._layer = Layer.LIBXL
        self._seen_libxc_context = False
        self._in_checkpoint_tail = False  # libxl records after libxc CHECKPOINT
        self._after_checkpoint_end = False
        self.xl_header: XlHeader | None = None
        self.libxc_header: LibxcHeader | None = None
        self.checkpoints = 0
        self._cp_start = 0
        self._cp_pages = 0
        self._cp_records = 0
        self.ended = False

    @property
    def layer(self) -> Layer:
        """Whose records come next."""
        return self._layer

    def _item(self, item: bytes | memoryview, offset: int, events: list[Event]) -> None:
        step = self._step
        if step is _Step.RECORD_HEADER:
            rtype, length = decode_record_header(item, offset)
            self._record_header(rtype, length, offset)
        elif step is _Step.XL_HEADER:
            fixed = decode_xl_fixed_header(item, offset=offset)
            if fixed.optional_data_len > XL_OPTIONAL_DATA_MAX:
                raise BadRecord(
                    f"xl optional data of {fixed.optional_data_len} bytes", offset=offset + 44
                )
            self._xl_fixed = fixed
            if fixed.optional_data_len:
                self._step, self._need = _Step.XL_OPTDATA, fixed.optional_data_len
            else:
                self._xl_done(b"", offset, events)
        elif step is _Step.XL_OPTDATA:
            self._xl_done(bytes(item), offset, events)
        elif step is _Step.LIBXL_HEADER:
            events.append(LibxlHeaderParsed(LibxlHeader.decode(item, offset=offset), offset))
            self._step, self._need = _Step.RECORD_HEADER, RECORD_HEADER_SIZE
        elif step is _Step.LIBXC_IMAGE:
            LibxcHeader.decode_image(item, offset=offset)
            self._image = bytes(item)
            self._step, self._need = _Step.LIBXC_DOMAIN, LIBXC_DOMAIN_HEADER_SIZE
        elif step is _Step.LIBXC_DOMAIN:
            start = offset - LIBXC_IMAGE_HEADER_SIZE
            header = LibxcHeader.decode(self._image, item, offset=start)
            self.libxc_header = header
            events.append(LibxcHeaderParsed(header, start))
            self._layer = Layer.LIBXC
            self._step, self._need = _Step.RECORD_HEADER, RECORD_HEADER_SIZE
        else:  # pragma: no cover - BANNER/DONE never reach here for this parser
            raise AssertionError(step)

    def _xl_done(self, optdata: bytes, optdata_offset: int, events: list[Event]) -> None:
        assert self._xl_fixed is not None
        header = decode_xl_optional_data(self._xl_fixed, optdata, offset=optdata_offset)
        self.xl_header = header
        events.append(XlHeaderParsed(header, 0))
        self._step, self._need = _Step.LIBXL_HEADER, LIBXL_HEADER_SIZE

    def _record_header(self, rtype: int, length: int, offset: int) -> None:
        layer = self._layer
        if self._after_checkpoint_end:
            self._after_checkpoint_end = False
            if rtype == LibxlRecord.CHECKPOINT_STATE and length == 4:
                layer = Layer.LIBXL
            else:
                layer = self._layer = Layer.LIBXC
        if self._strict and not rtype & REC_TYPE_OPTIONAL and not is_known(layer, rtype):
            raise BadRecord(
                f"unknown mandatory {layer.value} record type 0x{rtype:08x}", offset=offset
            )
        if layer is Layer.LIBXL:
            if rtype == LibxlRecord.LIBXC_CONTEXT:
                if self._seen_libxc_context:
                    raise UnexpectedRecord("a second LIBXC_CONTEXT record", offset=offset)
                if length:
                    raise BadRecord("LIBXC_CONTEXT record with a body", offset=offset)
            elif rtype == LibxlRecord.CHECKPOINT_END:
                if not self._in_checkpoint_tail:
                    raise UnexpectedRecord(
                        "CHECKPOINT_END without a libxc CHECKPOINT before it", offset=offset
                    )
                if length:
                    raise BadRecord("CHECKPOINT_END record with a body", offset=offset)
        elif rtype == LibxcRecord.CHECKPOINT and length:
            raise BadRecord("CHECKPOINT record with a body", offset=offset)
        self._begin_record(layer, rtype, length, offset)

    def _record_done(self, rec: Record, events: list[Event]) -> None:
        self._cp_records += 1
        self._cp_pages += rec.count
        if rec.layer is Layer.LIBXL:
            rtype = rec.rtype
            if rtype == LibxlRecord.LIBXC_CONTEXT:
                self._seen_libxc_context = True
                self._step, self._need = _Step.LIBXC_IMAGE, LIBXC_IMAGE_HEADER_SIZE
            elif rtype == LibxlRecord.CHECKPOINT_END:
                self._in_checkpoint_tail = False
                self._after_checkpoint_end = True
                self.checkpoints += 1
                end = rec.offset + rec.size
                events.append(
                    CheckpointComplete(
                        self.checkpoints,
                        end,
                        end - self._cp_start,
                        self._cp_pages,
                        self._cp_records,
                    )
                )
                self._cp_start, self._cp_pages, self._cp_records = end, 0, 0
            elif rtype == LibxlRecord.CHECKPOINT_STATE:
                state = decode_checkpoint_state(rec.body or b"")
                if state != CheckpointState.NEW:
                    raise UnexpectedRecord(
                        f"CHECKPOINT_STATE {state} on the forward stream", offset=rec.offset
                    )
                self._layer = Layer.LIBXC
            elif rtype == LibxlRecord.END:
                self.ended = True
                self._step = _Step.DONE
                events.append(StreamEnd(rec.offset))
        else:
            if rec.rtype == LibxcRecord.CHECKPOINT:
                self._layer = Layer.LIBXL
                self._in_checkpoint_tail = True
            elif rec.rtype == LibxcRecord.END:
                self._layer = Layer.LIBXL


# --- back channel ---------------------------------------------------------------------------


class BackChannelParser(_Reader):
    """The receiver's stdout as the sender reads it: xl's banner, then headerless records.

    COLO sends libxl CHECKPOINT_STATE (SVM_SUSPENDED, SVM_READY, SVM_RESUMED) and libxc
    CHECKPOINT_DIRTY_PFN_LIST; the simulator's Remus receiver acknowledges each complete
    checkpoint with an empty libxl CHECKPOINT_END (docs/design.md). Types are told apart by
    number: 4 and 5 are libxl's, 0xF is libxc's; nothing else belongs here. Bodies are always
    captured (they are small).
    """

    def __init__(self, *, expect_banner: bool = True) -> None:
        if expect_banner:
            super().__init__(
                _Step.BANNER, len(MIGRATE_RECEIVER_BANNER), capture_bodies=True, small_body=0
            )
        else:
            super().__init__(
                _Step.RECORD_HEADER, RECORD_HEADER_SIZE, capture_bodies=True, small_body=0
            )

    def _item(self, item: bytes | memoryview, offset: int, events: list[Event]) -> None:
        if self._step is _Step.BANNER:
            if bytes(item) != MIGRATE_RECEIVER_BANNER:
                raise BadMagic(
                    "migration receiver stream contained unexpected data instead of banner",
                    offset=offset,
                )
            events.append(BannerReceived(offset))
            self._step, self._need = _Step.RECORD_HEADER, RECORD_HEADER_SIZE
            return
        rtype, length = decode_record_header(item, offset)
        if rtype in (LibxlRecord.CHECKPOINT_END, LibxlRecord.CHECKPOINT_STATE):
            expected = 0 if rtype == LibxlRecord.CHECKPOINT_END else 4
            if length != expected:
                raise BadRecord(
                    f"back-channel {record_name(Layer.LIBXL, rtype)} of {length} bytes",
                    offset=offset,
                )
            self._begin_record(Layer.LIBXL, rtype, length, offset)
        elif rtype == LibxcRecord.CHECKPOINT_DIRTY_PFN_LIST:
            if length % 8:
                raise BadRecord(f"dirty pfn list of {length} bytes", offset=offset)
            self._begin_record(Layer.LIBXC, rtype, length, offset)
        else:
            raise UnexpectedRecord(
                f"record type 0x{rtype:08x} does not belong on the back channel", offset=offset
            )

    def _record_done(self, rec: Record, events: list[Event]) -> None:
        if rec.rtype == LibxlRecord.CHECKPOINT_STATE and rec.layer is Layer.LIBXL:
            decode_checkpoint_state(rec.body or b"")
