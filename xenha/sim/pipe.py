"""A minimal transport for `xl remus -s ""` between simulated hosts (what socat does on the
real lab, without the dependency).

    python -m xenha.sim.pipe serve PATH|HOST:PORT -- CMD...   # accept one connection, run
                                                              # CMD with it as stdin/stdout
    python -m xenha.sim.pipe connect PATH|HOST:PORT           # splice stdin/stdout to it

Receiver: `pipe serve /tmp/t.sock -- <xen-b>/bin/xl migrate-receive -r -e`
Sender:   `xl remus -s "" db1 "python -m xenha.sim.pipe connect /tmp/t.sock"`

`connect` half-closes the socket when its stdin ends and exits when the socket's far side
has closed, so EOF travels both ways as through ssh.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence


def _address(spec: str) -> tuple[int, str | tuple[str, int]]:
    host, sep, port = spec.rpartition(":")
    if sep and port.isdigit() and "/" not in spec:
        return socket.AF_INET, (host or "127.0.0.1", int(port))
    return socket.AF_UNIX, spec


def listen(spec: str) -> socket.socket:
    family, address = _address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_UNIX:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(str(address))
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(1)
    return sock


def connect(spec: str) -> socket.socket:
    family, address = _address(spec)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)
    return sock


def serve(spec: str, command: Sequence[str]) -> int:
    listener = listen(spec)
    try:
        conn, _ = listener.accept()
    finally:
        listener.close()
        family, address = _address(spec)
        if family == socket.AF_UNIX:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(address))
    with conn:
        proc = subprocess.Popen(list(command), stdin=conn.fileno(), stdout=conn.fileno())
    return proc.wait()


def splice(sock: socket.socket, fd_in: int = 0, fd_out: int = 1) -> int:
    def upstream() -> None:
        try:
            while True:
                data = os.read(fd_in, 65536)
                if not data:
                    break
                sock.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd_out, view) :]
    except OSError:
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) >= 2 and args[0] == "connect":
        try:
            sock = connect(args[1])
        except OSError as e:
            print(f"pipe: cannot connect to {args[1]}: {e.strerror}", file=sys.stderr)
            return 1
        with sock:
            return splice(sock)
    if len(args) >= 4 and args[0] == "serve" and args[2] == "--":
        return serve(args[1], args[3:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
