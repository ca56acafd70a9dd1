"""COLO asked of hosts whose libxl is built without it (Debian's): issue 9, item 5.

`xl help remus` lists -c there, so the agent cannot know in advance. Real xl then refuses on
both sides: the sender prints `libxl_no_colo.c:...:libxl__colo_save_setup: Domain N:COLO is not
supported` and resumes the guest ("COLO: Backup failed? resuming domain at primary"); the
receiver (`xl migrate-receive --colo`) prints the restore side's message and leaves a paused
domain named `(null)` that only `xl destroy <domid>` removes. The simulated hosts started
with `colo=False` do the same.

What the agents must make of it: both XenNodes say `xen.coloSupported: false`, both entries
say Failed / ColoUnsupported, nothing is retried (no relaunch loop, not even after an agent
restart), the guest runs on where it ran, and the receiver's host is left clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.agent import Agent
from xenha_agent.kube import ApiError, xennodes_path, xenreplications_path
from xenha_agent.replicator_client import colo_refusal, logged_domid

from xenha.api.models import Phase, XenNodeStatus, XenReplicationStatus, parse_spec

from .scene import Scene, running, until
from .test_agent_replicators import _dump_logs, real_tls

LEASE = 5

SENDER_LINE = (
    "libxl: error: libxl_no_colo.c:42:libxl__colo_save_setup: Domain 1:COLO is not supported"
)
RECEIVER_LINE = (
    "libxl: error: libxl_no_colo.c:21:libxl__colo_restore_setup: Domain 4:COLO is not supported"
)
PV_LINE = (
    "libxl: error: libxl_create.c:1371:domcreate_bootloader_done: Domain 2:COLO only supports "
    "HVM, unable to restore domain"
)


@pytest.mark.parametrize(
    ("line", "kind", "domid"),
    [
        pytest.param(SENDER_LINE, "host", 1, id="sender: libxl without COLO"),
        pytest.param(RECEIVER_LINE, "host", 4, id="receiver: libxl without COLO"),
        pytest.param(PV_LINE, "guest", 2, id="receiver: a PV guest"),
        pytest.param("COLO: Backup failed? resuming domain at primary.", None, None, id="other"),
        pytest.param("migration target: Ready to receive domain.", None, None, id="banner"),
    ],
)
def test_which_xl_lines_refuse_colo_and_for_which_domain(
    line: str, kind: str | None, domid: int | None
) -> None:
    assert colo_refusal(line) == kind
    if kind is not None:
        assert logged_domid(line) == domid


@pytest.fixture
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Two simulated hosts whose libxl has no COLO."""
    from xenha.sim.host import SimHost

    fabric = tmp_path_factory.mktemp("fabric")
    started: dict[str, Any] = {}
    try:
        for name in ("ha", "hb"):
            started[name] = SimHost.start(
                tmp_path_factory.mktemp(name), name, fabric_dir=fabric, colo=False
            )
        yield started
    finally:
        for host in started.values():
            host.stop()


def names(host: Any) -> list[str]:
    return sorted(str(d["name"]) for d in host.domains())


@pytest.mark.integration
def test_a_receiver_without_colo_refuses_and_leaves_a_nameless_paused_domain(
    pair: dict[str, Any],
) -> None:
    """What the simulator does, as real xl does: the agent's cleanup depends on it."""
    ha, hb = pair["ha"], pair["hb"]
    ha.create_guest("db1", memory_mib=16)
    receiver = f"exec {hb.xl_path} migrate-receive --colo -e"
    result = ha.xl("remus", "-c", "-u", "-s", "", "db1", receiver)
    assert result.returncode == 1
    refusals = [line for line in result.stderr.splitlines() if colo_refusal(line) == "host"]
    assert any("libxl__colo_save_setup" in line for line in refusals), result.stderr
    restore = [line for line in refusals if "libxl__colo_restore_setup" in line]
    assert restore, result.stderr
    assert "COLO: Backup failed? resuming domain at primary." in result.stderr
    leftover = hb.domain("(null)")
    assert leftover is not None
    assert leftover["paused"]
    assert logged_domid(restore[0]) == leftover["domid"]
    destroyed = hb.xl("destroy", str(leftover["domid"]))
    assert destroyed.returncode == 0, destroyed.stderr
    assert names(hb) == []
    guest = ha.domain("db1")
    assert guest is not None
    assert guest["active"]


async def _xen(scene: Scene, node: str) -> dict[str, Any]:
    try:
        status = (await scene.admin.get(xennodes_path(node))).get("status") or {}
    except ApiError:
        return {}  # not reported yet
    return dict(status.get("xen") or {})


