"""The simulated xenstored, as pyxs (unchanged) and a raw socket see it."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator

import pytest
from pyxs import Client, PyXSError
from pyxs._internal import Op as PyxsOp

from xenha.sim.xenstored import XenstoreServer

pytestmark = pytest.mark.timeout(60)

HEADER = struct.Struct("=IIII")
# Request types from xs_wire.h, spelled out so that the daemon is checked against Xen's
# numbering rather than against its own table.
DIRECTORY = 1
READ = 2
WATCH = 4
UNWATCH = 5
TRANSACTION_END = 7
RELEASE = 9
GET_DOMAIN_PATH = 10
WRITE = 11
RM = 13
WATCH_EVENT = 15
ERROR = 16
DIRECTORY_PART = 22
GET_FEATURE = 23
GUEST = 5


@pytest.fixture
def socket_path() -> Iterator[str]:
    # pytest's tmp_path can exceed the 107 bytes a Unix socket path may have.
    directory = tempfile.mkdtemp(prefix="xs-", dir="/tmp")
    yield os.path.join(directory, "socket")
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def server(socket_path: str) -> Iterator[XenstoreServer]:
    with XenstoreServer(socket_path) as running:
        yield running


@pytest.fixture
def client(server: XenstoreServer) -> Iterator[Client]:
    with Client(unix_socket_path=str(server.path)) as connected:
        yield connected


@pytest.fixture
def guest(server: XenstoreServer) -> Iterator[Client]:
    """A socket client that dropped to the rights of domain GUEST."""
    server.store.introduce_domain(GUEST)
    server.store.mkdir(f"/local/domain/{GUEST}")
    server.store.set_perms(f"/local/domain/{GUEST}", [f"n{GUEST}"])
    with Client(unix_socket_path=str(server.path)) as connected:
        connected.ack(PyxsOp.RESTRICT, f"{GUEST}".encode() + b"\0")
        yield connected


@contextlib.contextmanager
def xs_error(name: str) -> Iterator[None]:
    with pytest.raises(PyXSError) as info:
        yield
    assert info.value.args[0] == getattr(errno, name), info.value


class Raw:
    """A bare socket speaking the wire protocol, to see exactly what the daemon sends."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(str(path))

    def send(self, op: int, payload: bytes, *, req_id: int = 1, tx_id: int = 0) -> None:
        self.sock.sendall(HEADER.pack(op, req_id, tx_id, len(payload)) + payload)

    def recv_bytes(self) -> bytes:
        header = self._exactly(HEADER.size)
        return header + self._exactly(HEADER.unpack(header)[3])

    def recv(self) -> tuple[int, int, int, bytes]:
        message = self.recv_bytes()
        op, req_id, tx_id, _ = HEADER.unpack_from(message)
        return op, req_id, tx_id, message[HEADER.size :]

    def request(self, op: int, payload: bytes, *, tx_id: int = 0) -> tuple[int, bytes]:
        self.send(op, payload, tx_id=tx_id)
        reply_op, _, _, reply = self.recv()
        return reply_op, reply

    def is_closed_by_peer(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.sock.close()

    def _exactly(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise EOFError("daemon closed the connection")
            data += chunk
        return data


@pytest.fixture
def raw(server: XenstoreServer) -> Iterator[Raw]:
    connection = Raw(server.path)
    yield connection
    connection.close()


def u32(value: int) -> bytes:
    return value.to_bytes(4, sys.byteorder)


# -- the tree ---------------------------------------------------------------------------------


def test_a_fresh_store_looks_like_a_freshly_booted_dom0(client: Client) -> None:
    assert client.read(b"/local/domain/0/name") == b"Domain-0"
    assert client.read(b"/local/domain/0/domid") == b"0"
    assert {b"tool", b"local", b"vm"} <= set(client.list(b"/"))
    assert client.list(b"/local/domain") == [b"0"]
    assert client.get_perms(b"/local/domain/0") == [b"n0"]
    assert client.is_domain_introduced(0) is True


def test_write_then_read_gives_back_the_same_bytes(client: Client) -> None:
    client.write(b"/data/blob", b"a\x00b c~")
    assert client.read(b"/data/blob") == b"a\x00b c~"


def test_write_creates_missing_parents_with_empty_values(client: Client) -> None:
    client.write(b"/a/b/c", b"leaf")
    assert client.read(b"/a") == b""
    assert client.read(b"/a/b") == b""
    assert client.list(b"/a/b") == [b"c"]


def test_mkdir_creates_missing_nodes_and_leaves_existing_values_alone(client: Client) -> None:
    client.write(b"/m", b"kept")
    client.mkdir(b"/m/n/o")
    client.mkdir(b"/m")
    assert client.read(b"/m") == b"kept"
    assert client.read(b"/m/n/o") == b""


def test_rm_removes_the_whole_subtree(client: Client) -> None:
    client.write(b"/r/a/b", b"1")
    client.write(b"/r/c", b"2")
    client.delete(b"/r/a")
    assert client.list(b"/r") == [b"c"]
    assert client.exists(b"/r/a/b") is False


def test_rm_of_a_missing_node_is_fine_only_when_its_parent_exists(client: Client) -> None:
    client.delete(b"/local/not-there")
    with xs_error("ENOENT"):
        client.delete(b"/not-there/either")


def test_directory_lists_children_in_creation_order(client: Client) -> None:
    for name in (b"zeta", b"alpha", b"mid"):
        client.mkdir(b"/order/" + name)
    assert client.list(b"/order") == [b"zeta", b"alpha", b"mid"]


def test_relative_paths_hang_below_the_callers_domain_path(client: Client) -> None:
    client.write(b"data/x", b"1")
    assert client.read(b"/local/domain/0/data/x") == b"1"
    assert client.get_domain_path(7) == b"/local/domain/7"


def test_a_listing_too_big_for_one_reply_is_e2big_but_pages_with_directory_part(
    server: XenstoreServer, raw: Raw
) -> None:
    names = [f"child-with-a-long-name-{i:04d}" for i in range(200)]
    for name in names:
        server.store.write(f"/big/{name}", "")
    assert raw.request(DIRECTORY, b"/big\0") == (ERROR, b"E2BIG\0")

    listed: list[str] = []
    generations = set()
    offset = 0
    while True:
        op, reply = raw.request(DIRECTORY_PART, b"/big\0" + str(offset).encode() + b"\0")
        assert op == DIRECTORY_PART
        generation, _, rest = reply.partition(b"\0")
        generations.add(generation)
        if rest == b"\0":  # an empty name ends the list
            break
        page = rest[:-1]
        listed += page.decode().rstrip("\0").split("\0")
        offset += len(page)
    assert listed == names
    assert len(generations) == 1


# -- errors -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "payload", "error"),
    [
        (READ, b"/missing\0", b"ENOENT\0"),
        (READ, b"/bad path\0", b"EINVAL\0"),
        (READ, b"/trailing/\0", b"EINVAL\0"),
        (READ, b"/double//slash\0", b"EINVAL\0"),
        (READ, b"/" + b"x" * 3072 + b"\0", b"EINVAL\0"),
        (READ, b"no-terminating-nul", b"EINVAL\0"),
        (RM, b"/\0", b"EINVAL\0"),
        (TRANSACTION_END, b"T\0", b"ENOENT\0"),  # outside a transaction
        (GET_DOMAIN_PATH, b"seven\0", b"EINVAL\0"),
        (RELEASE, b"42\0", b"ENOENT\0"),  # a domain never introduced
        (GET_FEATURE, b"", b"ENOSYS\0"),  # not simulated
        (99, b"", b"EINVAL\0"),  # no such request type
    ],
)
def test_failures_answer_error_with_the_errno_name(
    raw: Raw, op: int, payload: bytes, error: bytes
) -> None:
    assert raw.request(op, payload) == (ERROR, error)


def test_an_unknown_transaction_id_is_enoent(raw: Raw) -> None:
    assert raw.request(READ, b"/tool\0", tx_id=12345) == (ERROR, b"ENOENT\0")


# -- permissions ------------------------------------------------------------------------------


def test_set_perms_then_get_perms_round_trips(client: Client) -> None:
    client.mkdir(b"/p")
    client.set_perms(b"/p", [b"n0", b"r3", b"b4"])
    assert client.get_perms(b"/p") == [b"n0", b"r3", b"b4"]


def test_nodes_inherit_the_permissions_of_their_parent(client: Client) -> None:
    client.mkdir(b"/inherit")
    client.set_perms(b"/inherit", [b"n0", b"r9"])
    client.write(b"/inherit/a/b", b"x")
    assert client.get_perms(b"/inherit/a/b") == [b"n0", b"r9"]


def test_a_guest_cannot_read_dom0s_nodes_nor_learn_they_are_missing(guest: Client) -> None:
    with xs_error("EACCES"):
        guest.read(b"/local/domain/0/name")
    with xs_error("EACCES"):
        guest.read(b"/local/domain/0/no-such-node")


def test_a_guest_owns_what_it_creates_in_its_own_directory(
    server: XenstoreServer, guest: Client
) -> None:
    guest.write(b"device/vif/0/state", b"1")
    assert server.store.read(f"/local/domain/{GUEST}/device/vif/0/state") == b"1"
    assert [str(p) for p in server.store.get_perms(f"/local/domain/{GUEST}/device")] == [
        f"n{GUEST}"
    ]


def test_a_guest_may_read_but_not_write_a_node_shared_read_only(
    server: XenstoreServer, guest: Client
) -> None:
    server.store.write("/shared", "hello")
    server.store.set_perms("/shared", ["n0", f"r{GUEST}"])
    assert guest.read(b"/shared") == b"hello"
    with xs_error("EACCES"):
        guest.write(b"/shared", b"mine now")
    with xs_error("EACCES"):
        guest.write(b"/shared/child", b"x")


def test_a_guest_cannot_give_its_nodes_away(guest: Client) -> None:
    guest.mkdir(b"mine")
    with xs_error("EPERM"):
        guest.set_perms(b"mine", [b"n0"])
    guest.set_perms(b"mine", [f"n{GUEST}".encode(), b"r0"])
    assert guest.get_perms(b"mine") == [f"n{GUEST}".encode(), b"r0"]


def test_only_dom0_introduces_domains(guest: Client) -> None:
    with xs_error("EACCES"):
        guest.introduce_domain(8, 1, 1)


def test_a_guest_has_a_bounded_number_of_transactions(guest: Client) -> None:
    for _ in range(10):
        guest.execute_command(PyxsOp.TRANSACTION_START, b"\0")
    with xs_error("ENOSPC"):
        guest.execute_command(PyxsOp.TRANSACTION_START, b"\0")


def test_a_guest_hears_only_about_nodes_it_may_read(server: XenstoreServer, guest: Client) -> None:
    with guest.monitor() as monitor:
        monitor.watch(b"/local/domain", b"all")
        assert monitor.events.get(timeout=5).path == b"/local/domain"
        server.store.write("/local/domain/0/private", "secret")
        server.store.write(f"/local/domain/{GUEST}/visible", "hi")
        event = monitor.events.get(timeout=5)
    assert event.path == f"/local/domain/{GUEST}/visible".encode()


# -- watches ----------------------------------------------------------------------------------


def test_a_watch_fires_once_at_once_with_the_watched_path(client: Client) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"/local/domain/0", b"token")
        assert next(monitor.wait()) == (b"/local/domain/0", b"token")


