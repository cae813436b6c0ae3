"""The files of an attempt in `.aipm/` that its worker can reach (logs, review logs, usage, feedback): the worker
may have replaced any of them, and open() of a FIFO it left waits for a peer that never comes (an owner stuck for
ever, the launch lock held). They are opened without blocking or following a link; what is not a regular file is
refused (OSError), and aipm's own files are written beside and renamed over whatever is there."""

from __future__ import annotations

import errno
import os
import re
import stat
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

# Flags for a log a child is given: a FIFO in its place fails the spawn (ENXIO) where it held spawner and child.
NO_WAIT = os.O_NONBLOCK | os.O_NOFOLLOW
# The most aipm reads of a state file of its own (the lock list, the note of held removed locks, the holds index, the
# written log, review feedback): a worker's sparse file of a terabyte under the name was read whole, a MemoryError.
# Far above what aipm writes there.
STATE_FILE_MAX = 16 << 20


def open_regular(path: str | os.PathLike, flags: int = os.O_RDONLY, mode: int = 0o666) -> int:
    return open_checked(path, flags, mode)[0]


def open_checked(path: str | os.PathLike, flags: int = os.O_RDONLY,
                 mode: int = 0o666) -> tuple[int, os.stat_result]:
    """open_regular(), and the file's status as opened."""
    fd = os.open(path, flags | NO_WAIT | os.O_CLOEXEC, mode)
    try:
        info = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file (its worker replaced it)", str(path))
    if flags & (os.O_WRONLY | os.O_RDWR) and info.st_nlink > 1:
        # A worker's `ln ~/notes .aipm/logs/ORD/T.1.log`: our lines would land in its file outside the project.
        os.close(fd)
        raise OSError(errno.EINVAL, "a hard link to another file (its worker made it)", str(path))
    return fd, info


def reading(path: str | os.PathLike) -> BinaryIO:
    return open(path, "rb", opener=lambda name, _: open_regular(name))  # named by its path, as open()'s are


def read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """The whole file, through one descriptor (a buffered file object costs four more system calls a read; the
    hot path reads a few small files on each hand-over). Longer than `limit`: OSError, and not read."""
    return read_checked(path, limit)[0]


def read_checked(path: str | os.PathLike, limit: int | None = None) -> tuple[bytes, os.stat_result]:
    """read_bytes(), and the file's status as opened."""
    fd, info = open_checked(path)
    try:
        _within(path, info.st_size, limit)
        data = chunk = os.read(fd, info.st_size + 1)
        while chunk:
            _within(path, len(data), limit)  # grown since its fstat
            chunk = os.read(fd, 1 << 20)
            data += chunk
        return data, info
    finally:
        os.close(fd)


