"""xl's domain config syntax (a subset of libxlu_cfg) and its translation to libxl's JSON.

    name = "db1"          # strings in double or single quotes
    memory = 64           # MiB
    vcpus = 1
    type = "pv"
    vif = [ 'mac=00:16:3e:00:00:01' ]   # lists are parsed and ignored
    sim_dirty_rate = 500  # simulator only: pages dirtied per second
    sim_service_port = 0  # simulator only: the guest's counter service (0: pick one)
    sim_service_ip = "127.0.0.1"
    sim_divergence = 0.0  # simulator only: chance a reply differs between COLO copies

Statements end at a newline or `;`. Keys xl does not know are kept and ignored, as xl does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

Value = int | float | str | list[Any]

_TOKEN = re.compile(
    r"""
    (?P<ws>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<nl>[\n;])
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>0x[0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_.]*)
  | (?P<punct>[=\[\],+])
    """,
    re.VERBOSE,
)


class ConfigError(ValueError):
    """A syntax error, reported the way libxlu does: `file:line: config parsing error ...`."""


def _unquote(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), body)


def parse(text: str, source: str = "<config>") -> dict[str, Value]:
    tokens: list[tuple[str, str, int]] = []
    line = 1
    pos = 0
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ConfigError(
                f"{source}:{line}: config parsing error near `{text[pos : pos + 10].split()[0]}': "
                "syntax error, unexpected character"
            )
        kind = match.lastgroup or ""
        if kind == "nl":
            tokens.append(("nl", match[0], line))
            if match[0] == "\n":
                line += 1
        elif kind not in ("ws", "comment"):
            tokens.append((kind, match[0], line))
        pos = match.end()
    tokens.append(("nl", "", line))

    out: dict[str, Value] = {}
    i = 0

    def error(at: int, what: str) -> ConfigError:
        _kind, tok, tline = tokens[min(at, len(tokens) - 1)]
        return ConfigError(
            f"{source}:{tline}: config parsing error near `{tok or 'end of file'}': "
            f"syntax error, {what}"
        )

    def value(at: int) -> tuple[Value, int]:
        kind, tok, _ = tokens[at]
        if kind == "str":
            return _unquote(tok), at + 1
        if kind == "num":
            if tok.startswith("0x"):
                return int(tok, 16), at + 1
            return (float(tok) if "." in tok else int(tok)), at + 1
        if kind == "punct" and tok == "[":
            items: list[Any] = []
            at += 1
            while True:
                while tokens[at][0] == "nl" and tokens[at][1] == "\n":
                    at += 1
                if tokens[at][1] == "]":
                    return items, at + 1
                item, at = value(at)
                items.append(item)
                while tokens[at][0] == "nl" and tokens[at][1] == "\n":
                    at += 1
                if tokens[at][1] == ",":
                    at += 1
                elif tokens[at][1] != "]":
                    raise error(at, "expecting ',' or ']'")
        raise error(at, "unexpected value")

    while i < len(tokens):
        kind, tok, _ = tokens[i]
        if kind == "nl":
            i += 1
            continue
        if kind != "ident":
            raise error(i, "expecting a setting name")
        if tokens[i + 1][1] != "=":
            raise error(i + 1, "expecting '='")
        val, i = value(i + 2)
        if tokens[i][0] != "nl":
            raise error(i, "expecting end of statement")
        out[tok] = val
    return out


@dataclass(frozen=True)
class GuestConfig:
    name: str
    memory_mib: int = 128
    vcpus: int = 1
    type: str = "pv"
    uuid: str | None = None
    kernel: str | None = None
    dirty_rate: float = 0.0
    service_ip: str = "127.0.0.1"
    service_port: int = 0
    divergence: float = 0.0

    @classmethod
    def from_settings(cls, settings: dict[str, Value]) -> GuestConfig:
        name = settings.get("name")
        if not isinstance(name, str) or not name:
            raise ConfigError("Domain name must be specified.")
        memory = settings.get("memory", 128)
        return cls(
            name=name,
            memory_mib=int(memory) if isinstance(memory, int | float | str) else 128,
            vcpus=int(_num(settings.get("vcpus", 1))),
            type=str(settings.get("type", "pv")),
            uuid=str(settings["uuid"]) if "uuid" in settings else None,
            kernel=str(settings["kernel"]) if "kernel" in settings else None,
            dirty_rate=float(_num(settings.get("sim_dirty_rate", 0))),
            service_ip=str(settings.get("sim_service_ip", "127.0.0.1")),
            service_port=int(_num(settings.get("sim_service_port", 0))),
            divergence=float(_num(settings.get("sim_divergence", 0.0))),
        )

    def libxl_json(self) -> dict[str, Any]:
        """The domain config as libxl_domain_config_to_json gives it (the parts we model)."""
        c_info: dict[str, Any] = {"type": self.type, "name": self.name}
        if self.uuid:
            c_info["uuid"] = self.uuid
        b_info: dict[str, Any] = {
            "max_vcpus": self.vcpus,
            "avail_vcpus": list(range(self.vcpus)),
            "max_memkb": self.memory_mib * 1024,
            "target_memkb": self.memory_mib * 1024,
            "shadow_memkb": 0,
            "sched_params": {},
            "type.pv": {"kernel": self.kernel} if self.kernel else {},
            "arch_arm": {},
            "arch_x86": {"msr_relaxed": "False"},
        }
        return {
            "c_info": c_info,
            "b_info": b_info,
            "on_poweroff": "destroy",
            "on_reboot": "restart",
            "on_watchdog": "destroy",
            "on_crash": "destroy",
            "on_soft_reset": "soft_reset",
            "xenha_sim": {
                "dirty_rate": self.dirty_rate,
                "service": f"{self.service_ip}:{self.service_port}",
                "divergence": self.divergence,
            },
        }


def _num(value: Value | None) -> float:
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        return float(value)
    raise ConfigError(f"expected a number, got {value!r}")
