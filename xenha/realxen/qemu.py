"""Boot two real Xen hosts under QEMU TCG and drive their dom0 consoles.

Every QEMU process is started here, remembered by PID, and ended by that PID: on `stop()`, on
leaving the `with` block, at interpreter exit, and - through PR_SET_PDEATHSIG - even when the
Python process itself is killed. `power_cut(host)` is SIGKILL: no FIN, no RST, the peer's TCP
connection just goes quiet, exactly like a host losing power.

Networking, and only on this machine:
- the two dom0s share a private Ethernet segment (eth0, 10.99.0.0/24) carried by QEMU's
  socket netdev over one TCP connection on 127.0.0.1;
- with `api_port`, each dom0 gets a restricted user-mode NIC (eth1) whose single guestfwd rule
  runs `socat - TCP:127.0.0.1:<api_port>` per connection, and dom0's init listens on
  127.0.0.1:<api_port> and forwards there, so a kubeconfig for https://127.0.0.1:<api_port>
  works unchanged inside dom0. `restrict=on` keeps every other packet inside QEMU.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from xenha.realxen import scripts
from xenha.realxen.console import Console
from xenha.realxen.image import REPO_ROOT, Image, log

# The CPU model Xen's own CI uses under TCG; `-cpu max` boots Xen but dom0 dies on a #PF, and
# /dev/kvm here is a software hypervisor Xen cannot run on (shared/lab/xen-in-qemu.md).
CPU_ARGS = ("-accel", "tcg,tb-size=256", "-cpu", "qemu64,+svm")
MEMORY_MIB = 1280
XEN_CMDLINE = "console=com1 com1=115200,8n1 dom0_mem=640M,max:640M dom0_max_vcpus=1 noreboot"
DOM0_UP = "XENHA-DOM0-UP"
SUBNET = "10.99.0"

_PR_SET_PDEATHSIG = 1
_live: dict[int, subprocess.Popen[bytes]] = {}
_live_lock = threading.Lock()


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: QEMU gets SIGKILL if this process dies.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@atexit.register
def _kill_leftovers() -> None:
    with _live_lock:
        procs = list(_live.values())
        _live.clear()
    for proc in procs:
        _kill(proc)


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port, without connecting (a connection would be
    taken by QEMU's socket netdev as its peer)."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                parts = line.split()
                if parts[1].endswith(want) and parts[3] == "0A":
                    return True
    return False


@dataclass
class Host:
    name: str  # "xen-a": the dom0 hostname and the Kubernetes node name
    ip: str  # on the private segment
    run_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    console: Console | None = None
    started: float = 0.0
    boot_seconds: float | None = None
    out_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.out_dir = self.run_dir / f"{self.name}-out"

    def mac(self, nic: int) -> str:
        last = int(self.ip.rsplit(".", 1)[1])
        return f"52:54:00:99:{nic:02x}:{last:02x}"

    @property
    def socket_path(self) -> Path:
        return self.run_dir / f"{self.name}.sock"

    @property
    def serial_log(self) -> Path:
        return self.run_dir / f"{self.name}.serial.log"

    @property
    def overlay(self) -> Path:
        return self.run_dir / f"{self.name}.qcow2"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def sh(self, command: str, *, timeout: float = 120.0, check: bool = True) -> str:
        """Run a command line in dom0's shell and return its output."""
        if self.console is None:
            raise RuntimeError(f"{self.name} is not booted")
        return self.console.run(command, timeout=timeout, check=check)


