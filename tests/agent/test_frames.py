"""The relay frame codec: `u8 type | u32 length BE | payload`, and what garbage turns into."""

from __future__ import annotations

import struct

import pytest
from xenha_agent import frames
from xenha_agent.frames import (
    BadControl,
    BadHeartbeat,
    Control,
    FrameDecoder,
    FrameTooLarge,
    FrameType,
    Heartbeat,
    Payload,
    UnknownFrameType,
)


def test_header_is_one_type_byte_and_a_big_endian_length():
    assert frames.encode(FrameType.DATA, b"xen") == b"\x01\x00\x00\x00\x03xen"
    assert frames.decode_header(b"\x02\x00\x00\x01\x00") == (FrameType.BACK, 256)


def test_every_kind_of_frame_round_trips_through_the_decoder():
    stream = (
        frames.encode(FrameType.DATA, b"forward bytes")
        + frames.encode(FrameType.BACK, b"")
        + frames.encode_heartbeat(Heartbeat(monotonic_ns=123_456_789, checkpoints=42))
        + frames.encode_control({"type": "hello", "uid": "u1"})
    )
    assert FrameDecoder().feed(stream) == [
        Payload(FrameType.DATA, b"forward bytes"),
        Payload(FrameType.BACK, b""),
        Heartbeat(123_456_789, 42),
        Control({"type": "hello", "uid": "u1"}),
    ]


def test_frames_split_at_every_byte_boundary_decode_the_same():
    stream = frames.encode(FrameType.DATA, bytes(range(256)) * 3) + frames.encode_heartbeat(
        Heartbeat(1, 2)
    )
    decoder = FrameDecoder()
    out = []
    for i in range(len(stream)):
        out += decoder.feed(stream[i : i + 1])
    assert out == [Payload(FrameType.DATA, bytes(range(256)) * 3), Heartbeat(1, 2)]
    assert decoder.pending == 0


def test_heartbeat_payload_is_two_big_endian_u64():
    frame = frames.encode_heartbeat(Heartbeat(monotonic_ns=2**63 + 5, checkpoints=7))
    assert frame[5:] == struct.pack(">QQ", 2**63 + 5, 7)


def test_header_can_be_written_in_place_in_front_of_a_payload():
    buffer = bytearray(frames.HEADER_SIZE + 4)
    buffer[frames.HEADER_SIZE :] = b"page"
    frames.pack_header_into(buffer, FrameType.DATA, 4)
    assert bytes(buffer) == frames.encode(FrameType.DATA, b"page")


@pytest.mark.parametrize(
    ("garbage", "error"),
    [
        (b"\x00\x00\x00\x00\x00", UnknownFrameType),
        (b"\xff\x00\x00\x00\x01x", UnknownFrameType),
        (b"GET / HTTP/1.1\r\n", UnknownFrameType),
        (b"\x01\xff\xff\xff\xff", FrameTooLarge),
        (struct.pack(">BI", FrameType.CONTROL, frames.MAX_CONTROL_PAYLOAD + 1), FrameTooLarge),
        (b"\x03\x00\x00\x00\x08" + bytes(8), BadHeartbeat),
        (frames.encode(FrameType.CONTROL, b"not json"), BadControl),
        (frames.encode(FrameType.CONTROL, b"[1, 2]"), BadControl),
        (frames.encode(FrameType.CONTROL, b'{"no": "type"}'), BadControl),
        (frames.encode(FrameType.CONTROL, b"\xff\xfe"), BadControl),
    ],
)
def test_garbage_is_a_typed_frame_error(garbage, error):
    with pytest.raises(error):
        FrameDecoder().feed(garbage)


def test_frame_errors_are_value_errors_so_one_except_clause_catches_all():
    assert issubclass(frames.FrameError, ValueError)
    for cls in (UnknownFrameType, FrameTooLarge, BadHeartbeat, BadControl):
        assert issubclass(cls, frames.FrameError)


def test_a_decoder_that_saw_garbage_stays_failed():
    decoder = FrameDecoder()
    with pytest.raises(UnknownFrameType):
        decoder.feed(b"\x09\x00\x00\x00\x00")
    with pytest.raises(UnknownFrameType):
        decoder.feed(frames.encode(FrameType.DATA, b"valid now"))


def test_a_garbage_length_does_not_make_the_decoder_buffer_it():
    # A huge length is refused at the header, before any payload is awaited.
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed(struct.pack(">BI", FrameType.BACK, frames.MAX_DATA_PAYLOAD + 1))


def test_senders_cannot_build_oversized_or_untyped_frames():
    with pytest.raises(FrameTooLarge):
        frames.encode(FrameType.CONTROL, bytes(frames.MAX_CONTROL_PAYLOAD + 1))
    with pytest.raises(BadControl):
        frames.encode_control({"no": "type"})