def test_a_watch_fires_for_changes_at_or_below_its_path_only(client: Client) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"/w", b"t")
        monitor.events.get(timeout=5)
        client.write(b"/elsewhere", b"1")
        client.write(b"/w/a/b", b"1")
        client.set_perms(b"/w", [b"n0"])
        assert monitor.events.get(timeout=5).path == b"/w/a/b"
        assert monitor.events.get(timeout=5).path == b"/w"


def test_removing_a_subtree_fires_watches_set_below_it_with_their_own_path(
    client: Client,
) -> None:
    client.write(b"/tree/a/b", b"1")
    with client.monitor() as monitor:
        monitor.watch(b"/tree/a/b", b"deep")
        monitor.watch(b"/tree", b"top")
        assert {monitor.events.get(timeout=5) for _ in range(2)} == {
            (b"/tree/a/b", b"deep"),
            (b"/tree", b"top"),
        }
        client.delete(b"/tree/a")
        assert {monitor.events.get(timeout=5) for _ in range(2)} == {
            (b"/tree/a/b", b"deep"),
            (b"/tree/a", b"top"),
        }


def test_a_relative_watch_reports_relative_paths(client: Client) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"control", b"rel")
        assert monitor.events.get(timeout=5).path == b"control"
        client.write(b"/local/domain/0/control/shutdown", b"poweroff")
        assert monitor.events.get(timeout=5).path == b"control/shutdown"


