"""XenStore through pyxs, kept off the event loop.

pyxs is synchronous and its requests wait without a timeout, so every call runs in a worker
thread on a connection of its own (connecting to a Unix socket is cheap) and the caller bounds
it with a timeout: a wedged xenstored may cost a thread, never the agent's heartbeat.

Watches need a long-lived connection; `watch_domains` runs one in a dedicated thread and hands
each `@releaseDomain` / `@introduceDomain` event to the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pyxs import Client, PyXSError, Router
from pyxs.connection import UnixSocketConnection

log = logging.getLogger(__name__)

T = TypeVar("T")

RELEASE_DOMAIN = "@releaseDomain"
INTRODUCE_DOMAIN = "@introduceDomain"


class XenStoreError(RuntimeError):
    """XenStore could not be reached or refused a request."""


class _Router(Router):  # type: ignore[misc]  # pyxs is untyped
    """pyxs's router thread, minus the traceback it prints when xenstored goes away.

    The lost connection is noticed where it matters: a pending request times out (`_call`),
    the watch thread sees `is_connected` drop and reconnects.
    """

    def __call__(self) -> None:
        try:
            super().__call__()
        except (PyXSError, OSError) as e:
            log.info("xenstore connection closed: %s", e)


def _client(socket_path: str) -> Client:
    return Client(router=_Router(UnixSocketConnection(socket_path)))


@dataclass(frozen=True)
class DomainRecord:
    """What XenStore says about one domain under /local/domain/<domid>."""

    domid: int
    name: str | None
    # memory/target, KiB: what the toolstack asked the balloon driver for.
    memory_target_kib: int | None
    # control/shutdown: a pending shutdown request ("poweroff", "reboot", "suspend"), if any.
    shutdown_request: str | None


class XenStore:
    def __init__(self, socket_path: Path | str, *, timeout: float = 5.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout

    async def _call(self, fn: Callable[[Client], T]) -> T:
        def run() -> T:
            try:
                with _client(self.socket_path) as client:
                    return fn(client)
            except (PyXSError, OSError) as e:
                raise XenStoreError(f"xenstore at {self.socket_path}: {e}") from e

        try:
            async with asyncio.timeout(self.timeout):
                return await asyncio.to_thread(run)
        except TimeoutError:
            raise XenStoreError(f"xenstore at {self.socket_path}: no answer") from None

    async def read(self, path: str) -> str | None:
        """The value at `path`, or None if it does not exist."""
        return await self._call(lambda c: _read(c, path))

    async def directory(self, path: str) -> list[str]:
        """Children of `path` ([] if it does not exist)."""
        return await self._call(lambda c: _list(c, path))

    async def domids(self) -> list[int]:
        names = await self.directory("/local/domain")
        return sorted(int(n) for n in names if n.isdigit())

    async def domain(self, domid: int) -> DomainRecord | None:
        """The domain's XenStore record, or None if it has no /local/domain/<domid>."""
        return await self._call(lambda c: _domain(c, domid))

    async def domains(self) -> list[DomainRecord]:
        def read_all(c: Client) -> list[DomainRecord]:
            ids = sorted(int(n) for n in _list(c, "/local/domain") if n.isdigit())
            return [rec for domid in ids if (rec := _domain(c, domid)) is not None]

        return await self._call(read_all)

    async def watch_domains(self, on_change: Callable[[], None], *, retry: float = 1.0) -> None:
        """Call `on_change` (on the loop) whenever a domain appears or is released.

        Runs until cancelled; reconnects if xenstored goes away. XenStore fires every watch
        once when it is registered, so a (re)connection always produces one call.
        """
        loop = asyncio.get_running_loop()
        stop = threading.Event()

        def notify() -> None:
            # The loop may be gone already while this thread winds down.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(on_change)

        thread = threading.Thread(
            target=_watch_thread,
            args=(self.socket_path, notify, stop, retry),
            name="xenstore-watch",
            daemon=True,
        )
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 5.0)


def _read(c: Client, path: str) -> str | None:
    try:
        value: bytes = c.read(path.encode())
    except PyXSError as e:
        if e.args and e.args[0] == errno.ENOENT:
            return None
        raise
    return value.decode(errors="replace")


def _list(c: Client, path: str) -> list[str]:
    try:
        names: list[bytes] = c.list(path.encode())
    except PyXSError as e:
        if e.args and e.args[0] == errno.ENOENT:
            return []
        raise
    return [n.decode() for n in names]


def _domain(c: Client, domid: int) -> DomainRecord | None:
    base = f"/local/domain/{domid}"
    if not _list(c, base) and _read(c, base) is None:
        return None
    target = _read(c, f"{base}/memory/target")
    return DomainRecord(
        domid=domid,
        name=_read(c, f"{base}/name"),
        memory_target_kib=int(target) if target and target.isdigit() else None,
        shutdown_request=_read(c, f"{base}/control/shutdown") or None,
    )


def _watch_thread(
    socket_path: str, notify: Callable[[], None], stop: threading.Event, retry: float
) -> None:
    while not stop.is_set():
        try:
            with _client(socket_path) as client:
                # No unwatch on the way out: closing the connection drops the watches, and an
                # unwatch on a dead connection would wait for ever.
                monitor = client.monitor()
                for path in (RELEASE_DOMAIN, INTRODUCE_DOMAIN):
                    monitor.watch(path.encode(), b"xenha-agent")
                # Monitor.wait() blocks without a timeout; poll its queue so `stop` is seen.
                while not stop.is_set() and client.router.is_connected:
                    try:
                        monitor.events.get(timeout=0.2)
                    except queue.Empty:
                        continue
                    notify()
        except (PyXSError, OSError) as e:
            log.warning("xenstore watch failed: %s", e)
        # Reconnect (or notice `stop`) after a pause; a lost connection may hide releases.
        notify()
        stop.wait(retry)
