"""Relay throughput: checkpoint data through the TLS relay on loopback, against baselines.

    .venv/bin/python bench/relay_throughput.py [--gib 2] [--checkpoint-mib 64] [--json FILE]

Every run moves the same amount of data between separate processes, as on a real host
(xl, its pipe, the replicator on each side, migrate-receive are all processes):

- tcp:   raw TCP socket copy, 1 MiB sendall -> recv_into (the ceiling of the loopback);
- tls:   the same over TLS 1.3 with blocking SSLSockets, no framing (the cost of crypto);
- relay: the real path: feeder ("xl") -> Unix socket -> primary `Link` -> framed mTLS ->
         secondary `Link` -> Unix socket -> consumer ("migrate-receive"), carrying a
         checkpointed stream made with the codec, counted by both relays' parsers.

TLS material comes from the operator's issuer (`xenha_operator.certs.plan_tls`), i.e. what
the agents get in production. Numbers are MB/s (10^6 bytes) measured at the consumer, from
its first byte to its last. The machine is shared, so run it twice before believing it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import ssl
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from xenha_agent.checkpoint_stats import CheckpointStats
from xenha_agent.frames import FrameType
from xenha_agent.relay import Link, LinkSettings, SocketEnd, accept_tls, dial, exchange_hello
from xenha_agent.tls import TlsMaterial, client_context, server_context
from xenha_operator.certs import plan_tls

from xenha.stream import pv
from xenha.stream.format import PAGE_SIZE, xl_config_bytes

CHUNK = 1 << 20
UID = "bench-0000-0000-0000-000000000000"


def materials(directory: Path) -> tuple[TlsMaterial, TlsMaterial]:
    plan = plan_tls(
        ca_data=None,
        tls_data=None,
        nodes=["xen-a", "xen-b"],
        ca_name="bench",
        now=datetime.now(UTC),
        cert_validity=timedelta(hours=1),
        ca_validity=timedelta(days=1),
        renew_fraction=0.3,
    )
    data = plan.tls_data
    del directory
    return (
        TlsMaterial(data["ca.crt"], data["xen-a.crt"], data["xen-a.key"]),
        TlsMaterial(data["ca.crt"], data["xen-b.crt"], data["xen-b.key"]),
    )


def checkpoint_pieces(total: int, checkpoint: int) -> tuple[bytes, bytes, int]:
    """(first piece, repeated piece, how many repeats): a valid checkpointed stream."""
    pages = checkpoint // PAGE_SIZE
    memory = memoryview(os.urandom(pages * PAGE_SIZE))
    pfns = list(range(pages))
    body: list[bytes] = []
    for parts in pv.page_records(memory, pfns):
        body += [bytes(p) for p in parts]
    config = xl_config_bytes('{"c_info": {"type": "pv", "name": "bench"}}')
    head = pv.stream_start(config) + b"".join(pv.prologue_records(pages))
    first = head + b"".join(body) + b"".join(pv.checkpoint_tail_records(1, 1, nsec=1))
    # Later checkpoints: same pages again (their content does not matter to the relay).
    again = b"".join(body) + b"".join(pv.checkpoint_tail_records(2, 1, nsec=2))
    repeats = max(1, (total - len(first)) // len(again))
    return first, again, repeats


# --- the processes -----------------------------------------------------------------------------


def consume(sock: socket.socket, expected: int, results: Any, name: str) -> None:
    buffer = memoryview(bytearray(CHUNK))
    got = 0
    first = last = 0.0
    while got < expected:
        n = sock.recv_into(buffer)
        if not n:
            break
        if not got:
            first = time.perf_counter()
        got += n
    last = time.perf_counter()
    results.put((name, got, last - first))


def feed(sock: socket.socket, pieces: list[bytes | memoryview]) -> None:
    for piece in pieces:
        sock.sendall(piece)
    sock.shutdown(socket.SHUT_WR)
    time.sleep(30)  # keep the socket until the parent ends us


def plain_send(port: int, total: int, tls: TlsMaterial | None) -> None:
    sock: socket.socket = socket.create_connection(("127.0.0.1", port))
    if tls is not None:
        sock = client_context(tls).wrap_socket(sock, server_hostname=f"{UID}.xenha")
    block = os.urandom(CHUNK)
    for _ in range(total // CHUNK):
        sock.sendall(block)
    time.sleep(30)


def plain_receive(
    listener: socket.socket, total: int, tls: TlsMaterial | None, results: Any, name: str
) -> None:
    sock, _ = listener.accept()
    if tls is not None:
        sock = server_context(tls, UID).wrap_socket(sock, server_side=True)
    consume(sock, total, results, name)


def relay_side(
    role: str,
    material: TlsMaterial,
    port: int,
    listener: socket.socket | None,
    local: socket.socket,
    results: Any,
    settings: LinkSettings,
) -> None:
    if role == "secondary":
        assert listener is not None
        raw, _ = listener.accept()
        tls = accept_tls(raw, context=server_context(material, UID), peer_node="xen-a", timeout=10)
        exchange_hello(tls, uid=UID, node="xen-b", role=role, peer_role="primary", timeout=10)
        send_type = FrameType.BACK
    else:
        tls = dial(f"127.0.0.1:{port}", uid=UID, material=material, peer_node="xen-b", timeout=10)
        exchange_hello(tls, uid=UID, node="xen-a", role=role, peer_role="secondary", timeout=10)
        send_type = FrameType.DATA
    stats = CheckpointStats()
    downs: list[str] = []
    link = Link(
        tls,
        send_type=send_type,
        settings=settings,
        on_down=downs.append,
        observe=stats.observe,
        checkpoints=lambda: stats.total,
        name=role,
    )
    link.start(SocketEnd(local), SocketEnd(local))
    # Report once the stream has ended (primary: xl closed; secondary: the peer said eof).
    while not (link.source_ended.is_set() if role == "primary" else link.status().peer_eof):
        time.sleep(0.05)
    time.sleep(0.2)
    snap = stats.snapshot()
    results.put((role, snap.total, snap.parse_error, downs))
    time.sleep(30)


# --- the runs ----------------------------------------------------------------------------------


def run_plain(name: str, total: int, tls: tuple[TlsMaterial, TlsMaterial] | None) -> float:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    receiver = ctx.Process(
        target=plain_receive,
        args=(listener, total, tls[1] if tls else None, results, name),
    )
    sender = ctx.Process(target=plain_send, args=(port, total, tls[0] if tls else None))
    receiver.start()
    sender.start()
    got: int
    seconds: float
    _, got, seconds = results.get(timeout=600)
    for proc in (sender, receiver):
        proc.terminate()
        proc.join()
    listener.close()
    assert got == total // CHUNK * CHUNK, f"{name}: {got} bytes"
    return got / seconds / 1e6


def run_relay(total: int, checkpoint: int, tls: tuple[TlsMaterial, TlsMaterial]) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    results = ctx.Queue()
    first, again, repeats = checkpoint_pieces(total, checkpoint)
    pieces: list[bytes | memoryview] = [first, *[memoryview(again)] * repeats]
    size = sum(len(p) for p in pieces)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    feed_xl, feed_relay = socket.socketpair()
    sink_relay, sink_receiver = socket.socketpair()
    settings = LinkSettings()  # the defaults the replicator runs with
    procs = [
        ctx.Process(target=consume, args=(sink_receiver, size, results, "relay")),
        ctx.Process(
            target=relay_side,
            args=("secondary", tls[1], port, listener, sink_relay, results, settings),
        ),
        ctx.Process(
            target=relay_side,
            args=("primary", tls[0], port, None, feed_relay, results, settings),
        ),
        ctx.Process(target=feed, args=(feed_xl, pieces)),
    ]
    for proc in procs:
        proc.start()
    out: dict[str, Any] = {}
    while len(out) < 3:
        item = results.get(timeout=600)
        out[item[0]] = item[1:]
    for proc in procs:
        proc.terminate()
        proc.join()
    got: int = out["relay"][0]
    seconds: float = out["relay"][1]
    assert got == size, f"relay delivered {got} of {size} bytes"
    return {
        "mb_per_s": got / seconds / 1e6,
        "bytes": got,
        "checkpoints_primary": out["primary"][0],
        "checkpoints_secondary": out["secondary"][0],
        "expected_checkpoints": 1 + repeats,
        "parse_errors": [out["primary"][1], out["secondary"][1]],
        "link_downs": [out["primary"][2], out["secondary"][2]],
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="data per run")
    parser.add_argument("--checkpoint-mib", type=int, default=64, help="bytes per checkpoint")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    total = int(args.gib * (1 << 30))
    with tempfile.TemporaryDirectory() as tmp:
        tls = materials(Path(tmp))
    print(f"{ssl.OPENSSL_VERSION}, {os.cpu_count()} cpus, {total >> 20} MiB per run")
    results: dict[str, Any] = {}
    results["tcp_mb_per_s"] = run_plain("tcp", total, None)
    print(f"tcp   raw socket copy       {results['tcp_mb_per_s']:8.0f} MB/s")
    results["tls_mb_per_s"] = run_plain("tls", total, tls)
    print(f"tls   TLS 1.3, no framing   {results['tls_mb_per_s']:8.0f} MB/s")
    relay = run_relay(total, args.checkpoint_mib << 20, tls)
    results["relay"] = relay
    print(
        f"relay xl->Link->mTLS->Link  {relay['mb_per_s']:8.0f} MB/s  "
        f"checkpoints {relay['checkpoints_primary']}/{relay['checkpoints_secondary']} "
        f"of {relay['expected_checkpoints']}"
    )
    ok = (
        relay["checkpoints_primary"]
        == relay["checkpoints_secondary"]
        == relay["expected_checkpoints"]
        and relay["parse_errors"] == [None, None]
        and relay["link_downs"] == [[], []]
    )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if not ok:
        print(f"relay run was not clean: {relay}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
