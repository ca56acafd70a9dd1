"""The XenStore wire protocol (xen/include/public/io/xs_wire.h, docs/misc/xenstore.txt).

Every message is a header of four u32 in host byte order (type, req_id, tx_id, len) and `len`
bytes of payload, at most 4096. A reply echoes the request's type, req_id and tx_id; a failure
is type ERROR carrying the errno name and a NUL; a bare success is `OK\\0`. Watch events are
unsolicited WATCH_EVENT messages (`path\\0token\\0`, req_id and tx_id 0).

`handle` turns one request into the messages to send back; it never raises, so one client's
nonsense can only ever earn that client an error.
"""

from __future__ import annotations

import enum
import errno
import logging
import struct
from collections.abc import Callable

from xenha.sim.xenstore.errors import XsError, invalid
from xenha.sim.xenstore.paths import domain_path
from xenha.sim.xenstore.store import Session

log = logging.getLogger(__name__)

HEADER = struct.Struct("=IIII")
PAYLOAD_MAX = 4096
NUL = b"\0"
OK = b"OK\0"


class Op(enum.IntEnum):
    CONTROL = 0  # a.k.a. DEBUG
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESTRICT = 20
    RESET_WATCHES = 21
    DIRECTORY_PART = 22
    GET_FEATURE = 23
    SET_FEATURE = 24
    GET_QUOTA = 25
    SET_QUOTA = 26
    # pyxs numbers RESTRICT the way Xen once did.
    RESTRICT_PYXS = 128


def encode(op: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return HEADER.pack(op, req_id, tx_id, len(payload)) + payload


def watch_event(path: str, token: bytes) -> bytes:
    # latin-1 gives back exactly the bytes a client sent as a special (`@...`) watch path.
    return encode(Op.WATCH_EVENT, 0, 0, path.encode("latin-1") + NUL + token + NUL)


def error_reply(req_id: int, tx_id: int, name: str) -> bytes:
    return encode(Op.ERROR, req_id, tx_id, name.encode("ascii") + NUL)


def handle(session: Session, op: int, req_id: int, tx_id: int, payload: bytes) -> list[bytes]:
    """The messages answering one request, in the order they must be sent."""
    try:
        reply = _dispatch(session, op, tx_id, payload)
        if len(reply) > PAYLOAD_MAX:
            raise XsError(errno.E2BIG, f"reply of {len(reply)} bytes")
        messages = [encode(op, req_id, tx_id, reply)]
        if op == Op.WATCH:
            # xenstored acknowledges a watch first, then fires it once.
            path, token = _strings(payload, 2)
            messages.append(watch_event(_text(path), token))
    except XsError as error:
        return [error_reply(req_id, tx_id, error.name)]
    except Exception:
        log.exception("xenstore request type %d failed", op)
        return [error_reply(req_id, tx_id, "EIO")]
    return messages


# -- argument parsing, as xenstored's onearg/get_strings do it --------------------------------


def _one(payload: bytes) -> str:
    """The single NUL-terminated string a request such as READ carries."""
    if not payload.endswith(NUL) or payload.index(NUL) != len(payload) - 1:
        raise invalid("expected one NUL-terminated argument")
    # latin-1 never fails; path checks reject whatever is not plain ASCII.
    return payload[:-1].decode("latin-1")


def _strings(payload: bytes, count: int) -> list[bytes]:
    """Exactly `count` NUL-separated strings (the last NUL is optional, as in xenstored)."""
    parts = payload.split(NUL)
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) != count:
        raise invalid(f"expected {count} arguments")
    return parts


def _domid(text: str | bytes) -> int:
    raw = text.decode("latin-1") if isinstance(text, bytes) else text
    if not raw.isascii() or not raw.isdigit() or int(raw) > 0xFFFF:
        raise invalid(f"domain id {raw!r}")
    return int(raw)


def _text(raw: bytes) -> str:
    return raw.decode("latin-1")


