"""A real, throwaway Kubernetes control plane: etcd + kube-apiserver + kube-controller-manager.

Everything listens on 127.0.0.1 only, on free ports, with its data and PKI in one temporary
directory. RBAC is on, ServiceAccount tokens are issued by the TokenRequest API with a key
generated for this start, and the controller-manager runs the controllers whose absence would
make tests lie: the garbage collector (ownerReferences) and namespace deletion.

Nothing it starts may outlive it. Each process runs in its own process group (so a terminal's
Ctrl-C reaches only us, and we stop them in order), gets PR_SET_PDEATHSIG when started from the
main thread, and is announced to a watchdog process that cleans up when our process dies
without saying goodbye; ``stop()`` is also registered with atexit and on SIGTERM/SIGHUP.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, TYPE_CHECKING, Any, Self, cast

from xenha.controlplane import build, pki
from xenha.controlplane.kubeconfig import write_kubeconfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

SERVICE_CIDR = "10.0.0.0/24"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
# garbage-collector: ownerReferences; namespace: deleting a namespace deletes its contents;
# serviceaccount: the "default" ServiceAccount in every namespace, as in any real cluster (and
# its appearance tells us the controller-manager is up). Token Secrets are not needed: tokens
# come from the TokenRequest API.
DEFAULT_CONTROLLERS = (
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
)
PR_SET_PDEATHSIG = 1


class ControlPlaneError(RuntimeError):
    """The control plane did not come up (the message carries the relevant log tail)."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; unlike its base class, says what kubectl said."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stderr or ''}{self.stdout or ''}".rstrip()


def _timeout_default() -> float:
    # Generous: a single-node etcd and apiserver on two busy cores can take a while, and a
    # slow start must not become a flaky test.
    return float(os.environ.get("XENHA_CP_TIMEOUT", "180"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


# --- process lifetime ----------------------------------------------------------------------

_libc: Any = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(None, use_errno=True)


def _death_signal(parent: int) -> Callable[[], None]:
    prctl = _libc.prctl if _libc is not None else None

    def preexec() -> None:
        # Runs in the forked child before exec: only async-signal-safe work, nothing that
        # could need a lock another thread of the parent held at fork time.
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            # The parent died between fork and prctl; the signal will never come.
            os._exit(1)

    return preexec


class _Watchdog:
    def __init__(self, workdir: Path, keep: bool) -> None:
        read_end, self._write = os.pipe()
        argv = [sys.executable, "-I", str(Path(__file__).with_name("_watchdog.py")), str(workdir)]
        if keep:
            argv.append("--keep")
        try:
            self.proc = subprocess.Popen(
                argv,
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            os.close(read_end)

    def _send(self, line: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write, (line + "\n").encode())

    def add(self, pgid: int) -> None:
        self._send(f"add {pgid}")

    def remove(self, pgid: int) -> None:
        self._send(f"del {pgid}")

    def close(self) -> None:
        self._send("exit")
        with contextlib.suppress(OSError):
            os.close(self._write)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pgid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)


_RUNNING: set[ControlPlane] = set()
_HOOKS_LOCK = threading.Lock()
_hooks_installed = False


def _stop_all() -> None:
    for plane in list(_RUNNING):
        with contextlib.suppress(Exception):
            plane.stop()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    # Die the way the signal meant us to, so the exit status still says what happened.
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_hooks() -> None:
    global _hooks_installed
    with _HOOKS_LOCK:
        if _hooks_installed:
            return
        _hooks_installed = True
        atexit.register(_stop_all)
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGHUP):
            # Only where nobody else (pytest, kopf, the lab) has claimed the signal; the
            # watchdog covers the rest.
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, _on_signal)


# --- the control plane ---------------------------------------------------------------------


