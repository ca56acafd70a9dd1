"""The wire formats of `xl remus`/`xl migrate`: constants, header layouts, record encoding.

Sources (xen-project/xen): tools/xl/xl.h (xl header), tools/xl/xl_migrate.c (handshake),
tools/libs/light/libxl_sr_stream_format.h and docs/specs/libxl-migration-stream.pandoc (libxl
layer), tools/libs/guest/xg_sr_stream_format.h and docs/specs/libxc-migration-stream.pandoc
(libxc layer).

Byte order, which differs per structure and is easy to get wrong:
- xl header: every u32 in the saving host's order (x86: little-endian); the byte-order mark
  0x01020304 lets a reader tell.
- libxl header and libxc *image* header: big-endian (written with htobe64/htonl/htons).
- libxc *domain* header and the records of both layers: the stream's native order, which the
  headers' endianness bits declare; x86 writes little-endian. This codec writes and reads
  little-endian records and rejects streams that declare big-endian.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from xenha.stream.errors import BadMagic, BadRecord, RecordTooLarge, UnsupportedStream

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

# --- xl layer (tools/xl/xl.h) -------------------------------------------------------------

XL_MAGIC = b"Xen saved domain, xl format\n \0 \r"
XL_BYTEORDER_MARK = 0x01020304
XL_MANDATORY_FLAG_JSON = 1 << 0
XL_MANDATORY_FLAG_STREAMV2 = 1 << 1
XL_MANDATORY_FLAGS_KNOWN = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
_XL_HEADER = struct.Struct("<32sIIII")
XL_HEADER_SIZE = _XL_HEADER.size  # 48

# Fixed messages of xl's migration protocol. Remus uses only the banner: the receiver
# writes it on its stdout (the back channel) before anything else, and the sender waits for it
# before writing the xl header. The others belong to plain `xl migrate`.
MIGRATE_RECEIVER_BANNER = b"xl migration receiver ready, send binary domain data.\n"
MIGRATE_RECEIVER_READY = b"domain received, ready to unpause\0"
MIGRATE_PERMISSION_TO_GO = b"domain is yours, you are cleared to unpause\0"
MIGRATE_REPORT = b"my copy unpause results are as follows\0"

# --- libxl layer ----------------------------------------------------------------------------

LIBXL_IDENT = 0x4C6962786C466D74  # "LibxlFmt"
LIBXL_VERSION = 2
LIBXL_OPT_BIG_ENDIAN = 1 << 0
LIBXL_OPT_LEGACY = 1 << 1
_LIBXL_HEADER = struct.Struct(">QII")
LIBXL_HEADER_SIZE = _LIBXL_HEADER.size  # 16

# --- libxc layer ----------------------------------------------------------------------------

LIBXC_MARKER = 0xFFFFFFFFFFFFFFFF
LIBXC_ID = 0x58454E46  # "XENF"
LIBXC_VERSION = 3  # what writers emit; readers accept 2..3
LIBXC_VERSIONS_READ = (2, 3)
LIBXC_OPT_BIG_ENDIAN = 1 << 0
_LIBXC_IMAGE_HEADER = struct.Struct(">QIIHHI")
LIBXC_IMAGE_HEADER_SIZE = _LIBXC_IMAGE_HEADER.size  # 24
_LIBXC_DOMAIN_HEADER = struct.Struct("<IHHII")
LIBXC_DOMAIN_HEADER_SIZE = _LIBXC_DOMAIN_HEADER.size  # 16


class DomainType(enum.IntEnum):
    X86_PV = 1
    X86_HVM = 2
    X86_PVH = 3
    ARM = 4


# --- records (both layers) ------------------------------------------------------------------

REC_ALIGN = 8
REC_LENGTH_MAX = 128 << 20
REC_TYPE_OPTIONAL = 0x80000000
_RECORD_HEADER = struct.Struct("<II")
RECORD_HEADER_SIZE = _RECORD_HEADER.size  # 8


class Layer(enum.Enum):
    LIBXL = "libxl"
    LIBXC = "libxc"


class LibxlRecord(enum.IntEnum):
    END = 0
    LIBXC_CONTEXT = 1
    EMULATOR_XENSTORE_DATA = 2
    EMULATOR_CONTEXT = 3
    CHECKPOINT_END = 4
    CHECKPOINT_STATE = 5


class LibxcRecord(enum.IntEnum):
    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


class CheckpointState(enum.IntEnum):
    """Body of libxl CHECKPOINT_STATE (COLO). NEW goes primary -> secondary on the forward
    stream; the others come back on the back channel."""

    NEW = 0
    SVM_SUSPENDED = 1
    SVM_READY = 2
    SVM_RESUMED = 3


# libxc's own names (rec_type_to_str in xg_sr_common.c), used in its log messages.
LIBXC_RECORD_NAMES: dict[int, str] = {
    LibxcRecord.END: "End",
    LibxcRecord.PAGE_DATA: "Page data",
    LibxcRecord.X86_PV_INFO: "x86 PV info",
    LibxcRecord.X86_PV_P2M_FRAMES: "x86 PV P2M frames",
    LibxcRecord.X86_PV_VCPU_BASIC: "x86 PV vcpu basic",
    LibxcRecord.X86_PV_VCPU_EXTENDED: "x86 PV vcpu extended",
    LibxcRecord.X86_PV_VCPU_XSAVE: "x86 PV vcpu xsave",
    LibxcRecord.SHARED_INFO: "Shared info",
    LibxcRecord.X86_TSC_INFO: "x86 TSC info",
    LibxcRecord.HVM_CONTEXT: "HVM context",
    LibxcRecord.HVM_PARAMS: "HVM params",
    LibxcRecord.TOOLSTACK: "Toolstack",
    LibxcRecord.X86_PV_VCPU_MSRS: "x86 PV vcpu msrs",
    LibxcRecord.VERIFY: "Verify",
    LibxcRecord.CHECKPOINT: "Checkpoint",
    LibxcRecord.CHECKPOINT_DIRTY_PFN_LIST: "Checkpoint dirty pfn list",
    LibxcRecord.STATIC_DATA_END: "Static data end",
    LibxcRecord.X86_CPUID_POLICY: "x86 CPUID policy",
    LibxcRecord.X86_MSR_POLICY: "x86 MSR policy",
}

# libxl's names (rec_type_to_str in libxl_stream_read.c).
LIBXL_RECORD_NAMES: dict[int, str] = {
    LibxlRecord.END: "End",
    LibxlRecord.LIBXC_CONTEXT: "Libxc context",
    LibxlRecord.EMULATOR_XENSTORE_DATA: "Emulator xenstore data",
    LibxlRecord.EMULATOR_CONTEXT: "Emulator context",
    LibxlRecord.CHECKPOINT_END: "Checkpoint end",
    LibxlRecord.CHECKPOINT_STATE: "Checkpoint state",
}


def record_name(layer: Layer, rtype: int) -> str:
    names = LIBXL_RECORD_NAMES if layer is Layer.LIBXL else LIBXC_RECORD_NAMES
    return names.get(rtype & ~REC_TYPE_OPTIONAL, "Unknown")


def is_known(layer: Layer, rtype: int) -> bool:
    names = LIBXL_RECORD_NAMES if layer is Layer.LIBXL else LIBXC_RECORD_NAMES
    return rtype in names


# --- PAGE_DATA ------------------------------------------------------------------------------

PAGE_DATA_PFN_MASK = 0x000FFFFFFFFFFFFF
PAGE_DATA_TYPE_SHIFT = 60
_PAGE_DATA_HEADER = struct.Struct("<II")
PAGE_DATA_HEADER_SIZE = _PAGE_DATA_HEADER.size  # 8
# libxc batches at most this many pages in one PAGE_DATA record (MAX_BATCH_SIZE).
PAGE_DATA_MAX_BATCH = 1024


class PageType(enum.IntEnum):
    """XEN_DOMCTL_PFINFO_* >> 28, as stored in the top nibble of a PAGE_DATA entry."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


