"""Async wrappers around the `xl` executable, with strict parsers for what it prints.

Parsers are pure functions over xl's text (tests feed them recorded output); `Xl` only runs
the command. Output that does not look like xl's is an error, never a guess: a misparsed
domain list could make the agent fence the wrong guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

DomainState = Literal["running", "paused", "shutdown", "crashed", "dying"]

# `xl list` prints one letter per flag: running, blocked, paused, shutdown,
# shutdown reason (-: none, r: reboot, s: suspend, c: crash, w: watchdog, S: soft reset), dying.
_STATE_FLAGS = re.compile(r"^[r-][b-][p-][s-][-rscwS?][d-]$")
_LIST_HEADER = ("Name", "ID", "Mem", "VCPUs", "State", "Time(s)")
_NOT_FOUND = ("is an invalid domain identifier", "does not exist")


class XlError(RuntimeError):
    """xl exited non-zero; carries its argv, exit code and stderr."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
        super().__init__(f"{' '.join(self.argv)} exited {returncode}: {detail}")


class DomainNotFound(XlError):
    """The named domain does not exist (xl: "... is an invalid domain identifier")."""


class XlTimeout(XlError):
    """xl did not finish in time and was killed."""


class XlOutputError(ValueError):
    """xl printed something its parser does not recognise."""


@dataclass(frozen=True)
class Domain:
    """One row of `xl list`."""

    name: str
    domid: int
    memory_mib: int
    vcpus: int
    flags: str
    cpu_time: float

    @property
    def state(self) -> DomainState:
        # The flags are independent (xl_list.c prints libxl_dominfo's running, blocked,
        # paused, shutdown, shutdown reason, dying): `--pss-` is a guest paused by the
        # toolstack while it was suspended for a checkpoint, e.g. fenced while xl remus was
        # blocked on a lost stream. The pause is what matters: it reads as paused.
        paused, shutdown, reason, dying = (self.flags[i] for i in range(2, 6))
        if dying == "d":
            return "dying"
        if shutdown == "s" and reason != "s":
            return "crashed" if reason == "c" else "shutdown"
        if paused == "p":
            return "paused"
        # Shut down for suspend and not paused: under Remus/COLO a checkpoint in progress
        # (real Xen shows `---ss-` in most samples), so the guest is running. "r" (on a CPU)
        # and "b" (blocked, idle) are both a running guest from outside.
        return "running"

    @property
    def paused(self) -> bool:
        return self.flags[2] == "p"


@dataclass(frozen=True)
class DomainDetails:
    """One entry of `xl list -l` (JSON): the domid and libxl's domain configuration."""

    domid: int
    name: str
    config: Mapping[str, Any]


@dataclass(frozen=True)
class XenInfo:
    """The parts of `xl info` the agent reports, plus every field as text."""

    fields: Mapping[str, str]

    @property
    def version(self) -> str:
        return f"{self.fields['xen_major']}.{self.fields['xen_minor']}"

    @property
    def total_memory_mib(self) -> int:
        return int(self.fields["total_memory"])

    @property
    def free_memory_mib(self) -> int:
        return int(self.fields["free_memory"])

    @property
    def host(self) -> str:
        return self.fields.get("host", "")

    @property
    def virt_caps(self) -> frozenset[str]:
        return frozenset(self.fields.get("virt_caps", "").split())


