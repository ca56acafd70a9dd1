"""A guest's network output: sent at once, held per epoch (Remus), or compared (COLO).

Replies leave in the order the guest produced them (one FIFO per domain), so a held reply
also holds every later one: a client never sees the counter go backwards because a later
reply overtook an earlier one.

- `direct`: unprotected; a reply leaves at once.
- `remus`: network buffering. The guest's execution is cut into epochs at every checkpoint
  suspend; the replies of epoch k leave when checkpoint k is committed, which in the
  simulator means acknowledged by the receiver (docs/design.md, "Remus output commit").
- `colo`: the proxy compares each reply with the secondary's; a matching reply leaves at
  once, a different one (or one the secondary could not answer) waits for the next
  checkpoint to commit.

Leaving `remus`/`colo` (replication broke, the guest runs on unprotected) releases what is
held, as the guest's TCP would retransmit it once the buffering qdisc is gone.

Epochs are numbered per replication session, as `xl remus` numbers its checkpoints: every
session (`start_session`, when `xl remus` sets up buffering or the proxy) counts from epoch
1 again, and a commit names its session, so that a guest protected a second time (after a
failover back, a suspend/resume, a lost backup) has its output released by the new
session's acknowledgements, and a late commit of an old session releases nothing.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Mode = Literal["direct", "remus", "colo"]
# (value, epoch that released it or None, session of that epoch or None, mode, matched)
OnRelease = Callable[[int, int | None, int | None, str, bool], None]


@dataclass(slots=True)
class _Pending:
    conn: socket.socket
    data: bytes
    value: int
    session: int
    epoch: int
    matched: bool
    mode: Mode


class OutputGate:
    def __init__(self, on_release: OnRelease, *, mode: Mode = "direct") -> None:
        self._on_release = on_release
        self._mode: Mode = mode
        self._session = 0  # no replication session yet
        self._epoch = 1  # the session's checkpoint that will contain the current state
        self._committed = 0
        self._queue: collections.deque[_Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._release_loop, name="output", daemon=True)
        self._thread.start()

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def session(self) -> int:
        return self._session

    @property
    def held(self) -> int:
        with self._cond:
            return len(self._queue)

    def set_mode(self, mode: Mode) -> None:
        with self._cond:
            if mode == "direct":
                for item in self._queue:
                    item.matched = True
            self._mode = mode
            self._cond.notify_all()

    def start_session(self, mode: Mode) -> int:
        """A replication session starts buffering (`remus`) or comparing (`colo`): its first
        checkpoint will contain the guest's state from now back, so epochs count from 1
        again. Output still held by an earlier session that never tore down (its xl was
        killed) belongs to that first checkpoint too. Returns the session, for `commit`."""
        with self._cond:
            self._session += 1
            self._epoch = 1
            self._committed = 0
            for item in self._queue:
                item.session, item.epoch = self._session, 1
            self._mode = mode
            self._cond.notify_all()
            return self._session

    def submit(
        self, conn: socket.socket, data: bytes, value: int, *, matched: bool = False
    ) -> None:
        with self._cond:
            if self._closed:
                return
            item = _Pending(
                conn,
                data,
                value,
                self._session,
                self._epoch,
                matched or self._mode == "direct",
                self._mode,
            )
            self._queue.append(item)
            self._cond.notify_all()

    def close_epoch(self) -> int:
        """At a checkpoint's suspend: the state so far is checkpoint `epoch`; later output
        belongs to the next one. Returns the epoch just closed."""
        with self._cond:
            closed = self._epoch
            self._epoch += 1
            return closed

    def commit(self, checkpoint: int, session: int) -> None:
        """Checkpoint `checkpoint` of `session` reached the backup: release its output and
        earlier. A commit of a session that is over changes nothing."""
        with self._cond:
            if session == self._session and checkpoint > self._committed:
                self._committed = checkpoint
                self._cond.notify_all()

    def close(self) -> None:
        """The domain is gone: drop what is held. Once this returns, no reply is released
        (or recorded as released) any more."""
        with self._cond:
            self._closed = True
            self._queue.clear()
            self._cond.notify_all()

    def _ready(self) -> _Pending | None:
        if self._closed or not self._queue:
            return None
        head = self._queue[0]
        if head.matched or head.epoch <= self._committed:
            return self._queue.popleft()
        return None

    def _release_loop(self) -> None:
        while True:
            with self._cond:
                item = self._ready()
                while item is None and not self._closed:
                    self._cond.wait()
                    item = self._ready()
                if item is None:
                    return
                by_commit = not item.matched and item.epoch <= self._committed
                # Recorded before the send: the ledger errs on the side of "released". Under
                # the lock, so that `close` cannot return while a release is being recorded.
                self._on_release(
                    item.value,
                    item.epoch if by_commit else None,
                    item.session if by_commit else None,
                    item.mode,
                    item.matched,
                )
            try:
                item.conn.sendall(item.data)
            except OSError:
                # The client left; its reply never reached anyone.
                with contextlib.suppress(OSError):
                    item.conn.close()
