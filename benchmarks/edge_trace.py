#!/usr/bin/env python3
"""Where one edge of B2's chain goes, on both sides of the go: the kernel's own events (ftrace), not stamps in
aipm's Python, so the worker's side shows too (the wrapper's wake-up, its fork, the command's exec and exit, the
exit file, the supervisor's wake-up), and the supervisor's main thread by system call.

    python benchmarks/edge_trace.py            # B2's 500-task chain (root, tracefs; SKIP otherwise)
    BENCH_N=200 python benchmarks/edge_trace.py
    EDGE_PROGRAM=sleep TIMELINE_BENCH=b4 python benchmarks/edge_trace.py   # B4's hand-over

Each `median ms  from -> to` line is one step of an edge, from the supervisor's wake of a worker's wrapper (its
go) to the wake of the next one; the median of each step over every edge whose steps were all seen (the first
and the last are not). The tracing itself adds about a microsecond to each system call and scheduler event: the
edge is longer than in b2_chain.py, its parts are in proportion. Root only (the trace is the whole machine's), and
only on a quiet machine: another process's events are in it too.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import _common as C
import b2_chain
import b4_one_file

TRACING = "/sys/kernel/tracing"
BENCH = {"b2": (b2_chain, "B2", "2"), "b4": (b4_one_file, "B4", "5")}[os.environ.get("TIMELINE_BENCH", "b2")]
PROGRAM = os.environ.get("EDGE_PROGRAM", "touch")  # the command each task runs: its exec marks the edge
EVENTS = ["sched/sched_process_fork", "sched/sched_process_exec", "sched/sched_process_exit", "sched/sched_wakeup",
          "raw_syscalls/sys_enter", "raw_syscalls/sys_exit"]
LINE = re.compile(r"^\s*(.+?)-(\d+)\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+): (.*)$")
WAITS = {7, 23, 232, 270, 271, 281, 441}  # poll select epoll_wait pselect6 ppoll epoll_pwait epoll_pwait2
STEPS = ["go", "read", "fork", "exec", "exit", "reaped", "gone", "woke"]
NAMES = {"go": "go written (the wrapper woken)", "read": "the wrapper has its go", "fork": "it has forked",
         "exec": "the command exec'd", "exit": "the command exits", "reaped": "the wrapper has reaped it",
         "gone": "the wrapper exits (exit file written)", "woke": "the supervisor is back from its wait"}


def _set(name: str, value: str) -> None:
    with open(f"{TRACING}/{name}", "w") as handle:
        handle.write(value)


def _available() -> str | None:
    if os.geteuid() != 0:
        return "needs root (the trace is the whole machine's)"
    if not os.path.isdir(f"{TRACING}/events"):
        subprocess.run(["mount", "-t", "tracefs", "nodev", TRACING], capture_output=True)
    if not all(os.path.exists(f"{TRACING}/events/{e}/enable") for e in EVENTS):
        return f"no tracefs with these events at {TRACING}"
    return None


def trace(root, order: str, workers: str, out) -> tuple[int, int]:
    """Run the order with the events on; the trace text into `out`. (Its exit code, its pid.)"""
    _set("tracing_on", "0")
    _set("trace", "")
    _set("buffer_size_kb", "400000")
    _set("trace_clock", "mono")
    for event in EVENTS:
        _set(f"events/{event}/enable", "1")
    try:
        _set("tracing_on", "1")
        run = subprocess.Popen([*C.aipm_cmd(), "--root", str(root), "run", order, "--max-workers", workers,
                                "--no-resource-monitoring"], cwd=root, stdout=subprocess.DEVNULL)
        rc = run.wait()
        _set("tracing_on", "0")
        with open(f"{TRACING}/trace", "rb") as source:
            shutil.copyfileobj(source, out)
    finally:
        _set("tracing_on", "0")
        _set("events/enable", "0")
        _set("trace", "")
        _set("buffer_size_kb", "1408")
    return rc, run.pid


def edges(path, supervisor: int) -> tuple[dict[str, list[float]], dict[int, tuple[float, int]], int, list[float]]:
    """The steps of every edge (ms), and the supervisor main thread's system calls between its wake-up and the
    next go: number → (ms per edge, calls per edge); how many edges; and for each, how long after its go the
    wrapper began to read it (ms; negative: it was waiting for it)."""
    events, parent, execs, exits = [], {}, {}, {}
    with open(path, errors="replace") as handle:
        for line in handle:
            m = LINE.match(line)
            if not m:
                continue
            _, pid, stamp, name, rest = m.groups()
            t, pid = float(stamp) * 1e3, int(pid)
            events.append((t, pid, name, rest))
            if name == "sched_process_fork":
                parent[int(re.search(r"child_pid=(\d+)", rest).group(1))] = pid
            elif name == "sched_process_exec":
                who, program = int(re.search(r" pid=(\d+)", rest).group(1)), rest.split()[0][len("filename="):]
                execs[who] = (t, program)
            elif name == "sched_process_exit":
                exits[int(re.search(r" pid=(\d+)", rest).group(1))] = t
    by_pid = collections.defaultdict(list)
    wakes = collections.defaultdict(list)  # pid → times it was woken
    for event in events:
        by_pid[event[1]].append(event)
        if event[2] == "sched_wakeup":
            wakes[int(re.search(r" pid=(\d+)", event[3]).group(1))].append(event[0])

    def first(pid: int, after: float, test) -> float | None:
        return next((e[0] for e in by_pid[pid] if e[0] >= after and test(e)), None)

    def syscall_exit(nr: int):
        return lambda e: e[2] == "sys_exit" and e[3].startswith(f"NR {nr} ")

    rows = []
    for t, pid in sorted((t, p) for p, (t, prog) in execs.items() if os.path.basename(prog) == PROGRAM):
        wrapper = parent.get(pid)
        if supervisor not in (parent.get(wrapper), parent.get(parent.get(wrapper))):
            continue  # another process's (started by the supervisor or one of its threads, or not ours)
        enter = first(wrapper, 0, lambda e: e[2] == "sys_enter" and e[3].startswith("NR 0 (3,"))
        if enter is None:
            continue
        read = first(wrapper, enter, syscall_exit(0))
        gos = [w for w in wakes[wrapper] if read is not None and enter < w <= read]
        if not gos and read is not None:  # written before the wrapper was reading: the supervisor's write of "go\n"
            gos = [e[0] for e in by_pid[supervisor] if e[0] <= read and e[2] == "sys_enter"
                   and e[3].startswith("NR 1 (") and e[3].split(", ")[2] == "3"]
        row = {"go": gos[-1] if gos else None, "read": read, "exec": t, "exit": exits.get(pid),
               "gone": exits.get(wrapper), "ready": enter}
        row["fork"] = first(wrapper, read, syscall_exit(57)) if read is not None else None
        row["reaped"] = first(wrapper, row["exit"], syscall_exit(61)) if row["exit"] else None
        row["woke"] = first(supervisor, row["gone"], lambda e: e[2] == "sys_exit" and int(e[3].split()[1]) in WAITS) \
            if row["gone"] else None
        rows.append(row)
    steps: dict[str, list[float]] = collections.defaultdict(list)
    calls: dict[int, list[float]] = collections.defaultdict(list)
    counted = 0
    late: list[float] = []  # how long after its go the wrapper came to read it (<= 0: it was waiting)
    for a, b in zip(rows, rows[1:]):
        if None in a.values() or b["go"] is None:
            continue
        counted += 1
        for x, y in zip(STEPS, STEPS[1:]):
            steps[f"{x} -> {y}"].append(a[y] - a[x])
        late.append(a["ready"] - a["go"])
        steps["woke -> next go"].append(b["go"] - a["woke"])
        steps["edge"].append(b["go"] - a["go"])
        entered = None
        for e in by_pid[supervisor]:
            if e[0] < a["woke"]:
                continue
            if e[0] > b["go"]:
                break
            if e[2] == "sys_enter":
                entered = (int(e[3].split()[1]), e[0])
            elif e[2] == "sys_exit" and entered:
                calls[entered[0]].append(e[0] - entered[1])
                entered = None
    per_call = {nr: (sum(v) / counted, len(v) / counted) for nr, v in calls.items()} if counted else {}
    return steps, per_call, counted, late


def main() -> int:
    C.require_aipm()
    why = _available()
    if why:
        print(f"SKIP: edge_trace {why}")
        return 0
    bench, order, workers = BENCH
    work = C.temp_dir("edge")
    try:
        root = work / "order"
        bench.setup_aipm(root)
        time.sleep(2)
        with open(work / "trace.txt", "wb") as out:
            rc, supervisor = trace(root, order, workers, out)
        if rc != 0:
            print(f"aipm run exited {rc}")
            return 1
        steps, calls, counted, late = edges(work / "trace.txt", supervisor)
        print(f"{order} edges under ftrace · {bench.N} tasks · {C.machine()}")
        if not counted:
            print(f"no edge seen (EDGE_PROGRAM={PROGRAM}: the program each task runs)")
            return 1
        print(f"{counted} edges with every step seen; medians (ms):")
        for key, values in steps.items():
            what = NAMES.get(key.split(" -> ")[0], "")
            print(f"  {statistics.median(values):7.3f}  {key:<20} {what}")
        behind = [x for x in late if x > 0]
        print(f"the wrapper was still starting when its go came in {len(behind)} of {counted} edges"
              + (f" (median {statistics.median(behind):.3f} ms late)" if behind else ""))
        print("the supervisor's main thread from its wake-up to the next go, by system call (ms and calls per edge):")
        for nr, (ms, n) in sorted(calls.items(), key=lambda item: -item[1][0])[:12]:
            print(f"  {ms:7.3f}  {n:6.2f}  syscall {nr}")
        return 0
    finally:
        C.keep_or_remove(work)


if __name__ == "__main__":
    sys.exit(main())
