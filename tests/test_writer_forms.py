"""The one writer never breaks a task file that `validate` accepted (issue 11, item 2).

Rule: a write produces a file that parses to exactly the old mapping plus the intended changes; every comment
survives; CRLF stays CRLF; a BOM stays. Forms the writer cannot handle are refused when the file is loaded.
"""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aipm.errors import ValidationError
from aipm.model import MANAGED_FIELDS, Status
from aipm.fields import task_from_mapping
from aipm.store import load_task, load_yaml, parse_mapping
from aipm.rewriting import rewrite
from aipm.writer import update_task

START = {"status": Status.IN_PROGRESS, "attempts": 1, "started_at": "2026-12-01T10:00:00+00:00",
         "finished_at": None, "exit_code": None}
FINISH = {"status": Status.DONE, "exit_code": 0, "finished_at": "2026-12-01T10:05:00+00:00", "reworks": 2}

FORMS = {
    "double_quoted_key": '"status": QUEUED\ncommand: "true"\n',
    "single_quoted_key": "'status': QUEUED\n'attempts': 0\ncommand: x\n",
    "bom": "\ufeffstatus: QUEUED\ncommand: x\n",
    "bom_first_key_managed_missing": "\ufeffcommand: x\n",
    "flow_mapping": '{command: "true", status: QUEUED}',
    "flow_mapping_multiline": '{command: "true",  # run it\n status: QUEUED,\n}\n',
    "flow_mapping_empty": "{}\n",
    "document_markers": "---\ncommand: x\nstatus: QUEUED\n...\n",
    "document_end_marker_missing_keys": "--- # start\ncommand: x\n...\n# after the end\n",
    "crlf": "command: x\r\nstatus: QUEUED\r\ntitle: t\r\n",
    "crlf_missing_keys": "command: x\r\ntitle: t\r\n",
    "comment_after_value": "status: QUEUED # keep me\nattempts: 0  # me too\ncommand: x\n",
    "block_scalar_before": "prompt: |\n  status: DONE\n  attempts: 9\nstatus: QUEUED\ncommand: x\n",
    "block_scalar_last": "status: QUEUED\ncommand: >\n  echo a\n  echo b\n",
    "block_scalar_keep_last": "status: QUEUED\nprompt: |+\n  text\n\n",
    "block_scalar_last_no_newline": "status: QUEUED\nprompt: |\n  text",
    "block_scalar_managed": "started_at: |\n  2026-01-01\nstatus: QUEUED\ncommand: x\n",
    "spaced_colon": "status : QUEUED\ncommand : x\n",
    "tabs": "status:\tQUEUED\t# tab\ncommand:\tx\n",
    "nested_lookalike_quoted": 'title: "a\nstatus: DONE"\nstatus: QUEUED\ncommand: x\n',
    "nested_lookalike_prompt": "prompt: |\n  status: DONE\nstatus: QUEUED\n",
    "anchor_elsewhere": "title: &t hello\nprompt: *t\nstatus: QUEUED\n",
    "explicit_tags": "status: !!str QUEUED\nattempts: !!int 0\nexit_code: !!null\ncommand: x\n",
    "no_trailing_newline": "command: x\nstatus: QUEUED",
    "no_trailing_newline_comment": "command: x\nstatus: QUEUED # c",
    "empty_values": "status:\nexit_code:\ncommand: x\n",
    "empty_value_last": "command: x\nstatus:",
    "indented_mapping": "  command: x\n  status: QUEUED\n",
    "explicit_key": "? status\n: QUEUED\ncommand: x\n",
    "multiline_plain_value": "title: one\n  two\nstatus: QUEUED\n",
    "timestamp_plain": "started_at: 2026-01-01 10:00:00\nstatus: QUEUED\n",
    "unicode": "title: héllo 😀\nstatus: QUEUED # ☃\n",
    "classic_mac_cr": "command: x\rstatus: QUEUED\r",
}


def _expect(old: dict, updates: dict) -> dict:
    return {**old, **{k: (v.value if isinstance(v, Status) else v) for k, v in updates.items()}}


