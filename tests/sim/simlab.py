"""A small lab of simulated hosts for the simulator's own tests (not a pytest plugin: test
modules import the `lab` fixture from here)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from xenha.sim import ledger
from xenha.sim.host import SimHost
from xenha.sim.tap import StreamTap

PY = sys.executable
T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "it") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


class Proc:
    """A process started for a host, with its stderr kept in a file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as f:
            self.popen = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=f)

    @property
    def stderr(self) -> str:
        return self.log.read_text()

    def wait(self, timeout: float = 30.0) -> int:
        return self.popen.wait(timeout=timeout)

    def poll(self) -> int | None:
        return self.popen.poll()


class Lab:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.fabric = root / "fabric"
        self.hosts: list[SimHost] = []
        self._n = 0

    @property
    def ledger(self) -> Path:
        return self.fabric / ledger.LEDGER_NAME

    def events(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        return ledger.of_kind(self.ledger, kind, **match)

    def host(self, name: str, **options: Any) -> SimHost:
        host = SimHost.start(self.root / name, name, fabric_dir=self.fabric, **options)
        self.hosts.append(host)
        return host

    def _log(self, what: str) -> Path:
        self._n += 1
        return self.root / f"{self._n:02d}-{what}.log"

    def receive(self, host: SimHost, *options: str) -> tuple[Proc, Path]:
        """`xl migrate-receive <options> -e` on `host`, behind a one-shot Unix socket."""
        sock = self.root / f"recv{self._n + 1}.sock"
        argv = [PY, "-m", "xenha.sim.pipe", "serve", str(sock), "--", str(host.xl_path)]
        proc = Proc([*argv, "migrate-receive", *options, "-e"], host.env, self._log("receive"))
        wait_for(sock.exists, 10, "the receiver's socket")
        return proc, sock

    def remus(
        self, host: SimHost, domain: str, *options: str, to: Path, transport: str | None = None
    ) -> Proc:
        """`xl remus` on `host`; its transport dials the Unix socket `to` (`transport`: a
        command ending with the option that takes the socket, default `pipe connect`)."""
        command = f"{transport or f'{PY} -m xenha.sim.pipe connect'} {to}"
        argv = [str(host.xl_path), "remus", *options, "-s", "", domain, command]
        return Proc(argv, host.env, self._log("remus"))

    def tap(self, receiver: Path, **options: Any) -> StreamTap:
        return StreamTap(self.root / "tap.sock", receiver=receiver, **options).start()

    def close(self) -> None:
        for host in self.hosts:
            with contextlib.suppress(Exception):
                host.stop(timeout=3)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    the_lab = Lab(tmp_path)
    try:
        yield the_lab
    finally:
        the_lab.close()
