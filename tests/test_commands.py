"""exec, cancel, retry, logs, ps, locks, recover, detect, why, init: through the real CLI."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading

import psutil
import pytest
import yaml

from conftest import no_workers, snapshot, state, task_statuses, wait_for, write_task
from invariants import group_alive, pid_alive


def test_init_twice_changes_nothing(tmp_path):
    root = tmp_path / "fresh"
    root.mkdir()

    def init():
        return subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "init"], capture_output=True, text=True)

    proc = init()
    assert proc.returncode == 0 and "created" in proc.stdout
    assert (root / "aipm.yaml").exists() and (root / "orders").is_dir()
    assert (root / ".aipm" / ".gitignore").read_text().splitlines()[-1] == "*"
    before = snapshot(root)
    assert "nothing changed" in init().stdout and snapshot(root) == before


@pytest.mark.parametrize("settings,in_the_way,said", [
    (None, "orders", "orders_dir names a file, not a directory"),
    (None, "orders@", "orders_dir names a link to nothing, not a directory"),
    ("orders_dir: a/b\n", "a", "cannot create the orders directory (Not a directory)"),
])
def test_init_with_a_file_where_the_orders_go_names_it_and_changes_nothing(tmp_path, settings, in_the_way, said):
    """A file named `orders` made `init` say "created aipm.yaml, .aipm/" (exit 0) with no orders directory, every
    later command refused; a link to nothing there, or a file on orders_dir's way, ended it in a traceback (exit
    1) after aipm.yaml was written."""
    if settings:
        (tmp_path / "aipm.yaml").write_text(settings)
    if in_the_way.endswith("@"):
        (tmp_path / in_the_way[:-1]).symlink_to("nowhere")
    else:
        (tmp_path / in_the_way).write_text("")
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), "init"], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and said in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before and not (tmp_path / ".aipm").exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["aipm.yaml"] * bool(settings) + [in_the_way.rstrip("@")])


def test_inits_aipm_yaml_shows_every_setting_with_its_default(tmp_path):
    """The aipm.yaml `init` writes says 'every key is optional (defaults shown)' but left out nine of the settings
    reference.md lists (scope_audit, preempt, confine, workspace, runner, ...). Uncommented, it is the defaults
    (ray.address `auto`, as `config` shows its default)."""
    import dataclasses

    from aipm.settings import SETTING_NAMES, Settings, load_settings

    subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), "init"], check=True, capture_output=True)
    lines = (tmp_path / "aipm.yaml").read_text().splitlines()
    (tmp_path / "aipm.yaml").write_text("\n".join(line.removeprefix("# ") for line in lines[1:]) + "\n")
    loaded = load_settings(tmp_path, environ={})
    assert {name for name in SETTING_NAMES if loaded.sources[name] == "default"} == set()  # each one is there
    assert dataclasses.replace(loaded, sources={}) == dataclasses.replace(Settings(), sources={})
    assert loaded.ray_address == "auto"


def test_init_over_a_broken_aipm_yaml_names_it_and_changes_nothing(tmp_path):
    (tmp_path / "aipm.yaml").write_text("max_workers: [\n")
    before = snapshot(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), "init"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and f"{tmp_path / 'aipm.yaml'}:2:1: invalid YAML" in proc.stderr
    assert "nothing changed" not in proc.stdout and snapshot(tmp_path) == before


def test_init_in_a_project_configured_in_pyproject_keeps_those_settings(tmp_path):
    """aipm.yaml is read instead of [tool.aipm], never merged with it: `init` wrote one anyway, and every setting
    in pyproject.toml (max_workers, notify, ...) silently went back to its default."""
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.aipm]\nmax_workers = 2\nnotify = "true"\n')

    def aipm(*args):
        return subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), *args],
                              capture_output=True, text=True)

    proc = aipm("init")
    assert proc.returncode == 0 and "pyproject.toml [tool.aipm]" in proc.stdout, proc.stdout + proc.stderr
    assert not (tmp_path / "aipm.yaml").exists() and (tmp_path / "orders").is_dir()
    settings = json.loads(aipm("config", "--json").stdout)["settings"]
    assert settings["max_workers"] == {"value": 2, "source": "pyproject.toml [tool.aipm]"}
    assert settings["notify"]["value"] == "true"
    before = snapshot(tmp_path)
    assert "nothing changed" in aipm("init").stdout and snapshot(tmp_path) == before


def test_a_project_configured_in_pyproject_is_found_from_a_subdirectory(tmp_path):
    """Outside git, only aipm.yaml marked a project's root: run from a subdirectory of a project whose settings are
    pyproject.toml's [tool.aipm], aipm took the working directory for the root, and its orders were not found. A
    pyproject.toml of another tool on the way up (even a broken one) marks nothing; a broken one naming tool.aipm
    is named (exit 2), not passed by."""
    (tmp_path / "pyproject.toml").write_text('[tool.aipm]\norders_dir = "work"\n')
    write_task(tmp_path / "work" / "ORD", "T", command="true")
    (tmp_path / "pkg" / "src").mkdir(parents=True)
    (tmp_path / "pkg" / "pyproject.toml").write_text("[tool.black\n")

    def status():
        return subprocess.run([sys.executable, "-m", "aipm", "status", "ORD", "--json"], capture_output=True,
                              text=True, cwd=tmp_path / "pkg" / "src")

    proc = status()
    assert proc.returncode == 0, proc.stderr
    assert [t["id"] for t in json.loads(proc.stdout)["tasks"]] == ["T"]
    (tmp_path / "pkg" / "pyproject.toml").write_text("[tool.aipm\n")
    proc = status()
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"{tmp_path / 'pkg' / 'pyproject.toml'}: invalid TOML" in proc.stderr


def test_init_makes_the_orders_directory_the_settings_name(tmp_path):
    """`init` made orders/ whatever `orders_dir` said: a stray directory no command reads, and none where `aipm
    new` puts orders."""
    (tmp_path / "aipm.yaml").write_text("orders_dir: work/orders\n")
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(tmp_path), "init"], capture_output=True, text=True)
    assert proc.returncode == 0 and "created work/orders/, .aipm/" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "work" / "orders").is_dir() and not (tmp_path / "orders").exists()


def test_exec_runs_one_task_in_the_foreground(project):
    order = project.order()
    write_task(order, "A", command="echo from-a")
    write_task(order, "B", command="true", depends_on=["A"])
    proc = project.aipm("exec", "A")
    assert proc.returncode == 0, proc.stderr
    assert task_statuses(order) == {"A": "DONE", "B": "QUEUED"}
    assert "from-a" in project.aipm("logs", "A").stdout


def test_exec_of_a_blocked_task_says_why(project):
    order = project.order()
    write_task(order, "A", command="true")
    write_task(order, "B", command="true", depends_on=["A"])
    proc = project.aipm("exec", "ORD/B")
    assert proc.returncode == 1
    assert "waiting on A" in proc.stdout
    assert task_statuses(order) == {"A": "QUEUED", "B": "QUEUED"}


def test_exec_of_a_finished_task_says_it_ran_nothing(project):
    """`aipm exec A` of a DONE task printed 'A: DONE (exit 0)' as if it had just run it; of a FAILED task, 'A:
    FAILED (exit 2)', as if it had failed again. Nothing ran: say so, and how to run it again."""
    order = project.order()
    write_task(order, "A", command="true", status="DONE", attempts=1, exit_code=0, reason="exit 0")
    write_task(order, "B", command="true", status="FAILED", attempts=1, exit_code=2, reason="exit 2")
    before = snapshot(project.root)
    for task, code, status in (("A", 0, "DONE"), ("B", 1, "FAILED")):
        proc = project.aipm("exec", task)
        assert proc.returncode == code, proc.stderr
        assert proc.stdout.splitlines()[:3] == [f"{task} cannot start:", f"  - status is {status} (exit {code * 2})",
                                                f"  `aipm retry {task}` queues it again"], proc.stdout
    assert snapshot(project.root) == before


def test_exec_parallel_starts_the_others_detached(project):
    order = project.order()
    write_task(order, "A", command="sleep 0.3", target_files=["a"])
    write_task(order, "B", command="true", target_files=["b"])
    write_task(order, "C", command="true", target_files=["c"])
    proc = project.aipm("exec", "A", "--parallel")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: task_statuses(order) == {"A": "DONE", "B": "DONE", "C": "DONE"})
    wait_for(lambda: no_workers(project.root))


def test_exec_retries_until_attempts_are_used(project):
    order = project.order()
    counter = project.root / "count"
    write_task(order, "A", command=f"echo x >> {counter}; exit 1", max_attempts=3)
    assert project.aipm("exec", "A").returncode == 1
    assert counter.read_text().count("x") == 3
    assert task_statuses(order) == {"A": "FAILED"}