def _within(path: str | os.PathLike, size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise OSError(errno.EFBIG, f"over {limit} bytes (its worker made it)", str(path))


# The most read of a small file of git's: `.git` of a worktree ("gitdir: <path>"), `commondir`, a worktree note's
# `gitdir`, HEAD, a ref. Each is a line; a path is at most PATH_MAX (4 KiB) bytes.
GIT_FILE_MAX = 64 << 10


def read_git_file(path: str | os.PathLike) -> str:
    """The text of a small file of git's that a worker can rewrite (its worktree's `.git`, the `commondir` or
    `gitdir` of its worktree's note, HEAD), stripped. OSError when it is no regular file (a FIFO: never waited
    for), over GIT_FILE_MAX (a sparse terabyte: never read whole) or holds a NUL byte (a sparse file's zeros
    after a path: no path git wrote, and one that os calls refuse with ValueError, not OSError)."""
    data = read_bytes(path, GIT_FILE_MAX)
    if b"\0" in data:
        raise OSError(errno.EINVAL, "a NUL byte in it (not git's)", str(path))
    return data.decode("utf-8", "surrogateescape").strip()


def read_end(path: str | os.PathLike, limit: int) -> bytes:
    """At most the last `limit` bytes of a regular file: a worker's sparse file of gigabytes under the name (a
    review's log, made before its reviewer appended to it) is not read whole into memory."""
    return read_since(path, 0, limit)[0]


def read_ends(path: str | os.PathLike, head: int, tail: int, start: int = 0) -> tuple[bytes, int, bytes]:
    """The first `head` and the last `tail` bytes of a regular file from `start`, and how many lie between them (0:
    the rest is whole in the first part): what lies between (a reviewer's megabytes, a sparse gigabyte) is never
    read."""
    with reading(path) as handle:
        size = os.fstat(handle.fileno()).st_size - start
        handle.seek(max(0, start))
        if size <= head + tail:
            return handle.read(head + tail), 0, b""
        first = handle.read(head)
        handle.seek(start + size - tail)
        return first, size - head - tail, handle.read(tail)


def read_since(path: str | os.PathLike, start: int, limit: int) -> tuple[bytes, int]:
    """read_end of what follows `start` in the file, and the offset it ends at."""
    with reading(path) as handle:
        handle.seek(max(start, os.fstat(handle.fileno()).st_size - limit))
        data = handle.read(limit)
        return data, handle.tell()


def reason_path(exit_file: str) -> str:
    """Where aipm's own process in an attempt (confine's, the Ray driver) says why it ended the attempt, beside the
    exit file in the state directory: out of a confined command's reach, and not the log, where a command's own
    `[aipm] ...` line and its exit 126 or 75 became aipm's reason for its failure."""
    return exit_file + ".why"


def note_reason(exit_file: str, why: str) -> None:
    """The reason for reason(); none where the state directory cannot be written (the reason is then the exit
    code)."""
    try:
        write_bytes(Path(reason_path(exit_file)), why.encode(errors="surrogateescape"))
    except OSError:
        pass


def reason(exit_file: str) -> str | None:
    """Why aipm's own process ended the attempt (note_reason), or None when it did not."""
    try:
        return read_end(reason_path(exit_file), 4096).decode("utf-8", "replace").strip() or None
    except OSError:
        return None


def write_bytes(path: Path, data: bytes) -> None:
    write_stream(path, lambda handle: handle.write(data))


def write_stream(path: Path, fill: Callable[[BinaryIO], object]) -> None:
    """write_bytes of what `fill(handle)` writes, which need not be in memory whole (a patch of a large file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        # Made new (O_EXCL): a hard link a worker left under the name would be truncated by the open itself.
        tmp.unlink(missing_ok=True)
        with os.fdopen(open_regular(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL), "wb") as handle:
            fill(handle)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


_LOGGED_CODE = re.compile(rb"aipm-wrapper: .*exit file not written; exit code (\d{1,3})\n\Z")


def exit_code_in_log(log: str) -> int | None:
    """The exit code a wrapper put at the end of the log when its exit file's directory was gone (a command that
    removed aipm's state directory as its last act): None unless that line is the log's last."""
    try:
        match = _LOGGED_CODE.search(read_end(log, 512))
    except OSError:
        return None
    return int(match.group(1)) if match else None


GITIGNORE = "# aipm runtime state: never version-controlled\n*\n"


def made_dir(top: Path, path: Path) -> Path:
    """`path` under `top` (`<root>/.aipm/`), after making sure its directory (and `top/.gitignore`) exist. No
    cache: a worker may delete `.aipm/` at any moment; when the directory is there, this is one mkdir and one
    lstat."""
    try:
        os.mkdir(path.parent)
    except FileExistsError:
        try:
            if stat.S_ISDIR(os.lstat(path.parent).st_mode):
                return path
            _clear_way(top, path.parent)
        except FileNotFoundError:
            pass  # removed since the mkdir (a worker's `git clean -fdx` right now): made again below
    except FileNotFoundError:
        pass  # a level above is gone (a `git clean`): make them all, and the .gitignore
    except NotADirectoryError:
        _clear_way(top, path.parent)
    for _ in range(3):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            ignore = top / ".gitignore"
            if not ignore.is_file() or ignore.is_symlink():
                write_bytes(ignore, GITIGNORE.encode())  # renamed over a link a worker left: never written through
            break
        except FileNotFoundError:
            continue  # a worker is deleting .aipm/ right now: make it again
        except (FileExistsError, NotADirectoryError):
            _clear_way(top, path.parent)  # a link to nothing at `.aipm`, or a file made meanwhile
    return path


def _clear_way(top: Path, directory: Path) -> None:
    """A file or symbolic link a worker left where one of aipm's directories goes (`.aipm`, `.aipm/logs/ORD`):
    moved aside, kept under a name that says why, so the directory can be made again. A link to a directory
    stays where it is aipm's own (`.aipm` itself, a person's choice of where it lives) or leads out of the
    project's files (`.aipm/logs` on another disk): see kept_link."""
    for place in [*reversed(directory.relative_to(top).parents), directory.relative_to(top)]:
        path = top / place
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return  # made below: nothing else stands in the way
        if stat.S_ISLNK(mode) and (path == top and os.path.isdir(path) or kept_link(str(path))):
            continue
        if not stat.S_ISDIR(mode):
            with suppress(FileNotFoundError):
                os.rename(path, f"{path}.not-a-directory.{time.time_ns()}")
            return


