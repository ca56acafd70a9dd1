"""The simulated `xl` says what real xl says, with the same exit codes."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from xenha.sim.client import ServiceClient
from xenha.sim.host import SimHost
from xenha.stream.format import MIGRATE_RECEIVER_BANNER

from .simlab import wait_for

# Starts simulated Xen hosts (processes): see the marker in pyproject.toml.
pytestmark = pytest.mark.integration

BANNER = MIGRATE_RECEIVER_BANNER.decode().strip()
# A receiver that only says hello and swallows the stream: enough for xl's preamble.
FAKE_RECEIVER = f"printf '{BANNER}\\n'; cat >/dev/null"
ROW = re.compile(
    r"^(?P<name>\S+)\s+(?P<id>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+(?P<state>[r-][b-][p-][s-][-rscwS][d-])\s+(?P<time>\d+\.\d)$"
)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimHost]:
    root = tmp_path_factory.mktemp("xl")
    h = SimHost.start(root / "xen-a", "xen-a", fabric_dir=root / "fabric", suspend_timeout=0.5)
    try:
        yield h
    finally:
        h.stop(timeout=3)


@pytest.fixture
def guest(host: SimHost, request: pytest.FixtureRequest) -> Iterator[str]:
    name = re.sub(r"[^a-z0-9]", "", request.node.name.lower())[-20:]
    host.create_guest(name, memory_mib=16, dirty_rate=50)
    try:
        yield name
    finally:
        host.xl("destroy", name)


class TestList:
    def test_columns_are_xls(self, host: SimHost, guest: str) -> None:
        out = host.xl("list").stdout.splitlines()
        assert (
            out[0] == "Name                                        ID   Mem VCPUs\tState\tTime(s)"
        )
        rows = {m["name"]: m for m in map(ROW.match, out[1:]) if m}
        assert rows["Domain-0"]["id"] == "0"
        assert rows[guest]["mem"] == "16"
        assert rows[guest]["state"] == "r-----"
        line = next(line for line in out if line.startswith(guest))
        assert line.index(rows[guest]["id"]) + len(rows[guest]["id"]) == 46  # %-40s %5d

    def test_a_paused_domain_shows_p_and_unpause_clears_it(self, host: SimHost, guest: str) -> None:
        assert host.xl("pause", guest).returncode == 0
        assert ROW.match(host.xl("list", guest).stdout.splitlines()[1])["state"] == "--p---"  # type: ignore[index]
        assert host.xl("unpause", guest).returncode == 0
        assert "--p---" not in host.xl("list", guest).stdout

    def test_the_state_flags_are_independent_as_xl_prints_libxl_dominfo(
        self, host: SimHost, guest: str
    ) -> None:
        """xl_list.c prints running, blocked, paused, shutdown, the shutdown reason's letter
        (s: suspend) and dying, each for itself: a guest paused while suspended for a
        checkpoint (fenced mid-checkpoint) shows both p and ss."""

        def state() -> str:
            return ROW.match(host.xl("list", guest).stdout.splitlines()[1])["state"]  # type: ignore[index]

        domid = host.domain(guest)["domid"]  # type: ignore[index]
        with host.hypercall() as hc:
            hc.call("domain_suspend", domid=domid, timeout=5)
            assert state() == "---ss-"
            assert host.xl("pause", guest).returncode == 0
            assert state() == "--pss-"
            hc.call("domain_resume", domid=domid)
            assert state() == "--p---"
            assert host.xl("unpause", guest).returncode == 0
            assert state() == "r-----"

    def test_long_listing_is_libxl_json(self, host: SimHost, guest: str) -> None:
        entries = json.loads(host.xl("list", "-l").stdout)
        entry = next(e for e in entries if e["config"]["c_info"]["name"] == guest)
        assert entry["config"]["b_info"]["target_memkb"] == 16 * 1024
        assert all(e["domid"] != 0 for e in entries)

    def test_unknown_names_are_invalid_identifiers(self, host: SimHost) -> None:
        result = host.xl("list", "nosuch")
        assert (result.returncode, result.stderr) == (
            1,
            "nosuch is an invalid domain identifier (rc=-6)\n",
        )

    def test_unknown_numeric_ids_do_not_exist(self, host: SimHost) -> None:
        result = host.xl("list", "999")
        assert (result.returncode, result.stderr) == (1, "Error: Domain '999' does not exist.\n")


class TestInfo:
    def test_reports_version_memory_and_virt_caps(self, host: SimHost) -> None:
        fields = {}
        for line in host.xl("info").stdout.splitlines():
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        assert fields["host"] == "xen-a"
        assert (fields["xen_major"], fields["xen_minor"], fields["xen_version"]) == (
            "4",
            "17",
            "4.17.5",
        )
        assert int(fields["free_memory"]) < int(fields["total_memory"]) == 8192
        assert "hvm" in fields["virt_caps"].split()

    def test_one_field_by_name(self, host: SimHost) -> None:
        assert host.xl("info", "xen_version").stdout == "4.17.5\n"


class TestLifecycle:
    def test_create_destroy(self, host: SimHost, tmp_path: Path) -> None:
        cfg = tmp_path / "c.cfg"
        cfg.write_text('name = "made"\nmemory = 16  # MiB\nvcpus = 2\n')
        result = host.xl("create", str(cfg))
        assert (result.returncode, result.stderr) == (0, f"Parsing config from {cfg}\n")
        assert host.domain("made")["vcpus"] == 2  # type: ignore[index]
        assert host.xl("destroy", "made").returncode == 0
        assert host.domain("made") is None

    def test_create_refuses_a_taken_name(self, host: SimHost, guest: str, tmp_path: Path) -> None:
        cfg = tmp_path / "c.cfg"
        cfg.write_text(f'name = "{guest}"\nmemory = 16\n')
        result = host.xl("create", str(cfg))
        assert result.returncode == 1
        assert f'domain with name "{guest}" already exists.' in result.stderr

    def test_create_reports_config_errors(self, host: SimHost, tmp_path: Path) -> None:
        missing = host.xl("create", str(tmp_path / "none.cfg"))
        assert missing.returncode == 1
        assert "Failed to read config file" in missing.stderr
        bad = tmp_path / "bad.cfg"
        bad.write_text("name = \n")
        result = host.xl("create", str(bad))
        assert result.returncode == 1
        assert "config parsing error" in result.stderr

    def test_rename_and_its_refusal(self, host: SimHost, guest: str) -> None:
        assert host.xl("rename", guest, f"{guest}x").returncode == 0
        taken = host.xl("rename", f"{guest}x", "Domain-0")
        assert taken.returncode == 1
        assert taken.stderr.endswith(f"Can't rename domain '{guest}x'.\n")
        assert host.xl("rename", f"{guest}x", guest).returncode == 0

    def test_destroying_dom0_needs_force(self, host: SimHost) -> None:
        result = host.xl("destroy", "0")
        assert result.returncode == 1
        assert result.stderr.startswith("Not destroying domain 0; use -f to force.")

    def test_unpausing_a_running_domain_logs_but_succeeds(self, host: SimHost, guest: str) -> None:
        result = host.xl("unpause", guest)
        assert result.returncode == 0
        assert "Unpausing domain: Invalid argument" in result.stderr


class TestRemusOptions:
    def test_colo_conflicts_with_interval_and_unsafe_flags(self, host: SimHost, guest: str) -> None:
        for flags in (["-i", "100"], ["-F", "-n"], ["-F", "-d"], ["-F", "-b"]):
            result = host.xl("remus", "-c", *flags, guest, "h")
            assert result.returncode == 255
            assert result.stderr == "option -c is conflict with -i, -d, -n or -b: Success\n"

    def test_userspace_proxy_needs_colo(self, host: SimHost, guest: str) -> None:
        result = host.xl("remus", "-p", guest, "h")
        assert (result.returncode, result.stderr) == (
            255,
            "Option -p must be used in conjunction with -c",
        )

    def test_unsafe_flags_need_F_and_end_like_a_failed_backup(
        self, host: SimHost, guest: str
    ) -> None:
        result = host.xl("remus", "-n", "-s", "", guest, FAKE_RECEIVER)
        assert result.returncode == 1
        assert "Unsafe mode must be enabled to replicate to /dev/null," in result.stderr
        assert result.stderr.endswith("Remus: Backup failed? resuming domain at primary.\n")

    def test_a_transport_that_says_something_else_is_refused(
        self, host: SimHost, guest: str
    ) -> None:
        chatty = "yes hello | head -c 100"
        result = host.xl("remus", "-s", "", guest, chatty)
        assert result.returncode == 1
        assert result.stderr.startswith(
            "migration receiver stream contained unexpected data instead of banner\n"
            f"(command run was: {chatty} )\n"
        )
        silent = host.xl("remus", "-s", "", guest, "exit 3")
        assert silent.returncode == 1
        assert "truncated reading banner from migration receiver stream" in silent.stderr
        assert "exited with error status 3" in silent.stderr

    def test_remus_to_a_sink_runs_until_the_transport_dies(self, host: SimHost, guest: str) -> None:
        # The sink never acknowledges; when it exits, xl sees the stream break.
        result = host.xl(
            "remus",
            "-i",
            "20",
            "-s",
            "",
            guest,
            f"printf '{BANNER}\\n'; head -c 17300000 >/dev/null",
        )
        assert result.returncode == 1
        assert "Remus: Backup failed? resuming domain at primary." in result.stderr
        assert host.domain(guest)["output_mode"] == "direct"  # type: ignore[index]

    def test_a_paused_primary_cannot_suspend_for_a_checkpoint(
        self, host: SimHost, guest: str
    ) -> None:
        assert host.xl("pause", guest).returncode == 0
        result = host.xl("remus", "-i", "20", "-s", "", guest, FAKE_RECEIVER)
        assert result.returncode == 1
        assert result.stderr.endswith("Failed to suspend domain at primary.\n")
        assert "Backup failed" not in result.stderr

    def test_missing_arguments_and_unknown_options(self, host: SimHost) -> None:
        short = host.xl("remus", "db1")
        assert short.returncode == 2
        assert short.stderr == "'xl remus' requires at least 2 arguments.\n\n"
        assert short.stdout.startswith("Usage: xl [-vf] remus [options] <Domain> [<host>]")
        unknown = host.xl("remus", "-z", "db1", "h")
        assert (unknown.returncode, unknown.stderr) == (2, "option `z' not supported.\n")

    def test_blackhole_replicates_to_nowhere_and_releases_output_as_written(
        self, host: SimHost, guest: str
    ) -> None:
        proc = subprocess.Popen(
            [str(host.xl_path), "remus", "-F", "-b", "-i", "20", guest, "unused"],
            env=host.env,
            stderr=subprocess.PIPE,
        )
        try:
            wait_for(lambda: host.domain(guest)["output_mode"] == "remus", what="buffering")  # type: ignore[index]
            with ServiceClient(host.service_address(guest)) as client:
                assert client.next() is not None
            assert proc.poll() is None
        finally:
            proc.kill()
            proc.wait()

    def test_help_offers_colo(self, host: SimHost) -> None:
        text = host.xl("help", "remus").stdout
        assert any(line.strip().startswith("-c") and "COLO" in line for line in text.splitlines())


def test_migrate_receive_only_knows_checkpointed_streams(host: SimHost) -> None:
    result = host.xl("migrate-receive", input="")
    assert result.returncode == 1


def test_an_unknown_subcommand(host: SimHost) -> None:
    result = host.xl("frobnicate")
    assert (result.returncode, result.stderr) == (1, "command not implemented\n")


def test_xl_on_a_dead_host_cannot_init_its_context(tmp_path: Path) -> None:
    dead = SimHost.start(tmp_path / "xen-z", "xen-z")
    dead.kill()
    result = dead.xl("list")
    assert result.returncode == 1
    assert result.stderr.endswith("cannot init xl context\n")