def test_cancel_stops_the_whole_group(project):
    order = project.order()
    write_task(order, "A", command="sleep 60 & sleep 60; wait", target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    proc = project.aipm("cancel", "A", "--grace", "2")
    assert proc.returncode == 0, proc.stderr
    assert task_statuses(order) == {"A": "CANCELLED"}
    wait_for(lambda: not group_alive(worker["pgid"]))
    wait_for(lambda: no_workers(project.root))
    assert project.json("locks")["locks"] == []
    # And retry puts it back with fresh attempts.
    assert project.aipm("retry", "A").returncode == 0
    data = project.json("status", "ORD")["tasks"][0]
    assert data["status"] == "QUEUED" and data["attempts"] == 0


@pytest.mark.parametrize("grace", ["nan", "inf", "-1", "2592000"])
def test_a_bad_grace_is_refused_before_the_task_is_cancelled(project, grace):
    """--grace nan, inf or a month was a traceback (exit 1) from the wait, after the task file was already marked
    CANCELLED, with its worker left running; a negative one was taken as no grace at all. nan and inf are no number
    to a number flag at all (as to a number setting), a usage error; the others are out of cancel's range."""
    order = project.order()
    write_task(order, "A", command="sleep 60", target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    before = snapshot(project.root)
    proc = project.aipm("cancel", "A", "--grace", grace)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"aipm: error: aipm cancel: Invalid value for '--grace': {grace!r} is not a valid float. (see 'aipm cancel "
        "--help')" if grace in ("nan", "inf") else
        f"aipm: error: --grace: {float(grace)} is not a number of seconds from 0 to 604800 (a week)"]
    assert snapshot(project.root) == before and group_alive(worker["pgid"])
    assert project.aipm("cancel", "A", "--grace", "0").returncode == 0
    wait_for(lambda: not group_alive(worker["pgid"]))


# Cleans up for a second when told to stop, as an agent saving its session would; argv: the compiled wrapper runs
# it, a string: the shell wrapper.
CLEANS_UP = ("trap 'sleep 1; echo cleaned > cleaned.txt; exit 0' TERM; echo up > up.txt; "
             "while :; do sleep 0.1; done")


@pytest.mark.parametrize("as_argv", [True, False], ids=["compiled-wrapper", "shell-wrapper"])
def test_a_stopped_command_gets_its_grace_before_the_kill(project, as_argv):
    """cancel and timeout SIGTERM the group and SIGKILL it after the grace: the wrapper, the group's leader, waits
    for its command (it died at once, and the group was SIGKILLed with it, cleanup cut short)."""
    order = project.order()
    command = ["sh", "-c", CLEANS_UP] if as_argv else CLEANS_UP
    write_task(order, "A", command=command, target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: (project.root / "up.txt").exists())
    assert project.aipm("cancel", "A", "--grace", "5").returncode == 0
    assert (project.root / "cleaned.txt").read_text() == "cleaned\n"
    assert task_statuses(order) == {"A": "CANCELLED"}
    (project.root / "cleaned.txt").unlink()
    write_task(order, "B", command=command, target_files=["b"], timeout=1)
    proc = project.aipm("run", "ORD", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert (project.root / "cleaned.txt").read_text() == "cleaned\n"
    assert project.json("status", "ORD")["tasks"][1]["reason"] == "timed out after 1 s"


@pytest.mark.parametrize("as_argv", [True, False], ids=["compiled-wrapper", "shell-wrapper"])
def test_a_timed_out_command_that_exits_0_on_sigterm_still_failed(project, as_argv):
    """The wrapper waits for a command that handles the timeout's SIGTERM; one that exits 0 then (an agent saving
    its session) timed out all the same: FAILED, no review, nothing merged (it was recorded DONE)."""
    order = project.order()
    script = "trap 'exit 0' TERM; echo up > up.txt; while :; do sleep 0.1; done"
    write_task(order, "T", command=["sh", "-c", script] if as_argv else script, target_files=["up.txt"],
               timeout=1, max_attempts=1, review="true")
    proc = project.aipm("run", "ORD", "--json")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["reason"]) == ("FAILED", "timed out after 1 s"), task


def _kill_run_in_the_grace(project, gate, when, stop=None):
    """Start `run`, let `stop(run)` (or the task's timeout) SIGTERM its worker, whose command then cleans up until
    `gate` exists (writing stopping.txt first), and SIGKILL `run` in that grace. `when`: "ended" lets the command
    end (its wrapper writes its code) before returning; "running" leaves it waiting on `gate`."""
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))
    try:
        wait_for(lambda: (project.root / "up.txt").exists())
        if stop:
            stop(run)
        wait_for(lambda: (project.root / "stopping.txt").exists(), 30)  # the command cleans up, run waits for it
    finally:
        run.kill()
        run.wait()
    if when == "ended":
        from conftest import state
        rec = json.loads(next((state(project.root) / "workers").rglob("*.json")).read_text())
        gate.touch()
        wait_for(lambda: os.path.exists(rec["exit_file"]))  # its wrapper wrote the command's code


@pytest.mark.parametrize("when", ["ended", "running"])
def test_a_timeout_survives_its_owners_death_during_the_grace(project, gate, when):
    """`run`'s timeout SIGTERMs a command that cleans up and exits 0, and `run` is killed during that grace: the
    adopter (recover) records the attempt as timed out, not DONE (the timeout lived only in the dead owner)."""
    order = project.order()
    write_task(order, "T", target_files=["up.txt"], max_attempts=1, timeout=1,
               command=f"trap 'echo > stopping.txt; while [ ! -e {gate} ]; do sleep 0.05; done; exit 0' TERM; "
                       "echo up > up.txt; while :; do sleep 0.05; done")
    _kill_run_in_the_grace(project, gate, when)  # the timeout stops it
    assert project.aipm("recover", "ORD").returncode == 0
    if when == "running":
        gate.touch()
    wait_for(lambda: no_workers(project.root) and task_statuses(order)["T"] != "IN_PROGRESS", 30)
    task = project.json("status", "ORD")["tasks"][0]
    assert (task["status"], task["attempts"], task["reason"]) == ("FAILED", 1, "timed out after 1 s"), task


@pytest.mark.parametrize("when", ["ended", "running"])
def test_a_run_killed_while_stopping_its_worker_leaves_it_requeued_not_counted(project, gate, when):
    """`run` stopped (SIGTERM), then killed during the grace it gives a command that cleans up: the command's code
    (its wrapper waits for it and writes it) is no outcome of its own. `recover` re-queues the task, attempt not
    counted, as the stop would have (it adopted that code: FAILED at max_attempts 1); a worker still running is
    stopped by its new owner."""
    order = project.order()
    write_task(order, "T", target_files=["up.txt"], max_attempts=1,
               command=f"[ -e stopping.txt ] && exit 0; "  # the next attempt: done at once
                       f"trap 'echo > stopping.txt; while [ ! -e {gate} ]; do sleep 0.05; done; exit 1' TERM; "
                       "echo up > up.txt; while :; do sleep 0.05; done")
    _kill_run_in_the_grace(project, gate, when, stop=lambda run: run.send_signal(signal.SIGTERM))
    if when == "running":  # `ps` said `recover` adopts it, where it re-queues the task (review finding)
        (worker,) = project.json("ps")["workers"]
        assert (worker["state"], worker["stopping"]) == ("unowned", True), worker
        shown = project.aipm("ps", env={"COLUMNS": "200"}, check=True).stdout
        assert "alive, its owner gone while stopping it (aipm recover ends it and re-queues its task)" in shown, shown
    assert project.aipm("recover", "ORD").returncode == 0
    # Re-queued (ended: by recover itself; running: by its new owner, which then starts it again: done at once).
    wanted = ("QUEUED", 0) if when == "ended" else ("DONE", 1)
    ends = ("QUEUED", "FAILED") if when == "ended" else ("DONE", "FAILED")
    wait_for(lambda: no_workers(project.root) and task_statuses(order)["T"] in ends)
    data = yaml.safe_load((order / "T.yaml").read_text())
    assert (data["status"], data["attempts"]) == wanted, data


