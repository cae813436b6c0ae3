"""Machine load: CPU and memory readings (cgroup-aware), and the auto-scaling policy that turns them into a worker
count.

Readings come from psutil, except inside a cgroup v2 with limits (`cpu.max`, `memory.max`), where psutil would report
the host: there the cgroup's own usage against its limits is used. CPU use is measured between the previous sample
(primed when the monitor is made) and now, over at least MIN_SAMPLE_WINDOW: /proc/stat counts 10 ms ticks, and a
window of a few ms read 0 % on a saturated machine. Only a monitor's first reading may wait for its window (the seed
API's one-off reading); a caller that must not block (the launcher) reads the load average meanwhile.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aipm.capacity import Capacity
from aipm.errors import SettingsError

_PSUTIL: list = []  # [psutil or None], once imported


def _ps():
    """psutil, imported at the first reading (a run without monitoring never pays for the import); None when
    it is not installed: monitoring is optional, launching goes on unmonitored."""
    if not _PSUTIL:
        try:
            import psutil
        except ImportError:
            psutil = None
        _PSUTIL.append(psutil)
    return _PSUTIL[0]


DEFAULT_CGROUP_DIR = Path("/sys/fs/cgroup")

# Test seam: when set, AIPM_FAKE_LOAD replaces every reading. It holds "cpu,mem" (e.g. "95,40") or the path of a
# file holding that text, re-read at every reading so a test can change the load while aipm runs (write the file
# atomically: temp file + rename). Not a user setting.
FAKE_LOAD_VAR = "AIPM_FAKE_LOAD"

# CPU samples closer together than this are too noisy to become the next baseline. Until a window this long has
# passed, a reading repeats the last full-window reading; before there is one, see _cpu_percent.
MIN_SAMPLE_WINDOW = 0.5

_now = time.monotonic


def _own_cpu_seconds() -> float:
    """CPU time spent by this process itself: aipm's own work is not load that should hold workers back."""
    t = os.times()
    return t.user + t.system


