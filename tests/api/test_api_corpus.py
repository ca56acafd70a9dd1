"""The spec corpus against the pydantic models, and the judge the API-server run will use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xenha.api import SPEC_RULES
from xenha.api.corpus import (
    CorpusCase,
    CorpusError,
    FieldError,
    api_server_errors,
    load_corpus,
    pydantic_errors,
    verdict,
)

CASES = load_corpus()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_pydantic_gives_the_corpus_verdict(case: CorpusCase) -> None:
    problem = verdict(case, pydantic_errors(case.spec), "pydantic")
    assert problem is None, problem


def test_corpus_is_large_and_has_both_outcomes() -> None:
    assert len(CASES) >= 30
    assert sum(case.valid for case in CASES) >= 10
    assert sum(not case.valid for case in CASES) >= 10


def test_every_cross_field_rule_is_broken_by_some_case() -> None:
    for rule in SPEC_RULES:
        assert any(
            not case.valid
            and case.field == rule.api_field
            and case.messages["apiserver"].lower() in rule.message.lower()
            for case in CASES
        ), f"no corpus case breaks rule {rule.name}"


def test_every_case_name_can_be_an_object_name() -> None:
    manifest = CASES[0].manifest("corpus")
    assert manifest["metadata"] == {"name": CASES[0].name, "namespace": "corpus"}
    assert manifest["kind"] == "XenReplication"
    assert manifest["spec"] is CASES[0].spec


# ---- the judge -------------------------------------------------------------------------------

COLO_INTERVAL = next(case for case in CASES if case.name == "colo-with-interval")
UNKNOWN_MODE = next(case for case in CASES if case.name == "unknown-mode")
UNKNOWN_FIELD = next(case for case in CASES if case.name == "unknown-field")
VALID = next(case for case in CASES if case.valid)


def status(message: str, causes: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """A Kubernetes Status body as the API server answers a rejected create."""
    body: dict[str, Any] = {"kind": "Status", "status": "Failure", "message": message}
    if causes is not None:
        body.update(reason="Invalid", code=422, details={"causes": causes})
    else:
        body.update(reason="BadRequest", code=400)
    return body


CEL_ANSWER = status(
    'XenReplication.xenha.io "colo-with-interval" is invalid: spec.checkpoint.intervalMs: '
    "Forbidden: COLO takes no checkpoint interval (xl remus -c conflicts with -i): "
    "remove checkpoint.intervalMs",
    [
        {
            "reason": "FieldValueForbidden",
            "field": "spec.checkpoint.intervalMs",
            "message": "Forbidden: COLO takes no checkpoint interval (xl remus -c conflicts "
            "with -i): remove checkpoint.intervalMs",
        }
    ],
)


def test_api_server_cel_answer_meets_the_expectation() -> None:
    assert verdict(COLO_INTERVAL, api_server_errors(CEL_ANSWER), "apiserver") is None


def test_api_server_enum_answer_meets_its_own_expectation() -> None:
    answer = status(
        "...",
        [
            {
                "reason": "FieldValueNotSupported",
                "field": "spec.mode",
                "message": 'Unsupported value: "mirror": supported values: "colo", "remus"',
            }
        ],
    )
    assert verdict(UNKNOWN_MODE, api_server_errors(answer), "apiserver") is None
    # ... and the pydantic wording is judged by the pydantic expectation only.
    assert verdict(UNKNOWN_MODE, api_server_errors(answer), "pydantic") is not None


def test_strict_decoding_error_has_no_cause_and_is_matched_by_its_text() -> None:
    answer = status('strict decoding error: unknown field "spec.checkpointInterval"')
    assert api_server_errors(answer) == [
        FieldError("", 'strict decoding error: unknown field "spec.checkpointInterval"')
    ]
    assert verdict(UNKNOWN_FIELD, api_server_errors(answer), "apiserver") is None


def test_right_message_on_the_wrong_field_does_not_count() -> None:
    errors = [FieldError("spec.checkpoint.compression", COLO_INTERVAL.messages["pydantic"])]
    assert verdict(COLO_INTERVAL, errors, "pydantic") is not None


def test_an_accepted_invalid_spec_and_a_rejected_valid_spec_are_both_reported() -> None:
    assert "accepted" in (verdict(COLO_INTERVAL, [], "pydantic") or "")
    assert "expected valid" in (verdict(VALID, [FieldError("spec", "x")], "apiserver") or "")


# ---- the loader ------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corpus.yaml"
    path.write_text(text)
    return path


SPEC = "{domain: db1, mode: remus, primaryNode: a, secondaryNode: b}"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("cases: {}", "list under 'cases'"),
        (f"cases: [{{name: Bad_Name, expect: valid, spec: {SPEC}}}]", "DNS label"),
        (f"cases: [{{name: a, expect: maybe, spec: {SPEC}}}]", "expect must be"),
        (f"cases: [{{name: a, expect: valid, spec: {SPEC}, mesage: x}}]", "unknown keys"),
        (f"cases: [{{name: a, expect: invalid, spec: {SPEC}, message: x}}]", "needs field"),
        (
            f"cases: [{{name: a, expect: invalid, spec: {SPEC}, field: spec.x, "
            "pydanticMessage: x}]",
            "needs field",
        ),
        (f"cases: [{{name: a, expect: valid, spec: {SPEC}, field: spec.x}}]", "expects no"),
        (
            f"cases: [{{name: a, expect: valid, spec: {SPEC}}}, "
            f"{{name: a, expect: valid, spec: {SPEC}}}]",
            "used twice",
        ),
    ],
)
def test_loader_refuses_a_malformed_corpus(tmp_path: Path, text: str, complaint: str) -> None:
    with pytest.raises(CorpusError, match=complaint):
        load_corpus(write(tmp_path, text))


def test_loader_splits_per_validator_messages(tmp_path: Path) -> None:
    (case,) = load_corpus(
        write(
            tmp_path,
            f"cases: [{{name: a, expect: invalid, spec: {SPEC}, field: spec.mode, "
            "pydanticMessage: p, apiServerMessage: k}]",
        )
    )
    assert case.messages == {"pydantic": "p", "apiserver": "k"}
