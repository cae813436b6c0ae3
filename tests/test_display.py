"""What `run` shows (issue 12): every event kept in the scrollback above a ticking table, a closing summary that
matches the task files (also after Ctrl-C), a summary event for `--json`, and a README demo that cleans up."""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from conftest import FIXTURES, REPO, no_workers, state, wait_for, write_task
from aipm.cli import display as display_module
from aipm.cli.display import Display
from aipm.view import OrderView


def live_display(project, monkeypatch, clock: list[float]) -> tuple[Display, io.StringIO]:
    monkeypatch.setattr(display_module.time, "time", lambda: clock[0])
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100, color_system=None)
    return Display("live", OrderView(project.order(), project.root, watch=False), out=console), out


def test_live_view_keeps_every_event_and_ticks(project, monkeypatch):
    for i in range(10):
        write_task(project.order(), f"T{i}", command="true")
    clock = [1000.0]
    display, out = live_display(project, monkeypatch, clock)
    try:
        display({"event": "started", "task": "T0", "attempt": 1, "pid": 10})
        clock[0] += 7  # no event for a while: the table Rich redraws must still show time passing
        assert "7s" in render(display)
        clock[0] += 5
        assert "12s" in render(display)
        for i in range(10):
            display({"event": "finished", "task": f"T{i}", "status": "DONE", "reason": "exit 0"})
    finally:
        display.close()
    text = out.getvalue()
    lines = [f"finish   T{i} → DONE (exit 0)" for i in range(10)]
    # Each event line is printed once, oldest first, and stays in the scrollback.
    assert all(text.count(line) == 1 for line in lines), text
    assert [text.index(line) for line in lines] == sorted(text.index(line) for line in lines)


def render(display: Display) -> str:
    """What Rich's refresh thread would draw now: the Live's own renderable."""
    buffer = io.StringIO()
    Console(file=buffer, width=100, color_system=None).print(display.live.get_renderable())
    return buffer.getvalue()


