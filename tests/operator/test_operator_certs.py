"""Per-replication TLS material (operator/xenha_operator/certs.py)."""

from __future__ import annotations

import ssl
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from xenha_operator.certs import (
    CA_CERT_KEY,
    CA_KEY_KEY,
    TlsPlan,
    agent_role,
    agent_role_binding,
    node_cert_key,
    node_key_key,
    plan_tls,
)
from xenha_operator.owned import Owner

NOW = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def plan(
    nodes: tuple[str, ...] = ("xen-a", "xen-b"),
    previous: TlsPlan | None = None,
    now: datetime = NOW,
) -> TlsPlan:
    return plan_tls(
        ca_data=previous.ca_data if previous else None,
        tls_data=previous.tls_data if previous else None,
        nodes=nodes,
        ca_name="xenha prod/db1",
        now=now,
        cert_validity=7 * DAY,
        ca_validity=365 * DAY,
        renew_fraction=1 / 3,
    )


def cert(data: dict[str, bytes], key: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data[key])


def test_a_node_certificate_verifies_against_the_ca_and_names_the_node() -> None:
    issued = plan()
    ca = cert(issued.tls_data, CA_CERT_KEY)
    for node in ("xen-a", "xen-b"):
        leaf = cert(issued.tls_data, node_cert_key(node))
        leaf.verify_directly_issued_by(ca)
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [node]
        assert leaf.subject.rfc4514_string() == f"CN={node}"
        key = leaf.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        assert key.curve.name == "secp256r1"
        assert leaf.not_valid_after_utc - NOW == 7 * DAY


def test_the_agents_secret_holds_no_ca_key() -> None:
    issued = plan()
    assert CA_KEY_KEY not in issued.tls_data
    assert set(issued.tls_data) == {
        CA_CERT_KEY,
        "xen-a.crt",
        "xen-a.key",
        "xen-b.crt",
        "xen-b.key",
    }
    assert set(issued.ca_data) == {CA_CERT_KEY, CA_KEY_KEY}


def test_nothing_changes_while_certificates_are_young() -> None:
    first = plan()
    again = plan(previous=first, now=NOW + DAY)
    assert not again.changed
    assert again.tls_data == first.tls_data
    # A third of the life before the end (the life includes the backdating).
    assert NOW + 4 * DAY < again.renew_at < NOW + 5 * DAY


def test_node_certificates_renew_when_a_third_of_their_life_is_left() -> None:
    first = plan()
    later = plan(previous=first, now=first.renew_at + timedelta(seconds=1))
    assert later.changed
    assert later.tls_data["xen-a.crt"] != first.tls_data["xen-a.crt"]
    assert later.tls_data[CA_CERT_KEY] == first.tls_data[CA_CERT_KEY]  # same CA


def test_a_new_node_gets_a_certificate_and_a_departed_one_loses_it() -> None:
    first = plan()
    moved = plan(nodes=("xen-b", "xen-c"), previous=first)
    assert moved.changed
    assert "xen-a.crt" not in moved.tls_data
    assert moved.tls_data["xen-b.crt"] == first.tls_data["xen-b.crt"]  # untouched
    cert(moved.tls_data, "xen-c.crt").verify_directly_issued_by(cert(moved.ca_data, CA_CERT_KEY))


def test_a_renewed_ca_stays_trusted_alongside_the_old_one_until_it_expires() -> None:
    first = plan()
    rotation = NOW + 365 * DAY * 2 / 3 + DAY
    rotated = plan(previous=first, now=rotation)
    bundle = x509.load_pem_x509_certificates(rotated.tls_data[CA_CERT_KEY])
    old_ca = cert(first.ca_data, CA_CERT_KEY)
    new_ca = cert(rotated.ca_data, CA_CERT_KEY)
    assert bundle == [new_ca, old_ca]
    cert(rotated.tls_data, "xen-a.crt").verify_directly_issued_by(new_ca)
    # Once the old CA has expired it leaves the bundle.
    after = plan(previous=rotated, now=NOW + 366 * DAY)
    assert x509.load_pem_x509_certificates(after.tls_data[CA_CERT_KEY]) == [new_ca]


def test_garbled_material_is_reissued() -> None:
    first = plan()
    broken = TlsPlan(
        ca_data=first.ca_data,
        tls_data={**first.tls_data, node_key_key("xen-a"): b"not a key"},
        renew_at=first.renew_at,
        changed=False,
    )
    fixed = plan(previous=broken)
    assert fixed.changed
    assert fixed.tls_data["xen-a.crt"] != first.tls_data["xen-a.crt"]


def _context(
    directory: Path, data: dict[str, bytes], node: str, purpose: ssl.Purpose
) -> ssl.SSLContext:
    for name in (CA_CERT_KEY, node_cert_key(node), node_key_key(node)):
        (directory / name).write_bytes(data[name])
    ctx = ssl.create_default_context(purpose, cafile=str(directory / CA_CERT_KEY))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(directory / node_cert_key(node), directory / node_key_key(node))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def test_two_nodes_complete_a_mutual_tls13_handshake_with_pythons_ssl() -> None:
    data = plan(now=datetime.now(UTC)).tls_data
    with tempfile.TemporaryDirectory() as tmp:
        client_ctx = _context(Path(tmp), data, "xen-a", ssl.Purpose.SERVER_AUTH)
        server_ctx = _context(Path(tmp), data, "xen-b", ssl.Purpose.CLIENT_AUTH)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="xen-b")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(10):
        for name, end in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    end.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values())
    assert client.version() == "TLSv1.3"
    peer = server.getpeercert()
    assert peer is not None
    assert ("DNS", "xen-a") in peer["subjectAltName"]


def test_a_node_name_longer_than_a_common_name_lives_in_the_san_alone() -> None:
    node = "xen-" + "a" * 70 + ".example.com"
    leaf = cert(plan(nodes=(node,)).tls_data, node_cert_key(node))
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    assert san.value.get_values_for_type(x509.DNSName) == [node]
    assert len(leaf.subject) == 0


@pytest.mark.parametrize("node", ["xen-a", "node-1.example.com"])
def test_secret_keys_are_valid_kubernetes_data_keys(node: str) -> None:
    import re

    data = plan(nodes=(node,)).tls_data
    assert all(re.fullmatch(r"[-._a-zA-Z0-9]+", key) for key in data)


def test_the_agents_may_get_exactly_their_replications_tls_secret() -> None:
    owner = Owner(namespace="prod", name="db1", uid="u1")
    role = agent_role(owner)
    assert role["metadata"]["name"] == "db1-agent-tls"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["db1-tls"],
            "verbs": ["get"],
        }
    ]
    binding = agent_role_binding(owner, "xenha-agent", "xenha-system")
    assert binding["roleRef"]["name"] == "db1-agent-tls"
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "xenha-agent", "namespace": "xenha-system"}
    ]
    for obj in (role, binding):
        assert obj["metadata"]["ownerReferences"] == [
            {
                "apiVersion": "xenha.io/v1alpha1",
                "kind": "XenReplication",
                "name": "db1",
                "uid": "u1",
                "controller": True,
            }
        ]
