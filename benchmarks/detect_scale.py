#!/usr/bin/env python3
"""detect_scale: how `aipm detect ORDER --json` scales with the size of an order (issue 3 item 7, issue 17 B3).

Generates orders of 1k, 10k and 100k tasks (random dependencies within a window of 50 earlier tasks, 1-4 target
files each: mostly files, some directories, a few globs; the first 40 % DONE, a handful IN_PROGRESS with no
worker, i.e. stale and holding their files) and times `aipm detect ORDER --json` as a whole process
(interpreter start, loading every file, planning, JSON out): best of 3, 100k once. Two ways:

  cold  no parse cache: `.aipm/cache/` is removed before every run, so every task file is parsed;
  warm  the parse cache written by `aipm validate ORDER` (after the files are older than the cache's racy window,
        parsecache.RACY_NS), present and valid for every file.

The warm output must equal the cold output byte for byte (else the run fails).

Also `aipm status ORDER` (its table, COLUMNS=120, into a pipe), warm: the command a person polls on a big order
(issue 17 names detect and status), held to the warm target.

Peer (reference): `ninja -n` on a build.ninja with the same graph (one edge per task, its dependencies as
order-only inputs): parse + plan without running. Also shown: `aipm --help`, the fixed start-up floor.

Targets (issue 17): 10k tasks < 1 s cold and < 0.5 s warm; 100k < 5 s.

    python benchmarks/detect_scale.py            # 1k, 10k, 100k
    BENCH_SIZES=1000,10000 python benchmarks/detect_scale.py
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common as C

WINDOW = 50
TARGETS = {10_000: (1.0, 0.5), 100_000: (5.0, 5.0)}  # (cold, warm) seconds
RACY_S = 2.0  # aipm.parsecache.RACY_NS: files younger than this are not remembered


def generate(root: Path, n: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    odir = C.make_project(root, "SCALE", max_workers=5)
    width = len(str(n))
    ids = [f"T{i:0{width}d}" for i in range(n)]
    files_pool = max(50, n // 2)
    done_upto = int(n * 0.4)
    stale = set(rng.sample(range(done_upto, n), 5))
    ninja = ["rule touch", "  command = true", ""]
    for i, tid in enumerate(ids):
        lo = max(0, i - WINDOW)
        k = rng.choice((0, 1, 1, 2, 2, 3)) if i else 0
        deps = sorted({ids[rng.randrange(lo, i)] for _ in range(k)}) if i else []
        targets = []
        for _ in range(rng.randint(1, 4)):
            r = rng.random()
            a = rng.randrange(files_pool)
            if r < 0.90:
                targets.append(f"src/pkg{a % 97}/mod{a}.py")
            elif r < 0.98:
                targets.append(f"docs/sec{a % 997}/")
            else:
                targets.append(f"tests/t{a % 89}/**/test_{a % 13}*.py")
        status = "DONE" if i < done_upto else ("IN_PROGRESS" if i in stale else None)
        text = C.task_text(tid, "true", deps, targets, status=status)
        with open(odir / f"{tid}.yaml", "w") as fh:
            fh.write(text)
        dep_part = (" || " + " ".join(f"o/{d}" for d in deps)) if deps else ""
        ninja.append(f"build o/{tid}: touch{dep_part}")
    (root / "build.ninja").write_text("\n".join(ninja) + "\n")
    return odir


def best_of(cmd: list[str], cwd: Path, repeat: int, check_json: int | None = None,
            before=None, env: dict | None = None) -> tuple[float, int, bytes]:
    """Best wall time of `repeat` runs (calling `before()` ahead of each), exit code and the last output."""
    times = []
    rc = 0
    out = b""
    for _ in range(repeat):
        if before is not None:
            before()
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        times.append(time.perf_counter() - t0)
        rc, out = proc.returncode, proc.stdout
        if rc != 0:
            sys.stderr.write(proc.stderr.decode(errors="replace")[-2000:])
            break
        if check_json is not None:
            data = json.loads(proc.stdout)
            seen = len(data["launchable"]) + len(data["blocked"])
            if seen != check_json:
                print(f"  ! detect reported {seen} tasks, expected {check_json}")
    return min(times), rc, out


def verdict(seconds: float, target: float | None) -> str:
    if target is None:
        return "-"
    return "ok" if seconds < target else f"MISS by {seconds - target:.2f} s"


def warm_up(aipm: list[str], root: Path, odir: Path) -> tuple[int, bool]:
    """Write the parse cache as a user would (`aipm validate`), once every file is older than the racy window.
    (exit code, whether a cache file exists now: an aipm without the cache writes none, and its warm is cold.)"""
    newest = max(os.lstat(p).st_ctime for p in odir.iterdir())
    time.sleep(max(0.0, newest + RACY_S + 0.1 - time.time()))
    proc = subprocess.run(aipm + ["--root", str(root), "validate", "SCALE"], cwd=root, capture_output=True)
    return proc.returncode, any((root / ".aipm" / "cache").glob("*.tasks"))


def main() -> int:
    C.require_aipm()
    have_ninja = C.shutil.which("ninja") is not None
    if not have_ninja:
        print(f"note: ninja not found, the peer column is left out (install: {C.INSTALL_HINT})")
    sizes = [int(s) for s in os.environ.get("BENCH_SIZES", "1000,10000,100000").split(",")]
    aipm = C.aipm_cmd()
    print(f"detect_scale · {C.machine()}")
    work = C.temp_dir("detect")
    rows = []
    ok = True
    try:
        floor, _, _ = best_of(aipm + ["--help"], work, 3)
        for n in sizes:
            root = work / f"n{n}"
            t0 = time.perf_counter()
            odir = generate(root, n)
            gen = time.perf_counter() - t0
            (root / ".aipm").mkdir()
            repeat = 1 if n >= 100_000 else int(os.environ.get("BENCH_REPEAT", "3"))
            cmd = aipm + ["--root", str(root), "detect", "SCALE", "--json"]
            cache = root / ".aipm" / "cache"
            t_cold, rc, cold_out = best_of(cmd, root, repeat, check_json=n,
                                           before=lambda: shutil.rmtree(cache, ignore_errors=True))
            validated, has_cache = warm_up(aipm, root, odir)
            if rc != 0 or validated != 0:
                print(f"aipm detect or validate failed on {n} tasks (exit {rc}, {validated})")
                ok = False
                continue
            t_warm, rc, warm_out = best_of(cmd, root, repeat, check_json=n)
            if rc != 0 or warm_out != cold_out:
                print(f"aipm detect on {n} tasks: warm output differs from cold (exit {rc})")
                ok = False
                continue
            t_status, src, _ = best_of(aipm + ["--root", str(root), "status", "SCALE"], root, repeat,
                                       env={**os.environ, "COLUMNS": "120"})
            if src != 0:
                print(f"aipm status on {n} tasks failed (exit {src})")
                ok = False
                continue
            t_ninja = None
            if have_ninja:
                t_ninja, nrc, _ = best_of(["ninja", "-n"], root, repeat)
                if nrc != 0:
                    t_ninja = None
            cold_target, warm_target = TARGETS.get(n, (None, None))
            rows.append([
                f"{n:,}", f"{gen:.1f}", f"{t_cold:.3f}", "yes" if has_cache else "no", f"{t_warm:.3f}", f"{t_warm / n * 1e6:.0f}",
                f"{t_status:.3f}",
                "-" if t_ninja is None else f"{t_ninja:.3f}",
                "-" if t_ninja is None else f"{t_cold / t_ninja:.1f}x",
                "-" if t_ninja is None else f"{t_warm / t_ninja:.1f}x",
                "-" if cold_target is None else f"< {cold_target:g} / < {warm_target:g}",
                f"{verdict(t_cold, cold_target)} / {verdict(t_warm, warm_target)} / {verdict(t_status, warm_target)}",
            ])
            C.keep_or_remove(root)
        print(f"aipm --help (start-up floor): {floor:.3f} s")
        print(C.table(
            ["tasks", "gen s", "cold s", "cache", "warm s", "warm µs/task", "status s", "ninja -n s", "cold/ninja",
             "warm/ninja", "target cold / warm s", "verdict cold / warm / status"], rows
        ))
    finally:
        C.keep_or_remove(work)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