def test_a_watch_is_acknowledged_first_and_then_fired(raw: Raw) -> None:
    raw.send(WATCH, b"/tool\0tok\0", req_id=3)
    assert raw.recv() == (WATCH, 3, 0, b"OK\0")
    assert raw.recv() == (WATCH_EVENT, 0, 0, b"/tool\0tok\0")


def test_unwatch_stops_the_events(raw: Raw) -> None:
    raw.request(WATCH, b"/u\0tok\0")
    raw.recv()  # the initial event
    # While watched, the event of a client's own write comes before the write's reply...
    raw.send(WRITE, b"/u/x\0" + b"1")
    assert raw.recv()[0] == WATCH_EVENT
    assert raw.recv()[0] == WRITE
    assert raw.request(UNWATCH, b"/u\0tok\0") == (UNWATCH, b"OK\0")
    # ...so once unwatched, the reply comes first and nothing else follows.
    assert raw.request(WRITE, b"/u/x\0" + b"2") == (WRITE, b"OK\0")
    assert raw.request(READ, b"/u/x\0") == (READ, b"2")


def test_unwatching_what_is_not_watched_is_enoent(raw: Raw) -> None:
    assert raw.request(UNWATCH, b"/u\0tok\0") == (ERROR, b"ENOENT\0")