def page_carries_data(ptype: int) -> bool:
    # Every type below BROKEN (page tables, pinned or not, and plain pages) has 4 KiB of data.
    return (ptype & 0xF) < PageType.BROKEN


# --- header values --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class XlHeader:
    """The 48-byte xl header plus its optional data (u32 length + the domain config)."""

    config: bytes
    mandatory_flags: int = XL_MANDATORY_FLAG_JSON | XL_MANDATORY_FLAG_STREAMV2
    optional_flags: int = 0
    # Optional data after the config that a reader must skip (none is defined today).
    extra_optional_data: bytes = b""

    @property
    def optional_data_len(self) -> int:
        return 4 + len(self.config) + len(self.extra_optional_data) if self.config else 0

    def encode(self) -> bytes:
        head = _XL_HEADER.pack(
            XL_MAGIC,
            XL_BYTEORDER_MARK,
            self.mandatory_flags,
            self.optional_flags,
            self.optional_data_len,
        )
        if not self.config:
            return head
        return head + struct.pack("<I", len(self.config)) + self.config + self.extra_optional_data

    def config_json(self) -> str:
        """The config text as xl sends it: JSON with a terminating NUL, which is dropped."""
        return self.config.rstrip(b"\0").decode()


def xl_config_bytes(json_text: str) -> bytes:
    """The config as xl puts it in the header: the JSON text and its trailing NUL
    (save_domain_core_begin: config_len = strlen + 1)."""
    return json_text.encode() + b"\0"


