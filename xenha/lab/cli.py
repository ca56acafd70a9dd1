"""`xenha lab up|status|failover|switchover|down`: the local lab, for people.

`up` starts a supervisor process (it owns every process of the lab; see supervisor.py), shows
its progress, then the replication's live status until it is Protected. Attached (the
default), it then runs the failover demo and keeps showing the live status until Ctrl-C, which
takes the lab down. With `--detach` it returns once Protected and leaves the lab running for
`status`, `failover`, `switchover` and `down`, which find it through the lab dir.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.live import Live

from xenha.lab import control, demo, kube, procs, remote, views
from xenha.lab.labdir import LabDir, default_lab_dir

Obj = dict[str, Any]
console = Console(highlight=False)
err = Console(stderr=True, highlight=False)


# --- up ---------------------------------------------------------------------------------------


def _prepare(lab: LabDir) -> None:
    if lab.running():
        raise control.LabError(f"a lab is already running in {lab.path} (xenha lab down)")
    if lab.path.exists():
        if not lab.looks_like_a_lab():
            raise control.LabError(f"{lab.path} exists and is not a lab dir; choose another")
        # What a crashed lab left: make sure nothing of it runs, then start afresh.
        _teardown(lab, quiet=True)
    lab.path.mkdir(parents=True, mode=0o700, exist_ok=True)


def _start_supervisor(lab: LabDir, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    tag = secrets.token_hex(6)
    env = {**os.environ, procs.STACK_ENV: tag}
    env.pop(procs.HOST_ENV, None)
    argv = [
        sys.executable,
        "-m",
        "xenha.lab.supervisor",
        f"--lab-dir={lab.path}",
        f"--mode={args.mode}",
        f"--hosts={args.hosts}",
    ]
    if not args.detach:
        argv.append("--owned")
    with lab.supervisor_log.open("ab") as log:
        popen = subprocess.Popen(
            argv,
            # Attached: the pipe's end-of-file tells the supervisor this terminal is gone.
            stdin=subprocess.DEVNULL if args.detach else subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
            env=env,
        )
    lab.write_supervisor(popen.pid, tag, mode=args.mode, detached=bool(args.detach))
    return popen


def _follow(lab: LabDir, popen: subprocess.Popen[bytes]) -> Obj | None:
    """Show the supervisor's steps until it is ready (its record) or gone (None)."""
    offset = 0
    with console.status("starting the lab") as spinner:
        while True:
            records, offset = lab.progress(offset)
            for record in records:
                step, detail = record["step"], record.get("detail", "")
                if step == "ready":
                    return dict(record)
                if step in ("failed", "stopped"):
                    err.print(f"[bold red]lab failed:[/] {detail}")
                    return None
                if detail == "...":
                    spinner.update(f"{step} ...")
                elif detail.startswith("done"):
                    console.print(f"[green]✓[/] {step} [dim]({detail.removeprefix('done in ')})[/]")
                else:
                    console.print(f"[green]✓[/] {step} [dim]{detail}[/]")
            if popen.poll() is not None:
                err.print(f"[bold red]the lab supervisor exited ({popen.returncode})[/]")
                return None
            time.sleep(0.1)


def _print_access(state: Obj, namespace: str) -> None:
    kubectl = state.get("kubectl") or "kubectl"
    console.print()
    console.print(f"KUBECONFIG={state['kubeconfig']}")
    console.print(
        f"[dim]in another terminal:[/] KUBECONFIG={state['kubeconfig']} "
        f"{kubectl} get xr -n {namespace} -w"
    )
    for name, guest in state["guests"].items():
        console.print(
            f"[dim]guest[/] {name} on {guest['host']}: counter service at {guest['address']} "
            f"[dim](printf 'next\\n' | nc {guest['address'].replace(':', ' ')})[/]"
        )
    console.print(f"[dim]logs:[/] {Path(state['workdir']) / 'logs'}")
    console.print()


