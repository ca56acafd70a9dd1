"""Faults for simulated hosts: power cut, hang, and network partitions.

A host's processes are found by the tag in their environment (`XENHA_SIM_HOST_TAG`, set by
the daemon, the `xl` wrapper and `SimHost.env`), read from /proc/<pid>/environ; children
inherit it, so a transport started by `xl remus` or an agent's replicator is found too, even
after it was re-parented. Killing first stops everything, so nothing forks or reacts while
the rest dies: the host vanishes in one instant, as with a power cut.

`NetPath` (in `xenha.sim.netpath`) is the network between hosts: a TCP relay that tests can
cut silently (no FIN, no RST) and restore. A power cut must be silent on it too: a killed
process's kernel would close its sockets with a FIN or an RST, which no dead host sends, so
`SimHost.kill` freezes the host, silences every NetPath connection to or from a socket of
its processes, and only then kills them.

    host.kill()                 # SimHost: cuts its NetPaths, freeze_tagged, silences its
                                # connections on every NetPath, then kill_tagged
    host.pause(); host.resume() # hung host
    path = NetPath(("127.0.0.1", port)).start(); path.cut(); path.restore()
"""

from __future__ import annotations

import contextlib
import os
import signal
import time

from xenha.sim.netpath import NetPath
from xenha.sim.paths import TAG_ENV

__all__ = ["NetPath", "freeze_tagged", "kill_tagged", "signal_tagged", "tagged_pids"]


def tagged_pids(tag: str) -> list[int]:
    """Every live process whose environment carries this host tag (never this process)."""
    needle = f"{TAG_ENV}={tag}\0".encode()
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = b"\0" + f.read()
        except OSError:
            continue
        tagged = b"\0" + needle in environ or environ.endswith(b"\0" + needle[:-1])
        if tagged and not _is_zombie(int(entry)):
            found.append(int(entry))
    return found


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def signal_tagged(tag: str, sig: signal.Signals) -> list[int]:
    pids = tagged_pids(tag)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return pids


def _stopped(pid: int) -> bool:
    """Every thread of `pid` has stopped (or is gone)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("T", "t", "Z", "X"):
            return False
    return True


def freeze_tagged(tag: str, *, timeout: float = 10.0) -> list[int]:
    """SIGSTOP every process of the host, until no new one appears (one could fork while
    the others are being stopped), and wait until all of them have stopped; returns them.

    kill() returns before a multi-threaded process stops: the kernel wakes one thread to
    stop the others, and until it has run, a thread woken by the network (a guest's
    service answering a request that just arrived) goes on. Only once every thread shows
    as stopped in /proc does the host do nothing."""
    deadline = time.monotonic() + timeout
    frozen: set[int] = set()
    while True:
        pids = set(signal_tagged(tag, signal.SIGSTOP))
        while not all(_stopped(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise TimeoutError(f"processes of {tag} do not stop: {sorted(pids)}")
            time.sleep(0.001)
        if pids <= frozen:
            return sorted(frozen)
        frozen |= pids


def kill_tagged(tag: str, *, timeout: float = 10.0) -> None:
    """SIGSTOP then SIGKILL every process of the host, until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        pids = signal_tagged(tag, signal.SIGSTOP)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of {tag} survive SIGKILL: {pids}")
        time.sleep(0.01)
