"""An `xl` for simulated hosts: same syntax, output, messages and exit codes as Xen's.

    XENHA_SIM_STATE=<state-dir> python -m xenha.sim.xl <subcommand> ...
    <state-dir>/bin/xl <subcommand> ...          (the wrapper the host writes)

Subcommands: list [-l] [dom], info [name], create [-p] [-q] <cfg> [key=value...],
destroy, pause, unpause, rename, domid, domname, remus, migrate-receive, help.

Messages and exit codes come from tools/xl (xl_utils.c def_getopt, find_domain;
xl_info.c; xl_vmcontrol.c; xl_migrate.c main_remus / migrate_receive, with the COLO patch
of shared/seed). Where xl passes libxl's failure through as a log line, the line has libxl's
shape (`libxl: error: <file>:<line>:<function>: ...`); the line numbers are nominal.
"""

from __future__ import annotations

import errno
import getopt
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from xenha.sim import paths, xlcfg
from xenha.sim.hypercall import HypercallClient, HypercallError

ERROR_FAIL = -3
ERROR_INVAL = -6
ERROR_DOMAIN_NOTFOUND = -21
DOM0_NAME = "Domain-0"


class Exit(Exception):
    def __init__(self, code: int) -> None:
        self.code = code


@dataclass(frozen=True)
class Command:
    name: str
    func: Callable[[Xl, list[str]], int]
    # In xl_cmdtable.c's order: can_dryrun, then modifies.
    can_dryrun: bool
    modifies: bool
    desc: str
    usage: str
    options: str = ""


class Xl:
    def __init__(self, state_dir: Path, out: TextIO, err: TextIO) -> None:
        self.state_dir = state_dir
        self.out = out
        self.err = err
        self._hc: HypercallClient | None = None
        self.common_domname: str | None = None

    # --- the "libxl context" ------------------------------------------------------------

    @property
    def hc(self) -> HypercallClient:
        if self._hc is None:
            try:
                self._hc = HypercallClient(paths.hypercall_socket(self.state_dir))
            except OSError as e:
                # What xl says on a host whose hypervisor interface is gone.
                self.err.write(
                    "xencall: error: Could not obtain handle on privileged command interface:"
                    f" {os.strerror(e.errno or errno.ENOENT)}\n"
                    "libxl: error: libxl.c:102:libxl_ctx_alloc: cannot open libxc handle:"
                    f" {os.strerror(e.errno or errno.ENOENT)}\n"
                    "cannot init xl context\n"
                )
                raise Exit(1) from None
        return self._hc

    def call(self, op: str, **args: Any) -> dict[str, Any]:
        try:
            return self.hc.call(op, **args)
        except HypercallError as e:
            if e.errno == errno.ECONNRESET:
                self.err.write("xencall: error: hypercall failed: Connection reset by peer\n")
                raise Exit(1) from None
            raise

    def physinfo(self) -> dict[str, Any]:
        return self.call("physinfo")

    def domains(self) -> list[dict[str, Any]]:
        domains: list[dict[str, Any]] = self.call("domain_list")["domains"]
        return domains

    def domain_info(self, domid: int) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = self.call("domain_info", domid=domid)["domain"]
            return info
        except HypercallError:
            return None

    def name_of(self, domid: int) -> str | None:
        if domid == 0:
            return DOM0_NAME
        info = self.domain_info(domid)
        return None if info is None else str(info["name"])

    def find_domain(self, qualifier: str) -> int:
        """xl_utils.c find_domain: digits are a domid (not checked), anything else a name."""
        if qualifier.isdigit():
            domid = int(qualifier)
        elif qualifier == DOM0_NAME:
            domid = 0
        else:
            match = [d for d in self.domains() if d["name"] == qualifier]
            if not match:
                self.err.write(f"{qualifier} is an invalid domain identifier (rc={ERROR_INVAL})\n")
                raise Exit(1)
            domid = int(match[0]["domid"])
        self.common_domname = self.name_of(domid)
        return domid

    def libxl_error(self, where: str, domid: int | None, message: str) -> None:
        prefix = f"Domain {domid}:" if domid is not None else ""
        self.err.write(f"libxl: error: {where}: {prefix}{message}\n")

    def close(self) -> None:
        if self._hc is not None:
            self._hc.close()


# --- option parsing (xl_utils.c def_getopt) ---------------------------------------------------


