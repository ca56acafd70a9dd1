"""The lab supervisor's control socket: one JSON request per line, one JSON answer per line.

    {"op": "kill_host", "host": "xen-a"}  ->  {"ok": true, "at": 1764136800.123}
    {"op": "nope"}                         ->  {"ok": false, "error": "unknown op 'nope'"}

The supervisor owns every process of the lab, so every change to them (a power cut, a
restart) goes through it; other `xenha lab` commands only read and ask.
"""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from xenha.lab.stack import Stack

Answer = dict[str, Any]


class LabError(RuntimeError):
    pass


def call(path: Path, op: str, *, timeout: float = 300.0, **args: Any) -> Answer:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise LabError(f"no lab supervisor at {path}: {exc}") from exc
        sock.sendall((json.dumps({"op": op, **args}) + "\n").encode())
        with sock.makefile("rb") as reader:
            line = reader.readline()
    if not line:
        raise LabError(f"the lab supervisor closed the connection during {op}")
    answer: Answer = json.loads(line)
    if not answer.get("ok"):
        raise LabError(str(answer.get("error")))
    return answer


class ControlServer:
    """Serves a Stack's operations; one at a time (the Stack is not thread-safe)."""

    def __init__(self, path: Path, stack: Stack, on_down: Callable[[], None]) -> None:
        self.path = path
        self.stack = stack
        self.on_down = on_down
        self._lock = threading.Lock()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    try:
                        request = json.loads(line)
                        answer = outer.dispatch(str(request.pop("op")), request)
                        answer = {"ok": True, **answer}
                    except Exception as exc:  # answered, not raised: the server goes on
                        answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                    self.wfile.write((json.dumps(answer) + "\n").encode())

        self._server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def dispatch(self, op: str, args: dict[str, Any]) -> Answer:
        stack = self.stack
        if op == "ping":
            return {}
        if op == "down":
            self.on_down()
            return {}
        with self._lock:
            if op == "state":
                return {"state": stack.state()}
            if op == "kill_host":
                return {"at": stack.kill_host(str(args["host"]))}
            if op == "power_on":
                stack.power_on(str(args["host"]), wait=bool(args.get("wait", True)))
                return {"at": time.time()}
            if op == "pause_host":
                stack.pause_host(str(args["host"]))
                return {"at": time.time()}
            if op == "resume_host":
                stack.resume_host(str(args["host"]))
                return {"at": time.time()}
            if op == "restart_agent":
                stack.restart_agent(str(args["host"]))
                return {"at": time.time()}
            if op == "restart_operator":
                stack.restart_operator()
                return {"at": time.time()}
            if op == "cut_path":
                stack.cut_path(*args.get("hosts", ()))
                return {"at": time.time()}
            if op == "restore_path":
                stack.restore_path(*args.get("hosts", ()))
                return {"at": time.time()}
            if op == "apply":
                namespace, name = stack.apply_replication(mode=args.get("mode"))
                return {"namespace": namespace, "name": name}
        raise LabError(f"unknown op {op!r}")
