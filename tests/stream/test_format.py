"""Golden bytes: every header and record layout, byte for byte as the Xen specs define them."""

from __future__ import annotations

import json
import struct

import pytest

from xenha.stream import format as fmt
from xenha.stream import pv
from xenha.stream.errors import BadMagic, BadRecord, RecordTooLarge, UnsupportedStream
from xenha.stream.format import (
    CheckpointState,
    LibxcHeader,
    LibxcRecord,
    LibxlHeader,
    LibxlRecord,
    PageType,
    XlHeader,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("\n", ""))


class TestXlHeader:
    def test_magic_is_the_32_bytes_of_xl_h(self) -> None:
        assert (
            h("58656e2073617665642064 6f6d61696e2c20786c20666f726d61740a 20 00 20 0d")
            == fmt.XL_MAGIC
        )
        assert len(fmt.XL_MAGIC) == 32

    def test_header_is_magic_byte_order_mark_flags_and_optional_data(self) -> None:
        config = b'{"c_info": {}}\0'
        encoded = XlHeader(config).encode()
        assert encoded[:32] == fmt.XL_MAGIC
        assert encoded[32:48] == h(
            "04030201"  # 0x01020304 in the saving host's (little-endian) order
            "03000000"  # mandatory: JSON config | stream v2
            "00000000"  # optional flags
        ) + struct.pack("<I", 4 + len(config))
        assert encoded[48:52] == struct.pack("<I", len(config))
        assert encoded[52:] == config

    def test_config_carries_its_terminating_nul_as_xl_sends_it(self) -> None:
        assert fmt.xl_config_bytes('{"a": 1}') == b'{"a": 1}\0'
        assert XlHeader(fmt.xl_config_bytes('{"a": 1}')).config_json() == '{"a": 1}'

    def test_real_xen_offsets_an_855_byte_config_puts_libxl_at_907_and_libxc_at_931(
        self,
    ) -> None:
        # shared/reference "Observed on real Xen": optional data 859 = u32 855 + config.
        text = json.dumps({"c_info": {"type": "pv", "name": "counter"}, "pad": "x" * 790})
        config = fmt.xl_config_bytes(text.ljust(854))
        assert len(config) == 855
        start = pv.stream_start(config)
        assert struct.unpack_from("<I", start, 44) == (859,)
        assert start[907:915] == b"LibxlFmt"
        assert start[923:931] == h("0100000000000000")  # LIBXC_CONTEXT, empty
        assert start[931:939] == b"\xff" * 8

    def test_wrong_magic_is_refused(self) -> None:
        bad = b"Xen saved domain, xm format\n \0 \r" + bytes(16)
        with pytest.raises(BadMagic):
            fmt.decode_xl_fixed_header(bad)

    def test_a_big_endian_save_is_refused(self) -> None:
        bad = fmt.XL_MAGIC + h("01020304 03000000 00000000 00000000")
        with pytest.raises(UnsupportedStream, match="byte-order mark"):
            fmt.decode_xl_fixed_header(bad)

    def test_unknown_mandatory_flags_are_refused(self) -> None:
        bad = fmt.XL_MAGIC + h("04030201 07000000 00000000 00000000")
        with pytest.raises(UnsupportedStream, match="0x4"):
            fmt.decode_xl_fixed_header(bad)


class TestLibxlHeader:
    def test_is_ident_version_options_big_endian(self) -> None:
        assert LibxlHeader().encode() == h("4c6962786c466d74 00000002 00000000")

    def test_decodes_its_own_encoding(self) -> None:
        assert LibxlHeader.decode(LibxlHeader(options=fmt.LIBXL_OPT_LEGACY).encode()) == (
            LibxlHeader(options=fmt.LIBXL_OPT_LEGACY)
        )

    @pytest.mark.parametrize(
        ("raw", "error"),
        [
            ("4c6962786c466d75 00000002 00000000", BadMagic),
            ("4c6962786c466d74 00000001 00000000", UnsupportedStream),
            ("4c6962786c466d74 00000002 00000001", UnsupportedStream),
        ],
    )
    def test_refuses_bad_ident_version_or_big_endian(
        self, raw: str, error: type[Exception]
    ) -> None:
        with pytest.raises(error):
            LibxlHeader.decode(h(raw))


