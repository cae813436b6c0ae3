"""Target-file locks: a lock per path component, shared or exclusive (intention locks), kept outside the tree.

For each target a task locks its path (a glob: its fixed leading directories, `tests/**/*.py` → `tests`)
EXCLUSIVE and every directory above it SHARED, as databases lock hierarchies: `docs/conf.py` takes SHARED on
the project node and on `docs`, EXCLUSIVE on `docs/conf.py`; `docs/` takes EXCLUSIVE on `docs`. So two targets
that could cover one path always meet on a node one of them holds exclusively, and the kernel keeps them apart.
Locks are taken without waiting, in sorted order, all or nothing.

The descriptors are handed to the worker (see runtime.py), so the kernel drops the locks when the last process
holding them exits. The lock files live in the project's state directory outside the work tree (statedir.py), the
project node's lock being that directory itself; locks still held on lock files a worker removed are kept in force
(statedir.orphans). Who holds what (`Holdings`) is read from /proc without taking anything (lockholders.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Iterable
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from aipm import lockfiles
from aipm.lockfiles import GLOB_FILE
from aipm.digest import sha1
from aipm.liveness import read_small
from aipm.newfile import create_whole
from aipm.lockholders import lock_holders, proc_locks
from aipm.paths import Target, held_conflict, is_glob_node, lock_node, lock_prefix
from aipm.statedir import make_state_dir, note_orphans, orphans


class LockBusy(Exception):
    def __init__(self, node: str):
        super().__init__(f"{node or '.'} is locked by another worker")
        self.node = node


def lock_nodes(targets: Iterable[Target]) -> dict[str, bool]:
    """Node → exclusive?, for a set of targets ("" is the project node). A glob holds its pattern exclusive and
    its directory shared, with those above: what it could match is checked by take(), under the launch lock."""
    modes: dict[str, bool] = {}
    for target in targets:
        prefix = lock_prefix(target)
        parts = prefix.split("/") if prefix else []
        for i in range(len(parts)):
            modes.setdefault("/".join(parts[:i]), False)
        if target.is_glob:
            modes.setdefault(prefix, False)
        modes[lock_node(target)] = True
    return modes


def node_file(node: str) -> str:
    """The lock file's name for a node (the node itself is written inside, for `aipm locks`); a glob's own node
    ends `.glob.lock`, so that the held globs are found among a project's lock files (take)."""
    digest = sha1(os.fsencode(node)).hexdigest()[:20]  # (a path in any bytes: a target through a link)
    return digest + (GLOB_FILE if is_glob_node(node) else ".lock")


@lru_cache(maxsize=4096)
def node_path(state: Path, node: str) -> str:
    """The lock file of a node (the state directory itself for the project node). Asked on every lock of every
    start: remembered, as pathlib's joins and the digest cost more than the lock."""
    return os.fspath(state) if not node else f"{state}/locks/{node_file(node)}"


def prepare(state: Path, targets: Iterable[Target], made: set[str]) -> None:
    """Make the lock files of targets about to be locked, while nothing waits for them: a new file is the dearest
    step of a first lock (on ext4 without a journal each create scans the inodes freed in the last minute). Locks
    nothing; `made` remembers the nodes whose files are known to exist (take() makes any that vanished since)."""
    for node in lock_nodes(targets):
        if not node or node in made:
            continue
        try:
            os.close(_create(node_path(state, node), node))
        except FileExistsError:
            pass
        except OSError:
            return  # no state directory (yet), a full disk: take() will make it or say why
        made.add(node)