@pytest.mark.skipif(shutil.which("script") is None, reason="script (util-linux) is not installed")
def test_run_on_a_terminal_prints_every_event_once_and_a_true_summary(project):
    order = project.order()
    for i in range(9):
        write_task(order, f"T{i}", command="true", target_files=[f"f{i}"])
    write_task(order, "BAD", command="exit 4")
    argv = [sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD", "--no-resource-monitoring"]
    # `script` gives aipm a pseudo-terminal, so it draws its live view as it would for a person.
    proc = subprocess.run(["script", "-qec", " ".join(argv), "/dev/null"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "COLUMNS": "120", "LINES": "40", "TERM": "xterm"})
    assert proc.returncode == 1, proc.stdout
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", proc.stdout).replace("\r", "")
    for i in range(9):
        assert text.count(f"finish   T{i} → DONE (exit 0)") == 1, text
    assert text.count("finish   BAD → FAILED (exit 4)") == 1, text
    assert text.rstrip().endswith("ORD: DONE 9, FAILED 1"), text


def test_run_json_closes_with_a_summary_event(project):
    order = project.order()
    write_task(order, "OK", command="true")
    write_task(order, "BAD", command="exit 1")
    proc = project.aipm("run", "ORD", "--json", "--no-resource-monitoring")
    assert proc.returncode == 1
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["order"] == "ORD" and summary["exit_code"] == 1
    statuses = [t["status"] for t in project.json("status", "ORD")["tasks"]]
    assert summary["counts"] == {s: statuses.count(s) for s in set(statuses)} == {"DONE": 1, "FAILED": 1}


def test_exec_json_prints_only_json_and_closes_with_a_summary_event(project):
    """`exec --json` ended with a text line (`BAD: FAILED (exit 3)`) on stdout, or `W cannot start:` and its
    reasons for a task that could not start: a script reading JSON lines failed on it."""
    order = project.order()
    write_task(order, "BAD", command="exit 3")
    write_task(order, "W", command="true", depends_on=["BAD"])
    write_task(order, "OK", command="true")
    proc = project.aipm("exec", "OK", "--json")
    assert proc.returncode == 0 and [json.loads(line)["event"] for line in proc.stdout.splitlines()] == [
        "started", "finished", "summary"], proc.stdout
    proc = project.aipm("exec", "BAD", "--json")
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1 and events[-1] == {
        "event": "summary", "order": "ORD", "task": "BAD", "status": "FAILED", "reason": "exit 3",
        "exit_code": 1, "time": events[-1]["time"]}
    proc = project.aipm("exec", "W", "--json")
    summary = [json.loads(line) for line in proc.stdout.splitlines()][-1]
    assert proc.returncode == 1 and summary["status"] == "QUEUED", proc.stdout
    assert [r["reason"] for r in summary["reasons"]] == ["dependency_cannot_finish"]


def test_every_run_json_event_names_its_order(project):
    """The reference: each event has `event`, `task`, `order`, `time`. A launch that failed (the worker program
    missing) and a deferral came without `order`."""
    order = project.order()
    (project.root / "aipm.yaml").write_text("max_workers: 5\nworker:\n  command: [no-such-agent-program]\n")
    write_task(order, "AGENT", prompt="do it", target_files=["a.txt"])
    write_task(order, "OK", command="true", target_files=["b.txt"])
    proc = project.aipm("run", "ORD", "--json", "--no-resource-monitoring")
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert proc.returncode == 1 and "launch_failed" in {e["event"] for e in events}, proc.stdout
    assert [e for e in events if e.get("order") != "ORD"] == []


def test_the_summary_of_an_order_without_tasks_says_so(project):
    """Was 'ORD: ' with nothing after the colon (and an empty last line in `status`)."""
    project.order()
    proc = project.aipm("run", "ORD")
    assert (proc.returncode, proc.stdout) == (0, "ORD: no tasks\n")
    assert project.aipm("status", "ORD").stdout.splitlines()[-1] == "no tasks"


def test_summary_after_ctrl_c_matches_the_files(project):
    order = project.order()
    for i in range(2):
        write_task(order, f"S{i}", command="sleep 60", target_files=[f"f{i}"])
    proc = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD",
                             "--no-resource-monitoring"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = state(project.root) / "workers" / "ORD"
    wait_for(lambda: workers.is_dir() and len([p for p in workers.glob("*.json")
                                               if json.loads(p.read_text())["pgid"]]) == 2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1] == "ORD: QUEUED 2", err
    assert {t["status"] for t in project.json("status", "ORD")["tasks"]} == {"QUEUED"}
    assert no_workers(project.root)


def readme_demo_line() -> str:
    """The README's demo command, which .ci/run must run word for word."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```sh\n(.*?)```", readme, re.S).group(1)
    line = next(line for line in block.splitlines() if "fixtures/orders/demo" in line)
    assert line in (REPO / ".ci" / "run").read_text().splitlines(), "README and .ci/run differ"
    return line


@pytest.mark.parametrize("broken", [False, True])
def test_readme_demo_removes_its_directory_and_keeps_the_exit_status(tmp_path, broken):
    checkout = tmp_path / "checkout"
    shutil.copytree(FIXTURES / "orders" / "demo", checkout / "fixtures" / "orders" / "demo")
    if broken:
        (checkout / "fixtures" / "orders" / "demo" / "TASK_001.yaml").write_text("command: exit 3\n")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    (checkout / ".venv" / "bin" / "aipm").symlink_to(Path(sys.executable).parent / "aipm")
    temp = tmp_path / "temp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp), "AIPM_ENABLE_MONITORING": "false"}
    # As .ci/run runs it: bash with -e -u -o pipefail.
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_demo_line()], cwd=checkout, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == (1 if broken else 0), proc.stdout + proc.stderr
    assert list(temp.iterdir()) == []


def test_reference_lists_every_event_run_prints():
    """reference.md's 'What `run` prints' left out the lines and JSON kinds added since (`recover`, `watch`,
    `skip`: events `recovered`, `watching`, `enclosing`): a script reading `run --json` could not know them."""
    text = (REPO / "docs" / "reference.md").read_text()
    section = text[text.index("## What `run` prints"):text.index("## Pre-commit")]
    block = section[section.index("```\n") + 4:section.index("\n```", section.index("```\n") + 4)]
    shown = {line.split()[0] for line in block.splitlines() if line.strip()}
    kinds = set(re.findall(r"`(\w+)`", section[section.index("the kinds are"):section.index("and closes")]))
    printed = {kind: template.split()[0] for kind, template in display_module.LINES.items() if kind != "summary"}
    assert {kind for kind, word in printed.items() if word not in shown} == set()
    assert set(printed) - kinds == set()
