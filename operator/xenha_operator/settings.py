"""The operator's knobs, as one explicit object passed to whoever needs them.

No module reads the environment or a global: `main.py` builds an `OperatorSettings` from the
command line (and the environment for what a Helm chart sets), and the kopf handlers receive it
through kopf's `memo`.
"""

from __future__ import annotations

import argparse
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

#: kopf peering object shared by the operator's replicas. Agents never join it: they are not
#: kopf operators, and sharing it would pause the operator in favour of an agent.
PEERING_NAME = "xenha-operator"

#: The finalizer that holds a XenReplication until its standby copy is gone.
FINALIZER = "xenha.io/stop-replication"


@dataclass(frozen=True, kw_only=True)
class OperatorSettings:
    #: Namespaces whose XenReplications this operator serves; empty means cluster-wide.
    namespaces: tuple[str, ...] = ()
    peering_name: str = PEERING_NAME
    #: Run without peering (a single replica, or a developer's laptop).
    standalone: bool = False
    #: kopf pauses every replica that sees a live peer of higher *or equal* priority, so two
    #: replicas of one Deployment must differ: each process draws its own unless told.
    priority: int = field(default_factory=lambda: random.randint(1, 2**30))
    #: How long a paused replica waits for a silent peer before it takes over (kopf's peer
    #: lifetime). Short, so that killing the acting replica stalls reconciling only briefly.
    peering_lifetime: int = 15

    #: Where the agents run, and the ServiceAccount they use: the per-replication RoleBinding
    #: names it so that the agents can read their TLS Secret.
    agent_namespace: str = "xenha-system"
    agent_service_account: str = "xenha-agent"

    #: A XenNode whose heartbeat has not changed for this long (by the operator's own clock)
    #: is NodeUnresponsive.
    report_stale_after: timedelta = timedelta(seconds=15)
    #: Checkpoint statistics alone change status at most this often (they change with every
    #: report; phases, roles and conditions are written at once).
    stats_interval: timedelta = timedelta(seconds=10)
    #: Re-evaluate every replication at least this often, even without watch events: staleness
    #: is a matter of time passing, not of anything being written.
    resync_interval: timedelta = timedelta(seconds=2)
    #: The TLS Secrets and the agents' Role/RoleBinding are not watched: check at least this
    #: often that they still exist and are ours (the garbage collector may have removed them,
    #: e.g. when they were left over from a deleted replication of the same name).
    owned_check_interval: timedelta = timedelta(seconds=30)
    #: A switchover still InProgress after this long is marked Failed (the agents then
    #: resume on the node that holds the fencing Lease).
    switchover_timeout: timedelta = timedelta(seconds=120)
    #: How long deletion waits for the standby to report that its copy is gone before it
    #: releases the finalizer anyway (the standby's agent drops orphaned copies by itself).
    deletion_timeout: timedelta = timedelta(seconds=120)

    #: TLS material: short-lived node certificates, renewed when a third of their life is left.
    cert_validity: timedelta = timedelta(days=7)
    ca_validity: timedelta = timedelta(days=365)
    renew_fraction: float = 1 / 3

    #: kopf's liveness endpoint (e.g. "http://0.0.0.0:8080/healthz"); None disables it.
    liveness_endpoint: str | None = None
    #: Prometheus metrics port; None disables the endpoint.
    metrics_port: int | None = None
    #: kubeconfig to use; None: $KUBECONFIG, else the in-cluster ServiceAccount.
    kubeconfig: str | None = None
    #: Component name on the Events the operator posts.
    reporting_component: str = "xenha-operator"

    @property
    def clusterwide(self) -> bool:
        return not self.namespaces


def _seconds(value: str) -> timedelta:
    return timedelta(seconds=float(value))


def parse_args(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> OperatorSettings:
    """Settings from `xenha operator ...` arguments; XENHA_* variables provide defaults."""
    env = os.environ if environ is None else environ
    defaults = OperatorSettings()
    parser = argparse.ArgumentParser(
        prog="xenha operator",
        description="Run the xenha operator (kopf): roles, status, TLS material, fencing Leases.",
    )
    parser.add_argument(
        "-n",
        "--namespace",
        action="append",
        dest="namespaces",
        default=[ns for ns in env.get("XENHA_WATCH_NAMESPACES", "").split(",") if ns],
        help="serve XenReplications in this namespace (repeatable); default: cluster-wide",
    )
    parser.add_argument("--kubeconfig", default=env.get("KUBECONFIG") or None)
    parser.add_argument("--standalone", action="store_true", help="run without kopf peering")
    parser.add_argument("--priority", type=int, default=None, help="kopf peering priority")
    parser.add_argument("--peering-name", default=defaults.peering_name)
    parser.add_argument(
        "--peering-lifetime",
        type=int,
        default=defaults.peering_lifetime,
        metavar="SECONDS",
        help="how long a silent replica blocks the others",
    )
    parser.add_argument(
        "--agent-namespace", default=env.get("XENHA_NAMESPACE", defaults.agent_namespace)
    )
    parser.add_argument(
        "--agent-service-account",
        default=env.get("XENHA_AGENT_SERVICE_ACCOUNT", defaults.agent_service_account),
    )
    parser.add_argument(
        "--report-stale-after",
        type=_seconds,
        default=defaults.report_stale_after,
        metavar="SECONDS",
    )
    parser.add_argument(
        "--resync-interval", type=_seconds, default=defaults.resync_interval, metavar="SECONDS"
    )
    parser.add_argument(
        "--owned-check-interval",
        type=_seconds,
        default=defaults.owned_check_interval,
        metavar="SECONDS",
    )
    parser.add_argument(
        "--switchover-timeout",
        type=_seconds,
        default=defaults.switchover_timeout,
        metavar="SECONDS",
    )
    parser.add_argument(
        "--deletion-timeout", type=_seconds, default=defaults.deletion_timeout, metavar="SECONDS"
    )
    parser.add_argument(
        "--stats-interval", type=_seconds, default=defaults.stats_interval, metavar="SECONDS"
    )
    parser.add_argument(
        "--liveness",
        dest="liveness_endpoint",
        default=env.get("XENHA_LIVENESS_ENDPOINT"),
        help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=int(env["XENHA_METRICS_PORT"]) if env.get("XENHA_METRICS_PORT") else None,
    )
    args = parser.parse_args(list(argv))
    return OperatorSettings(
        namespaces=tuple(args.namespaces),
        standalone=args.standalone,
        priority=args.priority if args.priority is not None else defaults.priority,
        peering_name=args.peering_name,
        peering_lifetime=args.peering_lifetime,
        agent_namespace=args.agent_namespace,
        agent_service_account=args.agent_service_account,
        report_stale_after=args.report_stale_after,
        resync_interval=args.resync_interval,
        owned_check_interval=args.owned_check_interval,
        switchover_timeout=args.switchover_timeout,
        deletion_timeout=args.deletion_timeout,
        stats_interval=args.stats_interval,
        liveness_endpoint=args.liveness_endpoint,
        metrics_port=args.metrics_port,
        kubeconfig=args.kubeconfig,
    )
