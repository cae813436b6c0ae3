"""A confined worktree worker's objects, taken into the repository's store while it runs, not only at its end.

Its git adds its commits to an object store of its own (workspace/objects.py) while its HEAD and refs, in the
repository's `.git/worktrees/`, name them: until aipm has taken them, every git of the user's that walks all
worktrees (`git gc`, `git prune`, `git fsck`, `git log --all`) fails with "bad object worktrees/...". Its owner
looks every EVERY seconds while the attempt lives, so that window is seconds, not the attempt's hours. A look takes
only what an earlier look of this owner did not (names; the end's capture takes everything again, each object
checked); one git refused is left to that capture, which says why.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from aipm.record import Record

EVERY = 2.0  # seconds between looks


class Intake:
    def __init__(self, root) -> None:
        self.root = root
        self.next_at = 0.0  # (time.monotonic)
        self.repo = None  # the Repo of the first look (two gits to make one)
        # (key, attempt) → the names its store's looks took; None: git refused one, left to its capture
        self.known: dict[tuple[str, int], set[str] | None] = {}

    def cap(self, owned: Mapping[str, Record], timeout: float | None) -> float | None:
        """`timeout`, or less when a look is due first (an attempt among `owned` is a confined worktree one)."""
        if not any(rec.confined and rec.workspace for rec in owned.values()):
            return timeout
        left = max(0.0, self.next_at - time.monotonic())
        return left if timeout is None else min(timeout, left)

    def look(self, owned: Mapping[str, Record]) -> bool:
        """Take the new objects of the confined worktree attempts among `owned` if a look is due; whether it was."""
        now = time.monotonic()
        running = [rec for rec in owned.values() if rec.confined and rec.workspace]
        if now < self.next_at or not running:
            return False
        from aipm.workspace import ownrefs  # (only here: a run without such attempts imports no git of aipm's)
        from aipm.workspace.repo import Repo, WorkspaceError

        self.known = {(rec.key, rec.serial): self.known.get((rec.key, rec.serial), set()) for rec in running}
        try:
            self.repo = self.repo or Repo(self.root)
            for (key, serial), known in self.known.items():
                note = self.repo.note_of(owned[key].workspace)
                if note is not None and known is not None:
                    try:
                        ownrefs.take_objects(self.repo, note, known)
                    except (WorkspaceError, OSError):
                        # Not looked at again (git would be asked the same each time): its capture takes them,
                        # and says why git refused them.
                        self.known[key, serial] = None
        except (WorkspaceError, OSError):
            pass  # (no git or no repository any more: the end's capture says so)
        self.next_at = time.monotonic() + EVERY
        return True