@dataclass(frozen=True, slots=True)
class XlFixedHeader:
    mandatory_flags: int
    optional_flags: int
    optional_data_len: int


def decode_xl_fixed_header(data: bytes | memoryview, *, offset: int = 0) -> XlFixedHeader:
    if len(data) < XL_HEADER_SIZE:
        raise BadRecord("xl header shorter than 48 bytes", offset=offset)
    magic, mark, mandatory, optional, optlen = _XL_HEADER.unpack_from(data)
    if magic != XL_MAGIC:
        raise BadMagic("xl header has wrong magic number", offset=offset)
    if mark != XL_BYTEORDER_MARK:
        raise UnsupportedStream(
            f"xl header byte-order mark 0x{mark:08x}: not a little-endian stream",
            offset=offset + 32,
        )
    unknown = mandatory & ~XL_MANDATORY_FLAGS_KNOWN
    if unknown:
        raise UnsupportedStream(
            f"xl header has unsupported mandatory flag(s) 0x{unknown:x}", offset=offset + 36
        )
    if not mandatory & XL_MANDATORY_FLAG_STREAMV2:
        raise UnsupportedStream("xl header announces a legacy (v1) stream", offset=offset + 36)
    return XlFixedHeader(mandatory, optional, optlen)


def decode_xl_optional_data(fixed: XlFixedHeader, optdata: bytes, *, offset: int = 0) -> XlHeader:
    if not optdata:
        return XlHeader(b"", fixed.mandatory_flags, fixed.optional_flags)
    if len(optdata) < 4:
        raise BadRecord("xl optional data truncated before the config length", offset=offset)
    (config_len,) = struct.unpack_from("<I", optdata)
    if 4 + config_len > len(optdata):
        raise BadRecord(
            f"xl config length {config_len} exceeds the optional data ({len(optdata)} bytes)",
            offset=offset,
        )
    return XlHeader(
        config=bytes(optdata[4 : 4 + config_len]),
        mandatory_flags=fixed.mandatory_flags,
        optional_flags=fixed.optional_flags,
        extra_optional_data=bytes(optdata[4 + config_len :]),
    )


@dataclass(frozen=True, slots=True)
class LibxlHeader:
    version: int = LIBXL_VERSION
    options: int = 0

    def encode(self) -> bytes:
        return _LIBXL_HEADER.pack(LIBXL_IDENT, self.version, self.options)

    @classmethod
    def decode(cls, data: bytes | memoryview, *, offset: int = 0) -> LibxlHeader:
        ident, version, options = _LIBXL_HEADER.unpack_from(data)
        if ident != LIBXL_IDENT:
            raise BadMagic(f"libxl header ident 0x{ident:016x} is not LibxlFmt", offset=offset)
        if version != LIBXL_VERSION:
            raise UnsupportedStream(f"libxl stream version {version}, expected 2", offset=offset)
        if options & LIBXL_OPT_BIG_ENDIAN:
            raise UnsupportedStream("libxl stream is big-endian", offset=offset)
        return cls(version, options)


