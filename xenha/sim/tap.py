"""A transport in the middle of a replication stream, for tests that need exact faults.

`StreamTap` listens on a Unix socket (the sender's transport dials it, e.g. with
`python -m xenha.sim.pipe connect <tap.path>`) and connects to the receiver's
(`python -m xenha.sim.pipe serve ...`). It forwards both directions and parses them with the
codec, so a test can see every record and checkpoint, and can stop the forward stream at an
exact byte (say 2000 bytes into the checkpoint after the third) to cut a checkpoint in half.

    tap = StreamTap(tmp / "tap.sock", receiver=tmp / "recv.sock").start()
    tap.hold_after_checkpoint(3, extra_bytes=2000)
    tap.wait_held(timeout=30)
    ...                          # kill the sender's host
    tap.close_receiver()         # the receiver sees EOF mid-checkpoint

`dribble_back=(size, delay)` passes the back channel on in pieces of `size` bytes, `delay`
seconds apart: a slow or fragmenting network, under which xl's handshake (the receiver's
banner) and acknowledgements must still get through.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from xenha.stream.errors import StreamError
from xenha.stream.parser import BackChannelParser, CheckpointComplete, Event, StreamParser


@dataclass
class Seen:
    """What went through, with monotonic timestamps."""

    forward: list[tuple[float, Event]] = field(default_factory=list)
    back: list[tuple[float, Event]] = field(default_factory=list)
    forward_bytes: int = 0
    back_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def checkpoints(self) -> list[CheckpointComplete]:
        return [e for _, e in self.forward if isinstance(e, CheckpointComplete)]


class StreamTap:
    def __init__(
        self,
        path: Path | str,
        *,
        receiver: Path | str,
        dribble_back: tuple[int, float] | None = None,
    ) -> None:
        self.path = str(path)
        self.receiver = str(receiver)
        self.dribble_back = dribble_back
        self.seen = Seen()
        self._lock = threading.Lock()
        self._limit: int | None = None
        self._hold_after: tuple[int, int] | None = None
        self._keep_back = False
        self.held = threading.Event()
        # Set once the sender's transport and the receiver are both connected.
        self.connected = threading.Event()
        self._upstream: socket.socket | None = None
        self._downstream: socket.socket | None = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(self.path)
        self._listener.listen(1)

    def start(self) -> StreamTap:
        threading.Thread(target=self._accept, name="tap", daemon=True).start()
        return self

    def hold_after_checkpoint(
        self, number: int, *, extra_bytes: int, keep_back_channel: bool = False
    ) -> None:
        """Stop forwarding `extra_bytes` after checkpoint `number` completes. The back
        channel stops with it (a cut), unless `keep_back_channel`: then the receiver's
        acknowledgements of what it did get still reach the sender, which hears of no
        checkpoint after `number`."""
        self._hold_after = (number, extra_bytes)
        self._keep_back = keep_back_channel

    def wait_held(self, timeout: float) -> None:
        if not self.held.wait(timeout):
            raise TimeoutError("the stream never reached the hold point")

    def close_receiver(self) -> None:
        """EOF on the receiver's stdin (its end of the transport closes)."""
        if self._downstream is not None:
            with contextlib.suppress(OSError):
                self._downstream.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for sock in (self._upstream, self._downstream, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        try:
            upstream, _ = self._listener.accept()
        except OSError:
            return
        downstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        for _ in range(200):
            try:
                downstream.connect(self.receiver)
                break
            except OSError:
                time.sleep(0.025)
        self._upstream, self._downstream = upstream, downstream
        self.connected.set()
        threading.Thread(target=self._back, daemon=True).start()
        self._forward()

    def _forward(self) -> None:
        assert self._upstream is not None
        assert self._downstream is not None
        parser = StreamParser(strict=False)
        offset = 0
        while True:
            try:
                chunk = self._upstream.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                if not self.held.is_set():
                    self.close_receiver()
                return
            now = time.monotonic()
            try:
                events = parser.feed(chunk)
            except StreamError as e:
                self.seen.errors.append(str(e))
                events = []
            with self._lock:
                for event in events:
                    self.seen.forward.append((now, event))
                    if (
                        self._hold_after is not None
                        and self._limit is None
                        and isinstance(event, CheckpointComplete)
                        and event.number == self._hold_after[0]
                    ):
                        self._limit = event.offset + self._hold_after[1]
            send = chunk
            if self._limit is not None:
                send = chunk[: max(0, self._limit - offset)]
            offset += len(chunk)
            if send:
                try:
                    self._downstream.sendall(send)
                except OSError:
                    return
                self.seen.forward_bytes += len(send)
            if self._limit is not None and offset >= self._limit:
                self.held.set()

    def _back(self) -> None:
        assert self._upstream is not None
        assert self._downstream is not None
        parser = BackChannelParser()
        while True:
            try:
                chunk = self._downstream.recv(1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with contextlib.suppress(OSError):
                    self._upstream.shutdown(socket.SHUT_WR)
                return
            now = time.monotonic()
            try:
                events = parser.feed(chunk)
            except StreamError as e:
                self.seen.errors.append(str(e))
                events = []
            with self._lock:
                self.seen.back.extend((now, e) for e in events)
            self.seen.back_bytes += len(chunk)
            if self.held.is_set() and not self._keep_back:
                continue  # the held sender hears nothing more either
            try:
                self._send_back(chunk)
            except OSError:
                return

    def _send_back(self, chunk: bytes) -> None:
        assert self._upstream is not None
        if self.dribble_back is None:
            self._upstream.sendall(chunk)
            return
        size, delay = self.dribble_back
        for start in range(0, len(chunk), size):
            self._upstream.sendall(chunk[start : start + size])
            time.sleep(delay)
