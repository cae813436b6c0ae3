"""Issue 11, items 4, 9 and 10: identities that would collide, symlinks that lead aipm astray, read-only commands.

Each bad input ends in one line naming the file (and field), exit 2, and not one byte changed on disk.
"""

import hashlib
import json

import pytest

from conftest import write_task
from test_validation import assert_one_line_error

READ_COMMANDS = [
    ("validate",), ("validate", "ORD"), ("status", "ORD"), ("status", "ORD", "--json"), ("detect", "ORD"),
    ("detect", "ORD", "--json"), ("detect", "ORD", "--summary"), ("why", "A"), ("why", "ORD/A", "--json"),
    ("logs", "A"), ("ps",), ("ps", "--json"), ("locks",), ("locks", "--json"), ("graph", "ORD"),
    ("graph", "ORD", "--format", "dot"), ("config",), ("config", "--json"), ("schema",), ("resources",),
    ("resources", "--json"), ("launch", "ORD", "--dry-run"), ("launch", "ORD", "--dry-run", "--json"),
]


def full_snapshot(root):
    """Every path under root, directories included, with file contents: any byte created shows."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("args", READ_COMMANDS, ids=" ".join)
def test_read_commands_write_nothing_on_a_fresh_project(project, args):
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = full_snapshot(project.root)
    proc = project.aipm(*args)
    assert proc.returncode in (0, 2), proc.stderr  # `logs` of a task that never ran is an error
    assert "Traceback" not in proc.stderr
    assert not (project.root / ".aipm").exists()
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("args", [("recover",), ("recover", "--json")], ids=" ".join)
def test_recover_where_nothing_ever_ran_writes_nothing(project, args):
    """`aipm recover` in a directory with no order (no project yet, or not one at all) made `.aipm/.gitignore` and
    `.aipm/logs` there, and the state directory, to say "nothing to recover"."""
    from aipm.runtime import Runtime

    (project.root / "notes.txt").write_text("mine\n")
    before = full_snapshot(project.root)
    proc = project.aipm(*args)
    assert proc.returncode == 0, proc.stderr
    assert (json.loads(proc.stdout) == {"recovered": []}) if "--json" in args else proc.stdout == "nothing to recover\n"
    assert full_snapshot(project.root) == before
    assert not Runtime(project.root).state.exists()


def test_duplicate_order_ids_are_refused_by_every_command(project):
    """Two orders claiming one id would share worker records: a run adopted the other's worker (exit 0)."""
    write_task(project.order("FIRST"), "A", command="true")
    write_task(project.order("SECOND"), "B", command="true")
    (project.root / "orders" / "SECOND" / "order.yaml").write_text("id: FIRST\n")
    before = full_snapshot(project.root)
    for args in [("validate", "SECOND"), ("status", "SECOND"), ("detect", "SECOND"), ("launch", "SECOND"),
                 ("run", "SECOND"), ("why", "SECOND/B"), ("exec", "B"), ("status", "FIRST"), ("run", "FIRST")]:
        proc = project.aipm(*args)
        assert_one_line_error(proc, "order.yaml" if "SECOND" in args[1] or args[1] == "B" else "FIRST", "-")
        assert "'FIRST' is also the id of" in proc.stderr
    proc = project.aipm("validate")  # one line for the clash (it was one per order), naming every order of the id
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    (project.root / "orders" / "THIRD").mkdir()
    (project.root / "orders" / "THIRD" / "order.yaml").write_text("id: FIRST\n")
    proc = project.aipm("validate")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert all(f"{name}/order.yaml" in proc.stderr for name in ("SECOND", "THIRD")), proc.stderr
    assert [o["ok"] for o in json.loads(project.aipm("validate", "--json").stdout)["orders"]] == [False] * 3
    (project.root / "orders" / "THIRD" / "order.yaml").unlink()
    (project.root / "orders" / "THIRD").rmdir()
    assert full_snapshot(project.root) == before


