"""From a validated spec to the exact `xl` command lines on both hosts.

Follows current xl (tools/xl/xl_migrate.c, main_remus / main_migrate_receive), which grew
out of the seed COLO patch:
- Remus: `-i <ms>` always (xl's own default is 200; writing it out makes the argv say what
  runs), `-u` when compression is off.
- COLO: `-c`, never `-i` (conflicts) nor `-u` (xl turns compression off for -c by itself);
  `-p` for the userspace proxy.
- `-F` for unsafe.allow, then `-b` / `-n` / `-d`; `-N <script>` when given.
- Transport: always `-s "" <domain> "<transport>"`. With an empty ssh command xl runs the
  last argument through /bin/sh as the transport (stdin = forward stream, stdout = back
  channel) instead of ssh-ing to a host.

No `-e` on the sender: xl remus uses it only to append `-e` to the `ssh ... xl
migrate-receive` rune it builds, and with `-s ""` it builds none, so the flag would do
nothing. The receiver is ours to start, and gets `-e` explicitly (see `receiver_argv`).
"""

from __future__ import annotations

from dataclasses import dataclass

from xenha.api.models import REMUS_DEFAULT_INTERVAL_MS, Mode, XenReplicationSpec


@dataclass(frozen=True)
class XlCommands:
    """The two halves of one replication."""

    sender: list[str]
    """`xl remus ...` on the primary (active) host."""
    receiver: list[str] | None
    """`xl migrate-receive ...` on the secondary, or None for a blackhole (xl remus -b
    writes checkpoints to /dev/null and never starts its transport, so nothing receives)."""


def sender_argv(spec: XenReplicationSpec, transport: str, *, xl: str = "xl") -> list[str]:
    """`xl remus` for `spec`, with `transport` as the shell command xl pipes the stream into.

    `spec` is expected validated (`parse_spec`); the Remus defaults are reapplied here only
    so that a spec built with `model_construct` cannot produce a different command.
    """
    argv = [xl, "remus"]
    checkpoint = spec.checkpoint
    if spec.mode is Mode.COLO:
        argv.append("-c")
        if spec.colo.userspace_proxy:
            argv.append("-p")
    else:
        argv += ["-i", str(checkpoint.interval_ms or REMUS_DEFAULT_INTERVAL_MS)]
        if checkpoint.compression is False:
            argv.append("-u")
    unsafe = spec.unsafe
    if unsafe.allow:
        argv.append("-F")
    if unsafe.blackhole:
        argv.append("-b")
    if unsafe.disable_network_buffering:
        argv.append("-n")
    if unsafe.disable_disk_replication:
        argv.append("-d")
    if spec.network_buffer_script:
        argv += ["-N", spec.network_buffer_script]
    return [*argv, "-s", "", spec.domain, transport]


def receiver_argv(spec: XenReplicationSpec, *, xl: str = "xl") -> list[str] | None:
    """`xl migrate-receive` for `spec`, run by the secondary's replicator on the relay's pipe.

    It is what xl remus itself would start through ssh, with two deliberate choices:
    - `-e` (no daemon): xl's receiver otherwise forks a background monitor after the restore
      that would inherit the relay pipe and outlive the replicator. The replicator must own
      the process: see its exit status, SIGKILL it to drop a replica, keep its stdin open.
    - COLO is spelled `--colo`: the seed patch added `-c`, but current xl only has the long
      option (its short options are "Fedrp"). Likewise `--coloft-script` carries -N's COLO
      proxy script and `--userspace-colo-proxy` matches -p, as xl's own ssh rune does.
    """
    if spec.unsafe.blackhole:
        return None
    argv = [xl, "migrate-receive"]
    if spec.mode is Mode.COLO:
        argv.append("--colo")
        if spec.network_buffer_script:
            argv += ["--coloft-script", spec.network_buffer_script]
        if spec.colo.userspace_proxy:
            argv.append("--userspace-colo-proxy")
    else:
        argv.append("-r")
    return [*argv, "-e"]


def xl_commands(spec: XenReplicationSpec, transport: str, *, xl: str = "xl") -> XlCommands:
    """Both command lines of `spec`; see `sender_argv` and `receiver_argv`."""
    return XlCommands(
        sender=sender_argv(spec, transport, xl=xl), receiver=receiver_argv(spec, xl=xl)
    )
