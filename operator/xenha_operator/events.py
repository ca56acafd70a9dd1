"""Kubernetes Events about a XenReplication (core/v1, what `kubectl describe` shows)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from .status import Transition

MAX_MESSAGE = 1024


def reporting_instance() -> str:
    """Which replica says it: the pod name (POD_NAME, or kopf's POD_ID), else the host."""
    return os.environ.get("POD_NAME") or os.environ.get("POD_ID") or socket.gethostname()


def transition_key(uid: str, previous_status: Mapping[str, Any], number: int) -> str:
    """Names the `number`-th transition away from `previous_status`, the same for every
    operator replica that decides it (so a repeated decision cannot repeat the Event)."""
    canonical = json.dumps(previous_status, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(f"{uid}\n{canonical}\n{number}".encode()).hexdigest()
    return digest[:20]


def event_body(
    obj: Mapping[str, Any],
    transition: Transition,
    *,
    component: str,
    instance: str,
    now: datetime,
    key: str | None = None,
) -> dict[str, Any]:
    meta = obj["metadata"]
    if key is not None:
        # Event names are DNS subdomains (at most 253 characters).
        naming = {"name": f"{meta['name'][:200]}.{transition.reason.lower()[:30]}.{key}"}
    else:
        naming = {"generateName": f"{meta['name']}."}
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    message = transition.message
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 3] + "..."
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {**naming, "namespace": meta["namespace"]},
        "involvedObject": {
            "apiVersion": obj.get("apiVersion"),
            "kind": obj.get("kind"),
            "name": meta["name"],
            "namespace": meta["namespace"],
            "uid": meta["uid"],
            "resourceVersion": meta.get("resourceVersion"),
        },
        "type": transition.type,
        "reason": transition.reason,
        "message": message,
        "action": transition.reason,
        "source": {"component": component},
        "reportingComponent": component,
        "reportingInstance": instance,
        "firstTimestamp": stamp,
        "lastTimestamp": stamp,
        "eventTime": now.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "count": 1,
    }
