"""Issue 17 (B3): the flat form of a task file read without libyaml. Whatever it accepts, it reads exactly as
libyaml does; everything else it leaves to libyaml."""

import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from aipm import flatyaml
from aipm.store import load_yaml, parse_mapping
from conftest import race_threads


def agrees(text: str):
    """flatyaml's reading of `text` (None: left to libyaml), after checking it equals libyaml's."""
    flat = flatyaml.mapping(text)
    if flat is not None:
        slow = load_yaml(text)
        assert flat == slow and [type(v) for v in flat.values()] == [type(v) for v in slow.values()], text
        for mine, theirs in zip(flat.values(), slow.values()):
            if isinstance(mine, list):
                assert [type(v) for v in mine] == [type(v) for v in theirs], text
    return flat


def test_the_forms_aipm_and_people_write_are_read_without_libyaml():
    text = ("# yaml-language-server: $schema=../task.schema.json\nid: T050000\npriority: P1\ndepends_on: []\n"
            'target_files: ["src/pkg32/mod48144.py", "docs/"]\ncommand: make x\nstatus: QUEUED\n'
            "started_at: '2026-12-01T10:00:00+00:00'\nattempts: 2\nexit_code: -1\ncost_usd: 0.125\nconfine: true\n"
            "depends_on_x: [T1, T2, 'a b']\n\nreason: null\nx: 1e3\ny: -x\n")
    assert agrees(text) == {
        "id": "T050000", "priority": "P1", "depends_on": [], "target_files": ["src/pkg32/mod48144.py", "docs/"],
        "command": "make x", "status": "QUEUED", "started_at": "2026-12-01T10:00:00+00:00", "attempts": 2,
        "exit_code": -1, "cost_usd": 0.125, "confine": True, "depends_on_x": ["T1", "T2", "a b"], "reason": None,
        "x": "1e3", "y": "-x"}  # YAML 1.1 reads `1e3` as text


@pytest.mark.parametrize("text", [
    "id: A\nid: B\n",  # a key twice: libyaml's path names it
    "timeout: 007\n", "timeout: 0x10\n", "timeout: 1_000\n", "timeout: 1:20\n", "cost_usd: 1.5e+3\n",
    "started_at: 2026-12-01\n", "cost_usd: .inf\n", "title: =\n", "<<: x\n",  # typed by YAML 1.1, not plain text
    "yes: 1\n", "on: x\n", "null: x\n",  # keys that are not strings
    "command: a # comment\n", "command: a:b\n", "command: a: b\n", "command:  a\n", "command: a \n", "command:\n",
    'command: "a\\tb"\n', "title: 'it''s'\n", "command: |\n  x\n", "a: [x,y]\n", "a: [x, [y]]\n", "a: [ x ]\n",
    "a: [x, ]\n", "a: {b: 1}\n", "a: &x b\nc: *x\n", "a: !!str 1\n", "a: b\n  c\n", "---\na: b\n", "a: b\n...\n",
    "title: Über\n", "# caf\u00e9\u2028status: DONE\nid: A\n", "#\rstatus: DONE\nid: A\n", "a: b\r\n",
    "\ufeffa: b\n", "a:\tb\n", "# only a comment\n", "", "a: - x\n", "a: -\n",
])
def test_anything_else_is_left_to_libyaml(text):
    assert flatyaml.mapping(text) is None


def test_a_bad_file_read_either_way_is_the_same_error():
    from aipm.errors import ValidationError

    with pytest.raises(ValidationError, match="T.yaml: id: appears twice"):
        parse_mapping("T.yaml", "id: A\nid: B\n")


# Pieces of lines, many of them near misses, put together at random.
keys = st.sampled_from(["id", "title", "status", "on", "yes", "no", "null", "y", "a_1", "Key", "t", "command"])
plain = st.sampled_from(["T1", "true", "True", "TRUE", "yes", "no", "off", "On", "y", "n", "null", "Null", "~", "0",
                         "-0", "12", "007", "0o7", "0x1f", "1_0", "+3", "-3", "1.5", "-1.5", "1.", ".5", "1e3",
                         "1.0e+3", ".inf", ".NaN", "2026-12-01", "1:20", "=", "<<", "make x", "a  b", "a=b", "a+b",
                         "./run.sh", "src/a.py", "docs/", "-x", "_", "P1", "QUEUED", "a/**/b*.py", "x.y.z", "1abc",
                         "a#b", "a #b", "a:b", "a: b", "a,b", "[x]", "{x}", "&a", "*a", "!a", "|", ">", "%", "@a",
                         "`a", "a ", " a", "\ta", "a\r", "Über", "-", "?", ":", ""])
quoted = st.one_of(
    st.text(alphabet=st.sampled_from(list("ab #:,[]{}*&'\\\"\t/.-")), max_size=6).map(lambda s: f'"{s}"'),
    st.text(alphabet=st.sampled_from(list("ab #:,[]{}*&'\\\"\t/.-")), max_size=6).map(lambda s: f"'{s}'"),
)
scalar = st.one_of(plain, quoted)
value = st.one_of(scalar, st.lists(scalar, max_size=3).map(lambda items: "[" + ", ".join(items) + "]"),
                  st.lists(scalar, max_size=3).map(lambda items: "[" + ",".join(items) + "]"))
