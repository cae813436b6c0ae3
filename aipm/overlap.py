"""Whether tasks' target files overlap as their kernel locks do: the planner's per-round question, answered
with a few set lookups per target (LockIndex) before the pairwise check that names the paths (conflict). Pure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from aipm.model import Task
from aipm.paths import Target, first_overlap, lock_overlap, lock_prefix


class LockIndex:
    """The lock nodes of some targets and every directory above them: whether a task's locks could meet any of
    them is a few set lookups per target, instead of a comparison with every target of every holder."""

    def __init__(self, groups: Iterable[tuple[Target, ...]]):
        self.nodes: set[str] = set()
        self.above: set[str] = set()
        for targets in groups:
            self.add(targets)

    def add(self, targets: tuple[Target, ...]) -> None:
        for target in targets:
            node = lock_prefix(target)
            self.nodes.add(node)
            if node:
                self.above.add("")
                self.above.update(_parents(node))

    def near(self, targets: tuple[Target, ...]) -> bool:
        """Whether a lock of `targets` is at, above or below a node (`lock_overlap` with some target here)."""
        nodes, above = self.nodes, self.above
        for target in targets:
            node = lock_prefix(target)
            if node in nodes or node in above or "" in nodes:
                return True
            if any(parent in nodes for parent in _parents(node)):
                return True
        return False


def any_clear(tasks: Iterable[Task], held: Iterable[tuple[Target, ...]]) -> bool:
    """Whether some task's locks could meet none of the `held` targets (conservative: False means every task
    would wait for those files, so planning them now is wasted)."""
    index = LockIndex(held)
    return any(not index.near(task.targets) for task in tasks)


def _parents(node: str) -> Iterator[str]:
    """The directories above a non-empty node, the project root ("") excepted: `a/b/c` → `a`, `a/b`."""
    i = node.find("/")
    while i != -1:
        yield node[:i]
        i = node.find("/", i + 1)


def conflict(task: Task, holders: list[tuple[str, tuple[Target, ...]]]) -> tuple[str, str] | None:
    """The first holder whose targets overlap the task's, or whose kernel locks would (a glob locks its whole
    fixed directory), as (holder, the paths in words)."""
    if not task.targets:
        return None
    for owner, targets in holders:
        pair = first_overlap(task.targets, targets, lock_overlap)  # the cheaper, wider test first
        if pair:
            exact = first_overlap(task.targets, targets)
            if exact:
                mine, theirs = exact
                return owner, str(theirs) if str(mine) == str(theirs) else f"{mine} ↔ {theirs}"
            mine, theirs = pair
            if mine.is_glob or theirs.is_glob:
                glob = mine if mine.is_glob else theirs
                return owner, f"{mine} ↔ {theirs} (a glob locks all of {lock_prefix(glob) or '.'}/)"
            # `docs` (no slash) and `docs/a.txt`: a path's lock covers what is below it, as if it were a directory
            outer = mine if str(theirs).startswith(f"{mine}/") else theirs
            return owner, f"{mine} ↔ {theirs} (the lock of {outer} covers everything below it)"
    return None
