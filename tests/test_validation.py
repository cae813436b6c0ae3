"""Every user mistake: one line naming file and field, exit 2, no traceback, not one byte changed on disk (`why` of
a task whose own file is good: that line as a warning, and its explanation)."""

import shutil
import subprocess

import pytest

from conftest import FIXTURES, snapshot, write_task

CASES = sorted(p.name for p in (FIXTURES / "invalid").iterdir() if p.is_dir())
COMMANDS = [("validate", "{o}"), ("status", "{o}"), ("detect", "{o}"), ("launch", "{o}"), ("run", "{o}"),
            ("graph", "{o}")]


def assert_one_line_error(proc, file_name, field):
    assert proc.returncode == 2, (proc.args[5:], proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, (proc.args[5:], proc.stderr)
    assert "Traceback" not in proc.stderr
    assert file_name in lines[0], lines[0]
    if field != "-":
        assert field in lines[0], lines[0]


def test_there_are_enough_cases():
    assert len(CASES) >= 30


@pytest.mark.parametrize("case", CASES)
def test_invalid_order_through_every_command(project, case):
    order = project.root / "orders" / case
    shutil.copytree(FIXTURES / "invalid" / case, order)
    file_name, field = (FIXTURES / "invalid" / case / "expect.txt").read_text().split("\n")[:2]
    (order / "expect.txt").unlink()
    before = snapshot(project.root)
    # exec and why reach the order through a task of it. All at once, each a process of its own: none may change a
    # byte, whatever the others do meanwhile.
    calls = [(command, arg.format(o=case)) for command, arg in COMMANDS]
    calls += [(command, f"{case}/TASK_001") for command in ("exec", "why")]
    for call, proc in zip(calls, project.aipm_all(calls)):
        if call[0] == "why" and file_name not in ("TASK_001.yaml", "order.yaml"):
            # `why` of a task whose own file is good explains it, the broken sibling planned as a task that cannot
            # start and named in one line on stderr (a file being edited while the order runs hid every `why`).
            assert proc.returncode == 0 and proc.stdout.startswith("TASK_001 "), (case, proc.stdout, proc.stderr)
            (line,) = proc.stderr.splitlines()
            assert line.startswith("aipm: warning: ") and file_name in line and (field == "-" or field in line), line
            continue
        assert_one_line_error(proc, file_name, field)
    assert snapshot(project.root) == before, "a command changed the tree"


@pytest.mark.parametrize("text,field,said", [
    ("command: true\n", "command", "YAML read true as a boolean, not text: put it in quotes"),
    ("command: [sleep, 1]\n", "command", "YAML read 1 as a number, not text: put it in quotes"),
    ("command: 'true'\ndepends_on: [1]\n", "depends_on", "YAML read 1 as a number, not text: put it in quotes"),
    ("command: 'true'\ndepends_on: 1\n", "depends_on", 'must be a list (e.g. ["1"]), not a number'),
    ("command: 'true'\ntitle: 2026\n", "title", "YAML read 2026 as a number, not text: put it in quotes"),
    ("id: 1\ncommand: 'true'\n", "id", "YAML read 1 as a number, not text: put it in quotes"),
])
def test_a_value_yaml_read_as_no_text_is_told_to_be_quoted(project, text, field, said):
    """`command: true` was told it "must be a string ... naming a program", `depends_on: [1]` that "1 is a number",
    and `depends_on: 1` to write `[1]` (refused in turn): nothing said that YAML took the unquoted value for a
    boolean or a number, nor that quotes fix it (`id: 1` in 1.yaml was said to differ from '1')."""
    order = project.order()
    (order / "1.yaml").write_text(text)
    before = snapshot(project.root)
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, "1.yaml", f"{field}: ")
    assert said in proc.stderr, proc.stderr
    assert snapshot(project.root) == before