@dataclass(frozen=True, slots=True)
class LibxcHeader:
    """The libxc image header (24 bytes, big-endian) and domain header (16 bytes, native)."""

    domain_type: int = DomainType.X86_PV
    xen_major: int = 4
    xen_minor: int = 17
    page_shift: int = PAGE_SHIFT
    version: int = LIBXC_VERSION
    options: int = 0

    def encode(self) -> bytes:
        return _LIBXC_IMAGE_HEADER.pack(
            LIBXC_MARKER, LIBXC_ID, self.version, self.options, 0, 0
        ) + _LIBXC_DOMAIN_HEADER.pack(
            self.domain_type, self.page_shift, 0, self.xen_major, self.xen_minor
        )

    @staticmethod
    def decode_image(data: bytes | memoryview, *, offset: int = 0) -> tuple[int, int]:
        """(version, options) of an image header, validated."""
        marker, ident, version, options, _res1, _res2 = _LIBXC_IMAGE_HEADER.unpack_from(data)
        if marker != LIBXC_MARKER:
            raise BadMagic("libxc image header marker is not all ones", offset=offset)
        if ident != LIBXC_ID:
            raise BadMagic(f"libxc image header id 0x{ident:08x} is not XENF", offset=offset + 8)
        if version not in LIBXC_VERSIONS_READ:
            raise UnsupportedStream(
                f"libxc image version {version}, expected 2 <= ver <= 3", offset=offset + 12
            )
        if options & LIBXC_OPT_BIG_ENDIAN:
            raise UnsupportedStream("libxc image is big-endian", offset=offset + 16)
        return version, options

    @classmethod
    def decode(
        cls, image: bytes | memoryview, domain: bytes | memoryview, *, offset: int = 0
    ) -> LibxcHeader:
        version, options = cls.decode_image(image, offset=offset)
        dtype, page_shift, _res, major, minor = _LIBXC_DOMAIN_HEADER.unpack_from(domain)
        if page_shift != PAGE_SHIFT:
            raise UnsupportedStream(
                f"libxc domain page shift {page_shift}, expected {PAGE_SHIFT}",
                offset=offset + LIBXC_IMAGE_HEADER_SIZE + 4,
            )
        return cls(dtype, major, minor, page_shift, version, options)


# --- records --------------------------------------------------------------------------------


def padding(length: int) -> int:
    """Zero bytes after a body of `length` bytes, to the next 8-byte boundary."""
    return -length & (REC_ALIGN - 1)


def record_header(rtype: int, length: int) -> bytes:
    if length > REC_LENGTH_MAX:
        raise RecordTooLarge(f"record of {length} bytes exceeds 128 MiB")
    return _RECORD_HEADER.pack(rtype, length)


def decode_record_header(data: bytes | memoryview, offset: int = 0) -> tuple[int, int]:
    rtype, length = _RECORD_HEADER.unpack_from(data)
    if length > REC_LENGTH_MAX:
        raise RecordTooLarge(f"record length {length} exceeds 128 MiB", offset=offset)
    return rtype, length


_ZEROS = bytes(REC_ALIGN)


def record(rtype: int, body: bytes | memoryview = b"") -> bytes:
    """One whole record: header, body, zero padding."""
    length = len(body)
    return record_header(rtype, length) + bytes(body) + _ZEROS[: padding(length)]


def checkpoint_state_record(state: CheckpointState | int) -> bytes:
    return record(LibxlRecord.CHECKPOINT_STATE, struct.pack("<I", state))


def decode_checkpoint_state(body: bytes | memoryview) -> int:
    if len(body) != 4:
        raise BadRecord(f"CHECKPOINT_STATE body of {len(body)} bytes, expected 4")
    (state,) = struct.unpack_from("<I", body)
    return int(state)


def dirty_pfn_list_record(pfns: Sequence[int]) -> bytes:
    """libxc CHECKPOINT_DIRTY_PFN_LIST (COLO back channel): a bare array of u64 PFNs."""
    return record(LibxcRecord.CHECKPOINT_DIRTY_PFN_LIST, struct.pack(f"<{len(pfns)}Q", *pfns))


def decode_dirty_pfn_list(body: bytes | memoryview) -> list[int]:
    if len(body) % 8:
        raise BadRecord(f"dirty pfn list of {len(body)} bytes is not a whole number of u64s")
    return list(struct.unpack_from(f"<{len(body) // 8}Q", body))


