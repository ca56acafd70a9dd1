"""Drive a dom0 shell over QEMU's serial port (a Unix socket): send a line, wait for a marker.

Two things learnt the hard way (shared/lab/xen-in-qemu.md): Xen's serial receive ring is tiny,
so input goes out in 16-byte chunks 30 ms apart; and terminal echo stays on (turning it off broke
parsing), so the marker is written in a form whose echo differs from its output.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import socket
import threading
import time
from pathlib import Path

CHUNK = 16
CHUNK_PAUSE = 0.03
_ids = itertools.count(1)


class ConsoleError(RuntimeError):
    """A marker did not arrive in time; the message carries the console's last lines."""


class CommandFailed(ConsoleError):
    def __init__(self, command: str, status: int, output: str) -> None:
        super().__init__(f"`{command}` exited with {status}:\n{output[-2000:]}")
        self.command = command
        self.status = status
        self.output = output


class Console:
    """One serial console. Everything received is kept (CRs dropped) for searching."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(str(path))
        self._text = ""
        self._cond = threading.Condition()
        self._closed = False
        # One command at a time: a debugging side channel may share the console with a test.
        self._run_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)
        self._reader.start()

    @classmethod
    def connect(cls, path: Path, name: str, timeout: float = 30.0) -> Console:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls(path, name)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def _read(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                data = b""
            with self._cond:
                if not data:
                    self._closed = True
                    self._cond.notify_all()
                    return
                self._text += data.decode("utf-8", "replace").replace("\r", "")
                self._cond.notify_all()

    @property
    def position(self) -> int:
        with self._cond:
            return len(self._text)

    def text(self, start: int = 0) -> str:
        with self._cond:
            return self._text[start:]

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def send(self, data: str) -> None:
        raw = data.encode()
        for i in range(0, len(raw), CHUNK):
            self._sock.sendall(raw[i : i + CHUNK])
            time.sleep(CHUNK_PAUSE)

    def wait_for(self, pattern: str, *, start: int = 0, timeout: float = 60.0) -> re.Match[str]:
        """The first match of `pattern` in the text received from `start` on."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                match = regex.search(self._text, start)
                if match:
                    return match
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    why = "console closed" if self._closed else f"{timeout:.0f} s passed"
                    raise ConsoleError(
                        f"{self.name}: /{pattern}/ not seen ({why}); last lines:\n"
                        + "\n".join(self._text.splitlines()[-25:])
                    )
                self._cond.wait(min(left, 1.0))

    def run(self, command: str, *, timeout: float = 60.0, check: bool = True) -> str:
        """Run one shell command line; return what it printed (its echo excluded)."""
        with self._run_lock:
            return self._run(command, timeout=timeout, check=check)

    def _run(self, command: str, *, timeout: float, check: bool) -> str:
        n = next(_ids)
        start = self.position
        # The echo shows `__XEN""HA_7_$?__`; only the output reads `__XENHA_7_0__`.
        # A command ending in `&` is already terminated; `&;` would be a syntax error.
        sep = " " if command.rstrip().endswith("&") else "; "
        self.send(f'{command.rstrip()}{sep}echo "__XEN""HA_{n}_$?__"\n')
        match = self.wait_for(rf"__XENHA_{n}_(\d+)__", start=start, timeout=timeout)
        body = self.text(start)[: match.start() - start]
        # Drop the echoed command line(s): everything up to the line holding the marker's echo.
        echo_end = body.find(f'"__XEN""HA_{n}_$?__"')
        if echo_end >= 0:
            newline = body.find("\n", echo_end)
            body = body[newline + 1 :] if newline >= 0 else ""
        status = int(match.group(1))
        if check and status != 0:
            raise CommandFailed(command, status, body)
        return body

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
