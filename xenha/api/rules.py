"""The cross-field rules of a XenReplication spec: one table, read by two validators.

Each rule carries a CEL expression (written into the CRD as an `x-kubernetes-validations`
entry on `spec`, so kubectl, Helm and GitOps get the rejection from the API server) and a
Python predicate (run by the pydantic model), with one message for both. Keeping them in one
row is what stops the two from drifting; `tests/api/corpus.yaml` checks that they agree.

Both sides see the spec after the *static* defaults (the schema's `default: {}` objects and
`false` flags) and before the mode-dependent ones (checkpoint interval and compression), so a
rule rejects only values a user wrote: `compression: true` with COLO, never `false`.

CEL style: only `has()` guards, comparisons and one anchored regex on a short string, so the
API server's cost estimator accepts every rule without limits on lists.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from xenha.api.models import XenReplicationSpec


class ErrorReason(StrEnum):
    """How the API server reports a broken rule (`x-kubernetes-validations[].reason`)."""

    INVALID = "FieldValueInvalid"
    FORBIDDEN = "FieldValueForbidden"


@dataclass(frozen=True)
class Rule:
    """One cross-field rule of `XenReplication.spec`."""

    name: str
    field: str
    """The field to blame, as a path below `spec` in API spelling (`checkpoint.intervalMs`)."""
    cel: str
    """CEL over `self` = the spec; true means the rule holds."""
    message: str
    holds: Callable[[XenReplicationSpec], bool]
    """The same rule in Python, over a spec that has its static defaults only."""
    reason: ErrorReason = ErrorReason.FORBIDDEN

    @property
    def api_field(self) -> str:
        """The field path the API server reports (`spec.checkpoint.intervalMs`)."""
        return f"spec.{self.field}"

    @property
    def cel_field_path(self) -> str:
        """The rule's `fieldPath`, relative to `spec` as the API server wants it."""
        return f".{self.field}"


def _set(path: str) -> str:
    """CEL for 'the boolean at `path` is present and true', guarding every level."""
    parts = path.split(".")
    guards = [f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts))]
    return " && ".join([*guards, f"self.{path}"])


def _present(path: str) -> str:
    parts = path.split(".")
    return " && ".join(f"has(self.{'.'.join(parts[: i + 1])})" for i in range(len(parts)))


def _colo_forbids(flag: str) -> str:
    return f"self.mode != 'colo' || !({_set(flag)})"


def _needs_allow(flag: str) -> str:
    return f"!({_set(flag)}) || ({_set('unsafe.allow')})"


SPEC_RULES: tuple[Rule, ...] = (
    Rule(
        name="nodes-differ",
        field="secondaryNode",
        cel="self.secondaryNode != self.primaryNode",
        message=(
            "secondaryNode must differ from primaryNode: "
            "a replica on the same host survives no host failure"
        ),
        holds=lambda s: s.secondary_node != s.primary_node,
        reason=ErrorReason.INVALID,
    ),
    Rule(
        name="domain-not-numeric",
        field="domain",
        cel="!self.domain.matches('^[0-9]+$')",
        message="domain must not be all digits: xl would take it for a domain id",
        holds=lambda s: not s.domain.isdigit(),
        reason=ErrorReason.INVALID,
    ),
    Rule(
        name="domain-not-dom0",
        field="domain",
        cel="self.domain != 'Domain-0'",
        message="domain must not be Domain-0: the control domain cannot be replicated",
        holds=lambda s: s.domain != "Domain-0",
        reason=ErrorReason.INVALID,
    ),
    Rule(
        name="domain-not-incoming",
        field="domain",
        cel="!self.domain.endsWith('--incoming')",
        message=(
            "domain must not end in --incoming: xl gives that name to the copy being received"
        ),
        holds=lambda s: not s.domain.endswith("--incoming"),
        reason=ErrorReason.INVALID,
    ),
    Rule(
        name="colo-no-interval",
        field="checkpoint.intervalMs",
        cel=f"self.mode != 'colo' || !({_present('checkpoint.intervalMs')})",
        message=(
            "COLO takes no checkpoint interval (xl remus -c conflicts with -i): "
            "remove checkpoint.intervalMs"
        ),
        holds=lambda s: s.mode != "colo" or s.checkpoint.interval_ms is None,
    ),
    Rule(
        name="colo-no-compression",
        field="checkpoint.compression",
        cel=_colo_forbids("checkpoint.compression"),
        message=(
            "COLO cannot compress checkpoints (xl remus -c turns compression off): "
            "set checkpoint.compression to false or leave it out"
        ),
        holds=lambda s: s.mode != "colo" or s.checkpoint.compression is not True,
    ),
    Rule(
        name="colo-no-blackhole",
        field="unsafe.blackhole",
        cel=_colo_forbids("unsafe.blackhole"),
        message="COLO cannot use unsafe.blackhole (xl remus -c conflicts with -b)",
        holds=lambda s: s.mode != "colo" or not s.unsafe.blackhole,
    ),
    Rule(
        name="colo-no-disable-network-buffering",
        field="unsafe.disableNetworkBuffering",
        cel=_colo_forbids("unsafe.disableNetworkBuffering"),
        message="COLO cannot use unsafe.disableNetworkBuffering (xl remus -c conflicts with -n)",
        holds=lambda s: s.mode != "colo" or not s.unsafe.disable_network_buffering,
    ),
    Rule(
        name="colo-no-disable-disk-replication",
        field="unsafe.disableDiskReplication",
        cel=_colo_forbids("unsafe.disableDiskReplication"),
        message="COLO cannot use unsafe.disableDiskReplication (xl remus -c conflicts with -d)",
        holds=lambda s: s.mode != "colo" or not s.unsafe.disable_disk_replication,
    ),
    Rule(
        name="blackhole-needs-allow",
        field="unsafe.blackhole",
        cel=_needs_allow("unsafe.blackhole"),
        message="unsafe.blackhole requires unsafe.allow (xl remus -b works only with -F)",
        holds=lambda s: not s.unsafe.blackhole or s.unsafe.allow,
    ),
    Rule(
        name="disable-network-buffering-needs-allow",
        field="unsafe.disableNetworkBuffering",
        cel=_needs_allow("unsafe.disableNetworkBuffering"),
        message=(
            "unsafe.disableNetworkBuffering requires unsafe.allow (xl remus -n works only with -F)"
        ),
        holds=lambda s: not s.unsafe.disable_network_buffering or s.unsafe.allow,
    ),
    Rule(
        name="disable-disk-replication-needs-allow",
        field="unsafe.disableDiskReplication",
        cel=_needs_allow("unsafe.disableDiskReplication"),
        message=(
            "unsafe.disableDiskReplication requires unsafe.allow (xl remus -d works only with -F)"
        ),
        holds=lambda s: not s.unsafe.disable_disk_replication or s.unsafe.allow,
    ),
    Rule(
        name="userspace-proxy-needs-colo",
        field="colo.userspaceProxy",
        cel=f"self.mode == 'colo' || !({_set('colo.userspaceProxy')})",
        message="colo.userspaceProxy requires mode colo (xl remus -p must be used with -c)",
        holds=lambda s: s.mode == "colo" or not s.colo.userspace_proxy,
    ),
)


def broken_rules(spec: XenReplicationSpec) -> list[Rule]:
    """The rules `spec` breaks, in table order (empty when it is acceptable)."""
    return [rule for rule in SPEC_RULES if not rule.holds(spec)]
