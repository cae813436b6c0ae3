"""Target-file paths: normalisation, confinement to the project root, and overlap of files, directories and globs.

A target is a file (`a/b.py`), a directory (`docs/`, or any existing directory: everything below it) or a glob
(`tests/**/*.py`; within a name `*`, `?` and `[...]` as fnmatch reads them, and `**` for any run of directories).
Two targets overlap exactly when some path could be covered by both.
"""

from __future__ import annotations

import fnmatch
import os
import posixpath
import re
import stat
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

GLOB_CHARS = frozenset("*?[")
_GLOB_CHAR = re.compile(r"[*?[]")


@lru_cache(maxsize=4096)
def as_path(text: str) -> Path:
    """The Path of a file named by text (a task file, a log): a start or an outcome asks for the same few again
    and again, and pathlib's parse costs more than a lookup (Paths never change)."""
    return Path(text)


class PathError(ValueError):
    """A target path that cannot be accepted (outside the root, empty, ...)."""


@dataclass(frozen=True, slots=True)
class Target:
    """One normalised target: `path` has no trailing slash; `segments` is its pattern form."""

    path: str
    is_dir: bool
    is_glob: bool

    @property
    def segments(self) -> tuple[str, ...]:
        return _segments(self.path, self.is_dir, self.is_glob)

    def __str__(self) -> str:
        if not self.path:
            return "./"  # the root: a name that normalises back to it ("" is no path)
        return self.path + ("/" if self.is_dir else "")


@lru_cache(maxsize=65536)
def _segments(path: str, is_dir: bool, is_glob: bool) -> tuple[str, ...]:
    # A file's exact name (a changed path, a merged one): its `*`, `?` and `[` are characters, else `docs/a*.md`
    # met the target `docs/*b.md` and `docs/[draft].md` no target.
    parts = tuple(p for p in (path if is_glob else quote(path)).split("/") if p) if path else ()
    # A directory covers everything below it, i.e. it behaves like `dir/**`.
    return parts + ("**",) if is_dir else parts


def quote(name: str) -> str:
    """`name` as a pattern that matches it alone: its `*`, `?` and `[` quoted as fnmatch quotes them (`[*]`)."""
    return _GLOB_CHAR.sub(r"[\g<0>]", name) if not GLOB_CHARS.isdisjoint(name) else name


def normalize(raw: str, root: str | None = None, links: dict[str, int] | None = None) -> Target:
    """Normalise `raw` relative to the project root; raise PathError when it leaves the root.

    With `root`, an existing directory counts as a directory even without a trailing slash, and a path that goes
    through a symlink is taken where it leads (a glob: its literal directories): refused outside the root, else
    named by its real path, so that locks, overlaps, the scope audit and confinement all see the files a write
    through it reaches (`notes.md -> README.md` is README.md, and conflicts with a task on README.md).
    `links`: the directories this load has looked at (see _above).
    """
    if not isinstance(raw, str) or not raw.strip():
        raise PathError("empty path")
    text = raw.strip()
    if "\\" in text:
        # Read as '/' (Windows' separator), `src\a.py` locked and confined src/a.py; yet on Linux it may be the name
        # of one file. Either reading is silently wrong for someone: the user says which.
        raise PathError(f"'{raw}' holds a backslash: separate directories with '/' "
                        f"('{text.replace(chr(92), '/')}'); a file whose name holds a backslash cannot be a target")
    # (`a:b.txt`, `C:x` are names a POSIX file may have: only a leading / makes a path absolute here)
    if text.startswith("/"):
        raise PathError(f"{raw!r} is absolute; give it relative to the project root")
    is_dir = text.endswith("/")
    if "//" in text or "/." in text or text.startswith("."):
        norm = posixpath.normpath(text)
    else:  # nothing for normpath to fold (its Python costs more than the rest of a load's look at a target)
        norm = text[:-1] if is_dir else text
    if norm == ".":
        norm, is_dir = "", True
    if norm == ".." or norm.startswith("../"):
        raise PathError(f"{raw!r} leads outside the project root")
    is_glob = not GLOB_CHARS.isdisjoint(norm)
    if root is not None and norm:
        literal = norm if not is_glob else literal_base(norm)
        if literal:
            slash = literal.rfind("/")
            above = _above(root, literal[:slash], {} if links is None else links) if slash > 0 else _CLEAN
            mode = 0
            if above != _ABSENT:  # below a missing directory (or a file) nothing exists: no need to look
                try:
                    mode = os.lstat(os.path.join(root, literal)).st_mode  # "symlink?" and "directory?" at once
                except OSError:
                    pass
            if above == _LINK or stat.S_ISLNK(mode):
                real = real_relative(root, literal)
                if real is None:
                    raise PathError(f"{raw!r} is a symlink that leads outside the project root")
                # (a glob's real directories are characters: `ln -s 'w[1]' w` made `w/*.py` match w1/a.py)
                base = quote(real) if is_glob else real
                norm = base + norm[len(literal):] if real else norm[len(literal):].lstrip("/")
                full = os.path.join(root, literal)
                mode = os.stat(full).st_mode if os.path.exists(full) else 0
                if not norm:
                    norm, is_dir = "", True
            if not is_glob and not is_dir and stat.S_ISDIR(mode):
                is_dir = True
    return Target(norm, is_dir, is_glob)