def test_the_same_watch_twice_is_eexist(raw: Raw) -> None:
    raw.request(WATCH, b"/tool\0tok\0")
    raw.recv()
    assert raw.request(WATCH, b"/tool\0tok\0") == (ERROR, b"EEXIST\0")


def test_in_process_writes_fire_socket_clients_watches(
    server: XenstoreServer, client: Client
) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"/local/domain/3", b"dom3")
        monitor.events.get(timeout=5)
        server.store.write("/local/domain/3/name", "db1")
        assert monitor.events.get(timeout=5) == (b"/local/domain/3/name", b"dom3")


def test_an_in_process_watcher_hears_socket_clients_writes(
    server: XenstoreServer, client: Client
) -> None:
    with server.store.watch("/local/domain/3/control", "ctl") as watcher:
        assert watcher.get(timeout=5).path == "/local/domain/3/control"
        client.write(b"/local/domain/3/control/shutdown", b"poweroff")
        event = watcher.get(timeout=5)
    assert (event.path, event.token) == ("/local/domain/3/control/shutdown", b"ctl")


# -- transactions -----------------------------------------------------------------------------


def test_a_committed_transaction_becomes_visible_to_others(
    server: XenstoreServer, client: Client
) -> None:
    client.transaction()
    client.write(b"/tx/a", b"1")
    assert server.store.exists("/tx/a") is False
    assert client.commit() is True
    assert server.store.read("/tx/a") == b"1"


def test_a_transaction_reads_the_tree_as_it_was_when_it_started(
    server: XenstoreServer, client: Client
) -> None:
    server.store.write("/snap", "before")
    client.transaction()
    server.store.write("/snap", "after")
    assert client.read(b"/snap") == b"before"
    client.rollback()