class TestLibxcHeaders:
    def test_image_header_is_big_endian_and_domain_header_native(self) -> None:
        assert LibxcHeader().encode() == h(
            # image: marker, "XENF", version 3, options (little-endian), reserved
            "ffffffffffffffff 58454e46 00000003 0000 0000 00000000"
            # domain: x86 PV, page shift 12, reserved, Xen 4 . 17
            "01000000 0c00 0000 04000000 11000000"
        )

    def test_decode_round_trip(self) -> None:
        header = LibxcHeader(domain_type=fmt.DomainType.X86_HVM, xen_major=4, xen_minor=19)
        raw = header.encode()
        assert LibxcHeader.decode(raw[:24], raw[24:]) == header

    @pytest.mark.parametrize(
        ("raw", "error"),
        [
            ("fffffffffffffffe 58454e46 00000003 0000 0000 00000000", BadMagic),
            ("ffffffffffffffff 58454e47 00000003 0000 0000 00000000", BadMagic),
            ("ffffffffffffffff 58454e46 00000004 0000 0000 00000000", UnsupportedStream),
            ("ffffffffffffffff 58454e46 00000001 0000 0000 00000000", UnsupportedStream),
            ("ffffffffffffffff 58454e46 00000003 0001 0000 00000000", UnsupportedStream),
        ],
    )
    def test_image_header_refusals(self, raw: str, error: type[Exception]) -> None:
        with pytest.raises(error):
            LibxcHeader.decode_image(h(raw))

    def test_version_2_images_are_still_read(self) -> None:
        assert LibxcHeader.decode_image(h("ffffffffffffffff 58454e46 00000002 0000 0000 00000000"))


class TestRecords:
    def test_empty_records_are_just_type_and_length(self) -> None:
        assert fmt.record(LibxlRecord.LIBXC_CONTEXT) == h("01000000 00000000")
        assert fmt.record(LibxcRecord.CHECKPOINT) == h("0e000000 00000000")
        assert fmt.record(LibxlRecord.CHECKPOINT_END) == h("04000000 00000000")

    def test_bodies_are_zero_padded_to_8_bytes(self) -> None:
        assert fmt.record(0x12, b"abc") == h("12000000 03000000") + b"abc" + bytes(5)
        assert fmt.padding(0) == 0
        assert fmt.padding(8) == 0
        assert fmt.padding(9) == 7

    def test_checkpoint_state_carries_a_u32_id(self) -> None:
        assert fmt.checkpoint_state_record(CheckpointState.SVM_READY) == h(
            "05000000 04000000 02000000 00000000"
        )
        assert fmt.decode_checkpoint_state(h("03000000")) == CheckpointState.SVM_RESUMED

    def test_dirty_pfn_list_is_a_bare_u64_array(self) -> None:
        raw = fmt.dirty_pfn_list_record([1, 0x1_0000_0002])
        assert raw == h("0f000000 10000000 0100000000000000 0200000001000000")
        assert fmt.decode_dirty_pfn_list(raw[8:]) == [1, 0x1_0000_0002]

    def test_records_over_128_mib_are_refused(self) -> None:
        with pytest.raises(RecordTooLarge):
            fmt.record_header(1, (128 << 20) + 1)
        with pytest.raises(RecordTooLarge):
            fmt.decode_record_header(struct.pack("<II", 1, (128 << 20) + 1))

    def test_x86_pv_record_sizes_match_xen_4_17(self) -> None:
        assert len(pv.pv_info()) == 8
        assert len(pv.tsc_info(0)) == 24
        assert len(pv.shared_info(0)) == 4096
        assert len(pv.vcpu_basic(0, 0)) == 8 + 5168
        assert len(pv.cpuid_policy()) % 24 == 0
        assert len(pv.msr_policy()) % 16 == 0
        # 128 MiB guest: 32768 pages in 64 p2m frames.
        assert len(pv.p2m_frames(32768)) == 8 + 64 * 8


class TestPageData:
    def test_layout_is_count_reserved_pfns_then_pages(self) -> None:
        page = bytes(range(256)) * 16
        raw = fmt.page_data_record([5], [page])
        assert raw[:8] == h("01000000 10100000")  # PAGE_DATA, 8 + 8 + 4096 bytes
        assert raw[8:16] == h("01000000 00000000")  # count 1, reserved
        assert raw[16:24] == h("0500000000000000")  # pfn 5, type NOTAB
        assert raw[24:] == page

    def test_types_live_in_the_top_nibble_and_typeless_pages_carry_no_data(self) -> None:
        page = b"\x11" * 4096
        raw = fmt.page_data_record([7, 9], [page], types=[PageType.L1TAB, PageType.XTAB])
        assert raw[16:32] == h("0700000000000010 09000000000000f0")
        decoded = fmt.decode_page_data(raw[8:])
        assert decoded.pfns == [7, 9]
        assert decoded.types == [PageType.L1TAB, PageType.XTAB]
        assert [(pfn, bytes(data)) for pfn, data in decoded.pages()] == [(7, page)]

    def test_a_body_whose_size_disagrees_with_its_count_is_refused(self) -> None:
        body = struct.pack("<IIQ", 2, 0, 1) + bytes(4096)
        with pytest.raises(BadRecord, match="wrong size"):
            fmt.page_data_count(body, len(body))
        with pytest.raises(BadRecord, match="count of zero"):
            fmt.page_data_count(bytes(8), 8)
