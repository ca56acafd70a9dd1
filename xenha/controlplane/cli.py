"""``xenha controlplane build|up|status``."""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

from xenha.controlplane import build


def build_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="xenha controlplane build",
        description="Build the pinned etcd, kube-apiserver, kube-controller-manager, kubectl "
        f"and helm from the Go module proxy into {build.cache_root() / 'bin'} (once per "
        "version).",
    )
    parser.add_argument(
        "components", nargs="*", help="components to build (default: all in versions.json)"
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when cached")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="go build -p (default: 2-4)")
    args = parser.parse_args(argv)
    try:
        results = build.build_all(args.components or None, jobs=args.jobs, force=args.force)
    except (build.BuildError, KeyError) as exc:
        print(f"xenha controlplane build: {exc}", file=sys.stderr)
        return 1
    built = {k: s for k, s in results.items() if s}
    if built:
        total = sum(built.values())
        print(f"==> built {', '.join(built)} in {total:.0f}s", file=sys.stderr)
    return 0


def pin_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="xenha controlplane pin",
        description="Move a component (kube, etcd, helm) to another version: rewrites "
        "versions.json and the wrapper module's go.mod/go.sum (needs the Go module proxy).",
    )
    parser.add_argument("component")
    parser.add_argument("version", help="e.g. v1.37.3")
    args = parser.parse_args(argv)
    try:
        build.pin(args.component, args.version)
    except (build.BuildError, KeyError) as exc:
        print(f"xenha controlplane pin: {exc}", file=sys.stderr)
        return 1
    return 0


def status_main(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="xenha controlplane status").parse_args(argv)
    build.describe()
    return 0


def up_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="xenha controlplane up",
        description="Run etcd + kube-apiserver + kube-controller-manager on 127.0.0.1 until "
        "interrupted.",
    )
    parser.add_argument(
        "--kubeconfig", type=Path, help="also copy the admin kubeconfig to this path"
    )
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument(
        "--no-build", action="store_true", help="fail instead of building missing binaries"
    )
    args = parser.parse_args(argv)

    from xenha.controlplane.cluster import ControlPlane, ControlPlaneError

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)

    plane = ControlPlane(keep=args.keep, build=False if args.no_build else None)
    try:
        plane.start()
    except (ControlPlaneError, build.BuildError, build.MissingBinaryError) as exc:
        print(f"xenha controlplane up: {exc}", file=sys.stderr)
        return 1
    try:
        kubeconfig = plane.kubeconfig
        if args.kubeconfig:
            shutil.copyfile(plane.kubeconfig, args.kubeconfig)
            args.kubeconfig.chmod(0o600)
            kubeconfig = args.kubeconfig
        assert plane.binaries is not None
        print(f"control plane up in {plane.startup_seconds:.1f}s: {plane.server}")
        print(f"  export KUBECONFIG={kubeconfig}")
        print(f"  kubectl: {plane.binaries['kubectl']}")
        print(f"  logs:    {plane.workdir / 'logs'}")
        print("Ctrl-C to stop.", flush=True)
        while not stop.wait(1.0):
            if not plane.running:
                print("a control plane process exited; stopping", file=sys.stderr)
                for name in plane.pids:
                    print(f"--- {name}\n{plane.logs(name, 10)}", file=sys.stderr)
                return 1
        return 0
    finally:
        started = time.monotonic()
        plane.stop()
        print(f"stopped in {time.monotonic() - started:.1f}s", file=sys.stderr)


_COMMANDS = {"build": build_main, "up": up_main, "status": status_main, "pin": pin_main}


def controlplane_main(argv: list[str]) -> int:
    if not argv or argv[0] not in _COMMANDS:
        print("usage: xenha controlplane {build|up|status|pin} [options]", file=sys.stderr)
        return 0 if argv and argv[0] in {"-h", "--help"} else 2
    return _COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(controlplane_main(sys.argv[1:]))
