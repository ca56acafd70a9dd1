"""pytest plugin: the whole system on one machine (``xenha.lab.stack.Stack``) for end-to-end
tests — the same orchestration ``xenha lab`` runs.

Load it next to the control plane plugin::

    pytest_plugins = ["xenha.testing.fixtures", "xenha.testing.stack_fixtures"]

Fixtures:

- ``stack``: a started Stack whose agents are ready — its own control plane, hosts ``xen-a``
  and ``xen-b`` with guests ``demo1`` and ``demo2``, the operator and two agents under the
  chart's RBAC — for one test. About ten seconds to start; a test may break it as it likes.
- ``stack_factory``: ``(options=None, *, ready=True) -> Stack`` for other options
  (``StackOptions``: hosts, guests, agent environment, ...); every stack it made is stopped
  after the test.
- ``module_stack``: one ``stack`` shared by the tests of a module, for tests that only look
  (or undo what they did): a stack costs ~15 s to start and stop on a busy machine.

Each stack is stopped after its test, and the test errors if anything the stack started is
still running. When a test fails, the stack's replications, Events and log tails are printed
(pytest shows them with the failure).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator, Iterator

import pytest

from xenha.lab.stack import Stack, StackOptions, leftovers

_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.failed:
        item.stash[_FAILED] = True
    return report


def _report(stack: Stack) -> None:
    print(f"\n=== stack in {stack.workdir} (logs in {stack.procs.logs})")
    with contextlib.suppress(Exception):
        from xenha.lab import kube

        for obj in kube.list_replications(stack.api):
            meta = obj["metadata"]
            print(stack.describe(meta["name"], meta["namespace"]))


def _stop_all(stacks: list[Stack], failed: bool) -> None:
    for stack in stacks:
        if failed:
            _report(stack)
        stack.stop()
    left = [p for stack in stacks for p in leftovers(stack.workdir)]
    if left:
        pytest.fail(f"the stack left processes running: {left}", pytrace=False)


StackFactory = Callable[..., Stack]


@contextlib.contextmanager
def _factory(
    config: pytest.Config, tmp: pytest.TempPathFactory, failed: Callable[[], bool]
) -> Iterator[StackFactory]:
    # Imported here, not at the top: this plugin may be loaded before that one, and pytest
    # rewrites the asserts of a plugin module only if it imports it first.
    from xenha.testing.fixtures import control_plane_binaries as _binaries

    made: list[Stack] = []

    def make(options: StackOptions | None = None, *, ready: bool = True) -> Stack:
        options = options or StackOptions()
        if options.binaries is None:
            options.binaries = _binaries(config)
        stack = Stack(tmp.mktemp("stack"), options)
        made.append(stack)
        stack.start()
        if ready:
            stack.wait_ready()
        return stack

    try:
        yield make
    finally:
        _stop_all(made, failed())


@pytest.fixture
def stack_factory(
    pytestconfig: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[StackFactory]:
    with _factory(
        pytestconfig, tmp_path_factory, lambda: request.node.stash.get(_FAILED, False)
    ) as make:
        yield make


@pytest.fixture
def stack(stack_factory: StackFactory) -> Stack:
    return stack_factory()


@pytest.fixture(scope="module")
def module_stack(
    pytestconfig: pytest.Config,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Stack]:
    failures = request.session.testsfailed
    with _factory(
        pytestconfig, tmp_path_factory, lambda: request.session.testsfailed > failures
    ) as make:
        yield make()
