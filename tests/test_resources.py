"""Resource monitor: the auto-scaling bands, cgroup v2 limits from a fake directory, the AIPM_FAKE_LOAD seam,
life without psutil, real psutil readings, and `aipm resources`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import aipm.resources as resources
from aipm.errors import SettingsError
from aipm.resources import ResourceMonitor, cgroup_limits, get_system_info, recommended_workers

MiB = 2**20


@pytest.fixture(autouse=True)
def no_fake_load(monkeypatch):
    monkeypatch.delenv("AIPM_FAKE_LOAD", raising=False)


# -- the policy --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("load,expected", [
    (0, 10), (84, 10), (84.9, 10), (85, 7), (89.9, 7), (90, 5), (94.9, 5), (95, 2), (100, 2),
])
def test_bands_at_threshold_85_of_10(load, expected):
    assert recommended_workers(load, 85, 10) == expected


@pytest.mark.parametrize("max_workers,load,expected", [
    (1, 100, 1), (2, 85, 1), (3, 95, 1), (4, 90, 2), (5, 85, 3), (5, 95, 1), (8, 95, 2), (20, 90, 10),
])
def test_rounds_down_but_never_below_one(max_workers, load, expected):
    assert recommended_workers(load, 85, max_workers) == expected


def test_the_total_is_at_least_one_whatever_runs(monkeypatch):
    """The contract's "(at least 1)": a total, from which the caller subtracts the workers that run."""
    assert recommended_workers(100, 85, 3) == 1
    assert recommended_workers(100, 85, 10) == 2
    monkeypatch.setenv("AIPM_FAKE_LOAD", "100,10")
    assert ResourceMonitor(85, 85, cgroup_dir=None).get_recommended_worker_count(current_workers=2, max_workers=3) == 1


def test_other_thresholds():
    assert recommended_workers(59, 60, 8) == 8
    assert recommended_workers(60, 60, 8) == 6
    assert recommended_workers(70, 60, 8) == 2


# -- the AIPM_FAKE_LOAD seam -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fake,healthy,count", [
    ("10,10", True, 10), ("84.9,84.9", True, 10), ("85,10", False, 7), ("10,90", False, 5),
    ("95,40", False, 2), ("40,99", False, 2), ("91,96", False, 2),
])
def test_fake_load_drives_status_and_count(monkeypatch, fake, healthy, count):
    monkeypatch.setenv("AIPM_FAKE_LOAD", fake)
    monitor = ResourceMonitor(85, 85, cgroup_dir=None)
    status = monitor.get_status()
    assert (status.cpu_percent, status.memory_percent) == tuple(float(x) for x in fake.split(","))
    assert status.is_healthy is healthy and status.source == "AIPM_FAKE_LOAD"
    assert monitor.get_recommended_worker_count(0, 10) == count


def test_separate_cpu_and_memory_thresholds(monkeypatch):
    monkeypatch.setenv("AIPM_FAKE_LOAD", "60,60")
    assert ResourceMonitor(max_cpu_percent=50, max_memory_percent=95).get_recommended_worker_count(0, 8) == 2
    assert ResourceMonitor(max_cpu_percent=95, max_memory_percent=58).get_recommended_worker_count(0, 8) == 6
    assert ResourceMonitor(max_cpu_percent=95, max_memory_percent=95).get_status().is_healthy


def test_fake_load_file_is_reread_at_every_reading(monkeypatch, tmp_path):
    load = tmp_path / "load"
    load.write_text("10,20\n")
    monkeypatch.setenv("AIPM_FAKE_LOAD", str(load))
    monitor = ResourceMonitor()
    assert monitor.get_status().is_healthy
    assert monitor.get_recommended_worker_count(0, 10) == 10
    load.write_text("96,20")
    assert not monitor.get_status().is_healthy
    assert monitor.get_recommended_worker_count(0, 10) == 2
    load.write_text("30,30")
    assert monitor.get_recommended_worker_count(0, 10) == 10


@pytest.mark.parametrize("bad", ["95", "a,b", "1,2,3", "/no/such/file"])
def test_bad_fake_load_is_a_clear_error(monkeypatch, bad):
    monkeypatch.setenv("AIPM_FAKE_LOAD", bad)
    with pytest.raises(SettingsError, match="AIPM_FAKE_LOAD"):
        ResourceMonitor().get_status()


# -- cgroup v2 -------------------------------------------------------------------------------------------------------


