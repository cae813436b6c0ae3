"""The repository's stash (refs/stash), which every worktree shares with the main tree: what a worker's `git stash`
did to it is looked at when its attempt ends.

- An entry the worker made (its first parent is the attempt's start, or a commit the worker made on it) holds work
  that is not in its worktree, so not in its capture: `left` names it for the log; it stays where it is.
- An entry of the user's that was in the stash when the attempt started, and that the worker applied in its
  worktree and so took from the stash (a `git stash pop` after a `git stash` that had nothing to save pops the
  user's), is put back by `restore`: its changes were then only in the attempt's capture. The entries are pinned at
  the start under the attempt's refs (`<space>stash/<n>`, removed with them), which also keeps them from `git gc`.
"""

from __future__ import annotations

from aipm.workspace.repo import Repo, WorkspaceError

STASHED = ("left in the repository's stash by the worker, so not merged (the stash is shared with the main tree: a "
           "`git stash pop` there applies it)")


def pin(repo: Repo, space: str) -> None:
    """Note the entries in the stash as an attempt starts (`space`: its refs' prefix)."""
    lines = [f"update {space}stash/{n} {commit}\n" for n, (_, commit, _) in enumerate(repo.stash())]
    if lines:
        repo.git("update-ref", "--stdin", stdin="".join(lines).encode())


def restore(repo: Repo, space: str, base: str, end: str) -> list[str]:
    """Put back the entries pinned at the attempt's start that are gone from the stash and whose changes its end
    holds where its start did not (an entry the user popped in the main tree meanwhile is not). Notes for the
    log."""
    pinned = _pinned(repo, space)
    present = {commit for _, commit, _ in repo.stash()} if pinned else set()
    notes, back = [], []
    for commit in pinned:
        if commit in present:
            continue
        parents, _, subject = repo.git("log", "-1", "--format=%P%n%s", commit).decode("utf-8", "replace").partition(
            "\n")
        parents, subject = parents.split(), subject.strip()
        if not _held(repo, parents, commit, end) & {c.path for c in repo.changes(base, end)}:
            continue
        taken = (f"your stash entry \"{subject}\" was applied in the worktree, which took it from the repository's "
                 "stash (a `git stash pop` there)")
        try:
            repo.git("stash", "store", "-m", subject, commit)
        except WorkspaceError as exc:  # a note, not the attempt's failure: the entry's commit is named
            notes.append(f"{commit}: {taken}; it could not be put back ({exc}): `git stash store {commit}` does it")
            continue
        present.add(commit)
        back.append(f"({commit[:10]}): {taken}: put back")
    return notes + [f"stash@{{{len(back) - 1 - n}}} {note}" for n, note in enumerate(back)]


def left(repo: Repo, space: str, base: str, end: str) -> list[str]:
    """Notes of the entries the worker made whose changes its end does not hold as stashed (a `git stash apply`
    put them back: merged)."""
    entries = repo.stash()
    # The entries pinned at the start are older (a git each spared). Not told by their time: a clock stepped back
    # since the start dated the worker's before it.
    older = set(_pinned(repo, space)) if entries else set()
    notes = []
    for name, commit, parents in entries:
        if commit not in older and repo.descends(parents[0], base):
            paths = sorted(_paths(repo, parents, commit) - _held(repo, parents, commit, end))
            if paths:
                notes.append(f"{', '.join(paths)} ({name}, {commit[:10]}): {STASHED}")
    return notes


def _pinned(repo: Repo, space: str) -> list[str]:
    """The entries pinned at the attempt's start, oldest first (stash/<n> was its stash@{n})."""
    refs = repo.git("for-each-ref", "--format=%(refname) %(objectname)", f"{space}stash/").decode().split("\n")
    return [commit for _, commit in sorted((line.split() for line in refs if line),
                                           key=lambda ref: -int(ref[0].rpartition("/")[2]))]


def _paths(repo: Repo, parents: list[str], commit: str) -> set[str]:
    """What a stash entry changed: its tracked files since its first parent, and its untracked files (`git stash
    -u` keeps them in a third parent's tree)."""
    return {c.path for c in repo.changes(parents[0], commit)} | set(repo.files(parents[2]) if len(parents) > 2 else ())


def _held(repo: Repo, parents: list[str], commit: str, end: str) -> set[str]:
    """The paths of a stash entry that `end` holds as the entry does."""
    held = {c.path for c in repo.changes(parents[0], commit)} - {c.path for c in repo.changes(commit, end)}
    if len(parents) > 2:
        held |= set(repo.files(parents[2])) - {c.path for c in repo.changes(parents[2], end)}
    return held
