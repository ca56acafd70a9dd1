"""The product on real Xen: the agent in each dom0, the operator and control plane on this
machine. Pieces for tests/realxen/test_failover.py, usable from any driver script.

Inside dom0 the agent runs from the project's source (9p share /mnt/xenha-src, read-only) with
the Python dependencies baked into the image (/opt/xenha/site); dom0's profile sets PYTHONPATH.
Its kubeconfig is the test's, copied into the host's output share: dom0's init forwards
127.0.0.1:<api port> to the control plane on this machine (see qemu.py), so the server URL and
certificate need no change.

Timings are loosened for TCG, where dom0 runs maybe twenty times slower than this machine:
Python's first import of the kubernetes client alone takes tens of seconds there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from xenha.realxen.qemu import Host

OUT = "/mnt/xenha-out"

# Guest consoles go to the output share so this machine can follow them while they run, and
# the replicators' logs (beside their sockets in /run/xenha, which 9p cannot hold) are copied
# there every 2 s, so they survive a power cut up to the last copy.
DOM0_HOOK = f"""mkdir -p {OUT}/console {OUT}/run
echo 'XENCONSOLED_ARGS="--log=guest --log-dir={OUT}/console --timestamp=guest"' \\
    >> /etc/default/xen
(while sleep 2; do cp /run/xenha/*.log /run/xenha/*.json {OUT}/run/ 2>/dev/null; done) \\
    </dev/null >/dev/null 2>&1 &
"""

# libxl built without COLO (Debian's) refuses on both sides; what each prints (Xen 4.17.5):
#   sender:   "libxl: error: libxl_no_colo.c:42:libxl__colo_save_setup: Domain 1:COLO is not
#              supported" then "COLO: Backup failed? resuming domain at primary."
#   receiver: for a PV guest "COLO only supports HVM, unable to restore domain" (checked before
#             the COLO setup); for an HVM guest the restore side's libxl_no_colo.c message.
COLO_UNSUPPORTED = re.compile(r"COLO is not supported")


@dataclass(frozen=True)
class AgentTimings:
    """Agent settings for dom0 under TCG (the defaults assume real hardware)."""

    heartbeat_timeout: float = 5.0
    report_period: float = 2.0
    log_level: str = "INFO"

    def env(self) -> dict[str, str]:
        return {
            "XENHA_HEARTBEAT_TIMEOUT": f"{self.heartbeat_timeout:g}",
            "XENHA_REPORT_PERIOD": f"{self.report_period:g}",
            "XENHA_LOG_LEVEL": self.log_level,
        }


def agent_env(
    host: Host, *, kubeconfig: str, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    return {
        "NODE_NAME": host.name,
        "KUBECONFIG": kubeconfig,
        "XENHA_RELAY_ADDRESS": host.ip,
        "XENHA_RELAY_ADVERTISE": host.ip,
        "XENHA_RUN_DIR": "/run/xenha",
        "XENHA_HEALTH_PORT": "-1",
        "XENHA_REPLICATOR_LAUNCHER": "process",
        **AgentTimings().env(),
        **(extra or {}),
    }


def start_agent(
    host: Host, kubeconfig_text: str, *, extra_env: Mapping[str, str] | None = None
) -> None:
    """Start `xenha agent` in the host's dom0, detached, logging to <out>/agent.log."""
    (host.out_dir / "kubeconfig").write_text(kubeconfig_text)
    env = agent_env(host, kubeconfig=f"{OUT}/kubeconfig", extra=extra_env)
    assignments = " ".join(f"{k}={v}" for k, v in sorted(env.items()))
    script = (
        "#!/bin/sh\n"
        f"export {assignments}\n"
        f"echo $$ > {OUT}/agent.pid\n"
        f"exec python3 -m xenha.cli agent >{OUT}/agent.log 2>&1\n"
    )
    (host.out_dir / "agent.sh").write_text(script)
    (host.out_dir / "agent.sh").chmod(0o755)
    host.sh(f"setsid {OUT}/agent.sh </dev/null >/dev/null 2>&1 &")


def agent_log(host: Host) -> str:
    path = host.out_dir / "agent.log"
    return path.read_text(errors="replace") if path.exists() else ""


def guest_console(host: Host) -> str:
    """Everything the host's xenconsoled logged for guests (all names, oldest first)."""
    logs = sorted((host.out_dir / "console").glob("guest-*.log"), key=lambda p: p.stat().st_mtime)
    return "".join(p.read_text(errors="replace") for p in logs)


def wait_file_text(path: Path, pattern: str, timeout: float) -> re.Match[str]:
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            match = regex.search(path.read_text(errors="replace"))
            if match:
                return match
        if time.monotonic() > deadline:
            raise TimeoutError(f"/{pattern}/ not in {path} after {timeout:.0f} s")
        time.sleep(0.5)
