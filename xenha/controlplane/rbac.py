"""Run a component under exactly the permissions it is given.

``service_account_kubeconfig`` creates a ServiceAccount, binds it to the given RBAC rules
(namespaced ones through a Role, cluster-wide ones through a ClusterRole), asks the
TokenRequest API for a token and writes a kubeconfig that carries it. The operator and agents
then run in tests with the RBAC their Helm chart would give them, and nothing more.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xenha.controlplane.kubeconfig import write_kubeconfig

if TYPE_CHECKING:
    from kubernetes.client import ApiClient, V1PolicyRule, V1SubjectAccessReview

# An RBAC PolicyRule as it is written in YAML (camelCase; snake_case keys are accepted too).
Rule = Mapping[str, Any]
RBAC_GROUP = "rbac.authorization.k8s.io"

# Rules may be written the Python way; the API wants camelCase.
_KEYS = {
    "api_groups": "apiGroups",
    "resource_names": "resourceNames",
    "non_resource_urls": "nonResourceURLs",
    "nonResourceUrls": "nonResourceURLs",
}


def normalize_rule(rule: Rule) -> dict[str, list[str]]:
    out = {_KEYS.get(key, key): list(value) for key, value in rule.items()}
    if "nonResourceURLs" not in out:
        out.setdefault("apiGroups", [""])
    return out


def policy_rule(rule: Rule) -> V1PolicyRule:
    from kubernetes.client import V1PolicyRule

    parsed = V1PolicyRule.from_dict(normalize_rule(rule))
    assert parsed is not None
    return parsed


@dataclass
class ServiceAccountCredentials:
    namespace: str
    name: str
    token: str
    kubeconfig: Path
    # Cluster-scoped objects outlive the namespace; whoever created them deletes them.
    cluster_roles: list[str] = field(default_factory=list)

    @property
    def username(self) -> str:
        return f"system:serviceaccount:{self.namespace}:{self.name}"


def _create(call: Callable[..., object], *args: object) -> None:
    from kubernetes.client.exceptions import ApiException

    try:
        call(*args)
    except ApiException as exc:
        if exc.status != 409:
            raise


def service_account_kubeconfig(
    api: ApiClient,
    *,
    server: str,
    ca_pem: bytes,
    namespace: str,
    name: str,
    rules: Sequence[Rule] = (),
    cluster_rules: Sequence[Rule] = (),
    path: Path,
    expiration_seconds: int = 24 * 3600,
    audiences: Sequence[str] = (),
    timeout: float = 60,
) -> ServiceAccountCredentials:
    from kubernetes import client

    core = client.CoreV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    subjects = [client.RbacV1Subject(kind="ServiceAccount", name=name, namespace=namespace)]

    _create(
        core.create_namespaced_service_account,
        namespace,
        client.V1ServiceAccount(metadata=client.V1ObjectMeta(name=name, namespace=namespace)),
    )
    if rules:
        meta = client.V1ObjectMeta(name=name, namespace=namespace)
        _create(
            rbac.create_namespaced_role,
            namespace,
            client.V1Role(metadata=meta, rules=[policy_rule(r) for r in rules]),
        )
        _create(
            rbac.create_namespaced_role_binding,
            namespace,
            client.V1RoleBinding(
                metadata=meta,
                role_ref=client.V1RoleRef(api_group=RBAC_GROUP, kind="Role", name=name),
                subjects=subjects,
            ),
        )
    cluster_roles: list[str] = []
    if cluster_rules:
        role = f"xenha-test:{namespace}:{name}"
        _create(
            rbac.create_cluster_role,
            client.V1ClusterRole(
                metadata=client.V1ObjectMeta(name=role),
                rules=[policy_rule(r) for r in cluster_rules],
            ),
        )
        _create(
            rbac.create_cluster_role_binding,
            client.V1ClusterRoleBinding(
                metadata=client.V1ObjectMeta(name=role),
                role_ref=client.V1RoleRef(api_group=RBAC_GROUP, kind="ClusterRole", name=role),
                subjects=subjects,
            ),
        )
        cluster_roles.append(role)

    token_request = core.create_namespaced_service_account_token(
        name,
        namespace,
        client.AuthenticationV1TokenRequest(
            spec=client.V1TokenRequestSpec(
                # Empty means "the apiserver's own audiences", which is what a kubeconfig needs.
                audiences=list(audiences),
                expiration_seconds=expiration_seconds,
            )
        ),
    )
    token = token_request.status.token if token_request.status else None
    if not token:
        raise RuntimeError(f"TokenRequest for {namespace}/{name} returned no token")
    credentials = ServiceAccountCredentials(
        namespace=namespace,
        name=name,
        token=token,
        kubeconfig=write_kubeconfig(
            path, server=server, ca_pem=ca_pem, user=name, token=token, namespace=namespace
        ),
        cluster_roles=cluster_roles,
    )
    wait_until_authorized(
        api,
        credentials.username,
        namespace,
        [(r, namespace) for r in rules] + [(r, None) for r in cluster_rules],
        timeout=timeout,
    )
    return credentials


def delete_cluster_roles(api: ApiClient, names: Sequence[str]) -> None:
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    rbac = client.RbacAuthorizationV1Api(api)
    for role in names:
        for call in (rbac.delete_cluster_role_binding, rbac.delete_cluster_role):
            try:
                call(role)
            except ApiException as exc:
                if exc.status != 404:
                    raise


def _review(username: str, namespace: str, rule: Rule, scope: str | None) -> V1SubjectAccessReview:
    from kubernetes import client

    normalized = normalize_rule(rule)
    verb = normalized["verbs"][0]
    spec = client.V1SubjectAccessReviewSpec(
        user=username,
        groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}"],
    )
    if "nonResourceURLs" in normalized:
        spec.non_resource_attributes = client.V1NonResourceAttributes(
            path=normalized["nonResourceURLs"][0], verb=verb
        )
    else:
        resource, _, subresource = normalized["resources"][0].partition("/")
        spec.resource_attributes = client.V1ResourceAttributes(
            group=normalized["apiGroups"][0],
            resource=resource,
            subresource=subresource or None,
            verb=verb,
            name=next(iter(normalized.get("resourceNames", [])), None),
            namespace=scope,
        )
    return client.V1SubjectAccessReview(spec=spec)


def wait_until_authorized(
    api: ApiClient,
    username: str,
    namespace: str,
    rules: Sequence[tuple[Rule, str | None]],
    *,
    timeout: float = 60,
) -> None:
    """Block until the authorizer grants the first verb/resource of every rule.

    The RBAC authorizer reads from an informer cache, so a fresh binding takes a moment to
    count; a test that acts on it at once would see a 403 that is not about its subject.
    """
    from kubernetes import client

    authz = client.AuthorizationV1Api(api)
    deadline = time.monotonic() + timeout
    for rule, scope in rules:
        body = _review(username, namespace, rule, scope)
        while True:
            review = authz.create_subject_access_review(body)
            if review.status is not None and review.status.allowed:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"RBAC never granted {body.spec} to {username}")
            time.sleep(0.1)
