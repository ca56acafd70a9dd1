"""A XenStore for the simulated Xen host: the database (`store`), the wire protocol (`wire`).

The daemon that serves them on a Unix socket is `xenha.sim.xenstored`.
"""

from xenha.sim.xenstore.errors import XsError
from xenha.sim.xenstore.perms import Access, Perm
from xenha.sim.xenstore.store import Session, Store, Watcher, WatchEvent

__all__ = ["Access", "Perm", "Session", "Store", "WatchEvent", "Watcher", "XsError"]
