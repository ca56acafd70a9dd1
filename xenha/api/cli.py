"""`xenha validate FILE...`: check XenReplication manifests as the API server would, offline.

For each XenReplication document it prints either the errors (field and rule, the same text
the API server gives) or the `xl` command lines the agents would run for it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from xenha.api.corpus import pydantic_errors
from xenha.api.models import parse_spec
from xenha.api.xlargs import xl_commands

TRANSPORT_PLACEHOLDER = "<transport>"


def _documents(source: str) -> Iterator[tuple[str, Any]]:
    import yaml  # only this tool needs it

    text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    for document in yaml.safe_load_all(text):
        if document is not None:
            yield source, document


def report(source: str, document: Any, out: TextIO, transport: str) -> bool:
    """Print the verdict on one YAML document; True when it is valid or not ours."""
    if not isinstance(document, dict) or document.get("kind") != "XenReplication":
        return True
    name = (document.get("metadata") or {}).get("name", "<unnamed>")
    spec = document.get("spec")
    if not isinstance(spec, dict):
        print(f"{source}: XenReplication {name}: invalid\n  spec: Required value", file=out)
        return False
    errors = pydantic_errors(spec)
    if errors:
        print(f"{source}: XenReplication {name}: invalid", file=out)
        for error in errors:
            print(f"  {error.field}: {error.message}", file=out)
        return False
    parsed = parse_spec(spec)
    commands = xl_commands(parsed, transport)
    print(f"{source}: XenReplication {name}: valid", file=out)
    print(f"  {parsed.primary_node}: {shlex.join(commands.sender)}", file=out)
    receiver = "(none: blackhole)" if commands.receiver is None else shlex.join(commands.receiver)
    print(f"  {parsed.secondary_node}: {receiver}", file=out)
    return True


def validate_main(argv: Sequence[str]) -> int:
    """Exit 0 when every XenReplication in the files is valid, 1 otherwise."""
    parser = argparse.ArgumentParser(
        prog="xenha validate",
        description="Validate XenReplication manifests offline and show their xl command lines.",
    )
    parser.add_argument("files", nargs="+", help="YAML files ('-' for standard input)")
    parser.add_argument(
        "--transport",
        default=TRANSPORT_PLACEHOLDER,
        help="transport command to show in the xl remus line",
    )
    args = parser.parse_args(argv)
    ok = True
    for source in args.files:
        for name, document in _documents(source):
            ok = report(name, document, sys.stdout, args.transport) and ok
    return 0 if ok else 1
