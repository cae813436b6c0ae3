"""Issue 17 (B3): start-up is most of a short command's time, so a command imports only what it uses."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from conftest import snapshot, task_statuses, write_task

# The modules loaded when the command ends: at exit, or at the os._exit that skips the teardown.
PROBE = """
import atexit, gc, os, sys
def report():
    sys.stderr.write("MODULES " + " ".join(sorted(sys.modules)) + "\\n")
    sys.stderr.write(f"GC {gc.isenabled()} {gc.get_freeze_count()}\\n")
    sys.stderr.flush()
atexit.register(report)
_exit = os._exit
os._exit = lambda code: (report(), _exit(code))
from aipm.cli import main
main(sys.argv[1:])
"""


def modules_of(project, *args):
    proc = subprocess.run([sys.executable, "-c", PROBE, "--root", str(project.root), *args], capture_output=True,
                          text=True, cwd=project.root, timeout=120)
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return proc, set(line.split()[1:])


def test_every_command_is_found_in_the_module_the_table_names():
    from aipm.cli import COMMAND_MODULES, _load_commands, typer_app

    _load_commands()
    defined = {(c.name or c.callback.__name__): c.callback.__module__ for c in typer_app().registered_commands}
    assert {name: f"aipm.cli.{module}" for name, module in COMMAND_MODULES.items()} == defined


def test_read_commands_in_json_import_no_table_printer_lock_library_or_other_command(project):
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    for args in [("detect", "ORD", "--json"), ("status", "ORD", "--json")]:
        proc, modules = modules_of(project, *args)
        assert proc.returncode == 0, proc.stderr
        # psutil (~20-35 ms): neither command takes a CPU or memory reading
        assert not {"rich", "filelock", "asyncio", "aipm.supervisor", "aipm.runloop", "aipm.cli.cmd_workers",
                    "psutil"} & modules, args
    for args in [("detect", "ORD"), ("status", "ORD"), ("why", "ORD/A")]:  # their tables and lines (cli/grid.py)
        proc, modules = modules_of(project, *args)
        assert proc.returncode == 0 and "rich" not in modules, args


def test_a_command_not_in_the_table_still_runs_and_help_lists_every_command(project):
    from aipm.cli import COMMAND_MODULES

    proc = project.aipm("--help")
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in COMMAND_MODULES)
    proc = project.aipm("detec", "ORD")
    assert proc.returncode == 2 and "No such command 'detec'" in proc.stderr
    assert proc.stderr.startswith("aipm: error: No such command"), proc.stderr  # not 'aipm: error: aipm: ...'


def test_no_command_imports_pydantic_not_even_through_typer(project):
    """Typer 0.29 made pydantic a dependency and builds a pydantic adapter for every parameter it parses: 70-150 ms
    more for each command that goes through Typer (`ps` 190 -> 340 ms, `validate` 150 -> 250 ms). pyproject keeps
    Typer below it; this fails if an upgrade brings it back."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    for args in (("ps", "--"), ("validate", "--", "ORD"), ("why", "--", "ORD/A"), ("locks", "--"), ("--help",),
                 ("run", "--help")):
        proc, modules = modules_of(project, *args)
        assert proc.returncode == 0, (args, proc.stderr)
        assert "typer.main" in modules and "pydantic" not in modules, args