def test_a_worker_its_dead_owner_was_stopping_is_said_stopped_by_that_owner(project, gate):
    """The `run` that adopts such a worker stops it and re-queues its task: it printed `stopped  by signal` though
    no signal had reached that run."""
    write_task(project.order(), "T", target_files=["up.txt"],
               command=f"[ -e stopping.txt ] && exit 0; "
                       f"trap 'echo > stopping.txt; while [ ! -e {gate} ]; do sleep 0.05; done; exit 1' TERM; "
                       "echo up > up.txt; while :; do sleep 0.05; done")
    _kill_run_in_the_grace(project, gate, "running", stop=lambda run: run.send_signal(signal.SIGTERM))
    proc = project.aipm("run", "ORD", "--no-resource-monitoring")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stopped  by its last owner (" in proc.stdout and "by signal" not in proc.stdout, proc.stdout


def test_cancel_stops_the_worker_while_a_sibling_task_file_is_broken(project, gate):
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    (order / "B.yaml").write_text("title: [unclosed\n")  # being edited
    proc = project.aipm("cancel", "ORD/A", "--grace", "2")
    assert proc.returncode == 0, proc.stderr
    assert task_statuses(order)["A"] == "CANCELLED"
    wait_for(lambda: not group_alive(worker["pgid"]))


def test_why_explains_around_sibling_files_that_do_not_validate(project):
    """`why` of any task failed (exit 2) on another task file of its order that does not validate, naming that file.
    Each such file (a field, a dependency on no task, a cycle) is planned as a task that cannot start and said on
    stderr; a task depending on one waits for its fix. A task's own file not validating stays the error."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["a"])
    write_task(order, "NOPE", command="true", depends_on=["MISSING"])  # a dependency that is no task
    write_task(order, "C1", command="true", depends_on=["C2"])  # a cycle
    write_task(order, "C2", command="true", depends_on=["C1"])
    write_task(order, "D", command="true", depends_on=["NOPE", "A"])
    free = project.aipm("why", "A")
    assert (free.returncode, free.stdout) == (0, "A can start now.\n"), free.stderr
    warned = free.stderr.splitlines()
    then = " (explained as a task that cannot start: a run going on waits for its fix; `launch` or a new `run` " \
           "refuses the order until then)"
    assert warned == [f"aipm: warning: {order / 'NOPE.yaml'}: depends_on: 'MISSING' is not a task of order ORD{then}",
                      f"aipm: warning: {order / 'C1.yaml'}: depends_on: dependency cycle: C1 → C2 → C1{then}"], warned
    behind = project.aipm("why", "D")
    assert behind.returncode == 0, behind.stderr
    assert behind.stdout == (f"D cannot start:\n  - waiting on NOPE: its file does not validate "
                             f"({order / 'NOPE.yaml'}: depends_on: 'MISSING' is not a task of order ORD); fix it\n"
                             "  - waiting on A (QUEUED)\n"), behind.stdout
    for own, error in (("NOPE", "depends_on: 'MISSING' is not a task of order ORD"),
                       ("C1", "depends_on: dependency cycle: C1 → C2 → C1")):
        proc = project.aipm("why", own)
        assert (proc.returncode, proc.stderr) == (2, f"aipm: error: {order / own}.yaml: {error}\n"), proc.stderr


def test_cancel_of_a_cancelled_task_whose_worker_runs_stops_it(project, gate):
    """A cancel cut short after its write (killed, or by an older aipm) left CANCELLED over a live worker."""
    order = project.order()
    path = write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    path.write_text(path.read_text().replace("status: IN_PROGRESS", "status: CANCELLED"))
    proc = project.aipm("cancel", "A", "--grace", "2")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: not group_alive(worker["pgid"]))
    wait_for(lambda: no_workers(project.root))
    assert task_statuses(order) == {"A": "CANCELLED"}
    # With no worker left, cancelling it again is the usual one-line refusal.
    again = project.aipm("cancel", "A")
    assert again.returncode == 2 and "status: CANCELLED cannot be cancelled" in again.stderr, again.stderr


@pytest.mark.parametrize("wrote", ["DONE", "CANCELLED"])
def test_cancel_stops_a_live_worker_whatever_status_it_wrote_into_its_own_file(project, gate, wrote):
    """A worker that wrote `status: DONE` into its own file could not be cancelled while it ran ('status: DONE
    cannot be cancelled', exit 2): the file outranked the live worker. Now its status is put back, then cancelled.
    One that wrote CANCELLED was taken for a cancel cut short: stopped, with no `finished_at` or reason written."""
    order = project.order()
    write_task(order, "A", target_files=["a"], command=(
        f"sed -i 's/^status: .*/status: {wrote}/' orders/ORD/A.yaml; while [ ! -e {gate} ]; do sleep 0.05; done"))
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: task_statuses(order)["A"] == wrote
                      and next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    proc = project.aipm("cancel", "A", "--grace", "2")
    assert proc.returncode == 0, proc.stderr
    wait_for(lambda: not group_alive(worker["pgid"]))
    wait_for(lambda: no_workers(project.root))
    data = yaml.safe_load((order / "A.yaml").read_text())
    assert (data["status"], data["attempts"], data["reason"]) == ("CANCELLED", 1, "cancelled"), data
    assert data.get("finished_at"), data


def test_retry_of_a_running_task_is_refused(project, gate):
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done")
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: any(w["pgid"] for w in project.json("ps")["workers"]))
    proc = project.aipm("retry", "A")
    assert proc.returncode == 2 and "it is running (cancel it first)" in proc.stderr, proc.stderr
    gate.touch()
    wait_for(lambda: no_workers(project.root))


def test_retry_of_a_stale_task_says_so_and_names_recover(project):
    """IN_PROGRESS with no worker (its owner died): not "running" — `recover` is what puts it back."""
    order = project.order()
    path = write_task(order, "A", command="true", status="IN_PROGRESS", attempts=1)
    before = path.read_bytes()
    proc = project.aipm("retry", "A")
    assert proc.returncode == 2 and "no worker runs it (stale); `aipm recover ORD`" in proc.stderr, proc.stderr
    assert path.read_bytes() == before


def test_retry_writes_only_what_it_changes(project):
    """A task that never ran has nothing to clear: its file stays byte for byte (retry wrote seven lines of
    `status: QUEUED`, zeros and nulls into it). A failed one gets its managed values reset, and no new lines."""
    order = project.order()
    fresh = order / "A.yaml"
    fresh.write_text("command: 'true'  # build it\n")
    proc = project.aipm("retry", "A")
    assert proc.returncode == 0 and fresh.read_text() == "command: 'true'  # build it\n", fresh.read_text()
    failed = order / "B.yaml"
    failed.write_text("command: 'exit 3'\n")
    assert project.aipm("run", "ORD").returncode == 1
    written = failed.read_text().splitlines()
    assert project.aipm("retry", "B").returncode == 0
    after = failed.read_text().splitlines()
    assert len(after) == len(written) and "status: QUEUED" in after and "attempts: 0" in after, after


def test_ps_locks_and_logs_follow(project):
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", command=f"echo started; while [ ! -e {gate} ]; do sleep 0.05; done; echo finished",
               target_files=["src/", "x.py"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    assert worker["task"] == "A" and worker["alive"] and worker["elapsed"] is not None
    locks = project.json("locks")["locks"]
    assert {(l["path"], l["task"], l["held"]) for l in locks} == {("src/", "A", True), ("x.py", "A", True)}
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "A", "-f"],
                                stdout=subprocess.PIPE, text=True)
    gate.touch()
    out, _ = follower.communicate(timeout=60)
    assert "started" in out and "finished" in out
    wait_for(lambda: no_workers(project.root))
    log = project.aipm("logs", "A").stdout
    assert log.rstrip().splitlines()[-1].endswith("attempt 1 ended: exit 0")


def test_logs_of_a_task_show_its_reviews_output(project):
    """`aipm logs T` of a task its review sent back printed only where the review's output was ("review output:
    PATH"), though the REJECTED line says `aipm logs T` shows why. The review's lines follow the work's, under a
    header; followed (-f) during the review, they come as the reviewer prints them, before the verdict."""
    order = project.order()
    gate = project.root / "gate"
    review = f"echo reviewing; while [ ! -e {gate} ]; do sleep 0.05; done; echo 'FAIL: missing tests'; exit 1"
    write_task(order, "W", command="echo working", review=review, max_rework=0)
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: task_statuses(order)["W"] == "IN_REVIEW")
    follower = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "logs", "W", "-f"],
                                stdout=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip("\n") for line in follower.stdout))
    reader.start()
    try:  # (the follower has printed what the reviewer had before the gate opens)
        wait_for(lambda: "reviewing" in lines, timeout=60)
    finally:
        gate.touch()
        try:
            follower.wait(timeout=60)
        finally:
            follower.kill()  # (ended already, but where it did not)
        reader.join(timeout=60)
    wait_for(lambda: task_statuses(order)["W"] == "REJECTED")
    assert lines[0] == "working" and "==> W.1.review.log (its review) <==" in lines, lines
    assert lines.index("FAIL: missing tests") < next(i for i, l in enumerate(lines) if "review sent back" in l), lines
    printed = project.aipm("logs", "W").stdout.splitlines()
    assert printed[-3:] == ["==> W.1.review.log (its review) <==", "reviewing", "FAIL: missing tests"], printed


def test_logs_as_json_carry_the_review_output_the_text_shows(project):
    """`aipm logs R` ends with its review's output (`==> R.2.review.log (its review) <==`); `--json` stopped at the
    work log's end, with no field for the review. It has review_log and review_text (each attempt's own), left out
    for an attempt with no review, as the text output shows none."""
    order = project.order()
    write_task(order, "R", command="echo working",
               review="if [ -e ok ]; then echo 'looks good'; else touch ok; echo 'FAIL: no tests'; exit 1; fi")
    write_task(order, "P", command="echo plain")
    assert project.aipm("run", "ORD").returncode == 0
    logs = project.root / ".aipm/logs/ORD"
    shown = project.aipm("logs", "R", check=True).stdout
    assert shown.endswith("==> R.2.review.log (its review) <==\nlooks good\n"), shown
    got = project.json("logs", "R")
    assert list(got) == ["order", "task", "attempt", "attempts", "log", "review_log", "text", "review_text"], got
    assert (got["attempt"], got["review_log"], got["review_text"]) == (2, str(logs / "R.2.review.log"), "looks good\n")
    assert got["text"] == (logs / "R.2.log").read_text() and shown.startswith(got["text"]), got
    first = project.json("logs", "R", "--attempt", "1")
    assert (first["review_log"], first["review_text"]) == (str(logs / "R.1.review.log"), "FAIL: no tests\n"), first
    assert "review_log" not in project.json("logs", "P") and "review_text" not in project.json("logs", "P")


def test_recover_adopts_a_worker_whose_owner_died(project):
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done-a", target_files=["a"])
    write_task(order, "B", command="true", depends_on=["A"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    os.kill(worker["owner_pid"], signal.SIGKILL)  # the detached owner dies; its worker lives on
    wait_for(lambda: not pid_alive(worker["owner_pid"]))
    out = project.json("recover", "ORD")
    assert out["recovered"] == [{"order": "ORD", "id": "A", "action": "adopted"}]
    gate.touch()
    wait_for(lambda: task_statuses(order) == {"A": "DONE", "B": "DONE"})
    wait_for(lambda: no_workers(project.root))
    assert project.json("status", "ORD")["tasks"][0]["attempts"] == 1  # the real outcome, not a re-run


def test_recover_of_every_order_refused_by_another_orders_bad_file_names_the_order_argument(project):
    """A task file of order B being edited (invalid) refused `aipm recover` of every order with B's error alone,
    though `status A` sent the user there; it says nothing was recovered and how to recover one order."""
    write_task(project.order("A"), "T", command="true", status="IN_PROGRESS", attempts=1)
    write_task(project.order("B"), "U", command="true", priority="P9")
    before = snapshot(project.root)
    proc = project.aipm("recover")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr == (f"aipm: error: {project.order('B') / 'U.yaml'}: priority: 'P9' is not one of P0, P1, P2, "
                           "P3; nothing recovered: fix it, or recover one order: aipm recover ORDER\n")
    assert snapshot(project.root) == before
    assert project.json("recover", "A")["recovered"] == [{"order": "A", "id": "T", "action": "requeued"}]


def _adopted_after_kill_9(project, gate, rewrite) -> subprocess.Popen:
    """`aipm run ORD` of A (waiting for `gate`) killed with SIGKILL once A's worker runs; its record rewritten by
    `rewrite` (the record's JSON → what to write instead); a second run started, which adopts A; then the gate
    opened. The second run (its output piped)."""
    argv = [sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"]
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    first = subprocess.Popen(argv, cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    path = state(project.root) / "workers" / "ORD" / "A.json"
    record = wait_for(lambda: path.exists() and json.loads(path.read_text()).get("pid") and json.loads(
        path.read_text()))
    first.kill()
    first.wait()
    path.write_text(json.dumps(rewrite(record)))
    second = subprocess.Popen(argv, cwd=project.root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env)
    wait_for(lambda: second.poll() is not None or json.loads(path.read_text())["owner_pid"] == second.pid)
    gate.touch()
    return second


def test_a_record_with_a_field_from_a_newer_aipm_is_adopted_after_a_kill_9_of_run(project, gate):
    """A record carrying a field this version does not know (a newer aipm wrote it) was ignored whole: after
    `kill -9` of `run` the next run could not adopt the live worker (IN_PROGRESS, exit 1) and its outcome was
    lost."""
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done-a", target_files=["a"])
    second = _adopted_after_kill_9(project, gate, lambda record: {**record, "a_field_from_a_newer_aipm": {"any": 1}})
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0, out
    assert "adopt    A" in out, out
    assert task_statuses(order) == {"A": "DONE"}
    assert project.json("status", "ORD")["tasks"][0]["attempts"] == 1  # the adopted worker's outcome, no re-run


def test_an_attempt_an_older_aipm_started_is_not_said_edited_by_the_field_this_one_added(project, gate):
    """`review` joined the fields an attempt runs by (model._RAN_FIELDS): the digest an older aipm wrote into its
    record, without it, differed from this one's, and an attempt it started, adopted after a `kill -9` of its run,
    was said `edited while attempt 1 ran` though nobody had touched its file."""
    from aipm.model import _RAN_FIELDS, _digest
    from aipm.store import load_task

    order = project.order()
    task = write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])

    def as_older(record: dict) -> dict:  # as an older aipm wrote it: no review pinned, its digest without it
        older = {key: value for key, value in record.items() if key != "review"}
        return {**older, "ran_by": _digest(load_task(task, project.root), tuple(f for f in _RAN_FIELDS
                                                                                 if f != "review"))}
    second = _adopted_after_kill_9(project, gate, as_older)
    out, _ = second.communicate(timeout=60)
    assert second.returncode == 0 and task_statuses(order) == {"A": "DONE"}, out
    assert "edited" not in project.aipm("logs", "A").stdout


def test_detect_summary_and_json(project):
    order = project.order()
    write_task(order, "A", command="true", target_files=["a"], priority="P0")
    write_task(order, "B", command="true", target_files=["a"])
    write_task(order, "C", command="true", depends_on=["A"])
    data = project.json("detect", "ORD")
    assert [t["id"] for t in data["launchable"]] == ["A"]
    reasons = {b["id"]: b["reason"] for b in data["blocked"]}
    assert reasons == {"B": "file_conflict_in_round", "C": "waiting_on_dependencies"}
    summary = project.aipm("detect", "ORD", "--summary").stdout
    assert "launchable: 1" in summary and "blocked by files: 1" in summary
    assert [t["id"] for t in project.json("detect", "ORD", "--max-workers", "1")["launchable"]] == ["A"]


def test_detect_shows_every_reason_a_task_is_held_by_not_only_the_first(project):
    """detect showed one reason per task: B, held by the reached budget and by A, its dependency, showed only the
    budget; C, held by it and by a file a stale task holds, only the budget. Raising the budget, the user found them
    still held. The first reason stays `reason` (as before); the others are `other_reasons`, and lines below it."""
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\nmax_cost_usd: 0.1\n")
    write_task(order, "A", command="true", cost_usd=0.1)
    write_task(order, "B", command="true", depends_on=["A"])
    write_task(order, "H", command="true", status="IN_PROGRESS", target_files=["h.py"])
    write_task(order, "C", command="true", target_files=["h.py"])
    blocked = {b["id"]: b for b in project.json("detect", "ORD")["blocked"]}
    assert (blocked["B"]["reason"], blocked["C"]["reason"]) == ("budget", "budget")
    assert [(r["reason"], r["tasks"]) for r in blocked["B"]["other_reasons"]] == [("waiting_on_dependencies", ["A"])]
    assert [(r["reason"], r["path"]) for r in blocked["C"]["other_reasons"]] == [("file_busy", "h.py")]
    assert "other_reasons" not in blocked["A"] and "other_reasons" not in blocked["H"]  # one reason: none other
    lines = project.aipm("detect", "ORD").stdout.splitlines()
    at = lines.index(next(line for line in lines if line.startswith("  B: budget reached")))
    assert lines[at + 1] == "     also: waiting on A (QUEUED)", lines


def test_detect_with_nothing_launchable_says_so_instead_of_an_empty_table(project):
    order = project.order()
    write_task(order, "A", command="true", status="DONE")
    write_task(order, "B", command="true", status="FAILED")
    write_task(order, "C", command="true", depends_on=["B"])
    lines = project.aipm("detect", "ORD", check=True).stdout.splitlines()
    assert lines == ["Nothing may start in ORD now (5 free worker slot(s))", "Not launchable:",
                     "  C: can never run: B is FAILED"], lines


def test_status_says_a_cancelled_dependency_is_never_waited_for(project):
    """`status` marked R1 as still waited on (`R1…`) after R1 was CANCELLED: it can never be DONE or COMPLETED, so
    R2 (and R3 behind R2) can never run, as `detect`, `why` and `run`'s end already said."""
    order = project.order()
    write_task(order, "R1", command="true")
    write_task(order, "R2", command="true", depends_on=["R1"])
    write_task(order, "R3", command="true", depends_on=["R2"])
    write_task(order, "W", command="true", depends_on=["Q"])
    write_task(order, "Q", command="true")
    project.aipm("cancel", "R1", check=True)
    table = project.aipm("status", "ORD", "--wide").stdout
    deps = {cells[1].strip(): cells[4].strip() for line in table.splitlines()
            if len(cells := line.split("│")) > 4 and cells[1].strip()}
    assert (deps["R2"], deps["R3"], deps["W"]) == ("R1✗", "R2✗", "Q…"), table
    assert table.splitlines()[-1] == "R2, R3 can never run: R1 is CANCELLED; fix what stopped it, then `aipm retry R1`"
    rows = {t["id"]: t for t in project.json("status", "ORD")["tasks"]}
    assert rows["R2"]["never_runs"] == rows["R3"]["never_runs"] == {"task": "R1", "status": "CANCELLED",
                                                                    "all": [{"task": "R1", "status": "CANCELLED"}]}
    assert "never_runs" not in rows["W"] and "never_runs" not in rows["R1"]


def test_why_in_words_and_json(project):
    order = project.order()
    write_task(order, "A", command="true", status="FAILED")
    write_task(order, "B", command="true", depends_on=["A"])
    words = project.aipm("why", "B").stdout
    assert "can never run: A is FAILED" in words
    assert project.aipm("why", "A").stdout.splitlines()[-1] == "  `aipm retry A` queues it again"  # what to do
    data = project.json("why", str(order / "B.yaml"))
    assert data["launchable"] is False and data["reasons"][0]["tasks"] == ["A"]
    assert project.json("why", "A")["reasons"][0]["reason"] == "not_queued"


def test_an_order_is_named_by_the_id_its_order_yaml_gives(project):
    """CONTRACT: the order id is order.yaml's `id`, and an ORDER argument is an order id. Every command reports
    orders/sprint-12 with `id: ORDER_012` as ORDER_012; naming it so was 'no directory orders/ORDER_012'."""
    order = project.order("sprint-12")
    (order / "order.yaml").write_text("id: ORDER_012\n")
    write_task(order, "A", command="echo hello")
    write_task(order, "B", command="true", depends_on=["A"])
    assert project.json("status", "ORDER_012")["order"] == "ORDER_012"
    assert [t["id"] for t in project.json("detect", "ORDER_012")["launchable"]] == ["A"]
    assert project.json("why", "ORDER_012/B")["reasons"][0]["tasks"] == ["A"]
    assert project.aipm("run", "ORDER_012").returncode == 0
    assert project.json("logs", "ORDER_012")["lines"][0] == {"task": "A", "line": "hello"}
    proc = project.aipm("status", "ORDER_013")
    assert proc.returncode == 2 and "no directory orders/ORDER_013" in proc.stderr


def test_a_name_that_is_one_orders_directory_and_another_orders_id_is_refused_as_ambiguous(project):
    """orders/old says `id: SPRINT` (every command reports it as SPRINT); orders/SPRINT is another order (id NEXT).
    'SPRINT' silently meant the directory, so `run SPRINT` ran NEXT and `status SPRINT` showed it, though the
    order reported as SPRINT exists. Found by a review of 7800b7f (repro 01-order-id-shadowed-by-directory.sh)."""
    old, other = project.order("old"), project.order("SPRINT")
    (old / "order.yaml").write_text("id: SPRINT\n")
    (other / "order.yaml").write_text("id: NEXT\n")
    write_task(old, "A", command="true")
    write_task(other, "B", command="true")
    for args in (("status", "SPRINT"), ("run", "SPRINT"), ("logs", "SPRINT"), ("why", "SPRINT/B")):
        proc = project.aipm(*args)
        assert proc.returncode == 2 and "ambiguous" in proc.stderr, (args, proc.stdout, proc.stderr)
    assert project.statuses("old") == project.statuses("orders/old") == {"A": "QUEUED"}  # nothing ran
    assert project.json("status", "orders/SPRINT")["order"] == "NEXT"  # a path says which
    assert project.json("status", "NEXT")["order"] == "NEXT"
    # A directory named as its own id, or an id no other directory has, is as before.
    (old / "order.yaml").write_text("id: LATER\n")
    assert project.json("status", "SPRINT")["order"] == "NEXT"


def test_dot_inside_an_order_directory_is_that_order_and_the_orders_directory_is_no_order(project):
    """`cd orders/ORD && aipm run .` looked `.` up as an order id: orders/. is the orders directory itself, an order
    of no tasks, so the run said 'orders: no tasks' and exited 0 with nothing run. A path is taken from the working
    directory, as the contract says, and the orders directory is no order. Found by a review."""
    write_task(project.order(), "A", command="true")

    def aipm(cwd, *args):
        return subprocess.run([sys.executable, "-m", "aipm", *args], capture_output=True, text=True, cwd=cwd,
                              env={**os.environ, "AIPM_ENABLE_MONITORING": "false"})

    order, orders = project.order(), project.root / "orders"
    assert json.loads(aipm(order, "status", ".", "--json").stdout)["order"] == "ORD"
    assert json.loads(aipm(order, "status", "./", "--json").stdout)["order"] == "ORD"
    proc = aipm(order, "run", ".")
    assert proc.returncode == 0 and task_statuses(order) == {"A": "DONE"}, proc.stderr
    assert json.loads(aipm(project.root, "status", "ORD/", "--json").stdout)["order"] == "ORD"
    before = snapshot(project.root)
    for cwd, arg in ((order, ".."), (orders, "."), (project.root, "orders"), (project.root, "orders/")):
        for command in ("status", "run"):
            proc = aipm(cwd, command, arg)
            assert proc.returncode == 2 and "is the directory of the orders, not an order" in proc.stderr, (
                cwd, arg, proc.stdout, proc.stderr)
            assert "orders here: ORD" in proc.stderr
            assert len(proc.stderr.splitlines()) == 1 and proc.stdout == ""
    assert snapshot(project.root) == before


def test_an_id_two_orders_give_is_named_as_such_not_as_no_directory(project):
    """Two order.yaml with the same id: naming either directory said 'also the id of ...', but naming the id said
    'no directory orders/SAME ... and no such path'. Found by a review of 7800b7f
    (repro 03-duplicate-order-id-by-id-says-no-directory.sh)."""
    for name in ("a", "b"):
        (project.order(name) / "order.yaml").write_text("id: SAME\n")
    write_task(project.order("a"), "A", command="true")
    proc = project.aipm("status", "SAME")
    assert proc.returncode == 2 and "is also the id of" in proc.stderr, proc.stderr


def test_an_adopted_worker_killed_from_outside_counts_as_a_failed_attempt(project):
    order = project.order()
    write_task(order, "A", command="sleep 60", target_files=["a"], max_attempts=1)
    project.aipm("launch", "ORD", check=True)
    first = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    os.kill(first["owner_pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(first["owner_pid"]))
    assert project.json("recover", "ORD")["recovered"] == [{"order": "ORD", "id": "A", "action": "adopted"}]
    adopted = wait_for(lambda: next((w for w in project.json("ps")["workers"]
                                     if w["owner_pid"] not in (0, first["owner_pid"])), None))
    os.killpg(adopted["pgid"], signal.SIGKILL)  # no exit code will ever be written
    wait_for(lambda: task_statuses(order) == {"A": "FAILED"})  # not re-queued: repeated kills must end
    wait_for(lambda: no_workers(project.root))
    assert "without an exit code" in project.aipm("logs", "A").stdout


def test_ps_reads_a_worker_whose_children_come_and_go(project):
    """A worker polling with short-lived children (`sleep`, `true`): a child that ends while `ps` sums CPU and
    memory over the worker's tree must not blank the worker's own figures (elapsed, CPU, memory)."""
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do /bin/true; done", target_files=["a.txt"])
    project.aipm("launch", "ORD", check=True)
    wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    try:
        # Fifteen readings, as many at once as aipm_all runs (each its own process): the children end meanwhile.
        procs = project.aipm_all([("ps", "--json")] * 15)
    finally:
        gate.touch()
    assert all(proc.returncode == 0 for proc in procs), [proc.stderr for proc in procs]
    for workers in (json.loads(proc.stdout)["workers"] for proc in procs):
        assert [w["task"] for w in workers] == ["A"]
        assert all(w[k] is not None for w in workers for k in ("elapsed", "cpu_percent", "memory_mb")), workers
    wait_for(lambda: no_workers(project.root))


def test_ps_shows_the_cpu_a_busy_worker_uses(project):
    """`ps` read each process's psutil cpu_percent(interval=None) once, which is 0.0 at a Process object's first
    call: a worker spinning a core showed 'cpu % 0.0'. It shows ps(1)'s %CPU now: the CPU time its processes
    used over its elapsed time."""
    order = project.order()
    spun = project.root / "spun"
    # Spins until it has used a tenth of a CPU-second itself (so the figure cannot be 0), then waits for the gate.
    gate = project.root / "gate"
    write_task(order, "HOT", command=[sys.executable, "-c", (
        "import os, time, pathlib\n"
        "while sum(os.times()[:2]) < 0.1: pass\n"
        f"pathlib.Path({str(spun)!r}).touch()\n"
        f"while not os.path.exists({str(gate)!r}): time.sleep(0.05)\n")])
    project.aipm("launch", "ORD", check=True)
    try:
        wait_for(spun.exists)
        workers = project.json("ps")["workers"]
    finally:
        gate.touch()
    assert [w["task"] for w in workers] == ["HOT"] and workers[0]["cpu_percent"] > 0, workers
    wait_for(lambda: no_workers(project.root))


def test_ps_says_a_stopped_worker_is_stopped(project):
    """A worker stopped by `kill -STOP` (/proc state T) was shown as `alive`, in the table and in --json."""
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.1; done", target_files=["a.txt"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    assert worker["state"] == "alive"
    os.killpg(worker["pgid"], signal.SIGSTOP)
    try:
        wait_for(lambda: psutil.Process(worker["pid"]).status() == psutil.STATUS_STOPPED)
        assert "stopped" in project.aipm("ps").stdout
        assert [w["state"] for w in project.json("ps")["workers"]] == ["stopped"]
    finally:
        os.killpg(worker["pgid"], signal.SIGCONT)
    wait_for(lambda: psutil.Process(worker["pid"]).status() != psutil.STATUS_STOPPED)
    assert [w["state"] for w in project.json("ps")["workers"]] == ["alive"]
    gate.touch()
    wait_for(lambda: no_workers(project.root))


def test_a_root_that_is_not_a_directory_is_one_line_and_creates_nothing(tmp_path):
    """A mistyped --root (or AIPM_ROOT_DIR) was a traceback (exit 1), and `new` made the mistyped tree."""
    missing, a_file = tmp_path / "nope", tmp_path / "file"
    a_file.write_text("x")
    for root, args in [(missing, ["run", "X"]), (missing, ["ps"]), (missing, ["recover"]), (missing, ["new", "X"]),
                       (missing, ["status", "X", "--json"]), (a_file, ["locks"]), (a_file, ["init"])]:
        proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), *args], capture_output=True,
                              text=True, timeout=60)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert f"project root {root} (--root or AIPM_ROOT_DIR): " in proc.stderr
    env = dict(os.environ, AIPM_ROOT_DIR=str(missing))
    proc = subprocess.run([sys.executable, "-m", "aipm", "ps"], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    made = missing / "a"
    proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(made), "init"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and (made / "aipm.yaml").is_file() and (made / "orders").is_dir(), proc.stderr


def test_brackets_in_paths_and_help_are_shown_not_taken_for_markup(project):
    """Rich reads `[ab]` as markup: `lib/[ab].c` was shown as `lib/.c`, and `ui --help` said `pip install 'aipm'`."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["lib/[ab].c"])
    write_task(order, "B", command="true", depends_on=["A"], target_files=["[x]/y.txt"])
    assert "lib/[ab].c" in project.aipm("detect", "ORD", check=True).stdout
    shown = project.aipm("status", "ORD", "--wide", check=True).stdout
    assert "lib/[ab].c" in shown and "[x]/y.txt" in shown
    assert "pip install 'aipm[ui]'" in project.aipm("ui", "--help", check=True).stdout


@pytest.mark.parametrize("title", ["fix the [/] parser", "[bug] lost lines", "[link=https://example.com]docs[/link]"])
def test_an_order_title_with_brackets_is_shown_as_written(project, title):
    """status put order.yaml's title into the table's title as markup: '[/]' ended it in a MarkupError traceback
    (exit 1, no table), '[bug]' vanished, and a '[link=...]' made the title a terminal hyperlink to its URL."""
    order = project.order()
    (order / "order.yaml").write_text(f"id: ORD\ntitle: {json.dumps(title)}\n")
    write_task(order, "A", command="true")
    proc = project.aipm("status", "ORD", "--wide", env={"COLUMNS": "200"})
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert f"Order ORD — {title}" in proc.stdout, proc.stdout


def test_every_help_shows_flags_as_flags_without_a_type(project):
    """Typer's rich help gave every flag a `<bool>` type cell (`--json <bool>`), as if it took a value: a flag's
    row is its name and its help; an option that takes a value keeps its type."""
    from aipm.cli import COMMAND_MODULES

    commands = ["", *COMMAND_MODULES]
    helps = dict(zip(commands, project.aipm_all([(c, "--help") if c else ("--help",) for c in commands],
                                                env={"COLUMNS": "200"}, check=True)))
    for command, proc in helps.items():
        assert "<bool>" not in proc.stdout, (command, proc.stdout)
        assert re.search(r"--help\s+-h\s+Show this message", proc.stdout), (command, proc.stdout)
    shown = helps["run"].stdout
    assert re.search(r"--no-review\s+Skip review", shown) and re.search(r"--max-workers\s+<int>", shown)


@pytest.fixture(scope="module")
def wide_helps(tmp_path_factory):
    """Every command's `--help` on a 1000-column terminal, by command name: made once for the tests that read it."""
    from aipm.cli import _load_commands, decl
    from conftest import Project

    _load_commands()
    names = [name or function.__name__ for name, function in decl.COMMANDS]
    project = Project(tmp_path_factory.mktemp("helps"))
    return dict(zip(names, project.aipm_all([(name, "--help") for name in names], env={"COLUMNS": "1000"},
                                            check=True)))


def test_every_help_wraps_its_paragraphs_to_the_terminal(wide_helps):
    """Typer's rich help kept every line break of a docstring: `run --help` said "... the last line counts the" and
    then "tasks by status." on a line of its own, at any width. Each paragraph is one line on a wide terminal."""
    import inspect

    from aipm.cli import _load_commands, decl

    _load_commands()
    assert len(wide_helps) == len(decl.COMMANDS)
    for given, function in decl.COMMANDS:
        name = given or function.__name__
        shown = [" ".join(line.strip(" │").split()) for line in wide_helps[name].stdout.splitlines()]
        for paragraph in inspect.cleandoc(function.__doc__).replace("\\[", "[").split("\n\n"):  # (rich's escape)
            assert " ".join(paragraph.split()) in shown, (name, paragraph)


def test_json_help_names_what_the_command_prints_without_it(wide_helps):
    """`graph --help` said --json prints JSON "instead of a table", but graph prints Mermaid or DOT text; diff,
    why, validate, launch and recover print no table either."""
    tables = {"status", "detect", "ps", "locks", "config", "resources"}
    names = ["graph", "diff", "why", "validate", "launch", "recover", *sorted(tables)]
    said = {name: " ".join(line.split()) for name in names
            for line in wide_helps[name].stdout.splitlines() if "--json " in line}
    assert "JSON ({order, nodes, edges}) instead of Mermaid or DOT text." in said["graph"], said
    assert "{order, task, source, also_kept, patch} as JSON instead of the bare patch." in said["diff"], said
    assert {name for name, line in said.items() if "instead of a table" in line} == tables, said


def test_status_at_80_columns_keeps_each_status_whole(project):
    order = project.order()
    write_task(order, "A_TASK_WITH_A_LONG_NAME", command="true", status="IN_PROGRESS", attempts=1,
               target_files=["src/some/deeply/nested/module_with_a_long_name.py"], depends_on=[])
    write_task(order, "B", command="true", status="REJECTED", depends_on=["A_TASK_WITH_A_LONG_NAME"])
    out = project.aipm("status", "ORD", env={"COLUMNS": "80"}, check=True).stdout
    # No worker runs A: it reads INTERRUPTED, a word as long as IN_PROGRESS, the longest.
    assert "INTERRUPTED" in out and "REJECTED" in out, out
    assert "cost" not in out  # no task has a cost and there is no budget: no column of dashes


def test_status_at_80_columns_keeps_the_walkthroughs_paths_whole(project):
    """The walkthrough's order at 80 columns showed `site/greet` / `ing.txt` under a header four lines high
    (`depends on / waiting on`) beside an empty `reason` column: paths now give way last."""
    order = project.order()
    write_task(order, "TASK_001", command="true", target_files=["site/greeting.txt"])
    write_task(order, "TASK_002", command="true", target_files=["site/farewell.txt"])
    write_task(order, "TASK_003", command="true", target_files=["site/index.html"],
               depends_on=["TASK_001", "TASK_002"])
    out = project.aipm("status", "ORD", env={"COLUMNS": "80"}, check=True).stdout
    assert all(path in out for path in ("site/greeting.txt", "site/farewell.txt", "site/index.html")), out
    assert "reason" not in out  # no attempt ended yet: no empty column
    header = [line for line in out.splitlines() if line.startswith("┃")]
    assert len(header) == 1 and "depends on" in header[0], out


def test_tables_in_a_pipe_break_no_word_and_honour_columns(project):
    """In a pipe or a file (no terminal, no COLUMNS) Rich laid tables out at 80 columns and broke words inside
    narrow cells: `aipm status ORD | cat` showed a reason's "supervisor" as `superviso` / `r`. There, like git
    and kubectl, a table is as wide as its cells; COLUMNS still sets a width."""
    command = '["claude", "-p", "--append-system-prompt", "keep every supervisor line whole"]'
    (project.root / "aipm.yaml").write_text(f"max_workers: 5\nworker:\n  command: {command}\n")
    order = project.order()
    reason = "interrupted: its worker was lost with its supervisor and nobody recovered it yet"
    long_path = "docs/" + "a_rather_long_directory_name/" * 3 + "reference.md"
    write_task(order, "A", command="true", status="INTERRUPTED", attempts=1, reason=reason,
               target_files=["aipm/cli/display.py", long_path])
    write_task(order, "B", command="true", target_files=["src/" + "/".join(["nested"] * 12) + "/module.py"])
    # No terminal anywhere: Rich also takes its width from a terminal on stdin.
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}

    def shown(*args: str, **extra: str) -> str:
        return subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), *args],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, env={**env, **extra},
                              timeout=120, check=True).stdout

    status = shown("status", "ORD")
    (row,) = [line for line in status.splitlines() if line.startswith("│ A ")]
    assert reason in row and "aipm/cli/display.py" in row, status
    assert long_path in status and "/".join(["nested"] * 12) in status, status
    assert "src/" + "/".join(["nested"] * 12) + "/module.py" in shown("detect", "ORD")
    (row,) = [line for line in shown("config").splitlines() if "worker.command" in line]
    assert "keep every supervisor line whole" in row
    narrow = shown("status", "ORD", COLUMNS="80")  # the reason wraps to fit
    (row,) = [line for line in narrow.splitlines() if line.startswith("│ A ")]
    assert "INTERRUPTED" in row and reason not in row and len(row) < len(status.splitlines()[1]), narrow


