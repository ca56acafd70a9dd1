"""`xenha validate` and `xenha crd generate`, as a person runs them."""

from __future__ import annotations

from pathlib import Path

import pytest

from xenha.api.cli import validate_main
from xenha.api.crd import crd_main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

BROKEN = """\
apiVersion: v1
kind: ConfigMap
metadata: {name: ignored}
---
apiVersion: xenha.io/v1alpha1
kind: XenReplication
metadata: {name: db1}
spec: {domain: db1, mode: colo, primaryNode: xen-a, secondaryNode: xen-b,
       checkpoint: {intervalMs: 100}}
"""


def test_validate_prints_the_xl_lines_of_a_valid_manifest(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert validate_main([str(EXAMPLES / "xenreplication-remus.yaml"), "--transport", "pipe"]) == 0
    out = capsys.readouterr().out
    assert "XenReplication web1: valid" in out
    assert "xen-a: xl remus -i 100 -s '' web1 pipe" in out
    assert "xen-b: xl migrate-receive -r -e" in out


def test_validate_names_field_and_rule_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = tmp_path / "db1.yaml"
    manifest.write_text(BROKEN)
    assert validate_main([str(manifest)]) == 1
    out = capsys.readouterr().out
    assert "XenReplication db1: invalid" in out
    assert "spec.checkpoint.intervalMs: COLO takes no checkpoint interval" in out
    assert "ignored" not in out


def test_crd_generate_check_passes_on_this_checkout(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd_main(["generate", "--check"]) == 0
    assert capsys.readouterr().err == ""


def test_crd_without_generate_shows_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert crd_main([]) == 2
    assert "usage: xenha crd generate" in capsys.readouterr().err
