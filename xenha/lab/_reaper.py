"""Kills a stack's processes when the stack's owner died without stopping them.

Run as a script (stdlib only, so it starts fast): ``_reaper.py MARKER...`` where a marker is
an environment entry (``XENHA_LAB_STACK=<tag>``). Its stdin is the read end of a pipe whose
write end only the owner holds: ``mark MARKER`` adds a marker, ``exit`` means a clean stop,
and end-of-file without ``exit`` means the owner is gone however it died. Then every process
whose environment holds a marker is killed, including those that left the owner's process
groups (replicators run in sessions of their own). The control plane has its own watchdog.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time


def _marked(markers: set[bytes]) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as handle:
                if markers.intersection(handle.read().split(b"\0")):
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def main(argv: list[str]) -> int:
    markers = {m.encode() for m in argv[1:]}
    # Ctrl-C in the owner's terminal must not take the reaper down before the owner.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    for line in sys.stdin:
        command, _, arg = line.strip().partition(" ")
        if command == "exit":
            return 0
        if command == "mark" and arg:
            markers.add(arg.encode())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = _marked(markers)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGSTOP)
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