def parse_list(text: str) -> list[Domain]:
    """Parse `xl list` (with or without a domain argument)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise XlOutputError("xl list printed nothing")
    header = lines[0].split()
    if tuple(header[: len(_LIST_HEADER)]) != _LIST_HEADER:
        raise XlOutputError(f"xl list header not recognised: {lines[0]!r}")
    domains = []
    for line in lines[1:]:
        # Names may contain spaces; the five columns after the name never do.
        parts = line.rsplit(None, 5)
        if len(parts) != 6:
            raise XlOutputError(f"xl list row not recognised: {line!r}")
        name, domid, mem, vcpus, flags, cpu_time = parts
        if not _STATE_FLAGS.match(flags):
            raise XlOutputError(f"xl list state {flags!r} not recognised in {line!r}")
        try:
            domains.append(
                Domain(
                    name=name.strip(),
                    domid=int(domid),
                    memory_mib=int(mem),
                    vcpus=int(vcpus),
                    flags=flags,
                    cpu_time=float(cpu_time),
                )
            )
        except ValueError:
            raise XlOutputError(f"xl list row not recognised: {line!r}") from None
    return domains


def parse_list_long(text: str) -> list[DomainDetails]:
    """Parse `xl list -l` in its JSON output format (xl's default)."""
    try:
        data = json.loads(text) if text.strip() else []
    except json.JSONDecodeError as e:
        raise XlOutputError(f"xl list -l did not print JSON: {e}") from None
    if not isinstance(data, list):
        raise XlOutputError("xl list -l: expected a JSON array")
    result = []
    for entry in data:
        if not isinstance(entry, dict):
            raise XlOutputError("xl list -l: expected an object per domain")
        domid = entry.get("domid")
        config = entry.get("config")
        if not isinstance(domid, int) or isinstance(domid, bool) or not isinstance(config, dict):
            raise XlOutputError("xl list -l: entry without integer domid and config object")
        c_info = config.get("c_info")
        name = c_info.get("name") if isinstance(c_info, dict) else None
        if not isinstance(name, str):
            raise XlOutputError(f"xl list -l: domain {domid} has no c_info.name")
        result.append(DomainDetails(domid=domid, name=name, config=config))
    return result


def parse_info(text: str) -> XenInfo:
    """Parse `xl info`: `key<padding>: value` lines."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        key = key.strip()
        if not sep or not key or " " in key:
            raise XlOutputError(f"xl info line not recognised: {line!r}")
        fields[key] = value.strip()
    for required in ("xen_major", "xen_minor", "total_memory", "free_memory"):
        if required not in fields:
            raise XlOutputError(f"xl info has no {required}")
    try:
        int(fields["total_memory"])
        int(fields["free_memory"])
    except ValueError:
        raise XlOutputError("xl info memory fields are not integers") from None
    return XenInfo(fields=fields)


def remus_supports_colo(help_text: str) -> bool:
    """Whether `xl help remus` offers `-c` (the COLO patch in shared/seed)."""
    return any(line.strip().startswith("-c") and "COLO" in line for line in help_text.splitlines())


class Xl:
    """Runs `xl` subcommands. One instance per host; cheap to share."""

    def __init__(
        self,
        path: str = "xl",
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.path = path
        self.env = {**os.environ, **(env or {})}
        self.timeout = timeout

    async def run(self, *args: str) -> str:
        """Run `xl ARGS`, return stdout; raise XlError (or a subclass) on failure."""
        argv = [self.path, *args]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        try:
            async with asyncio.timeout(self.timeout):
                out, err = await proc.communicate()
        except TimeoutError:
            await _kill(proc)
            raise XlTimeout(argv, -9, "timed out") from None
        except asyncio.CancelledError:
            await _kill(proc)
            raise
        stderr = err.decode(errors="replace")
        if proc.returncode:
            cls = DomainNotFound if any(s in stderr for s in _NOT_FOUND) else XlError
            raise cls(argv, proc.returncode, stderr)
        return out.decode(errors="replace")

    async def list_domains(self) -> list[Domain]:
        return parse_list(await self.run("list"))

    async def list_long(self) -> list[DomainDetails]:
        return parse_list_long(await self.run("list", "-l"))

    async def info(self) -> XenInfo:
        return parse_info(await self.run("info"))

    async def domain(self, name: str) -> Domain | None:
        """The domain called `name`, or None when xl does not know it."""
        try:
            rows = parse_list(await self.run("list", name))
        except DomainNotFound:
            return None
        for row in rows:
            if row.name == name:
                return row
        return None

    async def supports_colo(self) -> bool:
        try:
            return remus_supports_colo(await self.run("help", "remus"))
        except XlError:
            return False

    async def pause(self, name: str) -> None:
        await self.run("pause", name)

    async def unpause(self, name: str) -> None:
        await self.run("unpause", name)

    async def destroy(self, name: str) -> None:
        await self.run("destroy", name)

    async def rename(self, old: str, new: str) -> None:
        await self.run("rename", old, new)


async def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    await proc.wait()
