"""The shared X.509 minting functions (xenha/pki.py)."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from xenha import pki

NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def make_ca(common_name: str = "test-ca") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = pki.generate_key()
    cert = pki.self_signed_ca(
        key, pki.name(common_name), not_before=NOW - DAY, not_after=NOW + 30 * DAY
    )
    return cert, key


def make_leaf(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    subject: x509.Name | None = None,
    *,
    dns_names: Sequence[str] = ("xen-a",),
    ip_addresses: Sequence[pki.IPAddress] = (),
    server: bool = True,
    client: bool = False,
) -> x509.Certificate:
    ca_cert, ca_key = ca
    return pki.issue_leaf(
        ca_cert,
        ca_key,
        pki.generate_key().public_key(),
        pki.name("xen-a") if subject is None else subject,
        not_before=NOW - DAY,
        not_after=NOW + 7 * DAY,
        dns_names=dns_names,
        ip_addresses=ip_addresses,
        server=server,
        client=client,
    )


def test_a_leaf_verifies_against_the_ca_that_issued_it() -> None:
    ca = make_ca()
    leaf = make_leaf(ca)
    leaf.verify_directly_issued_by(ca[0])
    assert leaf.issuer == ca[0].subject


def test_a_leaf_from_another_ca_does_not_verify() -> None:
    # Same name on both CAs: only the signature tells them apart.
    ours, theirs = make_ca("replication"), make_ca("replication")
    intruder = make_leaf(theirs)
    with pytest.raises(InvalidSignature):
        intruder.verify_directly_issued_by(ours[0])


def test_the_leaf_carries_its_dns_and_ip_sans() -> None:
    ip = ipaddress.ip_address("127.0.0.1")
    leaf = make_leaf(make_ca(), dns_names=["xen-a", "xen-a.example"], ip_addresses=[ip])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["xen-a", "xen-a.example"]
    assert san.value.get_values_for_type(x509.IPAddress) == [ip]
    assert not san.critical
    assert leaf.subject.rfc4514_string() == "CN=xen-a"


def test_without_a_subject_the_san_is_critical() -> None:
    leaf = make_leaf(make_ca(), subject=pki.name())
    assert len(leaf.subject) == 0
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).critical


def test_without_names_there_is_no_san_extension() -> None:
    leaf = make_leaf(make_ca(), dns_names=[], server=False, client=True)
    with pytest.raises(x509.ExtensionNotFound):
        leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)


@pytest.mark.parametrize(
    ("server", "client", "usages"),
    [
        (True, False, [ExtendedKeyUsageOID.SERVER_AUTH]),
        (False, True, [ExtendedKeyUsageOID.CLIENT_AUTH]),
        (True, True, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
    ],
)
def test_extended_key_usages_follow_server_and_client(
    server: bool, client: bool, usages: list[x509.ObjectIdentifier]
) -> None:
    leaf = make_leaf(make_ca(), server=server, client=client)
    assert list(leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == usages
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not constraints.ca


def test_a_leaf_for_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="server or client"):
        make_leaf(make_ca(), server=False, client=False)


def test_the_ca_may_sign_certificates_and_only_leaves_by_default() -> None:
    cert, _ = make_ca()
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign
    cert.verify_directly_issued_by(cert)  # self-signed


def test_a_leaf_never_outlives_its_ca() -> None:
    ca_key = pki.generate_key()
    ca_cert = pki.self_signed_ca(ca_key, pki.name("short-ca"), not_before=NOW, not_after=NOW + DAY)
    leaf = pki.issue_leaf(
        ca_cert,
        ca_key,
        pki.generate_key().public_key(),
        pki.name("xen-a"),
        not_before=NOW,
        not_after=NOW + 7 * DAY,
        client=True,
    )
    assert leaf.not_valid_after_utc == ca_cert.not_valid_after_utc


def test_keys_are_p256_by_default_and_rsa_on_request() -> None:
    ec_key = pki.generate_key()
    assert isinstance(ec_key, ec.EllipticCurvePrivateKey)
    assert ec_key.curve.name == "secp256r1"
    rsa_key = pki.generate_key("rsa")
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    assert rsa_key.key_size == 2048


def test_pem_round_trips() -> None:
    ca_cert, ca_key = make_ca()
    assert x509.load_pem_x509_certificate(pki.cert_pem(ca_cert)) == ca_cert
    key = serialization.load_pem_private_key(pki.key_pem(ca_key), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == ca_key.public_key().public_numbers()
    public = serialization.load_pem_public_key(pki.public_key_pem(ca_key))
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert public.public_numbers() == ca_key.public_key().public_numbers()
