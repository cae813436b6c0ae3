"""Every command as a careless user types it: names too long, paths written the Windows way, a dependency given
twice. Each is one line naming the argument or the file and field, exit 2, and not one byte changed on disk."""

import os
import subprocess
import sys

import pytest

from conftest import write_task
from test_hostile_input import full_snapshot
from test_validation import assert_one_line_error

# Over NAME_MAX (255 bytes): the first look at such a path is an OSError (File name too long).
LONG = "x" * 300
ORDER_COMMANDS = ("status", "detect", "launch", "run", "recover", "graph", "validate")
TASK_COMMANDS = ("why", "exec", "logs", "cancel", "retry", "diff")


def test_a_name_too_long_for_a_file_is_one_line_naming_the_argument(project):
    """Every command given it ended in a traceback; `add ORD <240 characters>` too (its temporary file's name)."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = full_snapshot(project.root)
    calls = [(command, arg) for command in ORDER_COMMANDS for arg in (LONG, f"ORD/{LONG}")]
    calls += [(command, arg) for command in TASK_COMMANDS for arg in (LONG, f"ORD/{LONG}")]
    for args, proc in zip(calls, project.aipm_all(calls)):
        word = "order" if args[0] in ORDER_COMMANDS and args[1] == LONG else "task" if args[1] == LONG else "-"
        assert_one_line_error(proc, "(304 characters)" if "/" in args[1] else "(300 characters)", word)
        assert "a name too long for a file" in proc.stderr, (args, proc.stderr)
    for args, named in [(("add", "ORD", "y" * 240, "--command", "true"), "TASK: 'yyy"), (("new", "y" * 240), "ORDER"),
                        (("add", "ORD", "y" * 129, "--command", "true"), "at most 128 characters"),
                        (("--root", LONG, "status", "ORD"), "(--root or AIPM_ROOT_DIR): File name too long")]:
        assert_one_line_error(project.aipm(*args), named, "-")
    assert full_snapshot(project.root) == before


def test_an_id_over_128_characters_in_a_file_name_is_refused(project):
    """A task file may be named so on disk, but aipm's own files for it (`.<id>.yaml.XXXXXXXX.tmp` while written,
    `<id>.<attempt>.reported`) would not fit in a name."""
    write_task(project.order(), "A" * 128, command="true")
    assert project.aipm("validate", "ORD").returncode == 0
    write_task(project.order(), "B" * 129, command="true")
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm("validate", "ORD"), "B" * 129 + ".yaml", "id")
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("args", [("cancel", "NOPE"), ("cancel", "ORD/NOPE"), ("cancel", "NOPE/A"), ("retry", "NOPE"),
                                  ("exec", "NOPE"), ("recover", "NOPE"), ("launch", "NOPE"), ("run", "NOPE")],
                         ids=" ".join)
def test_a_mistyped_task_or_order_of_a_write_command_creates_nothing(project, args):
    """`aipm cancel NOPE` said the task was not found, and had made .aipm/ (and the state directory) first."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(*args), "NOPE", "-")
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("flags, field, said", [
    (("--depends-on", "A", "--depends-on", "A"), "depends_on", "'A' is listed twice"),
    (("--target-file", "src\\a.py"), "target_files", "holds a backslash: separate directories with '/' ('src/a.py')"),
], ids=["a dependency twice", "a backslash in a target"])
def test_add_refuses_what_a_task_file_may_not_hold(project, flags, field, said):
    """`--depends-on A --depends-on A` was written twice into the file (and `status` said `waiting on A (QUEUED),
    A (QUEUED)`); `--target-file 'src\\a.py'` was locked and confined as src/a.py, though on Linux it may name one
    file. A task file holding either is refused the same way (fixtures/invalid/depends_twice, target_backslash)."""
    write_task(project.order(), "A", command="true")
    before = full_snapshot(project.root)
    proc = project.aipm("add", "ORD", "B", "--command", "true", *flags)
    assert_one_line_error(proc, "B.yaml", field)
    assert said in proc.stderr, proc.stderr
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("args, named", [
    (("status", "."), "holds no order.yaml and no task file"), (("run", "src"), "holds no order.yaml and no task file"),
    (("validate", "src/"), "holds no order.yaml and no task file"), (("logs", "src", "-f"), "'src'"),
    (("validate", ""), "ORDER: empty"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_an_order_argument_that_names_no_order_is_refused(project, args, named):
    """`aipm run src` (a directory with no order.yaml and no task file) was an order of no tasks: exit 0, nothing
    run; `aipm status .` showed the project root as one. `aipm validate ""` checked every order, where every other
    command refuses an empty ORDER."""
    write_task(project.order(), "A", command="true")
    (project.root / "src").mkdir()
    (project.root / "src" / "notes.txt").write_text("not a task\n")
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(*args, timeout=60), named, "-")
    assert full_snapshot(project.root) == before


def test_add_makes_a_directory_given_by_its_path_an_order(project):
    (project.root / "plans" / "q3").mkdir(parents=True)
    project.aipm("add", "plans/q3", "A", "--command", "true", check=True)
    assert project.aipm("validate", "plans/q3", check=True).stdout == "ok  q3 (1 task)\n"


@pytest.mark.parametrize("arg, said", [("ORD/", "give ORDER/TASK"), ("/A", "give ORDER/TASK"),
                                       ("ORD/NOPE.yaml", "no file NOPE.yaml in"),
                                       ("ORD/order", "order.yaml is no task file"),
                                       ("ORD/order.yaml", "order.yaml is no task file"),
                                       ("order", "order.yaml is no task file"),
                                       ("ORD/aipm", "aipm.yaml is no task file")])
def test_a_task_argument_without_a_task_says_what_to_give(project, arg, said):
    """`why ORD/` said "no file .yaml in ...", `why /A` "ORDER: empty", `why ORD/order` ended in a KeyError
    traceback, `why order` said it was in several orders (every order's order.yaml)."""
    write_task(project.order(), "A", command="true")
    (project.order() / "order.yaml").write_text("title: t\n")
    write_task(project.order("OTHER"), "B", command="true")
    (project.order("OTHER") / "order.yaml").write_text("title: u\n")
    for command in ("why", "exec", "retry"):
        proc = project.aipm(command, arg)
        assert_one_line_error(proc, repr(arg), "-")
        assert said in proc.stderr, proc.stderr


def test_a_task_named_by_its_file_name_is_that_task(project):
    """`aipm why ORD/A.yaml` said "no file A.yaml.yaml", `aipm why A.yaml` "not found in any order"; the file's
    path from the working directory worked."""
    write_task(project.order(), "A", command="true")
    assert project.json("why", "ORD/A.yaml")["task"] == "A"
    assert project.json("why", "A.yaml")["task"] == "A"


@pytest.mark.parametrize("kind", ["directory", "link to nothing"])
def test_an_order_yaml_that_is_no_file_is_refused(project, kind):
    """It was passed over in silence: the order ran under its directory's name, without the id or budget the
    user meant it to give."""
    write_task(project.order(), "A", command="true")
    meta = project.order() / "order.yaml"
    if kind == "directory":
        meta.mkdir()
        (meta / "id").write_text("ORDER_001\n")
    else:
        meta.symlink_to(project.root / "gone.yaml")
    before = full_snapshot(project.root)
    for proc in project.aipm_all([("validate",), ("status", "ORD"), ("run", "ORD"), ("exec", "ORD/A")]):
        assert_one_line_error(proc, "order.yaml", "not a file")
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("text, field, said", [
    ('timeout: "10"\n', "timeout", "not '10': YAML read it as text; write the number without quotes"),
    ("max_rework: ' 3'\n", "max_rework", "not ' 3': YAML read it as text; write the number without quotes"),
    ("max_cost_usd: '0.5'\n", "max_cost_usd", "not '0.5': YAML read it as text; write the number without quotes"),
    ("timeout: 2026-01-01\n", "timeout", "not 2026-01-01, which YAML read as a date"),
    ("title: 2026-01-01\n", "title", "YAML read 2026-01-01 as a date, not text: put it in quotes"),
    ("max_rework: 'a'\n", "max_rework", "not 'a'"),
], ids=["quoted timeout", "quoted count", "quoted dollars", "date for a number", "date for text", "a word"])
def test_a_number_in_quotes_or_a_date_is_told_what_yaml_read(project, text, field, said):
    """`timeout: "10"` was said to be no positive integer with no word of the quotes; `timeout: 2026-01-01` was
    shown as datetime.date(2026, 1, 1) and `title: 2026-01-01` as "not date"."""
    (project.order() / "A.yaml").write_text("command: 'true'\n" + text)
    before = full_snapshot(project.root)
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, "A.yaml", field)
    assert proc.stderr.rstrip().endswith(said), proc.stderr
    assert full_snapshot(project.root) == before


def _alias_bomb(key: str, levels: int = 6) -> tuple[str, str]:
    """A line of YAML where `key` holds lists of ten aliases of the list before, `levels` deep (10^levels strings
    when expanded; the loader shares them), and the alias of the top list, for a value to be refused."""
    names = [f"l{i}" for i in range(levels)]
    nested = [f"&{names[0]} [{', '.join(['x'] * 10)}]"]
    nested += [f"&{name} [{', '.join([f'*{names[i]}'] * 10)}]" for i, name in enumerate(names[1:])]
    return f"{key}: [{', '.join(nested)}]\n", f"*{names[-1]}"


@pytest.mark.parametrize("file, holder, line, named", [
    ("orders/ORD/A.yaml", "workspace_copy", "timeout: {}", "timeout"),
    ("orders/ORD/A.yaml", "workspace_copy", "priority: {}", "priority"),
    ("orders/ORD/A.yaml", "workspace_copy", "agent: {}", "agent"),
    ("orders/ORD/A.yaml", "workspace_copy", "resources: {{cpus: {}}}", "resources.cpus"),
    ("aipm.yaml", "scope_ignore", "max_workers: {}", "max_workers"),
    ("aipm.yaml", "scope_ignore", "notify: {}", "scope_ignore"),  # (the lists of lists are the first bad value)
])
def test_a_value_of_aliases_is_shown_bounded_in_its_error(project, file, holder, line, named):
    """A few hundred bytes of aliases (`timeout: *l7` over lists of lists) made an error line of 500 MB after 20 s,
    repr() expanding what the loader shares; one more level and the line never came. At six levels: 5 MB."""
    write_task(project.order(), "A", command="true")
    bomb, alias = _alias_bomb(holder)
    path = project.root / file
    path.write_text(path.read_text() + bomb + line.format(alias) + "\n")
    before = full_snapshot(project.root)
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, file.rpartition("/")[2], named)
    assert len(proc.stderr) < 1000, len(proc.stderr)
    assert full_snapshot(project.root) == before


