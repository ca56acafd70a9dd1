"""Node-local Events on a XenReplication: what this agent did, for `kubectl describe`.

The operator tells the story of transitions; the agent adds the node-local acts only it can
see (FailoverActivated, CopyDropped, SelfFenced, CopyDestroyed, ...). Posting an Event never
blocks a fencing action. The acts that matter most happen when the API is unreachable (a
self-fence), so Events that could not be posted are kept (a bounded backlog) and posted when
the API answers again, with their original timestamps.
"""

from __future__ import annotations

import logging
import secrets
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Literal

from xenha_agent.kube import ApiError, ApiUnavailable, KubeClient, Obj, events_path

log = logging.getLogger(__name__)

COMPONENT = "xenha-agent"
EventType = Literal["Normal", "Warning"]

# Reasons this agent uses (CamelCase, stable: alerts may match them).
FAILOVER_ACTIVATED = "FailoverActivated"
SWITCHOVER_ACTIVATED = "SwitchoverActivated"
COPY_DROPPED = "CopyDropped"
SELF_FENCED = "SelfFenced"
FENCE_LIFTED = "FenceLifted"
COPY_DESTROYED = "CopyDestroyed"
DEGRADED = "RunningUnprotected"
FENCING_LEASE_LOST = "FencingLeaseLost"
REPLICATOR_STARTED = "ReplicatorStarted"
REPLICATOR_STOPPED = "ReplicatorStopped"


def event(
    *,
    namespace: str,
    name: str,
    uid: str,
    reason: str,
    message: str,
    node: str,
    type_: EventType = "Normal",
    now: datetime,
) -> Obj:
    stamp = now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": f"{name}.{secrets.token_hex(8)}",
            "namespace": namespace,
            "labels": {"xenha.io/node": node},
        },
        "involvedObject": {
            "apiVersion": "xenha.io/v1alpha1",
            "kind": "XenReplication",
            "namespace": namespace,
            "name": name,
            "uid": uid,
        },
        "reason": reason,
        "message": message[:1024],
        "type": type_,
        "source": {"component": COMPONENT, "host": node},
        "reportingComponent": f"xenha.io/{COMPONENT}",
        "reportingInstance": node,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "count": 1,
    }


class EventRecorder:
    def __init__(
        self,
        kube: KubeClient,
        node: str,
        *,
        wallclock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.kube = kube
        self.node = node
        self.wallclock = wallclock
        self.backlog: deque[Obj] = deque(maxlen=100)

    async def emit(
        self,
        *,
        namespace: str,
        name: str,
        uid: str,
        reason: str,
        message: str,
        type_: EventType = "Normal",
    ) -> None:
        body = event(
            namespace=namespace,
            name=name,
            uid=uid,
            reason=reason,
            message=message,
            node=self.node,
            type_=type_,
            now=self.wallclock(),
        )
        log.info("event reason=%s replication=%s/%s message=%r", reason, namespace, name, message)
        await self._post(body)

    async def _post(self, body: Obj) -> bool:
        meta = body["metadata"]
        try:
            await self.kube.create(events_path(meta["namespace"]), body)
        except ApiUnavailable as e:
            log.info("event %s kept for later: %s", body["reason"], e)
            self.backlog.append(body)
            return False
        except ApiError as e:
            log.warning("could not post event %s in %s: %s", body["reason"], meta["namespace"], e)
        return True

    async def flush(self) -> None:
        """Post what could not be posted before; stops at the first failure."""
        while self.backlog:
            if not await self._post(self.backlog.popleft()):
                # _post put it back at the end; keep the original order.
                self.backlog.rotate(1)
                return
