"""AgentSettings from the DaemonSet's environment, and the log format's redaction."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest
from xenha_agent import logs
from xenha_agent.config import AgentSettings, SettingsError
from xenha_agent.main import agent_main, settings_from
from xenha_agent.replicator_config import ConfigError, ReplicatorConfig

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


# 59 bytes: with `/<36-character uid>.accept.sock` (49 bytes), one more than a Unix socket
# path may have (108 bytes with the NUL).
TOO_DEEP = "/tmp/" + "d" * 54
DEEP_ENOUGH = "/tmp/" + "d" * 53


def test_a_run_dir_too_deep_for_its_sockets_is_refused_at_start_naming_path_and_limit(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert agent_main(["--node", "xen-a", "--run-dir", TOO_DEEP, "--health-port", "-1"]) == 2
    said = capsys.readouterr().out
    assert f"{TOO_DEEP}/00000000-0000-0000-0000-000000000000.accept.sock is 108 bytes" in said
    assert "must fit in 108 bytes" in said
    assert "at most 58 bytes" in said


def test_a_run_dir_whose_sockets_just_fit_is_accepted() -> None:
    assert AgentSettings(node_name="xen-a", run_dir=Path(DEEP_ENOUGH)).run_dir == Path(DEEP_ENOUGH)


def test_a_short_run_dir_flag_overrides_a_deep_one_in_the_environment() -> None:
    s = settings_from(
        ["--run-dir", "/run/xenha"], env={"NODE_NAME": "a", "XENHA_RUN_DIR": TOO_DEEP}
    )
    assert s.run_dir == Path("/run/xenha")


def test_a_replicator_refuses_a_config_whose_sockets_cannot_be_bound(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="108 bytes"):
        ReplicatorConfig(
            uid="6f1c0000-0000-0000-0000-000000000001",
            role="secondary",
            domain="db1",
            node="xen-b",
            peer_node="xen-a",
            command=["xl", "migrate-receive"],
            ca_file=tmp_path / "ca.crt",
            cert_file=tmp_path / "tls.crt",
            key_file=tmp_path / "tls.key",
            run_dir=Path(TOO_DEEP),
        )


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
