"""The lab and the Stack behind it, end to end: what a person sees with `xenha lab`, and what
the end-to-end tests stand on.

Every test here runs the real thing: a control plane, simulated Xen hosts, the operator and
the agents as processes under the Helm chart's RBAC.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from xenha.lab import demo, kube, procs
from xenha.lab.stack import Stack, leftovers, read_state, remove_run_dirs
from xenha.sim import faults

pytestmark = pytest.mark.integration

# A stack owner that will be SIGKILLed: no stop(), no atexit; the reaper and the control
# plane's watchdog must clean up.
OWNER_SCRIPT = """
import sys, time
from pathlib import Path
from xenha.lab.stack import Stack
Stack(Path(sys.argv[1])).start().wait_ready()
print("ready", flush=True)
time.sleep(600)
"""


def kubectl_can(stack: Stack, kubeconfig: Path, verb: str, resource: str, ns: str) -> bool:
    assert stack.plane is not None
    result = stack.plane.kubectl(
        "auth", "can-i", verb, resource, f"--namespace={ns}", kubeconfig=kubeconfig, check=False
    )
    return result.stdout.strip() == "yes"


class TestTheStackBringsUp:
    """Looks only: one stack for the class's tests."""

    def test_a_cluster_with_xen_hosts_an_operator_and_an_agent_per_host(
        self, module_stack: Stack
    ) -> None:
        stack = module_stack
        nodes = kube.xennodes(stack.api)
        assert set(nodes) == {"xen-a", "xen-b"}, "every agent reports its host"
        assert stack.operator is not None
        assert stack.operator.alive()
        for name, host in stack.hosts.items():
            assert host.up, name
            assert host.agent is not None
            assert host.agent.alive(), name
            assert host.agent.pgid == host.agent.pid, "each process leads its own group"
        assert stack.plane is not None
        labelled = stack.plane.kubectl("get", "nodes", "-l", "xenha.io/xen-host=true", "-o", "name")
        assert labelled.stdout.split() == ["node/xen-a", "node/xen-b"]

    def test_a_demo_guest_on_each_host_that_answers(self, module_stack: Stack) -> None:
        stack = module_stack
        assert {g.name: g.host for g in stack.guests.values()} == {
            "demo1": "xen-a",
            "demo2": "xen-b",
        }
        with stack.client("demo1") as client:
            first, second = client.next(), client.next()
        assert first is not None
        assert second == first + 1

    def test_the_operator_and_agents_holding_exactly_the_charts_permissions(
        self, module_stack: Stack
    ) -> None:
        stack = module_stack
        agent, operator = stack.agent_kubeconfig, stack.operator_kubeconfig
        assert kubectl_can(stack, agent, "watch", "xenreplications.xenha.io", "lab")
        assert not kubectl_can(stack, agent, "patch", "xenreplications.xenha.io/status", "lab")
        assert not kubectl_can(stack, agent, "list", "secrets", "lab")
        assert kubectl_can(stack, operator, "patch", "xenreplications.xenha.io/status", "lab")
        assert not kubectl_can(stack, operator, "delete", "xenreplications.xenha.io", "lab")


