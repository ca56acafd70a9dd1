"""Cut small, checked-in test vectors out of a recorded `xl remus` stream.

A recorded stream is ~100 MB (the guest's whole memory, then the dirty pages of each
checkpoint). What the codec needs is its structure, so the vectors keep every byte Xen wrote
except the 4 KiB page contents, which are zeroed; xz then shrinks the rest to a few KiB:

- `stream-head.bin`: the first 64 KiB exactly as recorded (every header, the first records);
- `stream-checkpoints.bin.xz`: the stream from byte 0 to the end of the last complete
  checkpoint, page contents zeroed (record headers, PFN lists, vCPU state: all as sent);
- `back-channel.bin`: what `xl migrate-receive -r` wrote on its stdout;
- `stream.json`: the record sequence seen (layer, type, name, offset, length, pages),
  per checkpoint, and the measurements of the run.

Run: ``python -m xenha.realxen.vectors RUN_DIR OUT_DIR``.
"""

from __future__ import annotations

import argparse
import json
import lzma
import struct
from pathlib import Path
from typing import Any

from xenha.stream import (
    CheckpointComplete,
    LibxcHeaderParsed,
    LibxlHeaderParsed,
    Record,
    StreamParser,
    XlHeaderParsed,
)
from xenha.stream.format import PAGE_DATA_HEADER_SIZE, RECORD_HEADER_SIZE, Layer, LibxcRecord

HEAD_BYTES = 64 << 10


def walk(data: bytes | bytearray) -> dict[str, Any]:
    """Parse a stream (a prefix is fine) and describe it record by record."""
    parser = StreamParser(strict=True)
    out: dict[str, Any] = {"records": [], "checkpoints": []}
    for ev in parser.feed(data):
        if isinstance(ev, XlHeaderParsed):
            h = ev.header
            out["xl_header"] = {
                "mandatory_flags": h.mandatory_flags,
                "optional_flags": h.optional_flags,
                "optional_data_len": h.optional_data_len,
                "config_len": len(h.config),
                "config_json": h.config_json(),
            }
        elif isinstance(ev, LibxlHeaderParsed):
            out["libxl_header"] = {
                "offset": ev.offset,
                "version": ev.header.version,
                "options": ev.header.options,
            }
        elif isinstance(ev, LibxcHeaderParsed):
            x = ev.header
            out["libxc_header"] = {
                "offset": ev.offset,
                "version": x.version,
                "options": x.options,
                "domain_type": x.domain_type,
                "page_shift": x.page_shift,
                "xen": f"{x.xen_major}.{x.xen_minor}",
            }
        elif isinstance(ev, Record):
            out["records"].append(
                {
                    "layer": ev.layer.value,
                    "type": ev.rtype,
                    "name": ev.name,
                    "offset": ev.offset,
                    "length": ev.length,
                    **({"pages": ev.count} if ev.count else {}),
                }
            )
        elif isinstance(ev, CheckpointComplete):
            out["checkpoints"].append(
                {
                    "number": ev.number,
                    "end": ev.offset,
                    "bytes": ev.bytes,
                    "pages": ev.pages,
                    "records": ev.records,
                }
            )
    out["parsed_bytes"] = parser.offset
    out["at_boundary"] = parser.at_boundary
    return out


def zero_pages(data: bytes, records: list[dict[str, Any]]) -> bytearray:
    """A copy with the page contents of every PAGE_DATA record zeroed (PFN lists kept)."""
    buf = bytearray(data)
    for rec in records:
        if rec["layer"] != Layer.LIBXC.value or rec["type"] != LibxcRecord.PAGE_DATA:
            continue
        body = rec["offset"] + RECORD_HEADER_SIZE
        (count,) = struct.unpack_from("<I", buf, body)
        start = body + PAGE_DATA_HEADER_SIZE + 8 * count
        end = body + rec["length"]
        buf[start:end] = bytes(end - start)
    return buf


def summarize(description: dict[str, Any]) -> list[dict[str, Any]]:
    """Per checkpoint: the sequence of record names (runs of PAGE_DATA collapsed)."""
    out: list[dict[str, Any]] = []
    records = iter(description["records"])
    for cp in description["checkpoints"]:
        names: list[str] = []
        page_records = 0
        for rec in records:
            if rec["name"] == "Page data":
                page_records += 1
                if names and names[-1] == "libxc:Page data":
                    continue
            names.append(f"{rec['layer']}:{rec['name']}")
            if rec["layer"] == "libxl" and rec["name"] == "Checkpoint end":
                break
        out.append(
            {
                "number": cp["number"],
                "sequence": names,
                "page_data_records": page_records,
                "pages": cp["pages"],
                "bytes": cp["bytes"],
            }
        )
    return out


def cut(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    b_out = run_dir / "xen-b-out"
    data = (b_out / "stream.bin").read_bytes()
    full = walk(data)
    if not full["checkpoints"]:
        raise SystemExit("no complete checkpoint in the recording")
    end = full["checkpoints"][-1]["end"]
    kept = [r for r in full["records"] if r["offset"] < end]
    zeroed = zero_pages(data[:end], kept)
    (out_dir / "stream-head.bin").write_bytes(data[:HEAD_BYTES])
    (out_dir / "stream-checkpoints.bin.xz").write_bytes(
        lzma.compress(bytes(zeroed), preset=9 | lzma.PRESET_EXTREME)
    )
    back = b_out / "back.bin"
    (out_dir / "back-channel.bin").write_bytes(back.read_bytes() if back.exists() else b"")
    summary_path = run_dir / "summary.json"
    run_summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    description = {
        "source": "Debian bookworm Xen 4.17.5 under QEMU TCG (xenha.realxen.record)",
        "command": 'xl -v remus -F -n -d -e -i 500 -s "" counter "socat - TCP:10.99.0.2:9999"',
        "receiver": "socat TCP-LISTEN:9999 EXEC:'tee stream.bin | xl migrate-receive -r -e'",
        "recorded_bytes": len(data),
        "vector_bytes": end,
        "page_contents": "zeroed in stream-checkpoints.bin.xz; stream-head.bin is untouched",
        "xl_header": full.get("xl_header"),
        "libxl_header": full.get("libxl_header"),
        "libxc_header": full.get("libxc_header"),
        "checkpoints": summarize({**full, "records": kept}),
        "tail_after_last_checkpoint": full["records"][len(kept) :][:5],
        "records": kept,
        "back_channel_bytes": len((out_dir / "back-channel.bin").read_bytes()),
        "run": {
            k: run_summary.get(k)
            for k in (
                "boot_s",
                "boot_both_s",
                "guest_create_s",
                "guest_memory_mib",
                "remus",
                "failover",
                "colo",
                "image_ensure_s",
            )
            if k in run_summary
        },
    }
    (out_dir / "stream.json").write_text(json.dumps(description, indent=1, default=str) + "\n")
    return description


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="cut test vectors from a recorded remus stream")
    p.add_argument("run_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    args = p.parse_args(argv)
    d = cut(args.run_dir, args.out_dir)
    for cp in d["checkpoints"]:
        print(cp["number"], cp["pages"], cp["bytes"], " ".join(cp["sequence"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
