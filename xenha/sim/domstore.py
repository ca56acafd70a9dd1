"""What the toolstack writes to XenStore about each domain, as libxl does on a real host.

The hypervisor only calls `DomainStore`; `XenStoreDomains` writes into the host's in-process
XenStore (`xenha.sim.xenstore.Store`, served to pyxs clients by `xenha.sim.xenstored`).
Entries follow libxl__domain_make / libxl__build_post:

    /local/domain/<domid>/{name, domid, vm, memory/target, memory/static-max,
                           control/shutdown, cpu/<n>/availability, data, device, ...}
    /vm/<uuid>/{name, uuid, start_time}

A new domain is introduced (`@introduceDomain` fires); a destroyed one is released
(`@releaseDomain`) after its subtree is gone.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable
from typing import Protocol

log = logging.getLogger(__name__)


class StoreLike(Protocol):
    """The part of `xenha.sim.xenstore.Store` used here."""

    def write(self, path: str, value: bytes | str) -> None: ...
    def mkdir(self, path: str) -> None: ...
    def rm(self, path: str) -> None: ...
    def set_perms(self, path: str, perms: Iterable[str]) -> None: ...
    def introduce_domain(self, domid: int) -> None: ...
    def release_domain(self, domid: int) -> None: ...


class DomainStore(Protocol):
    def dom0(self, name: str, memory_mib: int) -> None: ...
    def introduce(self, domid: int, name: str, uuid: str, memory_mib: int, vcpus: int) -> None: ...
    def rename(self, domid: int, uuid: str, name: str) -> None: ...
    def release(self, domid: int, uuid: str) -> None: ...


class NullDomainStore:
    """For a hypervisor run without XenStore (unit tests)."""

    def dom0(self, name: str, memory_mib: int) -> None:
        pass

    def introduce(self, domid: int, name: str, uuid: str, memory_mib: int, vcpus: int) -> None:
        pass

    def rename(self, domid: int, uuid: str, name: str) -> None:
        pass

    def release(self, domid: int, uuid: str) -> None:
        pass


class XenStoreDomains:
    def __init__(self, store: StoreLike) -> None:
        self.store = store

    def dom0(self, name: str, memory_mib: int) -> None:
        base = "/local/domain/0"
        self.store.write(f"{base}/name", name)
        self.store.write(f"{base}/domid", "0")
        self.store.write(f"{base}/memory/target", str(memory_mib * 1024))
        self.store.write(f"{base}/memory/static-max", str(memory_mib * 1024))

    def introduce(self, domid: int, name: str, uuid: str, memory_mib: int, vcpus: int) -> None:
        base = f"/local/domain/{domid}"
        vm = f"/vm/{uuid}"
        s = self.store
        s.mkdir(base)
        # dom0 owns the domain's directory; the guest may read it ...
        s.set_perms(base, ["n0", f"r{domid}"])
        s.write(f"{base}/vm", vm)
        s.write(f"{base}/name", name)
        s.write(f"{base}/domid", str(domid))
        s.write(f"{base}/memory/target", str(memory_mib * 1024))
        s.write(f"{base}/memory/static-max", str(memory_mib * 1024))
        for cpu in range(vcpus):
            s.write(f"{base}/cpu/{cpu}/availability", "online")
        # ... and owns the parts it writes: its shutdown control and its own data.
        for sub in ("control/shutdown", "data", "device", "error", "drivers", "attr"):
            s.write(f"{base}/{sub}", "")
            s.set_perms(f"{base}/{sub}", [f"n{domid}"])
        s.write(f"{vm}/uuid", uuid)
        s.write(f"{vm}/name", name)
        s.write(f"{vm}/start_time", f"{time.time():.2f}")
        s.introduce_domain(domid)

    def rename(self, domid: int, uuid: str, name: str) -> None:
        self.store.write(f"/local/domain/{domid}/name", name)
        self.store.write(f"/vm/{uuid}/name", name)

    def release(self, domid: int, uuid: str) -> None:
        for path in (f"/local/domain/{domid}", f"/vm/{uuid}"):
            with contextlib.suppress(OSError):
                self.store.rm(path)
        try:
            self.store.release_domain(domid)
        except OSError as e:
            log.warning("releasing domain %d from xenstore: %s", domid, e)