def literal_base(pattern: str) -> str:
    """A glob's leading directories without pattern characters (`tests/**/*.py` → `tests`, `*.md` → "")."""
    fixed = []
    for part in pattern.split("/"):
        if not GLOB_CHARS.isdisjoint(part):
            break
        fixed.append(part)
    return "/".join(fixed)


def real_relative(root: str, rel: str) -> str | None:
    """Where `rel` really leads, relative to the real root ("" for the root itself); None when outside it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(root, rel))
    if real == real_root:
        return ""
    prefix = real_root.rstrip(os.sep) + os.sep  # (a root of `/` is its own prefix)
    if not real.startswith(prefix):
        return None
    return real[len(prefix):]


class Normaliser(dict):
    """`normalize` for one load, by raw path: the tasks of an order share many targets, and each needs one look
    at the tree. Only for one load: the tree changes between loads."""

    def __init__(self, root) -> None:
        super().__init__()
        self.root = str(root) if root else None
        self.links: dict[str, int] = {}  # directory → what _above found of it in this load

    def __missing__(self, raw: str) -> Target:
        target = self[raw] = normalize(raw, self.root, self.links)
        return target


# What _above finds of a directory and everything above it: only real directories; a symlink at or above it; or,
# at or above it and below no symlink, something that is no directory (missing, a file), so nothing below exists.
_CLEAN, _LINK, _ABSENT = 0, 1, 2


def _above(root: str, directory: str, links: dict[str, int]) -> int:
    """What `directory` (relative to `root`) and the directories above it are (_CLEAN, _LINK or _ABSENT), with one
    lstat for each directory not in `links`, top down. A loop: a recursion per directory overran Python's limit on
    a path of a thousand directories. `links` keeps each directory's answer for one load (thousands of targets
    share a few directories), never longer: a run lives on while a worker replaces a directory with a link
    leading out of the root, and a task file it reads then must be refused as any new process refuses it. Within
    one load it is a snapshot, as it was for a directory's link: a directory found missing stays missing for the
    load's other targets (what a worker makes below it meanwhile, a link among it, the next load sees)."""
    unknown = []
    while directory and directory not in links:
        unknown.append(directory)
        slash = directory.rfind("/")
        directory = directory[:slash] if slash > 0 else ""
    state = links[directory] if directory else _CLEAN
    for directory in reversed(unknown):
        if state == _CLEAN:
            try:
                mode = os.lstat(os.path.join(root, directory)).st_mode
            except OSError:
                mode = 0
            state = _LINK if stat.S_ISLNK(mode) else _CLEAN if stat.S_ISDIR(mode) else _ABSENT
        links[directory] = state
    return state