def getopts(
    xl: Xl,
    argv: list[str],
    optstring: str,
    command: str,
    required: int,
    longopts: Sequence[str] = (),
) -> tuple[list[tuple[str, str]], list[str]]:
    try:
        opts, args = getopt.gnu_getopt(argv, "h" + optstring, [*longopts, "help"])
    except getopt.GetoptError as e:
        xl.err.write(f"option `{e.opt}' not supported.\n")
        raise Exit(2) from None
    if any(o in ("-h", "--help") for o, _ in opts):
        print_help(xl.out, command)
        raise Exit(0)
    if len(args) < required:
        plural = "s" if required > 1 else ""
        xl.err.write(f"'xl {command}' requires at least {required} argument{plural}.\n\n")
        print_help(xl.out, command)
        raise Exit(2)
    return opts, args


def print_help(out: TextIO, command: str | None) -> None:
    if not command or command == "help":
        out.write("Usage xl [-vfNtT] <subcommand> [args]\n\nxl full list of subcommands:\n\n")
        for entry in COMMANDS.values():
            out.write(f" {entry.name:<19} ")
            if len(entry.name) > 19:
                out.write(f"\n {'':<19} ")
            out.write(f"{entry.desc}\n")
        return
    cmd = lookup(command)
    if cmd is None:
        out.write(f'command "{command}" not implemented\n')
        return
    flags = ("f" if cmd.modifies else "") + ("N" if cmd.can_dryrun else "")
    out.write(f"Usage: xl [-v{flags}] {cmd.name} {cmd.usage}\n\n{cmd.desc}.\n\n")
    if cmd.options:
        out.write(f"Options:\n\n{cmd.options}\n")


def lookup(name: str) -> Command | None:
    """cmdtable_lookup: exact name, or an unambiguous prefix."""
    if name in COMMANDS:
        return COMMANDS[name]
    found = [c for n, c in COMMANDS.items() if n.startswith(name)]
    return found[0] if len(found) == 1 else None


# --- list / info --------------------------------------------------------------------------


def main_list(xl: Xl, argv: list[str]) -> int:
    opts, args = getopts(
        xl, argv, "lvZcn", "list", 0, ["long", "verbose", "context", "cpupool", "numa"]
    )
    details = any(o in ("-l", "--long") for o, _ in opts)
    if len(args) > 1:
        print_help(xl.out, "list")
        return 1
    if args:
        domid = xl.find_domain(args[0])
        if domid == 0:
            rows = [_dom0_row(xl)]
        else:
            info = xl.domain_info(domid)
            if info is None:
                xl.err.write(f"Error: Domain '{args[0]}' does not exist.\n")
                return 1
            rows = [info]
    else:
        rows = [_dom0_row(xl), *xl.domains()]
    if details:
        entries = []
        for row in rows:
            if row["domid"] == 0:
                continue  # libxl keeps no configuration for dom0
            config = xl.call("domain_config", domid=row["domid"])["config"]
            entries.append({"domid": row["domid"], "config": config})
        xl.out.write(json.dumps(entries, indent=4) + "\n")
        return 0
    xl.out.write("Name                                        ID   Mem VCPUs\tState\tTime(s)\n")
    for row in rows:
        xl.out.write(
            f"{row['name']:<40} {row['domid']:5d} {row['memory_mib']:5d} {row['vcpus']:5d}"
            f"     {row['flags']}  {row['cpu_time']:8.1f}\n"
        )
    return 0


def _dom0_row(xl: Xl) -> dict[str, Any]:
    info = xl.physinfo()
    return {
        "name": DOM0_NAME,
        "domid": 0,
        "memory_mib": info["dom0_memory_mib"],
        "vcpus": info["nr_cpus"],
        "flags": "r-----",
        "cpu_time": float(info.get("uptime", 0.0)) * 0.05,
    }