# -- one function per request type ------------------------------------------------------------

Handler = Callable[[Session, int, bytes], bytes]


def _directory(session: Session, tx: int, payload: bytes) -> bytes:
    return b"".join(name.encode("latin-1") + NUL for name in session.directory(_one(payload), tx))


def _directory_part(session: Session, tx: int, payload: bytes) -> bytes:
    path, offset_text = _strings(payload, 2)
    if not offset_text.isdigit():
        raise invalid("offset must be decimal")
    offset = int(offset_text)
    generation, children = session.directory_with_generation(_text(path), tx)
    listing = b"".join(name.encode("latin-1") + NUL for name in children)
    head = str(generation).encode("ascii") + NUL
    room = PAYLOAD_MAX - len(head) - 1
    end = offset
    # Whole names only; an empty name (the extra NUL) marks the end of the list.
    while end < len(listing):
        next_end = listing.index(NUL, end) + 1
        if next_end - offset > room:
            break
        end = next_end
    return head + listing[offset:end] + NUL


def _read(session: Session, tx: int, payload: bytes) -> bytes:
    return session.read(_one(payload), tx)


def _get_perms(session: Session, tx: int, payload: bytes) -> bytes:
    perms = session.get_perms(_one(payload), tx)
    return b"".join(str(perm).encode("ascii") + NUL for perm in perms)


def _set_perms(session: Session, tx: int, payload: bytes) -> bytes:
    parts = payload.split(NUL)
    if parts and parts[-1] == b"":
        parts.pop()
    if len(parts) < 2:
        raise invalid("expected a path and permissions")
    session.set_perms(_text(parts[0]), [_text(p) for p in parts[1:]], tx)
    return OK


def _watch(session: Session, tx: int, payload: bytes) -> bytes:
    path, token = _strings(payload, 2)
    session.watch(_text(path), token, initial_event=False)
    return OK


def _unwatch(session: Session, tx: int, payload: bytes) -> bytes:
    path, token = _strings(payload, 2)
    session.unwatch(_text(path), token)
    return OK


def _reset_watches(session: Session, tx: int, payload: bytes) -> bytes:
    session.reset_watches()
    return OK


def _transaction_start(session: Session, tx: int, payload: bytes) -> bytes:
    if tx != 0:
        raise XsError(errno.EBUSY, "a transaction cannot start inside another")
    return str(session.transaction_start()).encode("ascii") + NUL


def _transaction_end(session: Session, tx: int, payload: bytes) -> bytes:
    verdict = _one(payload)
    if verdict not in ("T", "F"):
        raise invalid("TRANSACTION_END takes T or F")
    session.transaction_end(tx, commit=verdict == "T")
    return OK


def _write(session: Session, tx: int, payload: bytes) -> bytes:
    if NUL not in payload:
        raise invalid("WRITE needs a NUL after the path")
    path, value = payload.split(NUL, 1)
    session.write(_text(path), value, tx)
    return OK


def _mkdir(session: Session, tx: int, payload: bytes) -> bytes:
    session.mkdir(_one(payload), tx)
    return OK


def _rm(session: Session, tx: int, payload: bytes) -> bytes:
    session.rm(_one(payload), tx)
    return OK


def _introduce(session: Session, tx: int, payload: bytes) -> bytes:
    parts = payload.split(NUL)
    if len(parts) < 3:
        raise invalid("INTRODUCE takes a domain, a frame and an event channel")
    domid = _domid(parts[0])
    for number in parts[1:3]:
        if not number.isdigit():
            raise invalid("frame and event channel must be decimal")
    session.introduce(domid)
    return OK


def _release(session: Session, tx: int, payload: bytes) -> bytes:
    session.release(_domid(_one(payload)))
    return OK


def _resume(session: Session, tx: int, payload: bytes) -> bytes:
    session.resume(_domid(_one(payload)))
    return OK


