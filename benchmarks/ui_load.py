#!/usr/bin/env python3
"""UI: the CPU an open dashboard takes while a run of many quick tasks changes the board all the time.

    aipm --root DIR ui --port 0                     (one /events client reading every message, as a page does)
    aipm --root DIR run UI --max-workers 2 --no-resource-monitoring     (BENCH_N tasks: sleep 0.05, default 1000)

Reported: the `aipm ui` process's own CPU time (user+sys, from /proc) during the run, as a % of one core over the
run's wall time, beside the same run without the dashboard (how much longer the run took with it open). No peer
tool has a live view of this kind: the figure is aipm's against itself (an older revision: PYTHONPATH=<a checkout
of it> puts its `aipm` package first).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import urllib.request

import _common as C

N = int(os.environ.get("BENCH_N", "1000"))


def setup(root) -> None:
    C.make_project(root, "UI", 2)
    (root / ".aipm").mkdir()
    C.write_tasks(root / "orders" / "UI", {f"T{i:04d}": C.task_text(f"T{i:04d}", "sleep 0.05", None, [f"f/{i}"])
                                          for i in range(N)})


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(root, log) -> float:
    t, rc = C.timed(C.aipm_cmd() + ["--root", str(root), "run", "UI", "--max-workers", "2",
                                    "--no-resource-monitoring"], cwd=root, log=log)
    if rc != 0 or any(s != "DONE" for s in C.statuses(root / "orders" / "UI").values()):
        sys.exit(f"aipm run exited {rc} or left tasks not DONE; last lines:\n{C.tail(log)}")
    return t


def with_dashboard(root, log) -> tuple[float, float, int]:
    """(run wall s, ui CPU s during it, bytes the client read)."""
    ui = subprocess.Popen(C.aipm_cmd() + ["--root", str(root), "ui", "--port", "0"], cwd=root,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        url = None
        for line in ui.stdout:
            found = re.search(r"http://\S+", line)
            if found:
                url = found.group(0)
                break
        if url is None:
            sys.exit("aipm ui printed no URL")
        base, token = url.split("/?token=")
        received = [0]

        def follow() -> None:
            with urllib.request.urlopen(f"{base}/events?token={token}&patches=1", timeout=600) as events:
                while chunk := events.read1(65536):
                    received[0] += len(chunk)

        threading.Thread(target=follow, daemon=True).start()
        time.sleep(2)  # the first board is read and sent
        before = cpu_seconds(ui.pid)
        wall = run(root, log)
        used = cpu_seconds(ui.pid) - before
        return wall, used, received[0]
    finally:
        ui.terminate()
        ui.wait()


def main() -> int:
    C.require_aipm()
    C.require_module("starlette", "aipm ui needs the ui extra: pip install '.[ui]'")
    work = C.temp_dir("ui")
    print(f"UI · {N} tasks `sleep 0.05`, 2 workers, one open /events client · {C.machine()}")
    try:
        plain = work / "plain"
        setup(plain)
        alone = run(plain, work / "plain.log")
        shown = work / "shown"
        setup(shown)
        wall, used, got = with_dashboard(shown, work / "shown.log")
        print(C.table(["", "run wall s", "ui CPU s", "ui % of a core", "sent to the page"], [
            ["run alone", f"{alone:.2f}", "", "", ""],
            ["run + dashboard", f"{wall:.2f}", f"{used:.2f}", f"{100 * used / wall:.1f}", f"{got / 1e6:.2f} MB"],
        ]))
    finally:
        C.keep_or_remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