def test_exec_runs_its_task_though_a_higher_priority_task_it_will_not_start_shares_its_file(project):
    """`exec S3` was refused: "s1.txt overlaps S1, which starts first this round", though exec starts S3 alone."""
    order = project.order()
    write_task(order, "S1", command="true", priority="P1", target_files=["s1.txt"])
    write_task(order, "S3", command="true", priority="P2", target_files=["./s1.txt"])
    proc = project.aipm("exec", "S3", "--no-resource-monitoring")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert task_statuses(order) == {"S1": "QUEUED", "S3": "DONE"}


def test_version_and_logs_as_json(project):
    import aipm

    proc = project.aipm("--version", check=True)
    assert proc.stdout == f"aipm {aipm.__version__}\n"
    order = project.order()
    write_task(order, "A", command="echo hello; exit 3", max_attempts=2)
    project.aipm("run", "ORD", "--no-resource-monitoring")
    one = project.json("logs", "A")
    assert (one["order"], one["task"], one["attempt"], one["attempts"]) == ("ORD", "A", 2, [1, 2])
    assert one["text"].startswith("hello\n") and one["log"].endswith("A.2.log")
    assert project.json("logs", "A", "--attempt", "1")["attempt"] == 1
    lines = project.json("logs", "ORD")["lines"]
    assert {"task": "A", "line": "hello"} in lines and {line["task"] for line in lines} == {"A"}
    refused = project.aipm("logs", "A", "-f", "--json")
    assert refused.returncode == 2 and "not with -f" in refused.stderr