def fake_cgroup(path: Path, cpu_max="50000 100000", memory_max=str(256 * MiB), current=128 * MiB, usage=1_000_000,
                stat: str | None = None) -> Path:
    path.mkdir(exist_ok=True)
    (path / "cpu.max").write_text(cpu_max + "\n")
    (path / "memory.max").write_text(memory_max + "\n")
    (path / "memory.current").write_text(f"{current}\n")
    (path / "cpu.stat").write_text(f"usage_usec {usage}\nuser_usec 1\nsystem_usec 2\n")
    if stat is not None:
        (path / "memory.stat").write_text(stat)
    return path


def test_cgroup_limits_are_read(tmp_path):
    cg = fake_cgroup(tmp_path)
    assert cgroup_limits(cg) == {"dir": str(cg), "cpus": 0.5, "memory_max": 256 * MiB, "memory_current": 128 * MiB}
    info = get_system_info(cg)
    assert info["usable_cpus"] == 0.5
    assert info["memory_total"] == 256 * MiB
    assert info["memory_available"] == 128 * MiB
    assert info["cgroup"]["cpus"] == 0.5
    assert info["cpu_count"] >= 1


def test_cgroup_memory_percent_is_current_over_max(tmp_path):
    cg = fake_cgroup(tmp_path)
    monitor = ResourceMonitor(cgroup_dir=cg)
    status = monitor.get_status()
    assert status.memory_percent == 50.0 and status.source == "cgroup"
    (cg / "memory.current").write_text(f"{246 * MiB}\n")  # 96 %: T+10 band
    status = monitor.get_status()
    assert status.memory_percent == pytest.approx(96.1, abs=0.05) and not status.is_healthy
    assert monitor.get_recommended_worker_count(0, 10) == 2


def test_cgroup_page_cache_is_not_counted(tmp_path):
    cg = fake_cgroup(tmp_path, current=200 * MiB, stat=f"anon 1\ninactive_file {136 * MiB}\nactive_file 5\n")
    assert ResourceMonitor(cgroup_dir=cg).get_status().memory_percent == 25.0


