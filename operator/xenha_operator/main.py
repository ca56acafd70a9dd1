"""`xenha operator`: run the kopf operator with explicit settings.

kopf's defaults are changed where they matter to this project:

- peering under its own name (`xenha-operator`), mandatory unless `--standalone`, with a random
  priority per process (kopf pauses replicas of *equal* priority too) and a short peer
  lifetime, so two replicas take turns and a killed one is replaced within seconds;
- no annotations on users' objects: kopf's handler progress lives in `status.kopf`, its
  diff-base is not kept at all (no handler reacts to diffs);
- kopf posts only its warnings and errors as Events; the operator posts its own transitions;
- the fencing-Lease watch is filtered server-side by the `xenha.io/replication` label;
- a liveness endpoint and Prometheus metrics when asked for.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import kopf
from kubernetes.config.config_exception import ConfigException

from xenha.api.fencing import LEASE_KIND_LABEL

from . import handlers
from .kube import Kind, Kube, KubeError, load_configuration
from .metrics import OperatorMetrics
from .peering import PEERING_GROUP, PEERING_VERSION, peering_object
from .settings import FINALIZER, OperatorSettings, parse_args

log = logging.getLogger(__name__)


class _NoDiffBase(kopf.DiffBaseStorage):
    """Keep no diff-base: no handler reacts to diffs, so there is nothing to remember."""

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


def kopf_settings(ours: OperatorSettings) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.peering.name = ours.peering_name
    settings.peering.priority = ours.priority
    settings.peering.lifetime = ours.peering_lifetime
    settings.peering.standalone = ours.standalone
    settings.peering.mandatory = not ours.standalone
    settings.peering.clusterwide = ours.clusterwide
    settings.peering.stealth = True
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.StatusProgressStorage(
        field="status.kopf.progress", touch_field="status.kopf.dummy"
    )
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = ours.reporting_component
    # Only xenha's Leases (fencing and host), not every Lease in the cluster.
    settings.watching.label_selectors["coordination.k8s.io", "leases"] = LEASE_KIND_LABEL
    # Daemons exit at once when told; poll quickly in case one is mid-request.
    settings.background.cancellation_polling = 1
    return settings


async def ensure_peering(kube: Kube, ours: OperatorSettings) -> None:
    """Create the peering object(s) if missing; the CRDs must exist (Helm chart)."""
    if ours.standalone:
        return
    scopes: list[str | None] = list(ours.namespaces) if ours.namespaces else [None]
    for namespace in scopes:
        plural = "kopfpeerings" if namespace is not None else "clusterkopfpeerings"
        kind = Kind(PEERING_GROUP, PEERING_VERSION, plural)
        try:
            await kube.create_or_get(kind, namespace, peering_object(ours.peering_name, namespace))
        except KubeError as exc:
            if exc.status == 404:
                raise SystemExit(
                    f"the kopf peering CRD ({plural}.{PEERING_GROUP}) is not installed: install "
                    "the chart's CRDs or run with --standalone"
                ) from exc
            raise


async def run(
    ours: OperatorSettings,
    *,
    stop_flag: asyncio.Event | threading.Event | None = None,
    ready_flag: asyncio.Event | threading.Event | None = None,
    metrics: OperatorMetrics | None = None,
) -> None:
    """Run the operator until `stop_flag` is set (or forever)."""
    configuration = load_configuration(ours.kubeconfig)
    kube = Kube(configuration)
    metrics = metrics or OperatorMetrics()
    ctx = handlers.Context(settings=ours, kube=kube, metrics=metrics)
    try:
        await ensure_peering(kube, ours)
        if ours.metrics_port is not None:
            metrics.serve(ours.metrics_port)
        kwargs: dict[str, Any] = {}
        if ours.clusterwide:
            kwargs["clusterwide"] = True
        else:
            kwargs["namespaces"] = list(ours.namespaces)
        await kopf.operator(
            registry=handlers.registry,
            settings=kopf_settings(ours),
            memo=kopf.Memo(ctx=ctx),
            # Peering name, priority and standalone mode travel in `settings` only: kopf's
            # `peering_name=` argument would also make peering mandatory in standalone mode.
            liveness_endpoint=ours.liveness_endpoint,
            stop_flag=stop_flag,
            ready_flag=ready_flag,
            **kwargs,
        )
    finally:
        kube.close()


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(environ: Mapping[str, str]) -> None:
    """XENHA_LOG_LEVEL (INFO) and XENHA_LOG_FORMAT (text or json), as the chart sets them."""
    handler = logging.StreamHandler()
    if environ.get("XENHA_LOG_FORMAT", "text").lower() == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(environ.get("XENHA_LOG_LEVEL", "INFO").upper())
    # kopf logs every indexer call (each XenNode report) at INFO; keep its warnings only,
    # unless debugging.
    if root.level > logging.DEBUG:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def operator_main(argv: Sequence[str]) -> int:
    """Entry point of `xenha operator [options]`."""
    ours = parse_args(argv)
    configure_logging(os.environ)
    log.info(
        "xenha operator starting: %s, peering %s (priority %d)",
        "cluster-wide" if ours.clusterwide else f"namespaces {', '.join(ours.namespaces)}",
        "off" if ours.standalone else ours.peering_name,
        ours.priority,
    )
    try:
        asyncio.run(run(ours))
    except KeyboardInterrupt:
        return 130
    except ConfigException as exc:
        log.error("no credentials for the Kubernetes API: %s", exc)
        return 1
    return 0
