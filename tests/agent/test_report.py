"""XenNode.status: what the agent reports (pure) and how it gets to the API (real server)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from xenha_agent.checkpoint_stats import CheckpointStats
from xenha_agent.kube import KubeClient, xennodes_path
from xenha_agent.plan import ReplicationView
from xenha_agent.replicators import ColoRefused, Role, parse_status
from xenha_agent.report import NodeReporter, build_status, replication_entry, significant
from xenha_agent.state import CopyRecord
from xenha_agent.xen.xl import parse_info, parse_list

from xenha.api.models import NodeReplication, Phase, XenNodeStatus, parse_spec

XL_LIST = """\
Name                                        ID   Mem VCPUs\tState\tTime(s)
Domain-0                                     0  2048     2     r-----      63.2
db1                                          3   128     1     -b----       1.3
db2--incoming                                5   256     1     --p---       0.0
"""

XL_INFO = """\
host                   : xen-a
release                : 6.1.0-28-amd64
machine                : x86_64
nr_cpus                : 2
virt_caps              : pv hvm hap shadow
total_memory           : 2047
free_memory            : 900
xen_major              : 4
xen_minor              : 17
xen_extra              : .5
xen_version            : 4.17.5
xen_commandline        : placeholder dom0_mem=2048M,max:2048M
"""


def replication(**overrides: object) -> NodeReplication:
    entry = {
        "namespace": "prod",
        "name": "db1",
        "uid": "6f1c0000-0000-0000-0000-000000000001",
        "role": "primary",
        "state": "Replicating",
        "domid": 3,
        "peerConnected": True,
        "lastHeartbeatTime": "2026-11-26T06:00:00.100000Z",
        "checkpoints": {
            "total": 120,
            "lastTime": "2026-11-26T06:00:00.000000Z",
            "intervalMs": 205,
            "lastPauseMs": 12,
            "lastBytes": 1810432,
            "bytesPerSecond": 9052160,
        },
        "message": "checkpointing every 205 ms",
        "reason": "Replicating",
    }
    entry.update(overrides)
    return NodeReplication.model_validate(entry)


def status(**overrides: object) -> XenNodeStatus:
    args: dict[str, object] = {
        "relay_endpoint": "127.0.0.11:7443",
        "info": parse_info(XL_INFO),
        "colo_supported": True,
        "domains": parse_list(XL_LIST),
        "replications": [replication()],
    }
    args.update(overrides)
    return build_status(**args)  # type: ignore[arg-type]


def test_status_has_the_shape_of_the_design() -> None:
    got = status(heartbeat=datetime(2026, 11, 26, 6, 0, tzinfo=UTC)).to_api()
    assert got["heartbeatTime"] == "2026-11-26T06:00:00Z"
    assert got["agentVersion"] == "0.1.0"
    assert got["relayEndpoint"] == "127.0.0.11:7443"
    assert got["xen"] == {
        "version": "4.17",
        "freeMemoryMiB": 900,
        "totalMemoryMiB": 2047,
        "coloSupported": True,
    }
    assert got["domains"] == [
        {"name": "db1", "domid": 3, "state": "running", "memoryMiB": 128},
        {"name": "db2--incoming", "domid": 5, "state": "paused", "memoryMiB": 256},
    ]
    [entry] = got["replications"]
    assert entry["role"] == "primary"
    assert entry["checkpoints"]["intervalMs"] == 205


def test_domain_0_is_the_host_not_a_guest() -> None:
    names = [d.name for d in status().domains]
    assert "Domain-0" not in names


def test_without_xl_the_report_still_carries_the_replications() -> None:
    got = status(info=None, domains=[]).to_api()
    assert "xen" not in got
    assert got["domains"] == []
    assert len(got["replications"]) == 1


@pytest.mark.parametrize(
    ("change", "news"),
    [
        pytest.param({}, False, id="nothing changed"),
        pytest.param({"checkpoints": {"total": 121}}, False, id="one more checkpoint"),
        pytest.param({"lastHeartbeatTime": "2026-11-26T06:00:01Z"}, False, id="peer heartbeat"),
        pytest.param({"message": "checkpointing every 210 ms"}, False, id="message wording"),
        pytest.param({"state": "Degraded"}, True, id="state"),
        pytest.param({"peerConnected": False}, True, id="peer link"),
        pytest.param({"reason": "LostConnection"}, True, id="reason"),
        pytest.param({"domid": 7}, True, id="domid"),
        pytest.param(
            {"failover": {"time": "2026-11-26T06:00:02Z", "from": "xen-a", "to": "xen-b"}},
            True,
            id="failover record",
        ),
    ],
)
def test_what_is_news_in_a_replication_entry(change: dict[str, object], news: bool) -> None:
    before = status()
    after = status(replications=[replication(**change)])
    assert (significant(before) != significant(after)) is news


def test_the_replicators_checkpoint_statistics_reach_the_xennode_entry() -> None:
    clock = iter([100.0, 100.0, 100.4]).__next__  # first byte, second byte, snapshot
    stats = CheckpointStats(clock=clock, wall=lambda: 1_795_600_000.0)
    stats.observe(memoryview(b"x" * 300_000))
    stats.observe(memoryview(b"x" * 100_000))
    replicator_says = {
        "role": "primary",
        "state": "Replicating",
        "peerConnected": True,
        "checkpoints": stats.snapshot().to_json(),
    }
    record = CopyRecord(
        uid="6f1c", namespace="prod", name="db1", domain="db1", role=Role.PRIMARY, lease_duration=2
    )
    entry = replication_entry(
        uid="6f1c",
        view=None,
        record=record,
        status=parse_status(replicator_says),
        domains={d.name: d for d in parse_list(XL_LIST)},
        now=datetime(2026, 11, 26, 6, 0, tzinfo=UTC),
    )
    assert entry is not None
    # 400 kB in the stream's first 0.4 s, averaged over at least half a second.
    assert entry.to_api()["checkpoints"]["bytesPerSecond"] == 800_000


REFUSED_LINE = (
    "libxl: error: libxl_no_colo.c:21:libxl__colo_restore_setup: Domain 7:COLO is not supported"
)
REFUSED = ColoRefused(Role.SECONDARY, REFUSED_LINE, "libxl on xen-b is built without COLO")
COLO_VIEW = ReplicationView(
    uid="6f1c",
    namespace="prod",
    name="db1",
    spec=parse_spec({"domain": "db1", "mode": "colo", "primaryNode": "a", "secondaryNode": "b"}),
    active_node="xen-a",
    standby_node="xen-b",
    phase=Phase.SEEDING,
)


def refused_entry(**overrides: object) -> NodeReplication | None:
    args: dict[str, object] = {
        "uid": "6f1c",
        "view": COLO_VIEW,
        "record": None,
        "status": None,
        "domains": {},
        "now": datetime(2026, 11, 26, 6, 0, tzinfo=UTC),
        "refused": REFUSED,
    }
    args.update(overrides)
    return replication_entry(**args)  # type: ignore[arg-type]


def test_a_refused_colo_is_reported_failed_after_its_replicator_is_gone() -> None:
    entry = refused_entry()
    assert entry is not None
    got = entry.to_api()
    assert (got["state"], got["reason"], got["role"]) == ("Failed", "ColoUnsupported", "secondary")
    assert got["message"] == "libxl on xen-b is built without COLO"


def test_while_its_replicator_runs_the_replicator_speaks() -> None:
    says = {"role": "secondary", "state": "Stopping", "reason": "StopRequested"}
    entry = refused_entry(status=parse_status(says))
    assert entry is not None
    assert (entry.state.value, entry.reason) == ("Stopping", "StopRequested")


def test_the_agents_fence_outranks_a_refusal() -> None:
    record = CopyRecord(
        uid="6f1c",
        namespace="prod",
        name="db1",
        domain="db1",
        role=Role.PRIMARY,
        lease_duration=2,
        fenced=True,
    )
    entry = refused_entry(record=record)
    assert entry is not None
    assert (entry.state.value, entry.reason) == ("Fenced", "SelfFenced")


def test_the_replicator_says_in_which_line_xl_refused_colo() -> None:
    assert parse_status({"coloRefused": REFUSED_LINE}).colo_refused == REFUSED_LINE
    assert parse_status({}).colo_refused is None
    assert parse_status({"coloRefused": 3}).colo_refused is None


def test_losing_colo_support_is_news() -> None:
    assert significant(status(colo_supported=False)) != significant(status())


def test_free_memory_drift_is_not_news_but_a_domain_going_away_is() -> None:
    before = status()
    drifted = parse_info(XL_INFO.replace("free_memory            : 900", "free_memory : 880"))
    assert significant(status(info=drifted)) == significant(before)
    assert significant(status(domains=parse_list(XL_LIST)[:2])) != significant(before)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("elapsed", "changed", "due"),
    [
        pytest.param(0.1, False, False, id="too soon, nothing new"),
        pytest.param(0.1, True, False, id="news, but rate-limited"),
        pytest.param(0.5, False, False, id="nothing new before the beat"),
        pytest.param(0.5, True, True, id="news after the rate limit"),
        pytest.param(2.0, False, True, id="the 2 s beat"),
    ],
)
def test_when_a_report_is_written(elapsed: float, changed: bool, due: bool) -> None:
    clock = Clock()
    reporter = NodeReporter(None, "xen-a", period=2.0, min_interval=0.2, clock=clock)  # type: ignore[arg-type]
    first = status()
    assert reporter.due(first)
    reporter._last_written = significant(first)
    reporter._last_write_at = clock.now
    clock.now = elapsed
    current = status(replications=[replication(state="Degraded")]) if changed else first
    assert reporter.due(current) is due


# -- against the API server -------------------------------------------------------------------


@pytest.mark.integration
def test_agent_creates_its_xennode_and_reports(
    xenha_crds: None,
    namespace: str,
    agent_kubeconfig: Callable[..., Path],
    admin_kubeconfig: Path,
    run: Callable[..., object],
) -> None:
    node = f"xen-{namespace[-6:]}"

    async def scenario() -> None:
        kube = KubeClient.from_kubeconfig(agent_kubeconfig(namespace))
        root = KubeClient.from_kubeconfig(admin_kubeconfig)
        reporter = NodeReporter(kube, node)
        try:
            await reporter.write(status())
            stored = await root.get(xennodes_path(node))
            assert stored["metadata"]["labels"]["xenha.io/node"] == node
            got = stored["status"]
            # What went in is what the CRD's schema keeps: no field pruned on the way.
            expected = status().to_api()
            beat = got.pop("heartbeatTime")
            assert got == expected
            assert datetime.fromisoformat(beat.replace("Z", "+00:00")) <= datetime.now(UTC)

            # A second report replaces the lists rather than merging into them.
            await reporter.write(status(domains=[], replications=[]))
            got = (await root.get(xennodes_path(node)))["status"]
            assert got.get("domains", []) == []
            assert got.get("replications", []) == []
            assert reporter.writes == 2
        finally:
            await root.request("DELETE", xennodes_path(node))
            await kube.close()
            await root.close()

    run(scenario())


@pytest.mark.integration
def test_agent_recreates_a_deleted_xennode(
    xenha_crds: None,
    namespace: str,
    agent_kubeconfig: Callable[..., Path],
    admin_kubeconfig: Path,
    run: Callable[..., object],
) -> None:
    node = f"xen-{namespace[-6:]}"

    async def scenario() -> None:
        kube = KubeClient.from_kubeconfig(agent_kubeconfig(namespace))
        root = KubeClient.from_kubeconfig(admin_kubeconfig)
        reporter = NodeReporter(kube, node)
        try:
            await reporter.write(status())
            await root.request("DELETE", xennodes_path(node))
            await reporter.write(status())
            stored = await root.get(xennodes_path(node))
            assert stored["status"]["relayEndpoint"] == "127.0.0.11:7443"
        finally:
            await root.request("DELETE", xennodes_path(node))
            await kube.close()
            await root.close()

    run(scenario())


@pytest.mark.integration
def test_reporter_beats_every_period_and_reports_news_at_once(
    xenha_crds: None,
    namespace: str,
    agent_kubeconfig: Callable[..., Path],
    admin_kubeconfig: Path,
    run: Callable[..., object],
) -> None:
    """No timing is asserted (the machine may be loaded): beats come without any change, and
    news is written long before the next beat is due (the period is far longer than the
    wait)."""
    import asyncio

    node = f"xen-{namespace[-6:]}"

    async def until(check: Callable[[], object], seconds: float = 20.0) -> None:
        for _ in range(int(seconds / 0.05)):
            if check():
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"not within {seconds}s")

    async def scenario() -> None:
        kube = KubeClient.from_kubeconfig(agent_kubeconfig(namespace))
        root = KubeClient.from_kubeconfig(admin_kubeconfig)
        current = {"status": status()}

        async def collect() -> XenNodeStatus:
            return current["status"]

        beating = NodeReporter(kube, node, period=0.2, min_interval=0.05)
        task = asyncio.create_task(beating.run(collect))
        try:
            await until(lambda: beating.writes >= 3)  # nothing changed: the beat alone
        finally:
            task.cancel()
        quiet = NodeReporter(kube, node, period=3600, min_interval=0.05)
        task = asyncio.create_task(quiet.run(collect))
        try:
            await until(lambda: quiet.writes == 1)
            current["status"] = status(replications=[replication(state="Degraded")])
            quiet.wake.set()
            await until(lambda: quiet.writes == 2)
            got = (await root.get(xennodes_path(node)))["status"]
            assert got["replications"][0]["state"] == "Degraded"
        finally:
            task.cancel()
            await root.request("DELETE", xennodes_path(node))
            await kube.close()
            await root.close()

    run(scenario())