def overlaps(a: Target, b: Target) -> bool:
    """True when some path could be covered by both targets (symmetric, conservative)."""
    if not a.is_glob and not b.is_glob:
        # Fast path for the common case: plain files and directories compare by prefix.
        if a.path == b.path:
            return True
        if a.is_dir and (not a.path or b.path.startswith(a.path + "/")):
            return True
        if b.is_dir and (not b.path or a.path.startswith(b.path + "/")):
            return True
        return False
    return _segments_overlap(a.segments, b.segments)


@lru_cache(maxsize=65536)
def _segments_overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    return _intersect_or_zip(a, b, "**", segment_overlap)


def _intersect_or_zip(a: tuple[str, ...], b: tuple[str, ...], star: str, same) -> bool:
    """_intersect, where a pattern without `star` is compared item by item (it matches only as many items as it
    has), stopping at the first pair that differs: the table was filled whole, n × m calls of `same`, for two
    literal names (a glob target's directories against another's: 200 targets `src/NAME_i/**/*.py` took 2.5
    times as long to plan as with the recursion the table replaced)."""
    if star not in a and star not in b:
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return _intersect(a, b, star, same)


def _intersect(a: tuple[str, ...], b: tuple[str, ...], star: str, same) -> bool:
    """Whether some sequence matches both patterns `a` and `b`: `star` stands for any run of items, and
    `same(x, y)` says whether one item can match both other tokens. Filled from the ends (whether a[i:] and b[j:]
    can match a common rest), a row at a time: a table, not a recursion, so a pattern of a thousand segments
    or characters stays within Python's recursion limit (RecursionError in every command that planned it)."""
    n, m = len(a), len(b)
    below = [False] * (m + 1)  # the row of i + 1
    for i in range(n, -1, -1):
        row = [False] * (m + 1)
        for j in range(m, -1, -1):
            if i < n and a[i] == star:
                row[j] = below[j] or (j < m and row[j + 1])
            elif j < m and b[j] == star:
                row[j] = row[j + 1] or (i < n and below[j])
            elif i == n or j == m:
                row[j] = i == n and j == m
            else:
                row[j] = below[j + 1] and same(a[i], b[j])
        below = row
    return below[0]


def _same_character(x: str, y: str) -> bool:
    """Whether one character can match both tokens: a literal character, `?`, or a class as written (`[a-c]`,
    `[!x]`)."""
    if len(x) == 1 and len(y) == 1:
        return x == y or x == "?" or y == "?"
    # Exact, by trying candidates: both tokens are unions of character ranges (or their complements), so where they
    # meet, the least character they share is an end of a range named in them, one past such an end, or the first
    # character there is. A class read as any character sent `src/c.py` and `src/[ab].py` into the same round's
    # overlap, and let a task with target `src/[ab].py` write `src/c.py` unseen by the scope audit.
    named = {ord(c) + d for c in x + y for d in (-1, 0, 1)} | {0}
    return any(_member(x, c) and _member(y, c) for c in map(chr, sorted(n for n in named if 0 <= n <= 0x10FFFF)))


def _member(token: str, c: str) -> bool:
    if len(token) == 1:
        return token in ("?", c)
    return _class(token).fullmatch(c) is not None  # (one with no member, `[b-a]`, matches nothing)


@lru_cache(maxsize=1024)
def _class(token: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(token))  # fnmatch's own reading of a class: ranges, `!`, a leading `]`


def _tokens(segment: str) -> tuple[str, ...]:
    """Split one path segment into literal characters, `?`, `*` and `[...]` classes, the bracket found as fnmatch
    finds it (a `]` first in the class is a member; a `[` never closed is a literal character)."""
    out: list[str] = []
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        if c == "[":
            end = i + 1
            if end < n and segment[end] == "!":
                end += 1
            if end < n and segment[end] == "]":
                end += 1
            while end < n and segment[end] != "]":
                end += 1
            if end < n:
                out.append(segment[i:end + 1])
                i = end + 1
                continue
        if c == "*" and out and out[-1] == "*":
            i += 1
            continue
        out.append(c)
        i += 1
    return tuple(out)


