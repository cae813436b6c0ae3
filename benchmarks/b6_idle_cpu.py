#!/usr/bin/env python3
"""B6: CPU used by `aipm run` itself while its 5 workers sleep 20 s (issue 5, item 8).

    aipm --root DIR run B6 --max-workers 5 --no-resource-monitoring     (5 tasks: sleep 20)
    parallel -N0 -j5 sleep 20 ::: 1 2 3 4 5                                (peer, measured the same way)

(-N0: pass no argument to the command; `sleep 20 3` would sleep 23 s, since GNU sleep adds its arguments.)

The measured process is the tool's own process (not its workers): psutil samples its user+sys CPU time every
50 ms and the last sample before it exits is kept; the rusage that os.wait4 returns (the process plus the
children it reaped: the worker shells and `sleep`s) is shown next to it. Figures are % of one core:

  whole run   CPU time / wall time, interpreter start-up and the final status writes included;
  idle window CPU time spent from 2 s after the start to 1 s before the sleeps end / that window's length:
              the steady state the target is about ("while 5 workers sleep").

Target: < 1 % of one core. BENCH_QUICK=1 sleeps 5 s instead of 20 s.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import _common as C

QUICK = os.environ.get("BENCH_QUICK") == "1"
SLEEP = 5 if QUICK else 20
WORKERS = 5
TARGET_PCT = 1.0
IDLE_FROM, IDLE_BEFORE_END = 2.0, 1.0


def measure(cmd: list[str], cwd, log) -> dict:
    """Run cmd; sample its own CPU time with psutil until it exits; also take wait4's rusage."""
    import psutil

    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        ps = psutil.Process(proc.pid)
        samples: list[tuple[float, float]] = []  # (seconds since start, user+sys of the process itself)
        while True:
            try:
                ct = ps.cpu_times()
                samples.append((time.perf_counter() - t0, ct.user + ct.system))
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                pass
            # wait4 with WNOHANG reaps it as soon as it has exited, leaving the last sample just before that.
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - t0
                proc.returncode = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.05)
    # Zombie samples still read the final figures; keep the last one taken.
    own = samples[-1][1] if samples else float("nan")

    def cpu_at(t: float) -> float:
        # the last sample at or before t
        best = samples[0][1]
        for when, cpu in samples:
            if when > t:
                break
            best = cpu
        return best

    lo, hi = IDLE_FROM, SLEEP - IDLE_BEFORE_END
    lo_s = next(s for s in samples if s[0] >= lo)
    hi_s = [s for s in samples if s[0] <= hi][-1]
    idle_cpu = hi_s[1] - lo_s[1]
    idle_len = hi_s[0] - lo_s[0]
    return {
        "rc": proc.returncode,
        "wall": wall,
        "own_cpu": own,
        "rusage_cpu": ru.ru_utime + ru.ru_stime,
        "startup_cpu": cpu_at(lo),
        "idle_cpu": idle_cpu,
        "idle_len": idle_len,
    }


def main() -> int:
    C.require_peers("parallel")
    C.require_aipm()
    C.require_module("psutil", "it samples CPU time: pip install psutil")
    work = C.temp_dir("b6")
    print(f"B6 · {WORKERS} x `sleep {SLEEP}` · {C.machine()}")
    try:
        root = work / "aipm"
        C.make_project(root, "B6", WORKERS)
        C.write_tasks(root / "orders" / "B6", {f"T{i}": C.task_text(f"T{i}", f"sleep {SLEEP}") for i in range(WORKERS)})
        res = {}
        res["aipm run"] = measure(C.aipm_cmd() + ["--root", str(root), "run", "B6", "--max-workers", str(WORKERS),
                                                  "--no-resource-monitoring"], root, work / "aipm.log")
        if res["aipm run"]["rc"] != 0:
            print(f"aipm run exited {res['aipm run']['rc']}:\n{C.tail(work / 'aipm.log')}")
            return 1
        st = C.statuses(root / "orders" / "B6")
        if any(s != "DONE" for s in st.values()):
            print(f"! aipm: not every task DONE: {st}")
            return 1
        res["GNU parallel"] = measure(["parallel", "--will-cite", "-N0", f"-j{WORKERS}", "sleep", str(SLEEP), ":::",
                                       *map(str, range(1, WORKERS + 1))], work, work / "parallel.log")
        rows = []
        for tool, r in res.items():
            rows.append([
                tool, f"{r['wall']:.2f}", f"{r['own_cpu'] * 1000:.0f}", f"{r['own_cpu'] / r['wall'] * 100:.2f}",
                f"{r['startup_cpu'] * 1000:.0f}",
                f"{r['idle_cpu'] * 1000:.0f} in {r['idle_len']:.1f} s", f"{r['idle_cpu'] / r['idle_len'] * 100:.3f}",
                f"{r['rusage_cpu'] * 1000:.0f}",
            ])
        print(C.table(["tool", "wall s", "own CPU ms", "% core (whole)", "CPU ms first 2 s",
                       "idle CPU ms", "% core (idle)", "wait4 ms (+children)"], rows))
        a = res["aipm run"]
        whole = a["own_cpu"] / a["wall"] * 100
        idle = a["idle_cpu"] / a["idle_len"] * 100
        for name, pct in (("whole run", whole), ("idle window", idle)):
            verdict = "ok" if pct < TARGET_PCT else f"MISS by {pct - TARGET_PCT:.2f} points"
            print(f"target aipm < {TARGET_PCT:g} % of a core, {name}: {pct:.2f} % → {verdict}")
        if QUICK:
            print("(BENCH_QUICK: 5 s sleeps; start-up weighs 4x more in the whole-run figure than with 20 s)")
        return 0
    finally:
        C.keep_or_remove(work)


if __name__ == "__main__":
    sys.exit(main())
