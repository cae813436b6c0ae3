"""Whether a recorded process is still the one that was recorded: alive, not a zombie, and started when the
record says (a pid can be reused), read from /proc (psutil off Linux).

Within one hold of the launch lock (`remembered()`), a process found dead is not looked up again: it stays dead.
One found alive may end meanwhile; counting it until the next round is the safe side (a slot taken, a file
held), and its end wakes its owner, whose next round looks again.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Seen(threading.local):
    alive: dict[tuple[int, float], bool] | None = None  # (pid, start time) → alive, in this thread's hold


_seen = _Seen()


@contextmanager
def remembered() -> Iterator[None]:
    """Look each (pid, start time) up once inside this block (the launch lock's hold)."""
    _seen.alive = {}
    try:
        yield
    finally:
        _seen.alive = None


def process_alive(pid: int, ctime: float) -> bool:
    """A pid is our process only if it exists, is not a zombie, and started when we recorded (PID reuse)."""
    seen = _seen.alive
    if seen is None:
        return _process_alive(pid, ctime)
    alive = seen.get((pid, ctime))
    if alive is None:
        alive = seen[(pid, ctime)] = _process_alive(pid, ctime)
    return alive


def _process_alive(pid: int, ctime: float) -> bool:
    if pid == os.getpid():  # ourselves (the owner of our records): reading /proc/self/stat can take ms
        return same_start(_own_ctime(), ctime)
    stat = _proc_stat(pid)
    if stat is not None:  # Linux fast path: one read of /proc/<pid>/stat
        state, started = stat
        return state not in "ZX" and (same_start(started, ctime) or _started_so_before(started, ctime))
    import psutil  # off Linux only

    try:
        proc = psutil.Process(pid)
        return same_start(proc.create_time(), ctime) and proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def led_by_another(pid: int, ctime: float) -> bool:
    """A process other than the one that started at `ctime` has the number `pid` now (zombies included)."""
    stat = _proc_stat(pid)
    return stat is not None and not same_start(stat[1], ctime) and not _started_so_before(stat[1], ctime)


def same_start(started: float, recorded: float) -> bool:
    """A start time is the recorded one to within the 1/100 s a record keeps (a pid alone can be reused)."""
    return round(started, 2) == round(recorded, 2)


_SELF: list[tuple[int, float]] = []  # (pid, start time) of this process, read once (a fork reads its own)


def _own_ctime() -> float:
    if not _SELF or _SELF[0][0] != os.getpid():
        _SELF[:] = [(os.getpid(), process_ctime(os.getpid()))]
    return _SELF[0][1]


def process_ctime(pid: int) -> float:
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[1]
    import psutil  # off Linux only

    return psutil.Process(pid).create_time()


_BOOT: list[float] = []
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_HAVE_PROC = os.path.exists("/proc/self/stat")


def spawned_ctime(pid: int, before_ns: int, after_ns: int) -> float:
    """process_ctime() of a child spawned between two CLOCK_BOOTTIME readings, without reading /proc.

    The kernel stamps a new process's start on CLOCK_BOOTTIME and /proc shows it in whole clock ticks, so a spawn
    that began and returned within one tick started in that tick. Reading /proc/<pid>/stat of a child that is still
    loading its program waits for it (~0.5 ms per task on a busy machine); a spawn that straddled a tick is read."""
    tick = 10**9 // _TICKS
    if not _HAVE_PROC or before_ns // tick != after_ns // tick:
        return process_ctime(pid)
    if not _BOOT:
        _BOOT.append(_boot_time())
    return _BOOT[0] + (before_ns // tick) / _TICKS


def _proc_stat(pid: int) -> tuple[str, float] | None:
    """(state, start time) from /proc, computed the way psutil computes create_time; None off Linux."""
    if not _HAVE_PROC:
        return None
    try:
        fields = stat_fields(pid)
    except FileNotFoundError:
        return ("X", 0.0)
    except OSError:
        return None
    return fields[0].decode(), _start_time(fields)


def stat_fields(pid: int) -> list[bytes]:
    """/proc/<pid>/stat's fields after the process's name (which may hold spaces and parentheses)."""
    data = read_proc(f"/proc/{pid}/stat")
    return data[data.rfind(b")") + 2:].split()


def _start_time(fields: list[bytes]) -> float:
    """The start time in /proc/<pid>/stat's fields after the name, as psutil computes create_time."""
    if not _BOOT:
        _BOOT.append(_boot_time())
    return _BOOT[0] + int(fields[19]) / _TICKS


def ancestors() -> dict[int, float]:
    """pid → start time of every process above this one: its parent, the parent's parent, and so on."""
    if not _HAVE_PROC:
        import psutil  # off Linux only

        return {p.pid: p.create_time() for p in psutil.Process().parents()}
    found: dict[int, float] = {}
    pid = os.getppid()
    while pid > 1 and pid not in found:
        try:
            fields = stat_fields(pid)
        except OSError:
            break  # it ended meanwhile: what is above it is no longer above us
        found[pid] = _start_time(fields)
        pid = int(fields[1])
    return found


def stopped(pid: int) -> bool:
    """The process is stopped (Ctrl-Z, SIGSTOP; or by a debugger): it does nothing until it is let go on."""
    try:
        return stat_fields(pid)[0] in (b"T", b"t")
    except OSError:
        return False


# Seconds a wait for another process lasts before it looks whether that one is stopped: it may only be busy (a round
# holds the launch lock for milliseconds, an owner records an end as quickly), or stopped but for a moment.
LOOK_AFTER = 2.0


def how_to_go_on(pid: int) -> str:
    """Said of a stopped process that something waits for."""
    return f"which is stopped (Ctrl-Z or SIGSTOP): `fg` in its terminal, or `kill -CONT {pid}`, lets it go on"


def asleep_in_wait(pid: int) -> bytes | None:
    """While the process sleeps in wait() for a child (a shell running a command in the foreground) or in
    sigsuspend() (dash's `wait`), a token that stays the same as long as it sleeps on (its context switches: a
    sleeping process makes none); else None, also where /proc cannot tell. Two equal tokens: it did not run in
    between, so it started no process and reaped none."""
    try:
        sleeping = stat_fields(pid)[0] == b"S"
        where = read_small(f"/proc/{pid}/wchan")
        status = read_small(f"/proc/{pid}/status")
    except OSError:
        return None
    if not sleeping or not where.startswith((b"do_wait", b"sigsuspend")):
        return None
    return b"".join(line for line in status.splitlines() if b"ctxt_switches:" in line)


SMALL = 1 << 22  # more than any record or /proc file read here holds


_PROC_CHUNK = 65536


def read_proc(path: str) -> bytes:
    """A /proc file's bytes: read_small without its check of the file's kind (the kernel's own, which no worker can
    replace) and without the read that only finds the end (a file the kernel makes line by line fills a read but for
    less than a line of room when there is more: these lines are short). Three system calls instead of five: the
    hot path reads one per thread of ours for each worker that ends (subreaper.children)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        data = chunk = os.read(fd, _PROC_CHUNK)
        while len(chunk) > _PROC_CHUNK - 4096:
            if len(data) > SMALL:
                raise OSError(errno.EFBIG, "not a small file", path)
            chunk = os.read(fd, _PROC_CHUNK)
            data += chunk
        return data
    finally:
        os.close(fd)


def read_small(path: str) -> bytes:
    """A small file's bytes through one descriptor (no buffered file object: the hot path reads many). A worker can
    write the state directory: only a regular file is read (a link to /dev/zero, a FIFO, or a sparse file of
    gigabytes at a record had every command of the project read for ever, or wait for ever); OSError otherwise."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOFOLLOW)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > SMALL:
            raise OSError(errno.EINVAL, "not a small regular file", path)
        data = chunk = os.read(fd, 65536)
        while chunk:
            if len(data) > SMALL:  # (a /proc file says size 0)
                raise OSError(errno.EFBIG, "not a small file", path)
            chunk = os.read(fd, 65536)
            data += chunk
        return data
    finally:
        os.close(fd)

def _boot_time() -> float:
    """What a start time counts from on Linux: a number of this boot's own (from its boot_id), which no clock
    change moves. The `btime` of /proc/stat (psutil's base) is the wall clock now minus the time since boot, so a
    step of the clock (NTP, a VM resumed, `date -s`) moved every start time read after it: commands started then
    took live workers and their owners for reused pids, and recovery ended them and ran their tasks again."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            boot = float(int(handle.read(8), 16))  # below 2**32: a 1/100 s still shows in a float
    except (OSError, ValueError):
        return _btime()
    return boot - _boottime_offset()


def _boottime_offset() -> float:
    """This process's time namespace's shift of the boot clock (`unshare --boottime`, a CRIU restore): /proc shows
    start times shifted by it (as btime, so the two sums agreed), where a boot_id is the same in every namespace."""
    try:
        with open("/proc/self/timens_offsets", "rb") as handle:
            for line in handle:
                name, seconds, nanoseconds = line.split()
                if name == b"boottime":
                    return int(seconds) + int(nanoseconds) / 1e9
    except (OSError, ValueError):
        pass  # no time namespaces (Linux before 5.6)
    return 0.0


def _btime() -> float:
    """The `btime` line of /proc/stat, as psutil.boot_time() reads it on Linux (without importing psutil)."""
    if not _BTIME:
        with open("/proc/stat", "rb") as handle:
            _BTIME.extend(float(line.split()[1]) for line in handle if line.startswith(b"btime"))
    return _BTIME[0]


_BTIME: list[float] = []


def _started_so_before(started: float, recorded: float) -> bool:
    """`recorded` is the start read as `started` (on _boot_time()'s base), in the wall-clock form that aipm before
    the boot_id base wrote (psutil's): a record of a run begun before an upgrade, so its live workers are not
    taken for dead. Only while the clock was not stepped since, as then."""
    base = _BOOT[0] if _BOOT else _boot_time()  # (read once: this is every dead or reused pid's check)
    return same_start(started - base + _btime(), recorded)
