"""Mutual TLS between replicators: the replication's CA and the expected node, nothing less."""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Callable

import pytest
from xenha_agent.tls import (
    NeedMoreData,
    NotClientHello,
    PeerRejected,
    ServerContexts,
    TlsMaterial,
    client_context,
    client_hello_server_name,
    server_context,
    server_name,
    uid_from_server_name,
    verify_peer,
)

from .certs import NodeCert, TestCA

UID = "6f1c0d2e-0000-4000-8000-000000000001"
OTHER_UID = "6f1c0d2e-0000-4000-8000-000000000002"


def material(cert: NodeCert) -> TlsMaterial:
    return TlsMaterial(cert.ca_pem, cert.cert_pem, cert.key_pem)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("replication-1")


@pytest.fixture(scope="module")
def other_ca() -> TestCA:
    return TestCA("replication-2")


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    sni: str,
    *,
    server_check: Callable[[ssl.SSLSocket], None] = lambda s: None,
    client_check: Callable[[ssl.SSLSocket], None] = lambda s: None,
) -> tuple[BaseException | None, BaseException | None]:
    """Run both sides over a socketpair; return (server error, client error)."""
    a, b = socket.socketpair()
    errors: dict[str, BaseException | None] = {"server": None, "client": None}

    def serve() -> None:
        s = None
        try:
            s = server_ctx.wrap_socket(a, server_side=True)
            server_check(s)
            s.sendall(b"ok")
        except BaseException as e:
            errors["server"] = e
        finally:
            # wrap_socket took over a's descriptor: close whichever object holds it.
            (s or a).close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        c = client_ctx.wrap_socket(b, server_hostname=sni)
        client_check(c)
        assert c.recv(2) == b"ok"
        c.close()
    except BaseException as e:
        errors["client"] = e
        b.close()
    thread.join(10)
    return errors["server"], errors["client"]


def test_server_name_is_the_uid_under_xenha():
    assert server_name(UID) == f"{UID}.xenha"
    assert uid_from_server_name(f"{UID}.xenha") == UID
    assert uid_from_server_name("example.com") is None
    assert uid_from_server_name(None) is None
    assert uid_from_server_name("../etc.xenha") is None
    with pytest.raises(ValueError, match="server name"):
        server_name("a/b")


def test_peers_with_certs_of_the_same_replication_authenticate_each_other(ca):
    a, b = ca.issue("xen-a"), ca.issue("xen-b")
    err = handshake(
        server_context(material(b), UID),
        client_context(material(a)),
        server_name(UID),
        server_check=lambda s: verify_peer(s, "xen-a"),
        client_check=lambda c: verify_peer(c, "xen-b"),
    )
    assert err == (None, None)


def test_tls_13_is_the_only_version_spoken(ca):
    ctx = client_context(material(ca.issue("xen-a")))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3


def test_a_client_cert_from_another_replications_ca_is_refused(ca, other_ca):
    server_err, client_err = handshake(
        server_context(material(ca.issue("xen-b")), UID),
        client_context(material(other_ca.issue("xen-a"))),
        server_name(UID),
    )
    assert isinstance(server_err, ssl.SSLError)
    assert client_err is not None


def test_a_server_cert_from_another_replications_ca_is_refused(ca, other_ca):
    # The client trusts replication 1's CA; the server answers with replication 2's cert.
    client = material(ca.issue("xen-a"))
    _server_err, client_err = handshake(
        server_context(material(other_ca.issue("xen-b")), UID),
        client_context(client),
        server_name(UID),
    )
    assert isinstance(client_err, ssl.SSLCertVerificationError)


def test_a_valid_cert_that_names_another_node_is_refused(ca):
    imposter = ca.issue("xen-c")
    server_err, _ = handshake(
        server_context(material(ca.issue("xen-b")), UID),
        client_context(material(imposter)),
        server_name(UID),
        server_check=lambda s: verify_peer(s, "xen-a"),
    )
    assert isinstance(server_err, PeerRejected)
    assert "xen-a" in str(server_err)


@pytest.mark.parametrize(
    ("common_name", "dns_names"),
    [("xen-a", []), ("someone", ["xen-a"]), ("xen-a", ["xen-a", "xen-a.example"])],
)
def test_the_node_may_be_named_by_cn_or_by_dns_san(ca, common_name, dns_names):
    cert = ca.issue("xen-a", common_name=common_name, dns_names=dns_names)
    err = handshake(
        server_context(material(ca.issue("xen-b")), UID),
        client_context(material(cert)),
        server_name(UID),
        server_check=lambda s: verify_peer(s, "xen-a"),
    )
    assert err == (None, None)


def test_the_server_context_refuses_an_sni_for_another_replication(ca):
    server_err, client_err = handshake(
        server_context(material(ca.issue("xen-b")), UID),
        client_context(material(ca.issue("xen-a"))),
        server_name(OTHER_UID),
    )
    assert server_err is not None
    assert client_err is not None