def test_cgroup_cpu_percent_is_usage_against_the_quota(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(resources, "_now", lambda: clock[0])
    monkeypatch.setattr(resources, "_own_cpu_seconds", lambda: 7.0)
    cg = fake_cgroup(tmp_path, usage=1_000_000)
    monitor = ResourceMonitor(max_cpu_percent=85, cgroup_dir=cg)
    # 1 s later, 0.25 CPU-seconds used of the 0.5 the quota allows: 50 %.
    clock[0] += 1.0
    (cg / "cpu.stat").write_text("usage_usec 1250000\n")
    status = monitor.get_status()
    assert status.cpu_percent == 50.0 and status.is_healthy
    # The next second the cgroup uses all of its 0.5 CPU: 100 %, whatever the host's CPUs do.
    clock[0] += 1.0
    (cg / "cpu.stat").write_text("usage_usec 1750000\n")
    status = monitor.get_status()
    assert status.cpu_percent == 100.0 and not status.is_healthy
    assert monitor.get_recommended_worker_count(0, 10) == 2


def test_own_cpu_time_is_not_load(tmp_path, monkeypatch):
    clock, own = [1000.0], [7.0]
    monkeypatch.setattr(resources, "_now", lambda: clock[0])
    monkeypatch.setattr(resources, "_own_cpu_seconds", lambda: own[0])
    cg = fake_cgroup(tmp_path, usage=1_000_000)
    monitor = ResourceMonitor(cgroup_dir=cg)
    clock[0] += 1.0
    own[0] += 0.4  # aipm itself used 0.4 of the 0.5 CPU-seconds
    (cg / "cpu.stat").write_text("usage_usec 1500000\n")
    assert monitor.get_status().cpu_percent == 20.0


def test_readings_in_quick_succession_keep_the_older_baseline(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(resources, "_now", lambda: clock[0])
    monkeypatch.setattr(resources, "_own_cpu_seconds", lambda: 0.0)
    monkeypatch.setattr(resources.os, "getloadavg", lambda: (0.5, 0.0, 0.0))
    monkeypatch.setattr(resources, "_affinity_cpus", lambda: 2)
    cg = fake_cgroup(tmp_path, usage=0)
    monitor = ResourceMonitor(cgroup_dir=cg)
    clock[0] += 0.1
    (cg / "cpu.stat").write_text("usage_usec 50000\n")
    assert monitor.get_status(wait=False).cpu_percent == 25.0  # no full window yet: the load average stands in
    clock[0] += 0.9  # measured from the primed sample, not from the reading 0.9 s ago
    assert monitor.get_status().cpu_percent == 10.0
    clock[0] += 0.01  # too soon for a new window: the last full-window reading stands
    (cg / "cpu.stat").write_text("usage_usec 60000\n")
    assert monitor.get_status().cpu_percent == 10.0


def test_a_first_reading_is_taken_over_a_full_window(tmp_path, monkeypatch):
    """A monitor read right after it was made measured the few ms since its primed sample: /proc/stat counts 10 ms
    ticks, so on a saturated machine it read 0 % (19 fresh monitors in 20) and allowed every worker. Here the
    cgroup's counter has not moved 10 ms after the prime (a too-short window reads 0 %), and then shows the
    cgroup using all of its quota: the first reading waits for the rest of the window and sees it."""
    clock = [1000.0]
    monkeypatch.setattr(resources, "_now", lambda: clock[0])
    monkeypatch.setattr(resources, "_own_cpu_seconds", lambda: 0.0)
    cg = fake_cgroup(tmp_path, usage=1_000_000)  # a quota of 0.5 CPU
    slept = []

    def sleep(seconds):  # the machine goes on saturated while we wait
        slept.append(seconds)
        clock[0] += seconds
        (cg / "cpu.stat").write_text(f"usage_usec {1_000_000 + int((clock[0] - 1000.0) * 500_000)}\n")

    monkeypatch.setattr(resources.time, "sleep", sleep)
    monitor = ResourceMonitor(85, 85, cgroup_dir=cg)
    clock[0] += 0.01
    status = monitor.get_status()
    assert slept == [pytest.approx(resources.MIN_SAMPLE_WINDOW - 0.01)]
    assert (status.cpu_percent, status.is_healthy) == (100.0, False)
    assert monitor.get_recommended_worker_count(0, 10) == 2
    assert len(slept) == 1  # once per monitor: the next readings reuse or extend that window


def test_a_first_reading_that_must_not_wait_reads_the_load_average(tmp_path, monkeypatch):
    """The launcher's reading (`run`'s loop, `launch`) never blocks: before a full window has passed, the last
    minute's load average against the usable CPUs stands in (3 runnable on 2 CPUs: saturated), not a reading
    over the few ms since the prime."""
    clock = [1000.0]
    monkeypatch.setattr(resources, "_now", lambda: clock[0])
    monkeypatch.setattr(resources, "_own_cpu_seconds", lambda: 0.0)
    monkeypatch.setattr(resources.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    monkeypatch.setattr(resources, "_affinity_cpus", lambda: 2)
    monkeypatch.setattr(resources.time, "sleep", lambda _: pytest.fail("the launcher's reading must not block"))
    cg = fake_cgroup(tmp_path, usage=1_000_000)
    monitor = ResourceMonitor(85, 85, cgroup_dir=cg)
    clock[0] += 0.01
    status = monitor.get_status(wait=False)
    assert (status.cpu_percent, status.is_healthy) == (100.0, False)
    assert monitor.recommended(status, 10) == 2
    clock[0] += resources.MIN_SAMPLE_WINDOW  # a full window now: measured from the prime, the stand-in forgotten
    (cg / "cpu.stat").write_text("usage_usec 1051000\n")
    assert monitor.get_status(wait=False).cpu_percent == 20.0


def test_the_cpu_reading_is_of_the_cpus_this_process_may_use(tmp_path, monkeypatch):
    """Pinned to CPU 0 of four (taskset, a container's cpuset), aipm read the load of all four: CPU 0 saturated
    and the other three idle read 25 %, and every worker started onto the one busy CPU they may use."""
    psutil = resources._ps()
    clock = [1000.0]
    monkeypatch.setattr(resources, "_now", lambda: clock[0])
    monkeypatch.setattr(resources, "_own_cpu_seconds", lambda: 0.0)
    monkeypatch.setattr(resources.os, "sched_getaffinity", lambda _: {0})
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "meminfo").write_text(Path("/proc/meminfo").read_text())
    monkeypatch.setattr(psutil, "PROCFS_PATH", str(proc))  # psutil's readings and aipm's: the same /proc

    def stat(busy0: int, idle: int) -> None:  # cpu0 `busy0` ticks of user time, the others idle
        lines = [f"cpu{n} {busy0 if n == 0 else 0} 0 0 {0 if n == 0 else idle} 0 0 0 0 0 0" for n in range(4)]
        (proc / "stat").write_text(f"cpu {busy0} 0 0 {3 * idle} 0 0 0 0 0 0\n" + "\n".join(lines) + "\nctxt 1\n")

    stat(1000, 1000)
    monitor = ResourceMonitor(85, 85, cgroup_dir=None)
    clock[0] += 1.0
    stat(1100, 1100)
    status = monitor.get_status()
    assert (status.cpu_percent, status.source) == (100.0, "psutil")
    assert monitor.recommended(status, 8) == 2


def test_unlimited_cgroup_falls_back_to_the_host(tmp_path):
    cg = fake_cgroup(tmp_path, cpu_max="max 100000", memory_max="max")
    assert cgroup_limits(cg) is None
    assert ResourceMonitor(cgroup_dir=cg).get_status().source == "psutil"
    assert get_system_info(cg)["cgroup"] is None


def test_the_limit_of_a_parent_cgroup_binds_a_process_below_it(tmp_path, monkeypatch):
    """A process in a child cgroup (a systemd service, a container sharing the host's cgroup namespace: its
    /proc/self/cgroup says "0::/system.slice/app.service") had only the mount root's files read, which set no
    limit: 'cgroup limits: none found', and the host's memory and CPUs counted. The limits of its own cgroup and
    of every ancestor bind it; the tightest wins, and its usage is read where it is set."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    slice_ = fake_cgroup(root / "system.slice", memory_max=str(512 * MiB), current=384 * MiB)
    (slice_ / "cgroup.controllers").write_text("cpu memory\n")
    service = fake_cgroup(slice_ / "app.service", cpu_max="max 100000", memory_max="max", current=64 * MiB)
    (service / "cgroup.controllers").write_text("cpu memory\n")
    own = tmp_path / "proc-self-cgroup"
    own.write_text("0::/system.slice/app.service\n")
    monkeypatch.setattr(resources, "PROC_SELF_CGROUP", own, raising=False)
    limits = cgroup_limits(root)
    assert (limits["cpus"], limits["memory_max"], limits["memory_current"]) == (0.5, 512 * MiB, 384 * MiB)
    assert get_system_info(root)["usable_cpus"] == 0.5
    status = ResourceMonitor(cgroup_dir=root).get_status()
    assert (status.memory_percent, status.source) == (75.0, "cgroup")
    # memory.high, below memory.max, is where the kernel starts to throttle the cgroup: the limit that counts.
    (service / "memory.high").write_text(f"{128 * MiB}\n")
    assert cgroup_limits(root)["memory_max"] == 128 * MiB
    assert ResourceMonitor(cgroup_dir=root).get_status().memory_percent == 50.0


def test_the_launchers_readings_never_sleep(monkeypatch, tmp_path):
    """`run`'s loop sleeps only in its selector and `launch` is a short command: the reading they take (wait=False)
    never blocks, a monitor's first included. Only the seed API's first reading waits for a full window."""
    def no_sleep(*_):
        raise AssertionError("the monitor must not block")

    monkeypatch.setattr(resources.time, "sleep", no_sleep)
    for cg in (None, fake_cgroup(tmp_path)):
        monitor = ResourceMonitor(cgroup_dir=cg)
        for _ in range(2):
            monitor.recommended(monitor.get_status(wait=False), 5)


# -- real readings ---------------------------------------------------------------------------------------------------


def test_real_psutil_smoke():
    monitor = ResourceMonitor()
    for _ in range(2):
        status = monitor.get_status()
        assert 0.0 <= status.cpu_percent <= 100.0
        assert 0.0 < status.memory_percent <= 100.0
        assert status.source in ("psutil", "cgroup")
        assert status.is_healthy == (status.cpu_percent < 85 and status.memory_percent < 85)
        assert 1 <= monitor.get_recommended_worker_count(0, 10) <= 10
    info = get_system_info()
    assert info["cpu_count"] >= 1 and 0 < info["usable_cpus"] <= info["cpu_count"]
    assert info["memory_total"] > 0 and 0 <= info["memory_available"] <= info["memory_total"]
    assert info["load_average"] is None or len(info["load_average"]) == 3
    assert "cgroup" in info


def test_without_psutil_launching_goes_on(tmp_path):
    code = textwrap.dedent("""
        import sys
        sys.modules["psutil"] = None  # import psutil now raises ImportError
        from aipm.resources import ResourceMonitor, get_system_info
        m = ResourceMonitor(cgroup_dir=None)
        s = m.get_status()
        assert s.is_healthy and s.source == "unavailable", s
        assert m.get_recommended_worker_count(0, 4) == 4
        ResourceMonitor(cgroup_dir=None)
        assert get_system_info(None)["cpu_count"] >= 1
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPM_")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
    warning = proc.stderr.strip().splitlines()
    assert len(warning) == 1 and "psutil" in warning[0] and "warning" in warning[0]


def test_a_reading_that_raises_is_skipped_not_fatal(monkeypatch, capsys):
    """An unreadable /proc (psutil raises) must not take a run down: the reading counts as unavailable."""
    import psutil

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(resources, "_warned_failed", False)
    monkeypatch.setattr(psutil, "cpu_times", broken)
    monkeypatch.setattr(psutil, "virtual_memory", broken)
    monitor = ResourceMonitor(cgroup_dir=None)
    status = monitor.get_status()
    assert status.source == "unavailable" and status.is_healthy
    assert monitor.get_recommended_worker_count(0, 4) == 4
    info = get_system_info(None)
    assert info["memory_total"] is None and info["cpu_count"] >= 1
    warning = capsys.readouterr().err.strip().splitlines()
    assert len(warning) == 1 and "cannot read the machine's load" in warning[0]


def test_run_goes_on_when_psutil_readings_start_to_fail(tmp_path):
    """A real `run` whose psutil readings raise from the second one on (faked in a sitecustomize) ends its order."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text(textwrap.dedent("""
        import psutil
        real, calls = psutil.cpu_times, []
        def cpu_times(*args, **kwargs):
            calls.append(1)
            if len(calls) > 1:
                raise psutil.AccessDenied()
            return real(*args, **kwargs)
        psutil.cpu_times = cpu_times
    """))
    root = tmp_path / "p"
    (root / "orders" / "O").mkdir(parents=True)
    for i in range(3):
        (root / "orders" / "O" / f"T{i}.yaml").write_text(f"command: sleep 0.2\ntarget_files: [f{i}]\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPM_")}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "run", "O", "--max-workers", "2"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "cannot read the machine's load" in proc.stderr


# -- aipm resources ------------------------------------------------------------------------------------------------


def run_resources(root: Path, *args: str, env: dict[str, str] | None = None) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIPM_")}
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "resources", "--json", *args],
                          capture_output=True, text=True, env={**clean, **(env or {})}, cwd=root, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_resources_command_smoke(tmp_path):
    data = run_resources(tmp_path)
    assert 0 <= data["cpu_percent"] <= 100 and 0 < data["memory_percent"] <= 100
    assert data["max_cpu_percent"] == 85.0 and data["max_memory_percent"] == 85.0 and data["max_workers"] == 5
    assert 1 <= data["recommended_workers"] <= 5 and isinstance(data["healthy"], bool)
    system = data["system"]
    assert system["cpu_count"] >= 1 and system["usable_cpus"] > 0 and system["memory_total"] > 0
    assert "memory_available" in system and "load_average" in system and "cgroup" in system
    table = subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), "resources"],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "CPU" in table.stdout and "may run now" in table.stdout


def test_resources_command_follows_load_and_flags(tmp_path):
    overloaded = {"AIPM_FAKE_LOAD": "95,40"}
    data = run_resources(tmp_path, "--max-workers", "10", env=overloaded)
    assert (data["cpu_percent"], data["memory_percent"], data["healthy"]) == (95.0, 40.0, False)
    assert data["recommended_workers"] == 2
    higher = run_resources(tmp_path, "--max-workers", "10", "--max-cpu", "96", env=overloaded)
    assert higher["recommended_workers"] == 10 and higher["healthy"] is True
    fixed = run_resources(tmp_path, "--max-workers", "10", "--no-auto-scaling", env=overloaded)
    assert fixed["recommended_workers"] == 10 and fixed["healthy"] is False
    off = run_resources(tmp_path, "--max-workers", "10", "--no-resource-monitoring", env=overloaded)
    assert off["recommended_workers"] == 10 and off["cpu_percent"] is None and off["monitoring"] is False
    (tmp_path / "aipm.yaml").write_text("max_workers: 4\nmax_memory_percent: 30\n")
    assert run_resources(tmp_path, env=overloaded)["recommended_workers"] == 1
