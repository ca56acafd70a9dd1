"""A standby whose stream breaks while it is still being seeded (issue 5).

Until the first complete checkpoint the standby's copy holds nothing that could ever run, and
the fencing Lease does not name it yet (the active designates its standby once a checkpoint
is acknowledged). Such a copy is a seeding that failed, not a stale standby: its replicator
destroys it (SIGKILL of `xl migrate-receive`, then `xl destroy <dom>--incoming`) and the agent
seeds again; the active node releases the output it held and runs on unprotected (Degraded),
never paused.

Two agents, real replicators, two simulated hosts, a real kube-apiserver; the test plays the
operator. To break the stream at a chosen point of the seeding, deterministically:
- the standby's `xl` is a wrapper that stops itself (SIGSTOP) before `migrate-receive` runs
  until a gate file exists: the stream cannot start until the test lets it (SIGCONT);
- the guest is paused on the active host before that: `xl remus` sends all of its memory but
  can never suspend it for the first checkpoint;
- the relay path to the standby's node runs through a NetPath the test resets.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.agent import Agent
from xenha_agent.replicator_client import ReplicatorUnavailable, request_sync
from xenha_agent.replicator_config import control_socket_path

from xenha.controlplane.cluster import free_port

from .scene import Scene, paused, running, state_is, until
from .test_agent_replicators import _dump_logs, real_tls

pytestmark = pytest.mark.integration

LEASE = 5
# The NetPath listens here, on the standby's relay port: what its agent advertises.
PATH_IP = "127.0.0.57"

GATED_XL = """#!/bin/sh
# xl, except that migrate-receive waits (stopped) until {gate} exists.
if [ "$1" = migrate-receive ] && [ ! -e '{gate}' ]; then kill -STOP $$; fi
exec '{xl}' "$@"
"""


def replicator_status(scene: Scene, node: str) -> dict[str, Any] | None:
    path = control_socket_path(Path(scene.tmp) / node, scene.uid)
    try:
        status: dict[str, Any] = request_sync(path, {"op": "status"}, timeout=2)["status"]
    except (ReplicatorUnavailable, OSError):
        return None
    return status


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): /proc/<pid>/stat's state is T."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "T"


def gated_receiver(scene: Scene, node: str) -> int | None:
    """The pid of the standby's migrate-receive, stopped at the gate; None if not (yet)."""
    status = replicator_status(scene, node)
    pid = status.get("xlPid") if status else None
    return int(pid) if pid and stopped(int(pid)) else None


async def event_messages(scene: Scene, reason: str) -> list[str]:
    events = await scene.admin.get(f"/api/v1/namespaces/{scene.ns}/events")
    return [str(e.get("message")) for e in events.get("items", []) if e["reason"] == reason]


def test_a_standby_that_loses_the_stream_while_seeding_is_seeded_again(
    scene: Scene, pair: dict[str, Any], run: Callable[..., Any]
) -> None:
    from xenha.sim.netpath import NetPath

    ha, hb = pair["ha"], pair["hb"]
    gate = Path(scene.tmp) / "gate"
    wrapper = Path(scene.tmp) / "xl-gated"
    wrapper.write_text(GATED_XL.format(gate=gate, xl=hb.xl_path))
    wrapper.chmod(0o755)
    port = free_port()
    path = NetPath(("127.0.0.1", port), (PATH_IP, port), name="to-b").start()
    incoming = f"{scene.domain}--incoming"

    async def scenario() -> None:
        await scene.create(lease_seconds=LEASE, designated=False)
        await real_tls(scene)
        ha.create_guest(scene.domain, memory_mib=16, dirty_rate=50)
        # A nameless leftover from before: not this receiver's, so never its to destroy.
        older = hb.create_guest("(null)", memory_mib=16, paused=True)["domid"]
        agent_b = Agent(
            scene.settings(
                scene.b,
                hb,
                xl_path=str(wrapper),
                relay_port_min=port,
                relay_port_max=port,
                relay_advertise_address=PATH_IP,
                heartbeat_timeout=2.0,
                report_period=1.0,
            )
        )
        agent_a = Agent(scene.settings(scene.a, ha, heartbeat_timeout=2.0, report_period=1.0))
        async with running(agent_b), running(agent_a):
            try:
                # The stream is up, the receiver held at the gate; pause the guest so that
                # no checkpoint can complete, then let the seeding run as far as it can.
                await until(lambda: state_is(scene, scene.a, "Seeding"), seconds=60)
                await until(lambda: gated_receiver(scene, scene.b) is not None, seconds=30)
                assert ha.xl("pause", scene.domain).returncode == 0
                first = gated_receiver(scene, scene.b)
                assert first is not None
                # What a restore killed before it could say why leaves (a refused COLO
                # restore, when the sender's refusal ends the stream first): a nameless,
                # paused domain whose domid nothing prints.
                before = domids(hb)
                hb.create_guest("(null)", memory_mib=16, paused=True)
                (leftover,) = domids(hb) - before
                os.kill(first, signal.SIGCONT)
                await until(lambda: hb.domain(incoming) is not None, seconds=30)
                status = replicator_status(scene, scene.b)
                assert status is not None
                assert status["checkpoints"]["total"] == 0

                # The stream breaks mid-seeding.
                path.reset()
                assert ha.xl("unpause", scene.domain).returncode == 0

                # The active releases what it held and runs on, unprotected.
                await until(lambda: state_is(scene, scene.a, "Degraded"), seconds=30)
                # The standby's copy is destroyed, and seeding starts again (held at the
                # gate once more, so nothing new is created meanwhile).
                await until(lambda: hb.domain(incoming) is None, seconds=30)
                await until(lambda: _gated_again(scene, first), seconds=60)
                assert hb.domain(incoming) is None
                assert leftover not in domids(hb), "the restore's nameless leftover is gone"
                assert older in domids(hb), "a leftover from before is not this receiver's"
                stops = await event_messages(scene, "ReplicatorStopped")
                assert any("SeedingFailed" in m for m in stops), stops

                # This time the seeding completes.
                gate.touch()
                second = gated_receiver(scene, scene.b)
                assert second is not None
                os.kill(second, signal.SIGCONT)
                await until(lambda: state_is(scene, scene.b, "Replicating"), seconds=60)
                await until(lambda: state_is(scene, scene.a, "Replicating"), seconds=30)
                await until(lambda: _designated(scene, scene.b), seconds=30)
            except AssertionError:
                _dump_logs(scene)
                raise
            reasons = await scene.event_reasons()
            assert "RunningUnprotected" in reasons
            # Neither a stale standby dropped nor a primary fenced: a seeding that failed.
            assert "CopyDropped" not in reasons
            assert "SelfFenced" not in reasons
            assert await scene.holder() == scene.a
            assert not paused(ha, scene.domain)

    try:
        run(scenario())
    finally:
        path.close()
        with contextlib.suppress(OSError):
            gate.unlink()


def domids(host: Any) -> set[int]:
    return {int(d["domid"]) for d in host.domains()}


def _gated_again(scene: Scene, first: int) -> bool:
    pid = gated_receiver(scene, scene.b)
    return pid is not None and pid != first


async def _designated(scene: Scene, node: str) -> bool:
    return await scene.designated() == node