class TestTheStackFaults:
    def test_stop_leaves_nothing_running(self, stack_factory: Any) -> None:
        stack: Stack = stack_factory(ready=False)
        host_tags = [h.sim.tag for h in stack.hosts.values() if h.sim is not None]
        recorded = [c.pgid for c in stack.procs.children]
        stack.stop()
        assert leftovers(stack.workdir) == []
        assert not any(procs.group_alive(pgid) for pgid in recorded)
        assert procs.tagged(stack.tag) == []
        assert all(faults.tagged_pids(tag) == [] for tag in host_tags)

    def test_an_owner_killed_without_warning_leaves_nothing_running(self, tmp_path: Path) -> None:
        owner = subprocess.Popen(
            [sys.executable, "-c", OWNER_SCRIPT, str(tmp_path / "stack")],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert owner.stdout is not None
            assert owner.stdout.readline().strip() == "ready"
            state = read_state(tmp_path / "stack")
            assert state is not None
        finally:
            owner.kill()
            owner.wait()
        deadline = time.monotonic() + 30
        while leftovers(tmp_path / "stack") and time.monotonic() < deadline:
            time.sleep(0.5)
        assert leftovers(tmp_path / "stack") == []
        assert procs.tagged(state["tag"]) == []
        remove_run_dirs(tmp_path / "stack")  # files, not processes: tidied by `lab down`

    def test_a_power_cut_takes_every_process_of_the_host_and_nothing_else(
        self, stack: Stack
    ) -> None:
        xen_a, xen_b = stack.hosts["xen-a"], stack.hosts["xen-b"]
        assert xen_a.sim is not None
        assert xen_a.agent is not None
        tag = xen_a.sim.tag
        stack.kill_host("xen-a")
        assert faults.tagged_pids(tag) == []
        assert not xen_a.agent.alive()
        assert xen_b.agent is not None
        assert xen_b.agent.alive()
        with stack.client("demo2") as client:
            assert client.next() is not None, "the other host's guest still answers"

        stack.power_on("xen-a")
        assert xen_a.up
        assert xen_a.agent.alive()
        assert "demo1" not in {d["name"] for d in xen_a.sim.domains()}, "a host boots empty"

    def test_restarting_an_agent_replaces_only_that_process(self, stack: Stack) -> None:
        before = {name: h.agent.pid for name, h in stack.hosts.items() if h.agent}
        stack.restart_agent("xen-a")
        after = {name: h.agent.pid for name, h in stack.hosts.items() if h.agent}
        assert after["xen-a"] != before["xen-a"]
        assert after["xen-b"] == before["xen-b"]

    def test_cutting_the_path_silences_the_hosts_relays_until_restored(self, stack: Stack) -> None:
        stack.cut_path()
        assert all(h.netpath is not None and h.netpath.is_cut for h in stack.hosts.values())
        stack.restore_path()
        assert not any(h.netpath is not None and h.netpath.is_cut for h in stack.hosts.values())


class TestReplicationThroughTheStack:
    """The system's promises, through the same code the lab runs (needs operator + agents)."""

    @pytest.mark.parametrize("mode", ["remus", "colo"])
    def test_a_power_cut_of_the_active_host_fails_over_cleanly_and_reprotects(
        self, stack: Stack, mode: str
    ) -> None:
        namespace, name = stack.apply_replication(mode=mode)
        stack.wait_for(name, phase="Protected", active="xen-a", timeout=180)

        result = demo.run(stack, kind="failover", name=name, namespace=namespace)

        assert result.ok, json.dumps(result.to_json(), indent=1)
        status = (result.final or {})["status"]
        assert (status["activeNode"], status["standbyNode"]) == ("xen-b", "xen-a")

    def test_a_switchover_moves_the_guest_without_losing_an_answer(self, stack: Stack) -> None:
        namespace, name = stack.apply_replication(mode="remus")
        stack.wait_for(name, phase="Protected", active="xen-a", timeout=180)

        result = demo.run(stack, kind="switchover", name=name, namespace=namespace)

        assert result.ok, json.dumps(result.to_json(), indent=1)

    def test_restarting_the_agents_does_not_fail_over(self, stack: Stack) -> None:
        namespace, name = stack.apply_replication(mode="remus")
        stack.wait_for(name, phase="Protected", active="xen-a", timeout=180)
        lease = stack.fence_lease(name, namespace) or {}
        transitions = lease.get("spec", {}).get("leaseTransitions")

        for host in ("xen-a", "xen-b"):
            stack.restart_agent(host)
        stack.wait_for(name, phase="Protected", active="xen-a", timeout=60)

        assert (stack.fence_lease(name, namespace) or {})["spec"].get(
            "leaseTransitions"
        ) == transitions
        stack.check_invariants()


def xenha_lab(lab_dir: Path, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "xenha.cli", "lab", f"--lab-dir={lab_dir}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def output_json(done: subprocess.CompletedProcess[str]) -> Any:
    try:
        return json.loads(done.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"not JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


class TestTheLabCommand:
    def test_up_detached_failover_and_down_leave_a_clean_machine(self, tmp_path: Path) -> None:
        lab_dir = tmp_path / "lab"
        recorded: list[int] = []
        try:
            up = xenha_lab(lab_dir, "up", "--detach", "--timeout=240")
            assert up.returncode == 0, up.stdout + up.stderr
            assert f"KUBECONFIG={lab_dir / 'admin.kubeconfig'}" in up.stdout.replace("\n", "")

            state = read_state(lab_dir)
            assert state is not None
            supervisor = json.loads((lab_dir / "supervisor.json").read_text())
            recorded = [
                int(supervisor["pid"]),
                *(int(p["pgid"]) for p in procs.read_registry(lab_dir)["processes"]),
                *(int(pid) for pid in state["controlPlane"].values()),
            ]

            status = output_json(xenha_lab(lab_dir, "status", "--json"))
            (replication,) = status["replications"]
            assert replication["status"]["phase"] == "Protected"
            assert replication["status"]["activeNode"] == "xen-a"

            failover = xenha_lab(lab_dir, "failover", "--json")
            result = output_json(failover)
            assert failover.returncode == 0, json.dumps(result, indent=1) + failover.stderr
            assert (result["activeNode"], result["phase"]) == ("xen-b", "Protected")
            assert result["client"]["violations"] == []
            assert all(problem is None for problem in result["checks"].values())
            assert result["client"]["answers"] > 0
        finally:
            down = xenha_lab(lab_dir, "down", timeout=200)
        assert down.returncode == 0, down.stdout + down.stderr
        assert not lab_dir.exists()
        assert [p for p in recorded if procs.group_alive(p) or procs.pid_alive(p)] == []
        if recorded:
            assert procs.tagged(str(supervisor["tag"])) == []