def _comments(text: str) -> list[str]:
    return re.findall(r"# [^\r\n]*", text)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_every_form_is_written_to_exactly_the_intended_data(tmp_path, name):
    text = FORMS[name]
    path = tmp_path / "T.yaml"
    path.write_bytes(text.encode())
    before = load_yaml(text)
    load_task(path)  # validate accepts it
    update_task(path, START, expect=Status.QUEUED)
    written = update_task(path, FINISH | {"cost_usd": 0.25, "tokens": {"input": 3}, "reason": "ok"},
                          expect=Status.IN_PROGRESS)
    new = path.read_bytes().decode()
    assert load_yaml(new) == _expect(_expect(before, START), FINISH | {"cost_usd": 0.25, "tokens": {"input": 3},
                                                                        "reason": "ok"}), new
    # The Task the writer returns (the old one with the managed fields replaced) is what a fresh load builds.
    assert written == task_from_mapping(path, load_yaml(new), None) == load_task(path)
    assert load_task(path).status == Status.DONE
    assert _comments(new) == _comments(text), new
    assert new.startswith("\ufeff") == text.startswith("\ufeff")
    if "\r\n" in text:
        assert "\n" not in new.replace("\r\n", ""), repr(new)
    elif "\r" in text:
        assert "\n" not in new, repr(new)


def test_missing_managed_keys_join_the_block_at_the_end(tmp_path):
    """New keys follow the last entry: not after `title:`, and never after a `...` end marker."""
    path = tmp_path / "T.yaml"
    path.write_text("id: T\ntitle: x\ncommand: y\nstatus: QUEUED\n...\n")
    update_task(path, START)
    assert path.read_text() == (
        "id: T\ntitle: x\ncommand: y\nstatus: IN_PROGRESS\nattempts: 1\nstarted_at: '2026-12-01T10:00:00+00:00'\n"
        "finished_at: null\nexit_code: null\n...\n"
    )


@pytest.mark.parametrize("text, field", [
    ("status: &s QUEUED\ntitle: *s\n", "status"),
    ("title: &t QUEUED\nstatus: *t\n", "status"),
    ("status: !!str &s QUEUED\n", "status"),
    ("attempts: &n 1\nstatus: QUEUED\n", "attempts"),
])
def test_forms_the_writer_cannot_change_alone_are_refused_at_validation(tmp_path, text, field):
    path = tmp_path / "T.yaml"
    path.write_text(text)
    with pytest.raises(ValidationError) as info:
        load_task(path)
    assert info.value.field == field


# ---- property: generated forms ---------------------------------------------------------------------------

STATUS_TEXT = st.sampled_from([s.value for s in Status])
EOLS = st.sampled_from(["\n", "\r\n"])


@st.composite
def key_text(draw, key: str) -> str:
    style = draw(st.sampled_from(["plain", "dq", "sq", "spaced", "tagged"]))
    return {"plain": f"{key}:", "dq": f'"{key}":', "sq": f"'{key}':", "spaced": f"{key} :",
            "tagged": f"!!str {key}:"}[style]


@st.composite
def managed_value(draw, key: str) -> str:
    if key == "status":
        value = draw(STATUS_TEXT)
        return draw(st.sampled_from([value, f'"{value}"', f"'{value}'", f"!!str {value}"]))
    if key in ("attempts", "reworks"):
        n = draw(st.integers(0, 99))
        return draw(st.sampled_from([str(n), f"!!int {n}", f'!!int "{n}"']))
    if key == "exit_code":
        return draw(st.sampled_from(["", "null", "~", "0", "-15", "137", "!!null"]))
    return draw(st.sampled_from(["", "null", "'2026-01-01T00:00:00+00:00'", '"2026-01-01"', "2026-01-01 10:00:00"]))


