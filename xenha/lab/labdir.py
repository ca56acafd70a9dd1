"""Where a lab lives: one directory holding the stack's work dir and the supervisor's files.

    <lab>/supervisor.json   pid and tag of the supervisor (written by `xenha lab up`)
    <lab>/supervisor.log    its output
    <lab>/progress.jsonl    its steps, for `lab up` to show
    <lab>/control.sock      its control socket (JSON lines)
    <lab>/stack.json, processes.json, logs/, hosts/, fabric/ ...   the Stack's (stack.py)

Default: `$XENHA_LAB_DIR`, else `$XDG_RUNTIME_DIR/xenha-lab`, else `/tmp/xenha-lab-<uid>` —
never under $HOME, so `lab down` leaves nothing there but the binary cache.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xenha.lab.procs import pid_alive, write_json

LAB_DIR_ENV = "XENHA_LAB_DIR"


def default_lab_dir() -> Path:
    if os.environ.get(LAB_DIR_ENV):
        return Path(os.environ[LAB_DIR_ENV])
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and Path(runtime).is_dir() and os.access(runtime, os.W_OK):
        return Path(runtime) / "xenha-lab"
    return Path(f"/tmp/xenha-lab-{os.getuid()}")


@dataclass(frozen=True)
class LabDir:
    path: Path

    @property
    def supervisor_file(self) -> Path:
        return self.path / "supervisor.json"

    @property
    def supervisor_log(self) -> Path:
        return self.path / "supervisor.log"

    @property
    def progress_file(self) -> Path:
        return self.path / "progress.jsonl"

    @property
    def socket(self) -> Path:
        return self.path / "control.sock"

    def supervisor(self) -> dict[str, Any] | None:
        try:
            document: dict[str, Any] = json.loads(self.supervisor_file.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None
        return document

    def looks_like_a_lab(self) -> bool:
        """Only such a directory is ever removed: never a path someone mistyped."""
        if not self.path.is_dir():
            return False
        names = {p.name for p in self.path.iterdir()}
        return not names or bool(names & {"supervisor.json", "stack.json", "progress.jsonl"})

    def running(self) -> bool:
        info = self.supervisor()
        return info is not None and pid_alive(int(info["pid"]))

    def write_supervisor(self, pid: int, tag: str, **extra: Any) -> None:
        write_json(self.supervisor_file, {"pid": pid, "tag": tag, "started": time.time(), **extra})

    def progress(self, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Progress records written since byte ``offset``, and the new offset."""
        try:
            with self.progress_file.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            return [], offset
        complete = data[: data.rfind(b"\n") + 1]
        records = [json.loads(line) for line in complete.splitlines() if line.strip()]
        return records, offset + len(complete)


class ProgressWriter:
    """The supervisor's side of progress.jsonl: one JSON object per line, appended."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, step: str, detail: str = "", **fields: Any) -> None:
        record = {"t": time.time(), "step": step, "detail": detail, **fields}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