def test_an_aborted_transaction_leaves_no_trace(server: XenstoreServer, client: Client) -> None:
    client.transaction()
    client.write(b"/gone/a", b"1")
    client.rollback()
    assert server.store.exists("/gone") is False


def test_a_transaction_whose_reads_changed_meanwhile_fails_with_eagain(
    server: XenstoreServer, client: Client
) -> None:
    client.write(b"/k", b"1")
    with Client(unix_socket_path=str(server.path)) as other:
        client.transaction()
        assert client.read(b"/k") == b"1"
        other.write(b"/k", b"2")
        client.write(b"/derived", b"from 1")
        assert client.commit() is False
    assert server.store.exists("/derived") is False


def test_transactions_touching_different_nodes_both_commit(
    server: XenstoreServer, client: Client
) -> None:
    server.store.write("/both/a", "0")
    server.store.write("/both/b", "0")
    with Client(unix_socket_path=str(server.path)) as other:
        client.transaction()
        other.transaction()
        client.write(b"/both/a", b"1")
        other.write(b"/both/b", b"1")
        assert client.commit() is True
        assert other.commit() is True
    assert (server.store.read("/both/a"), server.store.read("/both/b")) == (b"1", b"1")


def test_a_transactions_watch_events_fire_only_when_it_commits(
    server: XenstoreServer, client: Client
) -> None:
    with server.store.watch("/txw") as watcher:
        watcher.get(timeout=5)
        client.transaction()
        client.write(b"/txw/a", b"1")
        with pytest.raises(queue.Empty):
            watcher.get(timeout=0.2)
        assert client.commit() is True
        assert watcher.get(timeout=5).path == "/txw/a"


# -- domains ----------------------------------------------------------------------------------


def test_introducing_a_domain_fires_introduce_domain(
    server: XenstoreServer, client: Client
) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"@introduceDomain", b"intro")
        assert monitor.events.get(timeout=5) == (b"@introduceDomain", b"intro")
        server.store.introduce_domain(3)
        assert monitor.events.get(timeout=5) == (b"@introduceDomain", b"intro")
    assert client.is_domain_introduced(3) is True


def test_reintroducing_a_known_domain_fires_nothing(server: XenstoreServer) -> None:
    server.store.introduce_domain(3)
    with server.store.watch("@introduceDomain") as watcher:
        watcher.get(timeout=5)
        server.store.introduce_domain(3)
        with pytest.raises(queue.Empty):
            watcher.get(timeout=0.2)


def test_releasing_a_domain_fires_release_domain(server: XenstoreServer, client: Client) -> None:
    server.store.introduce_domain(3)
    with client.monitor() as monitor:
        monitor.watch(b"@releaseDomain", b"rel")
        monitor.events.get(timeout=5)
        server.store.release_domain(3)
        assert monitor.events.get(timeout=5) == (b"@releaseDomain", b"rel")
    assert client.is_domain_introduced(3) is False


def test_a_domain_shutting_down_fires_release_domain_but_stays_introduced(
    server: XenstoreServer,
) -> None:
    server.store.introduce_domain(3)
    with server.store.watch("@releaseDomain") as watcher:
        watcher.get(timeout=5)
        server.store.domain_shutdown(3)
        assert watcher.get(timeout=5).path == "@releaseDomain"
    assert server.store.is_domain_introduced(3) is True


def test_dom0_introduces_and_releases_domains_over_the_socket(client: Client) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"@releaseDomain", b"rel")
        monitor.events.get(timeout=5)
        client.introduce_domain(4, 1234, 5)
        assert client.is_domain_introduced(4) is True
        client.SU = True  # pyxs refuses RELEASE unless it runs in a real dom0
        client.release_domain(4)
        assert monitor.events.get(timeout=5) == (b"@releaseDomain", b"rel")
    assert client.is_domain_introduced(4) is False


# -- the wire, exactly ------------------------------------------------------------------------


