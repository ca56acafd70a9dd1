"""Micro-benchmark: generating and parsing checkpoint streams (target: > 1 GB/s).

    .venv/bin/python bench/sim_stream.py [--memory-mib 256] [--checkpoints 200] [--dirty 512]

Measures, on one guest memory image:
- parse:    `StreamParser` over a stream already in memory, in 1 MiB chunks (the relay's cost
            per byte, page data skipped by length);
- generate: building PAGE_DATA records from the memory (as the simulated `xl remus` does)
            and copying them into a reused buffer (what a write to a pipe costs at most);
- pipe:     generator -> os.pipe -> reader -> parser in two threads: the relay's real path;
- small checkpoints: checkpoints per second the parser sustains when each carries few pages.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import threading
import time
from collections.abc import Iterator

from xenha.stream import format as fmt
from xenha.stream import pv
from xenha.stream.parser import CheckpointComplete, StreamParser

CHUNK = 1 << 20
F_SETPIPE_SZ = 1031


def dirty_sets(nr_pages: int, checkpoints: int, dirty: int, seed: int = 1) -> list[list[int]]:
    """The whole memory first, then `checkpoints` random sets of `dirty` pages."""
    rng = random.Random(seed)
    rounds = [list(range(nr_pages))]
    rounds += [sorted(rng.sample(range(nr_pages), dirty)) for _ in range(checkpoints)]
    return rounds


def stream_parts(
    memory: memoryview, nr_pages: int, rounds: list[list[int]]
) -> Iterator[list[bytes | memoryview]]:
    """The records of a Remus stream as writev buffers: headers, a full round, checkpoints."""
    yield [pv.stream_start(fmt.xl_config_bytes('{"c_info": {"name": "bench"}}'))]
    yield list(pv.prologue_records(nr_pages))
    for epoch, pfns in enumerate(rounds):
        yield from pv.page_records(memory, pfns)
        yield list(pv.checkpoint_tail_records(epoch, 1, nsec=epoch))


def bench_records(memory: memoryview, nr_pages: int, rounds: list[list[int]]) -> tuple[int, float]:
    """Building the records' buffers only (zero copy: what writev is handed)."""
    total = 0
    start = time.perf_counter()
    for parts in stream_parts(memory, nr_pages, rounds):
        total += sum(len(p) for p in parts)
    return total, time.perf_counter() - start


def bench_generate(memory: memoryview, nr_pages: int, rounds: list[list[int]]) -> tuple[int, float]:
    sink = bytearray(8 << 20)
    total = 0
    start = time.perf_counter()
    for parts in stream_parts(memory, nr_pages, rounds):
        pos = 0
        for part in parts:
            n = len(part)
            if pos + n > len(sink):
                pos = 0
            sink[pos : pos + n] = part
            pos += n
            total += n
    return total, time.perf_counter() - start


def bench_parse(data: bytes) -> tuple[int, float, int]:
    view = memoryview(data)
    parser = StreamParser()
    start = time.perf_counter()
    for i in range(0, len(view), CHUNK):
        parser.feed(view[i : i + CHUNK])
    elapsed = time.perf_counter() - start
    parser.close()
    return len(data), elapsed, parser.checkpoints


def bench_pipe(
    memory: memoryview, nr_pages: int, rounds: list[list[int]]
) -> tuple[int, float, int]:
    r, w = os.pipe()
    for fd in (r, w):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETPIPE_SZ, CHUNK)
    result: dict[str, int] = {}

    def reader() -> None:
        # One reused buffer: a fresh 1 MiB bytes per read costs page faults on every read.
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        parser = StreamParser()
        total = 0
        checkpoints = 0
        while n := os.readv(r, [buf]):
            total += n
            for event in parser.feed(view[:n]):
                if isinstance(event, CheckpointComplete):
                    checkpoints += 1
        result.update(bytes=total, checkpoints=checkpoints)

    thread = threading.Thread(target=reader)
    start = time.perf_counter()
    thread.start()
    for parts in stream_parts(memory, nr_pages, rounds):
        pending = [memoryview(p) for p in parts]
        while pending:
            done = os.writev(w, pending[:1024])
            while done:
                if done >= len(pending[0]):
                    done -= len(pending[0])
                    pending.pop(0)
                else:
                    pending[0] = pending[0][done:]
                    done = 0
    os.close(w)
    thread.join()
    elapsed = time.perf_counter() - start
    os.close(r)
    return result["bytes"], elapsed, result["checkpoints"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--memory-mib", type=int, default=256)
    ap.add_argument("--checkpoints", type=int, default=200)
    ap.add_argument("--dirty", type=int, default=512, help="dirty pages per checkpoint")
    ap.add_argument("--small-checkpoints", type=int, default=20000)
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()

    nr_pages = args.memory_mib * 256
    memory = memoryview(bytearray(os.urandom(nr_pages * fmt.PAGE_SIZE)))
    out: dict[str, float] = {}

    rounds = dirty_sets(nr_pages, args.checkpoints, args.dirty)
    data = b"".join(bytes(p) for parts in stream_parts(memory, nr_pages, rounds) for p in parts)
    size, secs, cps = bench_parse(data)
    out["parse_MBps"] = size / secs / 1e6
    out["parse_checkpoints_per_s"] = cps / secs

    size, secs = bench_records(memory, nr_pages, rounds)
    out["records_MBps"] = size / secs / 1e6

    size, secs = bench_generate(memory, nr_pages, rounds)
    out["generate_MBps"] = size / secs / 1e6

    size, secs, cps = bench_pipe(memory, nr_pages, rounds)
    out["pipe_MBps"] = size / secs / 1e6
    out["pipe_checkpoints_per_s"] = cps / secs

    small_pages = 64
    small = b"".join(
        bytes(p)
        for parts in stream_parts(
            memory[: small_pages * fmt.PAGE_SIZE],
            small_pages,
            dirty_sets(small_pages, args.small_checkpoints, 2),
        )
        for p in parts
    )
    size, secs, cps = bench_parse(small)
    out["small_parse_MBps"] = size / secs / 1e6
    out["small_checkpoints_per_s"] = cps / secs

    if args.json:
        print(json.dumps(out))
        return
    print(
        f"guest {args.memory_mib} MiB, {args.checkpoints} checkpoints of {args.dirty} dirty pages"
    )
    print(
        f"  parse (1 MiB chunks)     {out['parse_MBps']:10.0f} MB/s  "
        f"{out['parse_checkpoints_per_s']:10.0f} checkpoints/s"
    )
    print(f"  records (zero copy)      {out['records_MBps']:10.0f} MB/s")
    print(f"  generate (records+copy)  {out['generate_MBps']:10.0f} MB/s")
    print(
        f"  pipe (gen -> pipe -> parse) {out['pipe_MBps']:7.0f} MB/s  "
        f"{out['pipe_checkpoints_per_s']:10.0f} checkpoints/s"
    )
    print(
        f"  small checkpoints (2 pages each): {out['small_checkpoints_per_s']:.0f} checkpoints/s, "
        f"{out['small_parse_MBps']:.0f} MB/s"
    )


if __name__ == "__main__":
    main()
