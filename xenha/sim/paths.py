"""Where a simulated host keeps things, derived from its state directory alone.

    <state>/host.json            who runs it: name, daemon pid, tag, sockets, fabric
    <state>/bin/xl               the host's `xl` (a wrapper: agents just get this path)
    <state>/domains/<id>.mem     guest memory
    <run>/hypercall.sock         the daemon's control socket (xl -> "hypervisor")
    <run>/xenstored.sock         XenStore for pyxs

`<run>` is `<state>/run` unless that would make a socket path longer than a Unix socket
address allows (108 bytes), in which case it is a short directory under /tmp named after
the state directory.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

STATE_ENV = "XENHA_SIM_STATE"
TAG_ENV = "XENHA_SIM_HOST_TAG"
_SUN_PATH_MAX = 107


def run_dir(state_dir: Path) -> Path:
    state_dir = Path(state_dir).resolve()
    local = state_dir / "run"
    if len(str(local / "xenstored.sock")) <= _SUN_PATH_MAX:
        return local
    digest = hashlib.sha1(str(state_dir).encode()).hexdigest()[:12]
    return Path(os.environ.get("TMPDIR", "/tmp")) / f"xenha-sim-{digest}"


def hypercall_socket(state_dir: Path) -> Path:
    return run_dir(state_dir) / "hypercall.sock"


def xenstore_socket(state_dir: Path) -> Path:
    return run_dir(state_dir) / "xenstored.sock"


def host_file(state_dir: Path) -> Path:
    return Path(state_dir) / "host.json"


def xl_wrapper(state_dir: Path) -> Path:
    return Path(state_dir) / "bin" / "xl"


def host_tag(name: str, state_dir: Path) -> str:
    """Marks every process of one host (in its environment), so faults can find them all."""
    return f"{name}@{Path(state_dir).resolve()}"
