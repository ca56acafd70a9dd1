"""The build/cache layer, without building anything."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from xenha.controlplane import build


def test_cache_root_prefers_xenha_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XENHA_CACHE", str(tmp_path / "mine"))
    assert build.cache_root() == tmp_path / "mine"


def test_cache_root_honours_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XENHA_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert build.cache_root() == tmp_path / "xdg" / "xenha"


def test_cache_root_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("XENHA_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert build.cache_root() == tmp_path / ".cache" / "xenha"


def test_every_component_is_keyed_by_its_version(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XENHA_CACHE", str(tmp_path))
    components = build.load_components()
    assert set(components) >= {"kube", "etcd", "helm"}
    for component in components.values():
        assert component.bin_dir() == tmp_path / "bin" / f"{component.name}-{component.version}"
    every = {b for c in components.values() for b in c.binaries}
    assert every >= {*build.CONTROL_PLANE, "helm"}


@pytest.mark.parametrize("name", ["kube", "etcd", "helm"])
def test_go_mod_agrees_with_versions_json(name: str) -> None:
    component = build.load_components()[name]
    build.check_pins(component)
    assert (component.source_dir / "go.sum").stat().st_size > 0


def _copy_tools(tmp_path: Path) -> Path:
    tools = tmp_path / "tools"
    shutil.copytree(build.tools_dir(), tools)
    return tools


def test_pin_drift_is_refused(tmp_path: Path) -> None:
    tools = _copy_tools(tmp_path)
    versions = json.loads((tools / "versions.json").read_text())
    versions["etcd"]["version"] = "v3.6.0"
    (tools / "versions.json").write_text(json.dumps(versions))
    with pytest.raises(build.BuildError, match=r"versions\.json says v3\.6\.0"):
        build.check_pins(build.load_components(tools)["etcd"])


def test_staging_replace_drift_is_refused(tmp_path: Path) -> None:
    tools = _copy_tools(tmp_path)
    gomod = tools / "kube" / "go.mod"
    text = gomod.read_text()
    kube = build.load_components(tools)["kube"]
    staging = "v0." + kube.version.split(".", 1)[1]
    gomod.write_text(
        text.replace(f"k8s.io/api => k8s.io/api {staging}", "k8s.io/api => k8s.io/api v0.1.0")
    )
    with pytest.raises(build.BuildError, match=r"k8s\.io/api"):
        build.check_pins(kube)


def _fake_build(component: build.Component, cache: Path) -> None:
    directory = component.bin_dir(cache)
    directory.mkdir(parents=True)
    for binary in component.binaries:
        (directory / binary).write_text("#!/bin/sh\n")
        (directory / binary).chmod(0o755)
    stamp = {"version": component.version, "inputs": build.inputs_digest(component)}
    (directory / build.STAMP).write_text(json.dumps(stamp))


def test_cache_hit_and_invalidation(tmp_path: Path) -> None:
    tools = _copy_tools(tmp_path)
    cache = tmp_path / "cache"
    etcd = build.load_components(tools)["etcd"]
    assert not build.cached(etcd, cache)
    _fake_build(etcd, cache)
    assert build.cached(etcd, cache)
    # Same version, different dependency pins: not the binary we have.
    with (tools / "etcd" / "go.sum").open("a") as handle:
        handle.write("example.com/x v1.0.0 h1:AAAA=\n")
    assert not build.cached(etcd, cache)


def test_missing_binaries_without_build_name_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("XENHA_CACHE", str(tmp_path))
    with pytest.raises(build.MissingBinaryError, match="xenha controlplane build"):
        build.ensure(build.CONTROL_PLANE, build=False)


@pytest.mark.parametrize(("value", "allowed"), [("true", False), ("1", False), ("", True)])
def test_ci_forbids_on_demand_builds(
    monkeypatch: pytest.MonkeyPatch, value: str, allowed: bool
) -> None:
    monkeypatch.setenv("CI", value)
    assert build.build_allowed() is allowed


def test_ci_fails_rather_than_skips_without_binaries(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["xenha.testing.fixtures"]\n')
    (tmp_path / "test_needs_cluster.py").write_text("def test_it(control_plane):\n    pass\n")
    repo = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        CI="true",
        XENHA_CACHE=str(tmp_path / "empty-cache"),
        PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout
    assert "skipped" not in result.stdout
    assert "xenha controlplane build" in result.stdout


def test_staging_replace_block_points_at_published_releases() -> None:
    upstream = (
        "module k8s.io/kubernetes\n\nreplace (\n"
        "\tk8s.io/api => ./staging/src/k8s.io/api\n"
        "\tk8s.io/client-go => ./staging/src/k8s.io/client-go\n)\n"
    )
    assert build.staging_replace_block(upstream, "v1.38.1") == (
        "replace (\n"
        "\tk8s.io/api => k8s.io/api v0.38.1\n"
        "\tk8s.io/client-go => k8s.io/client-go v0.38.1\n)"
    )
    with pytest.raises(build.BuildError):
        build.staging_replace_block("module k8s.io/kubernetes\n", "v1.38.1")
