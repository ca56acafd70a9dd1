"""Simulated Xen hosts: an `xl` and a XenStore that behave like Xen's, on one machine.

Start hosts (each a daemon process with its own state directory; hosts of one lab share a
fabric directory holding the ledger)::

    from xenha.sim import SimHost, NetPath, ServiceClient, ledger

    a = SimHost.start(tmp / "xen-a", "xen-a", fabric_dir=tmp / "fabric")
    b = SimHost.start(tmp / "xen-b", "xen-b", fabric_dir=tmp / "fabric",
                      colo_interval=5.0, digests=False, suspend_timeout=60.0)
    a.xl_path          # <state>/bin/xl: give this to the agent as its `xl`
    a.xenstore_path    # the host's XenStore socket, for pyxs (also $XENSTORED_PATH in a.env)
    a.env              # environment for the host's own processes (agent, xl): PATH has its
                       # xl first, XENSTORED_PATH is its XenStore, and faults reach them
    a.ledger_path      # <fabric>/ledger.jsonl

Guests (an `xl create` underneath; config keys in `xenha.sim.xlcfg`)::

    info = a.create_guest("db1", memory_mib=16, dirty_rate=500, divergence=0.0)
    ip, port = a.service_address("db1")     # the guest's counter service
    ServiceClient((ip, port), ledger_path=a.ledger_path, uuid=info["uuid"]).next()
    a.domain("db1"), a.domains(), a.xl("list")

Replication is plain xl: `xl remus [-c] ... -s "" db1 "<transport command>"` on one host and
`xl migrate-receive -r|--colo -e` on the other, the transport's stdin/stdout carrying the
stream and the back channel (`xenha.sim.pipe` is a minimal transport; `xenha.sim.tap` one
that parses and can cut the stream at an exact byte).

Faults::

    a.kill()                  # power cut: every process of the host, at once (SIGKILL),
                              # and silence (no FIN, no RST) on every NetPath connection
                              # to or from them
    a.pause(); a.resume()     # hung host (SIGSTOP / SIGCONT)
    path = NetPath(("127.0.0.1", relay_port), ("127.0.0.21", 0)).start()
    path.cut(); path.restore(); path.reset()   # silent partition, heal, RST
    a.add_netpath(path)       # cut as a whole (new connections too) when `a` is killed

Invariants over the ledger::

    ledger.assert_never_two_active(a.ledger_path)
    ledger.assert_client_view_clean(a.ledger_path)

Modules: `host` (daemon + SimHost), `hypervisor` (domains, memory, dirty log, pause and
suspend), `guest` (workload and counter, as functions of guest memory), `output` (Remus
buffering, COLO comparison), `service` (the guest's socket), `xl` / `remus_cli` / `remus` /
`receive` (the xl command), `xlcfg`, `domstore` (XenStore entries), `ledger`, `faults`,
`netpath`, `pipe`, `tap`, `client`, `cli` (`xenha sim ...`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xenha.sim import ledger
    from xenha.sim.client import ServiceClient
    from xenha.sim.host import SimHost
    from xenha.sim.netpath import NetPath
    from xenha.sim.tap import StreamTap

__all__ = ["NetPath", "ServiceClient", "SimHost", "StreamTap", "ledger"]

# Imported on first use: `xl` starts for every command and must not pay for the daemon.
_LAZY = {
    "SimHost": "xenha.sim.host",
    "NetPath": "xenha.sim.netpath",
    "ServiceClient": "xenha.sim.client",
    "StreamTap": "xenha.sim.tap",
}


def __getattr__(name: str) -> Any:
    if name == "ledger":
        return importlib.import_module("xenha.sim.ledger")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(name)
