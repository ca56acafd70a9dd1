"""The `xenha` console script.

Each subcommand lives in the module that owns the idea; this file only dispatches, and imports
lazily so that `xenha agent pipe` (started by xl for every checkpoint stream) and the agent never
pay for importing kopf, and the operator image never needs the Xen driver.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence

# command words -> "module:function"; the function takes the remaining argv and returns an
# exit code. Longest match wins, so `agent pipe` beats `agent`.
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("operator",): ("xenha_operator.main:operator_main", "run the operator (kopf)"),
    ("agent",): ("xenha_agent.main:agent_main", "run the node agent on a Xen host"),
    ("agent", "replicator"): (
        "xenha_agent.replicator:replicator_main",
        "one replication's long-lived data plane (started by the agent)",
    ),
    ("agent", "pipe"): (
        "xenha_agent.pipe:pipe_main",
        "xl's transport: splice stdin/stdout to the replicator",
    ),
    ("crd",): ("xenha.api.crd:crd_main", "generate or check the CRDs from the models"),
    ("validate",): ("xenha.api.cli:validate_main", "validate XenReplication files, print xl argv"),
    ("controlplane",): (
        "xenha.controlplane.cli:controlplane_main",
        "build or run etcd + kube-apiserver",
    ),
    ("sim",): ("xenha.sim.cli:sim_main", "run simulated Xen hosts"),
    ("lab",): ("xenha.lab.cli:lab_main", "the local lab: up, status, failover, switchover, down"),
    ("realxen", "build"): (
        "xenha.realxen.image:main",
        "build the real Xen 4.17 dom0 image for QEMU (cached)",
    ),
    ("realxen", "record"): (
        "xenha.realxen.record:main",
        "boot two real Xen hosts and record an xl remus stream",
    ),
    ("realxen", "vectors"): (
        "xenha.realxen.vectors:main",
        "cut codec test vectors out of a recording",
    ),
}


def _resolve(argv: Sequence[str]) -> tuple[Callable[[list[str]], int], list[str]] | None:
    for size in range(min(len(argv), 2), 0, -1):
        entry = COMMANDS.get(tuple(argv[:size]))
        if entry is not None:
            module_name, _, func_name = entry[0].partition(":")
            func = getattr(importlib.import_module(module_name), func_name)
            return func, list(argv[size:])
    return None


def usage() -> str:
    lines = ["usage: xenha <command> [args]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<20} {help_text}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in {"-h", "--help", "help"}:
        print(usage())
        return 0
    if args[0] == "--version":
        from xenha import __version__

        print(__version__)
        return 0
    resolved = _resolve(args)
    if resolved is None:
        print(f"xenha: unknown command {args[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    func, rest = resolved
    return int(func(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
