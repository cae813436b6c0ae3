"""Issue 17 (B3): start-up is most of a short command's time, so a command imports only what it uses."""

import os
import subprocess
import sys

from conftest import write_task

PROBE = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("MODULES " + " ".join(sorted(sys.modules)) + "\\n"))
from aipm.cli import main
main(sys.argv[1:])
"""


def modules_of(project, *args):
    proc = subprocess.run([sys.executable, "-c", PROBE, "--root", str(project.root), *args], capture_output=True,
                          text=True, cwd=project.root, timeout=120)
    line = [x for x in proc.stderr.splitlines() if x.startswith("MODULES ")][-1]
    return proc, set(line.split()[1:])


def test_every_command_is_found_in_the_module_the_table_names():
    from aipm.cli import COMMAND_MODULES, _load_commands, app

    _load_commands()
    defined = {(c.name or c.callback.__name__): c.callback.__module__ for c in app.registered_commands}
    assert {name: f"aipm.cli.{module}" for name, module in COMMAND_MODULES.items()} == defined


def test_read_commands_in_json_import_no_table_printer_lock_library_or_other_command(project):
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    for args in [("detect", "ORD", "--json"), ("status", "ORD", "--json")]:
        proc, modules = modules_of(project, *args)
        assert proc.returncode == 0, proc.stderr
        assert not {"rich", "filelock", "asyncio", "aipm.supervisor", "aipm.cli.cmd_workers"} & modules, args
    proc, modules = modules_of(project, "detect", "ORD")  # the table does need rich
    assert proc.returncode == 0 and "rich.table" in modules


def test_a_command_not_in_the_table_still_runs_and_help_lists_every_command(project):
    from aipm.cli import COMMAND_MODULES

    proc = project.aipm("--help")
    assert proc.returncode == 0
    assert all(name in proc.stdout for name in COMMAND_MODULES)
    proc = project.aipm("detec", "ORD")
    assert proc.returncode == 2 and "No such command 'detec'" in proc.stderr


def test_the_polled_form_skips_typer_and_answers_exactly_as_typer_does(project):
    """`[--root R] detect|status ORDER --json` runs the command function directly; options in another place go
    through Typer. Both must print the same bytes, errors included."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["a.txt"])
    write_task(order, "B", command="true", target_files=["a.txt"], depends_on=["A"], priority="P0")
    write_task(order, "C", command="true", status="IN_PROGRESS", target_files=["c/"])
    for command in ("detect", "status"):
        for name in ("ORD", str(order), "NOPE"):
            proc, modules = modules_of(project, command, name, "--json")
            assert "pydantic" not in modules and "typer._adapters" not in modules
            typer_proc, modules = modules_of(project, command, "--json", name)
            assert "typer._adapters" in modules
            assert (proc.returncode, proc.stdout) == (typer_proc.returncode, typer_proc.stdout)
            assert proc.stderr.split("MODULES")[0] == typer_proc.stderr.split("MODULES")[0]
            assert proc.returncode == (2 if name == "NOPE" else 0)


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
