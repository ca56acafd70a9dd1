"""The one exception of the XenStore model, named the way xenstored names it on the wire."""

from __future__ import annotations

import errno
import os


class XsError(OSError):
    """A XenStore request failed; `name` (`ENOENT`, `EACCES`, ...) is what the client sees."""

    def __init__(self, code: int, detail: str = "") -> None:
        message = os.strerror(code) if not detail else f"{os.strerror(code)}: {detail}"
        super().__init__(code, message)
        self.code = code

    @property
    def name(self) -> str:
        return errno.errorcode[self.code]


def invalid(detail: str) -> XsError:
    return XsError(errno.EINVAL, detail)
