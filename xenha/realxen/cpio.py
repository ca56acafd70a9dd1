"""A minimal `newc` cpio writer, enough for the guest's initramfs (no cpio binary needed)."""

from __future__ import annotations

import gzip
import stat
from dataclasses import dataclass

_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    path: str  # without a leading slash
    mode: int  # including the file type bits
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _entry(ino: int, e: Entry) -> bytes:
    name = e.path.encode() + b"\0"
    fields = (
        ino,
        e.mode,
        0,  # uid
        0,  # gid
        1 if not stat.S_ISDIR(e.mode) else 2,
        0,  # mtime: fixed, so the image hash is reproducible
        len(e.data),
        0,
        0,
        e.rdev[0],
        e.rdev[1],
        len(name),
        0,  # check
    )
    header = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    out = header + name
    out += _pad4(len(out))
    out += e.data + _pad4(len(e.data))
    return out


def newc(entries: list[Entry]) -> bytes:
    parts = [_entry(i + 1, e) for i, e in enumerate(entries)]
    parts.append(_entry(0, Entry(_TRAILER, 0)))
    return b"".join(parts)


def initramfs(entries: list[Entry]) -> bytes:
    # mtime=0 keeps the gzip output byte-identical between builds.
    return gzip.compress(newc(entries), compresslevel=9, mtime=0)


def directory(path: str) -> Entry:
    return Entry(path, stat.S_IFDIR | 0o755)


def file(path: str, data: bytes, mode: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFREG | mode, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int) -> Entry:
    return Entry(path, stat.S_IFCHR | 0o600, rdev=(major, minor))
