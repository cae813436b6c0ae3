#!/usr/bin/env python3
"""Two revisions of aipm on one benchmark's order, in interleaved pairs: which one does less work per run.

    python benchmarks/ab.py REV_A REV_B               # B2's chain, 12 pairs
    python benchmarks/ab.py HEAD~3 HEAD --bench b1 --pairs 8
    python benchmarks/ab.py HEAD~3 HEAD --bench detect10k-cold   # `detect --json` on detect_scale's order

Each revision's `aipm/` is taken out of git (`git archive`) into a temporary directory and compiled, and every
run starts the same interpreter on it (PYTHONPATH) in a fresh project, the revisions alternating (which goes
first alternates too). A run reports two figures from inside its own process, at its exit: the CPU time of the
aipm process itself (user + system over all its threads, RUSAGE_SELF: not its workers' commands) and the wall
time from its first line of Python to its exit. On a shared or drifting machine the CPU time moves less than
the wall time, and pairs taken minutes apart drift alike, so the verdict is the medians and how many pairs
each revision won. Reads the disk as it is: after big deletions on ext4 without a journal, wait a minute
(README.md, "the floor"). The projects are kept until the end, then removed (BENCH_KEEP=1 keeps them).

`--tmpfs` (root, Linux: `unshare`) runs the pairs in a mount namespace of their own with a tmpfs on /tmp, where
the projects, the state directory and the checkouts then live: no fsync waits and no inode scans after deletions,
so what is left is the CPU aipm spends itself (not the figures of the targets, which are the disk's too). On the
same code twice, 8 pairs of B2 differed by 1.3 % in CPU there, against 11 % (4 of 4 pairs) on the ext4 disk; but an
hour later a change of 0.2 % came out at 4 % and 7 %, the machine's own speed moving between a pair's runs
(README.md, 2026-12-08): time a small change alone as well.

The detect benches time `aipm detect ORDER --json` on one order of detect_scale.py's, made once and read by both
revisions: warm (each run's own revision writes the parse cache first, with `validate`, untimed) or cold (the
cache removed first; the CPU figure leaves out the forked reader that parses half the files, the wall has it). Every process runs from the project's directory: `python -m aipm` or `-c` run from the
repository would import the working tree's `aipm/` ahead of PYTHONPATH (sys.path[0]), and both sides would be one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common as C
import b1_independent
import b2_chain
import b4_one_file
import detect_scale

# benchmark → (module with setup_aipm, order id, --max-workers)
BENCHES = {"b1": (b1_independent, "B1", 2), "b2": (b2_chain, "B2", 2), "b4": (b4_one_file, "B4", 5)}
# detect bench → (tasks, warm: its parse cache written first)
DETECTS = {f"detect{k}k{'' if warm else '-cold'}": (k * 1000, warm) for k in (10, 100) for warm in (True, False)}

# Run inside the measured process: aipm's own main, and its figures written where os._exit ends it (a `run`
# leaves through os._exit, skipping the interpreter's teardown).
PROBE = """
import os, resource, sys, time
start = time.perf_counter()
out, argv = sys.argv[1], sys.argv[2:]
leave = os._exit
me = os.getpid()
def _exit(code):
    if os.getpid() == me:  # (a cold load's forked reader leaves through os._exit too: no run of its own)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open(out, "a") as handle:
            handle.write(f"{usage.ru_utime + usage.ru_stime} {time.perf_counter() - start} {code}\\n")
    leave(code)
os._exit = _exit
from aipm.cli import main
main(argv)
_exit(0)
"""


def checkout(rev: str, into: Path) -> Path:
    """`aipm/` of `rev` under `into`, compiled (as an install would be)."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", rev, "aipm"], cwd=Path(__file__).parent.parent,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(into)], check=True)
    return into


