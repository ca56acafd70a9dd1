"""The spec corpus: specs with the verdict every validator of the API must give.

`tests/api/corpus.yaml` (its header documents the format) is run twice: against the pydantic
models (`pydantic_errors`) and against a real kube-apiserver with server-side dry run
(`api_server_errors` turns the answer into the same shape). `verdict` judges both alike:

- `expect: valid` -> no error at all;
- `expect: invalid` -> at least one error whose field is `field` and whose message contains
  the expected text, case-insensitively. The expected text is `message`, or per validator
  `pydanticMessage` / `apiServerMessage` where the two phrase a schema error differently
  (pydantic "Input should be 'colo' or 'remus'" vs. the API server's
  `Unsupported value: "foo": supported values: "colo", "remus"`). Other errors may come along
  (the API server adds "some validation rules were not checked ..." after schema errors).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from xenha.api.models import API_VERSION, parse_spec

Validator = Literal["pydantic", "apiserver"]

CORPUS_PATH = Path(__file__).resolve().parents[2] / "tests" / "api" / "corpus.yaml"
"""Where the corpus lives in a source checkout."""

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_CASE_KEYS = frozenset(
    {"name", "expect", "spec", "field", "message", "pydanticMessage", "apiServerMessage"}
)


class CorpusError(ValueError):
    """The corpus file itself is malformed."""


@dataclass(frozen=True)
class FieldError:
    """One validation error: the field path in API spelling and the message about it."""

    field: str
    """`spec.checkpoint.intervalMs`; empty when the validator named no field."""
    message: str


@dataclass(frozen=True)
class CorpusCase:
    name: str
    """Also usable as the object's name (a DNS label)."""
    spec: dict[str, Any]
    valid: bool
    field: str | None = None
    messages: Mapping[Validator, str] = dataclasses.field(default_factory=dict)
    """Expected message text per validator (invalid cases only)."""

    def manifest(self, namespace: str) -> dict[str, Any]:
        """The XenReplication to send to the API server for this case."""
        return {
            "apiVersion": API_VERSION,
            "kind": "XenReplication",
            "metadata": {"name": self.name, "namespace": namespace},
            "spec": self.spec,
        }


def load_corpus(path: Path = CORPUS_PATH) -> list[CorpusCase]:
    """Read and check a corpus file; raises `CorpusError` naming the bad case."""
    import yaml  # only corpus users need it

    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("cases"), list):
        raise CorpusError(f"{path}: expected a mapping with a list under 'cases'")
    cases = [_case(raw, index) for index, raw in enumerate(document["cases"])]
    seen: set[str] = set()
    for case in cases:
        if case.name in seen:
            raise CorpusError(f"{path}: case name {case.name!r} is used twice")
        seen.add(case.name)
    return cases


def _case(raw: Any, index: int) -> CorpusCase:
    where = f"case #{index}"
    if not isinstance(raw, dict):
        raise CorpusError(f"{where}: not a mapping")
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise CorpusError(f"{where}: name must be a DNS label (lowercase, digits, '-')")
    where = f"case {name!r}"
    unknown = set(raw) - _CASE_KEYS
    if unknown:
        raise CorpusError(f"{where}: unknown keys {sorted(unknown)}")
    if raw.get("expect") not in ("valid", "invalid"):
        raise CorpusError(f"{where}: expect must be 'valid' or 'invalid'")
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        raise CorpusError(f"{where}: spec must be a mapping")
    valid = raw["expect"] == "valid"
    common = raw.get("message")
    messages: dict[Validator, str] = {}
    per_validator: tuple[tuple[Validator, str], ...] = (
        ("pydantic", "pydanticMessage"),
        ("apiserver", "apiServerMessage"),
    )
    for validator, key in per_validator:
        text = raw.get(key, common)
        if text is not None:
            messages[validator] = str(text)
    if valid:
        if messages or "field" in raw:
            raise CorpusError(f"{where}: a valid case expects no field and no message")
        return CorpusCase(name=name, spec=spec, valid=True)
    if not isinstance(raw.get("field"), str) or len(messages) != 2:
        raise CorpusError(
            f"{where}: an invalid case needs field and message "
            "(or pydanticMessage and apiServerMessage)"
        )
    return CorpusCase(name=name, spec=spec, valid=False, field=raw["field"], messages=messages)


def pydantic_errors(spec: Mapping[str, Any]) -> list[FieldError]:
    """Validate `spec` as `kubectl apply` would have it checked (unknown fields rejected)."""
    try:
        parse_spec(spec, reject_unknown=True)
    except ValidationError as error:
        return [
            FieldError(".".join(["spec", *(str(part) for part in item["loc"])]), item["msg"])
            for item in error.errors()
        ]
    return []


def api_server_errors(status: Mapping[str, Any]) -> list[FieldError]:
    """The errors in a Kubernetes `Status` answer (422 Invalid, 400 BadRequest, ...).

    Field errors come as `details.causes`; a strict-decoding error ("unknown field
    \"spec.x\"") has none, so the whole message stands as one error without a field.
    """
    details = status.get("details") or {}
    causes = details.get("causes") or []
    errors = [
        FieldError(str(cause.get("field", "")), str(cause.get("message", ""))) for cause in causes
    ]
    return errors or [FieldError("", str(status.get("message", "")))]


def verdict(case: CorpusCase, errors: Sequence[FieldError], validator: Validator) -> str | None:
    """None when `errors` are what `case` expects from `validator`, else what is wrong."""
    if case.valid:
        if not errors:
            return None
        return f"{case.name}: expected valid, got {_show(errors)}"
    if not errors:
        return f"{case.name}: expected an error on {case.field}, but the spec was accepted"
    expected = case.messages[validator]
    for error in errors:
        if _names_field(error, case.field or "") and expected.lower() in error.message.lower():
            return None
    return f"{case.name}: expected {case.field}: ...{expected}..., got {_show(errors)}"


def _names_field(error: FieldError, wanted: str) -> bool:
    if error.field:
        return error.field == wanted
    return wanted in error.message


def _show(errors: Sequence[FieldError]) -> str:
    return "; ".join(f"{e.field or '<no field>'}: {e.message}" for e in errors)
