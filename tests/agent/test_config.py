"""AgentSettings from the DaemonSet's environment, and the log format's redaction."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from xenha_agent import logs
from xenha_agent.config import AgentSettings, SettingsError
from xenha_agent.main import settings_from

DAEMONSET = {
    "NODE_NAME": "xen-a",
    "XENHA_NAMESPACE": "xenha-agents",
    "XENHA_RELAY_ADVERTISE": "10.0.0.11",
    "XENHA_RELAY_PORTS": "7443",
    "XENHA_HEALTH_PORT": "9464",
    "XENHA_RUN_DIR": "/run/xenha",
    "XENSTORED_PATH": "/var/run/xenstored/socket",
    "XENHA_REPLICATOR_LAUNCHER": "systemd-scope",
    "XENHA_LOG_LEVEL": "INFO",
    "XENHA_LOG_FORMAT": "json",
}


def test_the_daemonset_environment() -> None:
    s = AgentSettings.from_env(DAEMONSET)
    assert (s.node_name, s.namespace, s.kubeconfig) == ("xen-a", "xenha-agents", None)
    assert s.relay_endpoint == "10.0.0.11:7443"
    assert s.host_lease_name == "xenha-node-xen-a"
    assert s.run_dir == Path("/run/xenha")
    assert s.replicator_launcher == "systemd-scope"
    assert s.log_format == "json"


def test_defaults_with_only_a_node_name() -> None:
    s = AgentSettings.from_env({"NODE_NAME": "xen-b"})
    assert s.namespace == "xenha-system"
    assert s.heartbeat_timeout == 0.6
    assert s.report_period == 2.0
    assert s.replicator_launcher == "process"
    # A wildcard bind address is not something a peer can dial: the node name is.
    assert s.relay_endpoint == "xen-b:7443"
    assert s.relay_endpoint_for(7450) == "xen-b:7450"


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        pytest.param({}, "NODE_NAME", id="no node name"),
        pytest.param({"NODE_NAME": "a", "XENHA_RELAY_PORTS": "x"}, "XENHA_RELAY_PORTS", id="ports"),
        pytest.param({"NODE_NAME": "a", "XENHA_RELAY_PORTS": "9-1"}, "range", id="range"),
        pytest.param(
            {"NODE_NAME": "a", "XENHA_HEARTBEAT_TIMEOUT": "soon"}, "XENHA_HEARTBEAT", id="number"
        ),
        pytest.param({"NODE_NAME": "a", "XENHA_LOG_FORMAT": "xml"}, "XENHA_LOG_FORMAT", id="fmt"),
        pytest.param(
            {"NODE_NAME": "a", "XENHA_REPLICATOR_LAUNCHER": "nohup"}, "LAUNCHER", id="launcher"
        ),
    ],
)
def test_bad_environment_is_named(env: dict[str, str], complaint: str) -> None:
    with pytest.raises(SettingsError, match=complaint):
        AgentSettings.from_env(env)


def test_flags_override_the_environment() -> None:
    s = settings_from(
        ["--node", "xen-c", "--health-port", "-1", "--run-dir", "/tmp/r"], env=DAEMONSET
    )
    assert (s.node_name, s.health_port, s.run_dir) == ("xen-c", -1, Path("/tmp/r"))
    assert s.namespace == "xenha-agents"


def test_json_logs_never_carry_a_pem_block() -> None:
    out = io.StringIO()
    logs.setup("json", "INFO", stream=out)
    try:
        key = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEI...\n-----END EC PRIVATE KEY-----"
        logging.getLogger("xenha_agent.test").info("loaded %s for db1", key)
    finally:
        logging.getLogger().handlers.clear()
    record = json.loads(out.getvalue())
    assert record["msg"] == "loaded [redacted PEM] for db1"
    assert record["level"] == "info"
