"""The committed CRDs are exactly what the models generate, and the schema is one the API
server takes: structural, every status field declared, XenNode as docs/design.md says."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from xenha.api import SPEC_RULES, XenReplicationStatus, crd

REPO = Path(__file__).resolve().parents[2]


def _rel(path: Path) -> str:
    return str(path.relative_to(REPO))


@pytest.mark.parametrize("path", crd.crd_paths(REPO), ids=_rel)
def test_committed_crd_is_what_the_models_generate(path: Path) -> None:
    expected = crd.rendered_crds()[path.name]
    actual = path.read_text(encoding="utf-8") if path.is_file() else ""
    if actual != expected:
        diff = "".join(
            difflib.unified_diff(
                actual.splitlines(keepends=True),
                expected.splitlines(keepends=True),
                fromfile=f"{_rel(path)} (committed)",
                tofile=f"{_rel(path)} (generated)",
            )
        )
        pytest.fail(f"{_rel(path)} is stale: run `xenha crd generate`\n{diff}")


def test_generation_is_deterministic() -> None:
    assert crd.rendered_crds() == crd.rendered_crds()


def test_write_crds_check_reports_stale_files_and_writes_nothing(tmp_path: Path) -> None:
    assert crd.write_crds(tmp_path, check=True) == crd.crd_paths(tmp_path)
    assert not (tmp_path / "crds").exists()


def test_write_crds_writes_then_has_nothing_left_to_do(tmp_path: Path) -> None:
    assert crd.write_crds(tmp_path, check=False) == crd.crd_paths(tmp_path)
    assert crd.write_crds(tmp_path, check=True) == []
    assert crd.write_crds(tmp_path, check=False) == []


def test_check_names_the_one_file_edited_by_hand(tmp_path: Path) -> None:
    crd.write_crds(tmp_path, check=False)
    edited = tmp_path / "charts/xenha/crds/xennodes.xenha.io.yaml"
    edited.write_text(edited.read_text() + "# hand edit\n")
    assert crd.write_crds(tmp_path, check=True) == [edited]


def test_main_check_exits_nonzero_when_stale(tmp_path: Path) -> None:
    assert crd.main(["--check", "--root", str(tmp_path)]) == 1
    assert crd.main(["--root", str(tmp_path)]) == 0
    assert crd.main(["--check", "--root", str(tmp_path)]) == 0


def test_files_start_with_the_generated_header() -> None:
    for text in crd.rendered_crds().values():
        assert text.startswith("# GENERATED")
        assert "xenha crd generate" in text.split("apiVersion:")[0]


# ---- the schema --------------------------------------------------------------------------------


def _version(doc: dict[str, Any]) -> dict[str, Any]:
    (version,) = doc["spec"]["versions"]
    return version  # type: ignore[no-any-return]


def _schema(doc: dict[str, Any]) -> dict[str, Any]:
    return _version(doc)["schema"]["openAPIV3Schema"]  # type: ignore[no-any-return]


def _nodes(schema: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, schema)]
    for name, sub in schema.get("properties", {}).items():
        found += _nodes(sub, f"{path}.{name}")
    if "items" in schema:
        found += _nodes(schema["items"], f"{path}[]")
    return found


def _field_paths(schema: dict[str, Any]) -> set[str]:
    return {path for path, _ in _nodes(schema) if path}


@pytest.fixture(scope="module", params=sorted(crd.CRDS))
def any_crd(request: pytest.FixtureRequest) -> dict[str, Any]:
    return crd.CRDS[request.param]()


@pytest.fixture(scope="module")
def xr() -> dict[str, Any]:
    return crd.xenreplication_crd()


@pytest.fixture(scope="module")
def xn() -> dict[str, Any]:
    return crd.xennode_crd()


def test_every_schema_node_has_a_type(any_crd: dict[str, Any]) -> None:
    untyped = [path for path, node in _nodes(_schema(any_crd)) if "type" not in node]
    assert untyped == []


def test_no_schema_node_uses_a_non_structural_keyword(any_crd: dict[str, Any]) -> None:
    forbidden = {"anyOf", "oneOf", "allOf", "$ref", "additionalProperties", "title", "nullable"}
    offenders = [
        (path, sorted(forbidden & set(node)))
        for path, node in _nodes(_schema(any_crd))
        if forbidden & set(node)
    ]
    assert offenders == []


def test_status_is_a_subresource(any_crd: dict[str, Any]) -> None:
    assert _version(any_crd)["subresources"] == {"status": {}}


def test_names_scope_and_short_names(xr: dict[str, Any], xn: dict[str, Any]) -> None:
    assert xr["metadata"]["name"] == "xenreplications.xenha.io"
    assert xr["spec"]["scope"] == "Namespaced"
    assert xr["spec"]["names"]["shortNames"] == ["xr"]
    assert xn["metadata"]["name"] == "xennodes.xenha.io"
    assert xn["spec"]["scope"] == "Cluster"
    assert xn["spec"]["names"]["shortNames"] == ["xn"]
    assert xr["spec"]["names"]["categories"] == xn["spec"]["names"]["categories"] == ["xenha"]


def test_every_status_field_of_the_model_is_declared(xr: dict[str, Any]) -> None:
    # kopf's status patches lose any field the schema does not declare (pruning).
    declared = _field_paths(_schema(xr)["properties"]["status"])
    wanted = _field_paths(crd.openapi_schema(XenReplicationStatus, defaults=False))
    assert wanted <= declared
    for name in [
        "phase",
        "activeNode",
        "standbyNode",
        "conditions",
        "observedGeneration",
        "lastCheckpointTime",
        "checkpointsTotal",
        "checkpointIntervalMs",
        "lastPauseMs",
        "bytesPerSecond",
        "lastFailover",
        "message",
        "protectedSince",
        "switchover",
        "leaseHolder",
    ]:
        assert f".{name}" in declared


def test_conditions_follow_kubernetes_conventions(xr: dict[str, Any]) -> None:
    conditions = _schema(xr)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "reason",
        "message",
        "lastTransitionTime",
        "observedGeneration",
    }
    assert set(item["required"]) == {"type", "status", "reason", "message", "lastTransitionTime"}


def test_status_carries_no_defaults(any_crd: dict[str, Any]) -> None:
    status = _schema(any_crd)["properties"]["status"]
    assert [path for path, node in _nodes(status) if "default" in node] == []


def test_mode_dependent_defaults_are_left_out_of_the_schema(xr: dict[str, Any]) -> None:
    checkpoint = _schema(xr)["properties"]["spec"]["properties"]["checkpoint"]["properties"]
    assert "default" not in checkpoint["intervalMs"]
    assert "default" not in checkpoint["compression"]


def test_static_defaults_are_in_the_schema(xr: dict[str, Any]) -> None:
    spec = _schema(xr)["properties"]["spec"]["properties"]
    assert spec["unsafe"]["default"] == {}
    assert spec["unsafe"]["properties"]["allow"]["default"] is False
    assert spec["failover"]["default"] == {}
    assert spec["failover"]["properties"]["automatic"]["default"] is True
    assert spec["failover"]["properties"]["leaseDurationSeconds"]["default"] == 2
    assert spec["suspended"]["default"] is False


def test_every_spec_string_is_bounded_for_the_cel_cost_estimator(xr: dict[str, Any]) -> None:
    spec = _schema(xr)["properties"]["spec"]
    unbounded = [p for p, n in _nodes(spec) if n["type"] == "string" and "maxLength" not in n]
    unbounded = [p for p in unbounded if "enum" not in _node_at(spec, p)]
    assert unbounded == []


def _node_at(schema: dict[str, Any], path: str) -> dict[str, Any]:
    node = schema
    for part in path.strip(".").split("."):
        node = node["properties"][part]
    return node


def test_cel_rules_sit_on_spec_with_a_field_path_that_exists(xr: dict[str, Any]) -> None:
    spec = _schema(xr)["properties"]["spec"]
    validations = spec["x-kubernetes-validations"]
    assert [v["rule"] for v in validations] == [rule.cel for rule in SPEC_RULES]
    assert [v["message"] for v in validations] == [rule.message for rule in SPEC_RULES]
    for validation in validations:
        assert validation["fieldPath"].startswith(".")
        _node_at(spec, validation["fieldPath"])  # raises KeyError when the path is wrong
        assert "\n" not in validation["message"]


def test_no_other_level_carries_cel_rules(any_crd: dict[str, Any]) -> None:
    holders = [p for p, n in _nodes(_schema(any_crd)) if "x-kubernetes-validations" in n]
    assert holders in ([], [".spec"])


def test_xenreplication_printer_columns(xr: dict[str, Any]) -> None:
    columns = _version(xr)["additionalPrinterColumns"]
    wide = [c for c in columns if c.get("priority", 0) == 0]
    assert [(c["name"].upper(), c["type"]) for c in wide] == [
        ("MODE", "string"),
        ("ACTIVE", "string"),
        ("STANDBY", "string"),
        ("PHASE", "string"),
        ("LAST-CHECKPOINT", "date"),
        ("AGE", "date"),
    ]
    assert wide[4]["jsonPath"] == ".status.lastCheckpointTime"


def test_xennode_printer_columns(xn: dict[str, Any]) -> None:
    columns = [c["name"].upper() for c in _version(xn)["additionalPrinterColumns"]]
    assert columns[:3] == ["RELAY", "XEN", "FREE-MEM"]
    assert "HEARTBEAT" in columns


def test_printer_columns_point_at_declared_fields(any_crd: dict[str, Any]) -> None:
    declared = _field_paths(_schema(any_crd))
    for column in _version(any_crd)["additionalPrinterColumns"]:
        if not column["jsonPath"].startswith(".metadata."):
            assert column["jsonPath"] in declared, column


def test_xennode_spec_is_empty_so_the_api_server_prunes_it(xn: dict[str, Any]) -> None:
    spec = _schema(xn)["properties"]["spec"]
    assert spec["type"] == "object"
    assert "properties" not in spec
    # The API server rejects `false` here ("must be true or undefined").
    assert "x-kubernetes-preserve-unknown-fields" not in spec


def _design_xennode_example() -> dict[str, Any]:
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    section = design.split("### XenNode.status", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert match, "docs/design.md lost its XenNode.status example"
    return yaml.safe_load(match.group(1))["status"]  # type: ignore[no-any-return]


def _example_paths(value: Any, path: str = "") -> set[str]:
    if isinstance(value, dict):
        found = {path} if path else set()
        for key, sub in value.items():
            found |= _example_paths(sub, f"{path}.{key}")
        return found
    if isinstance(value, list):
        return {path} | set().union(*(_example_paths(v, f"{path}[]") for v in value))
    return {path}


def test_xennode_status_has_exactly_the_fields_of_the_design(xn: dict[str, Any]) -> None:
    status = _schema(xn)["properties"]["status"]
    assert _field_paths(status) == _example_paths(_design_xennode_example())


def test_xennode_enums_are_those_of_the_design(xn: dict[str, Any]) -> None:
    example = _design_xennode_example()["replications"][0]
    item = _schema(xn)["properties"]["status"]["properties"]["replications"]["items"]
    for name in ("role", "state"):
        assert item["properties"][name]["enum"] == example[name].split(" | ")
