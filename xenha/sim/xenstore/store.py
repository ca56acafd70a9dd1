"""The XenStore database: the tree, the domains xenstored talks to, watches, transactions.

`Store` is thread-safe: every operation runs under one lock, so the simulated hypervisor may
call it from any thread while socket clients are being served. Watch events are handed to the
watching session's `deliver` callback *while that lock is held*, which keeps every watcher's
events in the order the changes happened; a callback must therefore only queue and return.

Each client is a `Session`: who it is (a domain id; socket clients are dom0, the toolstack),
its watches and its transactions. `Store.read`, `Store.write`, ... are shortcuts on a built-in
dom0 session; `Store.watch` gives an in-process watcher with a queue of events.

Semantics follow xenstored (docs/misc/xenstore.txt, xenstored_core.c):
- WRITE and MKDIR create missing parents with empty values, inheriting the permissions of the
  nearest existing ancestor (an unprivileged creator becomes the owner); creating needs WRITE
  on that ancestor.
- A missing node is reported as ENOENT only to callers allowed the requested access on its
  nearest existing ancestor, EACCES to everybody else (a guest cannot probe dom0's subtree).
- A change fires every watch at or above the changed path; removing a subtree also fires the
  watches set exactly on each removed node, with that node's path.
- A transaction works on a private copy of the tree taken at its start. At commit it fails
  with EAGAIN if any node it read or wrote (or found missing) changed in the live tree since;
  its watch events fire only when it commits.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from types import TracebackType

from xenha.sim.xenstore.errors import XsError, invalid
from xenha.sim.xenstore.paths import (
    REL_PATH_MAX,
    ancestors,
    basename,
    canonical,
    domain_path,
    is_at_or_below,
    is_special,
    join,
    parent,
)
from xenha.sim.xenstore.perms import DOM0_ONLY, Access, Perm, Perms, access_for
from xenha.sim.xenstore.tree import Change, Node, Transaction, View

log = logging.getLogger(__name__)

INTRODUCE_DOMAIN = "@introduceDomain"
RELEASE_DOMAIN = "@releaseDomain"
SPECIAL_WATCHES = (INTRODUCE_DOMAIN, RELEASE_DOMAIN)

# A value must fit in one READ reply.
VALUE_MAX = 4096
# DOMID_FIRST_RESERVED: ids from here on (DOMID_SELF, DOMID_IO, ...) are never real domains.
DOMID_FIRST_RESERVED = 0x7FF0
# xenstored's default quotas for guests; dom0 gets a bound only so that one runaway socket
# client cannot exhaust the simulator's memory.
GUEST_TRANSACTION_LIMIT = 10
DOM0_TRANSACTION_LIMIT = 1024
GUEST_WATCH_LIMIT = 128

Deliver = Callable[[str, bytes], None]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    path: str
    token: bytes


@dataclass(frozen=True, slots=True)
class _Watch:
    absolute: str
    # Removed from event paths: a watch set on a relative path hears relative paths.
    strip: str
    token: bytes


class Session:
    """One client of the store: a socket connection, or a caller inside the process.

    Paths are absolute or relative to `/local/domain/<domid>`; `tx` is 0 outside
    transactions. Every method raises `XsError` with the errno xenstored would answer.
    """

    def __init__(self, store: Store, domid: int, deliver: Deliver | None) -> None:
        self._store = store
        self._lock = store._lock
        self.domid = domid
        self.privileged = domid == 0
        self._deliver = deliver
        self._watches: dict[tuple[str, bytes], _Watch] = {}
        self._transactions: dict[int, Transaction] = {}

    # -- nodes ---------------------------------------------------------------------------

    def read(self, path: str, tx: int = 0) -> bytes:
        with self._lock:
            return self._lookup(self._view(tx), self._path(path), Access.READ).value

    def write(self, path: str, value: bytes | str, tx: int = 0) -> None:
        data = value.encode() if isinstance(value, str) else value
        if len(data) > VALUE_MAX:
            raise XsError(errno.E2BIG, f"value of {len(data)} bytes")
        with self._lock:
            view, full = self._view(tx), self._path(path)
            node = view.get(full)
            if node is None:
                node = self._create(view, full, data)
            else:
                self._check(node.perms, Access.WRITE, full)
                node = view.put(full, replace(node, value=data))
            view.changed(Change(full, exact=False, perms=(node.perms,)))

    def mkdir(self, path: str, tx: int = 0) -> None:
        with self._lock:
            view, full = self._view(tx), self._path(path)
            node = view.get(full)
            if node is not None:
                self._check(node.perms, Access.WRITE, full)
                return
            node = self._create(view, full, b"")
            view.changed(Change(full, exact=False, perms=(node.perms,)))

    def rm(self, path: str, tx: int = 0) -> None:
        with self._lock:
            view, full = self._view(tx), self._path(path)
            node = view.get(full)
            if node is None:
                error = self._missing(view, full, Access.WRITE)
                # Removing what is already gone is fine, as long as its parent is there.
                if error.errno == errno.ENOENT and view.get(parent(full)) is not None:
                    return
                raise error
            if full == "/":
                raise invalid("cannot remove the root")
            self._check(node.perms, Access.WRITE, full)
            self._remove_subtree(view, full, node)

    def directory(self, path: str, tx: int = 0) -> list[str]:
        return list(self.directory_with_generation(path, tx)[1])

    def directory_with_generation(self, path: str, tx: int = 0) -> tuple[int, tuple[str, ...]]:
        with self._lock:
            node = self._lookup(self._view(tx), self._path(path), Access.READ)
            return node.generation, node.children

    def exists(self, path: str, tx: int = 0) -> bool:
        try:
            self.directory_with_generation(path, tx)
        except XsError as error:
            if error.errno == errno.ENOENT:
                return False
            raise
        return True

    def get_perms(self, path: str, tx: int = 0) -> Perms:
        with self._lock:
            if is_special(path):
                perms = self._special_perms(path)
                self._check(perms, Access.READ, path)
                return perms
            return self._lookup(self._view(tx), self._path(path), Access.READ).perms

    def set_perms(self, path: str, perms: Iterable[Perm | str], tx: int = 0) -> None:
        new = tuple(p if isinstance(p, Perm) else Perm.parse(p) for p in perms)
        if not new:
            raise invalid("no permissions given")
        with self._lock:
            if is_special(path):
                old = self._special_perms(path)
                self._check(old, Access.WRITE | Access.OWNER, path)
                self._check_owner_kept(old, new, path)
                self._store._special[path] = new
                return
            view, full = self._view(tx), self._path(path)
            node = self._lookup(view, full, Access.WRITE | Access.OWNER)
            self._check_owner_kept(node.perms, new, full)
            view.put(full, replace(node, perms=new))
            view.changed(Change(full, exact=False, perms=(node.perms, new)))

    # -- watches -------------------------------------------------------------------------

    def watch(self, path: str, token: bytes | str, *, initial_event: bool = True) -> None:
        """Watch `path` and everything below it (or a special `@...` event).

        xenstored fires every new watch once at once; the wire layer asks for
        `initial_event=False` so that it can send that event after its OK reply, as
        xenstored does.
        """
        watch = self._new_watch(path, token)
        key = (watch.absolute, watch.token)
        with self._lock:
            if key in self._watches:
                raise XsError(errno.EEXIST, f"already watching {path} with that token")
            if not self.privileged and len(self._watches) >= GUEST_WATCH_LIMIT:
                raise XsError(errno.E2BIG, "too many watches")
            self._watches[key] = watch
            if initial_event:
                self._send_event(watch, watch.absolute)

    def unwatch(self, path: str, token: bytes | str) -> None:
        watch = self._new_watch(path, token)
        with self._lock:
            if self._watches.pop((watch.absolute, watch.token), None) is None:
                raise XsError(errno.ENOENT, f"not watching {path} with that token")

    def reset_watches(self) -> None:
        """Forget all watches and transactions (RESET_WATCHES, used after a kexec)."""
        with self._lock:
            self._watches.clear()
            self._transactions.clear()

    # -- transactions --------------------------------------------------------------------

    def transaction_start(self) -> int:
        limit = DOM0_TRANSACTION_LIMIT if self.privileged else GUEST_TRANSACTION_LIMIT
        with self._lock:
            if len(self._transactions) >= limit:
                raise XsError(errno.ENOSPC, "too many transactions")
            tx_id = self._store._new_transaction_id()
            self._transactions[tx_id] = Transaction(tx_id, dict(self._store._nodes))
            return tx_id

    def transaction_end(self, tx: int, commit: bool) -> None:
        with self._lock:
            transaction = self._transactions.pop(tx, None)
            if transaction is None:
                raise XsError(errno.ENOENT, f"no transaction {tx}")
            if commit:
                self._store._commit(transaction)

    def has_transaction(self, tx: int) -> bool:
        with self._lock:
            return tx in self._transactions

    # -- domains -------------------------------------------------------------------------

    def introduce(self, domid: int) -> None:
        self._require_privilege()
        self._store.introduce_domain(domid)

    def release(self, domid: int) -> None:
        self._require_privilege()
        self._store.release_domain(domid)

    def resume(self, domid: int) -> None:
        self._require_privilege()
        self._require_introduced(domid)

    def set_target(self, domid: int, target: int) -> None:
        self._require_privilege()
        with self._lock:
            self._require_introduced(domid)
            self._require_introduced(target)
            self._store._targets[domid] = target

    def restrict(self, domid: int) -> None:
        """From now on act as guest `domid`, with its rights only (qemu's deprivileging)."""
        self._require_privilege()
        if domid == 0:
            raise invalid("cannot restrict to dom0")
        with self._lock:
            self._require_introduced(domid)
            self.domid = domid
            self.privileged = False

    def is_domain_introduced(self, domid: int) -> bool:
        return self._store.is_domain_introduced(domid)

    def close(self) -> None:
        with self._lock:
            self._store._sessions.discard(self)
            self._watches.clear()
            self._transactions.clear()

    # -- internals -----------------------------------------------------------------------

    def _path(self, path: str) -> str:
        return canonical(path, self.domid)

    def _view(self, tx: int) -> View:
        transaction = None
        if tx != 0:
            transaction = self._transactions.get(tx)
            if transaction is None:
                raise XsError(errno.ENOENT, f"no transaction {tx}")
        store = self._store
        return View(store._nodes, transaction, store._next_generation, store._fire)

    def _access(self, perms: Perms) -> Access:
        target = self._store._targets.get(self.domid)
        return access_for(perms, domid=self.domid, privileged=self.privileged, target=target)

    def _check(self, perms: Perms, need: Access, path: str) -> None:
        if self._access(perms) & need != need:
            raise XsError(errno.EACCES, path)

    def _check_owner_kept(self, old: Perms, new: Perms, path: str) -> None:
        if not self.privileged and new[0].domid != old[0].domid:
            raise XsError(errno.EPERM, f"only dom0 may give {path} away")

    def _lookup(self, view: View, path: str, need: Access) -> Node:
        node = view.get(path)
        if node is None:
            raise self._missing(view, path, need)
        self._check(node.perms, need, path)
        return node

    def _missing(self, view: View, path: str, need: Access) -> XsError:
        _, ancestor = self._nearest_existing(view, path)
        if self._access(ancestor.perms) & need & Access.BOTH:
            return XsError(errno.ENOENT, path)
        return XsError(errno.EACCES, path)

    @staticmethod
    def _nearest_existing(view: View, path: str) -> tuple[str, Node]:
        for ancestor in ancestors(path):
            node = view.get(ancestor)
            if node is not None:
                return ancestor, node
        raise XsError(errno.EIO, "the root node is missing")

    def _create(self, view: View, path: str, value: bytes) -> Node:
        top, top_node = self._nearest_existing(view, path)
        if not self._access(top_node.perms) & Access.WRITE:
            raise XsError(errno.EACCES, path)
        perms = top_node.perms
        if not self.privileged:
            perms = (Perm(perms[0].access, self.domid), *perms[1:])
        missing = [path]
        while parent(missing[-1]) != top:
            missing.append(parent(missing[-1]))
        created = top_node
        for new in reversed(missing):
            above = view.get(parent(new))
            assert above is not None  # created (or found) on the previous step
            view.put(parent(new), replace(above, children=(*above.children, basename(new))))
            created = view.put(new, Node(value if new == path else b"", perms))
        return created

    def _remove_subtree(self, view: View, path: str, node: Node) -> None:
        # Iterative: a 3072-character path nests deeper than Python's recursion limit.
        doomed: list[tuple[str, Node]] = []
        stack = [(path, node)]
        while stack:
            here, here_node = stack.pop()
            doomed.append((here, here_node))
            for child in here_node.children:
                child_node = view.get(join(here, child))
                if child_node is not None:
                    stack.append((join(here, child), child_node))
        for here, here_node in reversed(doomed):
            view.delete(here)
            if here != path:
                view.changed(Change(here, exact=True, perms=(here_node.perms,)))
        above = view.get(parent(path))
        assert above is not None  # the node existed, so its parent does
        kept = tuple(child for child in above.children if child != basename(path))
        view.put(parent(path), replace(above, children=kept))
        view.changed(Change(path, exact=False, perms=(node.perms,)))

    def _special_perms(self, name: str) -> Perms:
        perms = self._store._special.get(name)
        if perms is None:
            raise XsError(errno.ENOENT, name)
        return perms

    def _new_watch(self, path: str, token: bytes | str) -> _Watch:
        raw_token = token.encode() if isinstance(token, str) else token
        if is_special(path):
            if len(path) > REL_PATH_MAX:
                raise invalid("watch path too long")
            return _Watch(path, "", raw_token)
        strip = "" if path.startswith("/") else domain_path(self.domid) + "/"
        return _Watch(self._path(path), strip, raw_token)

    def _require_privilege(self) -> None:
        if not self.privileged:
            raise XsError(errno.EACCES, "only dom0 may do this")

    def _require_introduced(self, domid: int) -> None:
        if not self._store.is_domain_introduced(domid):
            raise XsError(errno.ENOENT, f"domain {domid} is not introduced")

    def _notify(self, change: Change) -> None:
        if not self._watches:
            return
        if not self.privileged and not any(self._access(p) & Access.READ for p in change.perms):
            return
        for watch in self._watches.values():
            if change.exact:
                hit = watch.absolute == change.path
            else:
                hit = not is_special(watch.absolute) and is_at_or_below(change.path, watch.absolute)
            if hit:
                self._send_event(watch, change.path)

    def _notify_special(self, name: str, perms: Perms) -> None:
        if not self.privileged and not self._access(perms) & Access.READ:
            return
        for watch in self._watches.values():
            if watch.absolute == name:
                self._send_event(watch, name)

    def _send_event(self, watch: _Watch, path: str) -> None:
        if self._deliver is None:
            return
        if watch.strip and path.startswith(watch.strip):
            path = path[len(watch.strip) :]
        try:
            self._deliver(path, watch.token)
        except Exception:
            # One broken watcher must not stop the change from reaching the others.
            log.exception("delivering a watch event for %s failed", path)


class Watcher:
    """Watches taken from inside the process; their events queue here until `get`."""

    def __init__(self, store: Store, domid: int = 0) -> None:
        self._events: queue.SimpleQueue[WatchEvent] = queue.SimpleQueue()
        self.session = store.session(domid, deliver=self._queue)

    def watch(self, path: str, token: bytes | str = b"") -> Watcher:
        self.session.watch(path, token)
        return self

    def unwatch(self, path: str, token: bytes | str = b"") -> None:
        self.session.unwatch(path, token)

    def get(self, timeout: float | None = None) -> WatchEvent:
        """The next event; raises `queue.Empty` after `timeout` seconds without one."""
        return self._events.get(timeout=timeout)

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> Watcher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _queue(self, path: str, token: bytes) -> None:
        self._events.put(WatchEvent(path, token))


class Store:
    """A XenStore database, starting like a freshly booted dom0.

    The shortcuts below act as dom0 (the toolstack); the simulated hypervisor uses them and
    the domain calls (`introduce_domain`, `release_domain`, `domain_shutdown`).
    """

    def __init__(self, *, dom0_name: str = "Domain-0") -> None:
        self._lock = threading.RLock()
        self._nodes: dict[str, Node] = {"/": Node(b"", DOM0_ONLY)}
        self._generation = 0
        self._last_transaction_id = 0
        self._domains: set[int] = {0}
        self._targets: dict[int, int] = {}
        self._special: dict[str, Perms] = dict.fromkeys(SPECIAL_WATCHES, DOM0_ONLY)
        self._sessions: set[Session] = set()
        self._dom0 = self.session()
        for path in ("/tool/xenstored", "/local/domain/0", "/vm"):
            self._dom0.mkdir(path)
        self._dom0.write("/local/domain/0/name", dom0_name)
        self._dom0.write("/local/domain/0/domid", "0")

    def session(self, domid: int = 0, deliver: Deliver | None = None) -> Session:
        """A new client acting as `domid` (0: privileged); `deliver(path, token)` hears its
        watch events, under the store's lock, so it must only queue them."""
        with self._lock:
            session = Session(self, domid, deliver)
            self._sessions.add(session)
            return session

    # -- shortcuts as dom0 ---------------------------------------------------------------

    def read(self, path: str) -> bytes:
        return self._dom0.read(path)

    def write(self, path: str, value: bytes | str) -> None:
        self._dom0.write(path, value)

    def mkdir(self, path: str) -> None:
        self._dom0.mkdir(path)

    def rm(self, path: str) -> None:
        self._dom0.rm(path)

    def directory(self, path: str) -> list[str]:
        return self._dom0.directory(path)

    def exists(self, path: str) -> bool:
        return self._dom0.exists(path)

    def get_perms(self, path: str) -> Perms:
        return self._dom0.get_perms(path)

    def set_perms(self, path: str, perms: Iterable[Perm | str]) -> None:
        self._dom0.set_perms(path, perms)

    def watch(self, path: str, token: bytes | str = b"") -> Watcher:
        """Watch from inside the process: `with store.watch(p) as w: w.get(timeout=1)`."""
        return Watcher(self).watch(path, token)

    # -- domains (what the hypervisor tells xenstored) -----------------------------------

    def introduce_domain(self, domid: int) -> None:
        """xenstored now talks to `domid`; fires `@introduceDomain` unless it already did."""
        if not 0 < domid < DOMID_FIRST_RESERVED:
            raise invalid(f"domain id {domid}")
        with self._lock:
            if domid in self._domains:
                return
            self._domains.add(domid)
            self._fire_special(INTRODUCE_DOMAIN)

    def release_domain(self, domid: int) -> None:
        """`domid` is gone (destroyed, or RELEASEd); fires `@releaseDomain`."""
        if domid == 0:
            raise invalid("dom0 cannot be released")
        with self._lock:
            if domid not in self._domains:
                raise XsError(errno.ENOENT, f"domain {domid} is not introduced")
            self._domains.discard(domid)
            self._targets.pop(domid, None)
            for stub in [s for s, target in self._targets.items() if target == domid]:
                del self._targets[stub]
            self._fire_special(RELEASE_DOMAIN)

    def domain_shutdown(self, domid: int) -> None:
        """`domid` shut down, crashed or suspended but still exists: xenstored fires
        `@releaseDomain` for these too, and toolstacks then look at the domain's state."""
        with self._lock:
            if domid not in self._domains:
                raise XsError(errno.ENOENT, f"domain {domid} is not introduced")
            self._fire_special(RELEASE_DOMAIN)

    def is_domain_introduced(self, domid: int) -> bool:
        with self._lock:
            return domid in self._domains

    @property
    def session_count(self) -> int:
        """Open sessions: socket clients, in-process watchers and the built-in dom0 one."""
        with self._lock:
            return len(self._sessions)

    @property
    def domains(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._domains)

    # -- internals -----------------------------------------------------------------------

    def _next_generation(self) -> int:
        self._generation += 1
        return self._generation

    def _new_transaction_id(self) -> int:
        # Ids are u32 on the wire and 0 means "no transaction".
        self._last_transaction_id = self._last_transaction_id % 0xFFFFFFFF + 1
        return self._last_transaction_id

    def _commit(self, tx: Transaction) -> None:
        conflict = tx.conflict(self._nodes)
        if conflict is not None:
            raise XsError(errno.EAGAIN, f"{conflict} changed during transaction {tx.id}")
        tx.apply(self._nodes, self._next_generation)
        for change in tx.changes:
            self._fire(change)

    def _fire(self, change: Change) -> None:
        for session in list(self._sessions):
            session._notify(change)

    def _fire_special(self, name: str) -> None:
        perms = self._special[name]
        for session in list(self._sessions):
            session._notify_special(name, perms)