def page_data_parts(
    pfns: Sequence[int],
    pages: Sequence[bytes | memoryview],
    types: Sequence[int] | None = None,
) -> list[bytes | memoryview]:
    """A PAGE_DATA record as buffers for writev, so page contents are never copied here.

    `pages` holds the 4 KiB of every page whose type carries data, in `pfns` order; a buffer
    may hold several consecutive pages (one slice for a run of contiguous PFNs).
    """
    count = len(pfns)
    if count == 0:
        raise BadRecord("PAGE_DATA needs at least one page")
    if types is None:
        entries: Iterable[int] = pfns
        with_data = count
    else:
        entries = [
            (pfn & PAGE_DATA_PFN_MASK) | ((ptype & 0xF) << PAGE_DATA_TYPE_SHIFT)
            for pfn, ptype in zip(pfns, types, strict=True)
        ]
        with_data = sum(1 for t in types if page_carries_data(t))
    supplied = sum(len(page) for page in pages)
    if supplied != with_data * PAGE_SIZE:
        raise BadRecord(
            f"PAGE_DATA of {count} pages needs {with_data * PAGE_SIZE} bytes of page data, "
            f"got {supplied}"
        )
    length = PAGE_DATA_HEADER_SIZE + 8 * count + PAGE_SIZE * with_data
    head = (
        record_header(LibxcRecord.PAGE_DATA, length)
        + _PAGE_DATA_HEADER.pack(count, 0)
        + struct.pack(f"<{count}Q", *entries)
    )
    # Whole pages plus an 8-byte-multiple header: never any padding.
    return [head, *pages]


def page_data_record(
    pfns: Sequence[int],
    pages: Sequence[bytes | memoryview],
    types: Sequence[int] | None = None,
) -> bytes:
    return b"".join(page_data_parts(pfns, pages, types))


@dataclass(frozen=True, slots=True)
class PageData:
    """A decoded PAGE_DATA body: PFNs, their types, and a view of the page contents."""

    pfns: list[int]
    types: list[int]
    data: memoryview  # 4 KiB per page that carries data, in order

    def pages(self) -> Iterable[tuple[int, memoryview]]:
        """(pfn, 4 KiB view) of every page that carries data."""
        index = 0
        for pfn, ptype in zip(self.pfns, self.types, strict=True):
            if page_carries_data(ptype):
                yield pfn, self.data[index * PAGE_SIZE : (index + 1) * PAGE_SIZE]
                index += 1


def page_data_count(head: bytes | memoryview, length: int, *, offset: int = 0) -> int:
    """Validate a PAGE_DATA record from its first 8 body bytes; return its page count.

    Cheap enough for the relay: only the count and the length are checked (at most one
    4 KiB page per entry, whole pages only), not the individual types.
    """
    if length < PAGE_DATA_HEADER_SIZE or len(head) < PAGE_DATA_HEADER_SIZE:
        raise BadRecord(f"PAGE_DATA record of {length} bytes has no header", offset=offset)
    count, _reserved = _PAGE_DATA_HEADER.unpack_from(head)
    if count == 0:
        raise BadRecord("PAGE_DATA record with a count of zero", offset=offset)
    rest = length - PAGE_DATA_HEADER_SIZE - 8 * count
    if rest < 0 or rest % PAGE_SIZE or rest // PAGE_SIZE > count:
        raise BadRecord(
            f"PAGE_DATA record wrong size: length {length} for {count} pages", offset=offset
        )
    return int(count)


def decode_page_data(body: bytes | memoryview, *, offset: int = 0) -> PageData:
    view = memoryview(body)
    count = page_data_count(view, len(view), offset=offset)
    entries = struct.unpack_from(f"<{count}Q", view, PAGE_DATA_HEADER_SIZE)
    pfns = [e & PAGE_DATA_PFN_MASK for e in entries]
    types = [e >> PAGE_DATA_TYPE_SHIFT for e in entries]
    with_data = sum(1 for t in types if page_carries_data(t))
    data = view[PAGE_DATA_HEADER_SIZE + 8 * count :]
    if len(data) != with_data * PAGE_SIZE:
        raise BadRecord(
            f"PAGE_DATA record wrong size: length {len(view)}, expected "
            f"{PAGE_DATA_HEADER_SIZE} + {8 * count} + {PAGE_SIZE * with_data}",
            offset=offset,
        )
    return PageData(pfns, types, data)
