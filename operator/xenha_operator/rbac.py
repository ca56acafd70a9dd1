"""Exactly the permissions the operator needs, for the Helm chart's ClusterRole and for tests.

Kept next to the code that uses them: when a handler starts touching a new kind of object, the
rule is added here in the same change, and the integration tests run the operator with only
these rules (through a ServiceAccount kubeconfig), so a missing rule fails a test rather than a
production rollout.
"""

from __future__ import annotations

from typing import Any

from .peering import PEERING_GROUP

Rule = dict[str, list[str]]

OPERATOR_RULES: tuple[Rule, ...] = (
    # The replications: watch them, add/remove our finalizer (a metadata patch), and own
    # their status. Never spec, labels or annotations: those are the user's.
    {
        "apiGroups": ["xenha.io"],
        "resources": ["xenreplications"],
        "verbs": ["get", "list", "watch", "patch"],
    },
    # Status is replaced whole (PUT, guarded by resourceVersion); kopf patches status.kopf.
    {
        "apiGroups": ["xenha.io"],
        "resources": ["xenreplications/status"],
        "verbs": ["get", "update", "patch"],
    },
    # The agents' reports (cluster-scoped), read only.
    {
        "apiGroups": ["xenha.io"],
        "resources": ["xennodes"],
        "verbs": ["get", "list", "watch"],
    },
    # Fencing Leases: created once per replication; the holder is only ever changed by agents.
    {
        "apiGroups": ["coordination.k8s.io"],
        "resources": ["leases"],
        "verbs": ["get", "list", "watch", "create"],
    },
    # TLS material: read by name, created, renewed in place. No list/watch of Secrets.
    {
        "apiGroups": [""],
        "resources": ["secrets"],
        "verbs": ["get", "create", "update"],
    },
    # One Role + RoleBinding per replication granting the agents `get` on its TLS Secret.
    # Creating a Role that grants `get secrets` requires holding it (RBAC escalation checks),
    # which the rule above provides.
    {
        "apiGroups": ["rbac.authorization.k8s.io"],
        "resources": ["roles", "rolebindings"],
        "verbs": ["get", "create", "update"],
    },
    # Events about transitions (kopf posts core/v1 Events).
    {
        "apiGroups": [""],
        "resources": ["events"],
        "verbs": ["create"],
    },
    # kopf's peering between the operator's replicas (cluster-wide and namespaced modes).
    {
        "apiGroups": [PEERING_GROUP],
        "resources": ["clusterkopfpeerings", "kopfpeerings"],
        "verbs": ["get", "list", "watch", "patch", "create"],
    },
    # kopf discovers resources and notices CRDs being (re)installed.
    {
        "apiGroups": ["apiextensions.k8s.io"],
        "resources": ["customresourcedefinitions"],
        "verbs": ["get", "list", "watch"],
    },
    # kopf follows namespaces to serve namespace patterns.
    {
        "apiGroups": [""],
        "resources": ["namespaces"],
        "verbs": ["get", "list", "watch"],
    },
)


def cluster_role(name: str = "xenha-operator") -> dict[str, Any]:
    """The ClusterRole manifest holding OPERATOR_RULES."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name},
        "rules": [dict(rule) for rule in OPERATOR_RULES],
    }


def agent_secret_rules(secret_name: str) -> list[Rule]:
    """What the per-replication Role grants the agents: reading exactly one Secret."""
    return [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": [secret_name],
            "verbs": ["get"],
        }
    ]
