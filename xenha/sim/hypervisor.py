"""The simulated hypervisor: domains, their memory, scheduling, dirty logging, output.

A domain's memory is a file in the host's state directory (`domains/<domid>.mem`), mapped
shared by this daemon (the guest writes it) and by `xl` processes (the save side reads it,
the restore side writes it), as libxc maps a guest's pages.

Two kinds of stop, as in Xen: an admin pause (`xl pause`, nests like Xen's pause count)
and a checkpoint suspend (the guest suspends itself for `xl remus`). A PV guest has to run to
suspend, so suspending an admin-paused guest waits and then times out, like libxl's
suspend does on real Xen ("Failed to suspend domain at primary").
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import socket
import threading
import time
import uuid as uuidlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenha.sim import guest
from xenha.sim.domstore import DomainStore
from xenha.sim.hypercall import NAMELESS, HypercallClient, HypercallError, no_such_domain
from xenha.sim.ledger import Ledger
from xenha.sim.output import Mode, OutputGate
from xenha.sim.service import Service, reserve_port
from xenha.stream.format import PAGE_SIZE

log = logging.getLogger(__name__)

TICK_SECONDS = 0.01
MEMORY_MIB_MIN = 16
MEMORY_MIB_MAX = 1024
COLO_PROXY_TIMEOUT = 1.0
DOM0_NAME = "Domain-0"


@dataclass(frozen=True)
class HostSpec:
    name: str
    state_dir: Path
    total_memory_mib: int = 8192
    dom0_memory_mib: int = 1024
    nr_cpus: int = 2
    xen_version: str = "4.17.5"
    virt_caps: tuple[str, ...] = ("pv", "hvm", "hap", "shadow", "gnttab-v1", "gnttab-v2")
    colo: bool = True
    fabric_dir: Path | None = None
    # Ledger a CRC of the whole memory at every checkpoint (sender and receiver).
    digests: bool = False
    # COLO: checkpoint at least this often when outputs keep matching (Xen: 5 s).
    colo_interval: float = 5.0
    # How long a checkpoint suspend waits for a guest that cannot run (admin-paused).
    suspend_timeout: float = 60.0

    @property
    def xen_major_minor(self) -> tuple[int, int]:
        major, minor = self.xen_version.split(".")[:2]
        return int(major), int(minor)


@dataclass(frozen=True)
class GuestSpec:
    """The parts of a libxl domain config JSON the simulator acts on."""

    name: str
    uuid: str
    memory_mib: int
    vcpus: int
    type: str
    dirty_rate: float
    service_ip: str
    service_port: int
    divergence: float

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GuestSpec:
        c_info = config.get("c_info", {})
        b_info = config.get("b_info", {})
        sim = config.get("xenha_sim", {})
        host, _, port = str(sim.get("service", "127.0.0.1:0")).rpartition(":")
        return cls(
            name=str(c_info["name"]),
            uuid=str(c_info.get("uuid") or uuidlib.uuid4()),
            memory_mib=int(b_info.get("target_memkb", 16384)) // 1024,
            vcpus=int(b_info.get("max_vcpus", 1)),
            type=str(c_info.get("type", "pv")),
            dirty_rate=float(sim.get("dirty_rate", 0)),
            service_ip=host or "127.0.0.1",
            service_port=int(port or 0),
            divergence=float(sim.get("divergence", 0.0)),
        )


class Domain:
    def __init__(
        self,
        hv: Hypervisor,
        domid: int,
        config: dict[str, Any],
        *,
        paused: bool,
        incoming: bool,
        colo_secondary: bool,
    ) -> None:
        self.hv = hv
        self.domid = domid
        self.config = config
        spec = GuestSpec.from_config(config)
        self.spec = spec
        self.name = spec.name
        self.uuid = spec.uuid
        self.nr_pages = spec.memory_mib * 1024 * 1024 // PAGE_SIZE
        self.incoming = incoming
        self.colo_secondary = colo_secondary
        # Remus' incoming copy has its vif like any domain (only its pause keeps it quiet); a
        # COLO secondary's network goes through the proxy until failover.
        self.net_attached = not colo_secondary
        self.pause_count = 1 if paused else 0
        self.suspended = False
        self.destroyed = False
        self.active = False
        self.created = time.time()
        self._cond = threading.Condition()
        self._dirty_lock = threading.Lock()
        self._logdirty = False
        self._dirty: set[int] = set()
        self._divergence = threading.Event()
        self._proxy: ColoProxy | None = None
        # Holds a service port this host picked for the guest (see `reserve_port`).
        self.port_reservation: socket.socket | None = None

        self.memory_path = hv.spec.state_dir / "domains" / f"{domid}.mem"
        self.memory_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.memory_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, self.nr_pages * PAGE_SIZE)
            self._mm = mmap.mmap(fd, self.nr_pages * PAGE_SIZE)
        finally:
            os.close(fd)
        self.memory = memoryview(self._mm)
        if not incoming:
            guest.initialise(self.memory, seed=uuidlib.UUID(self.uuid).int)

        self.gate = OutputGate(self._released)
        self.service = Service(
            spec.service_ip, spec.service_port, self._request, name=f"dom{domid}"
        )
        self._thread = threading.Thread(target=self._run, name=f"dom{domid}", daemon=True)
        self._thread.start()

    # --- state ----------------------------------------------------------------------------

    @property
    def runnable(self) -> bool:
        return not self.destroyed and self.pause_count == 0 and not self.suspended

    def flags(self) -> str:
        """xl list's State column as xl_list.c prints libxl_dominfo: running, blocked,
        paused, shutdown, the shutdown reason's letter (`-rscwS`: s for suspend) and dying.
        The flags are independent: a guest paused while suspended for a checkpoint (fenced
        mid-checkpoint, or its `xl remus` killed there) is `--pss-`."""
        if self.suspended:
            return f"--{'p' if self.pause_count else '-'}ss-"
        if self.pause_count:
            return "--p---"
        return "r-----" if self.spec.dirty_rate > 0 else "-b----"

    def info(self) -> dict[str, Any]:
        return {
            "domid": self.domid,
            "name": self.name,
            "uuid": self.uuid,
            "memory_mib": self.spec.memory_mib,
            "vcpus": self.spec.vcpus,
            "flags": self.flags(),
            "cpu_time": guest.tick_count(self.memory) * 0.002,
            "paused": self.pause_count > 0,
            "suspended": self.suspended,
            "incoming": self.incoming,
            "colo_secondary": self.colo_secondary,
            "active": self.active,
            "nr_pages": self.nr_pages,
            "memory_path": str(self.memory_path),
            "service": f"{self.spec.service_ip}:{self.spec.service_port}",
            "output_mode": self.gate.mode,
            "created": self.created,
        }

    def _update_activity(self) -> None:
        """Called with `_cond` held after anything that may change whether output flows."""
        active = self.net_attached and self.pause_count == 0 and not self.destroyed
        if active == self.active:
            return
        self.active = active
        self.hv.copy_event(self, "active" if active else "passive")
        if active:
            try:
                self.service.open()
            except OSError as e:
                log.error("dom%d cannot bind %s: %s", self.domid, self.service.address, e)
        else:
            self.service.close_listener()

    # --- guest execution ------------------------------------------------------------------

    def _mark(self, pfn: int) -> None:
        if self._logdirty:
            with self._dirty_lock:
                self._dirty.add(pfn)

    def _run(self) -> None:
        credit = 0.0
        per_tick = self.spec.dirty_rate * TICK_SECONDS
        next_tick = time.monotonic()
        while True:
            with self._cond:
                while not self.runnable and not self.destroyed:
                    self._cond.wait()
                    next_tick = time.monotonic()
                if self.destroyed:
                    return
                if guest.is_initialised(self.memory):
                    credit += per_tick
                    pages = int(credit)
                    credit -= pages
                    guest.tick(self.memory, self.nr_pages, pages, self._mark)
            next_tick += TICK_SECONDS
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_tick = time.monotonic()

    def _request(self, conn: socket.socket, line: bytes) -> None:
        with self._cond:
            while not self.runnable and not self.destroyed:
                self._cond.wait()
            if self.destroyed:
                return
            value, reply = guest.serve(self.memory, self._mark, divergence=self.spec.divergence)
            matched = False
            if self.gate.mode == "colo" and self._proxy is not None:
                # Compared under the guest's lock, so the secondary sees requests in our order.
                other = self._proxy.forward(line)
                matched = other == reply
                if other is not None and not matched:
                    self._divergence.set()
            self.gate.submit(conn, reply, value, matched=matched)

    def serve_mirrored(self, line: bytes) -> bytes | None:
        """COLO secondary: run a request the primary's proxy mirrored to us; None if this
        copy is not running (suspended for a checkpoint, or not started yet)."""
        with self._cond:
            if not self.runnable:
                return None
            _value, reply = guest.serve(self.memory, self._mark, divergence=self.spec.divergence)
            return reply

    def _released(
        self, value: int, epoch: int | None, session: int | None, mode: str, matched: bool
    ) -> None:
        self.hv.ledger.record(
            "reply",
            uuid=self.uuid,
            name=self.base_name,
            domid=self.domid,
            value=value,
            epoch=epoch,
            session=session,
            mode=mode,
            matched=matched,
        )

    @property
    def base_name(self) -> str:
        return self.name.removesuffix("--incoming")

    # --- control --------------------------------------------------------------------------

    def pause(self) -> None:
        with self._cond:
            self.pause_count += 1
            self._update_activity()
            self._cond.notify_all()

    def unpause(self) -> None:
        with self._cond:
            if self.pause_count == 0:
                raise HypercallError(errno.EINVAL, "Invalid argument")
            self.pause_count -= 1
            self._update_activity()
            self._cond.notify_all()

    def suspend(self, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.pause_count and not self.destroyed:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise HypercallError(errno.ETIMEDOUT, "guest did not suspend, timed out")
                self._cond.wait(left)
            if self.destroyed:
                raise no_such_domain(self.domid)
            self.suspended = True
            return self.gate.close_epoch()

    def resume(self) -> None:
        with self._cond:
            self.suspended = False
            self._cond.notify_all()

    def logdirty(self, enable: bool) -> None:
        with self._dirty_lock:
            self._logdirty = enable
            self._dirty = set()

    def logdirty_clean(self) -> list[int]:
        with self._dirty_lock:
            dirty, self._dirty = self._dirty, set()
        return sorted(dirty)

    def network_attach(self) -> None:
        with self._cond:
            self.colo_secondary = False
            self.net_attached = True
            self.gate.set_mode("direct")
            self._update_activity()
        self.hv.colo_registry_remove(self.uuid)

    def set_output(self, mode: Mode) -> int | None:
        """Buffer (`remus`), compare (`colo`) or release (`direct`) the guest's output.
        Entering `remus`/`colo` starts a replication session: returns its number, which
        that session's commits carry."""
        if mode == "colo":
            self._proxy = ColoProxy(self.hv, self.uuid)
        elif self._proxy is not None:
            self._proxy.close()
            self._proxy = None
        self._divergence.clear()
        if mode == "direct":
            self.gate.set_mode(mode)
            return None
        return self.gate.start_session(mode)

    def colo_wait(self, timeout: float) -> str:
        if self._divergence.wait(timeout):
            self._divergence.clear()
            return "divergence"
        return "timeout"

    def start(self) -> None:
        with self._cond:
            self._update_activity()

    def stop(self) -> None:
        """No output leaves this copy any more, the ledger says it is gone, and only then
        do hypercalls stop finding it (a caller that saw it gone may at once make another
        copy active)."""
        with self._cond:
            if self.destroyed:
                return
            self.gate.close()
            self.active = False
            self.hv.copy_event(self, "gone")
            self.destroyed = True
            self._cond.notify_all()

    def destroy(self) -> None:
        self.stop()
        self.service.close()
        if self.port_reservation is not None:
            self.port_reservation.close()
        if self._proxy is not None:
            self._proxy.close()
        self._thread.join(timeout=2)
        try:
            self.memory.release()
            self._mm.close()
        except BufferError:
            pass  # a thread still holds a view; the mapping goes with it

        with contextlib.suppress(FileNotFoundError):
            self.memory_path.unlink()