def test_an_aipm_yaml_linked_to_a_shared_file_is_read(project):
    """`aipm.yaml -> ci/aipm.yaml` made every command fail: 'cannot read: Too many levels of symbolic links'."""
    (project.root / "ci").mkdir()
    (project.root / "ci" / "aipm.yaml").write_text("max_workers: 3\n")
    (project.root / "aipm.yaml").unlink()
    (project.root / "aipm.yaml").symlink_to("ci/aipm.yaml")
    assert project.json("config")["settings"]["max_workers"] == {"value": 3, "source": "aipm.yaml"}


def test_init_does_not_write_through_an_aipm_yaml_linked_to_nothing(project, tmp_path_factory):
    """`aipm init` wrote its template through the link, to wherever it led (outside the project), and said
    'created aipm.yaml'."""
    gone = tmp_path_factory.mktemp("elsewhere") / "settings.yaml"
    (project.root / "aipm.yaml").unlink()
    (project.root / "aipm.yaml").symlink_to(gone)
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm("init"), "aipm.yaml: a link to nothing", "-")
    assert not gone.exists()
    assert full_snapshot(project.root) == before


@pytest.mark.parametrize("args", [("status", "ORD"), ("detect", "ORD"), ("config",), ("run", "--help")])
def test_a_terminal_size_that_is_no_number_is_taken_as_unset(project, args):
    """COLUMNS=² (a digit to str.isdigit, no number to int) was a ValueError traceback in every table and help:
    Rich reads COLUMNS and LINES so. A size that is no number is taken as none, as ls(1) takes it."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    proc = project.aipm(*args, env={"COLUMNS": "²", "LINES": "x"})
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert ("┃ task" in proc.stdout) if args[0] == "status" else proc.stdout


def test_add_to_an_order_outside_the_project_writes_no_schema_beside_it(project, tmp_path_factory):
    """`add ..` (or an order directory elsewhere) wrote its editor schema into the directory above the order: `/tmp`
    for a project in /tmp. Orders outside the project are supported (`aipm run /elsewhere/ORD`); aipm's own files
    are not spread next to them."""
    outside = tmp_path_factory.mktemp("outside") / "EXT"
    outside.mkdir()
    project.aipm("add", str(outside), "T1", "--command", "true", check=True)
    assert sorted(p.name for p in outside.iterdir()) == ["T1.yaml"]
    assert not (outside.parent / "task.schema.json").exists()
    assert project.aipm("validate", str(outside)).returncode == 0
    project.aipm("add", ".", "T2", "--command", "true", check=True)  # the root as an order: the schema goes above
    assert not (project.root.parent / "task.schema.json").exists()


def test_init_checks_everything_before_it_writes(tmp_path_factory):
    """`init` with a `.aipm` link leading out of the project refused it only after it had made aipm.yaml and
    orders/; with a bad AIPM_* variable and a --root to be made, it made the project and said nothing."""
    def init(root, **env) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "aipm", "--root", str(root), "init"], capture_output=True,
                              text=True, env=dict(os.environ, **env), timeout=60)

    root, outside = tmp_path_factory.mktemp("proj"), tmp_path_factory.mktemp("elsewhere")
    (root / ".aipm").symlink_to(outside)
    assert_one_line_error(init(root), "is a symlink to", "-")
    assert sorted(p.name for p in root.iterdir()) == [".aipm"] and list(outside.iterdir()) == []
    fresh = root.parent / "fresh" / "a"
    assert_one_line_error(init(fresh, AIPM_MAX_WORKERS="x"), "AIPM_MAX_WORKERS", "-")
    assert not fresh.parent.exists()


@pytest.mark.parametrize("args, said", [
    (("--root",), "Option '--root' requires an argument"),
    (("status", "orders/ORD/A.yaml"), "is a file, not an order directory"),
    (("why", ""), "TASK: empty"),
    (("logs", "NOPE"), "'NOPE': no order and no task of that name"),
], ids=lambda v: " ".join(v) if isinstance(v, tuple) else "")
def test_a_wrong_argument_is_told_what_it_is(project, args, said):
    """`aipm --root` was an AttributeError traceback (exit 1); a task file given as an order was "no such path";
    `why ''` looked for a task named ''; `logs NOPE` spoke of a task alone, though it takes an order too."""
    write_task(project.order(), "A", command="true")
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(*args), said, "-")
    assert full_snapshot(project.root) == before


def test_an_order_path_from_the_project_root_typed_elsewhere_is_told_the_path_to_give(project):
    """`aipm status orders/ORD` typed in src/ (or with --root from another directory) said "no directory
    orders/orders/ORD under ROOT", and `status /x/ORD` "no directory orders//x/ORD": paths never looked there."""
    write_task(project.order(), "A", command="true")
    (project.root / "src").mkdir()
    before = full_snapshot(project.root)

    def aipm_in_src(*args):
        return subprocess.run([sys.executable, "-m", "aipm", "--root", str(project.root), *args],
                              capture_output=True, text=True, cwd=project.root / "src", timeout=120)

    for args in [("status", "orders/ORD"), ("why", "orders/ORD/A")]:
        proc = aipm_in_src(*args)
        assert_one_line_error(proc, f"no such path from {project.root / 'src'}",
                              f"give the path {project.root / 'orders' / 'ORD'}")
    proc = aipm_in_src("status", "/nonexistent/ORD")
    assert_one_line_error(proc, "order '/nonexistent/ORD': no such directory /nonexistent/ORD", "(orders here: ORD)")
    assert full_snapshot(project.root) == before


