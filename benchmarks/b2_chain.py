#!/usr/bin/env python3
"""B2: a chain of 500 `touch out/N` tasks, each depending on the previous — aipm vs ninja vs make (issue 5).

    aipm --root DIR run B2 --max-workers 2 --no-resource-monitoring
    ninja                 (build out/N: touch out/N-1, for N = 1..499)
    make -f Makefile      (out/N: out/N-1 ; touch $@)
    floor chain           (benchmarks/floor.c: the same durable status writes and starts, nothing else)

The chain is serial, so the figure is the cost of one edge: notice that a task finished, record it, plan, and
start the next. Reported as wall time / 500 edges (start-up included). Target: <= 3 ms per edge for aipm.
The floor row is what the contract's writes (DONE of one task and IN_PROGRESS of the next durable before it
starts) and the commands themselves cost on this machine; aipm's overhead is what it adds above it.
BENCH_N changes the chain length; BENCH_REPEAT=k takes the best of k runs of each tool (default 1).
"""

from __future__ import annotations

import os
import sys

import _common as C

N = int(os.environ.get("BENCH_N", "500"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "1"))
TARGET_MS = 3.0


def setup_aipm(root) -> None:
    C.make_project(root, "B2", 2)
    (root / "out").mkdir()
    width = len(str(N))
    ids = [f"T{i:0{width}d}" for i in range(N)]
    C.write_tasks(root / "orders" / "B2", {
        tid: C.task_text(tid, f"touch out/{i}", [ids[i - 1]] if i else None, [f"out/{i}"])
        for i, tid in enumerate(ids)
    })


def setup_ninja(d) -> None:
    d.mkdir()
    lines = ["rule touch", "  command = touch $out", ""]
    lines += [f"build out/{i}: touch" + (f" out/{i - 1}" if i else "") for i in range(N)]
    lines += [f"default out/{N - 1}"]
    (d / "build.ninja").write_text("\n".join(lines) + "\n")


def setup_make(d) -> None:
    d.mkdir()
    (d / "out").mkdir()
    rules = [f"all: out/{N - 1}\n"]
    rules += [f"out/{i}:" + (f" out/{i - 1}" if i else "") + "\n\ttouch $@\n" for i in range(N)]
    (d / "Makefile").write_text("".join(rules))


def main() -> int:
    C.require_peers("ninja", "make")
    C.require_aipm()
    work = C.temp_dir("b2")
    print(f"B2 · chain of {N} `touch` tasks · {C.machine()}")
    best: dict[str, float] = {}
    try:
        floor = C.build_floor(work)
        print(f"durable atomic write on this disk (write+fsync+rename+dir fsync): {C.durable_write_ms(work / 'probe'):.1f} ms median")
        for k in range(REPEAT):
            root = work / f"aipm{k}"
            setup_aipm(root)
            log = work / f"aipm{k}.log"
            t, rc = C.timed(C.aipm_cmd() + ["--root", str(root), "run", "B2", "--max-workers", "2",
                                            "--no-resource-monitoring"], cwd=root, log=log)
            if rc != 0:
                print(f"aipm run exited {rc}; last lines of its output:\n{C.tail(log)}")
                return 1
            made = len(list((root / "out").iterdir()))
            st = C.statuses(root / "orders" / "B2")
            if made != N or any(s != "DONE" for s in st.values()):
                print(f"! aipm: {made}/{N} files made, {sum(s == 'DONE' for s in st.values())}/{N} tasks DONE")
                return 1
            best["aipm"] = min(best.get("aipm", t), t)

            nd = work / f"ninja{k}"
            setup_ninja(nd)
            t, rc = C.timed(["ninja", "-j2"], cwd=nd)
            if rc != 0:
                print(f"ninja exited {rc}")
                return 1
            best["ninja"] = min(best.get("ninja", t), t)

            md = work / f"make{k}"
            setup_make(md)
            t, rc = C.timed(["make", "-j2", "-f", "Makefile"], cwd=md)
            if rc != 0:
                print(f"make exited {rc}")
                return 1
            best["make"] = min(best.get("make", t), t)
            fd = work / f"floor{k}"
            setup_aipm(fd)
            t = C.run_floor(floor, "chain", N, fd, "B2", ["touch", "out/%d"])
            if t is not None:
                if len(list((fd / "out").iterdir())) != N or any(s != "DONE" for s in C.statuses(fd / "orders" / "B2").values()):
                    print("! floor: not every file made and task DONE")
                    return 1
                best["floor"] = min(best.get("floor", t), t)

        rows = [[tool, f"{t:.2f}", f"{t / N * 1000:.2f}", f"{t / best['ninja']:.1f}x"] for tool, t in best.items()]
        print(C.table(["tool", "wall s", "ms/edge", "vs ninja"], rows))
        per_edge = best["aipm"] / N * 1000
        verdict = "ok" if per_edge <= TARGET_MS else f"MISS by {per_edge - TARGET_MS:.2f} ms/edge ({per_edge / TARGET_MS:.1f}x the target)"
        print(f"target aipm <= {TARGET_MS:g} ms/edge: {verdict}")
        if "floor" in best:
            print(f"aipm above the floor: {(best['aipm'] - best['floor']) / N * 1000:.2f} ms/edge")
        return 0
    finally:
        C.keep_or_remove(work)


if __name__ == "__main__":
    sys.exit(main())