def test_logs_of_an_order_with_attempt_says_attempts_are_a_tasks(project):
    """`aipm logs ORD --attempt 1` looked ORD up as a task and said "task 'ORD': not found in any order", of an
    order that exists: the fix is to name the task, which the message now says."""
    write_task(project.order(), "A", command="echo hello")
    assert project.aipm("run", "ORD").returncode == 0
    proc = project.aipm("logs", "ORD", "--attempt", "1")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "--attempt" in proc.stderr and "'ORD' is an order" in proc.stderr and "not found" not in proc.stderr
    assert project.aipm("logs", "ORD/A", "--attempt", "1").stdout.startswith("hello\n")


def test_new_refuses_a_title_over_two_lines_and_writes_nothing(project):
    """`aipm new O --title $'a\\nb'` wrote an order.yaml every command then refused (a title is one line, since
    e1269a0), validate included; `aipm add` already refused such a title before writing. Found by a review
    (repro 02-new-title-two-lines-writes-broken-order.sh)."""
    before = snapshot(project.root)
    proc = project.aipm("new", "O", "--title", "Sprint 12\nsecond line")
    assert proc.returncode == 2 and "title" in proc.stderr and "one line" in proc.stderr, proc.stderr
    assert snapshot(project.root) == before and not (project.root / "orders" / "O").exists()
    project.aipm("new", "O", "--title", "Sprint 12", check=True)
    assert project.json("validate", "O")