class TwoHosts:
    """Hosts A and B, booted in parallel from one image. Use as a context manager."""

    def __init__(
        self,
        image: Image,
        run_dir: Path,
        *,
        api_port: int | None = None,
        share_source: Path | None = REPO_ROOT,
        extra_dom0_args: str = "",
        dom0_hook: str | None = None,
    ) -> None:
        self.image = image
        self.run_dir = run_dir
        self.api_port = api_port
        self.share_source = share_source
        self.extra_dom0_args = extra_dom0_args
        # Shell text dom0's init sources before starting xenstored/xenconsoled.
        self.dom0_hook = dom0_hook
        self.a = Host("xen-a", f"{SUBNET}.1", run_dir)
        self.b = Host("xen-b", f"{SUBNET}.2", run_dir)
        self.link_port = 0
        self._stopped = threading.Event()

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.a, self.b

    def __enter__(self) -> TwoHosts:
        try:
            self.boot()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- boot -----------------------------------------------------------------------------

    def boot(self, timeout: float = 600.0) -> None:
        """Start both QEMUs and wait for both dom0 shells (about 1-2 minutes in parallel)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.link_port = free_port()
        self._start(self.a, f"listen=127.0.0.1:{self.link_port}")
        deadline = time.monotonic() + 30
        while not _listening(self.link_port):
            if not self.a.alive or time.monotonic() > deadline:
                raise RuntimeError(f"{self.a.name}'s QEMU never listened: {self._stderr(self.a)}")
            time.sleep(0.1)
        self._start(self.b, f"connect=127.0.0.1:{self.link_port}")
        # Connect both consoles at once: QEMU drops serial output while no client listens.
        for host in self.hosts:
            host.console = Console.connect(host.socket_path, host.name)
        for host in self.hosts:
            self._wait_up(host, timeout)

    def _qemu_args(self, host: Host, link: str) -> list[str]:
        img = self.image
        dom0 = (
            f"root=/dev/vda rw console=hvc0 earlyprintk=xen quiet net.ifnames=0 "
            f"init=/sbin/xenha-init xenha.host={host.name} xenha.ip={host.ip}/24"
        )
        if self.api_port:
            dom0 += f" xenha.apiport={self.api_port}"
        if self.extra_dom0_args:
            dom0 += " " + self.extra_dom0_args
        sock, logf = host.socket_path, host.serial_log
        args = [
            "qemu-system-x86_64",
            "-name",
            host.name,
            *CPU_ARGS,
            "-m",
            str(MEMORY_MIB),
            "-smp",
            "1",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-chardev",
            f"socket,id=s0,path={sock},server=on,wait=off,logfile={logf}",
            "-serial",
            "chardev:s0",
            "-kernel",
            str(img.xen),
            "-append",
            XEN_CMDLINE,
            # QEMU's multiboot loader takes modules as a comma list, each with its arguments.
            "-initrd",
            f"{img.kernel} {dom0},{img.initrd}",
            "-drive",
            f"file={host.overlay},if=virtio,format=qcow2,cache=unsafe",
            "-netdev",
            f"socket,id=n1,{link}",
            "-device",
            # Distinct MACs: QEMU gives every NIC the same default one.
            f"virtio-net-pci,netdev=n1,addr=0x4,mac={host.mac(1)}",
        ]
        if self.api_port:
            fwd = f"cmd:socat - TCP:127.0.0.1:{self.api_port}"
            args += [
                "-netdev",
                f"user,id=n2,restrict=on,guestfwd=tcp:10.0.2.100:6443-{fwd}",
                "-device",
                f"virtio-net-pci,netdev=n2,addr=0x5,mac={host.mac(2)}",
            ]
        if self.share_source is not None:
            args += [
                "-virtfs",
                f"local,path={self.share_source},mount_tag=xenha-src,"
                "security_model=none,readonly=on",
            ]
        args += ["-virtfs", f"local,path={host.out_dir},mount_tag=xenha-out,security_model=none"]
        return args

    def _start(self, host: Host, link: str) -> None:
        for stale in (host.socket_path, host.serial_log, host.overlay):
            stale.unlink(missing_ok=True)
        shutil.rmtree(host.out_dir, ignore_errors=True)
        host.out_dir.mkdir(parents=True)
        if self.dom0_hook is not None:
            (host.out_dir / "dom0-hook.sh").write_text(self.dom0_hook)
        subprocess.run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(self.image.disk),
                str(host.overlay),
            ],
            check=True,
        )
        stderr = (self.run_dir / f"{host.name}.qemu.err").open("wb")
        host.started = time.monotonic()
        host.proc = subprocess.Popen(
            self._qemu_args(host, link),
            stdin=subprocess.DEVNULL,
            stdout=stderr,
            stderr=stderr,
            preexec_fn=_die_with_parent,  # only prctl: safe between fork and exec
        )
        stderr.close()
        with _live_lock:
            _live[host.proc.pid] = host.proc
        log(f"{host.name}: QEMU pid {host.proc.pid}, console {host.socket_path}")

    def _stderr(self, host: Host) -> str:
        path = self.run_dir / f"{host.name}.qemu.err"
        return path.read_text(errors="replace")[-2000:] if path.exists() else ""

    def _wait_up(self, host: Host, timeout: float) -> None:
        assert host.console is not None
        left = max(1.0, timeout - (time.monotonic() - host.started))
        try:
            host.console.wait_for(DOM0_UP, timeout=left)
        except Exception:
            if not host.alive:
                raise RuntimeError(f"{host.name}'s QEMU exited: {self._stderr(host)}") from None
            raise
        # The shell starts right after the marker; a first command proves it reads input.
        for _ in range(20):
            try:
                host.console.run("true", timeout=10)
                break
            except Exception:
                time.sleep(1)
        host.boot_seconds = round(time.monotonic() - host.started, 1)
        log(f"{host.name}: dom0 shell after {host.boot_seconds} s")

    def serve_commands(self, fifo: Path) -> threading.Thread:
        """A side channel for a person debugging a run: lines `a: CMD` or `b: CMD` written to
        the FIFO run in that dom0; outputs are appended to `<fifo>.out`."""
        with contextlib.suppress(FileExistsError):
            os.mkfifo(fifo)

        def serve() -> None:
            while not self._stopped.is_set():
                with open(fifo) as f:
                    for line in f:
                        which, _, cmd = line.partition(":")
                        if self._stopped.is_set():
                            return  # a later TwoHosts may be reading the same FIFO
                        host = {"a": self.a, "b": self.b}.get(which.strip())
                        if host is None or not cmd.strip():
                            continue
                        try:
                            out = host.sh(cmd.strip(), timeout=120, check=False)
                        except Exception as exc:
                            out = f"error: {exc}\n"
                        with open(f"{fifo}.out", "a") as o:
                            o.write(f"--- {host.name}$ {cmd.strip()}\n{out}")

        thread = threading.Thread(target=serve, name="realxen-commands", daemon=True)
        thread.start()
        return thread

    # --- actions --------------------------------------------------------------------------

    def power_cut(self, host: Host) -> None:
        """SIGKILL the host's QEMU: its peers see neither FIN nor RST."""
        if host.proc is not None:
            _kill(host.proc)
            with _live_lock:
                _live.pop(host.proc.pid, None)
        if host.console is not None:
            host.console.close()
            host.console = None

    def stop(self) -> None:
        self._stopped.set()
        for host in self.hosts:
            if host.console is not None:
                host.console.close()
                host.console = None
            if host.proc is not None:
                if host.proc.poll() is None:
                    # A clean quit first so cached qcow2 metadata is flushed (logs survive).
                    host.proc.terminate()
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        host.proc.wait(timeout=10)
                _kill(host.proc)
                with _live_lock:
                    _live.pop(host.proc.pid, None)
            host.overlay.unlink(missing_ok=True)


