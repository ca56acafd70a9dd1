"""Cleans up after a control plane whose owning Python process died without stopping it.

Run as a script (stdlib only, so it starts fast and needs no sys.path): the owner keeps the
write end of a pipe that is this process's stdin, and announces each process group it starts
(``add <pgid>``) or stops (``del <pgid>``). End of file without ``exit`` means the owner is
gone however it died (SIGKILL, OOM, a crashed interpreter): terminate the announced process
groups, then remove the work directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time


def _alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def main(argv: list[str]) -> int:
    workdir = argv[1] if len(argv) > 1 else ""
    keep = "--keep" in argv[2:]
    # Ctrl-C in the owner's terminal must not take the cleaner down before the owner.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    groups: list[int] = []
    for raw in sys.stdin:
        command, _, arg = raw.strip().partition(" ")
        if command == "add" and arg.isdigit():
            groups.append(int(arg))
        elif command == "del" and arg.isdigit() and int(arg) in groups:
            groups.remove(int(arg))
        elif command == "exit":
            return 0
    # Reverse start order: controller-manager and apiserver before the etcd they depend on.
    for pgid in reversed(groups):
        _signal(pgid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in groups) and time.monotonic() < deadline:
        time.sleep(0.1)
    for pgid in groups:
        if _alive(pgid):
            _signal(pgid, signal.SIGKILL)
    if workdir and not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
