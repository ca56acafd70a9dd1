"""`xenha agent replicator --config <file>`: one long-lived process per replication and node.

It owns what must outlive an agent restart: `xl remus` (primary) or `xl migrate-receive`
(secondary), the TLS relay between them, the heartbeats, and, on the secondary, the open
stdin of migrate-receive. It runs in a session of its own and logs to `<uid>.log`; the agent
drives it through `<uid>.sock` (protocol in `replicator_client`).

Primary:  bind `<uid>.xl.sock`, dial the peer (retrying until connectTimeoutS), exchange
          hellos, start `xl remus ... -s "" <dom> "<pipe --socket <uid>.xl.sock>"`, accept the
          pipe's connection and relay it. Stream lost: stop reading xl's transport but keep
          it open (PeerLost): xl blocks writing the next checkpoint, so the guest's output
          stays held and nothing the standby lacks reaches a client. The agent first makes a
          takeover impossible (fencing Lease), then sends `degrade`: the transport closes, xl
          prints "Backup failed? resuming domain at primary" and the guest runs unprotected
          (Degraded). Self-fence (xl pause) once the agent's last host-Lease renewal is
          older than D - margin, whether the stream is alive or not (see _self_fence_reason).
Secondary: receive the peer's connection (node listener handoff, or a port of its own),
          handshake, start `xl migrate-receive -r|--colo -e` on pipes and relay. Stream lost:
          keep stdin open (closing it is xl's own failover), report PeerLost, and wait for
          `activate` (close stdin: xl restores the last complete checkpoint) or `drop`
          (SIGKILL migrate-receive first, then `xl destroy <dom>--incoming`). Lost before the
          first complete checkpoint, the replica holds nothing to activate: it is destroyed
          the same way at once, and the replicator ends Failed (SeedingFailed).
Both:     xl refusing COLO ("COLO is not supported": libxl built without it; "COLO only
          supports HVM") ends the replicator Failed (ColoUnsupported) with `coloRefused` in
          its status; a receiver first destroys the nameless domain xl leaves behind.

One replicator serves one session: after the stream is lost it never reconnects (the stream
cannot be resumed mid-way); re-protection is a new replicator.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from xenha.api.fencing import pause_after
from xenha_agent import frames
from xenha_agent.checkpoint_stats import CheckpointStats
from xenha_agent.relay import (
    FdSink,
    FdSource,
    Link,
    SocketEnd,
    accept_tls,
    dial,
    exchange_hello,
)
from xenha_agent.relay_listener import (
    DirectListener,
    HandoffServer,
    RawAcceptor,
    accept_socket_path,
)
from xenha_agent.replicator_client import (
    ReplicatorEvent,
    ReplicatorStatus,
    ReplicatorUnavailable,
    State,
    colo_message,
    colo_refusal,
    logged_domid,
    request_sync,
)
from xenha_agent.replicator_config import ConfigError, ReplicatorConfig
from xenha_agent.tls import server_context
from xenha_agent.xen.xl import Domain, XlOutputError, parse_list

log = logging.getLogger("xenha.replicator")

_EVENTS_KEPT = 200
_OUTPUT_KEPT = 40
# How `xl list` names a domain whose xenstore entries are gone (a failed restore's leftover).
_NAMELESS = "(null)"
# xl's own words for the moments that matter (tools/xl/xl_migrate.c).
_XL_MARKERS = {
    "Backup failed? resuming domain at primary": "xl-resumed-at-primary",
    "Failover for domain": "xl-failover",
}


class Refused(Exception):
    """A control request that the replicator's rules do not allow now."""


