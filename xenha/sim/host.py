"""A simulated Xen host: the daemon (`python -m xenha.sim.host`) and `SimHost`, its handle.

The daemon runs the hypervisor (domains, memory, workloads, guest services), the host's
XenStore (`xenha.sim.xenstored`, for pyxs) and the hypercall socket that the host's `xl`
uses. It writes `<state>/bin/xl`, so whoever drives the host just gets a path to `xl`.

Every process of a host carries the host's tag in its environment (`XENHA_SIM_HOST_TAG`):
the daemon, every `xl` started through the wrapper, their transports, and anything started
with `SimHost.env` (an agent). `kill()` SIGKILLs all of them, like a power cut; `pause()`
SIGSTOPs them, like a hung host.

    host = SimHost.start(tmp / "xen-a", "xen-a", fabric_dir=tmp / "fabric")
    host.create_guest("db1", memory_mib=16, dirty_rate=200)
    subprocess.run([host.xl_path, "list"], env=host.env)
    ip, port = host.service_address("db1")
    host.kill()
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from xenha.sim import faults, netpath, paths
from xenha.sim.domstore import XenStoreDomains
from xenha.sim.hypercall import HypercallClient, HypercallServer
from xenha.sim.hypervisor import HostSpec, Hypervisor
from xenha.sim.ledger import LEDGER_NAME, Ledger, NullLedger

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class Cuttable(Protocol):
    def cut(self) -> None: ...


# --- the daemon -----------------------------------------------------------------------------


def write_xl_wrapper(state_dir: Path, tag: str) -> Path:
    path = paths.xl_wrapper(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    python = sys.executable
    text = (
        "#!/bin/sh\n"
        "# xl for the simulated Xen host in this state directory (xenha.sim).\n"
        f"{paths.STATE_ENV}='{Path(state_dir).resolve()}'; export {paths.STATE_ENV}\n"
        f"{paths.TAG_ENV}='{tag}'; export {paths.TAG_ENV}\n"
        f"PYTHONPATH='{PROJECT_ROOT}'${{PYTHONPATH:+:$PYTHONPATH}}; export PYTHONPATH\n"
        f"exec '{python}' -m xenha.sim.xl \"$@\"\n"
    )
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.chmod(0o755)
    tmp.replace(path)
    return path


def run_daemon(spec: HostSpec, *, ready: threading.Event | None = None) -> int:
    state_dir = spec.state_dir
    state_dir.mkdir(parents=True, exist_ok=True)
    run = paths.run_dir(state_dir)
    run.mkdir(parents=True, exist_ok=True)
    tag = os.environ.get(paths.TAG_ENV) or paths.host_tag(spec.name, state_dir)
    write_xl_wrapper(state_dir, tag)

    from xenha.sim.xenstored import XenstoreServer

    ledger: Ledger = (
        Ledger(spec.fabric_dir / LEDGER_NAME, host=spec.name)
        if spec.fabric_dir is not None
        else NullLedger()
    )
    xenstored = XenstoreServer(paths.xenstore_socket(state_dir))
    xenstored.start()
    hv = Hypervisor(spec, ledger=ledger, store=XenStoreDomains(xenstored.store))
    hv.hypercall_path = paths.hypercall_socket(state_dir)
    server = HypercallServer(hv.hypercall_path, hv.dispatch)
    server.serve_in_thread()

    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    ledger.record("host_start", tag=tag)
    info = {
        "name": spec.name,
        "pid": os.getpid(),
        "tag": tag,
        "state_dir": str(state_dir.resolve()),
        "fabric_dir": None if spec.fabric_dir is None else str(spec.fabric_dir.resolve()),
        "hypercall": str(hv.hypercall_path),
        "xenstore": str(paths.xenstore_socket(state_dir)),
        "xl": str(paths.xl_wrapper(state_dir)),
        "started": time.time(),
    }
    tmp = paths.host_file(state_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(info, indent=2))
    tmp.replace(paths.host_file(state_dir))
    log.info("host %s up (pid %d)", spec.name, os.getpid())
    if ready is not None:
        ready.set()
    while not stop.wait(1.0):
        pass

    log.info("host %s shutting down", spec.name)
    hv.shutdown()
    ledger.record("host_stop")
    server.close()
    xenstored.stop()
    with contextlib.suppress(FileNotFoundError):
        paths.host_file(state_dir).unlink()
    with contextlib.suppress(OSError):
        run.rmdir()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xenha.sim.host", description="Run one simulated Xen host."
    )
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--fabric", type=Path, help="directory shared by the lab's hosts")
    parser.add_argument("--total-memory-mib", type=int, default=8192)
    parser.add_argument("--dom0-memory-mib", type=int, default=1024)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--xen-version", default="4.17.5")
    parser.add_argument("--no-colo", action="store_true", help="libxl built without COLO")
    parser.add_argument("--digests", action="store_true", help="ledger memory CRCs")
    parser.add_argument("--colo-interval", type=float, default=5.0)
    parser.add_argument("--suspend-timeout", type=float, default=60.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.name} %(name)s %(levelname)s %(message)s",
    )
    spec = HostSpec(
        name=args.name,
        state_dir=args.state_dir,
        total_memory_mib=args.total_memory_mib,
        dom0_memory_mib=args.dom0_memory_mib,
        nr_cpus=args.cpus,
        xen_version=args.xen_version,
        colo=not args.no_colo,
        fabric_dir=args.fabric,
        digests=args.digests,
        colo_interval=args.colo_interval,
        suspend_timeout=args.suspend_timeout,
    )
    return run_daemon(spec)


# --- the handle -----------------------------------------------------------------------------


class HostStartError(RuntimeError):
    pass


@dataclass
class SimHost:
    """A running simulated host, seen from outside (tests, the lab)."""

    name: str
    state_dir: Path
    tag: str
    pid: int
    fabric_dir: Path | None = None
    process: subprocess.Popen[bytes] | None = None
    netpaths: list[Cuttable] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        state_dir: Path | str,
        name: str,
        *,
        fabric_dir: Path | str | None = None,
        total_memory_mib: int = 8192,
        dom0_memory_mib: int = 1024,
        nr_cpus: int = 2,
        xen_version: str = "4.17.5",
        colo: bool = True,
        digests: bool = False,
        colo_interval: float = 5.0,
        suspend_timeout: float = 60.0,
        log_level: str = "INFO",
        timeout: float = 20.0,
    ) -> SimHost:
        state = Path(state_dir).resolve()
        state.mkdir(parents=True, exist_ok=True)
        fabric = None if fabric_dir is None else Path(fabric_dir).resolve()
        tag = paths.host_tag(name, state)
        with contextlib.suppress(FileNotFoundError):
            paths.host_file(state).unlink()
        argv = [
            sys.executable,
            "-m",
            "xenha.sim.host",
            "--state-dir",
            str(state),
            "--name",
            name,
            "--total-memory-mib",
            str(total_memory_mib),
            "--dom0-memory-mib",
            str(dom0_memory_mib),
            "--cpus",
            str(nr_cpus),
            "--xen-version",
            xen_version,
            "--colo-interval",
            str(colo_interval),
            "--suspend-timeout",
            str(suspend_timeout),
            "--log-level",
            log_level,
        ]
        if fabric is not None:
            argv += ["--fabric", str(fabric)]
        if not colo:
            argv.append("--no-colo")
        if digests:
            argv.append("--digests")
        env = _host_env(state, tag)
        log_file = open(state / "host.log", "ab")  # noqa: SIM115 - handed to the child
        try:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=log_file,
                start_new_session=True,
            )
        finally:
            log_file.close()
        host = cls(
            name=name, state_dir=state, tag=tag, pid=proc.pid, fabric_dir=fabric, process=proc
        )
        host._wait_ready(timeout)
        return host

    @classmethod
    def attach(cls, state_dir: Path | str) -> SimHost:
        """A handle on a host some other process started."""
        info = json.loads(paths.host_file(Path(state_dir)).read_text())
        return cls(
            name=info["name"],
            state_dir=Path(info["state_dir"]),
            tag=info["tag"],
            pid=int(info["pid"]),
            fabric_dir=None if info["fabric_dir"] is None else Path(info["fabric_dir"]),
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise HostStartError(
                    f"simulated host {self.name} exited with {self.process.returncode}:\n"
                    + self.log_tail()
                )
            try:
                info = json.loads(paths.host_file(self.state_dir).read_text())
                if info["pid"] == self.pid:
                    with HypercallClient(self.hypercall_path, timeout=2) as hc:
                        hc.call("physinfo")
                    return
            except (FileNotFoundError, ValueError, KeyError, OSError):
                pass
            time.sleep(0.05)
        raise HostStartError(
            f"simulated host {self.name} not up after {timeout}s:\n" + self.log_tail()
        )

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join((self.state_dir / "host.log").read_text().splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    # --- where things are -----------------------------------------------------------------

    @property
    def xl_path(self) -> Path:
        return paths.xl_wrapper(self.state_dir)

    @property
    def xenstore_path(self) -> Path:
        return paths.xenstore_socket(self.state_dir)

    @property
    def hypercall_path(self) -> Path:
        return paths.hypercall_socket(self.state_dir)

    @property
    def ledger_path(self) -> Path | None:
        return None if self.fabric_dir is None else self.fabric_dir / LEDGER_NAME

    @property
    def env(self) -> dict[str, str]:
        """Environment for processes that belong to this host (its agent, its xl):
        `xl` on PATH is this host's, pyxs finds this host's XenStore, and faults reach them."""
        return _host_env(self.state_dir, self.tag)

    # --- talking to it --------------------------------------------------------------------

    def hypercall(self, timeout: float | None = 10.0) -> HypercallClient:
        return HypercallClient(self.hypercall_path, timeout=timeout)

    def xl(
        self, *args: str, timeout: float = 60.0, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.xl_path), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )

    def create_guest(
        self,
        name: str,
        *,
        memory_mib: int = 16,
        vcpus: int = 1,
        dirty_rate: float = 0.0,
        service_ip: str = "127.0.0.1",
        service_port: int = 0,
        divergence: float = 0.0,
        paused: bool = False,
        extra: Mapping[str, str] | None = None,
    ) -> dict[str, Any]:
        """`xl create` a guest from a config file written here; returns its domain info."""
        lines = [
            f'name = "{name}"',
            'type = "pv"',
            f"memory = {memory_mib}",
            f"vcpus = {vcpus}",
            f"sim_dirty_rate = {dirty_rate}",
            f'sim_service_ip = "{service_ip}"',
            f"sim_service_port = {service_port}",
            f"sim_divergence = {divergence}",
            *(f"{k} = {v}" for k, v in (extra or {}).items()),
        ]
        cfg = self.state_dir / "configs" / f"{name}.cfg"
        cfg.parent.mkdir(parents=True, exist_ok=True)
        cfg.write_text("\n".join(lines) + "\n")
        result = self.xl("create", *(["-p"] if paused else []), str(cfg))
        if result.returncode:
            raise RuntimeError(f"xl create {name} failed: {result.stderr}")
        info = self.domain(name)
        assert info is not None
        return info

    def domains(self) -> list[dict[str, Any]]:
        with self.hypercall() as hc:
            domains: list[dict[str, Any]] = hc.call("domain_list")["domains"]
            return domains

    def domain(self, name: str) -> dict[str, Any] | None:
        return next((d for d in self.domains() if d["name"] == name), None)

    def service_address(self, name: str) -> tuple[str, int]:
        info = self.domain(name)
        if info is None:
            raise KeyError(name)
        ip, _, port = str(info["service"]).rpartition(":")
        return ip, int(port)

    # --- faults ---------------------------------------------------------------------------

    def processes(self) -> list[int]:
        return faults.tagged_pids(self.tag)

    @property
    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def add_netpath(self, path: Cuttable) -> None:
        """Network paths that die with this host (cut silently on `kill()`)."""
        self.netpaths.append(path)

    def kill(self) -> None:
        """Power cut: its network goes silent, every process of the host dies at once.

        Silent for the survivors too: a connection to or from this host on any NetPath of
        this process (the peers' paths carry what this host dialed) stops in both
        directions before the processes die, so the FIN or RST their kernel sends reaches
        nobody, and a peer's socket stays open with nothing more on it, as after a real
        power cut.
        """
        for path in self.netpaths:
            path.cut()
        # Frozen first: from this instant the host does nothing, which is when it died.
        frozen = faults.freeze_tagged(self.tag)
        netpath.silence_processes(frozen)
        self._record("host_killed")
        faults.kill_tagged(self.tag)
        if self.process is not None:
            self.process.wait()
        for sock in (self.hypercall_path, self.xenstore_path):
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()
        with contextlib.suppress(OSError):
            self.hypercall_path.parent.rmdir()

    def pause(self) -> None:
        """Hung host: every process stops where it is (SIGSTOP), by the time this returns."""
        faults.freeze_tagged(self.tag)
        self._record("host_stopped")

    def resume(self) -> None:
        self._record("host_continued")
        faults.signal_tagged(self.tag, signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """Orderly shutdown (domains destroyed), then anything left of the host is killed."""
        if self.alive:
            faults.signal_tagged(self.tag, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while self.alive and time.monotonic() < deadline:
                time.sleep(0.05)
        faults.kill_tagged(self.tag)
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=5)

    def _record(self, kind: str) -> None:
        if self.ledger_path is not None:
            Ledger(self.ledger_path, host=self.name).record(kind)


def _host_env(state_dir: Path, tag: str) -> dict[str, str]:
    env = dict(os.environ)
    env[paths.STATE_ENV] = str(state_dir)
    env[paths.TAG_ENV] = tag
    env["XENSTORED_PATH"] = str(paths.xenstore_socket(state_dir))
    env["PATH"] = f"{paths.xl_wrapper(state_dir).parent}:{env.get('PATH', '')}"
    root = str(PROJECT_ROOT)
    env["PYTHONPATH"] = f"{root}:{env['PYTHONPATH']}" if env.get("PYTHONPATH") else root
    return env


def wait_for(
    predicate: Any, timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    """Poll `predicate()` until it returns something truthy; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def connectable(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


if __name__ == "__main__":
    sys.exit(main())