line = st.one_of(st.tuples(keys, st.sampled_from([": ", ":  ", ":", ": "]), value).map("".join),
                 st.sampled_from(["", "# c", "#: x", "  x: y", "- a", "---", "...", "  - a", "# \u2028id: Z"]))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, min_size=1, max_size=5), st.booleans())
def test_whatever_it_reads_libyaml_reads_the_same(lines, final_newline):
    text = "\n".join(lines) + ("\n" if final_newline else "")
    try:
        slow = load_yaml(text)
    except Exception:  # libyaml refuses it (or it is no plain data): the flat form must not take it
        assert flatyaml.mapping(text) is None, text
        return
    flat = agrees(text)
    if flat is not None:
        assert isinstance(slow, dict)


# The same with lines of the flat shape and values it may take, so that most documents are taken (and compared).
good_plain = plain.filter(lambda p: flatyaml._PLAIN.fullmatch(p) is not None)
good_quoted = st.one_of(*(st.text(alphabet=st.sampled_from(list("ab #:,[]{}*&/.-" + other)), max_size=6).map(
    lambda s, q=quote: f"{q}{s}{q}") for quote, other in (('"', "'"), ("'", '"'))))
good_value = st.one_of(good_plain, good_quoted, st.lists(st.one_of(
    good_plain.filter(lambda p: flatyaml._ITEM.fullmatch(p) is not None), good_quoted), max_size=3).map(
    lambda items: "[" + ", ".join(items) + "]"))


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, good_value, min_size=1, max_size=4))
def test_lines_of_the_flat_shape_are_read_as_libyaml_reads_them(lines):
    text = "".join(f"{key}: {value}\n" for key, value in lines.items())
    agrees(text)


# The writer's edits of a flat file (patch._flat) are the edits libyaml's positions give, byte for byte.
managed = st.sampled_from(["status", "attempts", "started_at", "exit_code", "reason", "finished_at"])
rendered = st.sampled_from(["DONE", "1", "null", "'2026-12-02T12:00:00+00:00'", "{input: 3}", "'it''s'", "-1"])


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(line, min_size=1, max_size=5), st.booleans(), st.dictionaries(managed, rendered, min_size=1))
def test_a_flat_files_edits_are_libyamls_edits(lines, final_newline, updates):
    from aipm import patch

    text = "\n".join(lines) + ("\n" if final_newline else "")
    fast = patch._flat(text, updates)
    if fast is None:
        return
    patch_flat, patch._flat = patch._flat, lambda text, rendered: None
    try:
        slow = patch.patch(text, updates)
    finally:
        patch._flat = patch_flat
    assert fast == slow, text


def test_the_files_aipm_writes_take_the_flat_edit():
    """The property above is not vacuous: the form aipm writes is flat, and so edited without libyaml."""
    from aipm import patch

    text = 'id: T1\ncommand: "make x"\ndepends_on: [T0]\ntarget_files: [out/1]\nstatus: IN_PROGRESS\nattempts: 1\n'
    edited = patch._flat(text, {"status": "DONE", "reason": "'ok'"})
    assert edited == text.replace("IN_PROGRESS", "DONE") + "reason: 'ok'\n"


def test_a_text_read_again_gives_the_same_mapping_and_a_caller_changing_its_own_changes_no_other():
    # The last texts read are kept (a status write reads its text twice); what one caller does with its mapping
    # must not reach the next caller of the same text, nor a text read since.
    text = "id: T1\ncommand: make a\nstatus: QUEUED\nattempts: 1\n"
    first = flatyaml.mapping(text)
    first["status"] = "DONE"
    other = flatyaml.mapping("id: T2\ncommand: make b\n")
    again = flatyaml.mapping(text)
    assert again == {"id": "T1", "command": "make a", "status": "QUEUED", "attempts": 1}
    again.pop("attempts")
    assert flatyaml.mapping(text)["attempts"] == 1
    assert other == {"id": "T2", "command": "make b"} and flatyaml.mapping("id: T2\ncommand: make b\n") == other
    # Nor through a list inside it.
    listed = "id: T3\ncommand: make c\ndepends_on: [T1]\ntarget_files: []\n"
    mine = flatyaml.mapping(listed)
    mine["depends_on"].append("T2")
    mine["target_files"].append("x")
    assert flatyaml.mapping(listed) == {"id": "T3", "command": "make c", "depends_on": ["T1"], "target_files": []}


def test_threads_reading_task_files_at_once_all_get_their_mappings():
    # `aipm ui` reads orders in its request threads (and cancel/retry write statuses in theirs): when the kept
    # texts were full, two threads dropping the oldest at once raised KeyError or "dictionary changed size during
    # iteration" out of a task file's read. A tiny switch interval makes threads meet there at once.
    errors, threads = [], 4
    start = threading.Barrier(threads)

    def read(n: int) -> None:
        start.wait()
        try:
            for i in range(20000):
                assert flatyaml.mapping(f"id: T{n}_{i}\n") == {"id": f"T{n}_{i}"}
        except Exception as exc:  # noqa: BLE001 - the test's finding, said below
            errors.append(repr(exc))

    race_threads([threading.Thread(target=read, args=(n,)) for n in range(threads)])
    assert errors == []
