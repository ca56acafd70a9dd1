"""`xenha sim ...`: run simulated hosts and their tools from the command line.

xenha sim host --state-dir D --name xen-a [--fabric F] ...   the host daemon
xenha sim xl --state-dir D -- <xl args>                       that host's xl
xenha sim pipe connect|serve ...                              a test transport
xenha sim check <ledger.jsonl>                                run the invariant checkers
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from xenha.sim import paths


def sim_main(argv: Sequence[str]) -> int:
    args = list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(__doc__)
        return 0
    command, rest = args[0], args[1:]
    if command == "host":
        from xenha.sim.host import main

        return main(rest)
    if command == "xl":
        from xenha.sim.xl import main as xl_main

        if len(rest) >= 2 and rest[0] == "--state-dir":
            os.environ[paths.STATE_ENV] = rest[1]
            rest = rest[2:]
        if rest and rest[0] == "--":
            rest = rest[1:]
        return xl_main(rest)
    if command == "pipe":
        from xenha.sim.pipe import main as pipe_main

        return pipe_main(rest)
    if command == "check" and len(rest) == 1:
        from xenha.sim import ledger

        try:
            ledger.assert_never_two_active(rest[0])
            ledger.assert_client_view_clean(rest[0])
        except ledger.LedgerViolation as e:
            print(f"VIOLATION: {e}", file=sys.stderr)
            return 1
        events = ledger.read(rest[0])
        print(f"ok: {len(events)} events, {len(ledger.replies(events))} replies, invariants hold")
        return 0
    print(__doc__, file=sys.stderr)
    return 2