@dataclass(eq=False)
class ControlPlane:
    """Start with ``start()`` or ``with ControlPlane() as cp:``; stop with ``stop()``.

    After start: ``server`` (https URL), ``kubeconfig`` (admin, system:masters),
    ``ca_pem``, ``workdir`` (logs in ``workdir / "logs"``), ``binaries``.
    """

    binaries: Mapping[str, Path] | None = None
    # None: build missing binaries unless CI=true.
    build: bool | None = None
    base_dir: Path | None = None
    keep: bool = field(default_factory=lambda: bool(os.environ.get("XENHA_CP_KEEP")))
    timeout: float = field(default_factory=_timeout_default)
    controllers: Sequence[str] = DEFAULT_CONTROLLERS
    extra_apiserver_args: Sequence[str] = ()
    # Wait for the controller-manager too (about a second more); the lab can skip it.
    wait_for_controllers: bool = True

    workdir: Path = field(init=False, default=Path())
    server: str = field(init=False, default="")
    kubeconfig: Path = field(init=False, default=Path())
    etcd_url: str = field(init=False, default="")
    startup_seconds: float = field(init=False, default=0.0)
    _pki: pki.Pki | None = field(init=False, default=None, repr=False)
    _procs: list[_Process] = field(init=False, default_factory=list, repr=False)
    _watchdog: _Watchdog | None = field(init=False, default=None, repr=False)
    # Re-entrant: the SIGTERM handler may call stop() while the main thread is inside it.
    _lock: threading.RLock = field(init=False, default_factory=threading.RLock, repr=False)

    # -- public ----------------------------------------------------------------------------

    @property
    def ca_pem(self) -> bytes:
        assert self._pki is not None, "not started"
        return self._pki.ca.cert_pem()

    @property
    def running(self) -> bool:
        return bool(self._procs) and all(p.alive() for p in self._procs)

    @property
    def pids(self) -> dict[str, int]:
        return {p.name: p.popen.pid for p in self._procs}

    def start(self) -> Self:
        started = time.monotonic()
        if self.binaries is None:
            allowed = build.build_allowed() if self.build is None else self.build
            self.binaries = build.ensure(build.CONTROL_PLANE, build=allowed)
        missing = [n for n in build.CONTROL_PLANE[:3] if not Path(self.binaries[n]).is_file()]
        if missing:
            raise build.MissingBinaryError(f"missing control plane binaries: {missing}")
        _install_hooks()
        self.workdir = Path(tempfile.mkdtemp(prefix="xenha-cp-", dir=self.base_dir))
        (self.workdir / "logs").mkdir()
        self._watchdog = _Watchdog(self.workdir, self.keep)
        _RUNNING.add(self)
        try:
            self._pki = pki.generate(self.workdir / "pki")
            for attempt in range(3):
                try:
                    self._start_processes()
                    break
                except _PortTaken:
                    # Another process took a port between our probe and the bind.
                    self._stop_processes()
                    shutil.rmtree(self.workdir / "etcd", ignore_errors=True)
                    if attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def stop(self) -> None:
        with self._lock:
            self._stop_processes()
            if self._watchdog is not None:
                self._watchdog.close()
                self._watchdog = None
            if not self.keep and self.workdir != Path() and self.workdir.exists():
                shutil.rmtree(self.workdir, ignore_errors=True)
            _RUNNING.discard(self)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def api_client(self, kubeconfig: Path | None = None) -> ApiClient:
        """A client for the admin kubeconfig, or for ``kubeconfig``; ``close_client`` it."""
        from kubernetes import config

        load = cast(Callable[..., "ApiClient"], config.new_client_from_config)
        return load(config_file=str(kubeconfig or self.kubeconfig))

    def kubectl(
        self,
        *args: str,
        kubeconfig: Path | None = None,
        input: str | None = None,
        check: bool = True,
        timeout: float = 120,
    ) -> subprocess.CompletedProcess[str]:
        assert self.binaries is not None
        argv = [str(self.binaries["kubectl"]), f"--kubeconfig={kubeconfig or self.kubeconfig}"]
        result = subprocess.run(
            [*argv, *args], input=input, capture_output=True, text=True, timeout=timeout
        )
        if check and result.returncode != 0:
            raise KubectlError(result.returncode, ["kubectl", *args], result.stdout, result.stderr)
        return result

    def logs(self, name: str, lines: int = 40) -> str:
        return _tail(self.workdir / "logs" / f"{name}.log", lines)

    # -- internals -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str]) -> _Process:
        log = self.workdir / "logs" / f"{name}.log"
        handle: IO[bytes]
        with log.open("ab") as handle:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
                close_fds=True,
                # PDEATHSIG follows the *thread* that forked: from any other thread it would
                # kill the child when that thread ends, so there we rely on the watchdog.
                preexec_fn=(
                    _death_signal(os.getpid())
                    if threading.current_thread() is threading.main_thread()
                    else None
                ),
            )
        process = _Process(name, popen, log)
        self._procs.append(process)
        assert self._watchdog is not None
        self._watchdog.add(process.pgid)
        return process

    def _stop_processes(self) -> None:
        # Dependents first: the controller-manager and apiserver, then etcd.
        for group in (("kube-controller-manager", "kube-apiserver"), ("etcd",)):
            procs = [p for p in self._procs if p.name in group]
            for proc in procs:
                proc.signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for proc in procs:
                try:
                    proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.signal(signal.SIGKILL)
                    proc.popen.wait()
                # Strays in the group (none expected) go too.
                proc.signal(signal.SIGKILL)
                if self._watchdog is not None:
                    self._watchdog.remove(proc.pgid)
        self._procs.clear()

    def _start_processes(self) -> None:
        assert self.binaries is not None
        assert self._pki is not None
        deadline = time.monotonic() + self.timeout
        etcd = self._start_etcd()
        self._wait(etcd, deadline, self._etcd_healthy, "etcd /health")
        apiserver = self._start_apiserver()
        self.kubeconfig = write_kubeconfig(
            self.workdir / "admin.kubeconfig",
            server=self.server,
            ca_pem=self._pki.ca.cert_pem(),
            user="xenha-admin",
            client_cert_pem=self._pki.admin.cert_pem(),
            client_key_pem=self._pki.admin.key_pem(),
        )
        kcm_kubeconfig = write_kubeconfig(
            self.workdir / "controller-manager.kubeconfig",
            server=self.server,
            ca_pem=self._pki.ca.cert_pem(),
            user="system:kube-controller-manager",
            client_cert_pem=self._pki.controller_manager.cert_pem(),
            client_key_pem=self._pki.controller_manager.key_pem(),
        )
        self._wait(
            apiserver,
            deadline,
            lambda: self._get("/readyz") == 200,
            "apiserver /readyz",
            also=(etcd,),
        )
        # Only now: the controller-manager gives up (exits) when the apiserver is not healthy
        # within 10 s, which a loaded machine can exceed.
        kcm = self._start_controller_manager(kcm_kubeconfig)
        if self.wait_for_controllers:
            # The serviceaccount controller creating "default" in "default" shows the
            # controller-manager is connected and running its controllers.
            self._wait(
                kcm,
                deadline,
                lambda: self._get("/api/v1/namespaces/default/serviceaccounts/default") == 200,
                "controller-manager (default ServiceAccount)",
                also=(etcd, apiserver),
            )

    def _start_etcd(self) -> _Process:
        assert self.binaries is not None
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        return self._spawn(
            "etcd",
            [
                str(self.binaries["etcd"]),
                "--name=xenha",
                f"--data-dir={self.workdir / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=xenha={peer_url}",
                "--initial-cluster-state=new",
                # The data is thrown away after the run; fsync only costs time.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )

    def _start_apiserver(self) -> _Process:
        assert self._pki is not None
        assert self.binaries is not None
        port = free_port()
        self.server = f"https://127.0.0.1:{port}"
        p = self._pki
        return self._spawn(
            "kube-apiserver",
            [
                str(self.binaries["kube-apiserver"]),
                f"--etcd-servers={self.etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={port}",
                f"--cert-dir={self.workdir / 'apiserver-certs'}",
                f"--tls-cert-file={p.serving.cert}",
                f"--tls-private-key-file={p.serving.key}",
                f"--client-ca-file={p.ca.cert}",
                "--authorization-mode=RBAC",
                f"--service-account-issuer={SA_ISSUER}",
                f"--service-account-key-file={p.sa_public}",
                f"--service-account-signing-key-file={p.sa_private}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                # 127.0.0.1 is not a valid endpoint address, and nothing here routes service
                # traffic; without this the reconciler logs a rejection every few seconds.
                "--endpoint-reconciler-type=none",
                # The agents are privileged DaemonSets, as on any cluster that runs CNI or CSI
                # node plugins; without this the apiserver rejects the chart's pods.
                "--allow-privileged=true",
                "--profiling=false",
                *self.extra_apiserver_args,
            ],
        )

    def _start_controller_manager(self, kubeconfig: Path) -> _Process:
        assert self.binaries is not None
        return self._spawn(
            "kube-controller-manager",
            [
                str(self.binaries["kube-controller-manager"]),
                f"--kubeconfig={kubeconfig}",
                f"--controllers={','.join(self.controllers)}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                # No serving endpoint at all: nothing needs it, and one port less to race for.
                "--secure-port=0",
                "--bind-address=127.0.0.1",
            ],
        )

    def _etcd_healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.etcd_url}/health", timeout=2) as response:
                return bool(json.load(response).get("health") == "true")
        except (OSError, ValueError):
            return False

    def _ssl(self) -> ssl.SSLContext:
        assert self._pki is not None
        context = ssl.create_default_context(cafile=str(self._pki.ca.cert))
        context.load_cert_chain(str(self._pki.admin.cert), str(self._pki.admin.key))
        return context

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(
                f"{self.server}{path}", context=self._ssl(), timeout=5
            ) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    def _wait(
        self,
        process: _Process,
        deadline: float,
        ready: Callable[[], bool],
        what: str,
        also: Sequence[_Process] = (),
    ) -> None:
        delay = 0.05
        while True:
            for proc in (process, *also):
                if not proc.alive():
                    log = _tail(proc.log)
                    if "address already in use" in log:
                        raise _PortTaken(log)
                    raise ControlPlaneError(
                        f"{proc.name} exited with {proc.popen.returncode} while waiting for "
                        f"{what}; last log lines ({proc.log}):\n{log}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                raise ControlPlaneError(
                    f"timed out after {self.timeout:.0f}s waiting for {what}; "
                    f"last log lines ({process.log}):\n{_tail(process.log)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)


class _PortTaken(ControlPlaneError):
    pass


def close_client(api: ApiClient) -> None:
    # ApiClient.close is untyped upstream.
    cast(Any, api).close()


def start(**kwargs: Any) -> ControlPlane:
    """Start a control plane (see ``ControlPlane`` for the keyword arguments)."""
    return ControlPlane(**kwargs).start()
