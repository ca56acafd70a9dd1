"""Checkpointed `xl remus` forward streams made with the codec, for relay tests and benches."""

from __future__ import annotations

import os
from collections.abc import Iterator

from xenha.stream import pv
from xenha.stream.format import PAGE_SIZE, xl_config_bytes

CONFIG = xl_config_bytes('{"c_info": {"type": "pv", "name": "db1"}}')


def remus_stream(
    checkpoints: int, *, pages: int = 64, dirty: int = 16, seed: int = 1
) -> Iterator[bytes]:
    """The stream in pieces: the start and pre-copy, then one piece per checkpoint.

    The first piece ends with the first checkpoint; every later piece is one more
    checkpoint (its dirty pages and tail), so a reader can pace them like xl does.
    """
    memory = memoryview(bytearray(os.urandom(pages * PAGE_SIZE)) if seed else bytes(pages))
    first = [pv.stream_start(CONFIG), *pv.prologue_records(pages)]
    for parts in pv.page_records(memory, list(range(pages))):
        first += [bytes(p) for p in parts]
    first += pv.checkpoint_tail_records(1, 1, nsec=1)
    yield b"".join(first)
    for epoch in range(2, checkpoints + 1):
        pfns = [(epoch * 7 + i) % pages for i in range(dirty)]
        piece: list[bytes] = []
        for parts in pv.page_records(memory, sorted(set(pfns))):
            piece += [bytes(p) for p in parts]
        piece += pv.checkpoint_tail_records(epoch, 1, nsec=epoch)
        yield b"".join(piece)