def take(state: Path, targets: Iterable[Target]) -> list[int]:
    """Lock every target without waiting; on any refusal release what was taken and raise LockBusy. Caller holds
    the launch lock: a glob's meeting with what others hold is a check made under it (_glob_check)."""
    targets = tuple(targets)
    modes = lock_nodes(targets)
    fds: list[int] = []
    try:
        files: dict[str, int] = {}  # lock file → inode
        for node in sorted(modes):  # one global order: no two takers can each hold what the other wants
            fd, ino = _lock(state, node, modes[node])
            fds.append(fd)
            if node:
                files[node_path(state, node)] = ino
        if modes:
            _check_made(state, files)
            orphaned = orphans(state)
            for _, node, exclusive in orphaned:
                if node in modes and (exclusive or modes[node]):
                    raise LockBusy(node)
            _glob_check(state, targets, set(files.values()), orphaned)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _glob_check(state: Path, targets: tuple[Target, ...], mine: set[int],
                orphaned: list[tuple[int, str, bool]]) -> None:
    """Raise LockBusy where `targets` meet what others hold only through a glob (lock_overlap): a glob node held
    (its lock file locked exclusive) that could match a target, and, for a glob of ours, a path held below its
    directory that it could match. The kernel keeps apart the rest: a path at or above a glob's directory, which
    the glob holds shared, and two globs of one pattern. Every taker checks this under the launch lock, after
    taking its own locks (`mine`: their files' inodes), so no two pass it at once; a glob's hold lasts as long as
    its lock file's lock, the kernel's."""
    globs, removed = _held_globs(state, mine)
    if removed:  # (a taker of other paths makes no file of the glob's, so _check_made never sees it gone)
        _note_removed(state, lockfiles.of(state), {})
        orphaned = orphans(state)
    held = [(node, True) for node in globs]
    if any(target.is_glob for target in targets):
        held += [(node, True) for node in _holdings(state).exclusive_nodes(mine)]
    held += [(node, exclusive) for _, node, exclusive in orphaned if exclusive]
    for node, exclusive in held:
        for target in targets:
            if (target.is_glob or is_glob_node(node)) and held_conflict(target, node, exclusive):
                raise LockBusy(node)


@lru_cache(maxsize=16)
def _holdings(state: Path) -> Holdings:
    """A Holdings kept per state directory: its map of lock files is made again only when locks/ changed."""
    return Holdings(state)


def _held_globs(state: Path, mine: set[int]) -> tuple[list[str], bool]:
    """The glob nodes held now by others: their lock files (`.glob.lock`, in the list of lock files, or in `locks/`
    when the list is gone) on which a shared lock is refused; and whether a listed one was removed (or made
    again), its holder maybe holding it still."""
    made = lockfiles.of(state)
    if made.read():
        files = list(made.globs)
    else:
        try:
            files = [entry.path for entry in os.scandir(f"{state}/locks") if entry.name.endswith(GLOB_FILE)]
        except OSError:
            return [], False
    held, removed = [], False
    for path in files:
        try:
            fd = os.open(path, _EXISTING | os.O_NOFOLLOW)
        except FileNotFoundError:
            removed = True
            continue
        except OSError:
            continue  # a link a worker left: no glob's
        try:
            ino = os.fstat(fd).st_ino
            if ino in mine:
                continue
            removed |= made.inodes.get(path, ino) != ino
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EACCES):
                    held.append(read_small(path).decode(errors="surrogateescape"))
        finally:
            os.close(fd)  # (and our shared lock with it)
    return held, removed


def _check_made(state: Path, locked: dict[str, int]) -> None:
    """Lock files just locked (path → inode) that were never locked before: listed (see lockfiles.py). One listed
    with another inode was removed and made again, and so may be any when the list itself is gone: a process may
    still hold the removed file's lock, which no lock file shows. Who does is noted (see `orphans`), before the
    list says the new file is known."""
    made = lockfiles.of(state)
    new = made.unlisted(locked)
    if not new:
        return
    listed = made.read()  # (another taker may have listed them since)
    new = made.unlisted(new)
    if not new:
        return
    if listed and not new.keys() & made.inodes.keys() and made.add(new):
        return  # new names: nobody can hold a removed file of theirs
    _note_removed(state, made, new)


def _note_removed(state: Path, made: lockfiles.LockFiles, new: dict[str, int]) -> None:
    """Note who holds a removed lock file (see `orphans`), and list anew what is there now, and `new`."""
    present = made.present()  # before the scan: a file removed after it is still listed, and checked when made again
    note_orphans(state)
    made.write({**present, **new})


def _lock(state: Path, node: str, exclusive: bool) -> tuple[int, int]:
    """The descriptor holding the node's lock, and its file's inode."""
    path = node_path(state, node)
    for _ in range(100):
        fd = _open(state, node, path)
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise LockBusy(node) from None
            raise
        # A file deleted or replaced between open and flock is a lock nobody else will see: take the new one.
        try:
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                if stat.S_ISREG(held.st_mode) or stat.S_ISDIR(held.st_mode):
                    return fd, held.st_ino
                # A worker's FIFO (or a link to one, to a device) in its place: `aipm locks` reading the node's name
                # there would wait for ever. Removed, as a worker's `rm` may remove any, and made anew.
                with suppress(OSError):
                    os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, f"{path} keeps being replaced")


