"""The project's CRDs (crds/) on a real apiserver: they install, become Established, and
`kubectl get xr` answers with the printer columns the CRD promises."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from xenha.controlplane.cluster import ControlPlane
from xenha.testing.fixtures import NodeFactory

CRDS = Path(__file__).resolve().parents[2] / "crds"
XR_CRD = CRDS / "xenreplications.xenha.io.yaml"

pytestmark = pytest.mark.integration


def crd_documents() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(CRDS.glob("*.yaml")):
        docs.extend(
            d
            for d in yaml.safe_load_all(path.read_text())
            if isinstance(d, dict) and d.get("kind") == "CustomResourceDefinition"
        )
    return docs


@pytest.fixture(scope="module")
def installed_crds(control_plane: ControlPlane) -> list[dict[str, Any]]:
    docs = crd_documents()
    assert docs, f"no CustomResourceDefinition in {CRDS}"
    # As a user (or Helm, or Argo CD) would: apply the files, wait for Established.
    control_plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    names = [f"crd/{d['metadata']['name']}" for d in docs]
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=180s", *names, timeout=240
    )
    # Left installed: later tests in the session (operator, agents) work against them.
    return docs


def test_crds_are_established(
    control_plane: ControlPlane, installed_crds: list[dict[str, Any]]
) -> None:
    for doc in installed_crds:
        name = doc["metadata"]["name"]
        live = json.loads(control_plane.kubectl("get", "crd", name, "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in live["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NamesAccepted") == "True", (name, conditions)


def _xr_crd(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return next(d for d in docs if d["metadata"]["name"] == "xenreplications.xenha.io")


def test_kubectl_get_xr_shows_printer_columns(
    control_plane: ControlPlane,
    installed_crds: list[dict[str, Any]],
    namespace: str,
    register_nodes: NodeFactory,
) -> None:
    crd = _xr_crd(installed_crds)
    assert "xr" in crd["spec"]["names"].get("shortNames", [])
    served = next(v for v in crd["spec"]["versions"] if v.get("storage"))
    columns = [c["name"] for c in served.get("additionalPrinterColumns", [])]
    assert columns, "the XenReplication CRD declares no printer columns"
    default_columns = [
        c["name"] for c in served["additionalPrinterColumns"] if not c.get("priority")
    ]

    register_nodes(["xen-a", "xen-b"], labels={"xenha.io/xen": "true"})
    # The smallest spec the design documents.
    obj = {
        "apiVersion": f"{crd['spec']['group']}/{served['name']}",
        "kind": "XenReplication",
        "metadata": {"name": "db1", "namespace": namespace},
        "spec": {"domain": "db1", "mode": "colo", "primaryNode": "xen-a", "secondaryNode": "xen-b"},
    }
    control_plane.kubectl("apply", "-f", "-", input=yaml.safe_dump(obj))

    def header(*extra: str) -> tuple[str, str]:
        lines = control_plane.kubectl("get", "xr", "-n", namespace, *extra).stdout.splitlines()
        assert len(lines) == 2, lines
        return lines[0], lines[1]

    head, row = header()
    assert row.startswith("db1 ")
    expected = ["NAME", *(c.upper() for c in default_columns)]
    # Column titles may contain spaces, so match them in order rather than by splitting.
    assert re.fullmatch(r"\s*".join(re.escape(c) for c in expected) + r"\s*", head), head
    wide, _ = header("-o", "wide")
    for column in columns:
        assert column.upper() in wide, (column, wide)