class ColoProxy:
    """The primary's side of the COLO proxy: mirror a request to the secondary copy and
    return its reply (None if it could not answer in time)."""

    def __init__(self, hv: Hypervisor, uuid: str) -> None:
        self.hv = hv
        self.uuid = uuid
        self._client: HypercallClient | None = None

    def forward(self, line: bytes) -> bytes | None:
        for _attempt in range(2):
            client = self._connect()
            if client is None:
                return None
            try:
                answer = client.call("colo_request", uuid=self.uuid, line=line.decode())
            except (OSError, ValueError):
                self.close()
                continue
            reply = answer.get("reply")
            return None if reply is None else str(reply).encode()
        return None

    def _connect(self) -> HypercallClient | None:
        if self._client is None:
            peer = self.hv.colo_registry_lookup(self.uuid)
            if peer is None:
                return None
            try:
                self._client = HypercallClient(peer, timeout=COLO_PROXY_TIMEOUT)
            except OSError:
                return None
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


class Hypervisor:
    def __init__(self, spec: HostSpec, *, ledger: Ledger, store: DomainStore) -> None:
        self.spec = spec
        self.ledger = ledger
        self.store = store
        self._lock = threading.RLock()
        self._domains: dict[int, Domain] = {}
        self._next_domid = 1
        self.hypercall_path: Path | None = None
        self._started = time.monotonic()
        store.dom0(DOM0_NAME, spec.dom0_memory_mib)

    # --- lookup ---------------------------------------------------------------------------

    def domain(self, domid: int) -> Domain:
        with self._lock:
            dom = self._domains.get(int(domid))
        if dom is None or dom.destroyed:
            raise no_such_domain(domid)
        return dom

    def by_uuid(self, uuid: str) -> Domain | None:
        with self._lock:
            return next((d for d in self._domains.values() if d.uuid == uuid), None)

    def domains(self) -> list[Domain]:
        with self._lock:
            return sorted(self._domains.values(), key=lambda d: d.domid)

    def free_memory_mib(self) -> int:
        used = sum(d.spec.memory_mib for d in self.domains())
        return self.spec.total_memory_mib - self.spec.dom0_memory_mib - used

    # --- events ---------------------------------------------------------------------------

    def copy_event(self, dom: Domain, state: str) -> None:
        self.ledger.record("copy", uuid=dom.uuid, name=dom.base_name, domid=dom.domid, state=state)

    # --- COLO secondaries are found by domain uuid in the fabric ----------------------------

    def _registry(self, uuid: str) -> Path | None:
        if self.spec.fabric_dir is None:
            return None
        return self.spec.fabric_dir / "colo" / f"{uuid}.json"

    def colo_registry_add(self, uuid: str) -> None:
        path = self._registry(uuid)
        if path is None or self.hypercall_path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"host": self.spec.name, "hypercall": str(self.hypercall_path)}))
        tmp.replace(path)

    def colo_registry_remove(self, uuid: str) -> None:
        path = self._registry(uuid)
        if path is None:
            return
        with contextlib.suppress(FileNotFoundError, ValueError):
            if json.loads(path.read_text()).get("host") == self.spec.name:
                path.unlink()

    def colo_registry_lookup(self, uuid: str) -> str | None:
        path = self._registry(uuid)
        if path is None:
            return None
        try:
            return str(json.loads(path.read_text())["hypercall"])
        except (FileNotFoundError, ValueError, KeyError):
            return None

    # --- operations -----------------------------------------------------------------------

    def create(self, config: dict[str, Any], *, paused: bool, incoming: bool, colo: bool) -> Domain:
        spec = GuestSpec.from_config(config)
        if not MEMORY_MIB_MIN <= spec.memory_mib <= MEMORY_MIB_MAX:
            raise HypercallError(
                errno.EINVAL,
                f"memory {spec.memory_mib} MiB outside {MEMORY_MIB_MIN}..{MEMORY_MIB_MAX}",
            )
        with self._lock:
            names = {d.name for d in self.domains()} | {DOM0_NAME}
            if spec.name in names and spec.name != NAMELESS:
                raise HypercallError(
                    errno.EEXIST, f'domain with name "{spec.name}" already exists.'
                )
            if spec.memory_mib > self.free_memory_mib():
                raise HypercallError(errno.ENOMEM, "Cannot allocate memory")
            config = json.loads(json.dumps(config))
            config.setdefault("c_info", {})["uuid"] = spec.uuid
            reservation = None
            if spec.service_port == 0:
                reservation = reserve_port(spec.service_ip)
                port = reservation.getsockname()[1]
                config.setdefault("xenha_sim", {})["service"] = f"{spec.service_ip}:{port}"
            domid = self._next_domid
            self._next_domid += 1
            try:
                dom = Domain(
                    self, domid, config, paused=paused, incoming=incoming, colo_secondary=colo
                )
            except BaseException:
                if reservation is not None:
                    reservation.close()
                raise
            dom.port_reservation = reservation
            self._domains[domid] = dom
        self.copy_event(dom, "passive")
        self.store.introduce(dom.domid, dom.name, dom.uuid, dom.spec.memory_mib, dom.spec.vcpus)
        if colo:
            self.colo_registry_add(dom.uuid)
        dom.start()
        return dom

    def destroy(self, domid: int) -> None:
        dom = self.domain(domid)
        # Gone in the ledger before anyone can find it gone: xl remus ends its stream the
        # moment a hypercall misses the domain, and the backup takes over at once.
        dom.stop()
        with self._lock:
            self._domains.pop(dom.domid, None)
        dom.destroy()
        if dom.colo_secondary:
            self.colo_registry_remove(dom.uuid)
        self.store.release(dom.domid, dom.uuid)

    def rename(self, domid: int, new_name: str) -> None:
        dom = self.domain(domid)
        with self._lock:
            if any(d.name == new_name and d is not dom for d in self.domains()) or (
                new_name == DOM0_NAME
            ):
                raise HypercallError(errno.EEXIST, f'domain with name "{new_name}" already exists.')
            dom.name = new_name
            dom.config.setdefault("c_info", {})["name"] = new_name
        self.store.rename(dom.domid, dom.uuid, new_name)

    def shutdown(self) -> None:
        for dom in self.domains():
            with contextlib.suppress(HypercallError):
                self.destroy(dom.domid)

    def physinfo(self) -> dict[str, Any]:
        major, minor = self.spec.xen_major_minor
        return {
            "name": self.spec.name,
            "total_memory_mib": self.spec.total_memory_mib,
            "free_memory_mib": self.free_memory_mib(),
            "dom0_memory_mib": self.spec.dom0_memory_mib,
            "nr_cpus": self.spec.nr_cpus,
            "xen_version": self.spec.xen_version,
            "xen_major": major,
            "xen_minor": minor,
            "virt_caps": list(self.spec.virt_caps),
            "colo": self.spec.colo,
            "digests": self.spec.digests,
            "colo_interval": self.spec.colo_interval,
            "suspend_timeout": self.spec.suspend_timeout,
            "uptime": time.monotonic() - self._started,
        }

    # --- the hypercall table ------------------------------------------------------------------

    def dispatch(self, op: str, args: Mapping[str, Any]) -> Mapping[str, Any]:
        handler: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = getattr(
            self, f"_op_{op}", None
        )
        if handler is None:
            raise HypercallError(errno.ENOSYS, f"unknown hypercall {op}")
        return handler(args)

    def _op_physinfo(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return self.physinfo()

    def _op_domain_list(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"domains": [d.info() for d in self.domains()]}

    def _op_domain_info(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"domain": self.domain(args["domid"]).info()}

    def _op_domain_config(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"config": self.domain(args["domid"]).config}

    def _op_domain_create(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        dom = self.create(
            dict(args["config"]),
            paused=bool(args.get("paused")),
            incoming=bool(args.get("incoming")),
            colo=bool(args.get("colo")),
        )
        return {"domain": dom.info()}

    def _op_domain_destroy(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.destroy(args["domid"])
        return {}

    def _op_domain_pause(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.domain(args["domid"]).pause()
        return {}

    def _op_domain_unpause(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.domain(args["domid"]).unpause()
        return {}

    def _op_domain_rename(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.rename(args["domid"], str(args["name"]))
        return {}

    def _op_domain_suspend(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        epoch = self.domain(args["domid"]).suspend(float(args.get("timeout", 60.0)))
        return {"epoch": epoch}

    def _op_domain_resume(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.domain(args["domid"]).resume()
        return {}

    def _op_logdirty(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.domain(args["domid"]).logdirty(bool(args["enable"]))
        return {}

    def _op_logdirty_clean(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"pfns": self.domain(args["domid"]).logdirty_clean()}

    def _op_output_mode(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        modes: dict[str, Mode] = {"direct": "direct", "remus": "remus", "colo": "colo"}
        mode = modes.get(str(args["mode"]))
        if mode is None:
            raise HypercallError(errno.EINVAL, f"output mode {args['mode']}")
        return {"session": self.domain(args["domid"]).set_output(mode)}

    def _op_output_commit(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.domain(args["domid"]).gate.commit(int(args["checkpoint"]), int(args["session"]))
        return {}

    def _op_colo_wait(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"reason": self.domain(args["domid"]).colo_wait(float(args["timeout"]))}

    def _op_colo_request(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        dom = self.by_uuid(str(args["uuid"]))
        if dom is None or not dom.colo_secondary or dom.destroyed:
            return {"reply": None}
        reply = dom.serve_mirrored(str(args["line"]).encode())
        return {"reply": None if reply is None else reply.decode()}

    def _op_network_attach(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        self.domain(args["domid"]).network_attach()
        return {}

    def _op_ledger(self, args: Mapping[str, Any]) -> Mapping[str, Any]:
        """Lets xl processes record through the host (they may not know the fabric)."""
        fields = dict(args["fields"])
        self.ledger.record(str(args["kind"]), **fields)
        return {}
