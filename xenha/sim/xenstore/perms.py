"""XenStore permissions: `n0`, `r5`, `w5`, `b5` lists, owner first.

The first entry names the owner and gives everybody's default access; later entries override it
for one domain each. Privileged callers (dom0) and the owner may do anything (perm_for_conn in
xenstored_core.c).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass

from xenha.sim.xenstore.errors import invalid

DOMID_MAX = 0xFFFF


class Access(enum.IntFlag):
    NONE = 0
    READ = 1
    WRITE = 2
    BOTH = READ | WRITE
    # Never written in a permission string: only the owner (and dom0) holds it.
    OWNER = 4


_LETTER_TO_ACCESS = {"n": Access.NONE, "r": Access.READ, "w": Access.WRITE, "b": Access.BOTH}
_ACCESS_TO_LETTER = {access: letter for letter, access in _LETTER_TO_ACCESS.items()}
_PERM = re.compile(r"([nrwb])([0-9]+)")


@dataclass(frozen=True, slots=True)
class Perm:
    access: Access
    domid: int

    def __str__(self) -> str:
        return f"{_ACCESS_TO_LETTER[self.access]}{self.domid}"

    @classmethod
    def parse(cls, text: str) -> Perm:
        match = _PERM.fullmatch(text)
        if match is None or int(match[2]) > DOMID_MAX:
            raise invalid(f"bad permission {text!r}")
        return cls(_LETTER_TO_ACCESS[match[1]], int(match[2]))


Perms = tuple[Perm, ...]

DOM0_ONLY: Perms = (Perm(Access.NONE, 0),)


def parse_perms(texts: Iterable[str]) -> Perms:
    perms = tuple(Perm.parse(text) for text in texts)
    if not perms:
        raise invalid("no permissions given")
    return perms


def access_for(perms: Perms, *, domid: int, privileged: bool, target: int | None) -> Access:
    """What caller `domid` may do to a node carrying `perms`.

    `target` is the domain the caller was made to act for by SET_TARGET (a device-model
    stub domain acts for its guest), which inherits that guest's rights.
    """
    acting_as = {domid} if target is None else {domid, target}
    if privileged or perms[0].domid in acting_as:
        return Access.BOTH | Access.OWNER
    for perm in perms[1:]:
        if perm.domid in acting_as:
            return perm.access
    return perms[0].access
