"""The whole spec corpus against the real kube-apiserver, the way a user meets it.

Every case is sent with `kubectl apply --dry-run=server --validate=strict`: valid specs are
accepted, invalid ones are refused with the same field and words the pydantic models use
(tests/api runs the same corpus against the models). What kubectl prints is what a person
reads, so the expectation is matched against kubectl's own output.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from xenha.api.corpus import CorpusCase, FieldError, load_corpus, verdict
from xenha.controlplane.cluster import ControlPlane

CRDS = Path(__file__).resolve().parents[2] / "crds"
CASES = load_corpus()

pytestmark = pytest.mark.integration

# kubectl prints one cause per line as "* spec.x: message", or a single cause inline after
# 'is invalid: '.
_CAUSE = re.compile(r"(?:^\*\s*|is invalid: )(?P<field>spec(?:\.[\w\[\]]+)*): (?P<message>.*)$")


def kubectl_errors(stderr: str) -> list[FieldError]:
    errors = [
        FieldError(m["field"], m["message"])
        for line in stderr.splitlines()
        if (m := _CAUSE.search(line.strip()))
    ]
    return errors or [FieldError("", stderr.strip())]


@pytest.fixture(scope="module")
def crds_installed(control_plane: ControlPlane) -> None:
    control_plane.kubectl("apply", "--server-side", "-f", str(CRDS))
    control_plane.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=180s",
        "crd/xenreplications.xenha.io",
        timeout=240,
    )


def test_the_corpus_is_large_enough_to_mean_something() -> None:
    assert len(CASES) >= 30
    assert any(c.valid for c in CASES)
    assert sum(not c.valid for c in CASES) >= 15


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_api_server_gives_the_corpus_verdict(
    case: CorpusCase, control_plane: ControlPlane, crds_installed: None, namespace: str
) -> None:
    result = control_plane.kubectl(
        "apply",
        "--dry-run=server",
        "--validate=strict",
        "-f",
        "-",
        input=yaml.safe_dump(case.manifest(namespace)),
        check=False,
    )
    errors = [] if result.returncode == 0 else kubectl_errors(result.stderr)
    problem = verdict(case, errors, "apiserver")
    assert problem is None, f"{problem}\nkubectl said:\n{result.stderr}"
