"""spec -> the exact `xl remus` and `xl migrate-receive` command lines."""

from __future__ import annotations

from typing import Any

import pytest

from xenha.api import (
    CheckpointSpec,
    XenReplicationSpec,
    parse_spec,
    receiver_argv,
    sender_argv,
    xl_commands,
)

PIPE = "xenha agent pipe --socket /run/xenha/u1.xl.sock"
TAIL = ["-s", "", "db1", PIPE]
REMUS_RECEIVER = ["xl", "migrate-receive", "-r", "-e"]
COLO_RECEIVER = ["xl", "migrate-receive", "--colo", "-e"]


def spec(mode: str, **extra: Any) -> XenReplicationSpec:
    return parse_spec(
        {"domain": "db1", "mode": mode, "primaryNode": "xen-a", "secondaryNode": "xen-b", **extra}
    )


CASES: list[tuple[str, XenReplicationSpec, list[str], list[str] | None]] = [
    (
        "remus defaults: 200 ms, compressed",
        spec("remus"),
        ["xl", "remus", "-i", "200", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus custom interval",
        spec("remus", checkpoint={"intervalMs": 25}),
        ["xl", "remus", "-i", "25", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus without compression",
        spec("remus", checkpoint={"compression": False}),
        ["xl", "remus", "-i", "200", "-u", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus explicit compression is the default: no -u",
        spec("remus", checkpoint={"compression": True}),
        ["xl", "remus", "-i", "200", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus unsafe allow alone",
        spec("remus", unsafe={"allow": True}),
        ["xl", "remus", "-i", "200", "-F", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus blackhole: nothing receives",
        spec("remus", unsafe={"allow": True, "blackhole": True}),
        ["xl", "remus", "-i", "200", "-F", "-b", *TAIL],
        None,
    ),
    (
        "remus without network buffering",
        spec("remus", unsafe={"allow": True, "disableNetworkBuffering": True}),
        ["xl", "remus", "-i", "200", "-F", "-n", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus without disk replication",
        spec("remus", unsafe={"allow": True, "disableDiskReplication": True}),
        ["xl", "remus", "-i", "200", "-F", "-d", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus, everything unsafe at once (the recorded real-Xen run)",
        spec(
            "remus",
            checkpoint={"intervalMs": 500},
            unsafe={"allow": True, "disableNetworkBuffering": True, "disableDiskReplication": True},
        ),
        ["xl", "remus", "-i", "500", "-F", "-n", "-d", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "remus netbuf script: sender only",
        spec("remus", networkBufferScript="/etc/xen/scripts/my-netbuf"),
        ["xl", "remus", "-i", "200", "-N", "/etc/xen/scripts/my-netbuf", *TAIL],
        REMUS_RECEIVER,
    ),
    (
        "colo: -c, no interval, no -u",
        spec("colo"),
        ["xl", "remus", "-c", *TAIL],
        COLO_RECEIVER,
    ),
    (
        "colo with explicit compression off: still no -u",
        spec("colo", checkpoint={"compression": False}),
        ["xl", "remus", "-c", *TAIL],
        COLO_RECEIVER,
    ),
    (
        "colo with userspace proxy: -p and its receiver twin",
        spec("colo", colo={"userspaceProxy": True}),
        ["xl", "remus", "-c", "-p", *TAIL],
        ["xl", "migrate-receive", "--colo", "--userspace-colo-proxy", "-e"],
    ),
    (
        "colo proxy script goes to both sides",
        spec("colo", networkBufferScript="/etc/xen/scripts/colo-proxy-setup"),
        ["xl", "remus", "-c", "-N", "/etc/xen/scripts/colo-proxy-setup", *TAIL],
        [
            "xl",
            "migrate-receive",
            "--colo",
            "--coloft-script",
            "/etc/xen/scripts/colo-proxy-setup",
            "-e",
        ],
    ),
    (
        "colo with unsafe allow: -F is accepted with -c",
        spec("colo", unsafe={"allow": True}),
        ["xl", "remus", "-c", "-F", *TAIL],
        COLO_RECEIVER,
    ),
]


@pytest.mark.parametrize(
    ("the_spec", "sender", "receiver"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_argv(the_spec: XenReplicationSpec, sender: list[str], receiver: list[str] | None) -> None:
    commands = xl_commands(the_spec, PIPE)
    assert commands.sender == sender
    assert commands.receiver == receiver


def test_suspension_and_failover_settings_do_not_reach_xl() -> None:
    plain = xl_commands(spec("remus"), PIPE)
    tuned = xl_commands(
        spec("remus", suspended=True, failover={"automatic": False, "leaseDurationSeconds": 9}),
        PIPE,
    )
    assert tuned == plain


def test_the_xl_binary_can_be_replaced() -> None:
    assert sender_argv(spec("colo"), PIPE, xl="/opt/sim/xl")[0] == "/opt/sim/xl"
    assert receiver_argv(spec("colo"), xl="/opt/sim/xl") == [
        "/opt/sim/xl",
        "migrate-receive",
        "--colo",
        "-e",
    ]


def test_transport_is_one_argument_however_many_words_it_has() -> None:
    argv = sender_argv(spec("remus"), "a b 'c d'")
    assert argv[-4:] == ["-s", "", "db1", "a b 'c d'"]


def test_sender_never_asks_xl_to_daemonize_or_not() -> None:
    # -e only shapes xl's ssh rune, which `-s ""` disables.
    for _, the_spec, _, _ in CASES:
        assert "-e" not in sender_argv(the_spec, PIPE)


def test_colo_never_gets_remus_only_flags() -> None:
    for _, the_spec, _, _ in CASES:
        argv = sender_argv(the_spec, PIPE)
        if "-c" in argv:
            assert {"-i", "-u", "-b", "-n", "-d"}.isdisjoint(argv)


def test_an_undefaulted_remus_spec_still_gets_xls_default_interval() -> None:
    undefaulted = spec("remus").model_copy(update={"checkpoint": CheckpointSpec.model_construct()})
    assert undefaulted.checkpoint.interval_ms is None
    assert sender_argv(undefaulted, PIPE) == ["xl", "remus", "-i", "200", *TAIL]
