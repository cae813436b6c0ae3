"""Whether tasks' target files overlap as their kernel locks do: the planner's per-round question, answered
with a few set lookups per target (LockIndex) before the pairwise check that names the paths (conflict). Pure."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from aipm.model import Task
from aipm.paths import Target, first_overlap, lock_overlap, lock_prefix, overlaps


class LockIndex:
    """The lock nodes of some targets and every directory above them: whether a task's locks could meet any of
    them is a few set lookups per target, instead of a comparison with every target of every holder. Globs are
    compared with what they could match (lock_overlap): a few per project, each with the others."""

    def __init__(self, groups: Iterable[tuple[Target, ...]]):
        self.nodes: set[str] = set()
        self.above: set[str] = set()
        self.globs: list[Target] = []
        self.glob_above: set[str] = set()  # the globs' directories and every one above them
        for targets in groups:
            self.add(targets)

    def add(self, targets: tuple[Target, ...]) -> None:
        for target in targets:
            if target.is_glob:
                self.globs.append(target)
                base = lock_prefix(target)
                self.glob_above.update(("", base, *_parents(base)))
                continue
            node = target.path
            self.nodes.add(node)
            if node:
                self.above.add("")
                self.above.update(_parents(node))

    def near(self, targets: tuple[Target, ...]) -> bool:
        """Whether a lock of `targets` meets one here (`lock_overlap` with some target here)."""
        nodes, above = self.nodes, self.above
        for target in targets:
            if target.is_glob:
                base = lock_prefix(target)
                if base in nodes or "" in nodes or any(parent in nodes for parent in _parents(base)):
                    return True  # a path at or above its directory
                if any(_below(node, base) and overlaps(target, Target(node, True, False)) for node in nodes):
                    return True
                if any(overlaps(target, glob) for glob in self.globs):
                    return True
                continue
            node = target.path
            if node in nodes or node in above or "" in nodes or node in self.glob_above:
                return True
            if any(parent in nodes for parent in _parents(node)):
                return True
            if self.globs and any(lock_overlap(glob, target) for glob in self.globs):
                return True
        return False


def _below(node: str, base: str) -> bool:
    return not base or node.startswith(base + "/")


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
    """The first holder whose targets overlap the task's, or whose locks would (lock_overlap: a path's lock covers
    what is below it), as (holder, the paths in words)."""
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
            # `docs` (no slash) and `docs/a.txt`, or `docs/*.md`: a path's lock covers what is below it, as if it
            # were a directory (and a glob holds its directory shared)
            if mine.is_glob != theirs.is_glob:  # the plain path's lock covers what is below it, not the glob's
                outer = theirs if mine.is_glob else mine
            else:
                outer = mine if str(theirs).startswith(f"{mine}/") else theirs
            return owner, f"{mine} ↔ {theirs} (the lock of {outer} covers everything below it)"
    return None
