#!/usr/bin/env python3
"""validate_memory: peak memory of `aipm validate` and `aipm detect --json` on large orders (issue 11, item 11).

Generates orders of one-line task files (`command: "true"`) and of detect_scale's richer files (dependencies,
1-4 targets), and runs each command as a child process; its peak RSS comes from the kernel (os.wait4's
ru_maxrss). Also shown: the start-up floor (`aipm --help`) and a reference that keeps no more than it must,
libyaml's CSafeLoader loading every file into a list of dicts (what any loader of these files has to hold).

Target: < 300 MB at 100k tasks, memory proportional to the data (KB per task above the floor roughly flat).

    python benchmarks/validate_memory.py             # 10k and 100k
    BENCH_SIZES=10000 python benchmarks/validate_memory.py
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C
from detect_scale import generate

TARGET_MB = 300
REFERENCE = """
import os, sys, yaml
d = sys.argv[1]
kept = [yaml.load(open(os.path.join(d, n)).read(), Loader=yaml.CSafeLoader)
        for n in sorted(os.listdir(d)) if n.endswith(".yaml")]
"""


def peak_mb(cmd: list[str], cwd: Path) -> tuple[float, float, int]:
    """(peak RSS in MB, wall seconds, exit code) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if proc.returncode != 0:
        sys.stderr.write(err[-2000:])
    return usage.ru_maxrss / 1024, wall, proc.returncode


def one_line(root: Path, n: int) -> Path:
    odir = C.make_project(root, "SCALE", max_workers=5)
    for i in range(n):
        with open(odir / f"T{i:06d}.yaml", "w") as fh:
            fh.write('command: "true"\n')
    return odir


def main() -> int:
    C.require_aipm()
    sizes = [int(s) for s in os.environ.get("BENCH_SIZES", "10000,100000").split(",")]
    aipm = C.aipm_cmd()
    print(f"validate_memory · {C.machine()}")
    work = C.temp_dir("memory")
    rows, ok = [], True
    try:
        floor, _, _ = peak_mb(aipm + ["--help"], work)
        for kind, make in (("one-line", one_line), ("detect_scale", generate)):
            for n in sizes:
                root = work / f"{kind}-{n}"
                odir = make(root, n)
                data_mb = sum(p.stat().st_size for p in odir.iterdir()) / 2**20
                ref, _, _ = peak_mb([sys.executable, "-c", REFERENCE, str(odir)], root)
                for command in (["validate", "SCALE"], ["detect", "SCALE", "--json"]):
                    mb, wall, rc = peak_mb(aipm + ["--root", str(root), *command], root)
                    if rc != 0:
                        print(f"aipm {' '.join(command)} failed on {n} {kind} tasks (exit {rc})")
                        ok = False
                        continue
                    verdict = "-" if n < 100_000 else ("ok" if mb < TARGET_MB else f"MISS by {mb - TARGET_MB:.0f} MB")
                    rows.append([kind, f"{n:,}", f"{data_mb:.1f}", command[0], f"{mb:.0f}", f"{wall:.1f}",
                                 f"{(mb - floor) * 1024 / n:.2f}", f"{ref:.0f}", f"{mb / ref:.1f}x", verdict])
                C.keep_or_remove(root)
        print(f"aipm --help (start-up floor): {floor:.0f} MB")
        print(C.table(["files", "tasks", "data MB", "command", "peak MB", "wall s", "KB/task over floor",
                       "CSafeLoader dicts MB", "aipm/ref", f"< {TARGET_MB} MB at 100k"], rows))
    finally:
        C.keep_or_remove(work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
