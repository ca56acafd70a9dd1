"""TLS 1.3 mutual authentication between the two replicators of one replication.

Trust is per replication: each XenReplication has its own CA (the operator's `<xr>-tls`
Secret), so a certificate of one replication is worthless on another's relay. A peer is
accepted only if its certificate chains to *this replication's* CA **and** names the expected
peer node (CN or a DNS SAN equal to the node name). The chain is checked by OpenSSL during the
handshake; the name is checked right after it, before a single frame is exchanged.

The dialer sends SNI `<uid>.xenha`. A node's listener routes on it (see `relay_listener`), and
the server context refuses any other name through its `sni_callback`; `ServerContexts` does
the same for one TLS endpoint serving many replications, swapping in the replication's context.

Both sides run full duplex from two threads (one reads, one writes). That is safe only because
nothing but application records flows after the handshake: TLS 1.3 has no renegotiation, the
server sends no session tickets (`num_tickets = 0`) and nobody requests a key update.

Key material never reaches a log: `TlsMaterial`'s repr omits it, and the key is handed to
OpenSSL through an anonymous memory file, never written to disk.
"""

from __future__ import annotations

import os
import re
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SNI_SUFFIX = ".xenha"
# Kubernetes UIDs are lowercase hex with dashes; leave room for test names, never dots.
_UID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")


class PeerRejected(ssl.SSLError):
    """The peer completed a handshake but is not the node we expect."""


def server_name(uid: str) -> str:
    """The SNI a dialer sends for replication `uid`."""
    if not _UID.match(uid):
        raise ValueError(f"replication uid {uid!r} cannot be used as a TLS server name")
    return uid + SNI_SUFFIX


def uid_from_server_name(name: str | None) -> str | None:
    """The replication uid an SNI names, or None if it is not one of ours."""
    if name is None or not name.endswith(SNI_SUFFIX):
        return None
    uid = name[: -len(SNI_SUFFIX)]
    return uid if _UID.match(uid) else None


@dataclass(frozen=True)
class TlsMaterial:
    """PEM material of one node for one replication: the CA bundle, its cert and key."""

    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes = field(repr=False)

    @classmethod
    def from_files(cls, ca: Path, cert: Path, key: Path) -> TlsMaterial:
        return cls(ca.read_bytes(), cert.read_bytes(), key.read_bytes())


