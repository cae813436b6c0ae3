"""Linux inotify through ctypes: a descriptor that becomes readable when files in a directory change.

The supervisor sleeps in one selector on worker pidfds, signals and this descriptor, so an edited or added
task file wakes it without any polling. Where inotify is missing, `DirWatch.open` returns None and callers
rescan on their periodic wake-up instead.
"""

from __future__ import annotations

import ctypes
import os
import struct

IN_MODIFY = 0x002
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000  # events were dropped (the queue was full): whatever was watched may have changed
IN_IGNORED = 0x8000  # the watch is gone (its directory was deleted): always reported, never asked for
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Not IN_CREATE: a file just created is usually still empty; its IN_CLOSE_WRITE follows.
_MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE | IN_DELETE_SELF | IN_MOVE_SELF
_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED
_HEADER = struct.Struct("iIII")


class DirWatch:
    def __init__(self, fd: int, libc: ctypes.CDLL):
        self.fd = fd
        self._libc = libc
        self.dirs: dict[int, str] = {}  # watch descriptor -> directory
        # Watched directories deleted or moved away since the caller last looked: a directory made again under the
        # same name is another inode, which the old watch does not see (add() it again). "" after an overflow:
        # events were dropped, anything may have changed.
        self.lost: set[str] = set()

    @classmethod
    def open(cls, directory: str | None, mask: int = _MASK) -> "DirWatch | None":
        """A watch on `directory` (None: on nothing yet; see `add`), or None where inotify is missing."""
        try:
            # The symbols already loaded (libc among them): find_library would run `ldconfig -p` at every start.
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                return None
            watch = cls(fd, libc)
            if directory is not None and not watch.add(directory, mask):
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return watch

    def add(self, directory: str, mask: int = _MASK) -> bool:
        """Also watch `directory` (again: a no-op); False when it cannot be watched (gone, not a directory)."""
        wd = self._libc.inotify_add_watch(self.fd, os.fsencode(directory), mask)
        if wd < 0:
            return False
        self.dirs[wd] = directory
        return True

    def events(self) -> list[tuple[str, str]]:
        """(directory, name) of every event since the last call (non-blocking; empty when nothing happened). A
        watched directory's own deletion or move is not among them: it is added to `lost`."""
        out: list[tuple[str, str]] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                name = data[start:start + length].rstrip(b"\0").decode(errors="replace")
                if mask & IN_Q_OVERFLOW:
                    self.lost.add("")
                    out.append(("", ""))  # for callers that only read events: something changed
                elif mask & _GONE:
                    directory = self.dirs.pop(wd, None)
                    if directory is not None:
                        self.lost.add(directory)
                        if not mask & IN_IGNORED:  # moved away: what happens there is no longer news of this path
                            self._libc.inotify_rm_watch(self.fd, wd)
                else:
                    out.append((self.dirs.get(wd, ""), name))
                offset = start + length

    def changed(self) -> set[str]:
        """Names changed since the last call (non-blocking; empty when nothing happened)."""
        return {name for _, name in self.events()}

    def close(self) -> None:
        os.close(self.fd)


def close_at_exit(fd: int) -> None:
    """Close an inotify descriptor that this process will not need again before it exits, without waiting.

    The last close of an inotify instance waits for a kernel grace period (SRCU: 8-20 ms each here, measured),
    and a process's exit pays it for every instance still open. A child that inherits the descriptor and lives
    until we exit (it reads a pipe only we hold, so it sees end-of-file then, whatever ends us) turns our close
    into dropping a reference: the wait is paid after we are gone, by nobody who waits."""
    from aipm import posix_spawn

    if "AIPM_TASK_ID" in os.environ:
        os.close(fd)  # we are some aipm's worker: a child left behind would be a stray to its owner
        return
    if not _EXIT_PIPE:
        _EXIT_PIPE.extend(os.pipe())  # not inherited: only our exit closes the write end
    try:
        posix_spawn.spawn("/bin/sh", ["sh", "-c", "read _"], {}, [
            (os.POSIX_SPAWN_DUP2, _EXIT_PIPE[0], 0), (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0), (os.POSIX_SPAWN_DUP2, fd, 3)], setsid=True)
    except OSError:
        pass  # closed below, at the usual cost
    os.close(fd)


_EXIT_PIPE: list[int] = []  # [read end, write end], made once per process
