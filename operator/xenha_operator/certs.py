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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .owned import Owner, owned_metadata
from .rbac import agent_secret_rules

CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"

#: X.509's upper bound for a common name.
MAX_CN = 64

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


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


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
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name[:MAX_CN])])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Pair(cert, key)


def _issue_node(node: str, ca: _Pair, now: datetime, validity: timedelta) -> _Pair:
    key = _new_key()
    # Never outlive the CA: a chain with an expired CA fails even if the leaf is valid.
    not_after = min(now + validity, ca.cert.not_valid_after_utc)
    # X.509 caps the CN at 64 characters, Kubernetes node names go to 253: a longer name
    # lives in the SAN alone (which peers verify anyway), and the SAN becomes critical.
    short = len(node) <= MAX_CN
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node)] if short else [])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=not short)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
        .sign(ca.key, hashes.SHA256())
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
    bundle = b"".join(_cert_pem(c) for c in trusted)
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
        new_tls[node_cert_key(node)] = _cert_pem(pair.cert)
        new_tls[node_key_key(node)] = _key_pem(pair.key)
        renew_at = min(renew_at, _renewal_time(pair.cert, renew_fraction))

    if set(new_tls) != set(tls_data):
        changed = True  # a node left
    new_ca = {CA_CERT_KEY: _cert_pem(ca.cert), CA_KEY_KEY: _key_pem(ca.key)}
    return TlsPlan(ca_data=new_ca, tls_data=new_tls, renew_at=renew_at, changed=changed)