def main_info(xl: Xl, argv: list[str]) -> int:
    opts, args = getopts(xl, argv, "n", "info", 0, ["numa"])
    info = xl.physinfo()
    major, minor = info["xen_major"], info["xen_minor"]
    extra = info["xen_version"][len(f"{major}.{minor}") :]
    uname = os.uname()
    ncpu = info["nr_cpus"]
    lines = [
        ("host", info["name"]),
        ("release", uname.release),
        ("version", uname.version),
        ("machine", uname.machine),
        ("nr_cpus", str(ncpu)),
        ("max_cpu_id", str(ncpu - 1)),
        ("nr_nodes", "1"),
        ("cores_per_socket", str(ncpu)),
        ("threads_per_core", "1"),
        ("cpu_mhz", "2000.000"),
        ("hw_caps", "178bfbff:f6f83203:2c100800:00000121:0000000f:009c4fbb:00000004:00000100"),
        ("virt_caps", "".join(f" {c}" for c in info["virt_caps"])),
        ("total_memory", str(info["total_memory_mib"])),
        ("free_memory", str(info["free_memory_mib"])),
        ("sharing_freed_memory", "0"),
        ("sharing_used_memory", "0"),
        ("outstanding_claims", "0"),
        ("free_cpus", "0"),
        ("xen_major", str(major)),
        ("xen_minor", str(minor)),
        ("xen_extra", extra),
        ("xen_version", info["xen_version"]),
        ("xen_caps", "xen-3.0-x86_64 hvm-3.0-x86_32 hvm-3.0-x86_32p hvm-3.0-x86_64"),
        ("xen_scheduler", "credit2"),
        ("xen_pagesize", "4096"),
        ("platform_params", "virt_start=0xffff800000000000"),
        ("xen_changeset", ""),
        ("xen_commandline", "placeholder dom0_mem=1024M,max:1024M"),
        ("cc_compiler", "gcc (Debian 12.2.0-14) 12.2.0"),
        ("cc_compile_by", "xenha-sim"),
        ("cc_compile_domain", "xenha.io"),
        ("cc_compile_date", "Thu Nov 26 00:00:00 UTC 2026"),
        ("build_id", "0000000000000000000000000000000000000000"),
        ("xend_config_format", "4"),
    ]
    wanted = args[0] if args and not opts else None
    for key, value in lines:
        text = f"{key:<23}: {value}" if key != "virt_caps" else f"{key:<23}:{value}"
        if wanted is None:
            xl.out.write(text + "\n")
        elif key.startswith(wanted):
            xl.out.write(value.lstrip() + "\n")
    return 0


# --- domain life ----------------------------------------------------------------------------


def main_create(xl: Xl, argv: list[str]) -> int:
    opts, args = getopts(
        xl, argv, "Fnqf:pcdeVA", "create", 0, ["quiet", "dryrun", "defconfig=", "vncviewer"]
    )
    flags = {o for o, _ in opts}
    config_file = next((v for o, v in opts if o in ("-f", "--defconfig")), None)
    extra = []
    for arg in args:
        if "=" in arg:
            extra.append(arg)
        elif config_file is None:
            config_file = arg
        else:
            print_help(xl.out, "create")
            return 2
    if config_file is None:
        xl.err.write("Config file not specified\n")
        return 1
    if not flags & {"-q", "--quiet"}:
        xl.err.write(f"Parsing config from {config_file}\n")
    try:
        text = Path(config_file).read_text()
    except OSError as e:
        xl.err.write(f"Failed to read config file: {config_file}: {e.strerror}\n")
        return 1
    try:
        settings = xlcfg.parse(text + "\n" + "\n".join(extra), config_file)
        guest = xlcfg.GuestConfig.from_settings(settings)
    except xlcfg.ConfigError as e:
        xl.err.write(f"{e}\n")
        return 1
    if flags & {"-n", "--dryrun"}:
        xl.out.write(json.dumps(guest.libxl_json(), indent=4) + "\n")
        return 0
    try:
        xl.call(
            "domain_create",
            config=guest.libxl_json(),
            paused="-p" in flags,
            incoming=False,
            colo=False,
        )
    except HypercallError as e:
        xl.libxl_error("libxl_create.c:689:libxl__domain_make", None, e.strerror or "")
        xl.libxl_error(
            "libxl_create.c:1260:initiate_domain_create", None, f"cannot make domain: {ERROR_FAIL}"
        )
        return 1
    return 0


def main_destroy(xl: Xl, argv: list[str]) -> int:
    opts, args = getopts(xl, argv, "f", "destroy", 1)
    force = any(o == "-f" for o, _ in opts)
    domid = xl.find_domain(args[0])
    if domid == 0 and not force:
        xl.err.write(
            "Not destroying domain 0; use -f to force.\n"
            "This can only be done when using a disaggregated hardware domain and toolstack.\n\n"
        )
        return 1
    try:
        xl.call("domain_destroy", domid=domid)
    except HypercallError:
        xl.libxl_error("libxl_domain.c:1177:libxl__destroy_domid", domid, "Non-existant domain")
        xl.libxl_error(
            "libxl_domain.c:1131:domain_destroy_callback", domid, "Unable to destroy guest"
        )
        xl.libxl_error(
            "libxl_domain.c:1058:domain_destroy_cb", domid, "Destruction of domain failed"
        )
        xl.err.write(f"destroy failed (rc={ERROR_DOMAIN_NOTFOUND})\n")
        return 1
    return 0


