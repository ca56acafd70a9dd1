"""Throwaway PKI for one control plane: a CA, the apiserver's serving certificate, client
certificates, and the ServiceAccount token signing key.

Everything is generated fresh per start and lives only in that start's temporary directory.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from xenha import pki as x509pki
from xenha.pki import PrivateKey as PrivateKey

# The in-cluster names of the apiserver; nothing routes to them here, but a certificate that
# carries them is what a real cluster presents.
SERVING_DNS = (
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path

    def cert_pem(self) -> bytes:
        return self.cert.read_bytes()

    def key_pem(self) -> bytes:
        return self.key.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: KeyPair
    serving: KeyPair
    admin: KeyPair
    controller_manager: KeyPair
    sa_private: Path
    sa_public: Path


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def generate(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    # Backdated so that a clock step between generation and use cannot make it "not yet
    # valid"; a week is far longer than any test run or lab session.
    not_before = now - datetime.timedelta(hours=1)
    not_after = now + datetime.timedelta(days=7)

    # P-256 keys take microseconds to generate where RSA takes tens of milliseconds each.
    ca_key = x509pki.generate_key()
    ca_cert = x509pki.self_signed_ca(
        ca_key,
        x509pki.name("xenha-test-ca"),
        not_before=not_before,
        not_after=not_after,
        path_length=None,
    )
    ca = KeyPair(
        _write(directory / "ca.crt", x509pki.cert_pem(ca_cert)),
        _write(directory / "ca.key", x509pki.key_pem(ca_key), private=True),
    )

    def leaf(
        stem: str,
        subject: x509.Name,
        *,
        server: bool = False,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[x509pki.IPAddress, ...] = (),
    ) -> KeyPair:
        key = x509pki.generate_key()
        cert = x509pki.issue_leaf(
            ca_cert,
            ca_key,
            key.public_key(),
            subject,
            not_before=not_before,
            not_after=not_after,
            dns_names=dns_names,
            ip_addresses=ip_addresses,
            server=server,
            client=not server,
        )
        return KeyPair(
            _write(directory / f"{stem}.crt", x509pki.cert_pem(cert)),
            _write(directory / f"{stem}.key", x509pki.key_pem(key), private=True),
        )

    serving = leaf(
        "apiserver",
        x509pki.name("kube-apiserver"),
        server=True,
        dns_names=SERVING_DNS,
        ip_addresses=(ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.1")),
    )
    # system:masters bypasses authorization entirely, which is what an admin (and a
    # controller-manager that uses its own credentials for every controller) needs.
    admin = leaf("admin", x509pki.name("xenha-admin", "system:masters"))
    kcm = leaf(
        "controller-manager",
        x509pki.name("system:kube-controller-manager", "system:masters"),
    )

    # RSA for the ServiceAccount issuer: RS256 is what every token consumer understands.
    sa_key = x509pki.generate_key("rsa")
    sa_private = _write(directory / "sa.key", x509pki.key_pem(sa_key), private=True)
    sa_public = _write(directory / "sa.pub", x509pki.public_key_pem(sa_key))
    return Pki(ca, serving, admin, kcm, sa_private, sa_public)