# A lock file made already is opened without waiting: a worker's FIFO in its place held the launch lock for ever
# (_lock then makes the file anew).
_EXISTING = os.O_RDONLY | os.O_NONBLOCK


def _open(state: Path, node: str, path: str) -> int:
    for _ in range(2):
        try:
            if not node:
                return os.open(state, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return os.open(path, _EXISTING)  # made already, as prepare() or an earlier lock left it: most are
            except FileNotFoundError:
                pass
            try:
                return _create(path, node)
            except FileExistsError:
                return os.open(path, _EXISTING)
        except FileNotFoundError:
            make_state_dir(state)  # first use, or someone removed it: locks held in the old one are lost there
    raise OSError(errno.ENOENT, f"cannot create {path}")


def _create(path: str, node: str) -> int:
    """A new lock file holding its node's name (for `aipm locks`), under its name only once that is written
    (newfile.create_whole): a reader never finds it empty, and one whose write fails (a full disk) never appears.
    Made under its name first and then removed, another process could open and lock it in between, and a third lock
    a new file of that name beside it."""
    return create_whole(path, os.fsencode(node))


class Holdings:
    """Read-only view of which lock nodes are held right now, and by whom (Linux /proc)."""

    def __init__(self, state: Path):
        self.state = state
        self._names: dict[int, str] = {}  # inode → lock file name ("" for the project node)
        self._stamp: int | None = None

    def held(self) -> dict[str, bool]:
        """Lock file name → held exclusively?, for every node of this project some process holds."""
        locked = proc_locks()
        if not locked:
            return {}
        self._scan()
        return {self._names[ino]: excl for ino, excl in locked.items() if ino in self._names}

    def _scan(self) -> None:
        """Map inodes to lock files; rescanned only when a file was added or removed (directory mtime)."""
        try:
            stamp = os.stat(self.state / "locks").st_mtime_ns
        except OSError:
            self._names, self._stamp = {}, None
            return
        if stamp == self._stamp:
            return
        try:  # (removed since its stat: a worker's `rm -rf` of the state directory)
            names = {os.stat(self.state).st_ino: ""}
            with os.scandir(self.state / "locks") as entries:
                for entry in entries:
                    if entry.name.endswith(".lock"):  # stat, not d_ino: they differ on some file systems (overlayfs)
                        try:
                            names[entry.stat(follow_symlinks=False).st_ino] = entry.name
                        except OSError:
                            continue
        except OSError:
            names, stamp = {}, None
        self._names, self._stamp = names, stamp

    def exclusive_nodes(self, mine: set[int]) -> list[str]:
        """The nodes of this project held exclusively now, but for the lock files `mine` (inodes)."""
        locked = proc_locks()
        if not locked:
            return []
        self._scan()
        return [self.node(self._names[ino]) for ino, exclusive in locked.items()
                if exclusive and ino not in mine and self._names.get(ino)]

    def node(self, name: str) -> str:
        if not name:
            return ""
        try:  # (not waiting on a FIFO a worker left there and holds a lock on, nor reading its sparse terabyte)
            return read_small(f"{self.state}/locks/{name}").decode(errors="replace")
        except OSError:
            return "?"

    def outside(self, explained: set[str]) -> list[tuple[tuple[int, ...], tuple[tuple[str, bool], ...]]]:
        """Locks held but not explained by a worker record: [(holder pids, ((node, exclusive), ...))].

        `explained` holds lock file names (`node_file`, "" for the project node) of every recorded task. Only
        nodes a live process is seen holding count: an inode number from another file system is dropped.
        """
        held = {name: excl for name, excl in self.held().items() if name not in explained}
        by_pids: dict[tuple[int, ...], list[tuple[str, bool]]] = {}
        if held:
            inodes = {ino: name for ino, name in self._names.items() if name in held}
            for ino, pids in lock_holders(set(inodes), str(self.state)).items():
                name = inodes[ino]
                by_pids.setdefault(tuple(sorted(pids)), []).append((self.node(name), held[name]))
        # Locks in a removed state directory: no file shows them any more, yet they hold their files as before.
        for pid, node, exclusive in orphans(self.state, make=False):
            if (node_file(node) if node else "") not in explained:
                by_pids.setdefault((pid,), []).append((node, exclusive))
        return [(pids, tuple(sorted(nodes))) for pids, nodes in sorted(by_pids.items())]