def main_pause(xl: Xl, argv: list[str]) -> int:
    _opts, args = getopts(xl, argv, "", "pause", 1)
    domid = xl.find_domain(args[0])
    try:
        xl.call("domain_pause", domid=domid)
    except HypercallError as e:
        # xl ignores libxl_domain_pause's result; only libxl's log says something.
        xl.libxl_error("libxl_domain.c:621:libxl_domain_pause", domid, f"Pausing domain: {_why(e)}")
    return 0


def main_unpause(xl: Xl, argv: list[str]) -> int:
    _opts, args = getopts(xl, argv, "", "unpause", 1)
    domid = xl.find_domain(args[0])
    try:
        xl.call("domain_unpause", domid=domid)
    except HypercallError as e:
        xl.libxl_error(
            "libxl_domain.c:664:libxl_domain_unpause", domid, f"Unpausing domain: {_why(e)}"
        )
    return 0


def _why(e: HypercallError) -> str:
    return "No such process" if e.errno == errno.ESRCH else (e.strerror or "Invalid argument")


def main_rename(xl: Xl, argv: list[str]) -> int:
    _opts, args = getopts(xl, argv, "", "rename", 2)
    dom, new_name = args[0], args[1]
    domid = xl.find_domain(dom)
    try:
        xl.call("domain_rename", domid=domid, name=new_name)
    except HypercallError as e:
        if e.errno == errno.EEXIST:
            xl.libxl_error(
                "libxl_domain.c:456:libxl__domain_rename",
                domid,
                f'domain with name "{new_name}" already exists.',
            )
        xl.err.write(f"Can't rename domain '{dom}'.\n")
        return 1
    return 0


def main_domid(xl: Xl, argv: list[str]) -> int:
    _opts, args = getopts(xl, argv, "", "domid", 1)
    name = args[0]
    if name == DOM0_NAME:
        xl.out.write("0\n")
        return 0
    match = [d for d in xl.domains() if d["name"] == name]
    if not match:
        xl.err.write(
            f"Can't get domid of domain name '{name}', maybe this domain does not exist.\n"
        )
        return 1
    xl.out.write(f"{match[0]['domid']}\n")
    return 0


def main_domname(xl: Xl, argv: list[str]) -> int:
    _opts, args = getopts(xl, argv, "", "domname", 1)
    if not args[0].isdigit():
        xl.err.write("Invalid domain id.\n\n")
        return 1
    name = xl.name_of(int(args[0]))
    if name is None:
        xl.err.write(
            f"Can't get domain name of domain id '{args[0]}', maybe this domain does not exist.\n"
        )
        return 1
    xl.out.write(f"{name}\n")
    return 0


# --- replication --------------------------------------------------------------------------


def main_remus(xl: Xl, argv: list[str]) -> int:
    from xenha.sim.remus_cli import remus

    return remus(xl, argv)


def main_migrate_receive(xl: Xl, argv: list[str]) -> int:
    from xenha.sim.remus_cli import migrate_receive

    return migrate_receive(xl, argv)


def main_help(xl: Xl, argv: list[str]) -> int:
    print_help(xl.out, argv[0] if argv else None)
    return 0


