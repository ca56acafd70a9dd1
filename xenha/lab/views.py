"""How the lab shows things to a person (rich renderables). Pure: objects in, tables out."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from xenha.lab.timeline import ClientView, Entry, parse_time

Obj = Mapping[str, Any]

PHASE_STYLE = {
    "Protected": "bold green",
    "Seeding": "yellow",
    "Pending": "dim",
    "Degraded": "bold red",
    "FailingOver": "bold magenta",
    "Suspended": "dim",
    "Failed": "bold red",
}


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 0:
        seconds = 0
    if seconds < 10:
        return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def rate(per_second: float | None, unit: str = "B") -> str:
    if per_second is None:
        return "-"
    value = float(per_second)
    for prefix in ("", "Ki", "Mi", "Gi"):
        if value < 1024 or prefix == "Gi":
            return (
                f"{value:.0f} {prefix}{unit}/s" if not prefix else f"{value:.1f} {prefix}{unit}/s"
            )
        value /= 1024
    return f"{value:.1f} {unit}/s"


def phase_text(phase: str | None) -> Text:
    return Text(phase or "-", style=PHASE_STYLE.get(phase or "", ""))


def replication_view(obj: Obj, *, now: float | None = None) -> RenderableType:
    """One XenReplication as a person wants to read it."""
    now = time.time() if now is None else now
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    status = obj.get("status") or {}
    title = Text.assemble(
        (f"{meta.get('namespace')}/{meta.get('name')}", "bold"),
        f"  guest {spec.get('domain')}  mode {spec.get('mode')}",
    )
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column()
    summary.add_row(
        "phase", Text.assemble(phase_text(status.get("phase")), "  ", status.get("message") or "")
    )
    summary.add_row("active", Text(status.get("activeNode") or "-", style="bold"))
    summary.add_row("standby", status.get("standbyNode") or "-")
    since = parse_time(status.get("protectedSince"))
    if since is not None:
        summary.add_row("protected for", age(now - since))
    interval = status.get("checkpointIntervalMs")
    last = parse_time(status.get("lastCheckpointTime"))
    checkpoints = f"{1000 / interval:.1f}/s (every {interval} ms)" if interval else "-"
    summary.add_row("checkpoints", f"{checkpoints}, {status.get('checkpointsTotal') or 0} in all")
    summary.add_row("last checkpoint", f"{age(now - last) if last else '-'} ago")
    summary.add_row(
        "throughput",
        f"{rate(status.get('bytesPerSecond'))}, last pause {status.get('lastPauseMs', '-')} ms",
    )
    failover = status.get("lastFailover")
    if failover:
        when = parse_time(failover.get("time"))
        took = failover.get("durationMs")
        summary.add_row(
            "last failover",
            f"{failover.get('from')} -> {failover.get('to')} ({failover.get('reason')}), "
            f"{age(now - when) if when else '?'} ago"
            + (f", {took} ms from detection to activation" if took is not None else ""),
        )
    switchover = status.get("switchover")
    if switchover:
        summary.add_row("switchover", f"to {switchover.get('target')}: {switchover.get('state')}")

    conditions = Table(box=None, show_edge=False, pad_edge=False, header_style="dim")
    for column in ("condition", "status", "reason", "since", "message"):
        conditions.add_column(column)
    for cond in status.get("conditions") or []:
        changed = parse_time(cond.get("lastTransitionTime"))
        ok = cond.get("status") == "True"
        conditions.add_row(
            cond.get("type", ""),
            Text(cond.get("status", ""), style="green" if ok else "red"),
            cond.get("reason", ""),
            age(now - changed) if changed else "-",
            cond.get("message", ""),
        )
    return Group(title, summary, conditions)


def hosts_view(state: Obj, xennodes: Mapping[str, Obj], *, now: float | None = None) -> Table:
    """The lab's hosts: power, agent, what each agent last reported."""
    now = time.time() if now is None else now
    table = Table(title="hosts", title_justify="left", header_style="dim")
    for column in ("host", "power", "agent pid", "report age", "replications"):
        table.add_column(column)
    for name, host in (state.get("hosts") or {}).items():
        report = (xennodes.get(name) or {}).get("status") or {}
        beat = parse_time(report.get("heartbeatTime"))
        roles = ", ".join(
            f"{r.get('name')}: {r.get('role')} {r.get('state')}"
            + ("" if r.get("peerConnected", True) else " (peer lost)")
            for r in report.get("replications") or []
        )
        agent = host.get("agent") or {}
        up = bool(host.get("up"))
        table.add_row(
            name,
            Text("on" if up else "off", style="green" if up else "red")
            + Text(" (path cut)" if host.get("pathCut") else "", style="yellow"),
            str(agent.get("pid", "-")) if up else "-",
            age(now - beat) if beat else "-",
            roles or "-",
        )
    return table


def timeline_view(entries: Sequence[Entry], origin: float, title: str) -> Table:
    table = Table(title=title, title_justify="left", header_style="dim")
    table.add_column("t (ms)", justify="right")
    table.add_column("what")
    table.add_column("source", style="dim")
    for entry in entries:
        ms = (entry.at - origin) * 1000
        table.add_row(f"{ms:+.0f}", entry.what, entry.source)
    return table


def client_view_text(view: ClientView, checks: Mapping[str, str | None]) -> RenderableType:
    lines = [
        Text(
            f"client: {view.requests} requests, {view.answers} answers; longest wait "
            f"{view.longest_gap_ms} ms; last value before the fault {view.last_before}, "
            f"first after {view.first_after}"
        )
    ]
    for name, problem in checks.items():
        if problem is None:
            lines.append(Text(f"  ok  {name}", style="green"))
        else:
            lines.append(Text(f"  FAIL {name}: {problem}", style="bold red"))
    for problem in view.violations:
        lines.append(Text(f"  FAIL {problem}", style="bold red"))
    return Group(*lines)
