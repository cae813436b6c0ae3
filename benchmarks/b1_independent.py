#!/usr/bin/env python3
"""B1: 1000 independent `true` tasks at 2 workers — aipm vs GNU parallel vs make (issue 5, item 8).

    aipm --root DIR run B1 --max-workers 2 --no-resource-monitoring
    parallel -j2 true ::: {1..1000}
    make -j2 -f Makefile            (1000 .PHONY targets, each running `true`)
    floor pool2 1000 ORDER_DIR true (benchmarks/floor.c: the same durable status writes, in C, nothing else)

Target: aipm no slower than GNU parallel, with every status durable (each task file says DONE when `run`
exits; aipm writes each status with fsync + rename). BENCH_N changes the task count, BENCH_REPEAT=k takes the
best of k runs of each tool (default 1).
"""

from __future__ import annotations

import os
import sys

import _common as C

N = int(os.environ.get("BENCH_N", "1000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "1"))
WORKERS = 2


def setup_aipm(root) -> None:
    C.make_project(root, "B1", WORKERS)
    width = len(str(N - 1))
    C.write_tasks(root / "orders" / "B1", {
        f"T{i:0{width}d}": C.task_text(f"T{i:0{width}d}", "true") for i in range(N)
    })


def main() -> int:
    C.require_peers("parallel", "make")
    C.require_aipm()
    work = C.temp_dir("b1")
    print(f"B1 · {N} independent `true` tasks · -j{WORKERS} · {C.machine()}")
    try:
        floor = C.build_floor(work)
        print(f"durable atomic write on this disk (write+fsync+rename+dir fsync): {C.durable_write_ms(work / 'probe'):.1f} ms median")
        mk = work / "make"
        mk.mkdir()
        names = [f"t{i}" for i in range(N)]
        (mk / "Makefile").write_text(
            ".PHONY: all " + " ".join(names) + "\nall: " + " ".join(names) + "\n"
            + "".join(f"{n}:\n\t@true\n" for n in names)
        )
        best = {"aipm": None, "parallel": None, "make": None, "floor": None}
        durable_ok = True
        for k in range(REPEAT):
            root = work / f"aipm{k}"
            setup_aipm(root)
            log = work / f"aipm{k}.log"
            t, rc = C.timed(C.aipm_cmd() + ["--root", str(root), "run", "B1", "--max-workers", str(WORKERS),
                                            "--no-resource-monitoring"], cwd=root, log=log)
            if rc != 0:
                print(f"aipm run exited {rc}; last lines of its output:\n{C.tail(log)}")
                return 1
            st = C.statuses(root / "orders" / "B1")
            not_done = {tid: s for tid, s in st.items() if s != "DONE"}
            if len(st) != N or not_done:
                durable_ok = False
                print(f"! {len(not_done)} task file(s) not DONE after run, e.g. {list(not_done.items())[:3]}")
            best["aipm"] = t if best["aipm"] is None else min(best["aipm"], t)

            t, rc = C.timed(["parallel", "--will-cite", f"-j{WORKERS}", "true", ":::", *map(str, range(1, N + 1))],
                            cwd=work)
            if rc != 0:
                print(f"parallel exited {rc}")
                return 1
            best["parallel"] = t if best["parallel"] is None else min(best["parallel"], t)

            t, rc = C.timed(["make", f"-j{WORKERS}", "-f", "Makefile"], cwd=mk)
            if rc != 0:
                print(f"make exited {rc}")
                return 1
            best["make"] = t if best["make"] is None else min(best["make"], t)

            fd = work / f"floor{k}"
            setup_aipm(fd)
            t = C.run_floor(floor, "pool2", N, fd, "B1", ["true"])
            if t is not None:
                if any(s != "DONE" for s in C.statuses(fd / "orders" / "B1").values()):
                    print("! floor: not every task DONE")
                    return 1
                best["floor"] = t if best["floor"] is None else min(best["floor"], t)

        base = best["parallel"]
        rows = [[tool, f"{t:.2f}", f"{t / N * 1000:.2f}", f"{t / base:.2f}"] for tool, t in best.items()
                if t is not None]
        print(C.table(["tool", "wall s", "ms/task", "vs parallel"], rows))
        ratio = best["aipm"] / base
        verdict = "ok" if ratio <= 1.0 else f"MISS: aipm is {ratio:.2f}x GNU parallel (+{best['aipm'] - base:.2f} s)"
        print(f"durable: {'every task file says DONE' if durable_ok else 'NOT all DONE'}")
        print(f"target aipm <= parallel: {verdict}")
        return 0 if durable_ok else 1
    finally:
        C.keep_or_remove(work)


if __name__ == "__main__":
    sys.exit(main())