REMUS_OPTIONS = (
    "-i MS                   Checkpoint domain memory every MS milliseconds (def. 200ms).\n"
    "-u                      Disable memory checkpoint compression.\n"
    "-s <sshcommand>         Use <sshcommand> instead of ssh.  String will be passed\n"
    "                        to sh. If empty, run <host> instead of \n"
    "                        ssh <host> xl migrate-receive -r [-e]\n"
    "-e                      Do not wait in the background (on <host>) for the death\n"
    "                        of the domain.\n"
    "-N <netbufscript>       Use netbufscript to setup network buffering instead of the\n"
    "                        default script (/etc/xen/scripts/remus-netbuf-setup).\n"
    "-F                      Enable unsafe configurations [-b|-n|-d flags]. Use this option\n"
    "                        with caution as failover may not work as intended.\n"
    "-b                      Replicate memory checkpoints to /dev/null (blackhole).\n"
    "                        Works only in unsafe mode.\n"
    "-n                      Disable network output buffering. Works only in unsafe mode.\n"
    "-d                      Disable disk replication. Works only in unsafe mode.\n"
    "-c                      Enable COLO HA. This option conflicts with -i and -b, and memory\n"
    "                        checkpoint compression must be disabled.\n"
    "-p                      Use userspace COLO Proxy. This option must be used in conjunction\n"
    "                        with -c."
)

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "create",
            main_create,
            True,
            True,
            "Create a domain from config file <filename>",
            "<ConfigFile> [options] [vars]",
            "-h                      Print this help.\n"
            "-p                      Leave the domain paused after it is created.\n"
            "-q, --quiet             Quiet.\n"
            "-n, --dryrun            Dry run - prints the resulting configuration.",
        ),
        Command(
            "list",
            main_list,
            False,
            False,
            "List information about all/some domains",
            "[options] [Domain]\n",
            "-l, --long              Output all VM details\n"
            "-v, --verbose           Prints out UUIDs and security context\n"
            "-Z, --context           Prints out security context\n"
            "-c, --cpupool           Prints the cpupool the domain is in\n"
            "-n, --numa              Prints out NUMA node affinity",
        ),
        Command(
            "destroy",
            main_destroy,
            False,
            True,
            "Terminate a domain immediately",
            "[options] <Domain>\n",
            "-f                      Permit destroying domain 0, which will only succeed\n"
            "                        when run from disaggregated toolstack domain with a\n"
            "                        hardware domain distinct from domain 0.",
        ),
        Command("pause", main_pause, False, True, "Pause execution of a domain", "<Domain>"),
        Command("unpause", main_unpause, False, True, "Unpause a paused domain", "<Domain>"),
        Command(
            "migrate-receive",
            main_migrate_receive,
            False,
            True,
            "Restore a domain from a saved state",
            "- for internal use only",
        ),
        Command(
            "info",
            main_info,
            False,
            False,
            "Get information about Xen host",
            "-n, --numa         List host NUMA topology information",
        ),
        Command(
            "domid", main_domid, False, False, "Convert a domain name to domain id", "<DomainName>"
        ),
        Command(
            "domname",
            main_domname,
            False,
            False,
            "Convert a domain id to domain name",
            "<DomainId>",
        ),
        Command("rename", main_rename, False, True, "Rename a domain", "<Domain> <NewDomainName>"),
        Command(
            "remus",
            main_remus,
            False,
            True,
            "Enable Remus HA or COLO HA for domain",
            "[options] <Domain> [<host>]",
            REMUS_OPTIONS,
        ),
        Command("help", main_help, False, False, "Print this help", "[command]"),
    )
}


def main(
    argv: Sequence[str] | None = None, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    out = out or sys.stdout
    err = err or sys.stderr
    state = os.environ.get(paths.STATE_ENV)
    # Global options (xl.c): -v -f -N -t -T before the subcommand.
    while args and args[0].startswith("-") and len(args[0]) > 1 and args[0] != "--":
        if args[0] in ("-h", "--help"):
            print_help(out, None)
            return 0
        if any(ch not in "vfNtT" for ch in args[0][1:]):
            err.write(f"option `{args[0][1]}' not supported.\n")
            return 2
        args.pop(0)
    if not args:
        print_help(out, None)
        return 2
    name, rest = args[0], args[1:]
    cmd = lookup(name)
    if cmd is None:
        err.write("command not implemented\n")
        return 1
    if state is None and cmd.name != "help":
        err.write(f"xl (simulated): {paths.STATE_ENV} is not set; run the host's bin/xl instead\n")
        return 1
    xl = Xl(Path(state or "."), out, err)
    try:
        return cmd.func(xl, rest)
    except Exit as e:
        return e.code
    except BrokenPipeError:
        return 1
    except (TimeoutError, ConnectionError) as e:
        err.write(f"xencall: error: hypercall failed: {e}\n")
        return 1
    finally:
        out.flush()
        err.flush()
        xl.close()


def fatal(err: TextIO, message: str, code: int = 1) -> NoReturn:
    err.write(message)
    raise Exit(code)


if __name__ == "__main__":
    # Run the copy of this module that the rest of the package imports (`remus_cli` raises
    # `xenha.sim.xl.Exit`, which `__main__.Exit` would not catch).
    from xenha.sim import xl as _xl

    sys.exit(_xl.main())
