"""Target-file locks: a lock per path component, shared or exclusive (intention locks), kept outside the tree.

For each target a task locks its path (a glob: its fixed leading directories, `tests/**/*.py` → `tests`)
EXCLUSIVE and every directory above it SHARED, as databases lock hierarchies: `docs/conf.py` takes SHARED on
the project node and on `docs`, EXCLUSIVE on `docs/conf.py`; `docs/` takes EXCLUSIVE on `docs`. So two targets
that could cover one path always meet on a node one of them holds exclusively, and the kernel keeps them apart.
Locks are taken without waiting, in sorted order, all or nothing.

The descriptors are handed to the worker (see runtime.py), so the kernel drops the locks when the last process
holding them exits. The lock files live in the project's state directory outside the work tree (`state_dir`):
a worker that deletes `.aipm/` (`git clean -fdx`) cannot make aipm create a second, unlocked file for a path
that is held. The project node is that directory itself; while a task holds it, systemd-tmpfiles' ageing skips it.
A worker may still remove that directory (`rm -rf /tmp/aipm-*`) or files in it: the locks still held on removed
lock files are noted when the directory is made again, or when a lock file is (lockfiles.py), or when the note
itself went missing, and kept in force (`orphans`).

Who holds what is read from /proc/locks (locked inodes) and /proc/<pid>/fd + fdinfo (which processes have the
locked open file), without taking anything: read-only commands never make a launcher see a busy file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from aipm import lockfiles
from aipm.digest import sha1
from aipm.errors import UserError
from aipm.liveness import process_alive, process_ctime
from aipm.workerfiles import read_bytes, write_bytes
from aipm.paths import Target, lock_prefix

STATE_BASE = "/tmp"  # fixed, not $TMPDIR: every aipm process of a project must find the same directory
_PROC_LOCKS = "/proc/locks"


class LockBusy(Exception):
    def __init__(self, node: str):
        super().__init__(f"{node or '.'} is locked by another worker")
        self.node = node


def state_dir(root: Path) -> Path:
    """`/tmp/aipm-<uid>/<dev>-<inode>-<path hash>` of the project root: one per project incarnation (a root
    deleted and made again, or moved, gets a new one), shared by every aipm process of this user."""
    real = os.path.realpath(root)
    st = os.stat(real)
    digest = sha1(real.encode()).hexdigest()[:10]
    return _user_dir() / f"{st.st_dev:x}-{st.st_ino:x}-{digest}"


def _user_dir() -> Path:
    return Path(STATE_BASE) / f"aipm-{os.getuid()}"


def user_base(base: Path | None = None) -> Path:
    """`/tmp/aipm-<uid>`, created if need be; it must be this user's alone (others could plant files in it)."""
    base = base or _user_dir()
    try:
        os.mkdir(base, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(base)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise UserError(f"{base}: must be a directory only this user can access (aipm keeps its locks there); "
                        "remove it and try again")
    return base


def keep_inherited_locks() -> None:
    """Pass no lock this process inherited on to what it starts. An aipm command that a worker's command runs
    (`aipm launch` of its own order) inherits that worker's target locks; handed on, they outlived the worker in
    the owners and workers that command started, keeping the worker's files from its dependants."""
    prefix = f"{_user_dir()}/"
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        with suppress(OSError):  # the listing's own descriptor, closed by now
            if fd > 2 and os.readlink(f"/proc/self/fd/{fd}").startswith(prefix):
                os.set_inheritable(fd, False)


def make_state_dir(state: Path) -> None:
    """Create the state directory inside the user's base directory. A state directory (or its `locks/`) made again
    after someone removed it (`rm -rf /tmp/aipm-*`, a test suite cleaning /tmp) first notes the locks still held
    in the removed one (see `orphans`), and lists no lock file yet: only then does `locks/` appear, and every taker
    looks there first."""
    base, locks, _ = _places(state)
    user_base(base)
    for _ in range(3):
        if os.path.isdir(locks):
            return
        try:
            with suppress(FileExistsError):
                os.mkdir(state)
            _note_orphans(state)
            lockfiles.make(state)
            with suppress(FileExistsError):
                os.mkdir(locks)
        except FileNotFoundError:
            continue  # removed again while being made: make it again
    raise OSError(errno.ENOENT, f"{state} keeps being removed")


# Locks held in a removed incarnation of the state directory or on a removed lock file: a JSON list of [pid, start
# time, descriptor, inode, exclusive, node]. Kept when empty, so that a missing one says it was removed.
ORPHANS = "orphans.json"
_DELETED = " (deleted)"  # how /proc names a descriptor's file that was removed


def _note_orphans(state: Path) -> None:
    """Write down who holds a lock on a removed lock file (or removed state directory) of this project. Nobody can
    take such a lock any more (the file has no name), so who holds it now is all there will ever be."""
    held = _held_in_removed(state)  # (a holder noted before and alive still is found again)
    path = state / ORPHANS
    write_bytes(path, json.dumps(held).encode())  # (regular files only: a worker's FIFO is refused, not waited on)


def _held_in_removed(state: Path) -> list[list]:
    """The ORPHANS entries of the locks held on removed files of this project now (a scan of every process)."""
    held = []
    top, below = f"{state}{_DELETED}", f"{state}/locks/"
    for pid, fd, link in open_under(str(state)):
        if link != top and not (link.startswith(below) and link.endswith(".lock" + _DELETED)):
            continue
        try:
            lock = _read(f"/proc/{pid}/fdinfo/{fd}").partition("\nlock:")[2].split("\n", 1)[0]
            node = "" if link == top else _read(f"/proc/{pid}/fd/{fd}")  # a lock file holds its node's name
            if lock:
                ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
                held.append([pid, process_ctime(pid), int(fd), ino, " WRITE " in lock, node])
        except (OSError, ValueError):
            continue  # ended meanwhile
    return held


def orphans(state: Path, make: bool = True) -> list[tuple[int, str, bool]]:
    """(pid, node, exclusive?) of every live process still holding a lock in a removed incarnation of the state
    directory or on a removed lock file: such a lock keeps its files from everyone as before, though no lock file
    shows it any more. With `make` (a taker), a state directory being made again is finished first, its orphans
    noted, and a note a worker removed is written again (a reader only looks for itself)."""
    _, locks, noted = _places(state)
    try:
        if make or os.path.isdir(locks):  # (a taker makes `locks/` again first; a reader would read the old note)
            return _holding(json.loads(read_bytes(noted)))
    except FileNotFoundError:
        if make:
            if os.path.isdir(locks):
                _note_orphans(state)  # removed (`rm`, an `rm -rf` that left the directories), maybe not alone
            else:  # someone may be making it again and still be noting the orphans: note them too
                make_state_dir(state)
            return orphans(state, make=False)
    except (OSError, ValueError, TypeError):  # not as written, or no file (a FIFO): any worker can write here
        if make:
            _note_orphans(state)  # written again, as for a note removed
            return orphans(state, make=False)
    return _holding(_held_in_removed(state))


def _holding(held: list[list]) -> list[tuple[int, str, bool]]:
    return [(pid, node, exclusive) for pid, ctime, fd, ino, exclusive, node in held
            if process_alive(pid, ctime) and _still_open(pid, fd, ino)]


def _still_open(pid: int, fd: int, ino: int) -> bool:
    """The process has not closed its descriptor of the removed file (a detached owner closes its copies of its
    worker's locks before it starts the successors). The file must still have no name: a descriptor number reused
    on a new file can meet the freed inode's number again (a detached owner opens its successor's new lock file
    on the number it just closed), and that file is no lock held in a removed directory."""
    try:
        info = os.stat(f"/proc/{pid}/fd/{fd}")
    except OSError:
        return False
    return info.st_ino == ino and info.st_nlink == 0


def lock_nodes(targets: Iterable[Target]) -> dict[str, bool]:
    """Node → exclusive?, for a set of targets ("" is the project node)."""
    modes: dict[str, bool] = {}
    for target in targets:
        prefix = lock_prefix(target)
        parts = prefix.split("/") if prefix else []
        for i in range(len(parts)):
            modes.setdefault("/".join(parts[:i]), False)
        modes[prefix] = True
    return modes


def node_file(node: str) -> str:
    """The lock file's name for a node (the node itself is written inside, for `aipm locks`)."""
    return sha1(node.encode()).hexdigest()[:20] + ".lock"


@lru_cache(maxsize=4096)
def node_path(state: Path, node: str) -> str:
    """The lock file of a node (the state directory itself for the project node). Asked on every lock of every
    start: remembered, as pathlib's joins and the digest cost more than the lock."""
    return os.fspath(state) if not node else f"{state}/locks/{node_file(node)}"


@lru_cache(maxsize=64)
def _places(state: Path) -> tuple[Path, str, str]:
    """The user's base directory above a state directory, its `locks/` and its ORPHANS note (checked every round)."""
    return state.parent, f"{state}/locks", f"{state}/{ORPHANS}"


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
    """Lock every target without waiting; on any refusal release what was taken and raise LockBusy."""
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
            for _, node, exclusive in orphans(state):
                if node in modes and (exclusive or modes[node]):
                    raise LockBusy(node)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


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
    present = made.present()  # before the scan: a file removed after it is still listed, and checked when made again
    _note_orphans(state)
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
                return fd, held.st_ino
        except FileNotFoundError:
            pass
        os.close(fd)
    raise OSError(errno.EAGAIN, f"{path} keeps being replaced")


def _open(state: Path, node: str, path: str) -> int:
    for _ in range(2):
        try:
            if not node:
                return os.open(state, os.O_RDONLY | os.O_DIRECTORY)
            try:
                return _create(path, node)
            except FileExistsError:
                return os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            make_state_dir(state)  # first use, or someone removed it: locks held in the old one are lost there
    raise OSError(errno.ENOENT, f"cannot create {path}")


def _create(path: str, node: str) -> int:
    """A new lock file holding its node's name (for `aipm locks`); none is left behind if that write fails."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, node.encode())
    except BaseException:
        os.close(fd)
        with suppress(OSError):
            os.unlink(path)
        raise
    return fd


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

    def node(self, name: str) -> str:
        if not name:
            return ""
        try:
            return (self.state / "locks" / name).read_text(errors="replace")
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


def proc_locks() -> dict[int, bool]:
    """Inode → exclusive?, for every granted flock lock on the machine (waiters skipped)."""
    try:
        with open(_PROC_LOCKS) as handle:
            text = handle.read()
    except OSError:
        return {}
    out: dict[int, bool] = {}
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  WRITE 1234 fe:00:2171986 0 EOF"; a waiter reads "1: -> FLOCK ...".
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK":
            continue
        ino = int(parts[5].rsplit(":", 1)[-1])
        out[ino] = out.get(ino, False) or parts[3] == "WRITE"
    return out


def lock_holders(inodes: set[int], prefix: str, pids: Iterable[int] | None = None) -> dict[int, set[int]]:
    """Inode → pids whose open file on it carries the lock (the pid in /proc/locks is only who took it first:
    an inherited lock lives on in every process that has the descriptor)."""
    out: dict[int, set[int]] = {}
    for pid, fd, _ in open_under(prefix, pids):
        try:
            ino = os.stat(f"/proc/{pid}/fd/{fd}").st_ino
            if ino in inodes and "\nlock:" in _read(f"/proc/{pid}/fdinfo/{fd}"):
                out.setdefault(ino, set()).add(pid)
        except OSError:
            continue
    return out


def open_under(prefix: str, pids: Iterable[int] | None = None) -> Iterator[tuple[int, str, str]]:
    """(pid, descriptor number, what it names) of every descriptor of `pids` (default: every process we may read)
    naming a file under `prefix`."""
    if pids is None:
        pids = (int(name) for name in os.listdir("/proc") if name.isdigit())
    for pid in pids:
        base = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(base)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{base}/{fd}")
            except OSError:
                continue
            if link.startswith(prefix):
                yield pid, fd, link


def _read(path: str) -> str:
    with open(path) as handle:
        return handle.read()

