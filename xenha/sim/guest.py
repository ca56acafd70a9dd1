"""What runs inside a simulated guest, as functions of its memory.

A guest's whole state lives in its memory (page 0 holds the "kernel" variables), so that
restoring a checkpoint restores everything, exactly as it does for a real domain:

    page 0: b"XENHASIM" | u64 counter | u64 tick | u64 prng | u64 requests
    pages 1..N-1: data the workload scribbles on

The workload dirties pages at a configured rate, choosing them with a PRNG kept in page 0, so
two copies with the same memory dirty the same pages (COLO). The service is a counter: every
request returns the next value. With `divergence` > 0 a reply carries, with that
probability, a per-copy random token, so a COLO proxy sees the two copies' outputs differ.
"""

from __future__ import annotations

import os
import random
import struct
from collections.abc import Callable

from xenha.stream.format import PAGE_SIZE

MAGIC = b"XENHASIM"
_HEADER = struct.Struct("<8sQQQQ")
_COUNTER_AT = 8
_TICK_AT = 16
_MASK64 = (1 << 64) - 1

Buffer = bytearray | memoryview
MarkDirty = Callable[[int], None]


def initialise(memory: Buffer, seed: int) -> None:
    _HEADER.pack_into(memory, 0, MAGIC, 0, 0, (seed & _MASK64) or 1, 0)


def is_initialised(memory: Buffer) -> bool:
    return bytes(memory[:8]) == MAGIC


def counter(memory: Buffer) -> int:
    value: int = struct.unpack_from("<Q", memory, _COUNTER_AT)[0]
    return value


def tick_count(memory: Buffer) -> int:
    value: int = struct.unpack_from("<Q", memory, _TICK_AT)[0]
    return value


def _xorshift(x: int) -> int:
    x ^= (x << 13) & _MASK64
    x ^= x >> 7
    x ^= (x << 17) & _MASK64
    return x


def tick(memory: Buffer, nr_pages: int, pages: int, mark: MarkDirty) -> None:
    """One workload step: dirty `pages` pages (chosen by the in-memory PRNG) and page 0."""
    magic, count, ticks, state, requests = _HEADER.unpack_from(memory, 0)
    ticks += 1
    for _ in range(pages):
        state = _xorshift(state)
        pfn = 1 + state % (nr_pages - 1) if nr_pages > 1 else 0
        slot = (state >> 32) % (PAGE_SIZE // 16)
        struct.pack_into("<QQ", memory, pfn * PAGE_SIZE + slot * 16, ticks, state)
        mark(pfn)
    _HEADER.pack_into(memory, 0, magic, count, ticks, state, requests)
    mark(0)


def serve(memory: Buffer, mark: MarkDirty, *, divergence: float = 0.0) -> tuple[int, bytes]:
    """Handle one request: the next counter value and the reply line to send."""
    magic, count, ticks, state, requests = _HEADER.unpack_from(memory, 0)
    count += 1
    _HEADER.pack_into(memory, 0, magic, count, ticks, state, requests + 1)
    mark(0)
    if divergence > 0 and random.random() < divergence:
        # Nondeterministic output (a timestamp, a random id): each copy says something else.
        return count, f"{count} {os.urandom(4).hex()}\n".encode()
    return count, f"{count}\n".encode()


def parse_reply(line: bytes | str) -> int:
    """The counter value in a reply line."""
    text = line.decode() if isinstance(line, bytes) else line
    return int(text.split()[0])
