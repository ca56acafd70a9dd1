"""The record codec of `xl remus` / `xl migrate-receive` streams (stdlib only).

- `format`: constants, the xl / libxl / libxc headers, record encoding and PAGE_DATA.
- `parser`: `StreamParser` (forward stream) and `BackChannelParser` (receiver -> sender):
  feed bytes in any chunks, get `Record`, `CheckpointComplete`, ... events; page data is
  skipped by length, never copied unless asked.
- `pv`: the x86 PV records around the page data, in the order real Xen writes them.
- `errors`: every malformed or truncated stream ends in a `StreamError` subclass.

Relay example::

    parser = StreamParser(strict=False)
    for chunk in chunks:
        for event in parser.feed(chunk):
            if isinstance(event, CheckpointComplete):
                report(event.number, event.bytes, event.pages)
"""

from xenha.stream.errors import (
    BadMagic,
    BadRecord,
    RecordTooLarge,
    StreamError,
    TrailingData,
    TruncatedStream,
    UnexpectedRecord,
    UnsupportedStream,
)
from xenha.stream.format import (
    MIGRATE_RECEIVER_BANNER,
    XL_MAGIC,
    CheckpointState,
    DomainType,
    Layer,
    LibxcHeader,
    LibxcRecord,
    LibxlHeader,
    LibxlRecord,
    XlHeader,
)
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

__all__ = [
    "MIGRATE_RECEIVER_BANNER",
    "XL_MAGIC",
    "BackChannelParser",
    "BadMagic",
    "BadRecord",
    "BannerReceived",
    "CheckpointComplete",
    "CheckpointState",
    "DomainType",
    "Event",
    "Layer",
    "LibxcHeader",
    "LibxcHeaderParsed",
    "LibxcRecord",
    "LibxlHeader",
    "LibxlHeaderParsed",
    "LibxlRecord",
    "Record",
    "RecordTooLarge",
    "StreamEnd",
    "StreamError",
    "StreamParser",
    "TrailingData",
    "TruncatedStream",
    "UnexpectedRecord",
    "UnsupportedStream",
    "XlHeader",
    "XlHeaderParsed",
]