def test_new_refuses_an_id_another_orders_file_gives_and_writes_nothing(project):
    """orders/sprint-12/order.yaml says `id: ORDER_012`; `aipm new ORDER_012` made orders/ORDER_012 anyway, and
    from then on every command refused both orders (the existing one too): 'order id is also the id of ...'."""
    write_task(project.order("sprint-12"), "A", command="true")
    (project.root / "orders" / "sprint-12" / "order.yaml").write_text("id: ORDER_012\n")
    before = snapshot(project.root)
    proc = project.aipm("new", "ORDER_012")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stdout + proc.stderr
    assert "ORDER_012/order.yaml: id:" in proc.stderr and "sprint-12/order.yaml" in proc.stderr, proc.stderr
    assert snapshot(project.root) == before and not (project.root / "orders" / "ORDER_012").exists()
    assert project.statuses("ORDER_012") == {"A": "QUEUED"}


def test_new_and_add_refuse_an_argument_that_is_not_utf8_and_write_nothing(project):
    """`aipm new O --title $'\\xe9t\\xe9'` (Latin-1 bytes) wrote `title: "\\uDCE9t\\uDCE9"`, which YAML refuses:
    exit 0, then every command on O said 'broken YAML'. `add` refused such bytes, but by a YAML error of a file
    that does not exist. Both now name the flag."""
    def aipm(*args: bytes) -> subprocess.CompletedProcess:  # bytes as a shell passes them, not valid UTF-8
        return subprocess.run([sys.executable.encode(), b"-m", b"aipm", b"--root", bytes(project.root), *args],
                              capture_output=True)

    before = snapshot(project.root)
    proc = aipm(b"new", b"O", b"--title", b"\xe9t\xe9")
    assert proc.returncode == 2 and proc.stderr.count(b"\n") == 1, proc.stdout + proc.stderr
    assert b"--title: not UTF-8 (byte 0xe9" in proc.stderr and snapshot(project.root) == before
    project.aipm("new", "O", check=True)
    before = snapshot(project.root)
    proc = aipm(b"add", b"O", b"A", b"--command", b"echo \xff")
    assert proc.returncode == 2 and b"--command: not UTF-8 (byte 0xff" in proc.stderr, proc.stderr
    assert snapshot(project.root) == before