def recommended_workers(load_percent: float, threshold: float, max_workers: int) -> int:
    """How many workers may run in total at this load (the higher of CPU and memory) against threshold T.

    Below T all of them; from T 75 %; from T+5 50 %; from T+10 25 %; rounded down, but at least 1, so an order
    always makes progress (while one runs, that one is all: the caller subtracts the running workers).
    """
    if load_percent < threshold:
        share = 100
    elif load_percent < threshold + 5:
        share = 75
    elif load_percent < threshold + 10:
        share = 50
    else:
        share = 25
    return max(max_workers * share // 100, 1 if max_workers > 0 else 0)


# Ramp-up, after GNU parallel's --load/--delay: a worker just started has not shown its load yet. On a machine
# already at least this busy (the higher of CPU and memory), workers start one at a time, each on a fresh reading
# taken RAMP_DELAY seconds after the previous start (longer than a CPU sample window), so auto-scaling acts on
# what the new workers do rather than on the quiet moment before a burst.
RAMP_FROM_PERCENT = 50.0
RAMP_DELAY = 1.0


def starts_now(load_percent: float, allowed: int) -> int:
    """How many of `allowed` new workers may start on this reading: all of them below RAMP_FROM_PERCENT, else one."""
    return min(allowed, 1) if load_percent >= RAMP_FROM_PERCENT else allowed


@dataclass(frozen=True)
class ResourceStatus:
    cpu_percent: float
    memory_percent: float
    is_healthy: bool  # both below their thresholds
    source: str  # "psutil", "cgroup", "AIPM_FAKE_LOAD" or "unavailable"


# -- cgroup v2 --------------------------------------------------------------------------------------------------


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _stat(path: Path, key: str) -> int | None:
    """One `key value` line of a cgroup stat file (cpu.stat, memory.stat)."""
    for line in (_read(path) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return None


PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _own_cgroup(root: Path) -> Path:
    """This process's cgroup v2 directory under the mount `root` (its "0::/path" line): a systemd service, or a
    container sharing the host's cgroup namespace, sits below the root, whose files set no limit. `root` when the
    line is missing or names no directory there (outside our namespace: "/.."; cgroup v1 only)."""
    for line in (_read(PROC_SELF_CGROUP) or "").splitlines():
        if line.startswith("0::/"):
            own = root / line[4:]
            if ".." not in Path(line[4:]).parts and os.path.isdir(own):  # (False, not an error, where unreadable)
                return own
    return root


def _tightest(cgroup_dir: Path) -> tuple[float | None, Path, int | None, Path]:
    """(cpus, the cgroup that sets them, memory limit, the cgroup that sets it): the tightest of the process's
    cgroup (below `cgroup_dir`) and its ancestors, up to the mount root, since a parent's limit binds its children.
    Memory's limit is `memory.high` where it is below `memory.max`: past it the kernel throttles and reclaims."""
    cpus = memory = None
    cpu_dir = memory_dir = here = _own_cgroup(cgroup_dir)
    while True:
        quota, _, period = (_read(here / "cpu.max") or "max").partition(" ")
        if quota.isdigit() and period.strip().isdigit() and int(period) > 0:
            if cpus is None or int(quota) / int(period) < cpus:
                cpus, cpu_dir = int(quota) / int(period), here
        for name in ("memory.max", "memory.high"):
            limit = _read(here / name) or "max"
            if limit.isdigit() and (memory is None or int(limit) < memory):
                memory, memory_dir = int(limit), here
        if not os.path.exists(here.parent / "cgroup.controllers"):  # the mount root (or outside cgroupfs, or unreadable)
            return cpus, cpu_dir, memory, memory_dir
        here = here.parent


def cgroup_limits(cgroup_dir: Path | None) -> dict[str, Any] | None:
    """The CPU and memory limits of this process's cgroup v2 under the mount `cgroup_dir` (see _tightest), or
    None when none is set."""
    if cgroup_dir is None:
        return None
    cpus, _, memory_max, memory_dir = _tightest(cgroup_dir)
    if cpus is None and memory_max is None:
        return None
    return {"dir": str(_own_cgroup(cgroup_dir)), "cpus": cpus, "memory_max": memory_max,
            "memory_current": _cgroup_memory_used(memory_dir)}


def _cgroup_memory_used(cgroup_dir: Path) -> int | None:
    """memory.current less reclaimable page cache (inactive_file), as `docker stats` and the kubelet count it."""
    current = _read(cgroup_dir / "memory.current")
    if current is None or not current.isdigit():
        return None
    return max(0, int(current) - (_stat(cgroup_dir / "memory.stat", "inactive_file") or 0))


# -- the host ---------------------------------------------------------------------------------------------------


def _affinity_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return (_ps().cpu_count() if _ps() else os.cpu_count()) or 1


def _load_average_percent() -> float | None:
    """The last minute's load average against the usable CPUs (the host's: it knows no cgroup), or None."""
    try:
        return min(100.0, os.getloadavg()[0] / _affinity_cpus() * 100)
    except OSError:
        return None


def _host_cpu_times() -> tuple[float, float]:
    """(busy, total) CPU-seconds since boot, counted the way psutil.cpu_percent counts them, over the CPUs this
    process may run on (its affinity: taskset, a container's cpuset): on a big host the other CPUs' load is not
    what its workers meet. Over all CPUs when it may use them all, or /proc/stat lists no such CPU."""
    allowed = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    per_cpu = {}  # "cpuN user nice system idle iowait irq softirq steal guest guest_nice", in clock ticks
    stat = _read(Path(getattr(_ps(), "PROCFS_PATH", "/proc")) / "stat") if allowed else None
    for line in (stat or "").splitlines():
        name, _, ticks = line.partition(" ")
        if name.startswith("cpu") and name[3:].isdigit():
            per_cpu[int(name[3:])] = [int(tick) for tick in ticks.split()]
    if allowed and allowed < per_cpu.keys():
        ticks = [per_cpu[cpu] for cpu in allowed]
        total = sum(sum(t[:8]) for t in ticks)  # guest time is already in user/nice
        idle = sum(t[3] + t[4] for t in ticks)
        hz = os.sysconf("SC_CLK_TCK")
        return (total - idle) / hz, total / hz
    t = _ps().cpu_times()
    total = sum(t) - getattr(t, "guest", 0) - getattr(t, "guest_nice", 0)  # guest time is already in user/nice
    return total - t.idle - getattr(t, "iowait", 0), total


def _fake_load() -> tuple[float, float] | None:
    value = os.environ.get(FAKE_LOAD_VAR)
    if not value:
        return None
    try:
        text = Path(value).read_text() if os.path.isfile(value) else value
        cpu, memory = (float(part) for part in text.strip().split(","))
    except (OSError, ValueError):
        raise SettingsError(f"{FAKE_LOAD_VAR}: {value!r} is not 'cpu,mem' percentages (e.g. '95,40') "
                            "nor a file holding them") from None
    return cpu, memory


_warned = False


def _warn_no_psutil() -> None:
    global _warned
    if not _warned:
        _warned = True
        print("aipm: warning: psutil is not installed; resource monitoring is off, launching goes on "
              "(pip install psutil)", file=sys.stderr)


_warned_failed = False


def _safely(read):
    """read(), or None when the reading raises (an unreadable /proc, psutil.AccessDenied in a sandbox).

    Monitoring is optional: a reading that fails is skipped, as without psutil, and launching goes on; it must
    never take `run` down with its workers running."""
    global _warned_failed
    try:
        return read()
    except Exception as exc:  # noqa: BLE001 - psutil raises OSError, psutil.Error and, on odd /proc, ValueError
        if not _warned_failed:
            _warned_failed = True
            print(f"aipm: warning: cannot read the machine's load ({type(exc).__name__}: {exc}); "
                  "launching goes on without it while readings fail", file=sys.stderr)
        return None


class ResourceMonitor:
    """CPU and memory readings against thresholds, and the worker count they allow."""

    def __init__(self, max_cpu_percent: float = 85.0, max_memory_percent: float = 85.0,
                 cgroup_dir: Path | None = DEFAULT_CGROUP_DIR):
        self.max_cpu_percent = max_cpu_percent
        self.max_memory_percent = max_memory_percent
        self.cgroup_dir = cgroup_dir
        if _ps() is None:
            _warn_no_psutil()
        # A cgroup limit wins when it is tighter than what the host offers; the cgroup that sets it is read.
        cpus, self._cpu_dir, memory_max, self._memory_dir = _tightest(cgroup_dir) if cgroup_dir else (None,) * 4
        usage = _stat(self._cpu_dir / "cpu.stat", "usage_usec") if cgroup_dir else None
        self._cgroup_cpus = cpus if cpus is not None and cpus < _affinity_cpus() and usage is not None else None
        host_memory = _safely(lambda: _ps().virtual_memory().total) if _ps() else None
        self._cgroup_memory = memory_max if memory_max and (host_memory is None or memory_max < host_memory) else None
        self._base = self._cpu_sample()  # primed: the first reading measures from here, without waiting
        self._last_cpu: float | None = None  # the last reading over a full sample window

    def _cpu_sample(self) -> tuple[float, float, float, float] | None:
        """(busy CPU-seconds, capacity CPU-seconds, this process's CPU-seconds, wall clock), or None."""
        if self._cgroup_cpus is not None:
            usage = _stat(self._cpu_dir / "cpu.stat", "usage_usec")
            if usage is None:
                return None
            now = _now()
            return usage / 1e6, now * self._cgroup_cpus, _own_cpu_seconds(), now
        times = _safely(_host_cpu_times) if _ps() else None
        return None if times is None else (*times, _own_cpu_seconds(), _now())

    def _cpu_percent(self, wait: bool) -> float | None:
        """CPU use over at least MIN_SAMPLE_WINDOW. Before the first such window has passed: with `wait`, the rest
        of it is waited for (once per monitor); without, the load average stands in, never becoming a baseline."""
        sample, base = self._cpu_sample(), self._base
        if sample is None or base is None:
            self._base = sample
            return None
        early = MIN_SAMPLE_WINDOW - (sample[3] - base[3])
        if early > 0:
            if self._last_cpu is not None:
                return self._last_cpu
            if not wait:
                return _load_average_percent()
            time.sleep(early)
            sample = self._cpu_sample()
            if sample is None:
                return None
        busy, capacity, own, _ = (now - then for now, then in zip(sample, base))
        percent = min(100.0, max(0.0, (busy - own) / capacity * 100)) if capacity > 0 else 0.0
        self._base, self._last_cpu = sample, percent
        return percent

    def _memory_percent(self) -> float | None:
        if self._cgroup_memory is not None:
            used = _cgroup_memory_used(self._memory_dir)
            if used is not None:
                return min(100.0, used / self._cgroup_memory * 100)
        return _safely(lambda: _ps().virtual_memory().percent) if _ps() else None

    def _source(self) -> str:
        if self._cgroup_cpus is not None or self._cgroup_memory is not None:
            return "cgroup"
        return "psutil" if _ps() else "unavailable"

    def get_status(self, wait: bool = True) -> ResourceStatus:
        """The current reading. A monitor's first one waits until its CPU sample window has passed (at most
        MIN_SAMPLE_WINDOW after it was made); with `wait` False it never blocks (see _cpu_percent)."""
        fake = _fake_load()
        if fake is not None:
            cpu, memory = fake
            source = FAKE_LOAD_VAR
        else:
            cpu, memory, source = self._cpu_percent(wait), self._memory_percent(), self._source()
            if cpu is None or memory is None:
                source = "unavailable"  # what could be read is shown; what could not counts as idle
                cpu, memory = cpu or 0.0, memory or 0.0
        healthy = cpu < self.max_cpu_percent and memory < self.max_memory_percent
        return ResourceStatus(round(cpu, 1), round(memory, 1), healthy, source)

    def get_recommended_worker_count(self, current_workers: int = 0, max_workers: int = 10) -> int:
        """How many workers may run in total now (the caller subtracts those already running; `current_workers`
        is the seed API's and does not change the total)."""
        return self.recommended(self.get_status(), max_workers)

    def recommended(self, status: ResourceStatus, max_workers: int) -> int:
        """get_recommended_worker_count for a reading already taken."""
        return min(recommended_workers(status.cpu_percent, self.max_cpu_percent, max_workers),
                   recommended_workers(status.memory_percent, self.max_memory_percent, max_workers))


def machine_capacity() -> Capacity:
    """What this machine has for tasks that declare `resources:` (capacity.py): its usable CPUs, its memory in MB."""
    info = get_system_info()
    memory = info["memory_total"]
    return Capacity(info["usable_cpus"], memory // (1024 * 1024) if memory is not None else None)


def get_system_info(cgroup_dir: Path | None = DEFAULT_CGROUP_DIR) -> dict[str, Any]:
    """CPU count, usable CPUs (affinity and cgroup quota), memory total/available, load average, cgroup limits."""
    limits = cgroup_limits(cgroup_dir)
    usable: float = _affinity_cpus()
    if limits and limits["cpus"] is not None:
        usable = min(usable, limits["cpus"])
    total = available = None
    memory = _safely(_ps().virtual_memory) if _ps() else None
    if memory is not None:
        total, available = memory.total, memory.available
    if limits and limits["memory_max"] is not None and (total is None or limits["memory_max"] < total):
        total = limits["memory_max"]
        used = limits["memory_current"] or 0
        available = max(0, total - used) if available is None else min(available, max(0, total - used))
    try:
        load = [round(x, 2) for x in (_ps().getloadavg() if _ps() else os.getloadavg())]
    except (OSError, AttributeError):
        load = None
    return {
        "cpu_count": (_safely(_ps().cpu_count) if _ps() else None) or os.cpu_count() or 1,
        "usable_cpus": usable,
        "memory_total": total,
        "memory_available": available,
        "load_average": load,
        "cgroup": limits,
    }
