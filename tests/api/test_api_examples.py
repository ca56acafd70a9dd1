"""The example manifests in examples/ are valid and mean what their comments say."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from xenha.api import Mode, XenReplication, sender_argv
from xenha.api.models import REJECT_UNKNOWN

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load(name: str) -> XenReplication:
    document = yaml.safe_load((EXAMPLES / name).read_text(encoding="utf-8"))
    return XenReplication.model_validate(document, context={REJECT_UNKNOWN: True})


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("xenreplication-*.yaml")), ids=str)
def test_example_is_a_valid_xenreplication(path: Path) -> None:
    example = load(path.name)
    assert example.metadata["name"]
    assert "namespace" not in example.metadata  # chosen with kubectl -n


def test_there_is_an_example_per_mode_and_an_unsafe_one() -> None:
    names = {path.name for path in EXAMPLES.glob("xenreplication-*.yaml")}
    assert {
        "xenreplication-colo.yaml",
        "xenreplication-remus.yaml",
        "xenreplication-remus-unsafe.yaml",
    } <= names


def test_colo_example_uses_the_userspace_proxy() -> None:
    spec = load("xenreplication-colo.yaml").spec
    assert spec.mode is Mode.COLO
    assert sender_argv(spec, "pipe")[:4] == ["xl", "remus", "-c", "-p"]


def test_remus_example_checkpoints_every_100ms() -> None:
    spec = load("xenreplication-remus.yaml").spec
    assert sender_argv(spec, "pipe")[:4] == ["xl", "remus", "-i", "100"]


def test_unsafe_example_is_the_run_recorded_on_real_xen() -> None:
    spec = load("xenreplication-remus-unsafe.yaml").spec
    flags = sender_argv(spec, "pipe")[2:-4]
    assert sorted(flags) == sorted(["-F", "-n", "-d", "-i", "500"])
