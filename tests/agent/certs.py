"""Test certificate authority: mints a per-replication CA and node certificates.

Production material comes from the operator's issuer; these helpers only make the same
shape (a CA, one cert per node naming the node in CN and SAN DNS) for tests and benches.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from xenha import pki

#: Certificates start this long before "now", as the operator's do.
BACKDATE = datetime.timedelta(minutes=5)
#: Far longer than any test or bench run.
VALIDITY = datetime.timedelta(days=1)


@dataclass(frozen=True)
class NodeCert:
    """PEM material one node holds for one replication."""

    node: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: Path) -> tuple[Path, Path, Path]:
        """Write ca/cert/key files (key 0600); returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        ca = directory / "ca.crt"
        cert = directory / f"{self.node}.crt"
        key = directory / f"{self.node}.key"
        ca.write_bytes(self.ca_pem)
        cert.write_bytes(self.cert_pem)
        key.touch(mode=0o600)
        key.write_bytes(self.key_pem)
        return ca, cert, key


class TestCA:
    """A CA as the operator issues one per replication."""

    __test__ = False  # not a pytest test class

    def __init__(self, name: str = "xenha-test-ca") -> None:
        self.key = pki.generate_key()
        now = datetime.datetime.now(datetime.UTC)
        self.cert = pki.self_signed_ca(
            self.key, pki.name(name), not_before=now - BACKDATE, not_after=now + VALIDITY
        )
        self.pem = pki.cert_pem(self.cert)

    def issue(
        self, node: str, *, common_name: str | None = None, dns_names: list[str] | None = None
    ) -> NodeCert:
        """A node certificate; by default CN and SAN DNS both name the node."""
        key = pki.generate_key()
        now = datetime.datetime.now(datetime.UTC)
        cert = pki.issue_leaf(
            self.cert,
            self.key,
            key.public_key(),
            pki.name(common_name if common_name is not None else node),
            not_before=now - BACKDATE,
            not_after=now + VALIDITY,
            dns_names=dns_names if dns_names is not None else [node],
            server=True,
            client=True,
        )
        return NodeCert(
            node=node, ca_pem=self.pem, cert_pem=pki.cert_pem(cert), key_pem=pki.key_pem(key)
        )
