"""Checkpoint health from the forward stream, as the relay sees it go by.

The relay feeds every DATA byte (never changed) to the codec's incremental parser, which
skips page contents by length, and turns its `CheckpointComplete` events into the numbers
XenNode.status reports: how many checkpoints, how big, how far apart, how long the last one
took on the wire (the guest is paused while a Remus checkpoint's dirty pages are written, so
that is the visible part of the pause), and the stream's byte rate.

The byte rate is an average over the recent past, worked out when it is read: a checkpointed
stream comes in bursts (Remus every 100-200 ms, COLO seconds apart), and whoever samples it
(the XenNode report every few seconds) must not see 0 just because it looked between two
bursts, or before the first second of a stream was over.

A stream the parser cannot follow (a newer Xen, a damaged stream) stops the counting, never
the relay: `parse_error` says why, and the bytes keep flowing.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from xenha.stream import CheckpointComplete, StreamError, StreamParser

# The rate averages at least this much recent time, and at least two checkpoint intervals.
_RATE_WINDOW_S = 10.0
# Bytes are counted per bucket of this length: the window is kept as a few dozen numbers.
_RATE_BUCKET_S = 0.5


class EventParser(Protocol):
    def feed(self, data: memoryview) -> Sequence[object]: ...


@dataclass(frozen=True)
class CheckpointSnapshot:
    total: int = 0
    last_time_unix: float | None = None
    last_monotonic: float | None = None
    interval_ms: float | None = None
    last_pause_ms: float | None = None
    last_bytes: int | None = None
    bytes_per_second: float = 0.0
    stream_bytes: int = 0
    parse_error: str | None = None

    def to_json(self) -> dict[str, object]:
        """The `checkpoints` object of the replicator's status (XenNode field names)."""

        def ms(value: float | None) -> int | None:
            return None if value is None else round(value)

        return {
            "total": self.total,
            "lastTimeUnix": self.last_time_unix,
            "lastMonotonic": self.last_monotonic,
            "intervalMs": ms(self.interval_ms),
            "lastPauseMs": ms(self.last_pause_ms),
            "lastBytes": self.last_bytes,
            "bytesPerSecond": round(self.bytes_per_second),
            "streamBytes": self.stream_bytes,
            "parseError": self.parse_error,
        }


class CheckpointStats:
    """Thread-safe: one thread observes, any thread takes snapshots."""

    def __init__(
        self,
        parser: EventParser | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._parser: EventParser | None = (
            parser if parser is not None else StreamParser(strict=False)
        )
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._total = 0
        self._last_time_unix: float | None = None
        self._last_monotonic: float | None = None
        self._interval_ms: float | None = None
        self._pause_ms: float | None = None
        self._last_bytes: int | None = None
        self._stream_bytes = 0
        self._parse_error: str | None = None
        # When the first byte after the previous checkpoint went by: the current one began.
        self._current_started: float | None = None
        self._first_byte_at: float | None = None
        # [bucket number, bytes] of the recent past, oldest first.
        self._buckets: collections.deque[list[int]] = collections.deque()

    def observe(self, data: memoryview) -> None:
        now = self._clock()
        with self._lock:
            self._stream_bytes += len(data)
            self._count(now, len(data))
            if self._current_started is None and self._total > 0:
                self._current_started = now
            if self._parser is None:
                return
            try:
                events = self._parser.feed(data)
            except StreamError as e:
                self._parser, self._parse_error = None, str(e)
                return
            for event in events:
                if isinstance(event, CheckpointComplete):
                    self._complete(event, now)

    def _complete(self, event: CheckpointComplete, now: float) -> None:
        if self._last_monotonic is not None:
            self._interval_ms = (now - self._last_monotonic) * 1000
        # The first checkpoint carries the live pre-copy rounds: its duration is no pause.
        if self._current_started is not None and self._total > 0:
            self._pause_ms = (now - self._current_started) * 1000
        self._current_started = None
        self._total = event.number
        self._last_time_unix = self._wall()
        self._last_monotonic = now
        self._last_bytes = event.bytes

    def _window(self) -> float:
        interval = (self._interval_ms or 0.0) / 1000
        return max(_RATE_WINDOW_S, 2 * interval)

    def _count(self, now: float, size: int) -> None:
        if self._first_byte_at is None:
            self._first_byte_at = now
        bucket = math.floor(now / _RATE_BUCKET_S)
        if self._buckets and self._buckets[-1][0] == bucket:
            self._buckets[-1][1] += size
        else:
            self._buckets.append([bucket, size])
        self._forget_before(now)

    def _forget_before(self, now: float) -> None:
        oldest = math.floor((now - self._window()) / _RATE_BUCKET_S)
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def _rate(self, now: float) -> float:
        """Bytes per second over the window, or over the stream's life while it is younger
        (never less than a bucket: one burst is no rate of gigabytes per second)."""
        if self._first_byte_at is None:
            return 0.0
        self._forget_before(now)
        span = max(min(self._window(), now - self._first_byte_at), _RATE_BUCKET_S)
        return sum(size for _, size in self._buckets) / span

    def snapshot(self) -> CheckpointSnapshot:
        now = self._clock()
        with self._lock:
            rate = self._rate(now)
            return CheckpointSnapshot(
                total=self._total,
                last_time_unix=self._last_time_unix,
                last_monotonic=self._last_monotonic,
                interval_ms=self._interval_ms,
                last_pause_ms=self._pause_ms,
                last_bytes=self._last_bytes,
                bytes_per_second=rate,
                stream_bytes=self._stream_bytes,
                parse_error=self._parse_error,
            )

    @property
    def total(self) -> int:
        return self._total
