"""Planned switchover: the user asks for the active copy to move to the standby host.

**The trigger is an annotation**, `xenha.io/switchover-to: <node>`, because a switchover is an
action, not desired state: putting it in the spec would make GitOps tools either re-apply it
forever or fight the operator. The annotation belongs to the user — the operator never removes
or edits it (that would be a write to user-owned metadata, and a GitOps tool would put it back).

**Once per distinct request.** The operator records the request it handled in
`status.switchover` (`target`, `state`, `time`, `message`) and acts only when the annotation
names a node different from the recorded `target`, so a lingering annotation does nothing more
after it has been handled. To repeat a switchover to the node named last, first ask for the
node that is active now (it completes at once as a no-op), then for the target again.

**States** (`status.switchover.state`):

- `Requested` — accepted, waiting for the standby to be in sync (phase Protected).
- `InProgress` — the operator asks the agents to hand over (docs/operator.md has their part):
  the active agent pauses the guest and lets the last checkpoint complete, the standby's agent
  takes the fencing Lease and activates its copy.
- `Succeeded` — the fencing Lease names the target; the old active becomes the standby as soon
  as it is usable (re-protection in the other direction).
- `Failed` — the target is not the standby, the standby never got in sync, or the handover did
  not finish within the timeout; the guest keeps running where the fencing Lease says.

Decisions depend only on the recorded state, the roles and the clock, so a restarted or second
operator replica continues a switchover instead of starting it again.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from xenha.api import Switchover, SwitchoverState

ANNOTATION = "xenha.io/switchover-to"

TERMINAL = frozenset({SwitchoverState.SUCCEEDED, SwitchoverState.FAILED})


def requested_target(annotations: dict[str, str] | None) -> str | None:
    """The node the user asks to switch over to (None: no request)."""
    value = (annotations or {}).get(ANNOTATION, "").strip()
    return value or None


@dataclass(frozen=True, kw_only=True)
class SwitchoverInputs:
    request: str | None
    previous: Switchover | None
    active: str
    standby: str | None
    #: The active node moved since the previous status (the fencing Lease changed hands).
    active_changed: bool
    #: The standby holds a complete, current copy (phase Protected).
    protected: bool
    #: The replication may not switch over (suspended, being deleted, failed).
    blocked_by: str | None
    now: datetime
    timeout: timedelta


def _record(target: str, state: SwitchoverState, now: datetime, message: str) -> Switchover:
    return Switchover(target=target, state=state, time=now, message=message)


def next_switchover(inp: SwitchoverInputs) -> Switchover | None:
    """The switchover record to store (the previous one when nothing changes)."""
    prev = inp.previous
    if inp.request is not None and (prev is None or prev.target != inp.request):
        return _accept(inp, inp.request)
    if prev is None or prev.state in TERMINAL:
        return prev
    return _advance(inp, prev)


def _accept(inp: SwitchoverInputs, target: str) -> Switchover:
    if target == inp.active and not inp.active_changed:
        return _record(
            target, SwitchoverState.SUCCEEDED, inp.now, f"{target} is already the active node"
        )
    return _advance(
        inp, _record(target, SwitchoverState.REQUESTED, inp.now, "waiting for the standby")
    )


def _advance(inp: SwitchoverInputs, cur: Switchover) -> Switchover:
    target, now = cur.target, inp.now
    started = cur.time or now
    if inp.active == target:
        # The fencing Lease names the target: the handover (or a failover to it) is done.
        return _record(target, SwitchoverState.SUCCEEDED, now, f"{target} is now active")
    if inp.active_changed:
        return _record(
            target,
            SwitchoverState.FAILED,
            now,
            f"a failover moved the guest to {inp.active} instead",
        )
    if inp.blocked_by is not None:
        return _record(target, SwitchoverState.FAILED, now, inp.blocked_by)
    if target != inp.standby:
        standby = inp.standby or "none"
        return _record(
            target,
            SwitchoverState.FAILED,
            now,
            f"{target} is not the standby node (standby: {standby})",
        )
    if now - started > inp.timeout:
        what = "hand over" if cur.state is SwitchoverState.IN_PROGRESS else "get in sync"
        return _record(
            target,
            SwitchoverState.FAILED,
            now,
            f"the standby did not {what} within {inp.timeout.total_seconds():g}s",
        )
    if cur.state is SwitchoverState.REQUESTED and inp.protected:
        return _record(
            target,
            SwitchoverState.IN_PROGRESS,
            now,
            f"handing over from {inp.active} to {target}",
        )
    return cur