@st.composite
def task_file(draw) -> tuple[str, bool]:
    flow = draw(st.booleans())
    entries = []
    for key in draw(st.lists(st.sampled_from(MANAGED_FIELDS), unique=True)):
        entries.append(("managed", f"{draw(key_text(key))} {draw(managed_value(key))}"))
    entries.append(("user", 'command: "echo status: DONE"'))
    if draw(st.booleans()):
        entries.append(("user", "title: 'status: QUEUED'"))
    if draw(st.booleans()):
        entries.append(("user", "target_files: [a.py, 'docs/']"))
    if not flow and draw(st.booleans()):
        entries.append(("block", "prompt: |\n  status: DONE\n  attempts: 3\n"))
    if not flow and draw(st.booleans()):
        entries.append(("user", 'model: "two\n  lines"'))
    entries = draw(st.permutations(entries))
    eol = draw(EOLS)
    counter = iter(range(1000))
    if flow:
        body = "{" + ", ".join(text for _, text in entries) + "}"
        if draw(st.booleans()):
            body = "{" + "\n ".join(f"{text},  # c{next(counter)}" for _, text in entries) + "\n}"
    else:
        indent = draw(st.sampled_from(["", "  "]))
        lines = []
        for kind, text in entries:
            if draw(st.booleans()):
                lines.append(f"{indent}# c{next(counter)}")
            text = text.rstrip("\n").replace("\n", "\n" + indent)
            if kind != "block" and "\n" not in text and draw(st.booleans()):
                text += f"  # c{next(counter)}"
            lines.append(indent + text)
        if draw(st.booleans()):
            lines.append(f"# c{next(counter)}")
        body = "\n".join(lines)
    prefix = draw(st.sampled_from(["", "---\n", "--- # c\n", "%YAML 1.1\n---\n"]))
    suffix = draw(st.sampled_from(["", "\n", "\n...\n", "\n...\n# after\n"]))
    text = (prefix + body + suffix).replace("\n", eol)
    if draw(st.booleans()):
        text = "\ufeff" + text
    return text


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=task_file(), updates=st.dictionaries(
    st.sampled_from(MANAGED_FIELDS),
    st.one_of(st.none(), st.integers(0, 1000), st.sampled_from(list(Status)),
              st.sampled_from(["2026-12-01T10:00:00+01:00", "it's", "é ☃ 😀"])),
))
def test_generated_forms_parse_to_old_data_plus_updates(tmp_path_factory, text, updates):
    path = tmp_path_factory.mktemp("gen") / "T.yaml"
    try:
        old = parse_mapping(path, text)
        task_from_mapping(path, old, None)
    except ValidationError:
        return  # not a file validate accepts (e.g. a timestamp that is not one): nothing to promise
    new = rewrite(text, updates, old)
    assert load_yaml(new) == _expect(old, updates)
    assert _comments(new) == _comments(text)
    assert new.startswith("\ufeff") == text.startswith("\ufeff")
    if "\r\n" in text:
        assert "\n" not in new.replace("\r\n", "")


def test_keys_inside_nested_mappings_are_not_the_managed_ones():
    """Only the top-level mapping holds managed fields: `env: {status: x}` or an indented `status:` stay put."""
    text = "env: {status: x}\nnested:\n  status: y\n  attempts: 3\ncommand: z\n"
    new = rewrite(text, {"status": Status.IN_PROGRESS, "attempts": 1})
    assert new == text + "status: IN_PROGRESS\nattempts: 1\n"


@pytest.mark.parametrize("reason", ["\x1b[31mFAIL\x1b[0m", "a\x00b", "two\nlines", "next\x85line\u2028", "\x7f"])
def test_a_value_yaml_cannot_hold_as_it_is_is_written_escaped_and_reads_back(tmp_path, reason):
    """A control character in a written value (a reviewer's first line in colour, a NUL) made the edited file
    unparsable, so the write was refused and the outcome never recorded."""
    path = tmp_path / "T.yaml"
    path.write_text("# mine\nid: T\nstatus: QUEUED  # kept\ncommand: x\n")
    update_task(path, {"reason": reason})
    assert load_task(path).reason == reason
    assert path.read_text().startswith("# mine\nid: T\nstatus: QUEUED  # kept\ncommand: x\n")


def test_now_is_the_second_it_is_asked_in_as_the_files_say_it(monkeypatch):
    """now() is made once a second (each astimezone() looks at the time zone again): within a second the same text,
    the next second the next one, each what datetime says of that second, local offset included."""
    import datetime as dt
    import time

    from aipm import writer

    clock = [1_800_000_000.2]
    monkeypatch.setattr(time, "time", lambda: clock[0])
    first = writer.now()
    clock[0] = 1_800_000_000.9
    assert writer.now() == first == dt.datetime.fromtimestamp(1_800_000_000, dt.timezone.utc).astimezone().isoformat(
        timespec="seconds")
    clock[0] = 1_800_000_001.0
    assert writer.now() == dt.datetime.fromtimestamp(1_800_000_001, dt.timezone.utc).astimezone().isoformat(
        timespec="seconds") != first
