"""Typed failures of the codec: every malformed or cut-off stream ends in one of these."""

from __future__ import annotations


class StreamError(ValueError):
    """The bytes are not a valid xl/libxl/libxc stream. `offset` is where the problem starts."""

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        self.offset = offset
        self.detail = message
        super().__init__(message if offset is None else f"{message} (at byte {offset})")


class BadMagic(StreamError):
    """A header's magic, marker or identifier is not the one the format prescribes."""


class UnsupportedStream(StreamError):
    """A well-formed header that asks for something this codec does not speak (version,
    byte order, mandatory flags)."""


class BadRecord(StreamError):
    """A record whose header or body breaks the format's rules (length, layout, unknown
    mandatory type)."""


class RecordTooLarge(BadRecord):
    """A record longer than the 128 MiB that libxc accepts (REC_LENGTH_MAX)."""


class UnexpectedRecord(BadRecord):
    """A record that cannot appear at this point of the stream."""


class TruncatedStream(StreamError):
    """The stream ended in the middle of a header or record."""


class TrailingData(StreamError):
    """Bytes after the stream's END record."""