class Replicator:
    def __init__(self, config: ReplicatorConfig) -> None:
        self.config = config
        self._material = config.tls_material()
        self._lock = threading.RLock()
        # Serialises the state-changing requests (activate, drop, fence, stop) against each
        # other, never against status.
        self._op_lock = threading.Lock()
        self._state: State = "Starting"
        self._reason = "Starting"
        self._message = ""
        self._events: collections.deque[ReplicatorEvent] = collections.deque(maxlen=_EVENTS_KEPT)
        self._output: collections.deque[str] = collections.deque(maxlen=_OUTPUT_KEPT)
        self.stats = CheckpointStats()
        self.link: Link | None = None
        self._ever_connected = False
        self._peer_lost_at: float | None = None
        self._peer_said: str | None = None  # "stop" / "eof" from the peer's CONTROL frames
        self.xl: subprocess.Popen[bytes] | None = None
        self._output_reader: threading.Thread | None = None
        # The line in which xl refused COLO (replicator_client.colo_refusal), if it did.
        self._colo_refused: str | None = None
        # Secondary: the replica was destroyed after the stream broke during seeding.
        self._replica_discarded = False
        # Secondary: the domain a refused COLO restore left behind was dealt with.
        self._refused_domain_cleared = False
        # Secondary: the domids listed before migrate-receive started. A failed restore can
        # leave a nameless domain that nothing else identifies (see _destroy_leftovers).
        self._domids_before_receive: frozenset[int] | None = None
        self._xl_exit: int | None = None
        self._xl_done = threading.Event()
        self._transport: socket.socket | None = None  # primary: the pipe's connection
        # Primary: stream lost, xl's transport still open, so xl cannot release output.
        self._output_held = False
        self._sink: FdSink | None = None  # secondary: migrate-receive's stdin
        self._acceptor: RawAcceptor | None = None
        self._listen_port: int | None = None
        self._fenced = False
        self._lease: tuple[float, float] | None = None
        self.stopping = threading.Event()
        self.finished = threading.Event()

    # --- state --------------------------------------------------------------------------------

    def _event(self, event: str, message: str = "") -> None:
        entry: ReplicatorEvent = {
            "time": time.time(),
            "monotonic": time.monotonic(),
            "event": event,
            "message": message,
        }
        with self._lock:
            self._events.append(entry)
        log.info("event %s: %s", event, message)

    def _set(self, state: State, reason: str, message: str = "") -> None:
        with self._lock:
            if state != self._state:
                log.info("state %s -> %s (%s) %s", self._state, state, reason, message)
            self._state, self._reason, self._message = state, reason, message

    @property
    def state(self) -> State:
        return self._state

    def status(self) -> ReplicatorStatus:
        with self._lock:
            link = self.link.status() if self.link is not None else None
            beat_age = None
            if link is not None and link.last_heartbeat_monotonic is not None:
                beat_age = round((time.monotonic() - link.last_heartbeat_monotonic) * 1000)
            lease = None
            if self._lease is not None:
                lease = {"lastRenewedMonotonic": self._lease[0], "durationS": self._lease[1]}
            return {
                "uid": self.config.uid,
                "role": self.config.role,
                "state": self._state,
                "reason": self._reason,
                "message": self._message,
                "pid": os.getpid(),
                # Lost only once _peer_lost has run: the state it sets (PeerLost, or a seeding
                # standby's cleanup) comes with it, never a lost peer in a state from before.
                "peerConnected": link is not None
                and (link.connected or self._peer_lost_at is None),
                "everConnected": self._ever_connected,
                "peerLostMonotonic": self._peer_lost_at,
                "lastHeartbeatAgeMs": beat_age,
                "peerCheckpoints": link.peer_checkpoints if link is not None else None,
                "checkpoints": cast(Any, self.stats.snapshot().to_json()),
                "bytesSent": link.bytes_sent if link is not None else 0,
                "bytesReceived": link.bytes_received if link is not None else 0,
                "listenPort": self._listen_port,
                "xlPid": self.xl.pid if self.xl is not None else None,
                "xlExit": self._xl_exit,
                "xlOutput": list(self._output),
                "fenced": self._fenced,
                "outputHeld": self._output_held if self.config.role == "primary" else None,
                "coloRefused": self._colo_refused,
                "lease": lease,
                "events": list(self._events),
            }

    # --- running ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until `stop`; returns the exit status."""
        server = _ControlServer(self)
        threading.Thread(target=server.serve_forever, name="control", daemon=True).start()
        session = self._primary if self.config.role == "primary" else self._secondary
        threading.Thread(target=self._guard(session), name="session", daemon=True).start()
        threading.Thread(target=self._guard(self._tick), name="tick", daemon=True).start()
        self.finished.wait()
        server.shutdown()
        server.server_close()
        with contextlib.suppress(FileNotFoundError):
            self.config.control_socket.unlink()
        return 0 if self._state != "Failed" else 1

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception as e:
                log.exception("%s failed", body.__name__)
                self._set("Failed", "InternalError", f"{body.__name__}: {e}")
                self._event("internal-error", str(e))

        return run

    def _start_xl(self, **pipes: Any) -> subprocess.Popen[bytes]:
        env = {**os.environ, **self.config.xl_env}
        proc = subprocess.Popen(self.config.command, env=env, **pipes)
        self.xl = proc
        self._event("xl-started", f"pid {proc.pid}: {' '.join(self.config.command)}")
        return proc

    def _read_output(self, stream: Any) -> None:
        for raw in iter(stream.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            log.info("xl: %s", line)
            with self._lock:
                self._output.append(line)
            for marker, event in _XL_MARKERS.items():
                if marker in line:
                    self._event(event, line)
            if colo_refusal(line) is not None and self._colo_refused is None:
                with self._lock:
                    self._colo_refused = line
                self._event("xl-colo-unsupported", line)
        stream.close()

    def _watch_xl(self, proc: subprocess.Popen[bytes], on_exit: Callable[[int], None]) -> None:
        code = proc.wait()
        reader = self._output_reader
        if reader is not None:
            # Its last words (why it gave up) decide what the exit means. A child of xl that
            # inherited the stream (the transport) may keep it open a little longer.
            reader.join(2.0)
        with self._lock:
            self._xl_exit = code
        self._event("xl-exited", f"exit status {code}")
        self._xl_done.set()
        on_exit(code)

    def _spawn(self, name: str, target: Callable[..., None], *args: Any) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        return thread

    # --- primary ------------------------------------------------------------------------------

    def _primary(self) -> None:
        cfg = self.config
        listener = _unix_listener(cfg.xl_socket)
        try:
            tls = self._dial_until_connected()
            if tls is None:
                return
            link = Link(
                tls,
                send_type=frames.FrameType.DATA,
                settings=cfg.link_settings(),
                on_down=self._peer_lost,
                on_control=self._on_control,
                observe=self.stats.observe,
                checkpoints=lambda: self.stats.total,
                name="relay",
                # Never drain xl after the loss: a checkpoint written is output released.
                drain_after_down=False,
            )
            with self._lock:
                # Connected means a link exists: the status never says "connected once" about
                # a peer it cannot say is lost or connected now.
                self.link = link
                self._ever_connected = True
            link.start()  # heartbeats now: xl takes a while to start its transport
            proc = self._start_xl(
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            assert proc.stdout is not None
            self._output_reader = self._spawn("xl-output", self._read_output, proc.stdout)
            self._spawn("xl-wait", self._watch_xl, proc, self._primary_xl_exited)
            conn = self._accept_transport(listener)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                cfg.xl_socket.unlink()
        if conn is None:
            link.close("no transport from xl remus")
            if self._state == "Starting":
                self._set("Failed", "XlExited", "xl remus exited before starting its transport")
            return
        # The back channel must never wait on the pipe for long: that is when silence could
        # not be judged (see relay). A deep socket buffer keeps it flowing.
        with contextlib.suppress(OSError):
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        with self._lock:
            self._transport = conn
            if self._state == "Starting":
                self._set("Seeding", "Connected", "xl remus is sending the initial state")
        if link.is_down:
            # Lost while xl was starting: hold its transport like any later loss.
            reason = link.status().down_reason or "lost"
            with self._lock:
                self._output_held = True
            self._set("PeerLost", "LostConnection", f"stream lost ({reason}) before it began")
            return
        link.attach(SocketEnd(conn), SocketEnd(conn))

    def _dial_until_connected(self) -> Any:
        cfg = self.config
        assert cfg.peer_address is not None
        deadline = time.monotonic() + cfg.connect_timeout_s
        delay = 0.1
        last_error = ""
        while not self.stopping.is_set():
            try:
                tls = dial(
                    cfg.peer_address,
                    uid=cfg.uid,
                    material=self._material,
                    peer_node=cfg.peer_node,
                    timeout=cfg.link_settings().handshake_timeout,
                )
                try:
                    exchange_hello(
                        tls,
                        uid=cfg.uid,
                        node=cfg.node,
                        role="primary",
                        peer_role="secondary",
                        timeout=cfg.link_settings().handshake_timeout,
                    )
                except BaseException:
                    tls.close()
                    raise
            except (OSError, ValueError) as e:
                if str(e) != last_error:
                    self._event("dial-failed", f"{cfg.peer_address}: {e}")
                    last_error = str(e)
                if time.monotonic() + delay > deadline:
                    self._set("Failed", "PeerUnreachable", f"{cfg.peer_address}: {last_error}")
                    return None
                self.stopping.wait(delay)
                delay = min(delay * 2, 2.0)
                continue
            self._event("connected", f"to {cfg.peer_node} at {cfg.peer_address}")
            return tls
        return None

    def _accept_transport(self, listener: socket.socket) -> socket.socket | None:
        """The pipe's connection, or None if xl ends (or we stop) first."""
        listener.settimeout(0.2)
        while not self._xl_done.is_set() and not self.stopping.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)
            self._event("transport-connected", "xl remus started its transport")
            return conn
        return None

    def _close_transport(self) -> None:
        with self._lock:
            conn = self._transport
        if conn is not None:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _primary_xl_exited(self, code: int) -> None:
        if self._colo_refused is not None:
            with self._lock:
                # xl resumed the guest itself ("Backup failed? resuming domain at primary")
                # before any checkpoint: no output to hold, no standby that could take over.
                self._output_held = False
                if self._state not in ("Stopping", "Stopped", "Fenced"):
                    self._set("Failed", "ColoUnsupported", self._colo_message())
            # The link stays up: the receiver, refused too, ends it; if it could do COLO, the
            # agent's stop does. Closing it now could kill the receiver before it says why.
            return
        with self._lock:
            held, self._output_held = self._output_held, False
            if held and self._state == "PeerLost":
                self._set("Degraded", "XlExited", f"xl remus exited ({code}) after the loss")
        link = self.link
        if link is not None and not link.is_down:
            # xl remus ended with the stream alive (its domain is gone, or it gave up): let
            # the sender finish the stream's tail (it sends "eof"), then end the link.
            link.source_ended.wait(2.0)
            link.close("xl remus exited")
        with self._lock:
            if self._state in ("Starting", "Seeding", "Replicating", "Stopping"):
                if code == 0 or self._state == "Stopping":
                    self._set("Stopped", "XlExited", f"xl remus exited with status {code}")
                else:
                    self._set("Failed", "XlExited", f"xl remus exited with status {code}")

    # --- secondary ----------------------------------------------------------------------------

    def _secondary(self) -> None:
        cfg = self.config
        acceptor: RawAcceptor
        if cfg.listen is not None:
            direct = DirectListener(cfg.listen)
            self._listen_port = direct.port
            acceptor = direct
        else:
            acceptor = HandoffServer(accept_socket_path(cfg.run_dir, cfg.uid))
        self._acceptor = acceptor
        self._event("listening", cfg.listen or "behind the node listener")
        context = server_context(self._material, cfg.uid)
        settings = cfg.link_settings()
        tls = None
        while tls is None and not self.stopping.is_set():
            try:
                raw = acceptor.accept()
            except OSError:
                return  # closed: we are stopping
            peer = _peer_name(raw)
            try:
                candidate = accept_tls(
                    raw,
                    context=context,
                    peer_node=cfg.peer_node,
                    timeout=settings.handshake_timeout,
                )
                try:
                    exchange_hello(
                        candidate,
                        uid=cfg.uid,
                        node=cfg.node,
                        role="secondary",
                        peer_role="primary",
                        timeout=settings.handshake_timeout,
                    )
                except BaseException:
                    candidate.close()
                    raise
            except (OSError, ValueError) as e:
                self._event("peer-rejected", f"{peer}: {e}")
                continue
            tls = candidate
        self._close_acceptor()
        if tls is None:
            return
        with self._lock:
            if self.stopping.is_set() or self._state != "Starting":
                # Dropped or stopped while the handshake ran: start nothing.
                tls.close()
                return
        self._event("connected", f"from {cfg.peer_node} at {peer}")
        listed = self._xl_list()
        self._domids_before_receive = (
            frozenset(d.domid for d in listed) if listed is not None else None
        )
        proc = self._start_xl(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._output_reader = self._spawn("xl-output", self._read_output, proc.stderr)
        self._spawn("xl-wait", self._watch_xl, proc, self._secondary_xl_exited)
        sink = FdSink(proc.stdin.fileno())
        with self._lock:
            self._sink = sink
            self.link = Link(
                tls,
                send_type=frames.FrameType.BACK,
                settings=settings,
                on_down=self._peer_lost,
                on_control=self._on_control,
                observe=self.stats.observe,
                checkpoints=lambda: self.stats.total,
                name="relay",
            )
            # Only now, with the link: before it the agent would read a connected-once peer
            # that is not connected as a lost one, and drop a copy still being seeded.
            self._ever_connected = True
            if self._state == "Starting":
                self._set("Seeding", "Connected", "receiving the initial state")
        self.link.start(FdSource(proc.stdout.fileno()), sink)

    def _secondary_xl_exited(self, code: int) -> None:
        if self._colo_refused is not None:
            self._clear_refused_domain()
            with self._lock:
                if self._state in ("Starting", "Seeding", "PeerLost", "Failed"):
                    self._set("Failed", "ColoUnsupported", self._colo_message())
            if self.link is not None:
                self.link.close("migrate-receive refused COLO")
            return
        with self._lock:
            state = self._state
            if state == "Activating":
                if code == 0:
                    self._set("Active", "FailedOver", "xl restored the last checkpoint")
                else:
                    self._set("Failed", "ActivationFailed", f"migrate-receive exit {code}")
                return
            if state in ("Dropped", "Stopping", "Stopped"):
                return
            self._set(
                "Failed",
                "ReceiverExited",
                f"xl migrate-receive exited with status {code} while receiving",
            )
        # Nothing left to receive for: tell the primary by ending the stream.
        if self.link is not None:
            self.link.close("migrate-receive exited")

    def _clear_refused_domain(self) -> None:
        """Real xl leaves the domain it made for a refused COLO restore behind, paused and
        nameless (`(null)` in `xl list`): its domid, from libxl's message, removes it."""
        with self._lock:
            line, done = self._colo_refused, self._refused_domain_cleared
            self._refused_domain_cleared = True
        if not done:
            self._destroy_leftovers(logged_domid(line) if line is not None else None)

    def _destroy_leftovers(self, domid: int | None = None) -> None:
        """Destroy what this receiver's restore left behind: domain `domid` if given, else
        every domain that appeared since migrate-receive started and has no name. A restore
        that fails before xl says so (killed when the stream ends first, as when the sender's
        own COLO refusal closes it) leaves a `(null)` domain whose domid nothing prints."""
        listed = self._xl_list()
        if listed is None:
            return
        if domid is not None:
            candidates = [d for d in listed if d.domid == domid]
        elif self._domids_before_receive is not None:
            before = self._domids_before_receive
            candidates = [d for d in listed if d.domid not in before and d.name == _NAMELESS]
        else:
            return
        for d in candidates:
            # Only what this receiver made: nameless, or under our incoming name.
            if d.name in (_NAMELESS, f"{self.config.domain}--incoming"):
                code = self._xl_command("destroy", str(d.domid))
                self._event("leftover-domain-destroyed", f"domain {d.domid} {d.name}: exit {code}")

    def _xl_list(self, *names: str) -> list[Domain] | None:
        """`xl list [names]` parsed; None when xl cannot tell (the reason is an event)."""
        argv = [self.config.xl, "list", *names]
        env = {**os.environ, **self.config.xl_env}
        try:
            done = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
            if done.returncode != 0:
                return None
            return parse_list(done.stdout.decode(errors="replace"))
        except (OSError, subprocess.TimeoutExpired, XlOutputError) as e:
            self._event("xl-command-failed", f"{' '.join(argv)}: {e}")
            return None

    def _discard_seed(self, why: str) -> None:
        """The stream broke before the first complete checkpoint: the replica holds nothing
        that could ever be activated, so it is no standby to keep or to drop, only a seeding
        that failed. Destroy it as `drop` does (SIGKILL first: closing its input is xl's own
        failover) and end Failed; the agent starts a new seeding."""
        with self._op_lock:
            if self._state != "Stopping" or self._reason != "SeedingFailed":
                return  # a request (drop, stop) took over
            destroy_exit = self._kill_receiver_and_destroy_replica()
            self._release_stdin()
            self._close_acceptor()
            with self._lock:
                self._replica_discarded = True
                if self._colo_refused is not None:
                    self._set("Failed", "ColoUnsupported", self._colo_message())
                else:
                    self._set("Failed", "SeedingFailed", f"{why}; replica destroyed, to seed anew")
            self._event("seed-discarded", f"xl destroy exit {destroy_exit}")

    def _colo_message(self) -> str:
        return colo_message(self.config.node, self._colo_refused or "")

    # --- both ---------------------------------------------------------------------------------

    def _on_control(self, control: frames.Control) -> None:
        if control.type in ("stop", "eof"):
            with self._lock:
                self._peer_said = control.type
            self._event(f"peer-{control.type}", json.dumps(control.message))

    def _peer_lost(self, reason: str) -> None:
        with self._lock:
            self._peer_lost_at = time.monotonic()
            said = self._peer_said
            state = self._state
            # A standby that never completed a checkpoint: set with the loss (one status
            # shows both), so that no one mistakes it for a standby waiting to be judged.
            seed_lost = (
                self.config.role == "secondary"
                and state in ("Starting", "Seeding")
                and self.stats.total == 0
            )
            if seed_lost:
                self._set("Stopping", "SeedingFailed", "stream lost during seeding")
        if said == "stop":
            code = "PeerStopped"
        elif said == "eof":
            code = "PeerEnded"  # the peer's xl closed the stream (primary: xl remus ended)
        elif reason.startswith("heartbeat silence"):
            code = "HeartbeatTimeout"
        else:
            code = "LostConnection"
        self._event("peer-lost", f"{code}: {reason}")
        if self.config.role == "primary":
            if state in ("Seeding", "Replicating", "Fenced") and not self._xl_done.is_set():
                with self._lock:
                    self._output_held = self._transport is not None
                # A fenced guest stays Fenced; unfence then tells PeerLost (output held).
                if state != "Fenced":
                    self._set("PeerLost", code, f"stream lost ({reason}); holding xl's output")
        elif seed_lost:
            why = f"stream lost before the first complete checkpoint ({code}: {reason})"
            self._spawn("discard-seed", self._discard_seed, why)
        elif state in ("Seeding", "Replicating"):
            self._set("PeerLost", code, f"stream lost ({reason}); holding the replica")

    def _tick(self) -> None:
        interval = self.config.heartbeat_interval_ms / 1000
        while not self.finished.wait(interval):
            with self._lock:
                if self._state == "Seeding" and self.stats.total > 0:
                    self._set("Replicating", "CheckpointReceived")
                    self._event("first-checkpoint")
            if self.config.role == "primary":
                self._maybe_self_fence()

    def _maybe_self_fence(self) -> None:
        if self._self_fence_reason() is None:
            return
        # A stop (or any other request) may hold the lock for a while — up to 30 s waiting for
        # xl remus to exit — and leave the replicator Stopped: decide again under the lock,
        # never on what was true before waiting for it.
        with self._op_lock:
            reason = self._self_fence_reason()
            if reason is not None:
                self._fence(reason)

    def _self_fence_reason(self) -> str | None:
        """Why the primary must pause its guest now, or None.

        The agent's last successful host-Lease renewal (sent at `lastRenewedMonotonic`) is
        older than D - margin and a standby may exist (this session's stream connected once):
        from D on, a standby that sees the stream end may take over at once. Whether the
        stream is alive now does not matter — it can end any moment, and the standby may see
        that first. This is what pauses the guest when the agent is dead or hung; with the
        agent alive both pause at the same deadline (the agent through `fence`, which does
        not pause twice). A stopping or stopped replicator no longer speaks for the guest.
        """
        with self._lock:
            lease, fenced, state = self._lease, self._fenced, self._state
            ever_connected, link = self._ever_connected, self.link
        if self.stopping.is_set() or state in ("Stopping", "Stopped", "Dropped"):
            return None
        if lease is None or fenced or not ever_connected:
            return None
        renewed, duration = lease
        stale = time.monotonic() - renewed
        if stale <= pause_after(duration):
            return None
        stream = "stream lost" if link is not None and link.is_down else "stream alive"
        return f"SelfFence: last renewal {stale:.1f}s old ({stream})"

    # --- requests -----------------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        try:
            if op == "status":
                return {"ok": True, "status": self.status()}
            if op == "lease":
                return self._op_lease(request)
            handler = {
                "activate": self._op_activate,
                "drop": self._op_drop,
                "fence": self._op_fence,
                "degrade": lambda: self._op_degrade(str(request.get("reason") or "")),
                "unfence": lambda: self._op_unfence(request),
                "stop": self._op_stop,
            }.get(str(op))
            if handler is None:
                raise Refused(f"unknown op {op!r}")
            with self._op_lock:
                return {"ok": True, **handler()}
        except Refused as e:
            return {"ok": False, "error": str(e), "state": self._state}

    def _op_lease(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            renewed = float(request["lastRenewedMonotonic"])
            duration = float(request["durationS"])
        except (KeyError, TypeError, ValueError):
            raise Refused("lease needs lastRenewedMonotonic and durationS numbers") from None
        if duration <= 0:
            raise Refused("durationS must be positive")
        self._update_lease(renewed, duration)
        return {"ok": True}

    def _update_lease(self, renewed: float, duration: float) -> None:
        with self._lock:
            # News older than what we have (a late request, a restarted agent's first) does
            # not move the last renewal back: CLOCK_MONOTONIC is one clock for the host.
            if self._lease is not None:
                renewed = max(renewed, self._lease[0])
            self._lease = (renewed, duration)

    def _lease_fresh(self) -> bool:
        with self._lock:
            lease = self._lease
        if lease is None:
            return True  # never told: the watchdog is not armed either
        renewed, duration = lease
        return time.monotonic() - renewed <= pause_after(duration)

    def _need(self, role: str) -> None:
        if self.config.role != role:
            raise Refused(f"only a {role} replicator does that")

    def _op_activate(self) -> dict[str, Any]:
        self._need("secondary")
        state = self._state
        if state in ("Activating", "Active"):
            return {"state": state}
        if state != "PeerLost":
            raise Refused(f"activation needs a lost peer; state is {state}")
        self._set("Activating", "ActivateRequested", "closing migrate-receive's input")
        self._event("activating")
        self._release_stdin()
        return {"state": "Activating"}

    def _release_stdin(self) -> None:
        """Close migrate-receive's stdin once no write to it can be in flight."""
        link, sink, proc = self.link, self._sink, self.xl
        if sink is not None:
            sink.cancel()
        if link is not None and not link.join_receiver(5.0):
            log.error("relay receiver still writing to migrate-receive after cancel")
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        if sink is not None:
            sink.close_wakeup()
            self._sink = None

    def _op_drop(self) -> dict[str, Any]:
        self._need("secondary")
        state = self._state
        if state == "Dropped":
            return {"state": state, "destroyExit": None}
        if state in ("Activating", "Active"):
            raise Refused(f"the replica is {state}; dropping it would kill the guest")
        if self._replica_discarded:
            return {"state": state, "destroyExit": None}  # gone with the failed seeding
        self._set("Stopping", "DropRequested", "killing migrate-receive")
        destroy_exit = self._kill_receiver_and_destroy_replica()
        if self.xl is not None and self._colo_refused is not None:
            self._clear_refused_domain()
        if self.link is not None:
            self.link.send_control({"type": "stop", "reason": "replica dropped"})
            self.link.close("replica dropped")
        self._release_stdin()
        self._close_acceptor()
        self._set("Dropped", "DropRequested", "replica destroyed")
        self._event("dropped", f"xl destroy exit {destroy_exit}")
        return {"state": "Dropped", "destroyExit": destroy_exit}

    def _op_degrade(self, reason: str) -> dict[str, Any]:
        """Release what xl holds: close its transport, so it resumes the guest unprotected."""
        self._need("primary")
        link = self.link
        if link is not None and not link.is_down:
            raise Refused("the stream is alive; nothing to degrade")
        with self._lock:
            held, self._output_held = self._output_held, False
        if not held:
            return {"state": self._state}
        self._close_transport()
        self._event("degraded", reason or "output released")
        if self._state == "PeerLost":
            self._set("Degraded", reason or "DegradeRequested", "guest runs unprotected")
        return {"state": self._state}

    def _op_fence(self) -> dict[str, Any]:
        self._need("primary")
        return self._fence("FenceRequested")

    def _fence(self, reason: str) -> dict[str, Any]:
        if self._fenced:
            # The flag says paused; xl must say so too (someone may have unpaused it, or an
            # unpause of ours was retried elsewhere). xl pause nests: never pause twice.
            paused = self._domain_paused()
            if paused is not False:
                return {"state": self._state, "pauseExit": 0 if paused else -1}
            self._event("fence-not-in-place", "recorded as fenced but running: pausing again")
        code = self._xl_command("pause", self.config.domain)
        if code != 0:
            self._event("fence-failed", f"xl pause exit {code}")
            return {"state": self._state, "pauseExit": code}
        with self._lock:
            self._fenced = True
        self._set("Fenced", reason.split(":")[0], reason)
        self._event("fenced", reason)
        return {"state": "Fenced", "pauseExit": code}

    def _op_unfence(self, request: dict[str, Any]) -> dict[str, Any]:
        self._need("primary")
        if "lastRenewedMonotonic" in request:
            self._op_lease(request)
        if not self._lease_fresh():
            # Our own watchdog would pause it again at the next tick.
            raise Refused("the last host-Lease renewal is too old to run the guest")
        if not self._fenced:
            return {"state": self._state, "unpauseExit": 0}
        code = self._xl_command("unpause", self.config.domain)
        if code == 0:
            with self._lock:
                self._fenced = False
            link = self.link
            if link is not None and not link.is_down:
                self._set("Replicating" if self.stats.total else "Seeding", "Unfenced")
            elif self._output_held:
                self._set("PeerLost", "Unfenced", "guest resumed; xl's output still held")
            else:
                self._set("Degraded", "Unfenced", "guest resumed, unprotected")
            self._event("unfenced")
        return {"state": self._state, "unpauseExit": code}

    def _op_stop(self) -> dict[str, Any]:
        if self.stopping.is_set():
            return {"state": self._state}
        state = self._state
        if state == "Activating":
            raise Refused("activation in progress; stop once it is Active")
        if self.config.role == "secondary" and state != "Active":
            # Never leave a receiver behind: our exit would close its stdin, and xl would
            # fail over on its own.
            self._op_drop()
            state = self._state
        self.stopping.set()
        self._set("Stopping", "StopRequested")
        link = self.link
        if link is not None and not link.is_down:
            link.send_control({"type": "stop"})
            link.close("stopped")
        with self._lock:
            self._output_held = False
        self._close_transport()
        self._close_acceptor()
        proc = self.xl
        if self.config.role == "primary" and proc is not None:
            # Without its transport xl remus resumes the guest and returns.
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                self._event("xl-still-running", "xl remus did not exit 30 s after stop")
        # An activated replica is the guest now: it stays Active; anything else is over.
        final: State = "Active" if state == "Active" else "Stopped"
        self._set(final, "StopRequested")
        self._event("stopped")
        # Answer first, then let the process end.
        threading.Timer(0.2, self.finished.set).start()
        return {"state": final}

    def _close_acceptor(self) -> None:
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is not None:
            acceptor.close()

    def _domain_paused(self) -> bool | None:
        """Whether `xl list` shows our domain paused; None if xl cannot tell."""
        rows = self._xl_list(self.config.domain)
        row = next((r for r in rows or [] if r.name == self.config.domain), None)
        return None if row is None else row.paused

    def _kill_receiver_and_destroy_replica(self) -> int | None:
        """SIGKILL migrate-receive, then `xl destroy <dom>--incoming` and any nameless domain
        its restore left; the first destroy's exit code (None: no migrate-receive was
        started). SIGKILL before its stdin closes: an EOF first would make xl fail over."""
        proc = self.xl
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        code = self._xl_command("destroy", f"{self.config.domain}--incoming")
        self._destroy_leftovers()
        return code

    def _xl_command(self, *args: str) -> int:
        argv = [self.config.xl, *args]
        env = {**os.environ, **self.config.xl_env}
        try:
            done = subprocess.run(argv, env=env, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as e:
            self._event("xl-command-failed", f"{' '.join(argv)}: {e}")
            return -1
        output = (done.stdout + done.stderr).decode(errors="replace").strip()
        log.info("%s -> %d %s", " ".join(argv), done.returncode, output)
        return done.returncode


# --- the control socket -------------------------------------------------------------------------


class _Handler(socketserver.StreamRequestHandler):
    server: _ControlServer

    def handle(self) -> None:
        for line in self.rfile:
            try:
                request = json.loads(line)
                if not isinstance(request, dict):
                    raise ValueError("request is not an object")
            except ValueError as e:
                response: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
            else:
                response = self.server.replicator.handle(request)
            try:
                self.wfile.write(json.dumps(response).encode() + b"\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                # The client gave up (an agent's timeout, an agent that exited): its loss.
                return


class _ControlServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, replicator: Replicator) -> None:
        self.replicator = replicator
        path = replicator.config.control_socket
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        old = os.umask(0o077)
        try:
            super().__init__(str(path), _Handler)
        finally:
            os.umask(old)


def _unix_listener(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o077)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(1)
    return sock


def _peer_name(sock: socket.socket) -> str:
    try:
        host, port = sock.getpeername()[:2]
    except (OSError, ValueError):
        return "?"
    return f"{host}:{port}"


# --- process entry ------------------------------------------------------------------------------


def _already_running(config: ReplicatorConfig) -> bool:
    if not config.control_socket.exists():
        return False
    try:
        request_sync(config.control_socket, {"op": "status"}, timeout=2.0)
    except ReplicatorUnavailable:
        return False
    return True


def _detach(log_file: Path) -> None:
    """Own session, no terminal, output to the log: nothing ties us to the agent."""
    with contextlib.suppress(PermissionError):  # already a session/group leader
        os.setsid()
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


def replicator_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="xenha agent replicator", description="relay one replication (see docs/design.md)"
    )
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument(
        "--foreground", action="store_true", help="keep the terminal and log to stderr"
    )
    args = parser.parse_args(argv)
    try:
        config = ReplicatorConfig.load(args.config)
    except ConfigError as e:
        print(f"xenha agent replicator: {e}", file=sys.stderr)
        return 2
    config.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if _already_running(config):
        print(f"xenha agent replicator: {config.uid} is already running", file=sys.stderr)
        return 3
    if not args.foreground:
        _detach(config.log_file)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s {config.role} {config.uid} %(threadName)s %(message)s",
        stream=sys.stderr,
    )
    try:
        replicator = Replicator(config)
    except (OSError, ValueError) as e:
        log.error("cannot start: %s", e)
        return 2

    def on_term(_signum: int, _frame: object) -> None:
        threading.Thread(target=replicator.handle, args=({"op": "stop"},), daemon=True).start()

    # Both mean "stop": dying with the default action would close migrate-receive's stdin,
    # and xl would fail over on its own.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    return replicator.run()


if __name__ == "__main__":
    sys.exit(replicator_main(sys.argv[1:]))
