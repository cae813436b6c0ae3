"""Linux inotify through ctypes: a descriptor that becomes readable when files in a directory change.

The supervisor sleeps in one selector on worker pidfds, signals and this descriptor, so an edited or added
task file wakes it without any polling. Where inotify is missing, `DirWatch.open` returns None and callers
rescan on their periodic wake-up instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import struct

IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_DELETE = 0x200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Not IN_CREATE: a file just created is usually still empty; its IN_CLOSE_WRITE follows.
_MASK = IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_DELETE
_HEADER = struct.Struct("iIII")


class DirWatch:
    def __init__(self, fd: int):
        self.fd = fd

    @classmethod
    def open(cls, directory: str) -> "DirWatch | None":
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
            if fd < 0:
                return None
            if libc.inotify_add_watch(fd, os.fsencode(directory), _MASK) < 0:
                os.close(fd)
                return None
        except (OSError, AttributeError):
            return None
        return cls(fd)

    def changed(self) -> set[str]:
        """Names changed since the last call (non-blocking; empty when nothing happened)."""
        names: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return names
            offset = 0
            while offset < len(data):
                _, _, _, length = _HEADER.unpack_from(data, offset)
                start = offset + _HEADER.size
                names.add(data[start:start + length].rstrip(b"\0").decode(errors="replace"))
                offset = start + length

    def close(self) -> None:
        os.close(self.fd)
