"""Chart files that are copies of Python constants, and the code that writes them.

Helm cannot read Python, so the chart carries data files generated from the one source:
- `charts/xenha/files/rbac.yaml` from `operator/xenha_operator/rbac.py` and
  `agent/xenha_agent/rbac.py` (the rules each component is tested under);
- `charts/xenha/crds/<plural>.kopf.dev.yaml` from `xenha_operator.peering.PEERING_CRDS`.

`python -m tests.chart.generated` rewrites them; `--check` only compares (the chart tests fail
with the same message when a file is stale).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "xenha"
RBAC_FILE = CHART / "files" / "rbac.yaml"
REGENERATE = "python -m tests.chart.generated"

RBAC_HEADER = f"""\
# GENERATED from operator/xenha_operator/rbac.py and agent/xenha_agent/rbac.py.
# Do not edit: change the constants, then run `{REGENERATE}`.
# cluster: bound by a ClusterRoleBinding; namespace: by a RoleBinding in the component's own
# namespace (the agents' namespace holds their host Leases).
"""

CRD_HEADER = f"""\
# GENERATED from operator/xenha_operator/peering.py (kopf's peering resources; kopf does not
# install them). Do not edit: run `{REGENERATE}`.
"""


def _rules(rules: Sequence[Any]) -> list[dict[str, list[str]]]:
    return [{key: list(value) for key, value in rule.items()} for rule in rules]


def component_rules() -> dict[str, dict[str, list[dict[str, list[str]]]]]:
    """Component -> {"cluster": [...], "namespace": [...]} straight from the constants."""
    from xenha_agent import rbac as agent_rbac
    from xenha_operator import rbac as operator_rbac

    return {
        "operator": {"cluster": _rules(operator_rbac.OPERATOR_RULES), "namespace": []},
        "agent": {
            "cluster": _rules(agent_rbac.AGENT_CLUSTER_RULES),
            "namespace": _rules(agent_rbac.AGENT_NAMESPACE_RULES),
        },
    }


def _dump(document: Any, *, flow_lists: bool = False) -> str:
    # Flow-style short lists keep each RBAC rule to three lines; CRDs read better in blocks.
    style = None if flow_lists else False
    return yaml.safe_dump(document, sort_keys=False, default_flow_style=style, width=100)


def rbac_text() -> str:
    return RBAC_HEADER + _dump(component_rules(), flow_lists=True)


def peering_crd_texts() -> dict[Path, str]:
    from xenha_operator.peering import PEERING_CRDS

    return {
        CHART / "crds" / f"{crd['metadata']['name']}.yaml": CRD_HEADER + _dump(crd)
        for crd in PEERING_CRDS
    }


def expected_files() -> dict[Path, str]:
    return {RBAC_FILE: rbac_text(), **peering_crd_texts()}


def stale_files() -> list[Path]:
    """Generated files whose content differs from what the constants say (or missing)."""
    return [
        path
        for path, text in expected_files().items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=REGENERATE, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify, write nothing")
    args = parser.parse_args(argv)
    stale = stale_files()
    if args.check:
        for path in stale:
            print(f"stale: {path.relative_to(REPO)} (run `{REGENERATE}`)", file=sys.stderr)
        return 1 if stale else 0
    texts = expected_files()
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(texts[path], encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
