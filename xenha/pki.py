"""Minting X.509 material: keys, a self-signed CA, leaf certificates issued by it, and PEM.

The one home for this in the project: the operator's per-replication CA and node certificates
(`xenha_operator.certs`), the test control plane's throwaway PKI (`xenha.controlplane.pki`)
and the tests' CA all build on these functions, so a certificate looks the same wherever it
was made. Pure functions over `cryptography` objects, with no files and no clock: callers
choose names and lifetimes and keep the results in their own containers.

Every certificate is signed with SHA-256, every CA carries a SubjectKeyIdentifier and every
leaf the matching AuthorityKeyIdentifier, so verifiers that build chains by key id (OpenSSL,
Go) find the issuer even when two CAs share a name.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import datetime
from typing import Literal, overload

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey = ec.EllipticCurvePublicKey | rsa.RSAPublicKey
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: X.509's upper bound for a common name (RFC 5280 ub-common-name).
MAX_CN = 64


@overload
def generate_key(kind: Literal["ec"] = ...) -> ec.EllipticCurvePrivateKey: ...
@overload
def generate_key(kind: Literal["rsa"]) -> rsa.RSAPrivateKey: ...
def generate_key(kind: Literal["ec", "rsa"] = "ec") -> PrivateKey:
    """A fresh private key: ECDSA P-256, or RSA-2048 where a consumer insists on RS256.

    P-256 is the default because it takes microseconds to generate where RSA takes tens of
    milliseconds, and Python's ssl accepts it for TLS 1.3 everywhere.
    """
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def name(common_name: str | None = None, organization: str | None = None) -> x509.Name:
    """A distinguished name; with neither part, the empty name (the identity is the SAN)."""
    attrs: list[x509.NameAttribute[str]] = []
    if common_name is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    if organization is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
    return x509.Name(attrs)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # digitalSignature on every certificate: TLS 1.3 signs the handshake with the leaf key,
    # and a CA key signs OCSP/CRLs in principle; keyEncipherment is RSA-kex only, never used.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def self_signed_ca(
    key: PrivateKey,
    subject: x509.Name,
    *,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None = 0,
) -> x509.Certificate:
    """A self-signed CA certificate for `key`.

    `path_length` 0 (the default) lets it sign leaves only, so a leaf key that leaks cannot
    be turned into an intermediate; None leaves the depth unbounded.
    """
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue_leaf(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    public_key: PublicKey,
    subject: x509.Name,
    *,
    not_before: datetime,
    not_after: datetime,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[IPAddress] = (),
    server: bool = False,
    client: bool = False,
) -> x509.Certificate:
    """An end-entity certificate for `public_key`, signed by the CA.

    `server`/`client` choose the extended key usages (serverAuth, clientAuth); at least one is
    required, since a leaf good for neither has no use here. The SAN extension is present only
    when there are names for it, and critical when the subject is empty (RFC 5280 4.2.1.6).
    `not_after` is capped at the CA's: a chain with an expired CA fails even if the leaf is
    still valid, so a longer life would only mislead whoever plans renewals from it.
    """
    usages: list[x509.ObjectIdentifier] = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if not usages:
        raise ValueError("a leaf certificate needs server or client usage")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(min(not_after, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ip) for ip in ip_addresses]
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(sans), critical=len(subject) == 0
        )
    return builder.sign(ca_key, hashes.SHA256())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    """The private key as unencrypted PKCS#8 PEM (what Python's ssl and Kubernetes load)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_key_pem(key: PrivateKey) -> bytes:
    """The public half as SubjectPublicKeyInfo PEM (e.g. a token verifier's key file)."""
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