def test_one_endpoint_serves_two_replications_each_with_its_own_ca(ca, other_ca):
    contexts = ServerContexts()
    contexts.add(UID, material(ca.issue("xen-b")))
    contexts.add(OTHER_UID, material(other_ca.issue("xen-b")))
    seen: list[str] = []

    def server_check(s: ssl.SSLSocket) -> None:
        verify_peer(s, "xen-a")
        seen.append(str(s.context.get_ca_certs()[0]["subject"]))

    for uid, issuer in ((UID, ca), (OTHER_UID, other_ca)):
        err = handshake(
            contexts.context,
            client_context(material(issuer.issue("xen-a"))),
            server_name(uid),
            server_check=server_check,
            client_check=lambda c: verify_peer(c, "xen-b"),
        )
        assert err == (None, None)
    assert "replication-1" in seen[0]
    assert "replication-2" in seen[1]


def test_the_shared_endpoint_checks_the_client_against_the_chosen_replications_ca(ca, other_ca):
    # SNI says replication 1, but the client's cert comes from replication 2's CA.
    contexts = ServerContexts()
    contexts.add(UID, material(ca.issue("xen-b")))
    contexts.add(OTHER_UID, material(other_ca.issue("xen-b")))
    client = other_ca.issue("xen-a")
    client_trusting_both = TlsMaterial(ca.pem + other_ca.pem, client.cert_pem, client.key_pem)
    server_err, _ = handshake(
        contexts.context, client_context(client_trusting_both), server_name(UID)
    )
    assert isinstance(server_err, ssl.SSLError)


def test_the_shared_endpoint_refuses_unknown_sni(ca):
    contexts = ServerContexts()
    contexts.add(UID, material(ca.issue("xen-b")))
    server_err, client_err = handshake(
        contexts.context, client_context(material(ca.issue("xen-a"))), server_name(OTHER_UID)
    )
    assert server_err is not None
    assert client_err is not None


def test_material_repr_never_shows_the_key(ca):
    cert = ca.issue("xen-a")
    text = repr(material(cert))
    assert "PRIVATE KEY" not in text
    assert cert.key_pem.decode() not in text


def test_material_is_loaded_without_writing_the_key_anywhere(ca, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    client_context(material(ca.issue("xen-a")))
    assert list(tmp_path.iterdir()) == []


def test_a_broken_ca_bundle_is_an_ssl_error(ca):
    cert = ca.issue("xen-a")
    with pytest.raises(ssl.SSLError, match="CA"):
        client_context(TlsMaterial(b"not a pem", cert.cert_pem, cert.key_pem))


# --- SNI peeked from a ClientHello ------------------------------------------------------------


def client_hello(sni: str | None) -> bytes:
    """The first flight a real ssl client sends."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_the_sni_is_read_from_a_clienthello_without_consuming_it():
    hello = client_hello(server_name(UID))
    assert client_hello_server_name(hello) == f"{UID}.xenha"
    assert client_hello_server_name(client_hello(None)) is None


def test_a_partial_clienthello_asks_for_more():
    hello = client_hello(server_name(UID))
    for cut in (0, 3, 5, 40, len(hello) - 1):
        with pytest.raises(NeedMoreData):
            client_hello_server_name(hello[:cut])


@pytest.mark.parametrize(
    "data",
    [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x04\x02\x00\x00\x00"],
)
def test_something_else_than_a_clienthello_is_refused(data):
    with pytest.raises(NotClientHello):
        client_hello_server_name(data)


def test_a_clienthello_split_over_two_records_is_reassembled():
    hello = client_hello(server_name(UID))
    body = hello[5:]
    half = len(body) // 2
    split = (
        b"\x16\x03\x01"
        + half.to_bytes(2, "big")
        + body[:half]
        + b"\x16\x03\x01"
        + (len(body) - half).to_bytes(2, "big")
        + body[half:]
    )
    assert client_hello_server_name(split) == f"{UID}.xenha"


def test_material_from_the_operators_issuer_authenticates_both_nodes():
    # What the agents get from the `<xr>-tls` Secret in production.
    from datetime import UTC, datetime, timedelta

    from xenha_operator.certs import plan_tls

    plan = plan_tls(
        ca_data=None,
        tls_data=None,
        nodes=["xen-a", "xen-b"],
        ca_name="db1",
        now=datetime.now(UTC),
        cert_validity=timedelta(hours=1),
        ca_validity=timedelta(days=1),
        renew_fraction=0.3,
    )
    data = plan.tls_data

    def node(name: str) -> TlsMaterial:
        return TlsMaterial(data["ca.crt"], data[f"{name}.crt"], data[f"{name}.key"])

    err = handshake(
        server_context(node("xen-b"), UID),
        client_context(node("xen-a")),
        server_name(UID),
        server_check=lambda s: verify_peer(s, "xen-a"),
        client_check=lambda c: verify_peer(c, "xen-b"),
    )
    assert err == (None, None)
