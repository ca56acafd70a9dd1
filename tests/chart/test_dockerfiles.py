"""The images run what the tests run.

No container engine here, so the Dockerfiles are read rather than built: what they copy must
exist (and get past .dockerignore), what they start must be a `xenha` command, and the chart
must start the same thing as the same user.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from xenha.cli import COMMANDS

from .helm import REPO, one, render

IMAGES = {"operator": "operator/Dockerfile", "agent": "agent/Dockerfile"}
WORKLOADS = {"operator": "Deployment", "agent": "DaemonSet"}


@dataclass(frozen=True)
class Instruction:
    keyword: str
    flags: dict[str, str]
    args: str


def parse(path: Path) -> list[Instruction]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text(encoding="utf-8").splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    assert not pending, f"{path}: dangling line continuation"
    instructions = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        flags: dict[str, str] = {}
        words = rest.split()
        while words and words[0].startswith("--"):
            name, _, value = words.pop(0)[2:].partition("=")
            flags[name] = value
        instructions.append(Instruction(keyword.upper(), flags, " ".join(words)))
    return instructions


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list), f"{instruction.keyword} must use the exec (JSON) form"
    return [str(v) for v in value]


def last(instructions: list[Instruction], keyword: str) -> Instruction:
    return [i for i in instructions if i.keyword == keyword][-1]


def dockerignore_allows(relative: str) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern also matches a path's parents."""
    allowed = True
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if pattern == "**" or any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            allowed = negated
    return allowed


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    return render()


@pytest.mark.parametrize("image", list(IMAGES))
def test_everything_copied_from_the_context_exists_and_is_not_ignored(image: str) -> None:
    for instruction in parse(REPO / IMAGES[image]):
        if instruction.keyword != "COPY" or "from" in instruction.flags:
            continue
        *sources, _destination = instruction.args.split()
        for source in sources:
            assert (REPO / source).exists(), f"{IMAGES[image]} copies missing {source}"
            assert dockerignore_allows(source), f".dockerignore hides {source}"


@pytest.mark.parametrize("image", list(IMAGES))
def test_the_image_starts_a_xenha_command(image: str) -> None:
    instructions = parse(REPO / IMAGES[image])
    entrypoint = exec_form(last(instructions, "ENTRYPOINT"))
    cmd = exec_form(last(instructions, "CMD"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint == ["xenha"]
    assert "xenha" in scripts
    assert tuple(cmd) in COMMANDS
    assert cmd == [image]


@pytest.mark.parametrize("image", list(IMAGES))
def test_the_chart_starts_what_the_image_starts_as_the_same_user(
    image: str, rendered: list[dict[str, Any]]
) -> None:
    instructions = parse(REPO / IMAGES[image])
    workload = one(rendered, WORKLOADS[image], f"xenha-{image}")
    pod = workload["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] + c["args"][:1] == exec_form(last(instructions, "ENTRYPOINT")) + (
        exec_form(last(instructions, "CMD"))
    )
    user = int(last(instructions, "USER").args.split(":")[0])
    run_as = c["securityContext"].get("runAsUser", pod.get("securityContext", {}).get("runAsUser"))
    assert run_as == user


@pytest.mark.parametrize("image", list(IMAGES))
def test_both_stages_use_the_pinned_python_base(image: str) -> None:
    text = (REPO / IMAGES[image]).read_text()
    instructions = parse(REPO / IMAGES[image])
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in text
    # Where a release pins the digest.
    assert "python:3.11-slim-bookworm@sha256:" in text
    stages = [i.args.split()[0] for i in instructions if i.keyword == "FROM"]
    assert stages == ["${PYTHON_IMAGE}", "${PYTHON_IMAGE}"]


def test_operator_image_is_non_root_and_agent_image_root() -> None:
    assert last(parse(REPO / IMAGES["operator"]), "USER").args == "65532:65532"
    assert last(parse(REPO / IMAGES["agent"]), "USER").args == "0:0"


def imports_of(package: Path) -> set[str]:
    found: set[str] = set()
    for source in package.rglob("*.py"):
        for node in ast.walk(ast.parse(source.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module)
    return found


@pytest.mark.parametrize(
    ("package", "absent"),
    [("operator/xenha_operator", "xenha_agent"), ("agent/xenha_agent", "xenha_operator")],
)
def test_each_image_can_drop_the_other_components_package(package: str, absent: str) -> None:
    # The images delete the other component's package; an import across would fail there.
    offending = {m for m in imports_of(REPO / package) if m.split(".")[0] == absent}
    assert not offending, f"{package} imports {sorted(offending)}"


def test_dockerignore_keeps_the_context_small() -> None:
    for path in (".venv/bin/python", ".git/HEAD", "tests/conftest.py", "tools/controlplane"):
        assert not dockerignore_allows(path), path
    assert dockerignore_allows("xenha/cli.py")
    assert dockerignore_allows("agent/xenha_agent/__init__.py")
    assert not dockerignore_allows("xenha/__pycache__")