def _set_target(session: Session, tx: int, payload: bytes) -> bytes:
    domid, target = _strings(payload, 2)
    session.set_target(_domid(domid), _domid(target))
    return OK


def _restrict(session: Session, tx: int, payload: bytes) -> bytes:
    session.restrict(_domid(_one(payload)))
    return OK


def _get_domain_path(session: Session, tx: int, payload: bytes) -> bytes:
    return domain_path(_domid(_one(payload))).encode("ascii") + NUL


def _is_domain_introduced(session: Session, tx: int, payload: bytes) -> bytes:
    return b"T\0" if session.is_domain_introduced(_domid(_one(payload))) else b"F\0"


_CONTROL_COMMANDS = ("check", "help", "log", "print")


def _control(session: Session, tx: int, payload: bytes) -> bytes:
    if not session.privileged:
        raise XsError(errno.EACCES, "CONTROL is for dom0")
    parts = payload.split(NUL)
    command = parts[0].decode("latin-1")
    if command == "help":
        return "".join(f"{name}\n" for name in _CONTROL_COMMANDS).encode("ascii") + NUL
    if command == "print":
        log.info("xenstore client says: %s", b" ".join(parts[1:]).decode("latin-1").strip())
        return OK
    if command in _CONTROL_COMMANDS:
        return OK
    raise invalid(f"unknown control command {command!r}")


def _not_implemented(session: Session, tx: int, payload: bytes) -> bytes:
    raise XsError(errno.ENOSYS, "not simulated")


_HANDLERS: dict[int, Handler] = {
    Op.CONTROL: _control,
    Op.DIRECTORY: _directory,
    Op.READ: _read,
    Op.GET_PERMS: _get_perms,
    Op.WATCH: _watch,
    Op.UNWATCH: _unwatch,
    Op.TRANSACTION_START: _transaction_start,
    Op.TRANSACTION_END: _transaction_end,
    Op.INTRODUCE: _introduce,
    Op.RELEASE: _release,
    Op.GET_DOMAIN_PATH: _get_domain_path,
    Op.WRITE: _write,
    Op.MKDIR: _mkdir,
    Op.RM: _rm,
    Op.SET_PERMS: _set_perms,
    Op.IS_DOMAIN_INTRODUCED: _is_domain_introduced,
    Op.RESUME: _resume,
    Op.SET_TARGET: _set_target,
    Op.RESTRICT: _restrict,
    Op.RESTRICT_PYXS: _restrict,
    Op.RESET_WATCHES: _reset_watches,
    Op.DIRECTORY_PART: _directory_part,
    Op.GET_FEATURE: _not_implemented,
    Op.SET_FEATURE: _not_implemented,
    Op.GET_QUOTA: _not_implemented,
    Op.SET_QUOTA: _not_implemented,
}

# These act on the tree and so may run inside a transaction; the rest ignore tx_id, except
# that it must name a live transaction (as in xenstored's process_message).
_TRANSACTIONAL = frozenset(
    {
        Op.DIRECTORY,
        Op.DIRECTORY_PART,
        Op.READ,
        Op.GET_PERMS,
        Op.SET_PERMS,
        Op.WRITE,
        Op.MKDIR,
        Op.RM,
        Op.TRANSACTION_END,
    }
)
# The watch calls say outright that tx_id is ignored.
_IGNORES_TX = frozenset({Op.WATCH, Op.UNWATCH})


def _dispatch(session: Session, op: int, tx_id: int, payload: bytes) -> bytes:
    handler = _HANDLERS.get(op)
    if handler is None:
        raise invalid(f"unknown request type {op}")
    if op in _IGNORES_TX:
        tx_id = 0
    elif tx_id != 0 and not session.has_transaction(tx_id):
        raise XsError(errno.ENOENT, f"no transaction {tx_id}")
    if op not in _TRANSACTIONAL and op != Op.TRANSACTION_START:
        tx_id = 0
    return handler(session, tx_id, payload)
