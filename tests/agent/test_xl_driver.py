"""The Xen driver: strict parsers over xl's real output, then the driver against a simulated host
(its `xl` executable and its XenStore socket, which pyxs talks to unchanged)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from xenha_agent.xen.xenstore import XenStore
from xenha_agent.xen.xl import (
    Domain,
    DomainNotFound,
    Xl,
    XlError,
    XlOutputError,
    parse_info,
    parse_list,
    parse_list_long,
    remus_supports_colo,
)

# Recorded from Debian's Xen 4.17 (tools/xl/xl_list.c prints these columns).
XL_LIST = (
    "Name                                        ID   Mem VCPUs\tState\tTime(s)\n"
    "Domain-0                                     0  1024     2     r-----      63.2\n"
    "db1                                          3   128     1     -b----       1.3\n"
    "db1--incoming                                4   128     1     --p---       0.0\n"
    "crashed one                                  7    64     1     ---sc-       0.2\n"
    "(null)                                       9     0     0     --ps-d       0.0\n"
)


def test_xl_list_columns() -> None:
    rows = parse_list(XL_LIST)
    assert [(d.name, d.domid, d.memory_mib, d.vcpus, d.state) for d in rows] == [
        ("Domain-0", 0, 1024, 2, "running"),
        ("db1", 3, 128, 1, "running"),
        ("db1--incoming", 4, 128, 1, "paused"),
        ("crashed one", 7, 64, 1, "crashed"),
        ("(null)", 9, 0, 0, "dying"),
    ]
    assert rows[2].paused
    assert rows[1].cpu_time == 1.3


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="nothing"),
        pytest.param("Domain-0 0 1024 2 r----- 63.2\n", id="no header"),
        pytest.param(XL_LIST + "db2 x 1 1 r----- 0.0\n", id="domid not a number"),
        pytest.param(XL_LIST + "db2 5 1 1 running 0.0\n", id="state not flags"),
        pytest.param(XL_LIST + "db2 5 1\n", id="short row"),
    ],
)
def test_xl_list_rejects_what_is_not_xl_output(text: str) -> None:
    with pytest.raises(XlOutputError):
        parse_list(text)


@pytest.mark.parametrize(
    ("flags", "state"),
    [
        ("r-----", "running"),
        ("-b----", "running"),
        ("--p---", "paused"),
        # Mid-checkpoint under Remus/COLO: shut down for suspend, seen on real Xen 4.17.
        ("---ss-", "running"),
        # Paused while suspended for a checkpoint (fenced while xl remus was blocked on a
        # lost stream): the flags are independent and the pause is what counts.
        ("--pss-", "paused"),
        ("r-p---", "paused"),
        # A crash or shutdown says more than a pause.
        ("--psc-", "crashed"),
        ("--ps--", "shutdown"),
        ("---sc-", "crashed"),
        ("---sr-", "shutdown"),
        ("-----d", "dying"),
    ],
)
def test_domain_state_from_xl_list_flags(flags: str, state: str) -> None:
    domain = Domain(name="db1", domid=3, memory_mib=128, vcpus=1, flags=flags, cpu_time=0.0)
    assert domain.state == state
    # `paused` (what fencing checks before pausing again: xl pause nests) agrees with it.
    assert domain.paused == (flags[2] == "p")


def test_xl_list_long_is_json_with_a_config_per_domain() -> None:
    text = '[{"domid": 3, "config": {"c_info": {"type": "pv", "name": "db1"}, "b_info": {}}}]'
    [details] = parse_list_long(text)
    assert (details.domid, details.name) == (3, "db1")
    assert details.config["c_info"]["type"] == "pv"
    assert parse_list_long("[\n]\n") == []


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("not json", id="not JSON"),
        pytest.param('{"domid": 3}', id="not an array"),
        pytest.param('[{"domid": "3", "config": {"c_info": {"name": "a"}}}]', id="domid str"),
        pytest.param('[{"domid": 3, "config": {"c_info": {}}}]', id="no name"),
        pytest.param('[{"domid": 3}]', id="no config"),
    ],
)
def test_xl_list_long_rejects_malformed_json(text: str) -> None:
    with pytest.raises(XlOutputError):
        parse_list_long(text)


XL_INFO = """\
host                   : xen-a
release                : 6.1.0-28-amd64
virt_caps              : pv hvm hap shadow
total_memory           : 2047
free_memory            : 900
xen_major              : 4
xen_minor              : 17
xen_version            : 4.17.5
xen_changeset          :
xen_commandline        : placeholder dom0_mem=1024M,max:1024M console=hvc0 x=a:b
"""


def test_xl_info_fields() -> None:
    info = parse_info(XL_INFO)
    assert (info.host, info.version, info.total_memory_mib, info.free_memory_mib) == (
        "xen-a",
        "4.17",
        2047,
        900,
    )
    assert info.virt_caps == {"pv", "hvm", "hap", "shadow"}
    assert info.fields["xen_commandline"].endswith("x=a:b")
    assert info.fields["xen_changeset"] == ""


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(XL_INFO.replace("free_memory            : 900\n", ""), id="no free_memory"),
        pytest.param(XL_INFO.replace(": 900", ": lots"), id="memory not a number"),
        pytest.param(XL_INFO + "garbage line\n", id="line without a colon"),
    ],
)
def test_xl_info_rejects_malformed_output(text: str) -> None:
    with pytest.raises(XlOutputError):
        parse_info(text)


def test_colo_support_is_read_from_xl_remus_help() -> None:
    patched = "-c                      Enable COLO HA. This option conflicts with -i and -b\n"
    assert remus_supports_colo("Options:\n\n" + patched)
    assert not remus_supports_colo("Options:\n\n-i MS    checkpoint interval\n")


# -- against a simulated host -----------------------------------------------------------------


@pytest.fixture(scope="module")
def sim_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from xenha.sim.host import SimHost

    host = SimHost.start(tmp_path_factory.mktemp("xen-a"), "xen-a")
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture
def xl(sim_host: Any) -> Xl:
    return Xl(str(sim_host.xl_path), env=sim_host.env, timeout=30)


@pytest.fixture
def guest(sim_host: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"g{abs(hash(request.node.name)) % 100000}"
    sim_host.create_guest(name, memory_mib=16)
    try:
        yield name
    finally:
        sim_host.xl("destroy", name)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.mark.integration
def test_list_and_long_list_on_a_simulated_host(xl: Xl, guest: str) -> None:
    domains = run(xl.list_domains())
    assert domains[0].name == "Domain-0"
    mine = next(d for d in domains if d.name == guest)
    assert (mine.memory_mib, mine.state) == (16, "running")
    details = run(xl.list_long())
    assert guest in {d.name for d in details}
    assert all(d.domid != 0 for d in details)


@pytest.mark.integration
def test_info_on_a_simulated_host(xl: Xl) -> None:
    info = run(xl.info())
    assert info.host == "xen-a"
    assert info.version == "4.17"
    assert 0 < info.free_memory_mib <= info.total_memory_mib
    assert run(xl.supports_colo())


@pytest.mark.integration
def test_pause_unpause_rename_destroy(xl: Xl, guest: str) -> None:
    async def scenario() -> None:
        await xl.pause(guest)
        paused = await xl.domain(guest)
        assert paused is not None
        assert paused.state == "paused"
        await xl.unpause(guest)
        running = await xl.domain(guest)
        assert running is not None
        assert running.state == "running"
        await xl.rename(guest, guest + "-b")
        assert await xl.domain(guest) is None
        assert await xl.domain(guest + "-b") is not None
        await xl.rename(guest + "-b", guest)
        await xl.destroy(guest)
        assert await xl.domain(guest) is None

    run(scenario())


@pytest.mark.integration
def test_a_guest_paused_mid_checkpoint_reads_as_paused(sim_host: Any, xl: Xl, guest: str) -> None:
    """What a fence looks like while `xl remus` is blocked on a lost stream: the guest is
    suspended for a checkpoint and then paused. Read as running, the agent would pause it
    again on every pass (FenceNotInPlace), and xl pause nests."""

    async def scenario() -> None:
        domain = await xl.domain(guest)
        assert domain is not None
        with sim_host.hypercall() as hc:
            hc.call("domain_suspend", domid=domain.domid, timeout=5.0)
        suspended = await xl.domain(guest)
        assert suspended is not None
        assert (suspended.state, suspended.paused) == ("running", False)
        await xl.pause(guest)
        fenced = await xl.domain(guest)
        assert fenced is not None
        assert fenced.flags == "--pss-"
        assert (fenced.state, fenced.paused) == ("paused", True)
        with sim_host.hypercall() as hc:
            hc.call("domain_resume", domid=domain.domid)
        await xl.unpause(guest)
        running = await xl.domain(guest)
        assert running is not None
        assert (running.state, running.paused) == ("running", False)

    run(scenario())


@pytest.mark.integration
def test_errors_carry_xl_stderr_and_exit_code(xl: Xl) -> None:
    async def scenario() -> None:
        with pytest.raises(DomainNotFound) as missing:
            await xl.pause("no-such-guest")
        assert missing.value.returncode == 1
        assert "no-such-guest is an invalid domain identifier" in missing.value.stderr
        assert missing.value.argv[1:] == ["pause", "no-such-guest"]
        with pytest.raises(XlError) as bad:
            await xl.run("list", "--no-such-option")
        assert bad.value.returncode != 0
        assert not isinstance(bad.value, DomainNotFound)

    run(scenario())


@pytest.mark.integration
def test_xenstore_domains_and_release_watch(sim_host: Any, xl: Xl, guest: str) -> None:
    store = XenStore(sim_host.xenstore_path)

    async def scenario() -> None:
        domain: Domain | None = await xl.domain(guest)
        assert domain is not None
        record = await store.domain(domain.domid)
        assert record is not None
        assert record.name == guest
        assert domain.domid in await store.domids()
        assert await store.read(f"/local/domain/{domain.domid}/no/such/key") is None

        changes = asyncio.Queue[None]()
        watch = asyncio.create_task(store.watch_domains(lambda: changes.put_nowait(None)))
        try:
            # A watch fires once when it is set.
            await asyncio.wait_for(changes.get(), 10)
            await _drain(changes)
            await xl.destroy(guest)
            await asyncio.wait_for(changes.get(), 10)
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)
        assert await store.domain(domain.domid) is None

    run(scenario())


@pytest.mark.integration
def test_xenstore_unreachable_is_an_error_not_a_hang(tmp_path: Path) -> None:
    from xenha_agent.xen.xenstore import XenStoreError

    store = XenStore(tmp_path / "no-socket", timeout=2)
    with pytest.raises(XenStoreError):
        run(store.domids())


async def _drain(queue: asyncio.Queue[None]) -> None:
    await asyncio.sleep(0.3)
    while not queue.empty():
        queue.get_nowait()
