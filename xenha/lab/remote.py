"""A running lab seen from another process: `xenha lab status|failover|switchover|down`.

Everything these commands need is in the lab dir: the Stack's state file (kubeconfig, ledger,
guests), the supervisor's pid and tag, and its control socket, through which anything that
changes the lab's processes goes (the supervisor owns them).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from rich.console import Group

from xenha.lab import control, kube, procs, views
from xenha.lab.labdir import LabDir
from xenha.lab.stack import leftovers, read_state, remove_run_dirs

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

Obj = dict[str, Any]


class RemoteLab:
    """A running lab as the other commands see it: its state file, the admin's API access,
    the supervisor's control socket. Implements demo.LabHandle."""

    def __init__(self, lab: LabDir) -> None:
        state = read_state(lab.path)
        if state is None or not lab.running():
            raise control.LabError(f"no lab running in {lab.path} (start one: xenha lab up)")
        self.dir = lab
        self.state = state
        self.ledger_path = Path(state["ledger"])
        from kubernetes import config

        load = cast(Callable[..., "ApiClient"], config.new_client_from_config)
        self.api = load(config_file=state["kubeconfig"])

    def refresh(self) -> Obj:
        self.state = control.call(self.dir.socket, "state")["state"]
        return self.state

    def replications(self) -> list[Obj]:
        return kube.list_replications(self.api)

    def replication(self, name: str, namespace: str) -> Obj | None:
        return kube.get_replication(self.api, namespace, name)

    def fence_lease(self, name: str, namespace: str) -> Obj | None:
        return kube.fence_lease(self.api, namespace, name)

    def events(self, name: str, namespace: str) -> list[Obj]:
        return kube.events_about(self.api, namespace, name)

    def guest(self, domain: str) -> tuple[tuple[str, int], str]:
        info = self.state["guests"][domain]
        ip, _, port = str(info["address"]).rpartition(":")
        return (ip, int(port)), str(info["uuid"])

    def kill_host(self, host: str) -> float:
        return float(control.call(self.dir.socket, "kill_host", host=host)["at"])

    def power_on(self, host: str) -> None:
        control.call(self.dir.socket, "power_on", host=host)

    def request_switchover(self, name: str, namespace: str, target: str) -> None:
        subprocess.run(
            [
                self.state["kubectl"],
                f"--kubeconfig={self.state['kubeconfig']}",
                f"--namespace={namespace}",
                "annotate",
                "--overwrite",
                f"xenreplication/{name}",
                f"{kube.SWITCHOVER_ANNOTATION}={target}",
            ],
            check=True,
            capture_output=True,
        )

    def pick(self, name: str | None, namespace: str | None) -> tuple[str, str]:
        """The replication a command is about: the one given, else the lab's only one."""
        namespace = namespace or self.state["namespace"]
        if name:
            return namespace, name
        found = [r for r in self.replications() if r["metadata"]["namespace"] == namespace]
        if len(found) != 1:
            raise control.LabError(f"{len(found)} replications in {namespace}: give --name")
        return namespace, found[0]["metadata"]["name"]

    def view(self, namespace: str | None = None) -> Group:
        now = time.time()
        items: list[Any] = [
            views.replication_view(r, now=now)
            for r in self.replications()
            if namespace is None or r["metadata"]["namespace"] == namespace
        ]
        items.append(views.hosts_view(self.state, kube.xennodes(self.api), now=now))
        return Group(*items)


def teardown(lab: LabDir, *, keep: bool = False, timeout: float = 90) -> list[dict[str, Any]]:
    """Stop the supervisor (it stops everything), then make sure: kill whatever of the lab
    still runs (by recorded process group and by tag) and remove the lab dir unless ``keep``.
    Returns the stragglers it had to kill."""
    info = lab.supervisor() or {}
    pid = int(info.get("pid", 0))
    if pid and procs.pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while procs.pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if procs.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    stragglers = leftovers(lab.path)
    for entry in stragglers:
        with contextlib.suppress(ProcessLookupError, PermissionError, TypeError):
            os.killpg(int(entry["pgid"]), signal.SIGKILL)
    if info.get("tag"):
        procs.kill_tagged(str(info["tag"]))
    remove_run_dirs(lab.path)
    if not keep:
        shutil.rmtree(lab.path, ignore_errors=True)
    return stragglers
