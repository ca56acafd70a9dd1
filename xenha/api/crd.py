"""Generate the CRDs of xenha.io from the pydantic models and the rule table.

The YAML under `crds/` and `charts/xenha/crds/` is output of this module, never edited by
hand: `xenha crd generate` (or `python -m xenha.api.crd`) rewrites it and `--check` fails
when the committed copy is stale.

What goes where:
- the OpenAPI v3 schema comes from `model_json_schema()`, made structural (refs inlined,
  `Optional` collapsed to "may be absent", titles dropped) and checked against a whitelist of
  keywords, so a model construct the API server would not take fails here, not at install;
- static defaults are kept for `spec` only; mode-dependent defaults cannot be expressed in
  OpenAPI, so they are absent and the operator/agents apply them through the models;
- `status` carries no defaults (the operator writes every field it means) but declares every
  field, since the API server prunes undeclared ones from kopf's patches;
- the cross-field rules of `xenha.api.rules` become `x-kubernetes-validations` on `spec`, with
  `fieldPath` so the error names the field, as the pydantic error does.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from xenha.api.models import (
    GROUP,
    VERSION,
    XenNodeSpec,
    XenNodeStatus,
    XenReplicationSpec,
    XenReplicationStatus,
)
from xenha.api.rules import SPEC_RULES

CRD_DIRS = ("crds", "charts/xenha/crds")
CATEGORY = "xenha"

HEADER = """\
# GENERATED from xenha/api/models.py and xenha/api/rules.py by xenha/api/crd.py.
# Do not edit: change the models or rules, then run `xenha crd generate`
# (or `python -m xenha.api.crd`); `--check` tells whether this file is current.
"""

_KEYWORDS = frozenset(
    {
        "default",
        "description",
        "enum",
        "format",
        "items",
        "maxLength",
        "maximum",
        "minLength",
        "minimum",
        "pattern",
        "properties",
        "required",
        "type",
        "x-kubernetes-list-map-keys",
        "x-kubernetes-list-type",
    }
)


class SchemaError(ValueError):
    """A model uses a construct that has no structural OpenAPI equivalent."""


def openapi_schema(model: type[BaseModel], *, defaults: bool) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of `model`, in API spelling."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs: Mapping[str, Any] = raw.pop("$defs", {})
    return _structural(raw, defs, defaults=defaults, where=model.__name__)


def _structural(
    node: Mapping[str, Any], defs: Mapping[str, Any], *, defaults: bool, where: str
) -> dict[str, Any]:
    out = dict(node)
    if "anyOf" in out:
        # pydantic's Optional[X]: in the API "no value" is an absent field, not null.
        branches = [b for b in out.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise SchemaError(f"{where}: unions other than Optional[X] are not structural")
        out = {**branches[0], **out}
    if "$ref" in out:
        target = defs[out.pop("$ref").rsplit("/", 1)[-1]]
        # The field's own keys (description, default) win over the referenced model's.
        out = {**target, **out}
        return _structural(out, defs, defaults=defaults, where=where)
    out.pop("title", None)
    if out.get("default", 0) is None or (not defaults and "default" in out):
        del out["default"]
    unknown = set(out) - _KEYWORDS
    if unknown:
        raise SchemaError(f"{where}: no structural equivalent for {sorted(unknown)}")
    if "type" not in out:
        raise SchemaError(f"{where}: every schema node needs a type")
    if "properties" in out:
        props = {
            name: _structural(sub, defs, defaults=defaults, where=f"{where}.{name}")
            for name, sub in out["properties"].items()
        }
        if props:
            out["properties"] = props
        else:
            del out["properties"]
    if "items" in out:
        out["items"] = _structural(out["items"], defs, defaults=defaults, where=f"{where}[]")
    return out


def _root(description: str, spec: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    return {
        "description": description,
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def _crd(
    *,
    kind: str,
    plural: str,
    short: str,
    scope: str,
    schema: dict[str, Any],
    columns: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": [short],
                "categories": [CATEGORY],
            },
            "scope": scope,
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                }
            ],
        },
    }


def _column(name: str, kind: str, path: str, description: str, priority: int = 0) -> dict[str, Any]:
    column: dict[str, Any] = {
        "name": name,
        "type": kind,
        "jsonPath": path,
        "description": description,
    }
    if priority:
        column["priority"] = priority
    return column


_AGE = _column("Age", "date", ".metadata.creationTimestamp", "Time since creation.")


def xenreplication_crd() -> dict[str, Any]:
    """The `xenreplications.xenha.io` CustomResourceDefinition."""
    spec = openapi_schema(XenReplicationSpec, defaults=True)
    spec["description"] = (
        "What to protect and how: the domain, the two hosts and the xl remus options. "
        "Owned by the user; controllers never write it."
    )
    spec["x-kubernetes-validations"] = [
        {
            "rule": rule.cel,
            "message": rule.message,
            "fieldPath": rule.cel_field_path,
            "reason": rule.reason.value,
        }
        for rule in SPEC_RULES
    ]
    status = openapi_schema(XenReplicationStatus, defaults=False)
    status["description"] = "What the operator observed; written by the operator only."
    # kopf keeps its handler progress here (not in annotations, which belong to the user);
    # declared so the API server does not prune it and leave a deletion handler stuck.
    status["properties"]["kopf"] = {
        "type": "object",
        "description": "The operator's handler bookkeeping (kopf progress storage).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    schema = _root(
        "XenReplication keeps a Xen domain running through the loss of its host by "
        "replicating it to a second host with xl remus (Remus or COLO).",
        spec,
        status,
    )
    schema["required"] = ["spec"]
    columns = [
        _column("Mode", "string", ".spec.mode", "colo or remus."),
        _column("Active", "string", ".status.activeNode", "Node whose copy runs."),
        _column("Standby", "string", ".status.standbyNode", "Node holding the replica."),
        _column("Phase", "string", ".status.phase", "Protected, Degraded, ..."),
        _column(
            "Last-Checkpoint",
            "date",
            ".status.lastCheckpointTime",
            "Time since the standby last completed a checkpoint.",
        ),
        _AGE,
        _column("Checkpoints", "integer", ".status.checkpointsTotal", "Checkpoints done.", 1),
        _column("Message", "string", ".status.message", "Why the phase is what it is.", 1),
    ]
    return _crd(
        kind="XenReplication",
        plural="xenreplications",
        short="xr",
        scope="Namespaced",
        schema=schema,
        columns=columns,
    )


def xennode_crd() -> dict[str, Any]:
    """The `xennodes.xenha.io` CustomResourceDefinition (cluster-scoped)."""
    # An object schema without properties: the API server prunes anything put in spec.
    # (`x-kubernetes-preserve-unknown-fields: false` would say the same but is rejected:
    # the API server accepts that extension only as true or absent.)
    spec = openapi_schema(XenNodeSpec, defaults=True)
    spec["description"] = "Empty: a XenNode only reports."
    status = openapi_schema(XenNodeStatus, defaults=False)
    status["description"] = "What the node's agent observed; written by that agent only."
    schema = _root(
        "XenNode is a Xen host as its xenha agent sees it; named after the Kubernetes node.",
        spec,
        status,
    )
    columns = [
        _column("Relay", "string", ".status.relayEndpoint", "Where peers dial the relay."),
        _column("Xen", "string", ".status.xen.version", "Xen version."),
        _column("Free-Mem", "integer", ".status.xen.freeMemoryMiB", "Free memory in MiB."),
        _column("COLO", "boolean", ".status.xen.coloSupported", "Can run COLO.", 1),
        _column("Heartbeat", "date", ".status.heartbeatTime", "Time since the last report."),
        _AGE,
    ]
    return _crd(
        kind="XenNode",
        plural="xennodes",
        short="xn",
        scope="Cluster",
        schema=schema,
        columns=columns,
    )


CRDS: dict[str, Callable[[], dict[str, Any]]] = {
    f"xenreplications.{GROUP}.yaml": xenreplication_crd,
    f"xennodes.{GROUP}.yaml": xennode_crd,
}


def render(crd: Mapping[str, Any]) -> str:
    """The YAML text of one CRD, header included; stable across runs."""
    import yaml  # only the generator needs it, not everyone who imports the models

    body = yaml.safe_dump(dict(crd), sort_keys=True, default_flow_style=False, width=100)
    return HEADER + body


def rendered_crds() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    return {name: render(build()) for name, build in CRDS.items()}


def crd_paths(repo_root: Path) -> list[Path]:
    """Where the generated files live in the repository."""
    return [repo_root / folder / name for folder in CRD_DIRS for name in CRDS]


def write_crds(repo_root: Path, check: bool) -> list[Path]:
    """Write the CRDs under `repo_root`, or with `check` only compare.

    Returns the files that differed from the generated text: rewritten ones, or with
    `check` the stale or missing ones (so an empty list means "up to date").
    """
    texts = rendered_crds()
    differing: list[Path] = []
    for path in crd_paths(repo_root):
        text = texts[path.name]
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            continue
        differing.append(path)
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    return differing


def default_repo_root() -> Path:
    """The checkout this module lives in (xenha/api/crd.py -> repository root)."""
    return Path(__file__).resolve().parents[2]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m xenha.api.crd [--check] [--root DIR]`; exit 1 when `--check` finds stale files."""
    parser = argparse.ArgumentParser(
        prog="xenha crd generate", description="Generate the xenha.io CRDs from the models."
    )
    parser.add_argument("--check", action="store_true", help="only verify, write nothing")
    parser.add_argument("--root", type=Path, default=None, help="repository root")
    args = parser.parse_args(argv)
    root: Path = args.root or default_repo_root()
    differing = write_crds(root, check=args.check)
    for path in differing:
        shown = path.relative_to(root)
        if args.check:
            print(f"stale: {shown} (run `xenha crd generate`)", file=sys.stderr)
        else:
            print(f"wrote {shown}")
    return 1 if args.check and differing else 0


def crd_main(argv: Sequence[str]) -> int:
    """`xenha crd generate [--check] [--root DIR]` (the words after `xenha crd`)."""
    if list(argv[:1]) != ["generate"]:
        print("usage: xenha crd generate [--check] [--root DIR]", file=sys.stderr)
        return 2
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