@pytest.mark.parametrize("file,text,said", [
    ("A.yaml", "command: 'true'\ntimeout: true\n", "timeout: must be a positive integer or none, not true"),
    ("A.yaml", "command: 'true'\ntimeout: .inf\n", "timeout: must be a positive integer or none, not .inf"),
    ("A.yaml", "command: 'true'\ntarget_files: [a.txt, null]\n", "target_files: every item must be a string, not null"),
    ("A.yaml", "command: 'true'\nexit_code: true\n", "exit_code: must be an integer, not true"),
    ("A.yaml", "command: 'true'\nagent: false\n", "agent: false is not one of command, claude, codex, aider"),
    ("A.yaml", "command: 'true'\ntokens: {input: null}\n", "tokens: must be a mapping of input, output, cache_read, "
                                                           "cache_write to whole numbers ≥ 0, not {'input': null}"),
    ("A.yaml", "just text\n", "must be a mapping of keys to values, not a string"),
    # aipm.yaml's form of a review command, in a task file
    ("A.yaml", "command: 'true'\nreview: {command: make check}\n", "review: must be a string (run by /bin/sh -c) or a "
     "list of strings (argv) naming a program; a task file gives the command itself: review: 'make check'"),
    ("order.yaml", "max_cost_usd: true\n", "max_cost_usd: must be a number of US dollars from 0.000001 below "
                                           "1,000,000,000,000, or none, not true"),
])
def test_a_wrong_value_is_said_as_yaml_spells_it(project, file, text, said):
    """`timeout: true` was "not True", `target_files: [a, null]` "not NoneType": Python's words for what the user
    wrote as YAML."""
    order = project.order()
    (order / file).write_text(text)
    if file == "order.yaml":
        write_task(order, "A", command="true")
    before = snapshot(project.root)
    proc = project.aipm("validate", "ORD")
    assert (proc.returncode, proc.stderr) == (2, f"aipm: error: {order / file}: {said}\n")
    assert snapshot(project.root) == before


@pytest.mark.parametrize("where", ["task", "order.yaml"])
@pytest.mark.parametrize("value,said", [("5e2", "write 500 or 5.0e+02"), ("1e-6", "write 0.000001 or 1.0e-06"),
                                        ("1e300", "write 1.0e+300")])
def test_a_budget_in_exponent_form_yaml_reads_as_text_is_told_how_to_write_it(project, where, value, said):
    """`max_cost_usd: 5e2` was refused as "not '5e2'", a number to whoever wrote it (and taken in aipm.yaml):
    PyYAML reads an exponent without a dot or an exponent sign as text."""
    order = project.order()
    (order / "order.yaml").write_text("id: ORD\n" + f"max_cost_usd: {value}\n" * (where == "order.yaml"))
    (order / "A.yaml").write_text("command: 'true'\n" + f"max_cost_usd: {value}\n" * (where == "task"))
    before = snapshot(project.root)
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, "order.yaml" if where == "order.yaml" else "A.yaml", "max_cost_usd: ")
    assert f"(YAML reads {value} as text: {said})" in proc.stderr, proc.stderr
    assert snapshot(project.root) == before


@pytest.mark.parametrize("text,said", [
    ("priority: p1\n", "priority: 'p1' is not one of P0, P1, P2, P3; write P1"),
    ("status: done\n", "; write DONE"),
])
def test_a_priority_or_status_in_another_case_is_told_its_spelling(project, text, said):
    """`priority: p1` and `status: done` were refused with the list of values only: which one was meant went
    unsaid, though it is the one value spelt so in another case."""
    (project.order() / "A.yaml").write_text("command: 'true'\n" + text)
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, "A.yaml", text.split(":")[0])
    assert said in proc.stderr, proc.stderr


def test_a_target_in_the_home_directory_is_refused_not_taken_for_a_directory_named_tilde(project):
    """`target_files: [~/notes.md]` validated and ran: nothing expands ~, so the task was held to a file
    `<root>/~/notes.md` while its worker wrote the user's own, unlocked, unaudited. Now it is refused (exit 2,
    nothing changed); a name beginning with ~ in the project is still a target, written ./~/..."""
    order = project.order()
    write_task(order, "A", command="true", target_files=["~/notes.md"])
    before = snapshot(project.root)
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, "A.yaml", "target_files")
    assert "'~/notes.md' starts with ~, which aipm does not expand" in proc.stderr and "./~/notes.md" in proc.stderr
    assert snapshot(project.root) == before
    write_task(order, "A", command="true", target_files=["./~/notes.md"])
    assert project.aipm("validate", "ORD").returncode == 0


def test_an_empty_id_is_the_file_names(project):
    """`id:` left empty was refused ("None differs from the file name"), where every other empty key is absent."""
    (project.order() / "A.yaml").write_text("id:\ncommand: 'true'\n")
    proc = project.aipm("validate", "ORD")
    assert proc.returncode == 0, proc.stderr
    assert project.statuses() == {"A": "QUEUED"}


def test_file_over_one_mebibyte(project):
    order = project.order()
    write_task(order, "A", command="true")
    (order / "B.yaml").write_text("command: true\n" + "#" * (1 << 20) + "\n")
    assert_one_line_error(project.aipm("validate", "ORD"), "B.yaml", "-")