@lru_cache(maxsize=65536)
def segment_overlap(p: str, q: str) -> bool:
    """True when some single path segment could match both fnmatch-style patterns."""
    return _intersect_or_zip(_tokens(p), _tokens(q), "*", _same_character)


def first_overlap(mine: tuple[Target, ...], theirs: tuple[Target, ...], test=None) -> tuple[Target, Target] | None:
    """The first pair (mine, theirs) that overlaps (by `test`, default `overlaps`), or None."""
    test = test or overlaps
    for a in mine:
        for b in theirs:
            if test(a, b):
                return a, b
    return None


@lru_cache(maxsize=65536)
def lock_prefix(target: Target) -> str:
    """The directory a glob locks SHARED, with every one above it (`tests/**/*.py` → `tests`, `*.py` → the project
    root ""); a plain target's own path, which it locks EXCLUSIVE."""
    return literal_base(target.path) if target.is_glob else target.path


def lock_node(target: Target) -> str:
    """The node a target holds EXCLUSIVE: its path; a glob's pattern, `/**` added for one that names directories
    (`docs/*/`), as held_conflict reads a held glob node back by its pattern alone: `docs/*` matches no
    `docs/a/x.md`, and a task on it started beside a running `docs/*/`."""
    return target.path + "/**" if target.is_glob and target.is_dir else target.path


def is_glob_node(node: str) -> bool:
    """Whether a lock node is a glob's own (its pattern, locked EXCLUSIVE): no plain path has pattern characters."""
    return not GLOB_CHARS.isdisjoint(node)


def nodes_related(p: str, q: str) -> bool:
    """Whether one lock node is at or above the other (so their locks meet on the upper one)."""
    if len(p) > len(q):
        p, q = q, p
    # The shorter is the longer itself, a directory above it, or the project node "".
    return q.startswith(p) and (len(q) == len(p) or not p or q[len(p)] == "/")


def lock_overlap(a: Target, b: Target) -> bool:
    """Whether the locks of two targets keep them apart (locks.take). Two plain paths: where one is at or above
    the other (a path's lock covers what is below it, so `docs` and `docs/a.txt` meet though no file can be
    both). A glob: where a path could match both (`overlaps`, the contract's rule: `*.md` and `src/a.py` do not
    meet), a plain path below its directory taken as covering what is below it; and a plain path at or above
    that directory, which the glob holds shared, meets it whole. Every pair that `overlaps` meets here too."""
    if not a.is_glob and not b.is_glob:
        return nodes_related(a.path, b.path)
    glob, other = (a, b) if a.is_glob else (b, a)
    if other.is_glob:
        return overlaps(glob, other)
    base = lock_prefix(glob)
    if not other.path or other.path == base or base.startswith(other.path + "/"):
        return True
    if base and not other.path.startswith(base + "/"):
        return False  # beside its directory: nothing it could match (the common case, without a pattern walk)
    return overlaps(glob, Target(other.path, True, False))


def held_conflict(target: Target, node: str, exclusive: bool) -> bool:
    """Whether `target`'s locks meet a lock node someone holds (`exclusive` or shared), as locks.take decides."""
    if is_glob_node(node):  # held by a glob target (exclusive)
        return lock_overlap(target, Target(node, False, True))
    if not target.is_glob:
        # Exclusive: any path at, above or below it; shared (a directory above a held file, a glob's directory):
        # only a task that wants that directory whole.
        return target.path == node or (exclusive and nodes_related(node, target.path))
    return exclusive and lock_overlap(target, Target(node, False, False))  # a glob wants only shared nodes whole
