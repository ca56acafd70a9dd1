"""Renewal news reaches each replicator on its own, whatever the other replicators do.

A replicator pauses its guest once the agent's news of host-Lease renewals (the `lease`
request, docs/design.md "Replicator control socket") is older than D - margin. So the news to
one replicator must not wait for another: a replicator that is slow to answer `status` (a busy
dom0, a hung process) may cost its own guest, never the other guests of the host. At 50
replications per host, news sent only after the loop's poll of every replicator's status let
one slow replicator make every guest on its host pause itself.

The agent under test is the real one, active for two replications against a real
kube-apiserver, on a simulated Xen host; both replicators are fakes speaking the real control
protocol (fake_replicator.py). One never answers `status`.
"""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from xenha_agent.agent import Agent
from xenha_agent.kube import leases_path, xenreplications_path
from xenha_agent.leases import STANDBY_ANNOTATION, micro_time

from .fake_replicator import FakeLauncher
from .scene import D, Scene, running, until

pytestmark = pytest.mark.integration


async def second_replication(scene: Scene, name: str, domain: str) -> str:
    """What the operator makes for another replication between the scene's nodes (active on
    a, b its designated standby), as `Scene.create` does for db1. Returns its uid."""
    xr = {
        "apiVersion": "xenha.io/v1alpha1",
        "kind": "XenReplication",
        "metadata": {"name": name, "namespace": scene.ns},
        "spec": {
            "domain": domain,
            "mode": "remus",
            "primaryNode": scene.a,
            "secondaryNode": scene.b,
            "failover": {"leaseDurationSeconds": D, "automatic": True},
        },
    }
    created = await scene.admin.create(xenreplications_path(scene.ns), xr)
    status = {"activeNode": scene.a, "standbyNode": scene.b, "phase": "Protected"}
    await scene.admin.patch(f"{xenreplications_path(scene.ns)}/{name}/status", {"status": status})
    now = micro_time(datetime.now(UTC))
    await scene.admin.create(
        leases_path(scene.ns),
        {
            "metadata": {
                "name": f"{name}-fence",
                "namespace": scene.ns,
                "annotations": {STANDBY_ANNOTATION: scene.b},
            },
            "spec": {
                "holderIdentity": scene.a,
                "leaseDurationSeconds": D,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": 0,
            },
        },
    )
    pem = base64.b64encode(b"not really PEM: the fake replicator never reads it").decode()
    data = {"ca.crt": pem}
    for node in (scene.a, scene.b):
        data[f"{node}.crt"] = data[f"{node}.key"] = pem
    await scene.admin.create(
        f"/api/v1/namespaces/{scene.ns}/secrets",
        {"metadata": {"name": f"{name}-tls"}, "data": data},
    )
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{scene.ns}"
    await scene.admin.create(
        f"{rbac}/roles",
        {
            "metadata": {"name": f"{name}-tls"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": [f"{name}-tls"],
                    "verbs": ["get"],
                }
            ],
        },
    )
    await scene.admin.create(
        f"{rbac}/rolebindings",
        {
            "metadata": {"name": f"{name}-tls"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": f"{name}-tls",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "xenha-agent", "namespace": scene.ns}],
        },
    )
    return str(created["metadata"]["uid"])


def news_during_one_unanswered_status(
    journal: list[tuple[str, str, Any]], slow: str, other: str
) -> list[float]:
    """The most renewal news `other` received while one status request to `slow` was
    outstanding (sent, not answered, not yet given up by the agent)."""
    best: list[float] = []
    during: list[float] | None = None
    for uid, what, value in journal:
        if uid == slow and what == "status held":
            during = []
        elif uid == slow and what == "status given up":
            if during is not None and len(during) > len(best):
                best = during
            during = None
        elif uid == other and what == "lease" and during is not None:
            during.append(float(value))
    if during is not None and len(during) > len(best):
        best = during
    return best


def test_renewal_news_reaches_a_replicator_while_another_does_not_answer_status(
    scene: Scene, host: Any, run: Any
) -> None:
    launcher = FakeLauncher()
    other_domain = f"{scene.domain}-2"

    async def scenario() -> None:
        await scene.create()
        other_uid = await second_replication(scene, "db2", other_domain)
        await scene.peer_xennode(scene.b)
        host.create_guest(scene.domain, memory_mib=16)
        host.create_guest(other_domain, memory_mib=16)
        agent = Agent(scene.settings(scene.a, host), launcher=launcher)
        try:
            async with running(agent):
                await until(lambda: {scene.uid, other_uid} <= set(launcher.replicators))
                slow = launcher.replicators[scene.uid]
                other = launcher.replicators[other_uid]
                slow.connect()
                other.connect()
                await until(lambda: slow.lease is not None and other.lease is not None)
                journal: list[tuple[str, str, Any]] = []
                slow.journal = other.journal = journal
                slow.hold_status = True

                def two_renewals_while_one_status_is_unanswered() -> bool:
                    return len(news_during_one_unanswered_status(journal, slow.uid, other.uid)) >= 2

                await until(two_renewals_while_one_status_is_unanswered)
                news = news_during_one_unanswered_status(journal, slow.uid, other.uid)
                # Each piece of news is a later renewal than the one before.
                assert all(a < b for a, b in itertools.pairwise(news)), news
                assert "fence" not in other.calls
        finally:
            host.xl("destroy", scene.domain)
            host.xl("destroy", other_domain)

    run(scenario())
