"""The first real-Xen experiment: record what `xl remus` sends and what the receiver answers.

Boots both hosts, creates the counter guest on A, probes COLO (refused by Debian's libxl),
then runs plain Remus into a receiver on B that keeps a copy of both directions:

    A: xl -v remus -F -n -d -e -i 500 -s "" counter "socat - TCP:10.99.0.2:9999"
    B: socat TCP-LISTEN:9999,reuseaddr EXEC:/mnt/xenha-out/recv.sh
       recv.sh: tee stream.bin | xl migrate-receive -r -e | tee back.bin

The forward copy lands in B's 9p output share, where a parser on this machine follows it live,
so checkpoint times are measured as the bytes arrive. After a few checkpoints A loses power and
B's input is ended by hand (killing the first tee), which is what the agent automates.

Run: ``python -m xenha.realxen.record [RUN_DIR] [--checkpoints N]``; the summary is printed as
JSON and written to RUN_DIR/summary.json, with stream.bin and back.bin in RUN_DIR/xen-b-out/.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xenha.realxen import image as image_mod
from xenha.realxen import scripts
from xenha.realxen.lab import DOM0_HOOK
from xenha.realxen.qemu import Host, TwoHosts, domain_running, guest_counter
from xenha.stream import CheckpointComplete, LibxcHeaderParsed, Record, StreamParser

OUT = "/mnt/xenha-out"
REMUS_PORT = 9999
COLO_PORT = 9998

RECV_SH = f"""#!/bin/sh
# The first tee's pid is kept so the test can end xl's input (a failover) on purpose.
sh -c 'echo $$ > {OUT}/tee.pid; exec tee {OUT}/stream.bin' \\
  | xl -v migrate-receive -r -e 2>{OUT}/recv.err \\
  | tee {OUT}/back.bin
