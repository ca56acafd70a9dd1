"""The nodes of a XenStore and the views requests work on: the live tree or a transaction.

A transaction is a private copy of the node table taken when it starts, plus a record of the
generation of every node it touched (read, wrote, or found missing). It may commit only if
none of those changed in the live tree since, which is xenstored's rule since Xen 4.9.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from xenha.sim.xenstore.perms import Perms


@dataclass(frozen=True, slots=True)
class Node:
    value: bytes
    perms: Perms
    children: tuple[str, ...] = ()
    # Stamp of the last change; equal stamps mean an unchanged node (DIRECTORY_PART, commits).
    generation: int = 0


@dataclass(frozen=True, slots=True)
class Change:
    """What one request changed, for the watches."""

    path: str
    # True for the nodes below a removed node: they match only watches set exactly on them.
    exact: bool
    # A guest hears about the change only if one of these lets it read the node.
    perms: tuple[Perms, ...]


@dataclass(slots=True)
class Transaction:
    id: int
    nodes: dict[str, Node]
    # path -> generation when first touched (None: missing then).
    seen: dict[str, int | None] = field(default_factory=dict)
    changed: set[str] = field(default_factory=set)
    changes: list[Change] = field(default_factory=list)

    def conflict(self, live: dict[str, Node]) -> str | None:
        """A path this transaction touched that has changed in `live` since, if any."""
        for path, generation in self.seen.items():
            node = live.get(path)
            if (None if node is None else node.generation) != generation:
                return path
        return None

    def apply(self, live: dict[str, Node], next_generation: Callable[[], int]) -> None:
        for path in self.changed:
            node = self.nodes.get(path)
            if node is None:
                live.pop(path, None)
            else:
                live[path] = replace(node, generation=next_generation())


class View:
    """The tree as one request sees it: the live tree (`tx` None) or a transaction's copy.

    Changes to the live tree go to `fire` at once; a transaction keeps them for its commit.
    """

    def __init__(
        self,
        live: dict[str, Node],
        tx: Transaction | None,
        next_generation: Callable[[], int],
        fire: Callable[[Change], None],
    ) -> None:
        self._nodes = live if tx is None else tx.nodes
        self._tx = tx
        self._next_generation = next_generation
        self._fire = fire

    def get(self, path: str) -> Node | None:
        node = self._nodes.get(path)
        if self._tx is not None and path not in self._tx.seen:
            self._tx.seen[path] = None if node is None else node.generation
        return node

    def put(self, path: str, node: Node) -> Node:
        self.get(path)  # what a transaction overwrites must not have changed either
        stored = replace(node, generation=self._next_generation())
        self._nodes[path] = stored
        if self._tx is not None:
            self._tx.changed.add(path)
        return stored

    def delete(self, path: str) -> None:
        self.get(path)
        del self._nodes[path]
        if self._tx is not None:
            self._tx.changed.add(path)

    def changed(self, change: Change) -> None:
        if self._tx is None:
            self._fire(change)
        else:
            self._tx.changes.append(change)
