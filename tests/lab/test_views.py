"""`xenha lab status` as a person reads it."""

from __future__ import annotations

from rich.console import Console

from xenha.lab.views import hosts_view, replication_view

NOW = 1_800_000_100.0  # 2027-01-15T08:01:40Z

REPLICATION = {
    "metadata": {"namespace": "lab", "name": "demo1"},
    "spec": {"domain": "demo1", "mode": "remus"},
    "status": {
        "phase": "Protected",
        "message": "xen-b holds a current copy",
        "activeNode": "xen-b",
        "standbyNode": "xen-a",
        "protectedSince": "2027-01-15T08:01:00Z",
        "checkpointIntervalMs": 100,
        "checkpointsTotal": 420,
        "lastCheckpointTime": "2027-01-15T08:01:39.950Z",
        "bytesPerSecond": 3 * 1024 * 1024,
        "lastPauseMs": 4,
        "lastFailover": {
            "time": "2027-01-15T08:00:40Z",
            "from": "xen-a",
            "to": "xen-b",
            "reason": "NodeLost",
            "durationMs": 2100,
        },
        "conditions": [
            {
                "type": "Protected",
                "status": "True",
                "reason": "Replicating",
                "message": "checkpoints flow",
                "lastTransitionTime": "2027-01-15T08:01:00Z",
            },
        ],
    },
}


def render(renderable: object) -> str:
    console = Console(width=160, record=True)
    console.print(renderable)
    return console.export_text()


def test_a_replication_shows_roles_phase_freshness_throughput_and_the_last_failover() -> None:
    text = render(replication_view(REPLICATION, now=NOW))
    for expected in (
        "lab/demo1",
        "Protected",
        "xen-b holds a current copy",
        "active           xen-b",
        "standby          xen-a",
        "10.0/s (every 100 ms), 420 in all",
        "50 ms ago",
        "3.0 MiB/s",
        "xen-a -> xen-b (NodeLost), 60 s ago, 2100 ms from detection to activation",
        "Replicating",
    ):
        assert expected in text, expected


def test_hosts_show_power_agent_and_report_age() -> None:
    state = {
        "hosts": {
            "xen-a": {"up": False, "agent": {"pid": 11}},
            "xen-b": {"up": True, "agent": {"pid": 12}, "pathCut": True},
        }
    }
    nodes = {
        "xen-b": {
            "status": {
                "heartbeatTime": "2027-01-15T08:01:39Z",
                "replications": [{"name": "demo1", "role": "primary", "state": "Active"}],
            }
        }
    }
    lines = render(hosts_view(state, nodes, now=NOW)).splitlines()
    xen_a = next(line for line in lines if "xen-a" in line)
    xen_b = next(line for line in lines if "xen-b" in line)
    assert "off" in xen_a
    assert "11" not in xen_a
    assert "on (path cut)" in xen_b
    assert "1.0 s" in xen_b
    assert "demo1: primary Active" in xen_b
