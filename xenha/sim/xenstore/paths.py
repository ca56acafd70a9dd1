"""XenStore path rules: which names are valid, and how relative names are anchored.

xenstored (is_valid_nodename, canonicalize) accepts `[A-Za-z0-9/_@-]`, no trailing `/` except
for the root, no `//`; relative names hang below `/local/domain/<domid of the caller>`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from xenha.sim.xenstore.errors import invalid

ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048
SPECIAL_PREFIX = "@"

_VALID_CHARS = re.compile(r"[A-Za-z0-9/_@-]+")


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def canonical(path: str, domid: int) -> str:
    """The absolute form of `path` as the caller `domid` means it; EINVAL if it is malformed."""
    if path.startswith("/"):
        if len(path) > ABS_PATH_MAX:
            raise invalid(f"path longer than {ABS_PATH_MAX}")
        full = path
    else:
        if len(path) > REL_PATH_MAX:
            raise invalid(f"relative path longer than {REL_PATH_MAX}")
        full = f"{domain_path(domid)}/{path}"
    if not _VALID_CHARS.fullmatch(full):
        raise invalid(f"bad character in {full!r}")
    if (full.endswith("/") and full != "/") or "//" in full:
        raise invalid(f"malformed path {full!r}")
    return full


def is_special(path: str) -> bool:
    """`@introduceDomain`-style names: watchable and permissioned, but not nodes of the tree."""
    return path.startswith(SPECIAL_PREFIX)


def parent(path: str) -> str:
    head = path.rsplit("/", 1)[0]
    return head or "/"


def basename(path: str) -> str:
    return path.rsplit("/", 1)[1]


def join(path: str, child: str) -> str:
    return f"/{child}" if path == "/" else f"{path}/{child}"


def is_at_or_below(path: str, top: str) -> bool:
    return top == "/" or path == top or path.startswith(top + "/")


def ancestors(path: str) -> Iterator[str]:
    """The parents of `path`, nearest first, ending with `/`."""
    while path != "/":
        path = parent(path)
        yield path
