"""What a replicator is started with: its config (pure) and the API reads it needs (thin I/O).

The spec becomes `xl` argv through `xenha.api.xlargs` (one function for both sides), so a
reader can follow `spec.mode` from the CRD to the command the replicator runs:
- primary: `xl remus ... -s "" <domain> "<python -m xenha_agent.pipe --socket <uid>.xl.sock>"`,
  dialing the standby's `XenNode.status.relayEndpoint`;
- secondary: `xl migrate-receive -r|--colo -e`, reached through this node's relay listener.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from pathlib import Path

from xenha.api.xlargs import receiver_argv, sender_argv
from xenha_agent.config import AgentSettings
from xenha_agent.kube import ApiError, KubeClient, secret_path, xennodes_path
from xenha_agent.pipe import transport_command
from xenha_agent.plan import ReplicationView
from xenha_agent.replicator_config import ReplicatorConfig, xl_socket_path
from xenha_agent.replicators import Role, write_tls

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TlsMaterial:
    """This node's part of the replication's `<xr>-tls` Secret (never logged)."""

    ca: bytes
    cert: bytes
    key: bytes

    def __repr__(self) -> str:
        return "TlsMaterial(<redacted>)"


def tls_secret_name(xr_name: str) -> str:
    return f"{xr_name}-tls"


async def read_tls(kube: KubeClient, view: ReplicationView, node: str) -> TlsMaterial | None:
    """None until the operator has issued this node's certificate (and granted `get`)."""
    try:
        secret = await kube.get(secret_path(view.namespace, tls_secret_name(view.name)))
        data = secret.get("data") or {}
        return TlsMaterial(
            ca=base64.b64decode(data["ca.crt"]),
            cert=base64.b64decode(data[f"{node}.crt"]),
            key=base64.b64decode(data[f"{node}.key"]),
        )
    except (ApiError, KeyError, ValueError) as e:
        # The kind of failure only: a Secret's content never reaches a log.
        log.info("%s/%s: TLS material not available yet (%s)", view.namespace, view.name, e)
        return None


async def relay_endpoint_of(kube: KubeClient, node: str) -> str | None:
    """Where `node`'s relay listens, as its agent reports it."""
    try:
        obj = await kube.get(xennodes_path(node))
    except ApiError as e:
        log.info("cannot read XenNode %s: %s", node, e)
        return None
    endpoint = (obj.get("status") or {}).get("relayEndpoint")
    return str(endpoint) if endpoint else None


def replicator_config(
    *,
    view: ReplicationView,
    role: Role,
    settings: AgentSettings,
    tls_files: tuple[Path, Path, Path],
    peer_address: str | None,
) -> ReplicatorConfig | None:
    """The replicator's config; None when nothing is to run (a blackhole has no receiver)."""
    peer = view.standby_node if role is Role.PRIMARY else view.active_node
    if not peer:
        return None
    run_dir, xl = settings.run_dir, settings.xl_path
    if role is Role.PRIMARY:
        transport = transport_command(str(xl_socket_path(run_dir, view.uid)))
        command = sender_argv(view.spec, transport, xl=xl)
    else:
        receiver = receiver_argv(view.spec, xl=xl)
        if receiver is None:
            return None
        command = receiver
    ca_file, cert_file, key_file = tls_files
    return ReplicatorConfig(
        uid=view.uid,
        role=role.value,
        domain=view.domain,
        node=settings.node_name,
        peer_node=peer,
        command=command,
        ca_file=ca_file,
        cert_file=cert_file,
        key_file=key_file,
        run_dir=run_dir,
        peer_address=peer_address if role is Role.PRIMARY else None,
        listen=None,  # behind this node's relay listener (SNI hand-off)
        xl=xl,
        xl_env=dict(settings.xl_env),
        heartbeat_timeout_ms=int(settings.heartbeat_timeout * 1000),
        # Four beats per timeout: enough to ride out one lost beat, and each beat wakes
        # three threads in each of the replication's two replicators.
        heartbeat_interval_ms=max(50, int(settings.heartbeat_timeout * 1000 / 4)),
        namespace=view.namespace,
        name=view.name,
    )


async def prepare(
    kube: KubeClient, view: ReplicationView, role: Role, settings: AgentSettings
) -> ReplicatorConfig | None:
    """Everything a launch needs from the API, written to the run dir; None: not yet."""
    peer = view.standby_node if role is Role.PRIMARY else view.active_node
    if not peer:
        return None
    peer_address = None
    if role is Role.PRIMARY:
        peer_address = await relay_endpoint_of(kube, peer)
        if peer_address is None:
            return None
    tls = await read_tls(kube, view, settings.node_name)
    if tls is None:
        return None
    files = write_tls(settings.run_dir, view.uid, ca=tls.ca, cert=tls.cert, key=tls.key)
    return replicator_config(
        view=view,
        role=role,
        settings=settings,
        tls_files=(files[0], files[1], files[2]),
        peer_address=peer_address,
    )
