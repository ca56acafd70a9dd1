"""A simulated host's domains appear in its XenStore as libxl writes them, for pyxs."""

from __future__ import annotations

import pytest
from pyxs import Client

from .simlab import Lab, lab, wait_for

__all__ = ["lab"]

# Starts simulated Xen hosts (processes): see the marker in pyproject.toml.
pytestmark = pytest.mark.integration


def test_domain_entries_follow_create_rename_and_destroy(lab: Lab) -> None:
    host = lab.host("xen-a")
    info = host.create_guest("db1", memory_mib=32, vcpus=2)
    domid, uuid = info["domid"], info["uuid"]
    base = f"/local/domain/{domid}"
    with Client(unix_socket_path=str(host.xenstore_path)) as xs:
        assert xs[f"{base}/name".encode()] == b"db1"
        assert xs[f"{base}/domid".encode()] == str(domid).encode()
        assert xs[f"{base}/vm".encode()] == f"/vm/{uuid}".encode()
        assert xs[f"{base}/memory/target".encode()] == b"32768"
        assert xs[f"{base}/control/shutdown".encode()] == b""
        assert xs[f"{base}/cpu/1/availability".encode()] == b"online"
        assert xs[b"/local/domain/0/name"] == b"Domain-0"

        assert host.xl("rename", "db1", "db2").returncode == 0
        assert xs[f"{base}/name".encode()] == b"db2"
        assert xs[f"/vm/{uuid}/name".encode()] == b"db2"

        assert host.xl("destroy", "db2").returncode == 0
        assert str(domid).encode() not in xs.list(b"/local/domain")


def test_release_domain_fires_for_watchers(lab: Lab) -> None:
    host = lab.host("xen-a")
    host.create_guest("db1")
    with Client(unix_socket_path=str(host.xenstore_path)) as xs:
        monitor = xs.monitor()
        monitor.watch(b"@releaseDomain", b"gone")
        first = next(monitor.wait())  # a watch fires once when set
        assert first.token == b"gone"
        assert host.xl("destroy", "db1").returncode == 0
        event = wait_for(lambda: next(monitor.wait()), 5, "@releaseDomain")
        assert event.path == b"@releaseDomain"
