"""`xl remus` and `xl migrate-receive`: option handling and outcomes, as xl_migrate.c has them
(with the COLO patch of shared/seed); the stream work is in `remus` and `receive`."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from dataclasses import dataclass
from typing import Literal

from xenha.sim.hypercall import HypercallClient, HypercallError
from xenha.sim.receive import Receiver
from xenha.sim.remus import (
    BackChannel,
    DomainGone,
    RemusSettings,
    Saver,
    SuspendTimedOut,
    TransportBroken,
    migration_child_report,
    read_exactly,
    spawn_transport,
)
from xenha.sim.xl import Exit, Xl, getopts, print_help
from xenha.stream import format as fmt

DEFAULT_NETBUF_SCRIPT = "/etc/xen/scripts/remus-netbuf-setup"
DEFAULT_COLO_PROXY_SCRIPT = "/etc/xen/scripts/colo-proxy-setup"

Outcome = Literal["failed", "timeout"]


def _atoi(text: str) -> int:
    match = re.match(r"\s*([+-]?\d+)", text)
    return int(match[1]) if match else 0


@dataclass
class RemusArgs:
    interval: int = 0
    allow_unsafe: bool = False
    blackhole: bool = False
    compression: bool | None = None
    netbuf: bool | None = None
    diskbuf: bool | None = None
    netbufscript: str | None = None
    ssh_command: str = "ssh"
    daemonize: bool = True
    colo: bool = False
    userspace_colo_proxy: bool = False


def parse_remus_args(xl: Xl, argv: list[str]) -> tuple[RemusArgs, str, str]:
    opts, args = getopts(xl, argv, "Fbundi:s:N:ecp", "remus", 2)
    r = RemusArgs()
    for opt, value in opts:
        if opt == "-i":
            r.interval = _atoi(value)
        elif opt == "-F":
            r.allow_unsafe = True
        elif opt == "-b":
            r.blackhole = True
        elif opt == "-u":
            r.compression = False
        elif opt == "-n":
            r.netbuf = False
        elif opt == "-N":
            r.netbufscript = value
        elif opt == "-d":
            r.diskbuf = False
        elif opt == "-s":
            r.ssh_command = value
        elif opt == "-e":
            r.daemonize = False
        elif opt == "-c":
            r.colo = True
        elif opt == "-p":
            r.userspace_colo_proxy = True
    return r, args[0], args[1]


def remus(xl: Xl, argv: list[str]) -> int:
    r, dom, host = parse_remus_args(xl, argv)
    domid = xl.find_domain(dom)
    err = xl.err

    if not r.colo and not r.interval:
        r.interval = 200
    if r.userspace_colo_proxy and not r.colo:
        err.write("Option -p must be used in conjunction with -c")
        raise Exit(255)
    if r.colo:
        if r.interval or r.blackhole or r.netbuf is not None or r.diskbuf is not None:
            # perror(): the message, ": ", and errno's text (nothing failed: "Success").
            err.write("option -c is conflict with -i, -d, -n or -b: Success\n")
            raise Exit(255)
        if r.compression is None:
            err.write(
                "COLO can't be used with memory compression. "
                "Disable memory checkpoint compression now...: Success\n"
            )
            r.compression = False
    if r.netbufscript is None:
        r.netbufscript = DEFAULT_COLO_PROXY_SCRIPT if r.colo else DEFAULT_NETBUF_SCRIPT

    child: subprocess.Popen[bytes] | None = None
    back_fd = -1
    if r.blackhole:
        send_fd = os.open(os.devnull, os.O_RDWR)
    else:
        if not r.ssh_command:
            rune = host
        elif not r.colo:
            rune = (
                f"exec {r.ssh_command} {host} xl migrate-receive -r {'' if r.daemonize else ' -e'}"
            )
        else:
            rune = (
                f"exec {r.ssh_command} {host} xl migrate-receive --colo --coloft-script "
                f"{r.netbufscript} {'--userspace-colo-proxy' if r.userspace_colo_proxy else ''} "
                f"{'' if r.daemonize else ' -e'}"
            )
        try:
            config = xl.call("domain_config", domid=domid)["config"]
        except HypercallError:
            xl.libxl_error(
                "libxl_domain.c:2097:libxl_retrieve_domain_configuration",
                domid,
                "Failed to get domain info: No such process",
            )
            err.write(
                "No config file stored for running domain and none supplied - cannot start remus.\n"
            )
            return 1
        config_json = fmt.xl_config_bytes(_libxl_json(config))
        err.flush()
        child = spawn_transport(rune)
        assert child.stdin is not None
        assert child.stdout is not None
        send_fd, back_fd = child.stdin.fileno(), child.stdout.fileno()
        _preamble(xl, child, send_fd, back_fd, rune, config_json)

    outcome = _remus_start(xl, r, domid, send_fd, back_fd)

    # An admin `xl destroy` of the primary is the documented way to force a failover.
    ha = "COLO" if r.colo else "Remus"
    if xl.domain_info(domid) is None:
        err.write(f"{ha}: Primary domain has been destroyed.\n")
        _close(send_fd, child)
        return 0
    if outcome == "timeout":
        err.write("Failed to suspend domain at primary.\n")
    else:
        err.write(f"{ha}: Backup failed? resuming domain at primary.\n")
        with contextlib.suppress(HypercallError):
            xl.call("domain_resume", domid=domid)
    _close(send_fd, child)
    return 1


def _libxl_json(config: object) -> str:
    # One line with ", " and ": " separators: what real xl put in the stream observed on
    # Xen 4.17 ('{"c_info": {"type": "pv", "name": "counter", ...').
    return json.dumps(config)


def _preamble(
    xl: Xl,
    child: subprocess.Popen[bytes],
    send_fd: int,
    back_fd: int,
    rune: str,
    config: bytes,
) -> None:
    """migrate_do_preamble: the receiver's banner, then our xl header."""
    banner = read_exactly(back_fd, len(fmt.MIGRATE_RECEIVER_BANNER))
    if len(banner) < len(fmt.MIGRATE_RECEIVER_BANNER) or banner != fmt.MIGRATE_RECEIVER_BANNER:
        if len(banner) < len(fmt.MIGRATE_RECEIVER_BANNER):
            xl.err.write(
                "libxl: error: libxl_utils.c:514:libxl_read_exactly: file/stream truncated "
                "reading banner from migration receiver stream\n"
            )
        else:
            xl.err.write(
                "migration receiver stream contained unexpected data instead of banner\n"
                f"(command run was: {rune} )\n"
            )
        with contextlib.suppress(OSError):
            os.close(send_fd)
        migration_child_report(child, xl.err)
        raise Exit(1)
    try:
        data = memoryview(fmt.XlHeader(config).encode())
        while data:
            data = data[os.write(send_fd, data) :]
    except OSError as e:
        xl.err.write(
            "libxl: error: libxl_utils.c:462:libxl_write_exactly: failed to write "
            f"header for migration stream: {e.strerror}\n"
        )
        raise Exit(1) from None