def test_an_order_outside_orders_dir_may_not_take_an_id_in_use(project, tmp_path_factory):
    write_task(project.order("DEMO"), "A", command="true")
    elsewhere = project.root / "fixtures" / "demo"
    write_task(elsewhere, "A", command="true")
    (elsewhere / "order.yaml").write_text("id: DEMO\n")
    proc = project.aipm("run", str(elsewhere))
    assert_one_line_error(proc, str(elsewhere / "order.yaml"), "id")
    assert not (project.root / ".aipm").exists()


def test_a_task_file_that_is_a_symlink_is_refused_by_every_command(project, tmp_path_factory):
    real = tmp_path_factory.mktemp("elsewhere") / "shared.yaml"
    real.write_text("command: 'true'\n")
    order = project.order()
    write_task(order, "A", command="true")
    (order / "B.yaml").symlink_to(real)
    before = full_snapshot(project.root)
    for args in [("validate", "ORD"), ("status", "ORD"), ("launch", "ORD"), ("run", "ORD"), ("exec", "ORD/A")]:
        assert_one_line_error(project.aipm(*args), "B.yaml", "-")
    assert (order / "B.yaml").is_symlink() and real.read_text() == "command: 'true'\n"
    assert full_snapshot(project.root) == before


def test_a_runtime_directory_linked_outside_the_root_is_refused(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (project.root / ".aipm").symlink_to(outside)
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    for args in [("launch", "ORD"), ("run", "ORD"), ("exec", "ORD/A"), ("locks",), ("ps",), ("recover",),
                 ("detect", "ORD"), ("init",)]:
        proc = project.aipm(*args)
        assert_one_line_error(proc, ".aipm", "outside the project")
    assert list(outside.iterdir()) == []
    assert not (project.root / "a.txt").exists()


USAGE_ERRORS = [
    (("run", "ORD", "--max-workers", "many"), "aipm run", "--max-workers"),
    (("status", "ORD", "--bogus"), "aipm status", "--bogus"),
    (("why",), "aipm why", "task"),
    (("detect", "ORD", "extra"), "aipm detect", "extra"),
    (("launch", "ORD", "--max-workers=-x"), "aipm launch", "--max-workers"),
    (("cancel",), "aipm cancel", "task"),
    (("nosuchcommand",), "aipm", "nosuchcommand"),
]


@pytest.mark.parametrize("args, command, named", USAGE_ERRORS, ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_a_usage_error_is_one_line_naming_the_command_and_writes_nothing(project, args, command, named):
    """Usage errors Typer finds itself (a value of the wrong type, an unknown option, a missing or extra argument)
    were its boxed usage text; as every other bad input, they are one line, exit 2, nothing on disk changed."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = full_snapshot(project.root)
    proc = project.aipm(*args)
    # aipm's own usage errors are not prefixed twice (`aipm: error: aipm: No such command`)
    assert_one_line_error(proc, "aipm: error: No such command" if command == "aipm" else f"aipm: error: {command}",
                          named)
    assert f"(see '{command} --help')" in proc.stderr
    assert proc.stdout == ""
    assert full_snapshot(project.root) == before


def test_root_after_the_command_says_where_it_goes(project):
    """`aipm status ORD --root DIR` said only 'No such option: --root (see 'aipm status --help')', and that help
    does not list --root: it is an option of `aipm` itself."""
    project.order()
    proc = project.aipm("status", "ORD", "--root", str(project.root))
    assert_one_line_error(proc, "aipm: error: aipm status", "--root")
    assert "(--root goes before the command: aipm --root DIR status ...)" in proc.stderr, proc.stderr


def test_a_missing_order_names_the_orders_there_are(project):
    """`aipm run` without ORDER said only "Missing argument 'order'": a first-time user needs the ids there are."""
    assert_one_line_error(project.aipm("run"), "aipm run: Missing argument", "(no order yet: `aipm new ORDER`")
    write_task(project.order("ORDER_001"), "A", command="true")
    before = full_snapshot(project.root)
    for command in ("status", "run", "detect", "graph", "launch"):
        assert_one_line_error(project.aipm(command), f"aipm {command}: Missing argument", "(orders here: ORDER_001)")
    assert "(see 'aipm new --help')" in project.aipm("new").stderr
    assert full_snapshot(project.root) == before


def test_help_and_version_still_exit_0(project):
    for args in (("--help",), ("run", "--help"), ("--version",)):
        proc = project.aipm(*args)
        assert proc.returncode == 0 and proc.stderr == "" and proc.stdout.strip(), (args, proc.stderr)


# -- cases a review of every command's bad input found (each failed before its fix) -------------------------


@pytest.mark.parametrize("args", [("cancel", "ORD/A"), ("retry", "ORD/A"), ("recover", "ORD"), ("recover",)],
                         ids=" ".join)
def test_a_write_command_refuses_a_broken_order_before_it_makes_the_runtime_directory(project, args):
    write_task(project.order(), "A", command="true", target_files=["a.txt"], status="FAILED")
    (project.order() / "order.yaml").write_text("foo: 1\n")
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(*args), "order.yaml", "foo")
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("args, field", [(("cancel", "A"), "status"), (("retry", "A", "--resume"), "agent")],
                         ids=["cancel a finished task", "resume a command task"])
def test_a_refused_cancel_or_retry_writes_nothing(project, args, field):
    write_task(project.order(), "A", command="true", status="DONE")
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(*args), "A.yaml", field)
    assert full_snapshot(project.root) == before


def test_an_aipm_yaml_that_is_a_fifo_is_an_error_not_a_hang(project):
    import os

    (project.root / "aipm.yaml").unlink()
    os.mkfifo(project.root / "aipm.yaml")
    write_task(project.order(), "A", command="true")
    assert_one_line_error(project.aipm("status", "ORD", timeout=30), "aipm.yaml", "-")


@pytest.mark.parametrize("command", ["status", "run", "launch", "recover"])
def test_an_empty_order_argument_is_refused(project, command):
    write_task(project.order(), "A", command="true")
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(command, ""), "ORDER", "empty")
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("value", ["''", "'  '"])
def test_an_order_id_given_empty_is_refused(project, value):
    write_task(project.order(), "A", command="true")
    (project.order() / "order.yaml").write_text(f"id: {value}\n")
    assert_one_line_error(project.aipm("validate"), "order.yaml", "id")


def test_an_empty_model_is_refused_in_a_task_and_as_a_flag(project):
    write_task(project.order(), "A", command="true")
    assert_one_line_error(project.aipm("launch", "ORD", "--model", ""), "--model", "empty")
    write_task(project.order(), "B", command="true", model="")
    assert_one_line_error(project.aipm("validate"), "B.yaml", "model")


@pytest.mark.parametrize("value", ["1_0", "1 0", "٣"])
def test_a_number_setting_is_ascii_digits_only(project, value):
    write_task(project.order(), "A", command="true")
    assert_one_line_error(project.aipm("status", "ORD", env={"AIPM_MAX_WORKERS": value}), "AIPM_MAX_WORKERS", "-")


@pytest.mark.parametrize("value", ["+3", " 3 "])
def test_a_number_setting_may_have_a_sign_and_spaces_around_it(project, value):
    write_task(project.order(), "A", command="true")
    proc = project.aipm("config", "--json", env={"AIPM_MAX_WORKERS": value})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["settings"]["max_workers"]["value"] == 3


# A number flag of every command that has one, each with a value that a number setting refuses from the
# environment but int()/float() read: other scripts' digits (Arabic-Indic, full-width), `_` between digits, inf.
NUMBER_FLAGS = [
    ("run", "ORD", "--max-workers", "٣"), ("run", "ORD", "--max-cpu", "٩٠"), ("run", "ORD", "--max-workers", "1_0"),
    ("launch", "ORD", "--max-workers", "３"), ("launch", "ORD", "--max-memory", "inf"),
    ("exec", "A", "--max-workers", "٣"), ("exec", "A", "--max-cpu", "1_0"),
    ("detect", "ORD", "--max-workers", "٣"), ("why", "A", "--max-workers", "٣"),
    ("config", "--max-workers", "٣"), ("resources", "--max-cpu", "٩٠"),
    ("logs", "A", "--attempt", "١"), ("cancel", "A", "--grace", "٣"), ("ui", "--port", "٣"),
    ("add", "ORD", "B", "--timeout", "٣"), ("add", "ORD", "B", "--max-attempts", "٣"),
    ("add", "ORD", "B", "--max-rework", "1_0"),
]


def test_a_number_flag_is_ascii_digits_only_as_a_number_setting_is(project):
    """`--max-workers ٣` was 3 (Click's INT is int(), and so was the direct path's) where AIPM_MAX_WORKERS=٣ is
    refused; `cancel A --grace ٣` cancelled A, `ui --port ٣` served on port 3. Each is a usage error now, as
    `--max-workers many` is: one line naming the command and the flag, exit 2, nothing on disk changed."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = full_snapshot(project.root)
    for args, proc in zip(NUMBER_FLAGS, project.aipm_all(NUMBER_FLAGS, timeout=60)):
        assert_one_line_error(proc, f"aipm: error: aipm {args[0]}: Invalid value for '{args[-2]}'", repr(args[-1]))
        assert proc.stdout == "", args
    assert full_snapshot(project.root) == before


def test_every_number_parameter_of_every_command_reads_its_value_as_a_number_setting():
    """Whatever command or flag comes later: an int or float parameter takes what a setting takes, nothing more."""
    import typer.main

    from aipm.cli import _load_commands, typer_app

    try:
        from typer._click import exceptions, types
    except ImportError:  # a Typer from before it vendored click
        from click import exceptions, types
    _load_commands()
    numbers = []
    for name, command in typer.main.get_command(typer_app()).commands.items():
        for param in command.params:
            if isinstance(param.type, (types.IntParamType, types.FloatParamType)):
                numbers.append(f"{name} {param.opts[0]}")
                assert param.type.convert(" +3 ", param, None) == 3, numbers[-1]
                for bad in ("٣", "３", "1_0", "inf", "nan", "0x3"):
                    with pytest.raises(exceptions.BadParameter):
                        param.type.convert(bad, param, None)
    # (`add --timeout` takes `none` too, as the file's field does: read by settingvalues.timeout, not as an int)
    assert {f"{args[0]} {args[-2]}" for args in NUMBER_FLAGS} - {"add --timeout"} <= set(numbers), numbers


def test_an_order_id_given_null_is_the_directory_s_name(project):
    write_task(project.order(), "A", command="true")
    (project.order() / "order.yaml").write_text("id:\n")
    assert project.aipm("status", "ORD", "--json", check=True).returncode == 0


@pytest.mark.parametrize("value", ['"a\\0b"', ".aipm", ".aipm/orders", ".git/x"])
def test_an_orders_dir_that_cannot_hold_orders_is_refused(project, value):
    (project.root / "aipm.yaml").write_text(f"orders_dir: {value}\n")
    before = full_snapshot(project.root)
    for args in (("validate",), ("new", "O2")):
        assert_one_line_error(project.aipm(*args), "aipm.yaml", "orders_dir")
    assert full_snapshot(project.root) == before


def test_an_orders_dir_that_is_a_file_is_refused_not_an_empty_project(project):
    (project.root / "aipm.yaml").write_text("orders_dir: aipm.yaml\n")
    for args in (("validate",), ("recover",)):
        assert_one_line_error(project.aipm(*args), "aipm.yaml", "orders_dir")
    assert not (project.root / ".aipm").exists()