def _live_until(
    lab: remote.RemoteLab,
    done: Callable[[Obj], bool],
    timeout: float | None,
    namespace: str,
    name: str,
) -> Obj | None:
    """Live status until ``done(replication)``, the timeout, or Ctrl-C (raised)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with Live(lab.view(namespace), console=console, refresh_per_second=4) as live:
        while deadline is None or time.monotonic() < deadline:
            with contextlib.suppress(control.LabError):
                lab.refresh()
            obj = lab.replication(name, namespace)
            live.update(lab.view(namespace))
            if obj is not None and done(obj):
                return obj
            time.sleep(0.5)
    return None


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _bring_up(
    lab_dir: LabDir, popen: subprocess.Popen[bytes], args: argparse.Namespace
) -> tuple[remote.RemoteLab, str, str] | None:
    """Follow the supervisor, then the live status until Protected; None if that fails."""
    ready = _follow(lab_dir, popen)
    if ready is None:
        _tail(lab_dir.supervisor_log)
        return None
    namespace, name = ready["namespace"], ready["name"]
    lab = remote.RemoteLab(lab_dir)
    _print_access(lab.state, namespace)
    protected = _live_until(
        lab, lambda o: kube.phase_of(o) == "Protected", args.timeout, namespace, name
    )
    if protected is None:
        err.print(
            f"[bold red]{namespace}/{name} did not become Protected in {args.timeout:.0f}s[/]"
        )
        _print_events(lab, namespace, name)
        return None
    console.print(f"[bold green]{namespace}/{name} is Protected[/]")
    return lab, namespace, name


def cmd_up(args: argparse.Namespace) -> int:
    lab_dir = LabDir(args.lab_dir)
    _prepare(lab_dir)
    if not args.detach:
        # A closed terminal or a `kill` ends the lab the way Ctrl-C does: taken down.
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, _interrupt)
    console.print(f"[bold]xenha lab[/] in {lab_dir.path} ({args.mode}, {args.hosts} hosts)")
    popen = _start_supervisor(lab_dir, args)
    outcome = "interrupted"
    try:
        up = _bring_up(lab_dir, popen, args)
        if up is None:
            outcome = "failed"
            return 1
        lab, namespace, name = up
        if args.detach:
            outcome = "detached"
            console.print(
                "the lab runs in the background: xenha lab status | failover | switchover | down"
            )
            return 0
        if args.demo:
            console.print(
                "\n[bold]failover demo:[/] power cut of the active host while a "
                "client keeps calling the guest\n"
            )
            _print_result(_demo_live(lab, kind="failover", name=name, namespace=namespace))
        outcome = "running"
        console.print("[dim]live status; Ctrl-C stops the lab[/]")
        _live_until(lab, lambda o: False, None, namespace, name)
        return 0
    except KeyboardInterrupt:
        # Ctrl-C is how a running lab ends; before that it means "abandon".
        return 0 if outcome == "running" else 130
    finally:
        if outcome != "detached":
            # A failed lab keeps its dir (logs) until the next `up` or `down`.
            _teardown(lab_dir, keep=outcome == "failed")


# --- status, failover, switchover -------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    lab = remote.RemoteLab(LabDir(args.lab_dir))
    if args.json:
        print(
            json.dumps(
                {
                    "replications": lab.replications(),
                    "hosts": lab.state["hosts"],
                    "guests": lab.state["guests"],
                    "kubeconfig": lab.state["kubeconfig"],
                },
                indent=2,
            )
        )
        return 0
    if args.watch:
        with contextlib.suppress(KeyboardInterrupt):
            namespace, name = lab.pick(None, None)
            _live_until(lab, lambda o: False, None, namespace, name)
        return 0
    console.print(lab.view())
    return 0


def _print_result(result: demo.DemoResult) -> None:
    title = f"{result.kind}: {result.old} -> {result.new} ({result.namespace}/{result.name})"
    console.print(views.timeline_view(result.timeline, result.fault_at, title))
    console.print(views.client_view_text(result.client, result.checks))
    if result.error:
        err.print(f"[bold red]{result.error}[/]")
    if result.final is not None:
        console.print(views.replication_view(result.final))
    verdict = "[bold green]ok[/]" if result.ok else "[bold red]FAILED[/]"
    console.print(f"{result.kind}: {verdict}")


def _demo_live(lab: remote.RemoteLab, **kwargs: Any) -> demo.DemoResult:
    """demo.run, showing the replication as the demo watches it."""
    with Live(console=console, refresh_per_second=8, transient=True) as live:
        return demo.run(
            lab, on_change=lambda obj: live.update(views.replication_view(obj)), **kwargs
        )


def _run_demo(args: argparse.Namespace, kind: str) -> int:
    lab = remote.RemoteLab(LabDir(args.lab_dir))
    namespace, name = lab.pick(args.name, args.namespace)
    run = demo.run if args.json else _demo_live
    result = run(
        lab,
        kind=kind,
        name=name,
        namespace=namespace,
        target=getattr(args, "to", None),
        power_on_after=getattr(args, "power_on_after", None),
        reprotect=not getattr(args, "stay_down", False),
        timeout=args.timeout,
    )
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        _print_result(result)
    return 0 if result.ok else 1


def cmd_failover(args: argparse.Namespace) -> int:
    return _run_demo(args, "failover")


def cmd_switchover(args: argparse.Namespace) -> int:
    return _run_demo(args, "switchover")


def _print_events(lab: remote.RemoteLab, namespace: str, name: str) -> None:
    with contextlib.suppress(Exception):
        for event in lab.events(name, namespace)[-15:]:
            err.print(f"  event {event.get('reason')}: {event.get('message')}")


# --- down -------------------------------------------------------------------------------------


def _teardown(lab: LabDir, *, keep: bool = False, quiet: bool = False) -> None:
    if not quiet and lab.running():
        console.print("stopping the lab ...")
    stragglers = remote.teardown(lab, keep=keep)
    if stragglers and not quiet:
        err.print(
            f"[yellow]killed {len(stragglers)} leftover process(es):[/] "
            + ", ".join(f"{e['name']}({e['pid']})" for e in stragglers)
        )
    if keep and not quiet:
        console.print(f"[dim]kept {lab.path}[/]")


def cmd_down(args: argparse.Namespace) -> int:
    lab = LabDir(args.lab_dir)
    if not lab.path.exists():
        console.print(f"no lab in {lab.path}")
        return 0
    if not lab.looks_like_a_lab():
        raise control.LabError(f"{lab.path} is not a lab dir; not touching it")
    _teardown(lab, keep=args.keep)
    console.print("lab stopped; nothing left running")
    return 0


def _tail(path: Path, lines: int = 40) -> None:
    with contextlib.suppress(FileNotFoundError):
        text = path.read_text(errors="replace").splitlines()[-lines:]
        err.print(f"[dim]--- {path}[/]")
        err.print("\n".join(text), markup=False)


# --- argv -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xenha lab", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--lab-dir",
        type=Path,
        default=default_lab_dir(),
        help="where the lab lives (default: $XENHA_LAB_DIR, $XDG_RUNTIME_DIR/xenha-lab or "
        "/tmp/xenha-lab-$UID)",
    )
    # Also after the command (`xenha lab up --lab-dir D`), where it wins when given.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--lab-dir", type=Path, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", parents=[common], help="start the lab and protect a guest")
    up.add_argument("--mode", choices=("colo", "remus"), default="remus")
    up.add_argument("--hosts", type=int, default=2)
    up.add_argument("--detach", action="store_true", help="return once Protected, keep running")
    up.add_argument(
        "--demo",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="after Protected, run the failover demo (default: on unless --detach)",
    )
    up.add_argument("--timeout", type=float, default=300, help="seconds to reach Protected")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", parents=[common], help="the replication and the hosts")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", "-w", action="store_true", help="keep showing it")
    status.set_defaults(func=cmd_status)

    for name, func, helptext in (
        ("failover", cmd_failover, "power cut of the active host under client load"),
        ("switchover", cmd_switchover, "planned move to the standby (the annotation)"),
    ):
        cmd = sub.add_parser(name, parents=[common], help=helptext)
        cmd.add_argument("--name", help="the XenReplication (default: the lab's)")
        cmd.add_argument("--namespace", "-n")
        cmd.add_argument("--timeout", type=float, default=180)
        cmd.add_argument("--json", action="store_true", help="the result as JSON")
        if name == "failover":
            cmd.add_argument(
                "--power-on-after",
                type=float,
                default=2.0,
                help="seconds after the failover to power the dead host on again",
            )
            cmd.add_argument("--stay-down", action="store_true", help="leave the dead host off")
        else:
            cmd.add_argument("--to", help="target node (default: the standby)")
        cmd.set_defaults(func=func)

    down = sub.add_parser("down", parents=[common], help="stop everything the lab started")
    down.add_argument("--keep", action="store_true", help="keep the lab dir (logs)")
    down.set_defaults(func=cmd_down)
    return parser


def lab_main(argv: Sequence[str]) -> int:
    args = _parser().parse_args(list(argv))
    if getattr(args, "demo", None) is None and args.command == "up":
        args.demo = not args.detach
    try:
        return int(args.func(args))
    except (control.LabError, demo.NotReady) as exc:
        err.print(f"xenha lab: {exc}")
        return 1
