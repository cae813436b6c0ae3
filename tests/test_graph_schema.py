"""`aipm graph` output parses and says the right thing; the JSON Schema matches the validator; `new`/`add`."""

from __future__ import annotations

import datetime as dt
import os
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aipm.errors import ValidationError
from aipm.graph import COLOURS, dot, mermaid
from aipm.model import MANAGED_FIELDS, Order, Priority, Status, Task
from aipm.schema import order_schema, schema_text, shipped_path, task_schema
from aipm.fields import TASK_KEYS, task_from_mapping
from aipm.store import ORDER_FILE, ORDER_KEYS, load_order, parse_mapping, task_files
from conftest import FIXTURES, capped_memory, snapshot

# Ids that break naive quoting: reserved words, quotes, backslashes (one at the end), markup, entities.
NASTY = ["end", 'say "hi"', "back\\slash", "trail\\", "x<br/>y", "#35;", "a;b{c}", "graph", "A-1.x"]


def nasty_order() -> Order:
    order = Order(id='ord "1"', path="")
    statuses = list(Status)
    for i, task_id in enumerate(NASTY):
        deps = (NASTY[i - 1],) if i else ()
        if i >= 3:
            deps += (NASTY[0],)
        order.tasks[task_id] = Task(id=task_id, path="", title=f"title {i} with \"quotes\" & <b>",
                                    status=statuses[i % len(statuses)], depends_on=deps)
    return order


def expected_edges(order: Order) -> set[tuple[str, str]]:
    return {(dep, t.id) for t in order.tasks.values() for dep in t.depends_on}


# ---- DOT: a small parser of the subset Graphviz accepts ----------------------------------------------------

ID = ("id", "str")  # a bare or a quoted identifier
DOT_TOKEN = re.compile(r'\s+|(?P<str>"(?:[^"\\]|\\.)*")|(?P<id>[A-Za-z_][A-Za-z0-9_]*)|(?P<op>->|[{}\[\];=,])', re.S)


def dot_tokens(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = DOT_TOKEN.match(text, pos)
        assert m, f"DOT lexer stuck at {text[pos:pos + 30]!r}"
        pos = m.end()
        if m.lastgroup == "str":
            out.append(("str", m.group("str")[1:-1].replace('\\"', '"')))  # Graphviz unescapes only \"
        elif m.lastgroup:
            out.append((m.lastgroup, m.group(m.lastgroup)))
    return out


def dot_label(raw: str) -> list[str]:
    """A label's lines, decoding Graphviz escString (\\n line break, \\\\ backslash)."""
    text = re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), raw, flags=re.S)
    return text.split("\n")


def parse_dot(text: str) -> tuple[dict[str, dict[str, str]], list[tuple[str, str]]]:
    toks = dot_tokens(text)
    assert toks[0] == ("id", "digraph") and toks[1][0] in ID and toks[2] == ("op", "{") and toks[-1] == ("op", "}")
    body, nodes, edges, i = toks[3:-1], {}, [], 0

    def attrs(j: int) -> tuple[dict[str, str], int]:
        found = {}
        assert body[j] == ("op", "[")
        j += 1
        while body[j] != ("op", "]"):
            assert body[j][0] in ID and body[j + 1] == ("op", "=") and body[j + 2][0] in ID, body[j:j + 3]
            found[body[j][1]] = body[j + 2][1]
            j += 3
            if body[j] == ("op", ","):
                j += 1
        return found, j + 1

    while i < len(body):
        kind, value = body[i]
        assert kind in ID, f"statement starts with {value!r}"
        if body[i + 1] == ("op", "="):  # graph attribute
            i += 3
        elif body[i + 1] == ("op", "->"):
            assert body[i + 2][0] in ID
            edges.append((value, body[i + 2][1]))
            i += 3
        elif kind == "id" and value in ("node", "edge", "graph"):  # keywords only when unquoted
            _, i = attrs(i + 1)
        else:
            nodes[value], i = attrs(i + 1)
        assert body[i] == ("op", ";"), f"missing ; after {value!r}"
        i += 1
    return nodes, edges


