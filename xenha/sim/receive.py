"""The restore side of `xl migrate-receive -r` (Remus) and `-c`/`--colo` (COLO).

As xl_migrate.c migrate_receive, libxl's checkpointed restore and xg_sr_restore.c do it:

- print `migration target: Ready to receive domain.`, write the banner on stdout;
- read the xl header, create `<name>--incoming` paused at once;
- apply records as they come until the first checkpoint completes; from then on buffer every
  record and apply a checkpoint only when its CHECKPOINT_END arrives;
- Remus (simulator): acknowledge each applied checkpoint with an empty CHECKPOINT_END on
  stdout, which is when the primary releases that epoch's output;
- COLO: after applying, write SVM_READY, resume the secondary copy, write SVM_RESUMED; on
  CHECKPOINT_STATE NEW suspend it, write SVM_SUSPENDED and its dirty PFN list;
- COLO on a libxl built without it (Debian's, libxl_no_colo.c): the domain is made, then the
  restore's COLO setup refuses (`Domain N:COLO is not supported`) and xl exits 1, leaving the
  domain behind paused and nameless (`(null)`; only `xl destroy <domid>` removes it);
- when the stream ends or breaks: before the first complete checkpoint there is no
  consistent state (the domain is destroyed, exit 1); otherwise drop the incomplete
  checkpoint, fail over (`migration target: Remus Failover for domain N`), rename the domain
  back to `<name>`, and (Remus) unpause it; COLO's copy already runs.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import zlib
from typing import Any, Literal, TextIO

from xenha.sim import guest
from xenha.sim.hypercall import NAMELESS, HypercallClient, HypercallError
from xenha.stream import format as fmt
from xenha.stream.errors import StreamError
from xenha.stream.format import CheckpointState, Layer, LibxcRecord, LibxlRecord
from xenha.stream.parser import (
    CheckpointComplete,
    LibxcHeaderParsed,
    Record,
    StreamParser,
    XlHeaderParsed,
)

ERROR_FAIL = -3
ERROR_INVAL = -6
READ_CHUNK = 1 << 20

Mode = Literal["remus", "colo"]


class _Failed(Exception):
    """Something other than the stream ending went wrong: no failover, just an error."""


class _ColoRefused(Exception):
    """libxl without COLO refused the restore; `domid` is the domain it left behind."""

    def __init__(self, domid: int | None) -> None:
        super().__init__(domid)
        self.domid = domid


class Receiver:
    def __init__(
        self,
        hc: HypercallClient,
        mode: Mode,
        *,
        recv_fd: int,
        send_fd: int,
        err: TextIO,
        physinfo: dict[str, Any],
    ) -> None:
        self.hc = hc
        self.mode = mode
        self.recv_fd = recv_fd
        self.send_fd = send_fd
        self.err = err
        self.digests = bool(physinfo.get("digests", False))
        self.colo_built = bool(physinfo.get("colo", True))
        self.parser = StreamParser(capture_bodies=True)
        self.domid: int | None = None
        self.name = ""
        self.uuid = ""
        self.nr_pages = 0
        self._mm: mmap.mmap | None = None
        self._buffering = False
        self._buffer: list[tuple[int, bytes]] = []
        self.checkpoints = 0
        self._svm_started = False
        self._svm_suspended = False
        self._back_broken = False

    @property
    def ha(self) -> str:
        return "COLO" if self.mode == "colo" else "Remus"

    # --- the main loop ------------------------------------------------------------------

    def run(self) -> int:
        self.err.write("migration target: Ready to receive domain.\n")
        self.err.flush()
        try:
            self._send(fmt.MIGRATE_RECEIVER_BANNER)
        except OSError as e:
            self.err.write(f"xl: fatal error: migration ack stream (banner): {e.strerror}\n")
            return 1
        reason = ""
        try:
            while True:
                try:
                    chunk = os.read(self.recv_fd, READ_CHUNK)
                except OSError as e:
                    reason = f"read error: {e.strerror}"
                    break
                if not chunk:
                    break
                for event in self.parser.feed(chunk):
                    self._event(event)
        except StreamError as e:
            reason = e.detail
        except _Failed as e:
            return self._creation_failed(str(e))
        except _ColoRefused as e:
            prefix = f"Domain {e.domid}:" if e.domid is not None else ""
            self.err.write(
                "libxl: error: libxl_no_colo.c:21:libxl__colo_restore_setup: "
                f"{prefix}COLO is not supported\n"
            )
            self.err.write(f"migration target: Domain creation failed (code {ERROR_FAIL}).\n")
            return 1
        if not reason:
            try:
                self.parser.close()
            except StreamError as e:
                reason = e.detail
        return self._stream_ended(reason)

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = os.write(self.send_fd, view)
            view = view[written:]

    def _call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return self.hc.call(op, **args)
        except HypercallError as e:
            raise _Failed(e.strerror or str(e)) from e

    # --- events -------------------------------------------------------------------------

    def _event(self, event: object) -> None:
        if isinstance(event, Record):
            self._record(event)
        elif isinstance(event, CheckpointComplete):
            self._checkpoint_complete(event)
        elif isinstance(event, XlHeaderParsed):
            header = event.header
            self.err.write(
                "Loading new save file <incoming migration stream> (new xl fmt info "
                f"0x{header.mandatory_flags:x}/0x{header.optional_flags:x}/"
                f"{header.optional_data_len})\n"
            )
            if header.config:
                json_note = (
                    " in JSON format" if header.mandatory_flags & fmt.XL_MANDATORY_FLAG_JSON else ""
                )
                self.err.write(f" Savefile contains xl domain config{json_note}\n")
            self.err.write("Parsing config from <saved>\n")
            self.err.flush()
            self._create(header.config_json())
        elif (
            isinstance(event, LibxcHeaderParsed)
            and event.header.domain_type != fmt.DomainType.X86_PV
        ):
            raise _Failed("the simulator restores x86 PV guests only")

    def _create(self, config_text: str) -> None:
        try:
            config = json.loads(config_text)
            name = str(config["c_info"]["name"])
        except (ValueError, KeyError, TypeError) as e:
            raise _Failed(f"bad domain config in the stream: {e}") from e
        self.name = name
        if self.mode == "colo" and not self.colo_built:
            config["c_info"]["name"] = NAMELESS
            try:
                made = self.hc.call(
                    "domain_create", config=config, paused=True, incoming=True, colo=False
                )
            except HypercallError:
                raise _ColoRefused(None) from None  # e.g. no memory left for it
            raise _ColoRefused(int(made["domain"]["domid"]))
        config["c_info"]["name"] = f"{name}--incoming"
        info = self._call(
            "domain_create", config=config, paused=True, incoming=True, colo=self.mode == "colo"
        )["domain"]
        self.domid = int(info["domid"])
        self.uuid = str(info["uuid"])
        self.nr_pages = int(info["nr_pages"])
        fd = os.open(info["memory_path"], os.O_RDWR)
        try:
            self._mm = mmap.mmap(fd, self.nr_pages * fmt.PAGE_SIZE)
        finally:
            os.close(fd)

    def _record(self, rec: Record) -> None:
        if rec.layer is Layer.LIBXC and rec.rtype == LibxcRecord.PAGE_DATA:
            if self._mm is None:
                raise StreamError("page data before the domain was created")
            pages = fmt.decode_page_data(rec.body or b"", offset=rec.offset)
            for pfn, data in pages.pages():
                if pfn >= self.nr_pages:
                    raise StreamError(f"pfn {pfn:#x} out of range", offset=rec.offset)
                if self._buffering:
                    self._buffer.append((pfn, bytes(data)))
                else:
                    self._mm[pfn * fmt.PAGE_SIZE : (pfn + 1) * fmt.PAGE_SIZE] = data
        elif rec.layer is Layer.LIBXL and rec.rtype == LibxlRecord.CHECKPOINT_STATE:
            # COLO: the primary asks for a new checkpoint; stop our copy and say what it
            # dirtied since the last one.
            self._svm_suspend()

    def _checkpoint_complete(self, event: CheckpointComplete) -> None:
        assert self._mm is not None
        assert self.domid is not None
        for pfn, data in self._buffer:
            self._mm[pfn * fmt.PAGE_SIZE : (pfn + 1) * fmt.PAGE_SIZE] = data
        self._buffer = []
        self._buffering = True
        self.checkpoints = event.number
        fields: dict[str, Any] = {
            "number": event.number,
            "pages": event.pages,
            "counter": guest.counter(memoryview(self._mm)),
        }
        if self.digests:
            fields["crc"] = zlib.crc32(self._mm)
        self._ledger("checkpoint_applied", **fields)
        if self.mode == "remus":
            try:
                self._send(fmt.record(LibxlRecord.CHECKPOINT_END))
            except OSError:
                # Real Remus has no back channel; a sender that stopped listening is its
                # problem, the stream still decides what happens here.
                self._back_broken = True
            return
        self._colo_resume()

    def _colo_send_state(self, state: CheckpointState) -> None:
        try:
            self._send(fmt.checkpoint_state_record(state))
        except OSError as e:
            raise StreamError(f"writing {state.name}: {e.strerror}") from e

    def _colo_resume(self) -> None:
        assert self.domid is not None
        if not self._svm_started:
            self._call("logdirty", domid=self.domid, enable=True)
        self._colo_send_state(CheckpointState.SVM_READY)
        self._call("domain_resume", domid=self.domid)
        if not self._svm_started:
            self._call("domain_unpause", domid=self.domid)
            self._svm_started = True
        self._svm_suspended = False
        self._colo_send_state(CheckpointState.SVM_RESUMED)

    def _svm_suspend(self) -> None:
        assert self.domid is not None
        self._call("domain_suspend", domid=self.domid, timeout=60.0)
        self._svm_suspended = True
        self._colo_send_state(CheckpointState.SVM_SUSPENDED)
        pfns = self._call("logdirty_clean", domid=self.domid)["pfns"]
        try:
            self._send(fmt.dirty_pfn_list_record(pfns))
        except OSError as e:
            raise StreamError(f"writing the dirty pfn list: {e.strerror}") from e

    def _ledger(self, kind: str, **fields: Any) -> None:
        fields.update(uuid=self.uuid, name=self.name, domid=self.domid)
        with contextlib.suppress(HypercallError):
            self.hc.call("ledger", kind=kind, fields=fields)

    # --- the end ------------------------------------------------------------------------

    def _creation_failed(self, detail: str) -> int:
        if detail:
            self.err.write(f"libxl: error: libxl_create.c:1612:domcreate_rebuild_done: {detail}\n")
        if self.domid is not None:
            with contextlib.suppress(HypercallError):
                self.hc.call("domain_destroy", domid=self.domid)
        self.err.write(f"migration target: Domain creation failed (code {ERROR_FAIL}).\n")
        return 1

    def _stream_ended(self, reason: str) -> int:
        if reason:
            self.err.write(f"xc: error: {reason} (0 = Success): Internal error\n")
        if self.checkpoints == 0:
            if self.domid is not None:
                self.err.write("xc: error: Restore failed (0 = Success): Internal error\n")
            return self._creation_failed("")
        assert self.domid is not None
        assert self._mm is not None
        self._buffer = []  # the incomplete checkpoint is dropped
        if self.mode == "colo":
            self.err.write("xc: info: COLO Failover\n")
            if self._svm_suspended:
                self.hc.call("domain_resume", domid=self.domid)
        else:
            self.err.write("xc: info: Restore successful\n")
        counter = guest.counter(memoryview(self._mm))
        self._ledger("restore", number=self.checkpoints, counter=counter, mode=self.mode)
        self.err.write(f"migration target: {self.ha} Failover for domain {self.domid}\n")
        self.err.flush()
        rc = 0
        try:
            self.hc.call("domain_rename", domid=self.domid, name=self.name)
        except HypercallError as e:
            rc = ERROR_INVAL if e.errno == errno.EEXIST else ERROR_FAIL
            self.err.write(
                f"migration target ({self.ha}): Failed to rename domain from "
                f"{self.name}--incoming to {self.name}:{rc}\n"
            )
        if self.mode == "colo":
            # The guest is running after failover in COLO mode; its network leaves the proxy.
            try:
                self.hc.call("network_attach", domid=self.domid)
            except HypercallError:
                rc = ERROR_FAIL
            self._ledger("failover", mode=self.mode)
            return -ERROR_FAIL if rc else 0
        try:
            self.hc.call("domain_unpause", domid=self.domid)
        except HypercallError as e:
            rc = ERROR_FAIL
            self.err.write(
                f"migration target ({self.ha}): Failed to unpause domain {self.name} "
                f"(id: {self.domid}):{rc} ({e.strerror})\n"
            )
        self._ledger("failover", mode=self.mode)
        return 1 if rc else 0