def test_a_title_over_two_lines_points_to_the_files_own_key_for_longer_text(project):
    """order.yaml's error said 'longer text belongs in `prompt`', a key order.yaml refuses ('prompt: unknown
    key'); its longer text is `description`. A task's is `prompt`. Found by a review of e1269a0
    (repro 04-order-title-error-advises-prompt.sh)."""
    order = project.order("O")
    (order / "order.yaml").write_text("id: O\ntitle: |\n  Sprint 12\n  second line\n")
    proc = project.aipm("validate", "O")
    assert proc.returncode == 2 and "belongs in `description`" in proc.stderr, proc.stderr
    proc = project.aipm("new", "P", "--title", "a\nb")
    assert proc.returncode == 2 and "belongs in `description`" in proc.stderr, proc.stderr
    (order / "order.yaml").write_text("id: O\ntitle: Sprint 12\ndescription: |\n  second line\n  third\n")
    (order / "A.yaml").write_text("title: |\n  Fix\n  and more\ncommand: 'true'\n")
    proc = project.aipm("validate", "O")
    assert proc.returncode == 2 and "A.yaml: title" in proc.stderr and "belongs in `prompt`" in proc.stderr


def test_detect_names_holders_and_paths_as_why_and_the_overlap_rule_do(project):
    """detect named a running task of the same order `ORD/A` (from its worker record) where `why` says `A`, and
    listed a launchable task's targets as written (`./src/../src/b.py`) instead of as the overlap rule sees them."""
    order = project.order()
    gate = project.root / "gate"
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a.py"])
    write_task(order, "B", command="true", target_files=["./src/../a.py"])
    write_task(order, "C", command="true", target_files=["./src/../src/b.py"])
    try:
        project.aipm("launch", "ORD", "--max-workers", "1", check=True)
        wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
        found = project.json("detect", "ORD")
        assert found["launchable"] == [{"id": "C", "priority": "P1", "target_files": ["src/b.py"]}]
        held = next(b for b in found["blocked"] if b["id"] == "B")
        assert held["tasks"] == ["A"] and held["detail"] == "a.py is held by running task A (IN_PROGRESS)"
        assert "B: a.py is held by running task A (IN_PROGRESS)" in project.aipm("detect", "ORD").stdout
        assert "src/b.py" in project.aipm("detect", "ORD").stdout.replace("./src/../src/b.py", "")
        assert project.json("why", "B")["reasons"][0]["detail"] == held["detail"]
    finally:
        gate.touch()
    wait_for(lambda: no_workers(project.root))


def _orphan(project, order):
    """Launch A and SIGKILL its owner and wrapper: its command (no shell, no children) runs on in its group,
    holding a.py; `aipm recover` ends it."""
    write_task(order, "A", command="sleep 120", target_files=["a.py"])
    project.aipm("launch", "ORD", check=True)
    worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
    os.kill(worker["owner_pid"], signal.SIGKILL)
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(worker["owner_pid"]) and not pid_alive(worker["pid"]))
    assert group_alive(worker["pgid"])
    return worker


def test_detect_shows_a_lost_task_as_status_and_why_do(project):
    """detect called a task whose worker is gone `status is IN_PROGRESS` where `status` and `why` say INTERRUPTED."""
    _orphan(project, project.order())
    try:
        found = next(b for b in project.json("detect", "ORD")["blocked"] if b["id"] == "A")
        why = project.json("why", "A")
        assert found["reason"] == "stale" and found["detail"].startswith("status is INTERRUPTED (")
        assert why["reasons"][0]["detail"] == found["detail"] and why["status"] == "INTERRUPTED"
        assert project.json("status", "ORD")["tasks"][0]["status"] == "INTERRUPTED"
        assert f"A: {found['detail']}" in project.aipm("detect", "ORD").stdout.replace("\n", " ").replace("  ", " ")
    finally:
        project.aipm("recover")


def test_why_and_detect_say_a_holder_whose_worker_is_gone_waits_for_aipm_recover(project):
    """A task whose file a lost task holds (its run killed, or marked IN_PROGRESS by hand) waits until that task's
    order is recovered, but `why` and `detect` said only 'held by running task H (IN_PROGRESS)': a user waited
    for a worker that no longer existed. Only `run`'s closing line named the fix, and only for another order's
    task. Found by a review."""
    (project.order() / "H.yaml").write_text("command: 'true'\ntarget_files: [a.txt]\nstatus: IN_PROGRESS\n")
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    (project.order("O2") / "R.yaml").write_text("command: 'true'\ntarget_files: [b.txt]\nstatus: IN_PROGRESS\n")
    write_task(project.order(), "B", command="true", target_files=["b.txt"])
    # (not "held by running task H ...; its worker is gone": a task whose worker is gone is not running)
    for task, words in (("A", "a.txt is held by H, IN_PROGRESS with its worker gone: `aipm recover ORD` frees it"),
                        ("B", "b.txt is held by O2/R, IN_PROGRESS with its worker gone: `aipm recover O2` frees it")):
        assert project.json("why", task)["reasons"][0]["detail"] == words
        assert next(b for b in project.json("detect", "ORD")["blocked"] if b["id"] == task)["detail"] == words
        assert words in project.aipm("why", task).stdout.replace("\n", " ")
    proc = project.aipm("run", "ORD")  # recovers its own order's H; O2's R still holds b.txt
    assert proc.returncode == 1
    assert proc.stderr.count("`aipm recover O2` frees it") == 1, proc.stderr


