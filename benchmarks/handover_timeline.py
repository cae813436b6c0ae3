#!/usr/bin/env python3
"""Where one edge of a chain goes: B2's order run once with entry/exit stamps on the supervisor's hot-path
functions, and the median gap between consecutive stamps over every edge (a profile without a profiler's
inflation: each stamp costs ~1 µs).

    python benchmarks/handover_timeline.py            # a 500-task chain
    BENCH_N=200 python benchmarks/handover_timeline.py
    TIMELINE_FUNCS=aipm.writer:update_task,... python benchmarks/handover_timeline.py
    TIMELINE_BENCH=b4 python benchmarks/handover_timeline.py   # B4's order: hand-overs of one shared file

Each line is `median ms  from -> to`; a cycle runs from where the supervisor starts a round after a worker ended
(`start_early>`) to the next such start, the wake-up before it included. Only cycles with the most common sequence
of stamps count (the others: the first and last).
Reads the disk's state as it is: run it after a quiet minute (see README.md, "the floor").
"""

from __future__ import annotations

import collections
import os
import pickle
import statistics
import subprocess
import sys

import _common as C
import b2_chain
import b4_one_file

# TIMELINE_BENCH=b4: B4's order instead (its hand-over: a shared file, not a dependency)
BENCH = {"b2": (b2_chain, "B2", "2"), "b4": (b4_one_file, "B4", "5")}[os.environ.get("TIMELINE_BENCH", "b2")]

FUNCS = os.environ.get("TIMELINE_FUNCS") or ",".join([
    "aipm.handover:start_early", "aipm.supervisor:Supervisor.handle", "aipm.store:load_task",
    "aipm.recording:Recording._work_ended", "aipm.recording:Recording._drop", "aipm.writer:update_task",
    "aipm.writer:atomic_write", "aipm.launcher:Launcher.launch", "aipm.launcher:Launcher._plan_and_start",
    "aipm.plan:plan", "aipm.launcher:Launcher.start", "aipm.locks:take", "aipm.supervisor:Supervisor.begin_worker",
    "aipm.runner:Spawning.finish", "aipm.runtime:Runtime.write_record", "aipm.handover:prepare_next",
    "aipm.supervisor:Supervisor.wait",
])

# Run in the child: stamp each listed function (main thread only) as soon as its module is loaded — before any
# other module binds it by name — then run the CLI; the stamps are written at exit.
BOOT = r'''
import builtins, functools, os, pickle, sys, threading, time
log, main = [], threading.main_thread()
pending = [s.split(":") for s in os.environ["TIMELINE_FUNCS"].split(",")]
def wrap(f, key):
    @functools.wraps(f)
    def w(*a, **k):
        if threading.current_thread() is not main:
            return f(*a, **k)
        log.append((time.perf_counter_ns(), key + ">"))
        try:
            return f(*a, **k)
        finally:
            log.append((time.perf_counter_ns(), key + "<"))
    return w
def install():
    for mod, qual in list(pending):
        obj = sys.modules.get(mod)
        try:
            parts = qual.split(".")
            for p in parts[:-1]:
                obj = getattr(obj, p)
            setattr(obj, parts[-1], wrap(getattr(obj, parts[-1]), qual))
            pending.remove([mod, qual])
        except AttributeError:
            pass  # not loaded, or loading: next import
real = builtins.__import__
def hooked(*a, **k):
    r = real(*a, **k)
    if pending:
        install()
    return r
builtins.__import__ = hooked
def dump():
    with open(os.environ["TIMELINE_OUT"], "wb") as fh:
        pickle.dump(log, fh)
exit_ = os._exit
os._exit = lambda code: (dump(), exit_(code))
import atexit
atexit.register(dump)
sys.argv = ["aipm"] + sys.argv[1:]
from aipm.cli import main as run
run()
'''


def main() -> int:
    C.require_aipm()
    work = C.temp_dir("timeline")
    try:
        bench, order, workers = BENCH
        root = work / "order"
        bench.setup_aipm(root)
        out = work / "stamps.pickle"
        env = dict(os.environ, TIMELINE_FUNCS=FUNCS, TIMELINE_OUT=str(out))
        rc = subprocess.run([sys.executable, "-c", BOOT, "--root", str(root), "run", order, "--max-workers", workers,
                             "--no-resource-monitoring"], cwd=root, env=env, stdout=subprocess.DEVNULL).returncode
        if rc != 0:
            print(f"aipm run exited {rc}")
            return 1
        with open(out, "rb") as fh:
            stamps = pickle.load(fh)
        cycles, current = [], None
        for t, name in stamps:
            if name == "start_early>":
                if current:  # closed by the next round's start: the wake-up before it belongs to this cycle
                    cycles.append(current + [(t, "start_early> (next round)")])
                current = []
            if current is not None:
                current.append((t, name))
        shapes = collections.Counter(tuple(n for _, n in c) for c in cycles)
        shape, count = shapes.most_common(1)[0]
        print(f"{order} hand-over timeline · {bench.N} tasks · {C.machine()}")
        print(f"{count} of {len(cycles)} cycles have the most common sequence of stamps; medians over those (ms):")
        gaps: dict[int, list[float]] = collections.defaultdict(list)
        for c in cycles:
            if tuple(n for _, n in c) == shape:
                for i, ((t0, _), (t1, _)) in enumerate(zip(c, c[1:])):
                    gaps[i].append((t1 - t0) / 1e6)
        total = 0.0
        for i, (a, b) in enumerate(zip(shape, shape[1:])):
            median = statistics.median(gaps[i])
            total += median
            print(f"{median:7.3f}  {a} -> {b}")
        print(f"{total:7.3f}  one cycle, from a round's start to the next round's")
        return 0
    finally:
        C.keep_or_remove(work)


if __name__ == "__main__":
    sys.exit(main())
