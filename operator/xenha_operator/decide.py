"""Who is active and who is standby: a pure function of what the operator observes.

Rules (table-tested in tests/operator/test_decide.py):

- **active follows the fencing Lease.** The Lease holder is the only truth about which copy
  may run; agents change it on failover and switchover. Before the Lease exists, the active
  node is the previous `status.activeNode`, else `spec.primaryNode`.
- **standby**: none while suspended or being deleted. Otherwise the candidates are the spec's
  nodes other than the active one, `spec.secondaryNode` first, then `spec.primaryNode` (which
  is the way back after a failover). The current standby stays while it is still a candidate
  and answers, or while no other candidate is usable — an agent restart must not cost the
  replica. A new standby must be *usable* now: a fresh XenNode, room for the guest, not
  running a copy of it (validate.py says which nodes are).
- **re-protection is automatic**: after a failover the old standby is the active one, so the
  standby slot is empty; the first time a candidate is usable (the old primary reporting
  again after it dropped its copy, or a new `spec.secondaryNode`) it becomes the standby and
  the agents seed in the new direction.

Everything derives from observed state, never from what the operator did before: a second
operator replica (or a restarted one) computes the same roles from the same observations, so
a failover is neither stalled nor repeated when the acting replica dies halfway.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class RoleInputs:
    primary_node: str
    secondary_node: str
    suspended: bool = False
    deleting: bool = False
    #: fencing Lease holderIdentity; None when the Lease does not exist (yet) or names nobody.
    lease_holder: str | None = None
    previous_active: str | None = None
    previous_standby: str | None = None
    #: nodes whose agent reports freshly (heartbeat changed within the staleness bound).
    responsive: frozenset[str] = frozenset()
    #: nodes that could become the standby right now (see validate.standby_usable).
    usable: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Roles:
    active: str
    standby: str | None
    #: The active node moved since the previous status (a failover or a switchover).
    active_changed: bool
    #: The standby now is a node that was not the standby before (seeding starts over).
    standby_changed: bool


def candidates(primary_node: str, secondary_node: str, active: str) -> list[str]:
    """Possible standbys in order of preference."""
    ordered = [secondary_node, primary_node]
    return [n for i, n in enumerate(ordered) if n and n != active and n not in ordered[:i]]


def decide_roles(inp: RoleInputs) -> Roles:
    active = inp.lease_holder or inp.previous_active or inp.primary_node
    standby = _standby(inp, active)
    return Roles(
        active=active,
        standby=standby,
        active_changed=inp.previous_active is not None and active != inp.previous_active,
        standby_changed=standby is not None and standby != inp.previous_standby,
    )


def _standby(inp: RoleInputs, active: str) -> str | None:
    if inp.suspended or inp.deleting:
        return None
    options = candidates(inp.primary_node, inp.secondary_node, active)
    current = inp.previous_standby
    if current in options:
        others_usable = any(n in inp.usable for n in options if n != current)
        if current in inp.responsive or not others_usable:
            return current
    return next((n for n in options if n in inp.usable), None)


def usable_from(flags: Mapping[str, bool]) -> frozenset[str]:
    """A frozenset of the nodes flagged True (for building RoleInputs from a table)."""
    return frozenset(n for n, ok in flags.items() if ok)
