"""The CEL rules in the CRD and the pydantic validator break on exactly the same specs.

Runs the CRD's own CEL text (with cel-python) on what the API server would evaluate: the
spec after the CRD schema's defaults. cel-python is a dev dependency; the API-server run of
the corpus checks the same thing against the real evaluator.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterator
from typing import Any

import celpy
import pytest
from celpy.adapter import json_to_cel

from xenha.api import SPEC_RULES, Rule, crd
from xenha.api.corpus import CorpusCase, load_corpus, pydantic_errors

SPEC_SCHEMA = crd.xenreplication_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
    "properties"
]["spec"]


def with_schema_defaults(value: Any, schema: dict[str, Any]) -> Any:
    """Structural defaulting as the API server does it: fill absent fields, then descend."""
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    out = dict(value)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = with_schema_defaults(out[name], sub)
    return out


@pytest.fixture(scope="module")
def programs() -> list[tuple[Rule, Any]]:
    env = celpy.Environment()
    compiled = []
    for validation, rule in zip(SPEC_SCHEMA["x-kubernetes-validations"], SPEC_RULES, strict=True):
        compiled.append((rule, env.program(env.compile(validation["rule"]))))
    return compiled


def cel_broken(spec: dict[str, Any], programs: list[tuple[Rule, Any]]) -> set[str]:
    activation = {"self": json_to_cel(with_schema_defaults(spec, SPEC_SCHEMA))}
    return {rule.name for rule, program in programs if not bool(program.evaluate(activation))}


def pydantic_broken(spec: dict[str, Any]) -> set[str] | None:
    """Rules pydantic reports as broken; None when it also found a non-rule (schema) error."""
    by_error = {(rule.api_field, rule.message): rule.name for rule in SPEC_RULES}
    errors = pydantic_errors(spec)
    names = {by_error.get((error.field, error.message)) for error in errors}
    if None in names:
        return None
    return {name for name in names if name is not None}


def flag_combinations() -> Iterator[dict[str, Any]]:
    absent = object()
    for mode, interval, compression, allow, blackhole, no_net, no_disk, proxy in itertools.product(
        ("colo", "remus"),
        (absent, 100),
        (absent, True, False),
        (absent, True),
        (absent, True),
        (absent, True),
        (absent, True),
        (absent, True),
    ):
        spec: dict[str, Any] = {
            "domain": "db1",
            "mode": mode,
            "primaryNode": "xen-a",
            "secondaryNode": "xen-b",
        }
        checkpoint = {"intervalMs": interval, "compression": compression}
        unsafe = {
            "allow": allow,
            "blackhole": blackhole,
            "disableNetworkBuffering": no_net,
            "disableDiskReplication": no_disk,
        }
        for key, group in (("checkpoint", checkpoint), ("unsafe", unsafe)):
            present = {k: v for k, v in group.items() if v is not absent}
            if present:
                spec[key] = present
        if proxy is not absent:
            spec["colo"] = {"userspaceProxy": proxy}
        yield spec


def identity_combinations() -> Iterator[dict[str, Any]]:
    for domain, secondary in itertools.product(
        ("db1", "42", "Domain-0", "db1--incoming", "1a"), ("xen-a", "xen-b")
    ):
        yield {
            "domain": domain,
            "mode": "remus",
            "primaryNode": "xen-a",
            "secondaryNode": secondary,
        }


def test_cel_and_pydantic_agree_on_every_combination_of_flags(
    programs: list[tuple[Rule, Any]],
) -> None:
    disagreements = []
    broken_somewhere: set[str] = set()
    for spec in [*flag_combinations(), *identity_combinations()]:
        by_pydantic = pydantic_broken(spec)
        assert by_pydantic is not None, spec
        by_cel = cel_broken(spec, programs)
        broken_somewhere |= by_cel
        if by_cel != by_pydantic:
            disagreements.append((spec, sorted(by_cel), sorted(by_pydantic)))
    assert disagreements == []
    # The sweep is only worth something if it made every rule fire at least once.
    assert broken_somewhere == {rule.name for rule in SPEC_RULES}


# Cases with a schema-level error are left out: the API server does not reach CEL for most
# of those, and pydantic checks cross-field rules only on otherwise valid specs.
RULE_LEVEL_CASES = [case for case in load_corpus() if pydantic_broken(case.spec) is not None]


@pytest.mark.parametrize("case", RULE_LEVEL_CASES, ids=lambda case: case.name)
def test_cel_and_pydantic_agree_on_the_corpus(
    case: CorpusCase, programs: list[tuple[Rule, Any]]
) -> None:
    assert cel_broken(case.spec, programs) == pydantic_broken(case.spec)


def test_static_defaults_do_not_trip_any_rule(programs: list[tuple[Rule, Any]]) -> None:
    # The schema defaults every unsafe flag to false and colo.userspaceProxy to false, also
    # for COLO and Remus respectively: the rules must read them as "not asked for".
    for mode in ("colo", "remus"):
        spec = {"domain": "db1", "mode": mode, "primaryNode": "xen-a", "secondaryNode": "xen-b"}
        defaulted = with_schema_defaults(spec, SPEC_SCHEMA)
        assert defaulted["unsafe"]["blackhole"] is False
        assert cel_broken(spec, programs) == set()