def test_dot_parses_and_draws_every_task_edge_and_colour():
    order = nasty_order()
    nodes, edges = parse_dot(dot(order))
    by_label = {dot_label(a["label"])[0]: name for name, a in nodes.items()}
    assert set(by_label) == set(order.tasks)
    name_to_id = {v: k for k, v in by_label.items()}
    assert {(name_to_id[a], name_to_id[b]) for a, b in edges} == expected_edges(order)
    for name, a in nodes.items():
        task = order.tasks[name_to_id[name]]
        assert dot_label(a["label"])[-1] == task.status.value
        assert (a["fillcolor"], a["color"]) == COLOURS[task.status]


@pytest.mark.skipif(not shutil.which("dot"), reason="Graphviz not installed")
def test_graphviz_accepts_the_dot_output():
    proc = subprocess.run(["dot", "-Tsvg"], input=dot(nasty_order()), capture_output=True, text=True)
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


# ---- Mermaid: every line must be one of the four forms we emit ---------------------------------------------

M_NODE = re.compile(r'    (t\d+)\["([^"\[\]]*)"\]')
M_EDGE = re.compile(r"    (t\d+) --> (t\d+)")
M_CLASSDEF = re.compile(r"    classDef ([A-Z_]+) fill:(#[0-9a-f]{6}),stroke:(#[0-9a-f]{6}),color:#000")
M_CLASS = re.compile(r"    class (t\d+(?:,t\d+)*) ([A-Z_]+)")


def test_mermaid_parses_and_draws_every_task_edge_and_colour():
    order = nasty_order()
    lines = mermaid(order).splitlines()
    assert lines[0] == "flowchart LR"
    labels, edges, colours, members = {}, [], {}, {}
    for line in lines[1:]:
        if m := M_NODE.fullmatch(line):
            parts = m.group(2).split("<br/>")
            assert all(re.fullmatch(r"(?:[^<>#&;\"]|#\d+;)*", p) for p in parts), f"unescaped text in {line!r}"
            labels[m.group(1)] = [re.sub(r"#(\d+);", lambda e: chr(int(e.group(1))), p) for p in parts]
        elif m := M_EDGE.fullmatch(line):
            edges.append(m.groups())
        elif m := M_CLASSDEF.fullmatch(line):
            colours[m.group(1)] = (m.group(2), m.group(3))
        elif m := M_CLASS.fullmatch(line):
            for node in m.group(1).split(","):
                assert node not in members, f"{node} in two classes"
                members[node] = m.group(2)
        else:
            pytest.fail(f"not a Mermaid line we know: {line!r}")
    ids = {node: parts[0] for node, parts in labels.items()}
    assert sorted(ids.values()) == sorted(order.tasks)
    assert {(ids[a], ids[b]) for a, b in edges} == expected_edges(order)
    assert set(members) == set(labels)
    for node, status in members.items():
        task = order.tasks[ids[node]]
        assert status == task.status.value == labels[node][-1]
        assert colours[status] == COLOURS[task.status]


def test_graph_command_prints_both_formats(project):
    order_dir = project.order("G")
    (order_dir / "A.yaml").write_text("title: a\n")
    (order_dir / "B.yaml").write_text("depends_on: [A]\nstatus: DONE\n")
    assert "t0 --> t1" in project.aipm("graph", "G", check=True).stdout
    _, edges = parse_dot(project.aipm("graph", "G", "--format", "dot", check=True).stdout)
    assert edges == [("A", "B")]
    bad = project.aipm("graph", "G", "--format", "png")
    assert bad.returncode == 2 and bad.stderr.startswith("aipm: error: --format")