def _remus_start(xl: Xl, r: RemusArgs, domid: int, send_fd: int, back_fd: int) -> Outcome:
    """libxl_domain_remus_start: validate, replicate, and return how it ended."""
    err = xl.err
    if not r.allow_unsafe and (r.blackhole or r.netbuf is False or r.diskbuf is False):
        xl.libxl_error(
            "libxl_remus.c:73:libxl_domain_remus_start",
            domid,
            "Unsafe mode must be enabled to replicate to /dev/null,"
            "disable network buffering and disk replication",
        )
        return "failed"
    physinfo = xl.physinfo()
    if r.colo and not physinfo.get("colo", True):
        xl.libxl_error("libxl_no_colo.c:31:libxl__colo_save_setup", domid, "COLO is not supported")
        return "failed"
    info = xl.domain_info(domid)
    if info is None:
        return "failed"
    settings = RemusSettings(
        interval_ms=r.interval,
        colo=r.colo,
        netbuf=r.netbuf is not False,
        blackhole=r.blackhole,
        domid=domid,
        ledger_name=str(info["name"]),
    )
    ack_client: HypercallClient | None = None
    back: BackChannel | None = None
    saver: Saver | None = None
    if back_fd >= 0:
        ack_client = HypercallClient(xl.hc.path)

        def on_ack(n: int) -> None:
            # The receiver acknowledges a checkpoint only after the saver wrote it, by
            # which time buffering (and with it the output session) was set up.
            assert ack_client is not None
            session = saver.output_session if saver is not None else None
            if session is None:
                return
            with contextlib.suppress(HypercallError, OSError):
                ack_client.call("output_commit", domid=domid, checkpoint=n, session=session)

        back = BackChannel(back_fd, on_ack=None if r.colo else on_ack)
    saver = Saver(xl.hc, settings, send_fd, back, err, physinfo=physinfo, info=info)
    outcome: Outcome = "failed"
    try:
        saver.run()
    except TransportBroken as e:
        err.write(
            f"xc: error: Failed to write to the stream: {e} (32 = Broken pipe): Internal error\n"
        )
        xl.libxl_error(
            "libxl_stream_write.c:350:libxl__xc_domain_save_done",
            domid,
            f"saving domain: {e}",
        )
    except DomainGone:
        pass
    except SuspendTimedOut:
        xl.libxl_error(
            "libxl_dom_suspend.c:320:suspend_common_wait_guest_timeout",
            domid,
            "guest did not suspend, timed out",
        )
        outcome = "timeout"
    except HypercallError as e:
        err.write(f"xc: error: hypercall failed: {e.strerror}: Internal error\n")
    saver.teardown(resume=False)
    if ack_client is not None:
        ack_client.close()
    return outcome


def _close(send_fd: int, child: subprocess.Popen[bytes] | None) -> None:
    with contextlib.suppress(OSError):
        os.close(send_fd)
    if child is not None and child.stdout is not None:
        with contextlib.suppress(OSError):
            child.stdout.close()


def migrate_receive(xl: Xl, argv: list[str]) -> int:
    opts, args = getopts(
        xl,
        argv,
        "Fedrcp",
        "migrate-receive",
        0,
        ["colo", "coloft-script=", "userspace-colo-proxy"],
    )
    mode: Literal["remus", "colo"] | None = None
    for opt, _value in opts:
        if opt == "-r":
            mode = "remus"
        elif opt in ("-c", "--colo"):
            mode = "colo"
    if args:
        print_help(xl.out, "migrate-receive")
        return 1
    if mode is None:
        xl.err.write("xl (simulated): only checkpointed streams (-r, --colo) are simulated\n")
        return 1
    physinfo = xl.physinfo()
    # A libxl without COLO refuses only once the domain is made (see Receiver).
    receiver = Receiver(xl.hc, mode, recv_fd=0, send_fd=1, err=xl.err, physinfo=physinfo)
    return receiver.run()