def test_ps_says_a_worker_whose_command_outlived_its_owner_is_orphaned(project):
    """Owner and wrapper SIGKILLed, the command running on and holding the task's files: `ps` said `gone` while
    `locks` showed the lock held. It names the processes that run on, and `recover` ends them."""
    worker = _orphan(project, project.order())
    try:
        [info] = project.json("ps")["workers"]
        assert info["state"] == "orphaned" and not info["alive"]
        assert info["remnants"] and all(os.getpgid(pid) == worker["pgid"] for pid in info["remnants"])
        assert info["pid"] in info["remnants"] and info["elapsed"] is not None
        assert "orphaned" in project.aipm("ps").stdout
        [lock] = project.json("locks")["locks"]
        assert lock["held"] and lock["pid"] == info["pid"]  # (it named the dead wrapper's pid)
        project.aipm("recover", check=True)
        wait_for(lambda: not group_alive(worker["pgid"]))
        assert project.json("ps")["workers"] == []
    finally:
        project.aipm("recover")


def test_a_cancel_before_the_detached_owner_starts_runs_nothing(project, tmp_path_factory):
    """`aipm launch` returns once the task is IN_PROGRESS and its record names the detached owner, which then
    starts Python: a cancel in between said CANCELLED, and the owner started the command anyway."""
    slow = tmp_path_factory.mktemp("slow")  # the owner's start-up, made long enough for the cancel to come first
    (slow / "sitecustomize.py").write_text(
        "import sys, time\nif sys.orig_argv[1:3] == ['-m', 'aipm.work']:\n    time.sleep(2)\n")
    ran = project.root / "ran"
    write_task(project.order(), "T1", command=f"touch {ran}", target_files=["a.txt"])
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(slow), os.environ.get("PYTHONPATH")]))}
    project.aipm("launch", "ORD", env=env, check=True)
    assert project.aipm("cancel", "T1").returncode == 0
    wait_for(lambda: no_workers(project.root))
    assert not ran.exists()
    assert project.statuses() == {"T1": "CANCELLED"}
    assert "cancelled by the user before its worker started" in project.aipm("logs", "T1").stdout


def test_a_root_used_as_its_own_order_reads_aipm_yaml_as_settings_never_as_a_task(tmp_path):
    """An order directory at the project root (`aipm run .`, as test_scope's root case runs) read aipm.yaml as a task
    named `aipm`: a settings file of `max_workers: 2` made every command fail on 'unknown key', and one whose keys
    were task keys as well (`max_rework: 0`) was a task that never had a command. Found by a review."""
    root = tmp_path / "proj"
    root.mkdir()
    (root / "aipm.yaml").write_text("max_workers: 2\nmax_rework: 0\n")
    (root / "T.yaml").write_text("command: echo hi > out.txt\ntarget_files: [out.txt]\n")

    def aipm(*args):
        return subprocess.run([sys.executable, "-m", "aipm", *args], capture_output=True, text=True, cwd=root,
                              env={**os.environ, "AIPM_ENABLE_MONITORING": "false"}, timeout=120)

    proc = aipm("validate", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = aipm("run", ".")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert yaml.safe_load((root / "T.yaml").read_text())["status"] == "DONE"
    assert [t["id"] for t in json.loads(aipm("status", ".", "--json").stdout)["tasks"]] == ["T"]
    assert (root / "aipm.yaml").read_text() == "max_workers: 2\nmax_rework: 0\n"  # never rewritten as a task
    before = snapshot(root)
    for args in (("add", ".", "aipm", "--command", "true"), ("why", "aipm.yaml")):
        proc = aipm(*args)
        assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, (args, proc.stdout, proc.stderr)
        assert "settings file" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(root) == before


def test_a_path_below_orders_dir_given_from_the_root_says_it_is_taken_from_the_working_directory(project):
    """Since only a single name is looked up in orders_dir, `aipm status 2024/Q1` (an order kept below a directory
    of orders) is a path from the working directory; the refusal said 'no directory orders/2024/Q1 under <root>',
    which was there. It names the path to give instead."""
    write_task(project.root / "orders" / "2024" / "Q1", "A", command="true")
    proc = project.aipm("status", "2024/Q1")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "no directory" not in proc.stderr
    assert str(project.root / "orders" / "2024" / "Q1") in proc.stderr
    assert project.json("status", "orders/2024/Q1")["order"] == "Q1"


def test_a_retry_while_the_owner_records_the_end_says_so_not_that_a_worker_runs(project, gate):
    """A retry refused while the owner has yet to record its worker's end (held here with SIGSTOP, past the
    cancel's bounded wait) named the owner's pid as the task's "worker pid ... still running": no worker ran."""
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    run = subprocess.Popen([sys.executable, "-m", "aipm", "--root", str(project.root), "run", "ORD"],
                           cwd=project.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=dict(os.environ, AIPM_ENABLE_MONITORING="false"))
    try:
        worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
        run.send_signal(signal.SIGSTOP)
        gate.touch()
        wait_for(lambda: not group_alive(worker["pgid"]))
        assert project.aipm("cancel", "A", "--grace", "0", timeout=60).returncode == 0
        retry = project.aipm("retry", "A")
        assert retry.returncode == 2 and task_statuses(order)["A"] == "CANCELLED", retry.stderr
        assert f"its attempt's end is being recorded (by aipm pid {run.pid})" in retry.stderr, retry.stderr
        assert "still running" not in retry.stderr, retry.stderr
        run.send_signal(signal.SIGCONT)
        wait_for(lambda: no_workers(project.root))
        assert project.aipm("retry", "A").returncode == 0 and task_statuses(order)["A"] == "QUEUED"
    finally:
        run.send_signal(signal.SIGCONT)
        run.kill()
        run.wait()


def test_a_cancel_that_meets_its_worker_ending_waits_for_the_owner_so_a_retry_is_not_refused(project, gate):
    """The worker ended on its own just before the cancel, its owner (a busy `run`: stopped, then let go on to wait
    for the launch lock) not yet recording that: the cancel returned at once, its record still there, and a `retry`
    right after was refused, naming the run's pid as the task's "worker pid ... still running". It now waits for
    the owner, as it does for a worker it stops itself (bounded: --grace + 5 s). (An owner that stays stopped,
    Ctrl-Z, is not waited for: test_hostile_workers.test_cancel_of_a_task_whose_run_is_stopped_says_so_and_...)"""
    order = project.order()
    write_task(order, "A", command=f"while [ ! -e {gate} ]; do sleep 0.05; done", target_files=["a"])
    argv = [sys.executable, "-m", "aipm", "--root", str(project.root)]
    env = dict(os.environ, AIPM_ENABLE_MONITORING="false")
    run = subprocess.Popen([*argv, "run", "ORD"], cwd=project.root, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=env)
    try:
        worker = wait_for(lambda: next((w for w in project.json("ps")["workers"] if w["pgid"]), None))
        run.send_signal(signal.SIGSTOP)
        gate.touch()
        wait_for(lambda: not group_alive(worker["pgid"]))
        cancel = subprocess.Popen([*argv, "cancel", "A", "--grace", "30"], cwd=project.root,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        wait_for(lambda: task_statuses(order)["A"] == "CANCELLED")
        with open(state(project.root) / "launch.lock") as lock:
            # Once the cancel has let the lock go, the run goes on (a stopped owner is not waited for) but cannot
            # record until we let it go.
            fcntl.flock(lock, fcntl.LOCK_EX)
            run.send_signal(signal.SIGCONT)
            try:  # the owner is busy: a cancel that returns now leaves its record behind, and a retry is refused
                cancel.wait(timeout=3)
                early = no_workers(project.root) or "its record still there"
            except subprocess.TimeoutExpired:
                early = True
        assert cancel.wait(timeout=60) == 0, cancel.stderr.read()
        assert early is True, "cancel returned while the owner had not yet seen its worker end: " + early
        retry = project.aipm("retry", "A")
        assert retry.returncode == 0, retry.stderr
        assert task_statuses(order)["A"] == "QUEUED"
    finally:
        run.send_signal(signal.SIGCONT)
        run.kill()
        run.wait()


def test_a_worker_whose_owner_died_stopping_it_is_said_to_be_ended_by_a_recover_as_its_phase_says():
    """A review whose owner died stopping it is run again by a recover, not re-queued (`ps` said re-queued)."""
    from aipm.workerstate import describe

    assert describe("unowned", True, "work")[0].endswith("(aipm recover ends it and re-queues its task)")
    assert describe("unowned", True, "review")[0].endswith("(aipm recover ends it and runs its review again)")
    assert describe("unowned", False, "review")[0] == "alive, its owner gone (aipm recover adopts it)"