def test_graph_json_gives_nodes_and_edges(project):
    """CONTRACT: read commands take `--json`; `graph` was the one read command without it."""
    order_dir = project.order("G")
    (order_dir / "A.yaml").write_text("title: a\npriority: P0\n")
    (order_dir / "B.yaml").write_text("depends_on: [A]\nstatus: DONE\n")
    assert project.json("graph", "G") == {
        "order": "G",
        "nodes": [{"id": "A", "title": "a", "status": "QUEUED", "priority": "P0"},
                  {"id": "B", "title": "", "status": "DONE", "priority": "P1"}],
        "edges": [{"from": "A", "to": "B"}]}


# ---- JSON Schema -------------------------------------------------------------------------------------------


def check(instance, schema: dict) -> list[str]:
    """The draft 2020-12 keywords our schemas use (jsonschema is not a dependency); [] when valid."""
    errors = []
    kinds = schema.get("type")
    if kinds is not None:
        names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
                 dict: "object", type(None): "null"}
        allowed = [kinds] if isinstance(kinds, str) else kinds
        name = names.get(type(instance))
        if name not in allowed and not (name == "integer" and "number" in allowed):  # an integer is a number
            return [f"{instance!r} is not of type {kinds}"]
    if "enum" in schema and instance not in schema["enum"]:
        errors.append(f"{instance!r} not in enum")
    if isinstance(instance, int) and "minimum" in schema and instance < schema["minimum"]:
        errors.append(f"{instance} < minimum")
    number = isinstance(instance, (int, float)) and not isinstance(instance, bool)
    if number and "exclusiveMinimum" in schema and instance <= schema["exclusiveMinimum"]:
        errors.append(f"{instance} <= exclusiveMinimum")
    if number and "multipleOf" in schema and instance % schema["multipleOf"]:
        errors.append(f"{instance} not a multiple of {schema['multipleOf']}")
    if "if" in schema and not check(instance, schema["if"]):
        errors += check(instance, schema.get("then", {}))
    if isinstance(instance, str):
        if len(instance) < schema.get("minLength", 0):
            errors.append(f"{instance!r} too short")
        # As ECMA-262 reads it (editors do): `$` is the end only, where Python's also matches before a final "\n".
        if "pattern" in schema and not re.search(re.sub(r"(?<!\\)\$", r"\\Z", schema["pattern"]), instance):
            errors.append(f"{instance!r} does not match {schema['pattern']}")
    if isinstance(instance, list):
        if len(instance) < schema.get("minItems", 0):
            errors.append("too few items")
        if schema.get("uniqueItems") and len({json.dumps(item) for item in instance}) < len(instance):
            errors.append("items not unique")
        first = schema.get("prefixItems", [])
        errors += [e for item, rule in zip(instance, first) for e in check(item, rule)]
        errors += [e for item in instance[len(first):] for e in check(item, schema.get("items", {}))]
    if isinstance(instance, dict):
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                errors += [f"{key}: {e}" for e in check(value, props[key])]
            elif schema.get("additionalProperties") is False:
                errors.append(f"{key}: not allowed")
    return errors


def as_json_data(path: Path) -> dict:
    """The file as an editor's YAML 1.2 language server sees it: timestamps are plain strings."""
    data = yaml.safe_load(path.read_text())
    return {k: v.isoformat() if isinstance(v, (dt.date, dt.datetime)) else v for k, v in (data or {}).items()}