def test_a_terminal_width_too_narrow_for_a_word_is_taken_as_unset(project):
    """COLUMNS=0 broke every header of `status` into letters, one a line."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    for columns in ("0", "1"):
        out = project.aipm("status", "ORD", env={"COLUMNS": columns}, check=True).stdout
        assert "┃ task ┃ status ┃" in out, out


def test_an_order_name_that_is_a_file_in_the_orders_directory_is_said_to_be_one(project):
    """`orders/F` a file (a stray note, a task file saved one level up): `add F T` and `status F` said "no directory
    orders/F ... and no such path; `aipm new F` makes one", which then fails on the file."""
    write_task(project.order(), "A", command="true")
    (project.root / "orders" / "F").write_text("notes\n")
    before = full_snapshot(project.root)
    for args in [("add", "F", "T", "--command", "true"), ("status", "F")]:
        proc = project.aipm(*args)
        assert_one_line_error(proc, f"order 'F': orders/F under {project.root} is a file, not an order directory",
                              "(orders here: ORD)")
    assert full_snapshot(project.root) == before


def test_an_order_given_where_a_task_is_asked_for_is_named_as_an_order(project):
    """`aipm cancel ORD` (meaning the whole order) said "task 'ORD': not found in any order under .../orders", of an
    order it lists; `aipm why orders/ORD` said "order 'orders': .../orders is the directory of the orders", naming
    a directory the user never gave. Each now says the argument is an order and how to name one of its tasks."""
    write_task(project.order(), "A", command="true")
    write_task(project.order(), "B", command="true")
    before = full_snapshot(project.root)
    order_dir = str(project.order())
    calls = [(command, arg) for command in ("why", "exec", "cancel", "retry", "diff")
             for arg in ("ORD", "orders/ORD", "orders/ORD/", order_dir)]
    for args, proc in zip(calls, project.aipm_all(calls)):
        assert_one_line_error(proc, repr(args[1]), "-")
        assert "is an order, not a task" in proc.stderr and "ORD/A" in proc.stderr, (args, proc.stderr)
    assert full_snapshot(project.root) == before
