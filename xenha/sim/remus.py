"""The save side of `xl remus` (libxl_domain_remus_start + libxc's checkpointed save).

Order of business, as xl_migrate.c, libxl_remus.c / libxl_colo_save.c and xg_sr_save.c do it:

1. xl: start the transport (`sh -c <rune>`), read the receiver's banner, write the xl header.
2. libxl: header, LIBXC_CONTEXT; libxc: image + domain header, static records.
3. libxc live phase: all pages, then up to 4 rounds of dirty pages while the guest runs.
4. Every checkpoint: suspend, dirty pages (COLO: merged with the secondary's list), TSC,
   shared info, vcpus, CHECKPOINT.
   Remus: resume, CHECKPOINT_END, commit buffered output, sleep the interval.
   COLO: CHECKPOINT_END, read SVM_READY, resume, read SVM_RESUMED, wait for the proxy (a
   divergence or the periodic timeout), write CHECKPOINT_STATE NEW; the next suspend reads
   SVM_SUSPENDED and the secondary's CHECKPOINT_DIRTY_PFN_LIST.
5. Any failure of the transport ends it; xl then decides what to print (see `xl.py`).

Output commit (simulator): in Remus with network buffering the output of epoch k leaves when
the receiver acknowledges checkpoint k with an empty CHECKPOINT_END on the back channel.
Checkpoints are numbered per `xl remus` run; setting up buffering starts an output session
in which the guest's epochs count from 1 as well, and every commit names that session (see
`xenha.sim.output`).
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import queue
import subprocess
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from xenha.sim.hypercall import HypercallClient, HypercallError
from xenha.stream import format as fmt
from xenha.stream import pv
from xenha.stream.errors import StreamError
from xenha.stream.format import CheckpointState, Layer, LibxcRecord, LibxlRecord
from xenha.stream.parser import BackChannelParser, Record

IOV_MAX = 1024
LIVE_MAX_ITERATIONS = 5
LIVE_DIRTY_THRESHOLD = 50


class TransportBroken(Exception):
    """The stream to the backup (or back from it) failed."""


class DomainGone(Exception):
    """The domain disappeared under us (an admin `xl destroy`)."""


class SuspendTimedOut(Exception):
    """The guest did not suspend (libxl's ERROR_GUEST_TIMEDOUT)."""


@dataclass(frozen=True)
class RemusSettings:
    interval_ms: int
    colo: bool
    netbuf: bool
    blackhole: bool
    domid: int
    ledger_name: str


def write_all(fd: int, buffers: Sequence[bytes | memoryview]) -> int:
    """writev everything, however the kernel splits it."""
    pending = [memoryview(b) for b in buffers if len(b)]
    total = sum(len(b) for b in pending)
    while pending:
        try:
            done = os.writev(fd, pending[:IOV_MAX])
        except OSError as e:
            raise TransportBroken(f"write failed: {e.strerror}") from e
        while done:
            if done >= len(pending[0]):
                done -= len(pending[0])
                pending.pop(0)
            else:
                pending[0] = pending[0][done:]
                done = 0
    return total


class BackChannel:
    """Reads the receiver's stdout in a thread; records go to a queue, acks to a callback."""

    def __init__(self, fd: int, *, on_ack: Any = None) -> None:
        self.fd = fd
        self.records: queue.Queue[Record | None] = queue.Queue()
        self.broken = threading.Event()
        self.reason = ""
        self._on_ack = on_ack
        self._thread = threading.Thread(target=self._run, name="back-channel", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        parser = BackChannelParser(expect_banner=False)
        acks = 0
        try:
            while True:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    self.reason = "end of stream"
                    break
                for event in parser.feed(chunk):
                    if not isinstance(event, Record):
                        continue
                    if event.is_(Layer.LIBXL, LibxlRecord.CHECKPOINT_END):
                        acks += 1
                        if self._on_ack is not None:
                            self._on_ack(acks)
                    else:
                        self.records.put(event)
        except (OSError, StreamError) as e:
            self.reason = str(e)
        self.broken.set()
        self.records.put(None)

    def expect(self, layer: Layer, rtype: int, what: str) -> Record:
        rec = self.records.get()
        if rec is None:
            raise TransportBroken(f"reading {what}: {self.reason}")
        if not rec.is_(layer, rtype):
            raise TransportBroken(f"invalid section: {rec.name}, expected: {what}")
        return rec

    def expect_state(self, state: CheckpointState) -> None:
        rec = self.expect(Layer.LIBXL, LibxlRecord.CHECKPOINT_STATE, state.name)
        got = fmt.decode_checkpoint_state(rec.body or b"")
        if got != state:
            raise TransportBroken(f"invalid section: {got}, expected: {int(state)}")


class Saver:
    """Writes one domain's checkpointed stream to `send_fd` until something breaks."""

    def __init__(
        self,
        hc: HypercallClient,
        settings: RemusSettings,
        send_fd: int,
        back: BackChannel | None,
        err: TextIO,
        *,
        physinfo: dict[str, Any],
        info: dict[str, Any],
    ) -> None:
        self.hc = hc
        self.s = settings
        self.fd = send_fd
        self.back = back
        self.err = err
        self.physinfo = physinfo
        self.info = info
        self.nr_pages = int(info["nr_pages"])
        self.suspend_timeout = float(physinfo.get("suspend_timeout", 60.0))
        self.digests = bool(physinfo.get("digests", False))
        self.colo_interval = float(physinfo.get("colo_interval", 5.0))
        self.checkpoints = 0
        # The output session buffering started (None: output is not held).
        self.output_session: int | None = None
        self.bytes = 0
        self._mm: mmap.mmap | None = None
        self._suspended = False
        self._crc: int | None = None
        self._pages = 0

    # --- hypercalls, with the domain's disappearance made explicit ----------------------------

    def _hc(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return self.hc.call(op, domid=self.s.domid, **args)
        except HypercallError as e:
            if e.errno == errno.ESRCH:
                raise DomainGone() from e
            if e.errno == errno.ETIMEDOUT:
                raise SuspendTimedOut() from e
            raise

    def _write(self, buffers: Sequence[bytes | memoryview]) -> None:
        if self.back is not None and self.back.broken.is_set() and not self.s.colo:
            raise TransportBroken(f"backup stopped acknowledging: {self.back.reason}")
        self.bytes += write_all(self.fd, buffers)

    def _suspend(self) -> None:
        self._hc("domain_suspend", timeout=self.suspend_timeout)
        self._suspended = True

    def _resume(self) -> None:
        self._hc("domain_resume")
        self._suspended = False

    def _dirty(self) -> list[int]:
        pfns: list[int] = self._hc("logdirty_clean")["pfns"]
        return pfns

    def _send_pages(self, pfns: Sequence[int]) -> None:
        assert self._mm is not None
        memory = memoryview(self._mm)
        try:
            for parts in pv.page_records(memory, pfns):
                self._write(parts)
        finally:
            memory.release()

    # --- the save -----------------------------------------------------------------------

    def run(self) -> None:
        """Returns only by raising: TransportBroken, DomainGone or SuspendTimedOut."""
        fd = os.open(self.info["memory_path"], os.O_RDONLY)
        try:
            self._mm = mmap.mmap(fd, self.nr_pages * fmt.PAGE_SIZE, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        major, minor = int(self.physinfo["xen_major"]), int(self.physinfo["xen_minor"])
        self._write(
            [
                fmt.LibxlHeader().encode(),
                fmt.record(LibxlRecord.LIBXC_CONTEXT),
                fmt.LibxcHeader(xen_major=major, xen_minor=minor).encode(),
                *pv.prologue_records(self.nr_pages),
            ]
        )
        self._hc("logdirty", enable=True)
        if self.s.colo:
            self.output_session = self._hc("output_mode", mode="colo")["session"]
        elif self.s.netbuf:
            self.output_session = self._hc("output_mode", mode="remus")["session"]
        self._live_rounds()
        if self.s.colo:
            self._colo_loop()
        else:
            self._remus_loop()

    def _live_rounds(self) -> None:
        self._send_pages(range(self.nr_pages))
        for _ in range(1, LIVE_MAX_ITERATIONS):
            dirty = self._dirty()
            self._send_pages(dirty)
            if len(dirty) <= LIVE_DIRTY_THRESHOLD:
                break

    def _checkpoint_body(self, extra_dirty: Sequence[int] = ()) -> int:
        """With the guest suspended: its dirty pages, tail and CHECKPOINT. Returns pages."""
        dirty = self._dirty()
        if extra_dirty:
            dirty = sorted(set(dirty).union(extra_dirty))
        self._send_pages(dirty)
        number = self.checkpoints + 1
        crc = None
        if self.digests:
            assert self._mm is not None
            crc = zlib.crc32(self._mm)
        tail = pv.checkpoint_tail_records(
            number, int(self.info.get("vcpus", 1)), nsec=time.monotonic_ns()
        )
        # Everything up to and including libxc's CHECKPOINT; CHECKPOINT_END is libxl's.
        self._write(tail[:-1])
        self._crc = crc
        self._pages = len(dirty)
        return len(dirty)

    def _checkpoint_end(self) -> None:
        self._write([fmt.record(LibxlRecord.CHECKPOINT_END)])
        self.checkpoints += 1
        fields: dict[str, Any] = {"number": self.checkpoints, "pages": self._pages}
        if self._crc is not None:
            fields["crc"] = self._crc
        self._ledger("checkpoint_sent", **fields)

    def commit_output(self, checkpoint: int) -> None:
        """Release the output held for `checkpoint` of this run, if any is held."""
        if self.output_session is not None:
            self._hc("output_commit", checkpoint=checkpoint, session=self.output_session)

    def _ledger(self, kind: str, **fields: Any) -> None:
        fields.update(uuid=self.info["uuid"], name=self.s.ledger_name, domid=self.s.domid)
        with contextlib.suppress(HypercallError):
            self.hc.call("ledger", kind=kind, fields=fields)

    def _remus_loop(self) -> None:
        while True:
            self._suspend()
            self._checkpoint_body()
            # postcopy: the guest runs again before libxl ends the checkpoint.
            self._resume()
            self._checkpoint_end()
            if self.back is None:
                # Blackhole: nobody can acknowledge; release when written, like real xl.
                self.commit_output(self.checkpoints)
            if self.back is not None and self.back.broken.wait(self.s.interval_ms / 1000):
                raise TransportBroken(f"backup stopped acknowledging: {self.back.reason}")
            if self.back is None:
                time.sleep(self.s.interval_ms / 1000)

    def _colo_loop(self) -> None:
        assert self.back is not None
        svm_running = False
        while True:
            self._suspend()
            secondary_dirty: list[int] = []
            if svm_running:
                self.back.expect_state(CheckpointState.SVM_SUSPENDED)
                rec = self.back.expect(
                    Layer.LIBXC, LibxcRecord.CHECKPOINT_DIRTY_PFN_LIST, "dirty pfn list"
                )
                secondary_dirty = fmt.decode_dirty_pfn_list(rec.body or b"")
            self._checkpoint_body(secondary_dirty)
            self._checkpoint_end()
            self.back.expect_state(CheckpointState.SVM_READY)
            svm_running = True
            self._resume()
            self.back.expect_state(CheckpointState.SVM_RESUMED)
            # Both copies now hold the same state: what the proxy held may leave.
            self.commit_output(self.checkpoints)
            self._hc("colo_wait", timeout=self.colo_interval)
            self._write([fmt.checkpoint_state_record(CheckpointState.NEW)])

    def teardown(self, *, resume: bool) -> None:
        """After a failure: stop buffering, and resume the guest if asked (and it exists)."""
        for op, args in (
            ("output_mode", {"mode": "direct"}),
            ("logdirty", {"enable": False}),
        ):
            try:
                self.hc.call(op, domid=self.s.domid, **args)
            except HypercallError:
                return
        if resume and self._suspended:
            with contextlib.suppress(HypercallError):
                self.hc.call("domain_resume", domid=self.s.domid)


def spawn_transport(rune: str) -> subprocess.Popen[bytes]:
    """xl's create_migration_child: `sh -c <rune>` with pipes on its stdin and stdout."""
    return subprocess.Popen(["sh", "-c", rune], stdin=subprocess.PIPE, stdout=subprocess.PIPE)


def read_exactly(fd: int, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        try:
            chunk = os.read(fd, size - len(out))
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    return bytes(out)


def migration_child_report(child: subprocess.Popen[bytes], err: TextIO) -> None:
    """Wait up to 2 s for the transport to exit and report a failure status, as xl does."""
    try:
        status = child.wait(timeout=2)
    except subprocess.TimeoutExpired:
        err.write(
            f"migration child [{child.pid}] not exiting, no longer waiting "
            "(exit status will be unreported)\n"
        )
        return
    if status > 0:
        err.write(
            f"libxl: info: libxl_exec.c:117:libxl_report_child_exitstatus: migration "
            f"transport process [{child.pid}] exited with error status {status}\n"
        )
    elif status < 0:
        err.write(
            f"libxl: info: libxl_exec.c:117:libxl_report_child_exitstatus: migration "
            f"transport process [{child.pid}] died due to fatal signal {-status}\n"
        )