"""

COLO_RECV_SH = f"""#!/bin/sh
exec xl -v migrate-receive -r -e --colo 2>{OUT}/colo-recv.err
"""


@dataclass
class StreamWatch:
    """Follows a growing file with the codec, timestamping what arrives."""

    path: Path
    parser: StreamParser = field(default_factory=lambda: StreamParser(strict=False))
    checkpoints: list[tuple[float, CheckpointComplete]] = field(default_factory=list)
    first_byte: float | None = None
    records: list[Record] = field(default_factory=list)
    libxc: LibxcHeaderParsed | None = None
    error: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._run, name="stream-watch", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        offset = 0
        while not self._stop.is_set():
            try:
                with self.path.open("rb") as f:
                    f.seek(offset)
                    data = f.read(8 << 20)
            except FileNotFoundError:
                data = b""
            if not data:
                time.sleep(0.05)
                continue
            now = time.monotonic()
            if self.first_byte is None:
                self.first_byte = now
            offset += len(data)
            try:
                events = self.parser.feed(data)
            except Exception as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                return
            for ev in events:
                if isinstance(ev, CheckpointComplete):
                    self.checkpoints.append((now, ev))
                elif isinstance(ev, Record) and len(self.records) < 2000:
                    self.records.append(ev)
                elif isinstance(ev, LibxcHeaderParsed):
                    self.libxc = ev


def _write(host: Host, name: str, text: str) -> None:
    path = host.out_dir / name
    path.write_text(text)
    path.chmod(0o755)


def _timed(results: dict[str, Any], name: str, fn: Any) -> Any:
    t0 = time.monotonic()
    out = fn()
    results[name] = round(time.monotonic() - t0, 1)
    return out


def probe_colo(a: Host, b: Host, results: dict[str, Any]) -> None:
    """`xl remus -c`: what Debian's libxl (built without COLO) says, on both sides."""
    _write(b, "colo-recv.sh", COLO_RECV_SH)
    b.sh(
        f"socat TCP-LISTEN:{COLO_PORT},reuseaddr EXEC:{OUT}/colo-recv.sh "
        f"</dev/null >{OUT}/colo-socat.log 2>&1 &"
    )
    t0 = time.monotonic()
    out = a.sh(
        f'timeout -k 2 150 xl -v remus -c -s "" {scripts.GUEST_NAME} '
        f'"socat - TCP:{b.ip}:{COLO_PORT}" </dev/null >{OUT}/colo-remus.log 2>&1; echo rc=$?',
        timeout=200,
    )
    results["colo"] = {
        "seconds": round(time.monotonic() - t0, 1),
        "exit": out.strip(),
        "sender_stderr": (a.out_dir / "colo-remus.log").read_text(errors="replace")[-3000:],
        "receiver_stderr": _read(b.out_dir / "colo-recv.err")[-3000:],
        "xl_list_a": a.sh("xl list"),
        "xl_list_b": b.sh("xl list"),
    }
    # Whatever the receiver left behind must go before Remus starts.
    b.sh(f"xl destroy {scripts.GUEST_NAME}--incoming 2>/dev/null; true")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def run(run_dir: Path, checkpoints: int, colo: bool) -> dict[str, Any]:
    results: dict[str, Any] = {}
    img = _timed(results, "image_ensure_s", image_mod.ensure)
    results["image"] = {"dir": str(img.directory), "manifest": img.manifest}
    hosts = TwoHosts(img, run_dir, share_source=None, dom0_hook=DOM0_HOOK)
    t0 = time.monotonic()
    try:
        hosts.boot()
        results["boot_s"] = {h.name: h.boot_seconds for h in hosts.hosts}
        results["boot_both_s"] = round(time.monotonic() - t0, 1)
        a, b = hosts.a, hosts.b
        results["xl_info"] = a.sh("xl info | grep -E '^(xen_version|virt_caps|free_memory)'")
        results["ping"] = b.sh(f"busybox ping -c 2 -W 2 {a.ip} | tail -2", check=False)
        _create_guest(a, results)
        results["guest_console_a"] = a.sh(
            f"sleep 3; tail -3 {OUT}/console/guest-{scripts.GUEST_NAME}.log", check=False
        )
        if colo:
            probe_colo(a, b, results)
        _remus(hosts, results, checkpoints)
    finally:
        hosts.stop()
    (run_dir / "summary.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results


def _create_guest(a: Host, results: dict[str, Any]) -> None:
    for memory in (scripts.GUEST_MEMORY_MIB, 128):
        (a.out_dir / "guest.cfg").write_text(scripts.guest_config(memory))
        t0 = time.monotonic()
        out = a.sh(f"xl create {OUT}/guest.cfg 2>&1", timeout=300, check=False)
        if a.sh(f"xl list {scripts.GUEST_NAME} >/dev/null 2>&1 && echo yes; true").strip():
            results["guest_create_s"] = round(time.monotonic() - t0, 1)
            results["guest_memory_mib"] = memory
            return
        results[f"guest_create_{memory}_failed"] = out[-1500:]
    raise RuntimeError("the guest could not be created")


def _remus(hosts: TwoHosts, results: dict[str, Any], checkpoints: int) -> None:
    a, b = hosts.a, hosts.b
    _write(b, "recv.sh", RECV_SH)
    b.sh(
        f"socat TCP-LISTEN:{REMUS_PORT},reuseaddr EXEC:{OUT}/recv.sh "
        f"</dev/null >{OUT}/socat.log 2>&1 & echo $! > {OUT}/socat.pid"
    )
    watch = StreamWatch(b.out_dir / "stream.bin")
    watch.start()
    t_start = time.monotonic()
    a.sh(
        f'xl -v remus -F -n -d -e -i 500 -s "" {scripts.GUEST_NAME} '
        f'"socat - TCP:{b.ip}:{REMUS_PORT}" </dev/null >{OUT}/remus.log 2>&1 &'
    )
    deadline = time.monotonic() + 900
    while len(watch.checkpoints) < checkpoints and time.monotonic() < deadline:
        if watch.error:
            break
        time.sleep(0.5)
    first = watch.checkpoints[0][0] if watch.checkpoints else None
    times = [t for t, _ in watch.checkpoints]
    gaps = [round(y - x, 3) for x, y in itertools.pairwise(times)]
    results["remus"] = {
        "first_byte_s": round(watch.first_byte - t_start, 1) if watch.first_byte else None,
        "seeding_s": round(first - t_start, 1) if first else None,
        "checkpoint_gaps_s": gaps,
        "checkpoints": [
            {"n": c.number, "bytes": c.bytes, "pages": c.pages, "records": c.records}
            for _, c in watch.checkpoints
        ],
        "parser_error": watch.error,
        "libxc": str(watch.libxc),
    }
    results["back_channel_bytes"] = (b.out_dir / "back.bin").stat().st_size
    results["back_channel_head"] = (b.out_dir / "back.bin").read_bytes()[:200].hex()
    results["xl_list_b_replicating"] = b.sh("xl list")
    # Power cut on A, then B's input ended by hand, as the agent will.
    last_a = guest_counter(_read(a.out_dir / "console" / f"guest-{scripts.GUEST_NAME}.log"))
    hosts.power_cut(a)
    t_cut = time.monotonic()
    watch_b_before = b.sh("xl list")
    time.sleep(3)
    results["after_cut_still_paused"] = b.sh("xl list")
    t_end = time.monotonic()
    b.sh(f"kill $(cat {OUT}/tee.pid)")
    running_at = None
    for _ in range(120):
        listing = b.sh("xl list")
        if domain_running(listing, scripts.GUEST_NAME):
            running_at = time.monotonic()
            break
        time.sleep(0.5)
    time.sleep(4)
    logs = sorted((b.out_dir / "console").glob("guest-*.log"))
    b_console = "".join(_read(p) for p in logs)
    results["failover"] = {
        "xl_list_before": watch_b_before,
        "end_input_to_running_s": round(running_at - t_end, 1) if running_at else None,
        "cut_to_running_s": round(running_at - t_cut, 1) if running_at else None,
        "last_counter_on_a": last_a[-1] if last_a else None,
        "counters_on_b": guest_counter(b_console)[-10:],
        "recv_err": _read(b.out_dir / "recv.err")[-3000:],
        "xl_list_after": b.sh("xl list"),
    }
    watch.stop()
    results["remus_log_a"] = _read(a.out_dir / "remus.log")[-3000:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("run_dir", nargs="?", default="/tmp/xenha-realxen-record", type=Path)
    p.add_argument("--checkpoints", type=int, default=8)
    p.add_argument("--no-colo", action="store_true")
    args = p.parse_args(argv)
    results = run(args.run_dir, args.checkpoints, not args.no_colo)
    json.dump(results, sys.stdout, indent=2, default=str)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