_COUNTER = re.compile(r"COUNTER (\d+)$", re.MULTILINE)


def guest_counter(text: str) -> list[int]:
    """The COUNTER values in a stretch of guest console output (timestamps allowed before)."""
    return [int(m.group(1)) for m in _COUNTER.finditer(text.replace("\r", ""))]


def domain_state(listing: str, name: str) -> str | None:
    """The state column (`r-----`, `--p---`, ...) of `name` in `xl list` output."""
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) >= 6 and parts[0] == name:
            return parts[4]
    return None


def domain_running(listing: str, name: str) -> bool:
    # `------` is a runnable guest waiting for a CPU (common under TCG with a busy dom0): only
    # paused, shut down (not for a suspend) or dying is not running.
    state = domain_state(listing, name)
    if state is None or len(state) < 6:
        return False
    paused, shutdown, reason, dying = state[2], state[3], state[4], state[5]
    return paused != "p" and dying != "d" and (shutdown != "s" or reason == "s")


def xl_console_command(seconds: float, domain: str = scripts.GUEST_NAME) -> str:
    """`xl console` for a while: it may ignore SIGTERM, hence `-k 2`."""
    return f"timeout -k 2 {seconds:g} xl console {domain}"


def qemu_pids() -> Sequence[int]:
    """PIDs of QEMUs this process started and has not ended yet."""
    with _live_lock:
        return list(_live)
