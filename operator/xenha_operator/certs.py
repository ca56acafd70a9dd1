"""Per-replication TLS material: a private CA and one short-lived certificate per node.

The two agents of a replication authenticate each other on the relay with these (mutual TLS 1.3,
see docs/design.md). Every replication gets its own CA, so a certificate issued for one
replication is worthless on another's relay even between the same two hosts.

Two Secrets, both owned by the XenReplication (garbage-collected with it):

- `<xr>-tls` — what the agents read (a Role grants `get` on exactly this Secret):
  `ca.crt` (PEM bundle of the CAs to trust: the current one first, during a CA rotation the
  previous one too), and for every node `<node>.crt` / `<node>.key`.
- `<xr>-tls-ca` — the CA's private key and certificate; only the operator reads it, so an agent
  cannot mint certificates with other names or longer lives.

and a Role + RoleBinding `<xr>-agent-tls`, also owned by it, granting the agents' ServiceAccount
`get` on exactly `<xr>-tls`.

Keys are ECDSA P-256, which Python's ssl accepts for TLS 1.3 everywhere. Node certificates carry
the node name as the only DNS SAN (and as CN when it fits X.509's 64 characters), and both
serverAuth and clientAuth (each node dials and accepts). Renewal is decided by `plan_tls`, a
function of the current Secret data and the clock only, so the handler can call it on every
pass and write only when it returns a change.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from xenha import pki
from xenha.pki import MAX_CN

from .owned import Owner, owned_metadata
from .rbac import agent_secret_rules

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"

#: Certificates start this long before "now": the peer's clock may be a little behind ours.
BACKDATE = timedelta(minutes=5)


def tls_secret_name(xr_name: str) -> str:
    return f"{xr_name}-tls"


def ca_secret_name(xr_name: str) -> str:
    return f"{xr_name}-tls-ca"


def agent_role_name(xr_name: str) -> str:
    return f"{xr_name}-agent-tls"


def agent_role(owner: Owner) -> dict[str, Any]:
    """The Role letting the agents read this replication's TLS Secret, and nothing else."""
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": owned_metadata(owner, agent_role_name(owner.name)),
        "rules": agent_secret_rules(tls_secret_name(owner.name)),
    }


def agent_role_binding(owner: Owner, service_account: str, namespace: str) -> dict[str, Any]:
    """Binds `agent_role` to the agents' ServiceAccount (which lives in their namespace)."""
    name = agent_role_name(owner.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": owned_metadata(owner, name),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": service_account, "namespace": namespace}],
    }


def node_cert_key(node: str) -> str:
    return f"{node}.crt"


def node_key_key(node: str) -> str:
    return f"{node}.key"


@dataclass(frozen=True)
class TlsPlan:
    """What both Secrets should hold (complete contents), and when to look again."""

    ca_data: dict[str, bytes]
    tls_data: dict[str, bytes]
    renew_at: datetime
    #: False when the Secrets already hold exactly this: nothing to write.
    changed: bool


@dataclass(frozen=True)
class _Pair:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _load_pair(cert_pem: bytes | None, key_pem: bytes | None) -> _Pair | None:
    """A certificate with its key, or None when absent, garbled, or not matching."""
    if not cert_pem or not key_pem:
        return None
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        return None
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return None
    if public.public_numbers() != key.public_key().public_numbers():
        return None
    return _Pair(cert, key)


def _lifetime(cert: x509.Certificate) -> timedelta:
    return cert.not_valid_after_utc - cert.not_valid_before_utc


def _renewal_time(cert: x509.Certificate, renew_fraction: float) -> datetime:
    return cert.not_valid_after_utc - _lifetime(cert) * renew_fraction


def _issue_ca(common_name: str, now: datetime, validity: timedelta) -> _Pair:
    key = pki.generate_key()
    cert = pki.self_signed_ca(
        key,
        pki.name(common_name[:MAX_CN]),
        not_before=now - BACKDATE,
        not_after=now + validity,
    )
    return _Pair(cert, key)


def _issue_node(node: str, ca: _Pair, now: datetime, validity: timedelta) -> _Pair:
    key = pki.generate_key()
    # X.509 caps the CN at 64 characters, Kubernetes node names go to 253: a longer name
    # lives in the SAN alone, which peers verify anyway.
    cert = pki.issue_leaf(
        ca.cert,
        ca.key,
        key.public_key(),
        pki.name(node if len(node) <= MAX_CN else None),
        not_before=now - BACKDATE,
        not_after=now + validity,
        dns_names=[node],
        # Each node both accepts its peer's connection and dials it.
        server=True,
        client=True,
    )
    return _Pair(cert, key)


def _node_names(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(san.value.get_values_for_type(x509.DNSName))


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _load_bundle(pem: bytes | None) -> list[x509.Certificate]:
    if not pem:
        return []
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError:
        return []


def plan_tls(
    *,
    ca_data: Mapping[str, bytes] | None,
    tls_data: Mapping[str, bytes] | None,
    nodes: Collection[str],
    ca_name: str,
    now: datetime,
    cert_validity: timedelta,
    ca_validity: timedelta,
    renew_fraction: float,
) -> TlsPlan:
    """What the two Secrets should hold now.

    `nodes` are the nodes that take part (spec nodes and the current active/standby); a node
    that left loses its certificate, a node that joined gets one. Each certificate is renewed
    once less than `renew_fraction` of its life is left; a renewed CA reissues every node
    certificate and keeps the previous CA in the trusted bundle while it is still valid, so
    agents that have not reloaded yet still accept the new certificates and vice versa.
    """
    ca_data = ca_data or {}
    tls_data = tls_data or {}
    changed = False

    ca = _load_pair(ca_data.get(CA_CERT_KEY), ca_data.get(CA_KEY_KEY))
    previous_cas: list[x509.Certificate] = []
    if ca is None or _renewal_time(ca.cert, renew_fraction) <= now:
        if ca is not None:
            previous_cas.append(ca.cert)
        ca = _issue_ca(ca_name, now, ca_validity)
        changed = True

    # Trust the current CA and any still-valid earlier one (rotation overlap).
    trusted = [ca.cert]
    for old in previous_cas + _load_bundle(tls_data.get(CA_CERT_KEY)):
        if old.not_valid_after_utc > now and all(old != t for t in trusted):
            trusted.append(old)
    bundle = b"".join(pki.cert_pem(c) for c in trusted)
    if bundle != tls_data.get(CA_CERT_KEY):
        changed = True

    new_tls: dict[str, bytes] = {CA_CERT_KEY: bundle}
    renew_at = _renewal_time(ca.cert, renew_fraction)
    for node in sorted(set(nodes)):
        pair = _load_pair(tls_data.get(node_cert_key(node)), tls_data.get(node_key_key(node)))
        if (
            pair is None
            or not _issued_by(pair.cert, ca.cert)
            or _node_names(pair.cert) != [node]
            or _renewal_time(pair.cert, renew_fraction) <= now
        ):
            pair = _issue_node(node, ca, now, cert_validity)
            changed = True
        new_tls[node_cert_key(node)] = pki.cert_pem(pair.cert)
        new_tls[node_key_key(node)] = pki.key_pem(pair.key)
        renew_at = min(renew_at, _renewal_time(pair.cert, renew_fraction))

    if set(new_tls) != set(tls_data):
        changed = True  # a node left
    new_ca = {CA_CERT_KEY: pki.cert_pem(ca.cert), CA_KEY_KEY: pki.key_pem(ca.key)}
    return TlsPlan(ca_data=new_ca, tls_data=new_tls, renew_at=renew_at, changed=changed)
