"""Exactly the permissions the node agent needs, for the Helm chart and for tests.

Two parts: cluster-wide rules (a ClusterRole: replications live in any namespace, XenNodes are
cluster-scoped) and rules in the agents' own namespace (a Role: host Leases). The TLS Secret of
each replication is *not* here: the operator grants `get` on that one Secret through a Role
per replication (`xenha_operator.rbac.agent_secret_rules`), bound to the agents' account.

Integration tests run the agent's I/O under a ServiceAccount holding only these rules, so a
missing rule fails a test rather than a rollout.
"""

from __future__ import annotations

from typing import Any

Rule = dict[str, list[str]]

AGENT_CLUSTER_RULES: tuple[Rule, ...] = (
    # Roles come from status.activeNode / standbyNode; the spec says what to replicate.
    {
        "apiGroups": ["xenha.io"],
        "resources": ["xenreplications"],
        "verbs": ["get", "list", "watch"],
    },
    # Its own XenNode: created if missing, status reported; peers' XenNodes are read for their
    # relayEndpoint.
    {
        "apiGroups": ["xenha.io"],
        "resources": ["xennodes"],
        "verbs": ["get", "list", "watch", "create", "update", "patch"],
    },
    {
        "apiGroups": ["xenha.io"],
        "resources": ["xennodes/status"],
        "verbs": ["get", "update", "patch"],
    },
    # Fencing Leases `<xr>-fence` in the replications' namespaces: watched one by name
    # (`get` + `watch` with a metadata.name field selector, no `list`), and updated with a
    # resourceVersion precondition when taking over or resuming. Never created: the operator
    # creates them.
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "watch", "update"],
    },
    # Node-local actions (FailoverActivated, CopyDropped, SelfFenced, ...) on the replication.
    {
        "apiGroups": [""],
        "resources": ["events"],
        "verbs": ["create", "patch"],
    },
)

AGENT_NAMESPACE_RULES: tuple[Rule, ...] = (
    # Host Leases `xenha-node-<node>`: its own created and renewed; everyone's listed and
    # watched (the standby judges the holder's liveness by them).
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "list", "watch", "create", "update"],
    },
)


def cluster_role(name: str = "xenha-agent") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [dict(rule) for rule in AGENT_CLUSTER_RULES],
    }


def namespace_role(namespace: str, name: str = "xenha-agent") -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": name, "namespace": namespace},
        "rules": [dict(rule) for rule in AGENT_NAMESPACE_RULES],
    }
