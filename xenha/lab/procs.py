"""The processes a stack starts, and how it makes sure none outlives it.

Every child runs in its own session (so its pgid is its pid, a terminal's Ctrl-C reaches only
the stack's owner, and a whole group can be signalled at once), logs to a file, and is written
to a registry file so that another process (``xenha lab down``, a test) can check on it.

Process groups are not enough: an agent starts each replicator in a session of its own so that
it outlives the agent, and the replicator starts ``xl``. So every child is also *tagged*
through its environment (``XENHA_LAB_STACK=<id>``, ``XENHA_LAB_HOST=<host>`` for what runs "on"
a host), which descendants inherit; a power cut kills everything carrying the host's tag, and
``stop_all`` ends with a sweep of everything carrying the stack's.

If the owner dies without stopping them (SIGKILL, a crash), a reaper process that holds the
read end of a pipe from the owner sees end-of-file and kills every tagged process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STACK_ENV = "XENHA_LAB_STACK"
HOST_ENV = "XENHA_LAB_HOST"
REGISTRY = "processes.json"


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    host: str | None = None
    argv: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def pgid(self) -> int:
        # start_new_session: the child leads its own session and process group.
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, signum)

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "pid": self.pid,
            "pgid": self.pgid,
            "host": self.host,
            "log": str(self.log),
            "started": self.started,
            "exitCode": self.popen.returncode,
            "argv": self.argv,
        }


def _environ(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def tagged(tag: str, host: str | None = None) -> list[int]:
    """PIDs of live processes carrying the stack's tag (and the host's, if given)."""
    want = [f"{STACK_ENV}={tag}".encode()]
    if host is not None:
        want.append(f"{HOST_ENV}={host}".encode())
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        env = _environ(int(entry)).split(b"\0")
        if all(w in env for w in want) and not _zombie(int(entry)):
            found.append(int(entry))
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            # The state follows the parenthesised command name, which may contain spaces.
            return handle.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except (OSError, IndexError):
        return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _zombie(pid)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies awaiting their parent don't)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _pgid_of(int(entry)) == pgid and not _zombie(int(entry)):
            return True
    return False


def _pgid_of(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def signal_pids(pids: Iterable[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def kill_tagged(tag: str, host: str | None = None, *, timeout: float = 10.0) -> list[int]:
    """SIGKILL every tagged process until none is left; returns what was killed.

    Repeated because a process may start a child between the scan and the kill.
    """
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        pids = tagged(tag, host)
        if not pids:
            return killed
        signal_pids(pids, signal.SIGKILL)
        killed.extend(p for p in pids if p not in killed)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes tagged {tag}/{host} survive SIGKILL: {pids}")
        time.sleep(0.05)


class Reaper:
    """The crash net: kills the stack's processes when the owner dies unannounced.

    It kills every process whose environment holds one of its markers (``NAME=value``): the
    stack's tag, and the tags of the simulated hosts (started by ``xenha.sim``, which tags
    its own processes).
    """

    def __init__(self, markers: Sequence[str]) -> None:
        read_end, self._write = os.pipe()
        env = {k: v for k, v in os.environ.items() if k not in (STACK_ENV, HOST_ENV)}
        script = Path(__file__).with_name("_reaper.py")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", str(script), *markers],
                stdin=read_end,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        finally:
            os.close(read_end)

    def mark(self, marker: str) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write, f"mark {marker}\n".encode())

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._write, b"exit\n")
        with contextlib.suppress(OSError):
            os.close(self._write)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Processes:
    """Starts and stops the stack's processes; mirrors them in ``<workdir>/processes.json``."""

    def __init__(self, workdir: Path, tag: str, *, base_env: Mapping[str, str] | None = None):
        self.workdir = workdir
        self.tag = tag
        self.logs = workdir / "logs"
        self.registry = workdir / REGISTRY
        self.children: list[Child] = []
        self._base_env = dict(os.environ if base_env is None else base_env)
        self._reaper: Reaper | None = None

    def start_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = Reaper([f"{STACK_ENV}={self.tag}"])

    def watch_env(self, marker: str) -> None:
        """Have the reaper also kill processes carrying ``marker`` (``NAME=value``)."""
        if self._reaper is not None:
            self._reaper.mark(marker)

    def close_reaper(self) -> None:
        """Everything is stopped: the crash net is no longer needed."""
        if self._reaper is not None:
            self._reaper.close()
            self._reaper = None

    def env(
        self, host: str | None = None, extra: Mapping[str, str] | None = None
    ) -> dict[str, str]:
        env = {**self._base_env, STACK_ENV: self.tag, **(extra or {})}
        env.pop(HOST_ENV, None)
        if host is not None:
            env[HOST_ENV] = host
        return env

    def spawn(
        self,
        name: str,
        argv: Sequence[str],
        *,
        host: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log = self.logs / f"{name}.log"
        with log.open("ab") as handle:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=cwd or self.workdir,
                env=self.env(host, env),
                start_new_session=True,
                close_fds=True,
            )
        child = Child(name, popen, log, host, list(argv))
        self.children.append(child)
        self.save()
        return child

    def adopt(
        self, name: str, popen: subprocess.Popen[bytes], log: Path, *, host: str | None = None
    ) -> Child:
        """Record a process someone else started for the stack (in its own session)."""
        args = popen.args
        argv = [str(a) for a in args] if isinstance(args, list | tuple) else [str(args)]
        child = Child(name, popen, log, host, argv)
        self.children.append(child)
        self.save()
        return child

    def stop(self, child: Child, *, timeout: float = 10.0) -> None:
        """SIGTERM the group, SIGKILL it after ``timeout``; the group is gone on return."""
        child.signal(signal.SIGTERM)
        try:
            child.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.signal(signal.SIGKILL)
            child.popen.wait()
        # Anything it left in its group goes too.
        child.signal(signal.SIGKILL)
        self.save()

    def stop_all(self, order: Sequence[str] = ()) -> None:
        """Stop live children, those whose names start with an entry of ``order`` first (in
        that order), then the rest in reverse start order."""
        live = [c for c in self.children if c.alive()]
        ranked: list[Child] = []
        for prefix in order:
            ranked += [c for c in live if c.name.startswith(prefix) and c not in ranked]
        ranked += [c for c in reversed(live) if c not in ranked]
        for child in ranked:
            self.stop(child)

    def sweep(self) -> list[int]:
        """Kill whatever still carries the tag (descendants that left their group), and reap
        the children that ended on their own, so no zombie stays behind."""
        killed = kill_tagged(self.tag)
        for child in self.children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(timeout=1)
        self.save()
        return killed

    def save(self) -> None:
        document = {
            "tag": self.tag,
            "owner": os.getpid(),
            "processes": [c.record() for c in self.children],
        }
        write_json(self.registry, document)


def write_json(path: Path, document: Any) -> None:
    """Atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_registry(workdir: Path) -> dict[str, Any]:
    try:
        document: dict[str, Any] = json.loads((workdir / REGISTRY).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"tag": None, "processes": []}
    return document


def leftovers(workdir: Path) -> list[dict[str, Any]]:
    """Recorded processes whose group still has a live member, and tagged strays."""
    registry = read_registry(workdir)
    left = [p for p in registry["processes"] if group_alive(int(p["pgid"]))]
    if registry.get("tag"):
        known = {int(p["pid"]) for p in left}
        left += [
            {"name": "(tagged)", "pid": pid, "pgid": _pgid_of(pid)}
            for pid in tagged(str(registry["tag"]))
            if pid not in known
        ]
    return left