async def _refused(scene: Scene, node: str) -> bool:
    entry = await scene.entry(node)
    xen = await _xen(scene, node)
    return (
        entry is not None
        and (entry.get("state"), entry.get("reason")) == ("Failed", "ColoUnsupported")
        and xen.get("coloSupported") is False
    )


async def _starts(scene: Scene) -> int:
    return (await scene.event_reasons()).count("ReplicatorStarted")


@pytest.mark.integration
def test_colo_on_hosts_without_it_is_reported_unsupported_and_not_retried(
    scene: Scene, pair: dict[str, Any], run: Callable[..., Any]
) -> None:
    ha, hb = pair["ha"], pair["hb"]

    def settings(node: str, host: Any) -> Any:
        return scene.settings(node, host, heartbeat_timeout=2.0, report_period=1.0)

    async def scenario() -> None:
        await scene.create(lease_seconds=LEASE, designated=False)
        await scene.admin.patch(f"{xenreplications_path(scene.ns)}/db1", {"spec": {"mode": "colo"}})
        await real_tls(scene)
        ha.create_guest(scene.domain, memory_mib=16, dirty_rate=50)
        async with running(Agent(settings(scene.b, hb))), running(Agent(settings(scene.a, ha))):
            try:
                await until(lambda: _refused(scene, scene.a), seconds=60)
                await until(lambda: _refused(scene, scene.b), seconds=60)
                # The receiver's leftover `(null)` domain is destroyed, and nothing else of
                # the guest is left on the standby's host.
                await until(lambda: names(hb) == [], seconds=30)
            except AssertionError:
                _dump_logs(scene)
                raise
            entry = await scene.entry(scene.a)
            assert entry is not None
            assert "without COLO" in entry["message"]
            assert entry["role"] == "primary"
            standby_entry = await scene.entry(scene.b)
            assert standby_entry is not None
            assert standby_entry["role"] == "secondary"
            # Not retried: one start per node, however long we wait (the first relaunch
            # would come 2 s after a stop).
            await until(lambda: not any(ha_or_hb_replicator_files(scene)), seconds=30)
            starts = await _starts(scene)
            assert starts == 2
            await asyncio.sleep(6)
            assert await _starts(scene) == starts
            # The guest runs on, unpaused and unprotected, where it ran.
            guest = ha.domain(scene.domain)
            assert guest is not None
            assert guest["active"]
            assert not guest["paused"]
            assert names(hb) == []
            await _operator_says_colo_unsupported(scene)
        # A restarted agent remembers what xl said: it does not ask again.
        async with running(Agent(settings(scene.a, ha))) as again:
            await until(lambda: again.reporter.writes > 0)
            await until(lambda: _refused(scene, scene.a), seconds=20)
            await asyncio.sleep(3)
            assert await _starts(scene) == starts
            assert not again.replicators

    run(scenario())


def ha_or_hb_replicator_files(scene: Scene) -> list[Path]:
    """Control sockets of replicators still running (they go when a replicator exits)."""
    return [
        p
        for p in Path(scene.tmp).rglob("*.sock")
        if not p.name.endswith((".xl.sock", ".accept.sock"))
    ]


async def _operator_says_colo_unsupported(scene: Scene) -> None:
    """The operator's verdict (its pure reconcile) on what the agents reported: the active
    cannot do COLO, so the replication is Failed with ColoUnsupported, the guest still Ready."""
    from xenha_operator.status import VALIDATED, NodeView, Observation, Timing, reconcile

    now = datetime.now(UTC)
    xr = await scene.admin.get(f"{xenreplications_path(scene.ns)}/db1")
    nodes = {}
    for node in (scene.a, scene.b):
        raw = (await scene.admin.get(xennodes_path(node)))["status"]
        nodes[node] = NodeView(node, XenNodeStatus.model_validate(raw), heartbeat_seen=now)
    outcome = reconcile(
        Observation(
            namespace=scene.ns,
            name="db1",
            uid=scene.uid,
            generation=1,
            created=now,
            spec=parse_spec(xr["spec"]),
            lease_holder=scene.a,
            previous=XenReplicationStatus(
                active_node=scene.a, standby_node=scene.b, phase=Phase.SEEDING
            ),
            nodes=nodes,
            now=now,
        ),
        Timing(),
    )
    status = outcome.status
    assert status.phase is Phase.FAILED
    validated = next(c for c in status.conditions if c.type == VALIDATED)
    assert validated.reason == "ColoUnsupported"
    assert (status.active_node, status.standby_node) == (scene.a, scene.b)