def _runtime_dir(path: str) -> str | None:
    """`<root>/.aipm` of a path below it (the last `.aipm` in it), or None."""
    parts = path.split(os.sep)
    return os.sep.join(parts[:len(parts) - parts[::-1].index(".aipm")]) if ".aipm" in parts else None


def kept_link(path: str) -> bool:
    """A link at `path`, a directory below `<root>/.aipm/`, that aipm writes through: it leads inside `.aipm/`, or
    it is the logs' (`.aipm/logs` or an order's below it) and leads outside the project's files (another disk).
    One into the project's files (a worker's link of `.aipm/logs/ORD` to `src/`) would have aipm write there;
    the feedback's, resume's or notify log's to a directory outside (`.aipm/feedback/ORD -> ~`) had aipm replace
    and remove files of its names there (`~/T.txt` of a task T approved): they hold no logs, so no disk of their
    own."""
    runtime = _runtime_dir(path)
    if runtime is None or not os.path.isdir(path):
        return False
    top = os.path.dirname(runtime)
    real, root = os.path.realpath(path), os.path.realpath(top)
    if real.startswith(os.path.realpath(runtime) + os.sep):
        return True
    return path[len(runtime):].split(os.sep)[1:2] == ["logs"] and not real.startswith(root + os.sep)


def unlink_hard_link(path: str) -> None:
    """A file aipm is about to have a process append to (a review's log) that a worker made a hard link to a file
    of its own: the name is taken back (their file keeps what it has), so the open creates a file of ours."""
    try:
        if os.lstat(path).st_nlink > 1:
            os.unlink(path)
    except OSError:
        pass


def append_log(log: str, line: str) -> None:
    """aipm's line at the end of an attempt's log, its directory made again if a worker's `rm -rf .aipm` took it;
    none when the worker replaced its log with what is not a file, or its directory with a link (the outcome is
    in the task file anyway, and `aipm logs` says the log is unusable); the line would land where the link leads,
    in the project tree."""
    try:
        directory = os.path.dirname(log)
        try:
            mode = os.lstat(directory).st_mode
        except FileNotFoundError:
            runtime = _runtime_dir(log)
            if runtime is None:
                return
            mode = os.lstat(made_dir(Path(runtime), Path(log)).parent).st_mode
        if not stat.S_ISDIR(mode) and not kept_link(directory):
            return
        fd, info = open_checked(log, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW)
    except OSError:
        return
    try:
        append_line(fd, info.st_size, f"[aipm {time.strftime('%H:%M:%S')}] {line}\n")
    except OSError:
        pass
    finally:
        os.close(fd)


def append_line(fd: int, size: int, line: str) -> None:
    """aipm's `line` at the end of the file open (read and append) at `fd`, `size` bytes long when opened, on a
    line of its own: a command's last output without a newline (`printf "progress 50"`) ran on into it. One
    pread of the last byte: never a read of the file."""
    start = b"\n" if size and os.pread(fd, 1, size - 1) != b"\n" else b""
    # A path git gave us may hold bytes that are not UTF-8 (decoded as surrogates): written back as they were.
    os.write(fd, start + line.encode(errors="surrogateescape"))
