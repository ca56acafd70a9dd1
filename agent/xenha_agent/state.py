"""What this agent is responsible for on its host, kept in the run dir across restarts.

One small JSON record per replication this node has a copy of (`<run_dir>/<uid>.agent.json`): which
guest, which role, whether the agent holds it paused (self-fenced), and the failover record
until the operator has seen it. A restarted agent reads these before it decides anything, so
a guest it paused stays paused (and is not paused twice), and a copy whose replicator died is
still fenced.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from xenha_agent.replicators import Role, write_private

log = logging.getLogger(__name__)


@dataclass
class CopyRecord:
    uid: str
    namespace: str
    name: str
    domain: str
    role: Role
    lease_duration: float
    automatic: bool = True
    # This agent paused the guest to fence it (one `xl pause`: one `xl unpause` undoes it).
    fenced: bool = False
    # FailoverRecord in API spelling, kept until XenReplication.status.lastFailover shows it.
    failover: dict[str, Any] | None = None
    # Planned switchover in progress from this node: monotonic time of its pause.
    handover_paused_at: float | None = None

    @property
    def fence_lease(self) -> str:
        return f"{self.name}-fence"

    def to_json(self) -> bytes:
        data = asdict(self)
        data["role"] = self.role.value
        return json.dumps(data, indent=2, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> CopyRecord:
        data = json.loads(raw)
        data["role"] = Role(data["role"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def record_path(run_dir: Path, uid: str) -> Path:
    return run_dir / f"{uid}.agent.json"


def save(run_dir: Path, record: CopyRecord) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_private(record_path(run_dir, record.uid), record.to_json())


def delete(run_dir: Path, uid: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(run_dir, uid).unlink()


def load_all(run_dir: Path) -> dict[str, CopyRecord]:
    records: dict[str, CopyRecord] = {}
    if not run_dir.is_dir():
        return records
    for path in sorted(run_dir.glob("*.agent.json")):
        try:
            record = CopyRecord.from_json(path.read_bytes())
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring unreadable record %s: %s", path, e)
            continue
        records[record.uid] = record
    return records
