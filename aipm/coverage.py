"""Which paths a task's targets cover: the scope audit's changed files against the targets (out_of_scope), a
directory moved away whole (dir_covered), a file target a task made into a directory (files_above). Pure."""

from __future__ import annotations

import posixpath
from collections.abc import Iterable

from aipm.paths import Target, normalize, overlaps


def out_of_scope(paths: set[str], allowed: Iterable[Target | str]) -> list[str]:
    """Sorted paths that no allowed target (file, directory or glob) covers.

    A str target is read as `str(Target)` writes it (Record.targets): a directory ends in "/"; one with a
    backslash, which no target holds, is taken literally (an exact file name is passed as a Target).
    """
    targets = [_allowed(t) for t in allowed]
    bad = []
    for p in paths:
        # A changed path is a literal file name, even if it contains `*`, `?` or `[`, a backslash or blanks at
        # its ends: normalize() is for targets a person writes (it strips `a.txt ` to a.txt, refuses `x\\y`).
        target = _literal(p)
        if target is None or not any(overlaps(target, t) for t in targets):
            bad.append(p)
    return sorted(bad)


def _allowed(target: Target | str) -> Target:
    # (a backslash is in no target a person writes: such a name, in a record a worker rewrote, is taken as it is,
    # never refused in the middle of an audit)
    if not isinstance(target, str):
        return target
    return Target(target, False, False) if "\\" in target else normalize(target)


def _literal(path: str) -> Target | None:
    """A changed file's name as git gives it, or None for one that leaves the root."""
    norm = posixpath.normpath(path)
    return None if not path or norm in (".", "..") or norm.startswith(("/", "../")) else Target(norm, False, False)


def files_above(paths: Iterable[str], targets: Iterable[Target | str]) -> list[str]:
    """The file targets (no trailing `/`, no glob) that some of `paths` lie below: `gen` named before the task made
    the directory gen/ is a file, so gen/out.txt is outside it (though its lock covers gen/out.txt too)."""
    found = []
    for t in (normalize(t) if isinstance(t, str) else t for t in targets):
        if t.path and not t.is_dir and not t.is_glob and any(p.startswith(t.path + "/") for p in paths):
            found.append(t.path)
    return sorted(set(found))


def dir_covered(directory: str, allowed: Iterable[Target | str]) -> bool:
    """A directory moved away took every file in it: covered only by a target that covers all of them."""
    whole = Target(directory, True, False)
    for t in map(_allowed, allowed):
        if t.is_glob and overlaps(whole, t):
            return True  # conservative for patterns, like out_of_scope
        if t.is_dir and (not t.path or directory == t.path or directory.startswith(t.path + "/")):
            return True
    return False
