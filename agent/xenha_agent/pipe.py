"""`xenha agent pipe --socket S`: the transport command `xl remus` runs on the primary.

xl writes the forward stream to our stdin and reads the back channel from our stdout. The
forward stream (the bulk) is spliced stdin -> S in the kernel (xl's end is a pipe); the back
channel (small) is copied S -> stdout through a large buffer. We exit when either side closes:
- stdin ends (xl closed its transport): half-close S so the replicator sees the end, exit;
- S ends (the replicator lost the peer or is stopping): exit, which closes xl's pipes, so xl
  remus sees its backup fail and resumes the guest at the primary.

It is deliberately tiny: it imports nothing of the project, so it starts fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
import threading

_CHUNK = 1 << 20


def transport_command(socket_path: str, *, python: str | None = None) -> str:
    """The shell command to give `xl remus -s ""` as its transport (xl runs it via sh)."""
    import shlex

    argv = [python or sys.executable, "-m", "xenha_agent.pipe", "--socket", socket_path]
    return shlex.join(argv)


def _splice(src: int, dst: int) -> None:
    """Move bytes from a pipe to a socket in the kernel, until the pipe ends.

    Only in this direction: a splice *from* a socket into a pipe keeps the pipe locked while
    it waits for the socket, so xl could not read what an earlier splice delivered.
    """
    try:
        while os.splice(src, dst, _CHUNK):
            pass
    except OSError as e:
        if e.errno != errno.EINVAL:  # EINVAL: src is not a pipe (a file, a tty): copy
            raise
        _copy(src, dst)


def _copy(src: int, dst: int) -> None:
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    while True:
        n = os.readv(src, [view])
        if not n:
            return
        data = view[:n]
        while data:
            data = data[os.write(dst, data) :]


def run(socket_path: str) -> int:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
    except OSError as e:
        print(f"xenha agent pipe: cannot connect to {socket_path}: {e}", file=sys.stderr)
        return 1
    done = threading.Event()
    fd = sock.fileno()

    def forward() -> None:
        try:
            _splice(sys.stdin.fileno(), fd)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            done.set()

    def back() -> None:
        try:
            _copy(fd, sys.stdout.fileno())
        except OSError:
            pass
        finally:
            done.set()

    for target in (forward, back):
        threading.Thread(target=target, daemon=True).start()
    done.wait()
    # Leave at once: the other direction may be blocked in a read that will never end, and
    # exiting closes every descriptor xl and the replicator are waiting on.
    os._exit(0)


def pipe_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="xenha agent pipe", description="xl remus transport: splice stdio to a socket"
    )
    parser.add_argument("--socket", required=True, help="the replicator's <uid>.xl.sock")
    args = parser.parse_args(argv)
    return run(args.socket)


if __name__ == "__main__":
    sys.exit(pipe_main(sys.argv[1:]))
