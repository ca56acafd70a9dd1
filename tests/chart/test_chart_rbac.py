"""The chart grants each component exactly the rules its Python constants list.

The constants are what the components are tested under (their integration tests run with
ServiceAccounts carrying only those rules); the chart is what production runs under. If they
drift, one of the two is lying.
"""

from __future__ import annotations

from typing import Any

import pytest
from xenha_agent.rbac import AGENT_CLUSTER_RULES, AGENT_NAMESPACE_RULES
from xenha_operator.rbac import OPERATOR_RULES

from .generated import REGENERATE, stale_files
from .helm import chart_rbac


def as_set(rules: Any) -> set[tuple[tuple[str, tuple[str, ...]], ...]]:
    """Rules compared as data: order of rules and of list items carries no meaning."""
    return {
        tuple(sorted((key, tuple(sorted(value))) for key, value in rule.items())) for rule in rules
    }


def test_generated_chart_files_are_current() -> None:
    stale = stale_files()
    assert not stale, f"stale: {[str(p) for p in stale]}; run `{REGENERATE}`"


@pytest.mark.parametrize(
    "values",
    [None, {"agent": {"namespace": "xenha-agents"}}],
    ids=["default", "agents-in-their-own-namespace"],
)
def test_rendered_rules_are_exactly_the_constants(values: dict[str, Any] | None) -> None:
    rbac = chart_rbac(values)
    operator, agent = rbac["operator"], rbac["agent"]

    assert as_set(operator.cluster_rules) == as_set(OPERATOR_RULES)
    assert operator.rules == []
    assert as_set(agent.cluster_rules) == as_set(AGENT_CLUSTER_RULES)
    assert as_set(agent.rules) == as_set(AGENT_NAMESPACE_RULES)
    assert len(agent.cluster_rules) == len(AGENT_CLUSTER_RULES)


def test_the_agents_hold_no_secret_rights_from_the_chart() -> None:
    # Their TLS Secrets are granted one at a time, per replication, by the operator.
    agent = chart_rbac()["agent"]
    for rule in agent.cluster_rules + agent.rules:
        assert "secrets" not in rule["resources"], rule


def test_helper_reports_each_components_own_account() -> None:
    rbac = chart_rbac({"agent": {"namespace": "xenha-agents"}}, namespace="ops")
    assert (rbac["operator"].namespace, rbac["operator"].service_account) == (
        "ops",
        "xenha-operator",
    )
    assert (rbac["agent"].namespace, rbac["agent"].service_account) == (
        "xenha-agents",
        "xenha-agent",
    )
