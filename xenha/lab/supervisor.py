"""The lab's supervisor: the one process that owns a running lab.

`xenha lab up` starts it in a session of its own (``python -m xenha.lab.supervisor``). It
starts a Stack in the lab dir, applies the demo replication, reports each step to
``progress.jsonl``, serves the control socket, and stops everything when it gets SIGTERM
(``xenha lab down``), a ``down`` request, or — when started with ``--owned`` by an attached
``lab up`` — when its stdin reaches end-of-file because that terminal session went away.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from xenha.lab.control import ControlServer
from xenha.lab.labdir import LabDir, ProgressWriter
from xenha.lab.stack import Stack, StackOptions


class _Stop(BaseException):
    """Raised in the main thread by a stop signal, to abandon a start in progress."""


def _watch_owner(stop: threading.Event) -> None:
    # Only the owner holds the write end; EOF means it is gone, however it ended.
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.buffer.read(4096):
            pass
    stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xenha.lab.supervisor")
    parser.add_argument("--lab-dir", type=Path, required=True)
    parser.add_argument("--mode", choices=("colo", "remus"), default="remus")
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--owned", action="store_true", help="stop when stdin closes")
    args = parser.parse_args(argv)

    lab = LabDir(args.lab_dir.resolve())
    progress = ProgressWriter(lab.progress_file)
    stop = threading.Event()
    started = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        # Once is enough: a second signal must not interrupt the teardown.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        stop.set()
        if not started.is_set():
            raise _Stop

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)

    stack = Stack(
        lab.path,
        StackOptions(hosts=args.hosts, log_level=args.log_level),
        progress=lambda step, detail: progress(step, detail),
    )
    server: ControlServer | None = None
    code = 0
    try:
        stack.start()
        stack.wait_ready()
        namespace, name = stack.apply_replication(mode=args.mode)
        progress("replication", f"applied {namespace}/{name}", namespace=namespace, name=name)
        server = ControlServer(lab.socket, stack, on_down=stop.set)
        server.start()
        started.set()
        if args.owned:
            threading.Thread(target=_watch_owner, args=(stop,), daemon=True).start()
        progress("ready", "", namespace=namespace, name=name)
        stop.wait()
    except _Stop:
        progress("stopped", "stopped while starting")
    except BaseException as exc:
        code = 1
        progress("failed", f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            server.close()
        progress("stopping", "")
        stack.stop()
        progress("stopped", "")
    return code


if __name__ == "__main__":
    sys.exit(main())
