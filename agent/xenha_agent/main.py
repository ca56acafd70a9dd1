"""`xenha agent`: parse the command line, build AgentSettings, run the Agent until SIGTERM.

Settings come from the environment (the DaemonSet sets NODE_NAME, XENHA_*); flags override
them for people running an agent by hand or in the lab. On SIGTERM/SIGINT the agent stops
its own work and exits 0, leaving the replicators running: the next agent re-attaches.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xenha_agent import logs
from xenha_agent.config import AgentSettings, SettingsError

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="xenha agent",
        description="The xenha node agent: replicators, fencing and failover on one Xen host.",
    )
    p.add_argument("--node", help="Kubernetes node name (default: $NODE_NAME)")
    p.add_argument("--namespace", help="agents' namespace (default: $XENHA_NAMESPACE)")
    p.add_argument("--kubeconfig", type=Path, help="default: $KUBECONFIG, else in-cluster")
    p.add_argument("--xl", help="path of the xl executable (default: $XENHA_XL or xl)")
    p.add_argument("--xenstore", type=Path, help="XenStore socket (default: $XENSTORED_PATH)")
    p.add_argument("--run-dir", type=Path, help="replicator sockets (default: $XENHA_RUN_DIR)")
    p.add_argument("--relay-address", help="relay bind address")
    p.add_argument("--relay-advertise", help="address peers dial")
    p.add_argument("--health-port", type=int, help="/healthz /readyz /metrics port (-1: off)")
    p.add_argument("--replicator-launcher", choices=("systemd-scope", "process"))
    p.add_argument("--log-format", choices=("json", "kv"))
    p.add_argument("--log-level")
    return p


def settings_from(argv: Sequence[str], env: dict[str, str] | None = None) -> AgentSettings:
    args = _parser().parse_args(list(argv))
    env = dict(os.environ if env is None else env)
    # Flags that AgentSettings checks go in before the first check, not after it.
    env["NODE_NAME"] = args.node or env.get("NODE_NAME", "")
    if args.run_dir is not None:
        env["XENHA_RUN_DIR"] = str(args.run_dir)
    base = AgentSettings.from_env(env)
    overrides: dict[str, Any] = {
        "namespace": args.namespace,
        "kubeconfig": args.kubeconfig,
        "xl_path": args.xl,
        "xenstore_socket": args.xenstore,
        "run_dir": args.run_dir,
        "relay_bind_address": args.relay_address,
        "relay_advertise_address": args.relay_advertise,
        "health_port": args.health_port,
        "replicator_launcher": args.replicator_launcher,
        "log_format": args.log_format,
        "log_level": args.log_level,
    }
    return dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})


def agent_main(argv: list[str]) -> int:
    """Entry point of `xenha agent` (argv without the program and subcommand names).

    `xenha agent replicator ...` and `xenha agent pipe ...` are the data plane's processes;
    they are dispatched lazily so that xl's transport (`pipe`) starts without importing the
    agent's control plane.
    """
    if argv[:1] == ["replicator"]:
        from xenha_agent.replicator import replicator_main

        return replicator_main(argv[1:])
    if argv[:1] == ["pipe"]:
        from xenha_agent.pipe import pipe_main

        return pipe_main(argv[1:])
    try:
        settings = settings_from(argv)
    except SettingsError as e:
        print(f"xenha agent: {e}")
        return 2
    logs.setup(settings.log_format, settings.log_level)
    log.info(
        "starting agent node=%s namespace=%s run_dir=%s",
        settings.node_name,
        settings.namespace,
        settings.run_dir,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(settings))
    return 0


async def _run(settings: AgentSettings) -> None:
    from xenha_agent.agent import Agent

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await Agent(settings).run(stop)
    log.info("agent stopped; replicators left running")
