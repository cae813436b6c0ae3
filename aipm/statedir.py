"""The project's state directory, outside the work tree: `/tmp/aipm-<uid>/<dev>-<inode>-<path hash>`, where the
target-file locks (locks.py), the worker records and the demand files live. Here: where it is (`state_dir`), the
user's base directory above it (`user_base`), making it (again), and the locks a removed one left behind (`orphans`).

A worker that deletes `.aipm/` (`git clean -fdx`) cannot make aipm create a second, unlocked lock file for a path
that is held: the lock files are not there. The project node's lock is this directory itself; while a task holds
it, systemd-tmpfiles' ageing skips it. A worker may still remove this directory (`rm -rf /tmp/aipm-*`) or files in
it: the locks still held on removed lock files are noted when the directory is made again, or when a lock file is
(lockfiles.py), or when the note itself went missing, and kept in force (`orphans`).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import stat
import sys
from contextlib import suppress
from functools import lru_cache
from pathlib import Path

from aipm import lockfiles
from aipm.digest import sha1
from aipm.errors import UserError
from aipm.liveness import process_alive, process_ctime
from aipm.lockholders import open_under, read_text
from aipm.workerfiles import STATE_FILE_MAX, read_bytes, write_bytes

STATE_BASE = "/tmp"  # fixed, not $TMPDIR: every aipm process of a project must find the same directory


@lru_cache(maxsize=8192)
def safe_name(name: str) -> str:
    """A name made safe for a file name (ids repeat on every path of a run's hot path: remembered)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def state_dir(root: Path) -> Path:
    """`/tmp/aipm-<uid>/<dev>-<inode>-<path hash>` of the project root: one per project incarnation (a root
    deleted and made again, or moved, gets a new one), shared by every aipm process of this user."""
    real = os.path.realpath(root)
    st = os.stat(real)
    digest = sha1(os.fsencode(real) + _generation(real)).hexdigest()[:10]  # (a path in any bytes)
    return _user_dir() / f"{st.st_dev:x}-{st.st_ino:x}-{digest}"


_FS_IOC_GETVERSION = 0x80087601  # _IOR('v', 1, long)


def _generation(real: str) -> bytes:
    """The root's inode generation, where the file system keeps one (ext4, btrfs): a number drawn anew each time
    an inode is given out. A root deleted and made again at its path often gets the freed inode back (ext4), and
    with the same name then the dead incarnation's records: a fresh clone's task was 'adopted' from an attempt
    that ran in the deleted tree and marked DONE without running. b"" where there is none (the name as before).

    Only a lasting answer is taken for "none": the root not readable by this user, or a file system that keeps no
    generation. A passing failure (no descriptor left: EMFILE, ENFILE) raises instead, since it would name another
    state directory, with none of the project's locks and records, for this process alone."""
    try:
        fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM):
            return b""
        raise
    try:
        number = int.from_bytes(fcntl.ioctl(fd, _FS_IOC_GETVERSION, bytes(8))[:4], sys.byteorder)
    except OSError as exc:
        if exc.errno in _NOT_KEPT:  # not kept here (tmpfs, overlayfs, NFS): dev, inode and path must do
            return b""
        raise
    finally:
        os.close(fd)
    return b"\0%d" % number if number else b""


# What an ioctl a file system does not have fails with.
_NOT_KEPT = {errno.ENOTTY, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


def _user_dir() -> Path:
    return Path(STATE_BASE) / f"aipm-{os.getuid()}"


def user_base(base: Path | None = None) -> Path:
    """`/tmp/aipm-<uid>`, created if need be; it must be this user's alone (others could plant files in it)."""
    base = base or _user_dir()
    # (a remover at work on a loaded machine took it three times in a row in CI, then a hundred: each try is a mkdir
    # and an lstat, some 10 µs, so a thousand cost at most 10 ms where nothing stops it being taken)
    for _ in range(1000):
        try:
            os.mkdir(base, 0o700)
        except FileExistsError:
            pass
        try:
            st = os.lstat(base)
            break
        except FileNotFoundError:
            continue  # removed since the mkdir found it (a worker's `rm -rf` of it): made again
    else:  # (as the lstat said: its callers remake what a remover takes, and try again)
        raise FileNotFoundError(errno.ENOENT, f"{base} keeps being removed")
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
            note_orphans(state)
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


def note_orphans(state: Path) -> None:
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
            lock = read_text(f"/proc/{pid}/fdinfo/{fd}").partition("\nlock:")[2].split("\n", 1)[0]
            node = "" if link == top else read_text(f"/proc/{pid}/fd/{fd}")  # a lock file holds its node's name
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
            return _holding(json.loads(read_bytes(noted, STATE_FILE_MAX)))
    except FileNotFoundError:
        if make:
            if os.path.isdir(locks):
                note_orphans(state)  # removed (`rm`, an `rm -rf` that left the directories), maybe not alone
            else:  # someone may be making it again and still be noting the orphans: note them too
                make_state_dir(state)
            return orphans(state, make=False)
    except (OSError, ValueError, TypeError):  # not as written, or no file (a FIFO): any worker can write here
        if make:
            note_orphans(state)  # written again, as for a note removed
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


@lru_cache(maxsize=64)
def _places(state: Path) -> tuple[Path, str, str]:
    """The user's base directory above a state directory, its `locks/` and its ORPHANS note (checked every round)."""
    return state.parent, f"{state}/locks", f"{state}/{ORPHANS}"