def test_a_read_reply_is_the_echoed_header_and_the_bare_value(raw: Raw) -> None:
    raw.send(READ, b"/local/domain/0/name\0", req_id=7)
    assert raw.recv_bytes() == u32(READ) + u32(7) + u32(0) + u32(8) + b"Domain-0"


def test_an_error_reply_is_type_error_with_the_errno_name_and_a_nul(raw: Raw) -> None:
    raw.send(READ, b"/nope\0", req_id=9)
    assert raw.recv_bytes() == u32(ERROR) + u32(9) + u32(0) + u32(7) + b"ENOENT\0"


# -- robustness -------------------------------------------------------------------------------


def _garbage_cases() -> dict[str, bytes]:
    return {
        "random bytes": random.Random(1).randbytes(8192),
        "oversized length": HEADER.pack(WRITE, 1, 0, 4097) + b"x" * 4097,
        "truncated header": HEADER.pack(READ, 1, 0, 6)[:10],
        "truncated payload": HEADER.pack(WRITE, 1, 0, 100) + b"/half",
    }


@pytest.mark.parametrize("case", sorted(_garbage_cases()))
def test_a_client_sending_garbage_is_dropped_and_others_are_still_served(
    server: XenstoreServer, client: Client, case: str
) -> None:
    rogue = Raw(server.path)
    try:
        rogue.sock.sendall(_garbage_cases()[case])
        if case in ("random bytes", "oversized length"):
            assert rogue.is_closed_by_peer()
    finally:
        rogue.close()
    assert client.read(b"/local/domain/0/name") == b"Domain-0"
    with Client(unix_socket_path=str(server.path)) as newcomer:
        newcomer.write(b"/still/serving", b"yes")
        assert newcomer.read(b"/still/serving") == b"yes"


def test_many_clients_are_served_at_once(server: XenstoreServer) -> None:
    failures: list[BaseException] = []

    def work(n: int) -> None:
        try:
            with Client(unix_socket_path=str(server.path)) as own:
                for i in range(20):
                    own.write(f"/many/{n}/{i}".encode(), str(i).encode())
                    assert own.read(f"/many/{n}/{i}".encode()) == str(i).encode()
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert len(server.store.directory("/many")) == 12


def test_in_process_writes_from_many_threads_all_reach_a_watching_client(
    server: XenstoreServer, client: Client
) -> None:
    with client.monitor() as monitor:
        monitor.watch(b"/busy", b"b")
        monitor.events.get(timeout=5)

        def write_many(n: int) -> None:
            for i in range(50):
                server.store.write(f"/busy/{n}", str(i))

        threads = [threading.Thread(target=write_many, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        events = [monitor.events.get(timeout=5) for _ in range(200)]
    assert {event.path for event in events} == {f"/busy/{n}".encode() for n in range(4)}
    assert [server.store.read(f"/busy/{n}") for n in range(4)] == [b"49"] * 4


def test_a_disconnected_clients_session_is_closed(server: XenstoreServer) -> None:
    sessions_before = server.store.session_count
    with Client(unix_socket_path=str(server.path)) as gone:
        gone.monitor().watch(b"/forgotten", b"t")
        assert server.store.session_count == sessions_before + 1
    deadline = time.monotonic() + 5
    while server.client_count and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.client_count == 0
    assert server.store.session_count == sessions_before


# -- standalone -------------------------------------------------------------------------------


def test_python_m_serves_on_the_given_socket_until_sigterm(socket_path: str) -> None:
    daemon = subprocess.Popen(
        [sys.executable, "-m", "xenha.sim.xenstored", "--socket", socket_path],
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(socket_path):
            assert daemon.poll() is None, daemon.stderr.read() if daemon.stderr else ""
            assert time.monotonic() < deadline, "the daemon never listened"
            time.sleep(0.05)
        with Client(unix_socket_path=socket_path) as connected:
            assert connected.read(b"/local/domain/0/name") == b"Domain-0"
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=10) == 0
        assert not os.path.exists(socket_path)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
