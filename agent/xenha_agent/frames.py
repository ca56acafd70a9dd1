"""Relay frames between two replicators: `u8 type | u32 length (big-endian) | payload`.

DATA carries Xen's forward bytes and BACK its back-channel bytes, both unchanged; HEARTBEAT
is `u64 monotonic ns | u64 checkpoints seen`; CONTROL is one JSON object with a "type".
Anything else a peer sends is a `FrameError`: the caller drops that connection, nothing
crashes and nothing is guessed.

The header is built in place (`pack_header_into`) so a sender can read Xen's bytes straight
into a buffer behind a 5-byte gap and hand header and payload to one `sendall` without a copy.
"""

from __future__ import annotations

import enum
import json
import struct
from dataclasses import dataclass
from typing import Any

HEADER = struct.Struct(">BI")
HEADER_SIZE = HEADER.size
_HEARTBEAT = struct.Struct(">QQ")
HEARTBEAT_SIZE = _HEARTBEAT.size

#: Largest DATA/BACK payload a peer may announce. Senders use `DEFAULT_DATA_PAYLOAD`; the
#: receiver streams payloads through a fixed buffer, so this only bounds how long one frame
#: can hold the link, and rejects garbage lengths.
MAX_DATA_PAYLOAD = 16 << 20
DEFAULT_DATA_PAYLOAD = 1 << 20
#: CONTROL frames are buffered whole, so they stay small.
MAX_CONTROL_PAYLOAD = 64 << 10


class FrameType(enum.IntEnum):
    DATA = 1
    BACK = 2
    HEARTBEAT = 3
    CONTROL = 4


class FrameError(ValueError):
    """The peer sent something that is not a valid relay frame."""


class UnknownFrameType(FrameError):
    pass


class FrameTooLarge(FrameError):
    pass


class BadHeartbeat(FrameError):
    pass


class BadControl(FrameError):
    pass


@dataclass(frozen=True, slots=True)
class Heartbeat:
    monotonic_ns: int
    checkpoints: int


@dataclass(frozen=True, slots=True)
class Control:
    message: dict[str, Any]

    @property
    def type(self) -> str:
        return str(self.message["type"])


@dataclass(frozen=True, slots=True)
class Payload:
    """A DATA or BACK frame, as `FrameDecoder` returns it (the relay streams these instead)."""

    type: FrameType
    data: bytes


Frame = Payload | Heartbeat | Control


def _limit(ftype: FrameType) -> int:
    if ftype is FrameType.HEARTBEAT:
        return HEARTBEAT_SIZE
    if ftype is FrameType.CONTROL:
        return MAX_CONTROL_PAYLOAD
    return MAX_DATA_PAYLOAD


def decode_header(header: bytes | bytearray | memoryview) -> tuple[FrameType, int]:
    """Type and payload length from 5 header bytes; FrameError if either is impossible."""
    raw_type, length = HEADER.unpack(header)
    try:
        ftype = FrameType(raw_type)
    except ValueError:
        raise UnknownFrameType(f"unknown frame type 0x{raw_type:02x}") from None
    if ftype is FrameType.HEARTBEAT and length != HEARTBEAT_SIZE:
        raise BadHeartbeat(f"heartbeat of {length} bytes, expected {HEARTBEAT_SIZE}")
    if length > _limit(ftype):
        raise FrameTooLarge(f"{ftype.name} frame of {length} bytes exceeds {_limit(ftype)}")
    return ftype, length


def pack_header_into(buffer: bytearray | memoryview, ftype: FrameType, length: int) -> None:
    """Write a header at the start of `buffer` (whose payload follows at HEADER_SIZE)."""
    if length > _limit(ftype):
        raise FrameTooLarge(f"{ftype.name} frame of {length} bytes exceeds {_limit(ftype)}")
    HEADER.pack_into(buffer, 0, ftype, length)


def encode(ftype: FrameType, payload: bytes | bytearray | memoryview) -> bytes:
    """One whole frame (copies the payload: for small frames and tests)."""
    length = len(payload)
    if length > _limit(ftype):
        raise FrameTooLarge(f"{ftype.name} frame of {length} bytes exceeds {_limit(ftype)}")
    return HEADER.pack(ftype, length) + bytes(payload)


def encode_heartbeat(heartbeat: Heartbeat) -> bytes:
    return encode(
        FrameType.HEARTBEAT, _HEARTBEAT.pack(heartbeat.monotonic_ns, heartbeat.checkpoints)
    )


def decode_heartbeat(payload: bytes | bytearray | memoryview) -> Heartbeat:
    if len(payload) != HEARTBEAT_SIZE:
        raise BadHeartbeat(f"heartbeat of {len(payload)} bytes, expected {HEARTBEAT_SIZE}")
    monotonic_ns, checkpoints = _HEARTBEAT.unpack(payload)
    return Heartbeat(monotonic_ns, checkpoints)


def encode_control(message: dict[str, Any]) -> bytes:
    if not isinstance(message.get("type"), str):
        raise BadControl("a control message needs a string 'type'")
    return encode(FrameType.CONTROL, json.dumps(message, separators=(",", ":")).encode())


def decode_control(payload: bytes | bytearray | memoryview) -> Control:
    try:
        message = json.loads(bytes(payload))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadControl(f"control frame is not JSON: {e}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise BadControl("control frame is not an object with a string 'type'")
    return Control(message)


class FrameDecoder:
    """Incremental decoder: feed bytes in any chunks, get whole frames.

    It copies payloads, which is fine for tests and control traffic; the relay's hot path
    reads headers with `decode_header` and streams DATA/BACK payloads instead. After a
    FrameError the decoder stays failed: a stream that lied once cannot be resynchronised.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._failed: FrameError | None = None

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        if self._failed is not None:
            raise self._failed
        self._buf += data
        frames: list[Frame] = []
        try:
            while len(self._buf) >= HEADER_SIZE:
                ftype, length = decode_header(memoryview(self._buf)[:HEADER_SIZE])
                if len(self._buf) < HEADER_SIZE + length:
                    break
                payload = bytes(self._buf[HEADER_SIZE : HEADER_SIZE + length])
                del self._buf[: HEADER_SIZE + length]
                frames.append(decode_payload(ftype, payload))
        except FrameError as e:
            self._failed = e
            raise
        return frames

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held back."""
        return len(self._buf)


def decode_payload(ftype: FrameType, payload: bytes) -> Frame:
    if ftype is FrameType.HEARTBEAT:
        return decode_heartbeat(payload)
    if ftype is FrameType.CONTROL:
        return decode_control(payload)
    return Payload(ftype, payload)