def test_the_polled_form_skips_typer_and_answers_exactly_as_typer_does(project):
    """`[--root R] detect|status ORDER --json` runs the command function directly, options in any order; a form
    it does not read (`--` here) goes through Typer. Both must print the same bytes, errors included."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["a.txt"])
    write_task(order, "B", command="true", target_files=["a.txt"], depends_on=["A"], priority="P0")
    write_task(order, "C", command="true", status="IN_PROGRESS", target_files=["c/"])
    # Every call at once, a process each (all read only): the Typer form once per command and order.
    cases = [(command, name) for command in ("detect", "status") for name in ("ORD", str(order), "NOPE")]
    calls = [form for command, name in cases for form in ((command, "--json", "--", name), (command, name, "--json"),
                                                          (command, "--json", name))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(calls, pool.map(lambda call: modules_of(project, *call), calls)))
    for command, name in cases:
        typer_proc, modules = results[command, "--json", "--", name]
        assert "typer.main" in modules
        for direct in ((command, name, "--json"), (command, "--json", name)):
            proc, modules = results[direct]
            assert "pydantic" not in modules and "typer" not in modules
            assert (proc.returncode, proc.stdout) == (typer_proc.returncode, typer_proc.stdout)
            assert proc.stderr.split("MODULES")[0] == typer_proc.stderr.split("MODULES")[0]
            assert proc.returncode == (2 if name == "NOPE" else 0)


def typer_form(args: tuple) -> tuple:
    """The form of a command that goes through Typer: its options (and their values), then `--`, then its
    arguments."""
    options, arguments, words = [], [], iter(args[1:])
    for word in words:
        if word.startswith("-"):
            options += [word, next(words)] if word in ("--max-workers", "--grace") else [word]
        else:
            arguments.append(word)
    return (args[0], *options, "--", *arguments)


def test_the_looking_commands_skip_typer_and_answer_exactly_as_typer_does(project):
    """`ps`, `locks`, `validate ORDER` and `why ORDER/TASK` (a person's commands, typed while a run goes on) skip
    Typer too: the same bytes and exit code as through Typer (`--` sends a form there), errors included."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["a.txt"])
    write_task(order, "B", command="true", target_files=["a.txt"], depends_on=["A"])
    (order / "BAD.yaml").write_text("id: BAD\ncommand: true\npriority: P9\n")
    forms = [("ps",), ("ps", "--json"), ("locks",), ("locks", "--json"), ("validate", "ORD"), ("validate",),
             ("why", "ORD/B"), ("why", "ORD/NOPE"), ("why", "ORD/B", "--json"), ("config",), ("config", "--json"),
             ("config", "--max-workers", "3"), ("diff", "ORD/A"), ("diff", "ORD/A", "--json")]
    calls = [form for args in forms for form in (args, typer_form(args))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = dict(zip(calls, pool.map(lambda call: modules_of(project, *call), calls)))
    for args in forms:
        proc, modules = results[args]
        typer_proc, typer_modules = results[typer_form(args)]
        assert "typer" not in modules and "typer.main" in typer_modules, args
        assert (proc.returncode, proc.stdout) == (typer_proc.returncode, typer_proc.stdout), args
        assert proc.stderr.split("MODULES")[0] == typer_proc.stderr.split("MODULES")[0], args
    assert results[("validate", "ORD")][0].returncode == 2 and "P9" in results[("validate", "ORD")][0].stderr
    # (a sibling's file that does not validate is said, and planned as a task that cannot start: no error)
    why = results[("why", "ORD/B")][0]
    assert why.returncode == 0 and "aipm: warning: " in why.stderr and "BAD.yaml: priority:" in why.stderr, why.stderr
    assert results[("ps", "--json")][0].stdout == '{"workers": [], "standby": []}\n'  # (not the usage error of `ps -- --json`)
    assert "max_workers" in results[("config", "--json")][0].stdout


def test_the_steering_commands_skip_typer_and_do_exactly_what_typer_does(project, tmp_path):
    """`cancel`, `retry` and `recover` skip Typer too: run on two copies of one project, each form and its Typer
    form say the same and leave the same statuses, errors included."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["a.txt"])
    write_task(order, "B", command="true", status="FAILED", attempts=1, reason="exit 3")
    write_task(order, "C", command="true", status="DONE", attempts=1, exit_code=0)
    forms = [("cancel", "ORD/A"), ("cancel", "ORD/NOPE"), ("retry", "ORD/B"), ("retry", "ORD/A"), ("recover",),
             ("recover", "--json"), ("retry", "ORD/C", "--resume")]
    outcomes = {}
    for args in forms:
        said = []
        for form in (args, typer_form(args)):
            copy = tmp_path / "copy"  # the same path for both: errors name it
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(project.root, copy)
            proc = subprocess.run([sys.executable, "-c", PROBE, "--root", str(copy), *form], capture_output=True,
                                  text=True, cwd=copy, timeout=120)
            modules = set([x for x in proc.stderr.splitlines() if x.startswith("MODULES ")][-1].split()[1:])
            assert ("typer.main" in modules) == (form != args), form
            said.append((proc.returncode, proc.stdout, proc.stderr.split("MODULES")[0], task_statuses(copy / "orders" /
                                                                                                     "ORD")))
        assert said[0] == said[1], args
        outcomes[args] = said[0]
    assert outcomes[("cancel", "ORD/A")][0] == 0 and outcomes[("cancel", "ORD/A")][3]["A"] == "CANCELLED"
    assert outcomes[("retry", "ORD/B")][0] == 0 and outcomes[("retry", "ORD/B")][3]["B"] == "QUEUED"
    assert outcomes[("cancel", "ORD/NOPE")][0] == 2 and outcomes[("retry", "ORD/A")][3]["A"] == "QUEUED"
    assert outcomes[("recover",)][1] == "nothing to recover\n"


def test_run_in_a_plain_form_skips_typer_rich_and_filelock_and_ends_as_typer_does(project):
    """`run` of a build in a log: no Typer at all (its import alone is ~30 ms), no rich, no lock library, nothing
    only worktrees, --preempt, `exec` or an error message need, no OpenSSL (hashlib's, ~3 ms: aipm.digest); the
    start-up's objects are kept out of the cyclic GC, which is on for the run itself."""
    def fresh():
        for name in ("A", "B"):
            write_task(project.order(), name, command=f"touch {name.lower()}.txt", target_files=[f"{name.lower()}.txt"],
                       depends_on=["A"] if name == "B" else None)

    fresh()
    proc, modules = modules_of(project, "run", "ORD", "--max-workers", "2", "--no-resource-monitoring")
    assert proc.returncode == 0, proc.stderr
    assert not {"pydantic", "typer", "rich", "filelock", "asyncio", "tempfile", "difflib", "_hashlib",
                "aipm.workspace.mergeback", "aipm.urgency", "aipm.cli.cmd_detect"} & modules
    enabled, frozen = [x for x in proc.stderr.splitlines() if x.startswith("GC ")][-1].split()[1:]
    assert enabled == "True" and int(frozen) > 10_000
    assert proc.stdout.splitlines()[-1] == "ORD: DONE 2"
    fresh()
    typer_proc, modules = modules_of(project, "run", "--max-workers=2", "--no-resource-monitoring", "ORD")
    assert "typer.main" in modules
    assert typer_proc.returncode == 0 and typer_proc.stdout.splitlines()[-1] == "ORD: DONE 2"
    assert [line.split()[:2] for line in proc.stdout.splitlines()] == [
        line.split()[:2] for line in typer_proc.stdout.splitlines()]


def test_a_form_the_direct_path_does_not_read_gets_typers_answer(project):
    """Bad values, unknown or repeated options, missing or extra arguments, help: Typer parses them (usage error,
    exit 2). A value of the right type that the settings refuse: one line, exit 2, the same either way."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    cases = [("run", "ORD", "--max-workers", "x"), ("run", "ORD", "--max-workers"), ("run", "ORD", "--bogus"),
             ("run",), ("run", "ORD", "ORD2"), ("detect", "ORD", "--max-workers=x")]
    for args in cases:
        proc, modules = modules_of(project, *args)
        assert "typer.main" in modules, args
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (args, proc.stderr)
    proc, modules = modules_of(project, "status", "ORD", "--json", "--json")  # Typer takes it; read here, once
    assert "typer.main" in modules and proc.returncode == 0
    proc, modules = modules_of(project, "run", "--help")
    assert "typer.main" in modules and proc.returncode == 0 and "--max-workers" in proc.stdout
    proc, modules = modules_of(project, "run", "ORD", "--max-workers", "0", "--no-resource-monitoring")
    typer_proc, typer_modules = modules_of(project, "run", "ORD", "--max-workers=0", "--no-resource-monitoring")
    assert "typer" not in modules and "typer.main" in typer_modules
    err = proc.stderr.split("MODULES")[0]
    assert proc.returncode == typer_proc.returncode == 2 and err == typer_proc.stderr.split("MODULES")[0]
    assert err.count("\n") == 1 and "--max-workers" in err, err


def test_the_polled_form_into_a_closed_pipe_exits_as_typer_does_without_a_traceback(project):
    write_task(project.order(), "A", command="true")
    results = []
    for args in (("status", "ORD", "--json"), ("status", "--json", "ORD")):
        read, write = os.pipe()
        os.close(read)  # nobody will ever read: the first write meets a broken pipe
        try:
            proc = subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), *args], stdout=write,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        results.append((proc.returncode, proc.stderr))
    assert results[0] == results[1] and results[0][0] == 1 and "Traceback" not in results[0][1]


def test_a_value_in_non_ascii_digits_is_refused_on_the_direct_path_as_by_typer(project):
    """`--max-workers ٣`: Python's int() reads any Unicode digit, so the direct path took it as 3, and so did Typer
    (Click's INT is int()), where AIPM_MAX_WORKERS=٣ is refused. The direct path leaves such a value to Typer,
    which refuses it as it refuses `--max-workers=٣`: one line, exit 2, nothing written."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = snapshot(project.root)
    for command, option, value in (("detect", "--max-workers", "٣"), ("launch", "--max-cpu", "٩٠"),
                                   ("run", "--max-workers", "1_0"), ("run", "--max-memory", "５０")):
        proc, modules = modules_of(project, command, "ORD", "--json", option, value)
        typer_proc, _ = modules_of(project, command, "ORD", "--json", f"{option}={value}")
        assert "typer.main" in modules, option
        assert "Traceback" not in proc.stderr and (proc.returncode, proc.stdout) == (typer_proc.returncode,
                                                                                   typer_proc.stdout)
        err = proc.stderr.split("MODULES")[0]
        assert proc.returncode == 2 and err == typer_proc.stderr.split("MODULES")[0], err
        assert err.count("\n") == 1 and f"'{option}': {value!r}" in err, err
    assert snapshot(project.root) == before