def _load_chain(context: ssl.SSLContext, material: TlsMaterial) -> None:
    # ssl only loads certificates and keys from paths; a memfd is a path that never touches a
    # disk and disappears with its descriptor.
    pem = material.cert_pem.rstrip(b"\n") + b"\n" + material.key_pem
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None:
        fd = memfd("xenha-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            context.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return
    with tempfile.TemporaryDirectory() as private:  # 0700, removed at once
        path = Path(private) / "chain.pem"
        path.touch(mode=0o600)
        path.write_bytes(pem)
        context.load_cert_chain(path)


def _base(context: ssl.SSLContext, material: TlsMaterial) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.maximum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_verify_locations(cadata=material.ca_pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
        raise ssl.SSLError(f"cannot load the replication CA: {e}") from None
    _load_chain(context, material)
    return context


def client_context(material: TlsMaterial) -> ssl.SSLContext:
    """For the dialer. The server's *name* is checked by `verify_peer`, not by hostname
    matching: the SNI names the replication, the certificate names the node."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    return _base(context, material)


def _server(material: TlsMaterial) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.num_tickets = 0
    return _base(context, material)


SniCallback = Callable[[Any, str | None, ssl.SSLContext], int | None]


def server_context(material: TlsMaterial, uid: str) -> ssl.SSLContext:
    """For the accepting replicator of `uid`: refuses a ClientHello naming anything else,
    so a connection routed here by mistake fails in the handshake, not later."""
    context = _server(material)
    expected = server_name(uid)

    def only_this_replication(_conn: Any, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if name != expected:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    context.sni_callback = only_this_replication
    return context


class ServerContexts:
    """One TLS endpoint for many replications: the SNI picks the replication's context.

    The default context has no certificate at all, so a ClientHello whose SNI is unknown (or
    absent) never gets further than an `unrecognized_name` alert. On a known SNI the
    replication's context (its CA, its certificate) replaces it before the server answers.
    """

    def __init__(self) -> None:
        self._contexts: dict[str, ssl.SSLContext] = {}
        # OpenSSL copies the verify mode from the context a connection starts with, so the
        # default must demand a client certificate too; the CA store follows the swap.
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.context.num_tickets = 0
        self.context.sni_callback = self._pick

    def add(self, uid: str, material: TlsMaterial) -> None:
        server_name(uid)  # validates
        self._contexts[uid] = _server(material)

    def remove(self, uid: str) -> None:
        self._contexts.pop(uid, None)

    def _pick(self, conn: Any, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        uid = uid_from_server_name(name)
        chosen = self._contexts.get(uid) if uid is not None else None
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = chosen
        return None


def peer_names(cert: dict[str, Any]) -> set[str]:
    """Node names a verified peer certificate carries: its CNs and DNS SANs."""
    names: set[str] = set()
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    for kind, value in cert.get("subjectAltName", ()):
        if kind == "DNS":
            names.add(value)
    return names


def verify_peer(conn: ssl.SSLSocket | ssl.SSLObject, expected_node: str) -> None:
    """PeerRejected unless the (already chain-verified) peer certificate names the node."""
    cert = conn.getpeercert()
    if not cert:
        raise PeerRejected("peer presented no certificate")
    names = peer_names(cert)
    if expected_node not in names:
        raise PeerRejected(
            f"peer certificate names {sorted(names)}, expected node {expected_node!r}"
        )


# --- SNI from a ClientHello that has not been consumed --------------------------------------


class NeedMoreData(Exception):
    """The bytes seen so far do not yet hold the whole ClientHello."""


class NotClientHello(ValueError):
    pass


_MAX_HELLO = 16 << 10


def client_hello_server_name(data: bytes) -> str | None:
    """The SNI of the ClientHello at the start of `data` (peeked, not consumed).

    NeedMoreData if it is incomplete, NotClientHello if `data` is not a TLS ClientHello;
    None if it carries no server_name extension.
    """
    handshake = bytearray()
    pos = 0
    while True:
        if len(data) < pos + 5:
            raise NeedMoreData
        if data[pos] != 0x16 or data[pos + 1] != 0x03:
            raise NotClientHello("not a TLS handshake record")
        length = int.from_bytes(data[pos + 3 : pos + 5], "big")
        if len(data) < pos + 5 + length:
            raise NeedMoreData
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if len(handshake) >= 4:
            if handshake[0] != 0x01:
                raise NotClientHello("first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > _MAX_HELLO:
                raise NotClientHello("ClientHello too large")
            if len(handshake) >= need:
                return _sni_from_hello(bytes(handshake[4:need]))


def _sni_from_hello(body: bytes) -> str | None:
    try:
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # legacy_session_id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher_suites
        pos += 1 + body[pos]  # legacy_compression_methods
        if pos == len(body):
            return None
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            ext_type = int.from_bytes(body[pos : pos + 2], "big")
            ext_len = int.from_bytes(body[pos + 2 : pos + 4], "big")
            ext = body[pos + 4 : pos + 4 + ext_len]
            pos += 4 + ext_len
            if ext_type != 0:  # server_name
                continue
            p = 2  # server_name_list length
            while p + 3 <= len(ext):
                name_type = ext[p]
                name_len = int.from_bytes(ext[p + 1 : p + 3], "big")
                name = ext[p + 3 : p + 3 + name_len]
                p += 3 + name_len
                if name_type == 0:
                    return name.decode("ascii")
            return None
        return None
    except (IndexError, UnicodeDecodeError):
        raise NotClientHello("malformed ClientHello") from None
