"""A client of a simulated guest's counter service, as the lab's and tests' "user".

    client = ServiceClient(("127.0.0.1", port), ledger_path=..., uuid=dom["uuid"])
    value = client.next()     # the next counter value, or None (no answer in time)

Each value received is written to the ledger as `client_reply`, so the checkers see the
client's view. A failed request closes the connection; the next one dials again, as a
client behind a load balancer would.
"""

from __future__ import annotations

import contextlib
import socket
import uuid as uuidlib
from pathlib import Path

from xenha.sim.guest import parse_reply
from xenha.sim.ledger import Ledger


class ServiceClient:
    def __init__(
        self,
        address: tuple[str, int],
        *,
        ledger_path: Path | None = None,
        uuid: str | None = None,
        name: str | None = None,
        client_id: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        self.address = address
        self.timeout = timeout
        self.uuid = uuid
        self.name = name
        self.client_id = client_id or uuidlib.uuid4().hex[:8]
        self._ledger = None if ledger_path is None else Ledger(ledger_path, host="client")
        self._sock: socket.socket | None = None
        self._buffer = b""
        self.values: list[int] = []

    def next(self) -> int | None:
        try:
            if self._sock is None:
                self._sock = socket.create_connection(self.address, timeout=self.timeout)
                self._buffer = b""
            self._sock.settimeout(self.timeout)
            self._sock.sendall(b"next\n")
            while b"\n" not in self._buffer:
                chunk = self._sock.recv(4096)
                if not chunk:
                    raise ConnectionError("closed")
                self._buffer += chunk
        except OSError:
            self.close()
            return None
        line, _, self._buffer = self._buffer.partition(b"\n")
        value = parse_reply(line)
        self.values.append(value)
        if self._ledger is not None and self.uuid is not None:
            self._ledger.record(
                "client_reply", uuid=self.uuid, name=self.name, client=self.client_id, value=value
            )
        return value

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
