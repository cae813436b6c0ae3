"""Issue 17 (B3): start-up is most of a short command's time, so a command imports only what it uses."""

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