def test_symlink_target_leading_outside_the_root(project, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside")
    (project.root / "escape").symlink_to(outside)
    write_task(project.order(), "A", command="true", target_files=["escape/secret.txt"])
    proc = project.aipm("validate", "ORD")
    assert_one_line_error(proc, "A.yaml", "target_files")
    assert "symlink" in proc.stderr


def test_unknown_order_and_task_are_one_line(project):
    assert_one_line_error(project.aipm("status", "NOPE"), "NOPE", "-")
    project.order()
    assert_one_line_error(project.aipm("why", "ORD/NOPE"), "NOPE", "-")


def test_an_unknown_order_names_the_orders_there_are(project):
    """A first `aipm add ORDER_001 T1` (before `aipm new`), or a typo, said only 'give an order id or a path to an
    order directory': the ids there are, or the command that makes the first one, are what to do next."""
    proc = project.aipm("add", "ORDER_001", "T1")
    assert_one_line_error(proc, "ORDER_001", "no order yet: `aipm new ORDER_001` makes one")
    write_task(project.order("sprint"), "A", command="true")
    (project.order("sprint") / "order.yaml").write_text("id: ORDER_012\n")
    write_task(project.order("B"), "A", command="true")
    assert_one_line_error(project.aipm("status", "ORDER_12"), "ORDER_12", "(orders here: B, ORDER_012)")
    assert not (project.root / "orders" / "ORDER_001").exists()


@pytest.mark.parametrize("text", ["", "\n", "# notes only\n", "---\n# a comment\n"])
def test_an_order_yaml_with_no_data_is_an_order_with_no_keys(project, text):
    """Every order.yaml key is optional: an empty file passed, a comment-only one was refused as 'a task file'."""
    write_task(project.order("O"), "A", command="true")
    (project.order("O") / "order.yaml").write_text(text)
    proc = project.aipm("validate", "O")
    assert proc.returncode == 0 and proc.stdout == "ok  O (1 task)\n", proc.stderr


@pytest.mark.parametrize("key", ["[a]", "{a: 1}", "!!set {a}"])
def test_a_key_that_is_no_plain_value_is_one_line(project, key):
    """A `!!set` key passed the check for lists and mappings and ended in a traceback (unhashable type: 'set')."""
    write_task(project.order("O"), "A", command="true")
    (project.order("O") / "B.yaml").write_text(f"command: 'true'\n? {key}\n: x\n")
    assert_one_line_error(project.aipm("validate", "O"), "B.yaml", "line 2, column 3")


@pytest.mark.parametrize("name", ["B.yaml", "order.yaml"])
def test_a_file_nested_as_deep_as_yaml_goes_is_one_line(project, name):
    """libyaml reads 1000 levels; building them took more frames than Python allows (RecursionError, exit 1)."""
    write_task(project.order("O"), "A", command="true")
    (project.order("O") / name).write_text("title: " + "[" * 999 + "]" * 999 + "\n")
    assert_one_line_error(project.aipm("validate", "O"), name, "nested too deeply")


def test_a_target_a_thousand_directories_deep_is_read(project, tmp_path_factory):
    """Its directories were checked for symlinks by a recursion a directory: RecursionError, exit 1."""
    deep = "d/" * 1200 + "x.txt"  # 2405 bytes: a path the kernel takes
    write_task(project.order("O"), "A", command="true", target_files=[deep])
    proc = project.aipm("validate", "O")
    assert proc.returncode == 0 and proc.stdout == "ok  O (1 task)\n", proc.stderr
    outside = tmp_path_factory.mktemp("outside")
    try:  # made and removed by mkdir -p and rm -rf: Python's (and pytest's clean-up of its tmp dirs) recurse
        subprocess.run(["mkdir", "-p", deep.rpartition("/")[0]], cwd=outside, check=True)
        (project.root / "d").symlink_to(outside / "d")  # the top directory, a link out of the root: still found
        assert_one_line_error(project.aipm("validate", "O"), "A.yaml", "target_files")
    finally:
        subprocess.run(["rm", "-rf", str(outside / "d")], check=True)


@pytest.mark.parametrize("mine,theirs", [
    ("*" + "a" * 700, "a" * 700 + "*"),  # a glob segment of 700 characters (either matches "a" * 700)
    ("d/" * 1000 + "*.txt", "d/" * 1000 + "x.txt"),  # a glob of a thousand segments
])
def test_long_globs_are_planned(project, mine, theirs):
    """Globs were compared by a recursion a character and a segment: RecursionError in detect, and in a run."""
    write_task(project.order("O"), "A", command="true", target_files=[mine])
    write_task(project.order("O"), "B", command="true", target_files=[theirs])
    plan = project.json("detect", "O")
    assert [t["id"] for t in plan["launchable"]] == ["A"]
    assert [(b["id"], b["reason"]) for b in plan["blocked"]] == [("B", "file_conflict_in_round")]


def test_validate_all_orders_reports_each_bad_one(project):
    write_task(project.order("GOOD"), "A", command="true")
    write_task(project.order("BAD"), "A", command=42)
    proc = project.aipm("validate")
    assert proc.returncode == 2
    assert proc.stdout == "ok  GOOD (1 task)\n" and "A.yaml: command" in proc.stderr  # was '(1 tasks)'


def test_an_unknown_key_is_given_a_hint_only_when_one_is_close(project):
    """`tags: [x]` in a task file got "did you mean 'status'?", and `target` got 'agent': difflib's default
    cutoff (0.6) took the three letters they share for a match. A close misspelling still gets its key, and so
    does a word of one key; anything else gets the list of keys."""
    cases = {"TAGS": ("tags", None), "PRIORTY": ("priorty", "did you mean 'priority'?"),
             "TARGET": ("target", "did you mean 'target_files'?")}
    for name, (key, _) in cases.items():
        write_task(project.order(name), "A", command="true", **{key: "x"})
    before = snapshot(project.root)
    for (name, (key, hint)), proc in zip(cases.items(), project.aipm_all([("validate", n) for n in cases])):
        assert_one_line_error(proc, f"{name}/A.yaml", key)
        if hint:
            assert proc.stderr.rstrip().endswith(hint), proc.stderr
        else:
            assert "did you mean" not in proc.stderr and "known keys: id, title, status" in proc.stderr, proc.stderr
    assert snapshot(project.root) == before
    # The same rule for settings (nested ones by their dotted names) and dependencies.
    from aipm.errors import did_you_mean

    assert did_you_mean("model", ["worker.model", "review.command"]) == "; did you mean 'worker.model'?"
    assert did_you_mean("command", ["worker.command", "review.command"]) == ""  # two keys have it: no guess
    assert did_you_mean("tags", ["status", "TASK_1"]) == ""


def test_a_plural_of_a_keys_word_still_gets_that_key():
    """`targets:` for target_files got "did you mean 'target_files'?" from difflib's 0.6 cutoff; at 0.75 it is not
    close enough (0.63), and the word rule took `target` only: the likeliest slip for target_files lost its hint.
    A plural of a key's word finds that key as the word does."""
    from aipm.errors import did_you_mean
    from aipm.fields import TASK_KEYS

    assert did_you_mean("targets", TASK_KEYS) == "; did you mean 'target_files'?"
    assert did_you_mean("target", TASK_KEYS) == "; did you mean 'target_files'?"
    assert did_you_mean("tags", TASK_KEYS) == ""


def test_a_key_cut_short_or_named_as_other_tools_name_it_gets_its_hint(project):
    """`prio:` and `dependencies:` got the list of all 31 keys: neither is spelt close enough to its key (0.67 and
    0.55 against the 0.75 cutoff). A word that begins exactly one key gets that key, and the names other task
    runners use for ours get ours; a beginning several keys share, or a name meant for another file, gets none."""
    cases = {"PRIO": ("prio", "priority"), "DEPS": ("dependencies", "depends_on"), "CMD": ("cmd", "command"),
             "FILES": ("files", "target_files")}
    for name, (key, _) in cases.items():
        write_task(project.order(name), "A", command="true", **{key: "x"})
    before = snapshot(project.root)
    for (name, (key, hint)), proc in zip(cases.items(), project.aipm_all([("validate", n) for n in cases])):
        assert_one_line_error(proc, f"{name}/A.yaml", key)
        assert proc.stderr.rstrip().endswith(f"did you mean {hint!r}?"), proc.stderr
    assert snapshot(project.root) == before
    from aipm.errors import did_you_mean
    from aipm.fields import SYNONYMS, TASK_KEYS

    assert did_you_mean("work", TASK_KEYS, SYNONYMS) == ""  # workspace, workspace_setup, workspace_copy
    assert did_you_mean("run", ["max_workers", "ray_address"], SYNONYMS) == ""  # (settings have no `command`)


def test_a_blank_prompt_is_refused_only_where_an_agent_would_get_it(project):
    """`prompt: ''` gives an agent (a task without command) nothing to do; a command's standard input may be
    empty: such a task is valid (the first version of the refusal took it too)."""
    order = project.order()
    (order / "A.yaml").write_text("command: 'wc -c'\nprompt: ''\n")
    assert project.aipm("validate", "ORD").returncode == 0
    (order / "B.yaml").write_text("prompt: ' '\n")
    proc = project.aipm("validate", "ORD")
    assert proc.returncode == 2 and "B.yaml: prompt: empty" in proc.stderr, proc.stderr
