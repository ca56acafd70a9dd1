"""The ledger's checkers, table-driven on hand-written histories."""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from xenha.sim import ledger
from xenha.sim.ledger import Ledger, LedgerViolation

U = "5f1c0d6e-0000-4000-8000-000000000001"
_t = 0


def ev(kind: str, host: str = "xen-a", **fields: Any) -> dict[str, Any]:
    global _t
    _t += 1
    base = {"t": _t, "kind": kind, "host": host}
    if kind in ("copy", "reply", "restore"):
        base.update(uuid=U, name="db1", domid=fields.pop("domid", 1))
    return {**base, **fields}


def active(host: str, domid: int = 1) -> dict[str, Any]:
    return ev("copy", host, domid=domid, state="active")


def passive(host: str, domid: int = 1) -> dict[str, Any]:
    return ev("copy", host, domid=domid, state="passive")


def reply(host: str, value: int, domid: int = 1) -> dict[str, Any]:
    return ev("reply", host, domid=domid, value=value, epoch=None, mode="remus")


class TestNeverTwoActive:
    def test_failover_after_the_primary_died_is_clean(self) -> None:
        ledger.assert_never_two_active(
            [active("xen-a"), ev("host_killed", "xen-a"), active("xen-b", domid=7)]
        )

    def test_failover_while_the_primary_still_runs_is_split_brain(self) -> None:
        with pytest.raises(LedgerViolation, match="two active copies"):
            ledger.assert_never_two_active([active("xen-a"), active("xen-b", domid=7)])

    def test_fencing_before_the_standby_activates_is_clean(self) -> None:
        ledger.assert_never_two_active(
            [active("xen-a"), passive("xen-a"), active("xen-b", domid=7)]
        )

    def test_a_hung_primary_that_is_fenced_before_it_speaks_is_clean(self) -> None:
        ledger.assert_never_two_active(
            [
                active("xen-a"),
                ev("host_stopped", "xen-a"),
                active("xen-b", domid=7),
                ev("host_continued", "xen-a"),
                passive("xen-a"),
            ]
        )

    def test_a_hung_primary_that_wakes_up_and_replies_is_split_brain(self) -> None:
        with pytest.raises(LedgerViolation):
            ledger.assert_never_two_active(
                [
                    active("xen-a"),
                    ev("host_stopped", "xen-a"),
                    active("xen-b", domid=7),
                    ev("host_continued", "xen-a"),
                    reply("xen-a", 10),
                ]
            )

    def test_other_domains_do_not_interfere(self) -> None:
        other = {**active("xen-b", domid=3), "uuid": "another"}
        ledger.assert_never_two_active([active("xen-a"), other])


class TestClientView:
    def test_counter_going_up_across_a_failover_is_clean(self) -> None:
        ledger.assert_client_view_clean(
            [
                reply("xen-a", 1),
                reply("xen-a", 2),
                ev("restore", "xen-b", number=4, counter=2),
                reply("xen-b", 3),
            ]
        )

    def test_a_reply_from_lost_state_is_caught_at_the_restore(self) -> None:
        with pytest.raises(LedgerViolation, match="lost"):
            ledger.assert_client_view_clean(
                [reply("xen-a", 1), reply("xen-a", 2), ev("restore", "xen-b", number=4, counter=1)]
            )

    def test_counter_going_backwards_is_caught(self) -> None:
        with pytest.raises(LedgerViolation, match="went from 5 to 5"):
            ledger.assert_client_view_clean([reply("xen-a", 5), reply("xen-b", 5)])

    def test_each_client_must_see_its_own_values_increase(self) -> None:
        a = ev("client_reply", client="c1", value=3, uuid=U)
        b = ev("client_reply", client="c2", value=2, uuid=U)
        ledger.assert_client_view_clean([a, b])
        with pytest.raises(LedgerViolation, match="client c1"):
            ledger.assert_client_view_clean(
                [a, b, ev("client_reply", client="c1", value=1, uuid=U)]
            )


def _writer(path: str, n: int, host: str) -> None:
    book = Ledger(path, host=host)
    for i in range(n):
        book.record("reply", uuid=host, domid=1, value=i, pad="x" * 200)


def test_concurrent_writers_never_tear_lines(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), 500, f"h{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    lines = path.read_text().splitlines()
    assert len(lines) == 2000
    events = ledger.read(path)
    for i in range(4):
        assert [e["value"] for e in events if e["host"] == f"h{i}"] == list(range(500))


def test_the_cli_checker_reports_violations(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from xenha.sim.cli import sim_main

    path = tmp_path / "ledger.jsonl"
    book = Ledger(path, host="xen-a")
    book.record("copy", uuid=U, name="db1", domid=1, state="active")
    book.record("reply", uuid=U, name="db1", domid=1, value=1, epoch=None, mode="direct")
    assert sim_main(["check", str(path)]) == 0
    assert "invariants hold" in capsys.readouterr().out
    Ledger(path, host="xen-b").record("copy", uuid=U, name="db1", domid=4, state="active")
    assert sim_main(["check", str(path)]) == 1
    assert "two active copies" in capsys.readouterr().err
