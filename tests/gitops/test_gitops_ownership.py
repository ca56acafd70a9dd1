"""GitOps (issue 7.4): what a user keeps in Git stays the user's.

A GitOps tool applies the same files again and again with server-side apply and shows the
difference between Git and the cluster. That works only if the operator and the agents never
write `spec`, labels or annotations of a XenReplication: the operator owns `status` (and, through
kopf, its finalizer), the agents write nothing of it at all.

The "Git repository" here is a directory holding the three shipped examples as a user would keep
them: the files as they are, each with a `namespace:` added. The Stack gets the guests the
examples name (`web1`, `db1`, `counter` on their primary node), so nothing else is adapted. The
files are applied with `kubectl apply --server-side --field-manager=gitops`, as Argo CD or Flux
would, repeatedly, on one module-scoped stack.

Every wait is generous (a small shared machine); none asserts how fast anything happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from xenha.lab import kube
from xenha.lab.stack import EXAMPLES_DIR, Stack

pytestmark = pytest.mark.integration

Obj = dict[str, Any]

#: The field manager of the user's GitOps tool.
MANAGER = "gitops"
#: The operator's finalizer: the one thing it may add to a replication outside `status`.
FINALIZER = "xenha.io/stop-replication"
#: Bounds for waits on a loaded 2-core machine: a wait says *that*, never how fast.
SETTLE = 240.0
#: A minute of ordinary operation (the operator reconciles every couple of seconds).
QUIET_MINUTE = 60.0
#: How long the guests are watched after their replications were deleted.
AFTER_DELETE = 30.0

# What a user adds to the files in Git (test 4).
USER_LABELS = {"team": "db"}
USER_ANNOTATIONS = {"example.com/owner": "dba-team"}


# --- the Git repository ---------------------------------------------------------------------


@dataclass
class GitRepo:
    """A directory of manifests as a user keeps them in Git, and the stack it is applied to."""

    stack: Stack
    path: Path

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.yaml"))

    def manifests(self) -> dict[str, Obj]:
        """name -> manifest, as the files say now."""
        found: dict[str, Obj] = {}
        for file in self.files():
            manifest = yaml.safe_load(file.read_text())
            found[manifest["metadata"]["name"]] = manifest
        return found

    @property
    def names(self) -> list[str]:
        return sorted(self.manifests())

    def commit(self, lines: str) -> None:
        """Add YAML lines under `metadata:` of every file (what a user's commit does)."""
        for file in self.files():
            file.write_text(under_metadata(file.read_text(), lines))


def under_metadata(text: str, lines: str) -> str:
    """The manifest's text (comments and all) with `lines` added under `metadata:`."""
    edited = re.sub(r"^metadata:\n", "metadata:\n" + lines, text, count=1, flags=re.MULTILINE)
    assert edited != text, f"no metadata: in\n{text}"
    return edited


@pytest.fixture(scope="module")
def repo(module_stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> GitRepo:
    stack = module_stack
    path = tmp_path_factory.mktemp("gitops-repo")
    examples = sorted(EXAMPLES_DIR.glob("xenreplication-*.yaml"))
    assert examples, f"no examples in {EXAMPLES_DIR}"
    for example in examples:
        text = example.read_text()
        spec = yaml.safe_load(text)["spec"]
        for node in (spec["primaryNode"], spec["secondaryNode"]):
            assert node in stack.hosts, f"{example.name} names node {node}, not a Stack host"
        # The guest the example protects, where the example says it runs.
        if spec["domain"] not in stack.guests:
            stack.create_guest(spec["primaryNode"], spec["domain"])
        in_namespace = under_metadata(text, f"  namespace: {stack.namespace}\n")
        assert yaml.safe_load(in_namespace)["metadata"]["namespace"] == stack.namespace
        (path / example.name).write_text(in_namespace)
    return GitRepo(stack=stack, path=path)


# --- what the user runs, what the user sees -------------------------------------------------


def kubectl(stack: Stack, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    assert stack.plane is not None
    return stack.plane.kubectl(*args, check=check, timeout=360)


def apply(repo: GitRepo) -> subprocess.CompletedProcess[str]:
    return kubectl(
        repo.stack,
        "apply",
        "--server-side",
        f"--field-manager={MANAGER}",
        f"--filename={repo.path}",
    )


def diff(repo: GitRepo) -> subprocess.CompletedProcess[str]:
    """`kubectl diff --server-side`: exit 0 = no difference, 1 = differences, >1 = error."""
    return kubectl(
        repo.stack,
        "diff",
        "--server-side",
        f"--field-manager={MANAGER}",
        f"--filename={repo.path}",
        check=False,
    )


def applied_lines(repo: GitRepo) -> list[str]:
    return sorted(f"xenreplication.xenha.io/{name} serverside-applied" for name in repo.names)


def live(repo: GitRepo) -> dict[str, Obj]:
    found = {name: repo.stack.replication(name) for name in repo.names}
    missing = [name for name, obj in found.items() if obj is None]
    assert not missing, f"replications missing: {missing}"
    return {name: obj for name, obj in found.items() if obj is not None}


def wait_protected(repo: GitRepo) -> dict[str, Obj]:
    return {
        name: repo.stack.wait_for(name, phase="Protected", timeout=SETTLE) for name in repo.names
    }


@pytest.fixture
def deployed(repo: GitRepo) -> dict[str, Obj]:
    """The repository applied and every replication in it Protected."""
    stuck = stuck_paused(repo)
    if stuck:
        # Nothing here pauses a guest: an earlier test's replication left it so. Say so at
        # once rather than wait for a protection that cannot start.
        pytest.fail(f"guests left paused on their primary: {stuck}", pytrace=False)
    apply(repo)
    return wait_protected(repo)


# --- managedFields --------------------------------------------------------------------------


def field_paths(fields: Mapping[str, Any], prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """Every path of a FieldsV1 set (`.` marks the parent itself)."""
    paths: set[tuple[str, ...]] = set()
    for key, value in fields.items():
        path = (*prefix, key)
        if isinstance(value, Mapping) and value:
            paths |= field_paths(value, path)
        else:
            paths.add(path)
    return paths


def manifest_paths(value: Any, prefix: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The FieldsV1 paths of the fields a manifest sets (lists as one field)."""
    if isinstance(value, Mapping) and value:
        return set().union(*(manifest_paths(v, (*prefix, f"f:{k}")) for k, v in value.items()))
    return {prefix}


def managed(obj: Obj) -> list[tuple[Obj, set[tuple[str, ...]]]]:
    return [
        (entry, field_paths(entry.get("fieldsV1") or {}))
        for entry in obj["metadata"].get("managedFields") or []
    ]


def foreign_fields(obj: Obj) -> list[str]:
    """Fields of anyone but the user outside `status` and the operator's finalizer."""
    found = []
    for entry, paths in managed(obj):
        if entry["manager"] == MANAGER:
            continue
        for path in sorted(paths):
            if path[0] == "f:status":
                continue
            if path[:2] == ("f:metadata", "f:finalizers") and path[2:] in (
                (".",),
                (f'v:"{FINALIZER}"',),
            ):
                continue
            found.append(f"{entry['manager']} ({entry['operation']}): {'.'.join(path)}")
    return found


def users_fields(obj: Obj) -> set[tuple[str, ...]]:
    return {path for entry, paths in managed(obj) if entry["manager"] == MANAGER for path in paths}


def user_entry(obj: Obj) -> Obj:
    (entry,) = (
        e
        for e in obj["metadata"].get("managedFields") or []
        if e["manager"] == MANAGER and e["operation"] == "Apply"
    )
    return dict(entry)


def check_ownership(repo: GitRepo, objs: Mapping[str, Obj]) -> dict[str, list[str]]:
    """The user owns every field the files set; others own only status and the finalizer.
    Returns name -> "manager operation subresource" per managedFields entry, for the record."""
    manifests = repo.manifests()
    seen: dict[str, list[str]] = {}
    for name, obj in objs.items():
        assert foreign_fields(obj) == [], f"{name}: someone else owns user fields\n" + json.dumps(
            obj["metadata"]["managedFields"], indent=1
        )
        manifest = manifests[name]
        wanted = manifest_paths(manifest["spec"], ("f:spec",))
        for key in ("labels", "annotations"):
            if manifest["metadata"].get(key):
                wanted |= manifest_paths(manifest["metadata"][key], ("f:metadata", f"f:{key}"))
        mine = users_fields(obj)
        assert {p for p in wanted if p not in mine} == set(), f"{name}: Git's fields not owned"
        # The operator holds its finalizer and writes status, through the status subresource.
        finalizer_owners = [
            e["manager"]
            for e, paths in managed(obj)
            if any(p[:2] == ("f:metadata", "f:finalizers") for p in paths)
        ]
        assert finalizer_owners, f"{name}: nobody owns the finalizer"
        assert MANAGER not in finalizer_owners
        status_writers = [e for e, paths in managed(obj) if any(p[0] == "f:status" for p in paths)]
        assert status_writers, f"{name}: nobody owns status"
        assert all(e.get("subresource") == "status" for e in status_writers), status_writers
        seen[name] = [
            f"{e['manager']} {e['operation']} {e.get('subresource', '-')}"
            for e in obj["metadata"]["managedFields"]
        ]
    return seen


# --- owned objects and guests ---------------------------------------------------------------


def owned_names(name: str) -> list[str]:
    return [
        f"secret/{name}-tls",
        f"secret/{name}-tls-ca",
        f"lease/{name}-fence",
        f"role/{name}-agent-tls",
        f"rolebinding/{name}-agent-tls",
    ]


def owned_objects(repo: GitRepo) -> dict[str, str | None]:
    """`kind/name` -> the uid its controller ownerReference names, for each object that exists
    of those the operator creates for the repository's replications."""
    wanted = [obj for name in repo.names for obj in owned_names(name)]
    result = kubectl(
        repo.stack,
        "get",
        f"--namespace={repo.stack.namespace}",
        "--ignore-not-found",
        "--output=json",
        *wanted,
    )
    document = json.loads(result.stdout) if result.stdout.strip() else {}
    items = document.get("items", [document] if document.get("kind") else [])
    found: dict[str, str | None] = {}
    for item in items:
        refs = item["metadata"].get("ownerReferences") or []
        controller = next((r["uid"] for r in refs if r.get("controller")), None)
        found[f"{item['kind'].lower()}/{item['metadata']['name']}"] = controller
    return found


def expected_owned(objs: Mapping[str, Obj]) -> dict[str, str | None]:
    return {
        obj: str(xr["metadata"]["uid"]) for name, xr in objs.items() for obj in owned_names(name)
    }


def copies(repo: GitRepo, domain: str, node: str) -> list[Obj]:
    """The domains on a node that are a copy of the guest (same uuid, any name)."""
    sim = repo.stack.hosts[node].sim
    assert sim is not None
    uuid = repo.stack.guests[domain].uuid
    return [d for d in sim.domains() if d.get("uuid") == uuid]


def wait_no_copy(repo: GitRepo, domain: str, node: str) -> None:
    kube.wait_until(
        lambda: copies(repo, domain, node) == [],
        timeout=SETTLE,
        interval=1.0,
        what=f"the copy of {domain} on {node} to go",
        describe=lambda: json.dumps(copies(repo, domain, node), indent=1),
    )


def paused(repo: GitRepo) -> dict[str, Obj]:
    """The repository's guests whose copy on the primary node is paused now."""
    found = {}
    for manifest in repo.manifests().values():
        spec = manifest["spec"]
        for copy in copies(repo, spec["domain"], spec["primaryNode"]):
            if copy.get("paused"):
                found[f"{spec['domain']} on {spec['primaryNode']}"] = copy
    return found


def stuck_paused(repo: GitRepo) -> dict[str, Obj]:
    """Guests paused in three looks a second apart (Remus pauses for each checkpoint, briefly)."""
    seen = paused(repo)
    for _ in range(2):
        if not seen:
            break
        time.sleep(1)
        still = paused(repo)
        seen = {key: copy for key, copy in still.items() if key in seen}
    return seen


def answers(stack: Stack, domain: str) -> int:
    """The guest's counter service answers (the guest runs)."""
    with stack.client(domain, timeout=5.0) as client:
        return kube.wait_until(client.next, timeout=SETTLE, interval=1.0, what=f"{domain} answers")


def delete(repo: GitRepo) -> subprocess.CompletedProcess[str]:
    """`kubectl delete -f`: returns once the objects are gone (finalizer released)."""
    return kubectl(repo.stack, "delete", "--wait=true", "--timeout=300s", f"--filename={repo.path}")


@contextlib.contextmanager
def garbage_collector_held(stack: Stack) -> Iterator[None]:
    """The garbage collector falls behind: kube-controller-manager (of this stack's control
    plane) is stopped with SIGSTOP until the block ends, then continued."""
    assert stack.plane is not None
    pid = stack.plane.pids["kube-controller-manager"]
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def describe_owned(repo: GitRepo, objs: Mapping[str, Obj]) -> str:
    return (
        f"owned now: {json.dumps(owned_objects(repo), indent=1)}\n"
        f"wanted: {json.dumps(expected_owned(objs), indent=1)}"
    )


# --- the tests ------------------------------------------------------------------------------


def test_applying_the_examples_again_server_side_changes_nothing(
    repo: GitRepo, deployed: dict[str, Obj]
) -> None:
    """1. The second `kubectl apply --server-side` is a no-op; managedFields show the user
    owning every field of the files and the operator only status and its finalizer."""
    before = live(repo)

    second = apply(repo)

    assert sorted(second.stdout.split("\n")[:-1]) == applied_lines(repo), second.stdout
    after = live(repo)
    for name in repo.names:
        was, now = before[name], after[name]
        assert now["metadata"]["uid"] == was["metadata"]["uid"]
        assert now["metadata"]["generation"] == was["metadata"]["generation"] == 1, name
        assert now["spec"] == was["spec"], name
        for key in ("labels", "annotations"):
            assert now["metadata"].get(key) == was["metadata"].get(key), (name, key)
        assert now["metadata"]["finalizers"] == [FINALIZER], name
        # The API server recorded no write by the user: a changed apply would restamp it.
        assert user_entry(now) == user_entry(was), name
        assert now["status"].get("observedGeneration") == 1, name
    managers = check_ownership(repo, after)
    print(f"\nmanagedFields after the second apply: {json.dumps(managers, indent=1)}")


def test_kubectl_diff_against_the_examples_is_empty_once_protected(
    repo: GitRepo, deployed: dict[str, Obj]
) -> None:
    """2. What the cluster holds is what Git says: `kubectl diff --server-side` exits 0."""
    result = diff(repo)

    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_labels_and_annotations_from_git_survive_a_quiet_minute_of_operation(
    repo: GitRepo, deployed: dict[str, Obj]
) -> None:
    """4. A label and an annotation added in Git stay exactly as Git says through a minute of
    reconciliation without failover, and stay the user's."""
    leases = {name: repo.stack.fence_lease(name) or {} for name in repo.names}
    transitions = {
        name: (lease.get("spec") or {}).get("leaseTransitions") for name, lease in leases.items()
    }
    active = {name: obj["status"]["activeNode"] for name, obj in deployed.items()}
    labels = "".join(f"    {k}: {v}\n" for k, v in USER_LABELS.items())
    annotations = "".join(f"    {k}: {v}\n" for k, v in USER_ANNOTATIONS.items())
    repo.commit(f"  labels:\n{labels}  annotations:\n{annotations}")

    applied = apply(repo)

    assert sorted(applied.stdout.split("\n")[:-1]) == applied_lines(repo), applied.stdout
    # Sample for a minute; every deviation is kept, so a failure shows all of them.
    deviations: list[str] = []
    samples = 0
    end = time.monotonic() + QUIET_MINUTE
    while True:
        samples += 1
        for name, obj in live(repo).items():
            meta, status = obj["metadata"], obj.get("status") or {}
            seen = {
                "labels": meta.get("labels"),
                "annotations": meta.get("annotations"),
                "generation": meta["generation"],
                "activeNode": status.get("activeNode"),
            }
            wanted = {
                "labels": USER_LABELS,
                "annotations": USER_ANNOTATIONS,
                "generation": 1,
                "activeNode": active[name],
            }
            if seen != wanted:
                deviations.append(f"sample {samples} {name}: {seen} (wanted {wanted})")
        if time.monotonic() > end:
            break
        time.sleep(5)
    assert deviations == [], "\n".join(deviations)

    final = wait_protected(repo)
    for name, obj in final.items():
        lease = repo.stack.fence_lease(name) or {}
        assert (lease.get("spec") or {}).get("leaseTransitions") == transitions[name], name
        assert obj["status"]["activeNode"] == active[name], name
        assert not obj["status"].get("lastFailover"), name
    check_ownership(repo, final)
    result = diff(repo)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_deleting_and_reapplying_runs_the_finalizer_and_recreates_the_owned_objects(
    repo: GitRepo, deployed: dict[str, Obj]
) -> None:
    """3. `kubectl delete -f` waits for the finalizer: the standby copies go, the guests keep
    running; once the garbage collector took the owned objects, re-applying the same files
    protects the guests again with owned objects of the new replications."""
    stack = repo.stack
    manifests = repo.manifests()
    assert owned_objects(repo) == expected_owned(deployed)
    for name, obj in deployed.items():
        assert obj["metadata"]["finalizers"] == [FINALIZER], name
        spec = manifests[name]["spec"]
        assert copies(repo, spec["domain"], spec["secondaryNode"]), f"{name}: no standby copy"

    deleted = delete(repo)

    gone = time.monotonic()
    for name in repo.names:
        assert f'"{name}" deleted' in deleted.stdout, deleted.stdout
        assert stack.replication(name) is None, name
    for name in repo.names:
        spec = manifests[name]["spec"]
        domain, primary, secondary = spec["domain"], spec["primaryNode"], spec["secondaryNode"]
        # The finalizer's work: the standby copy is destroyed; the guest keeps serving.
        wait_no_copy(repo, domain, secondary)
        assert len(copies(repo, domain, primary)) == 1, domain
        answers(stack, domain)
    kube.wait_until(
        lambda: owned_objects(repo) == {},
        timeout=SETTLE,
        interval=2.0,
        what="the garbage collector to delete the owned objects",
        describe=lambda: json.dumps(owned_objects(repo), indent=1),
    )
    # Still running, unprotected, for a while after the replications went: with no
    # replication left nothing may pause a guest (no checkpoints either: any look counts).
    seen_paused: dict[str, Obj] = {}
    while True:
        seen_paused |= paused(repo)
        if time.monotonic() > gone + AFTER_DELETE:
            break
        time.sleep(2)
    assert seen_paused == {}, "a guest was paused after its replication was deleted"
    for name in repo.names:
        answers(stack, manifests[name]["spec"]["domain"])

    again = apply(repo)

    assert sorted(again.stdout.split("\n")[:-1]) == applied_lines(repo), again.stdout
    protected = wait_protected(repo)
    for name, obj in protected.items():
        assert obj["metadata"]["uid"] != deployed[name]["metadata"]["uid"], name
        assert obj["metadata"]["finalizers"] == [FINALIZER], name
        spec = manifests[name]["spec"]
        assert copies(repo, spec["domain"], spec["secondaryNode"]), f"{name}: no standby copy"
    kube.wait_until(
        lambda: owned_objects(repo) == expected_owned(protected),
        timeout=SETTLE,
        interval=2.0,
        what="owned objects of the new replications",
        describe=lambda: describe_owned(repo, protected),
    )
    check_ownership(repo, protected)
    result = diff(repo)
    assert (result.returncode, result.stdout) == (0, ""), result.stdout + result.stderr


def test_reapplying_right_after_a_delete_gets_owned_objects_of_its_own(
    repo: GitRepo, deployed: dict[str, Obj]
) -> None:
    """3b. `kubectl delete -f . && kubectl apply -f .` (or a GitOps tool replacing the objects)
    while the garbage collector is behind: the new replications exist before the old ones'
    Secrets, Lease and Role are collected. Once they are, the new replications must own a full
    set of their own, and a restarted agent must still get its TLS material.

    The collector is held back (its process stopped) for the delete and re-apply, so the test
    does not depend on how fast it happens to be (on a fresh cluster it lags by tens of
    seconds; on a busy one it may lag at any time)."""
    stack = repo.stack
    old_uids = {str(obj["metadata"]["uid"]) for obj in deployed.values()}

    with garbage_collector_held(stack):
        delete(repo)
        apply(repo)
        protected = wait_protected(repo)

    assert {str(o["metadata"]["uid"]) for o in protected.values()}.isdisjoint(old_uids)
    # The garbage collector deletes whatever still names a deleted replication as owner.
    kube.wait_until(
        lambda: not old_uids.intersection(filter(None, owned_objects(repo).values())),
        timeout=SETTLE,
        interval=2.0,
        what="the garbage collector to delete the old replications' objects",
        describe=lambda: describe_owned(repo, protected),
    )
    kube.wait_until(
        lambda: owned_objects(repo) == expected_owned(protected),
        timeout=SETTLE,
        interval=2.0,
        what="a full set of owned objects of the new replications",
        describe=lambda: describe_owned(repo, protected),
    )
    # What the missing objects would break: an agent that starts now reads its TLS Secret.
    stack.restart_agent("xen-b")
    wait_protected(repo)


@pytest.fixture(autouse=True)
def _stack_alive(module_stack: Stack) -> Iterator[None]:
    """The shared stack's operator and agents still run after each test (none of these tests
    takes one down for good)."""
    yield
    assert module_stack.operator is not None
    assert module_stack.operator.alive(), module_stack.log_tail("operator")
    for name, host in module_stack.hosts.items():
        assert host.agent is not None
        assert host.agent.alive(), module_stack.log_tail(f"agent-{name}")
