"""The simulated host's "hypercall" channel: JSON lines over a Unix socket.

Real `xl` reaches Xen through privcmd ioctls; the simulated `xl` reaches the host daemon
here. One request per line (`{"op": ..., **args}`), one answer per line (`{"ok": true, ...}`
or `{"ok": false, "errno": "ESRCH", "error": "..."}`); a connection serves requests in order,
so a client may keep one open for its whole life. Guest memory never travels here: xl maps
the domain's memory file itself, as libxc maps foreign pages.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Handler = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]

# How xl lists a domain that has no name (a failed restore's leftover). Unlike names, it
# is not unique: any number of nameless domains can exist.
NAMELESS = "(null)"


class HypercallError(OSError):
    """A hypercall failed; `name` is the errno name (`ESRCH`: no such domain)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    @property
    def name(self) -> str:
        return errno.errorcode.get(self.errno or 0, "EIO")

    @classmethod
    def from_name(cls, name: str, message: str) -> HypercallError:
        return cls(getattr(errno, name, errno.EIO), message)


def no_such_domain(what: object) -> HypercallError:
    return HypercallError(errno.ESRCH, f"no such domain: {what}")


class HypercallClient:
    """A connection to one host's daemon. Not thread-safe: one per thread."""

    def __init__(self, path: Path | str, *, timeout: float | None = None) -> None:
        self.path = str(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
        except OSError:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        request = json.dumps({"op": op, **args}, separators=(",", ":")).encode() + b"\n"
        self._sock.sendall(request)
        line = self._reader.readline()
        if not line:
            raise HypercallError(errno.ECONNRESET, "the hypervisor went away")
        answer: dict[str, Any] = json.loads(line)
        if not answer.get("ok"):
            raise HypercallError.from_name(answer.get("errno", "EIO"), answer.get("error", ""))
        return answer

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._reader.close()
        with contextlib.suppress(OSError):
            self._sock.close()

    def __enter__(self) -> HypercallClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class HypercallServer:
    """Serves `handler(op, args) -> dict` on a Unix socket, a thread per connection."""

    def __init__(self, path: Path | str, handler: Handler) -> None:
        self.path = str(path)
        self._handler = handler
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(64)
        self._closed = False

    def serve_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self._accept_loop, name="hypercall", daemon=True)
        thread.start()
        return thread

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._closed:
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as reader:
            for line in reader:
                try:
                    request = json.loads(line)
                    op = request.pop("op")
                    answer = {"ok": True, **self._handler(op, request)}
                except HypercallError as e:
                    answer = {"ok": False, "errno": e.name, "error": e.strerror or ""}
                except Exception as e:
                    log.exception("hypercall failed")
                    answer = {"ok": False, "errno": "EIO", "error": f"{type(e).__name__}: {e}"}
                try:
                    conn.sendall(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
                except OSError:
                    return

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