def one_run(code: Path, bench: str, root: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(code)}
    if bench in DETECTS:
        args = detect_args(bench, root, env)
    else:
        module, order, workers = BENCHES[bench]
        module.setup_aipm(root)
        args = ["--root", str(root), "run", order, "--max-workers", str(workers), "--no-resource-monitoring"]
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise SystemExit(f"aipm ({code}) exited {done.returncode}: {done.stderr.strip()[-500:]}")


def detect_args(bench: str, root: Path, env: dict) -> list[str]:
    """The order made at `root` on first use (and aged past the parse cache's racy window), its cache written by
    this revision (warm) or removed (cold): the arguments of a timed `detect`."""
    tasks, warm = DETECTS[bench]
    if not root.exists():
        detect_scale.generate(root, tasks)
        (root / ".aipm").mkdir()
        time.sleep(detect_scale.RACY_S + 0.1)
    shutil.rmtree(root / ".aipm" / "cache", ignore_errors=True)
    if warm:
        subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "validate", "SCALE"], cwd=root, env=env,
                       capture_output=True, check=True)
    return ["--root", str(root), "detect", "SCALE", "--json"]


def read(out: Path) -> list[tuple[float, float]]:
    return [(float(cpu), float(wall)) for cpu, wall, _ in (line.split() for line in out.read_text().splitlines())]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="the revision measured against (a commit, a branch, HEAD~1)")
    parser.add_argument("b", help="the revision measured")
    parser.add_argument("--bench", choices=sorted(BENCHES) + sorted(DETECTS), default="b2")
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--tmpfs", action="store_true", help="in a mount namespace with a tmpfs on /tmp (root)")
    opts = parser.parse_args()
    if opts.tmpfs and os.environ.get("AB_TMPFS") != str(os.getpid()):
        # Again, inside a namespace whose /tmp is a fresh tmpfs (gone with it); the shell execs us, same pid.
        argv = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
        script = 'mount -t tmpfs aipm-ab /tmp && AB_TMPFS=$$ exec "$@"'
        os.execvp("unshare", ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *argv])
    work = Path(tempfile.mkdtemp(prefix="aipm-bench-ab-"))
    try:
        codes = {rev: checkout(rev, work / f"code-{i}") for i, rev in enumerate((opts.a, opts.b))}
        outs = {rev: work / f"figures-{i}.txt" for i, rev in enumerate((opts.a, opts.b))}
        # What /tmp is: the longest mount point above it (of two on one point, the later is the one seen).
        mounts = [line.split()[1:3] for line in open("/proc/self/mounts")]
        tmp = max(((len(point), i, kind) for i, (point, kind) in enumerate(mounts)
                   if os.path.join("/tmp", "").startswith(os.path.join(point, ""))))[2]
        print(f"A/B {opts.bench} · {opts.a} vs {opts.b} · {opts.pairs} pairs · /tmp: {tmp} · {C.machine()}")
        for k in range(opts.pairs):
            order = (opts.a, opts.b) if k % 2 == 0 else (opts.b, opts.a)
            for rev in order:
                root = work / ("detect" if opts.bench in DETECTS else f"run-{k}-{list(codes).index(rev)}")
                one_run(codes[rev], opts.bench, root, outs[rev])
        figures = {rev: read(out) for rev, out in outs.items()}
        rows = []
        for rev, runs in figures.items():
            cpu, wall = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
            rows.append([rev, f"{cpu:.3f}", f"{wall:.3f}"])
        print(C.table(["revision", "CPU s (median)", "wall s (median)"], rows))
        a, b = figures[opts.a], figures[opts.b]
        for i, what in ((0, "CPU"), (1, "wall")):
            ratio = statistics.median(y[i] for y in b) / statistics.median(x[i] for x in a)
            won = sum(y[i] < x[i] for x, y in zip(a, b))
            print(f"{what}: {opts.b} / {opts.a} = {ratio:.3f} (medians); {opts.b} lower in {won} of {len(a)} pairs")
        return 0
    finally:
        C.keep_or_remove(work)


if __name__ == "__main__":
    sys.exit(main())
