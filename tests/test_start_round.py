"""A launch round's starts (Launcher._plan_and_start): statuses written, wrappers spawned while the round's
directory fsync runs, then each worker recorded and let go — and what happens when something fails between."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from aipm import scope, starting, subreaper
from aipm.launcher import Launcher
from aipm.project import Project
from aipm.settings import load_settings
from aipm.supervisor import Supervisor
from aipm.view import OrderView
from conftest import write_task


def _launcher(root: Path) -> tuple[Launcher, Supervisor]:
    settings = load_settings(root, {"enable_monitoring": False})
    launcher = Launcher(Project(root, settings.orders_dir), settings)
    return launcher, Supervisor(launcher)


def test_a_snapshot_whose_late_save_fails_stops_its_worker_before_the_go(tmp_path):
    """The "before" of a scope audit is saved at the round's durable point when `git status` is still running;
    if that save fails the command must not begin (it would run unaudited)."""
    root = tmp_path / "repo"
    (root / "orders" / "ORD").mkdir(parents=True)
    (root / "aipm.yaml").write_text("max_workers: 5\n")
    marker = tmp_path / "ran"
    write_task(root / "orders" / "ORD", "A", command=f"touch {marker}", target_files=["a.txt"])
    for args in (["init", "-q"], ["add", "-A"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    launcher, sup = _launcher(root)
    # Where the attempt's snapshot goes, a directory: the save fails for real.
    (launcher.runtime.log_dir("ORD") / "A.1.scope.json").mkdir(parents=True)
    with scope.shared():
        scope.prefetch(root)  # in flight: the save waits for the round's durable point
        report = launcher.launch(OrderView(root / "orders" / "ORD", root, watch=False), owner=sup, explain=False)
    try:
        assert [item["id"] for item in report.launched] == ["A"]
        rec = sup.owned["ORD/A"]
        deadline = time.time() + 10
        while time.time() < deadline and os.path.exists(f"/proc/{rec.pid}") and \
                open(f"/proc/{rec.pid}/stat").read().split()[2] != "Z":
            time.sleep(0.02)
        assert "stopped before its command began" in Path(rec.log).read_text()
        assert not marker.exists()
    finally:
        sup.close()


def test_an_error_in_a_later_start_leaves_no_earlier_start_half_made(tmp_path, monkeypatch):
    """An unexpected error while the round's second task starts (injected: nothing real raises it): the first,
    already IN_PROGRESS with its wrapper waiting, is put back — QUEUED, no record, its wrapper gone without running
    anything, no descriptor left open — instead of waiting for a go that never comes."""
    root = tmp_path
    (root / "aipm.yaml").write_text("max_workers: 5\n")
    order = root / "orders" / "ORD"
    marker = tmp_path / "ran"
    write_task(order, "A", priority="P0", command=f"touch {marker}", target_files=["a.txt"])
    write_task(order, "B", priority="P1", command="true", target_files=["b.txt"])
    real = starting.update_task

    def failing(path, updates, expect=None, root=None):
        if Path(path).stem == "B" and isinstance(updates, dict) and updates.get("status") == "IN_PROGRESS":
            raise RuntimeError("injected")
        return real(path, updates, expect=expect, root=root)

    monkeypatch.setattr(starting, "update_task", failing)
    launcher, sup = _launcher(root)
    before, kids = set(os.listdir("/proc/self/fd")), set(subreaper.children(os.getpid()))
    try:
        with pytest.raises(RuntimeError, match="injected"):
            launcher.launch(OrderView(order, root, watch=False), owner=sup, explain=False)
        time.sleep(0.3)
        assert yaml.safe_load((order / "A.yaml").read_text())["status"] == "QUEUED"
        assert not launcher.runtime.record_path("ORD", "A").exists()
        assert not marker.exists()
        assert set(subreaper.children(os.getpid())) - kids == set()
        assert set(os.listdir("/proc/self/fd")) - before == set()
    finally:
        sup.close()