def test_schema_is_generated_from_the_validator_lists():
    task, order = task_schema(), order_schema()
    assert task["$schema"] == order["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(task["properties"]) == list(TASK_KEYS) and list(order["properties"]) == list(ORDER_KEYS)
    assert task["properties"]["status"]["enum"][:-1] == [s.value for s in Status]
    assert task["properties"]["priority"]["enum"][:-1] == [p.value for p in Priority]
    assert {k for k, v in task["properties"].items() if v.get("readOnly")} == set(MANAGED_FIELDS) & set(TASK_KEYS)


def test_shipped_schema_files_equal_what_aipm_schema_prints(project):
    for kind in ("task", "order"):
        printed = project.aipm("schema", "--kind", kind, check=True).stdout
        assert printed == schema_text(kind) == shipped_path(kind).read_text(), \
            f"aipm/schemas/{kind}.schema.json is stale: run `python -m aipm.schema`"
        json.loads(printed)
    assert project.aipm("schema", check=True).stdout == schema_text("task")
    assert project.aipm("schema", "--json", check=True).stdout == schema_text("task")  # read commands take --json


def fixture_orders() -> list[Path]:
    base = FIXTURES / "orders"
    return sorted(d for d in base.iterdir() if d.is_dir()) if base.is_dir() else []


@pytest.mark.parametrize("order_dir", fixture_orders(), ids=lambda p: p.name)
def test_schema_accepts_every_valid_fixture(order_dir):
    try:
        load_order(order_dir, FIXTURES.parent)
    except ValidationError:
        pytest.skip("an intentionally invalid fixture")
    for path in task_files(order_dir):
        assert check(as_json_data(path), task_schema()) == [], path
    if (order_dir / ORDER_FILE).is_file():
        assert check(as_json_data(order_dir / ORDER_FILE), order_schema()) == []


@pytest.mark.parametrize("text", [
    "title: t\nstatus: QUEUED\npriority: P0\ndepends_on: [B]\ntarget_files: [a.py]\ncommand: [pytest, -q]\n",
    "title:\ncommand: make\nreview: [ruff, check]\ntimeout: 60\nmax_attempts: 2\nattempts: 0\nexit_code: -9\n",
    "status: DONE\nstarted_at: '2026-01-01T00:00:00+00:00'\nprompt: |\n  two\n  lines\n",
    "status: DOING\n", "priority: P4\n", "depends_on: B\n", "command: []\n", "command: [ls, 1]\n",
    "timeout: 0\n", "timeout: none\n", "timeout: None\n", "timeout: later\n", "timeout: '10'\n", "attempts: -1\n", "max_attempts: true\n", "exit_code: '1'\n", "stauts: QUEUED\n",
    "id:\n", "title: [a]\n", "target_files: [1]\n",
    # found by a review: the schema took what validate refuses
    "command: ''\n", "command: '   '\n", "command: ['']\n", "review: ''\n", "review: ['', x]\n", "model: ''\n",
    "title: \"two\\nlines\"\n", "target_files: ['']\n", "workspace_copy: ['']\n", "workspace_copy: [/abs]\n",
    "workspace_copy: [a/../../b]\n", "workspace_setup: ['']\n", "id: 'a b'\n",
    # a NUL byte, which ends a string on a command line (in double quotes YAML reads \0 as one)
    'command: "printf a\\0b"\n', 'command: [printf, "a\\0b"]\n', 'review: "x\\0"\n', 'model: "a\\0b"\n',
    'workspace_setup: [make, "\\0"]\n',
    # a title: the validator drops the final line breaks (`>` gives one) and refuses any other Python's
    # splitlines() knows (\v, \f, \x1c-\x1e, \x85, \u2028, \u2029)
    "title: >\n  a folded title\n", "title: |+\n  kept\n\n", 'title: "a\\vb"\n', 'title: "a\\x85b"\n',
    'title: "a\\u2028b"\n', 'title: "a\\nb\\n"\n',
    # and what both take
    "workspace_setup: ''\n", "workspace_setup: make\n", "workspace_copy: [.env, 'cfg/*.json']\n", "model: opus\n",
    "command: [make, '']\n",
    # a blank prompt: nothing for an agent (no command) to do; a command's standard input may be empty
    "prompt: ''\n", "prompt: ' '\nmodel: opus\n", "command: wc\nprompt: ''\n",
    # more than one GPU is whole (Ray refuses 1.5 at every attempt); a share of one is not
    "resources: {gpus: 1.5}\n", "resources: {gpus: 2.0}\n", "resources: {gpus: 0.5}\n", "resources: {gpus: 3}\n",
    # a target holding a line break (a worker's AIPM_TARGET_FILES is one per line) or a NUL: refused by both
    'target_files: ["a\\nb"]\n', 'target_files: ["a\\rb"]\n', 'target_files: ["a\\0b"]\n',
    'target_files: [a.py, "src/\\n"]\n', "target_files: ['a b.py', ' c ']\n",
    # a backslash in a target (a separator, or a character of one name?), a dependency listed twice: refused by both
    "target_files: ['src\\a.py']\n", "depends_on: [B, B]\n", "depends_on: [B, C]\n",
])
def test_schema_and_validator_agree(tmp_path, text):
    path = tmp_path / "A.yaml"
    path.write_text(text)
    try:
        task_from_mapping(path, parse_mapping(path, text), tmp_path)
        valid = True
    except ValidationError:
        valid = False
    assert (check(as_json_data(path), task_schema()) == []) == valid


def test_the_schema_copy_beside_the_orders_follows_this_aipm(project):
    """Files point at ../task.schema.json; aipm generates that copy, so an outdated one is replaced."""
    project.order()
    copy = project.root / "orders" / "task.schema.json"
    copy.write_text("{}\n")
    project.aipm("add", "ORD", "A", "--command", "true", check=True)
    assert copy.read_text() == schema_text("task")
    assert not (project.root / "orders" / "order.schema.json").exists()  # only what a file refers to


def test_a_task_added_to_an_order_outside_the_project_names_no_schema_copy(project, tmp_path_factory):
    """`aipm add /elsewhere/ORD T` wrote `$schema=../task.schema.json`, a copy made only beside the project's
    orders: the line pointed at no file. Such a file has no schema line; one in the project still has."""
    elsewhere = tmp_path_factory.mktemp("elsewhere") / "ORD"
    elsewhere.mkdir()
    project.aipm("add", str(elsewhere), "A", "--command", "true", check=True)
    text = (elsewhere / "A.yaml").read_text()
    assert "$schema" not in text and text.startswith("id: A\n")
    assert not (elsewhere.parent / "task.schema.json").exists()
    assert load_order(elsewhere, project.root).tasks["A"].status == Status.QUEUED
    project.order()
    project.aipm("add", "ORD", "B", "--command", "true", check=True)
    line = (project.root / "orders" / "ORD" / "B.yaml").read_text().splitlines()[0]
    assert line == "# yaml-language-server: $schema=../task.schema.json"
    assert (project.root / "orders" / "task.schema.json").read_text() == schema_text("task")


@pytest.mark.parametrize("hostile", ["sparse", "fifo"])
def test_a_schema_copy_that_is_a_sparse_terabyte_or_a_fifo_is_replaced_unread(project, hostile):
    """The copy lies in orders_dir, where a worker can write: a sparse terabyte there was read whole to compare it
    with this aipm's (a MemoryError traceback from `add`), and a FIFO held `add` for ever."""
    project.order()
    copy = project.root / "orders" / "task.schema.json"
    if hostile == "sparse":
        copy.touch()
        os.truncate(copy, 2**40)
    else:
        os.mkfifo(copy)
    project.aipm("add", "ORD", "A", "--command", "true", check=True, timeout=30, preexec_fn=capped_memory)
    assert copy.read_text() == schema_text("task")


# ---- new / add -------------------------------------------------------------------------------------------


def test_add_keeps_a_command_and_prompt_holding_other_line_breaks_as_given(project):
    """PyYAML writes U+0085, U+2028 and U+2029 raw into a scalar, and YAML reads them as line breaks: `add
    --command $'printf %s "a\\u0085b" > out'` wrote a command that printed `a b`, and a prompt lost its
    characters the same way. Now such a string is written double-quoted, with escapes."""
    command, prompt = 'printf "%s" "a\u0085b" > out.txt', "p\u2029q\nr\u0085s \u2028"
    project.aipm("new", "ORD", check=True)
    project.aipm("add", "ORD", "A", "--command", command, "--prompt", prompt, check=True)
    task = load_order(project.root / "orders" / "ORD", project.root).tasks["A"]
    assert (task.command, task.prompt) == (command, prompt)
    assert project.aipm("exec", "A").returncode == 0
    assert (project.root / "out.txt").read_text(encoding="utf-8") == "a\u0085b"


def test_new_and_add_round_trip_and_validate(project):
    project.aipm("new", "SHIP", "--title", "Ship it", check=True)
    project.aipm("add", "SHIP", "A", "--title", 'Build "core"', "--target-file", "src/", "--target-file",
                 "docs/*.md", "--command", "make core && echo ok", "--priority", "P0", "--review", "true",
                 check=True)
    project.aipm("add", "SHIP", "B", "--depends-on", "A", "--prompt", "Write docs.\nKeep it short.",
                 "--model", "opus", check=True)
    project.aipm("add", "SHIP", "C", "--depends-on", "A", "--depends-on", "B", check=True)
    assert project.aipm("validate", check=True).returncode == 0
    order_dir = project.root / "orders" / "SHIP"
    order = load_order(order_dir, project.root)
    assert (order.id, order.title) == ("SHIP", "Ship it")
    a, b, c = order.tasks["A"], order.tasks["B"], order.tasks["C"]
    assert (a.title, a.priority, a.target_files, a.command, a.review) == (
        'Build "core"', Priority.P0, ("src/", "docs/*.md"), "make core && echo ok", "true")
    assert (b.depends_on, b.prompt, b.model, b.status) == (("A",), "Write docs.\nKeep it short.", "opus",
                                                           Status.QUEUED)
    assert c.depends_on == ("A", "B")
    # The managed block is last, so a title edit and a status write never touch neighbouring lines.
    assert (order_dir / "A.yaml").read_text().splitlines()[-1] == "status: QUEUED"
    for path in [order_dir / ORDER_FILE, *task_files(order_dir)]:
        first = path.read_text().splitlines()[0]
        m = re.fullmatch(r"# yaml-language-server: \$schema=(\S+)", first)
        assert m, first
        kind = "order" if path.name == ORDER_FILE else "task"
        # The same relative line on every machine: a copy beside the order directories, never the venv's path.
        assert m.group(1) == f"../{kind}.schema.json"
        assert (path.parent / m.group(1)).read_text() == schema_text(kind)
        assert str(project.root) not in path.read_text() and "site-packages" not in path.read_text()
        assert check(as_json_data(path), order_schema() if kind == "order" else task_schema()) == []


def test_add_writes_an_agent_task_with_its_budget_workspace_confinement_and_needs(project):
    """Every field of an agent task could be given only by editing the file `add` wrote."""
    project.aipm("new", "ORD", check=True)
    project.aipm("add", "ORD", "A", "--prompt", "fix it", "--agent", "claude", "--target-file", "src/a.py",
                 "--max-cost-usd", "0.5", "--workspace", "worktree", "--confine", "--cpus", "2", "--memory-mb",
                 "4096", "--gpus", "0.5", check=True)
    project.aipm("add", "ORD", "B", "--command", "true", "--no-confine", check=True)
    order = load_order(project.root / "orders" / "ORD", project.root)
    a, b = order.tasks["A"], order.tasks["B"]
    assert (a.agent, a.max_cost_usd, a.workspace, a.confine) == ("claude", 0.5, "worktree", True)
    assert (a.resources.cpus, a.resources.memory_mb, a.resources.gpus) == (2, 4096, 0.5)
    assert "\n  cpus: 2\n" in (project.root / "orders" / "ORD" / "A.yaml").read_text()
    assert (b.confine, b.agent, b.resources) == (False, None, None)


def test_refusals_change_nothing(project):
    project.aipm("new", "ORD", check=True)
    project.aipm("add", "ORD", "A", "--title", "a", check=True)
    (project.root / "orders" / "ORD" / "Z.yaml").write_text("depends_on: [A]\n")
    before = snapshot(project.root), sorted(p for p in project.root.rglob("*") if p.is_dir())
    refusals = {
        ("add", "ORD", "A"): "already exists",
        ("add", "ORD", "B", "--priority", "P9"): "--priority",
        ("add", "ORD", "B", "--priority", "P5"): "--priority",
        ("add", "ORD", "B", "--depends-on", "A", "--depends-on", "NOPE"): "'NOPE' is not a task of order ORD",
        ("add", "ORD", "B", "--depends-on", "B"): "cannot depend on itself",
        ("add", "ORD", "B", "--target-file", "../outside.py"): "target_files",
        ("add", "ORD", "B", "--prompt", "x", "--agent", "gpt"): "B.yaml: agent: 'gpt' is not one of",
        ("add", "ORD", "B", "--command", "true", "--agent", "codex"): "B.yaml: agent:",
        ("add", "ORD", "B", "--max-cost-usd", "-1"): "B.yaml: max_cost_usd:",
        ("add", "ORD", "B", "--workspace", "elsewhere"): "B.yaml: workspace: 'elsewhere' is not one of",
        ("add", "ORD", "B", "--cpus", "-1"): "B.yaml: resources.cpus:",
        ("add", "ORD", "B", "--gpus", "1.5"): "resources.gpus: must be a whole number when above 1",  # not 1, 2
        ("add", "ORD", "É"): "'É' is not a usable id; use ASCII letters (A-Z, a-z), digits",  # É is a letter too
        ("add", "ORD", "order"): "reserved",
        ("add", "ORD", "B.yaml"): "'B.yaml' is a file name; give the task's id, 'B'",  # it made B.yaml.yaml
        ("add", "ORD", "../B"): "not a usable id",
        ("add", "MISSING", "B"): "order 'MISSING'",
        ("new", "ORD"): "already exists",
        ("new", "a/b"): "not a usable id",
        ("new", "ord.yaml"): "'ord.yaml' is a file name; an order is a directory: give its id, 'ord'",
    }
    for args, message in refusals.items():
        proc = project.aipm(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("aipm: error: ") and proc.stderr.count("\n") == 1, proc.stderr
        assert message in proc.stderr, (args, proc.stderr)
        after = snapshot(project.root), sorted(p for p in project.root.rglob("*") if p.is_dir())
        assert after == before, f"{args} changed the tree"


def test_add_takes_a_priority_in_lower_case(project):
    """`aipm add ORD A --priority p1` was refused ("'p1' is not one of P0, P1, P2, P3") though it can mean one
    priority only; it is written as P1, the file's spelling."""
    project.aipm("new", "ORD", check=True)
    proc = project.aipm("add", "ORD", "A", "--command", "true", "--priority", "p0")
    assert proc.returncode == 0, proc.stderr
    assert load_order(project.root / "orders" / "ORD", project.root).tasks["A"].priority == Priority.P0
    assert "\npriority: P0\n" in (project.root / "orders" / "ORD" / "A.yaml").read_text()
    assert project.aipm("add", "ORD", "B", "--priority", "P9").returncode == 2


def test_add_refuses_to_join_a_broken_order(project):
    order_dir = project.order("BROKEN")
    (order_dir / "A.yaml").write_text("status: SIDEWAYS\n")
    before = snapshot(project.root)
    proc = project.aipm("add", "BROKEN", "B")
    assert proc.returncode == 2 and "A.yaml: status" in proc.stderr
    assert snapshot(project.root) == before
