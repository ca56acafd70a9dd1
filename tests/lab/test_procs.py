"""How the stack keeps track of its processes, and makes sure none outlives it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from xenha.lab import procs
from xenha.lab.procs import Processes

# A child that starts a grandchild in a session of its own (as an agent starts a replicator),
# prints the grandchild's pid, and waits.
ESCAPING_PARENT = """
import subprocess, sys, time
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"],
                              start_new_session=True)
print(grandchild.pid, flush=True)
time.sleep(600)
"""


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    running = Processes(tmp_path, tag=f"test-{time.monotonic_ns()}")
    yield running
    running.stop_all()
    running.sweep()
    running.close_reaper()


def test_each_child_leads_its_own_process_group_and_is_recorded(processes: Processes) -> None:
    child = processes.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    assert child.pgid == child.pid
    assert procs.group_alive(child.pgid)
    (record,) = procs.read_registry(processes.workdir)["processes"]
    assert (record["name"], record["pid"], record["pgid"]) == ("sleeper", child.pid, child.pid)


def test_the_tag_finds_descendants_that_left_the_group(processes: Processes) -> None:
    child = processes.spawn("parent", [sys.executable, "-c", ESCAPING_PARENT], host="xen-a")
    grandchild = int(wait_for_line(child.log))
    assert grandchild in procs.tagged(processes.tag)
    assert grandchild in procs.tagged(processes.tag, host="xen-a")
    assert procs.tagged(processes.tag, host="xen-b") == []

    processes.stop(child)
    assert procs.pid_alive(grandchild), "stopping a group leaves other sessions alone"
    processes.sweep()
    assert not procs.pid_alive(grandchild)
    assert procs.leftovers(processes.workdir) == []


def test_stop_escalates_to_sigkill_for_a_child_that_ignores_sigterm(
    processes: Processes,
) -> None:
    stubborn = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(600)"
    )
    child = processes.spawn("stubborn", [sys.executable, "-c", stubborn])
    wait_for_line(child.log)
    processes.stop(child, timeout=0.5)
    assert child.popen.returncode == -signal.SIGKILL


def test_the_reaper_kills_the_tagged_processes_of_an_owner_that_died(tmp_path: Path) -> None:
    tag = f"test-{time.monotonic_ns()}"
    owner_script = f"""
import sys, time
from pathlib import Path
from xenha.lab.procs import Processes
running = Processes(Path({str(tmp_path)!r}), {tag!r})
running.start_reaper()
running.spawn("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
print("ready", flush=True)
time.sleep(600)
"""
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_script], stdout=subprocess.PIPE, text=True
    )
    assert owner.stdout is not None
    assert owner.stdout.readline().strip() == "ready"
    assert procs.tagged(tag)
    owner.kill()
    owner.wait()
    assert wait_until(lambda: procs.tagged(tag) == [])


def wait_for_line(log: Path, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text() if log.exists() else ""
        if text.endswith("\n"):
            return text.splitlines()[0]
        time.sleep(0.05)
    raise TimeoutError(f"nothing in {log}")
