"""The tables and lists of docs/reference.md (and README's and workers.md's) against the code they describe: a
setting, task key, status, transition, reason code, `run --json` event kind, notify event, command, flag, worker
variable or placeholder added, renamed or dropped in the code fails here until the docs say so too."""

import re
from pathlib import Path

import pytest
import yaml

from aipm import fields, notify, plan, settings
from aipm.cli.display import LINES
from aipm.model import TRANSITIONS, Status
from aipm.store import ORDER_KEYS

DOCS = Path(__file__).resolve().parents[1] / "docs"
REFERENCE = (DOCS / "reference.md").read_text()


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same or a higher level (a `#` line in a
    fenced block is no heading)."""
    level = heading.split(" ", 1)[0]
    lines, inside, fenced = [], False, False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        if not fenced and re.match(r"#+ ", line) and inside and len(line.split(" ", 1)[0]) <= len(level):
            break
        if inside:
            lines.append(line)
        inside = inside or line == heading
    assert inside, f"no section {heading!r}"
    return "\n".join(lines)


def table(text: str) -> list[list[str]]:
    """The body rows of the first markdown table in `text`, as cells (`\\|` is a pipe inside a cell). A blank line
    ends a table, as it does on GitHub: rows after one render as a paragraph of pipes, so they are not counted."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("|"):
            if rows:
                break
        elif not re.fullmatch(r"[|\-\s]+", line):
            rows.append([cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows[1:]  # the header row


def codes(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


SETTINGS = table(section(REFERENCE, "## Settings"))


def test_the_settings_table_lists_every_setting_once():
    keys = [codes(row[0])[0] for row in SETTINGS]
    assert sorted(keys) == sorted(settings._KEYS)


@pytest.mark.parametrize("row", SETTINGS, ids=[codes(row[0])[0] for row in SETTINGS])
def test_a_settings_default_environment_variable_and_flag_are_the_codes(row):
    key, default, env, flag = codes(row[0])[0], row[1], codes(row[2]), row[3]
    name = key.replace(".", "_")
    value = getattr(settings.Settings(), name)
    said = None if default == "none" else yaml.safe_load(default.strip("`"))
    assert said == (list(value) if isinstance(value, tuple) else value), f"{key}: reference says {default}"
    assert env == [var for var, field in settings.ENV_VARS.items() if field == name]
    # preempt has a flag (run's) but no environment variable, and ENV_VARS is made from FLAG_NAMES: not there.
    expected = settings.FLAG_NAMES.get(name) or {"preempt": "--preempt"}.get(name)
    assert (codes(flag)[0].split()[0] if flag else None) == expected


def test_the_task_key_table_and_the_managed_fields_are_every_task_key():
    keys = section(REFERENCE, "## Task file keys")
    listed = [codes(row[0])[0] for row in table(keys)]
    managed = {name for name, _, _ in fields._MANAGED}
    written = re.search(r"aipm writes back (.*?)the managed fields", keys, re.S).group(1)
    said = {name for name in codes(written) if name in fields.TASK_KEYS}
    assert said == managed
    assert sorted(set(listed) | managed) == sorted(fields.TASK_KEYS) and len(listed) == len(set(listed))
    assert set(listed) & managed == {"status"}  # the one managed key a person may write (and whose default to say)
    order_keys = re.search(r"`order.yaml` keys: (.*?)\(", keys, re.S).group(1)
    assert set(codes(order_keys)) == set(ORDER_KEYS)


def test_the_status_table_and_the_transitions_are_the_models():
    statuses = section(REFERENCE, "## Statuses")
    first, second = statuses.split("Transitions aipm allows")
    assert [codes(row[0])[0] for row in table(first)] == [s.value for s in Status]
    said = {}
    for row in table(second):
        for source in codes(row[0]):
            said[source] = {to for to in codes(row[1]) if to in Status.__members__}
    assert said == {s.value: {t.value for t in TRANSITIONS[s]} for s in Status}


def test_the_reason_codes_are_the_planners():
    detection = section(REFERENCE, "## Detection")
    listed = detection.split("the reason codes in `--json` are")[1].split("They count")[0]
    while "(" in listed:  # what a code's explanation names in passing (`pids`, `launch`) is no code
        listed = re.sub(r"\([^()]*\)", "", listed)
    listed = codes(listed)
    reasons = {value for name, value in vars(plan).items() if name.isupper() and isinstance(value, str)}
    assert {code for code in listed if re.fullmatch(r"[a-z_]+", code)} == reasons


def test_the_event_kinds_of_run_json_are_the_ones_run_prints():
    prints = section(REFERENCE, "## What `run` prints")
    kinds = prints.split("the kinds are")[1].split("and closes")[0]
    listed = set(re.findall(r"`([a-z_]+)`(?:\s|,|\)|$)", kinds)) & (set(LINES) | {"blocked"})
    assert listed == set(LINES) - {"summary"} | {"blocked"}


def test_the_notify_events_of_workers_md_are_the_ones_sent():
    notifications = section((DOCS / "workers.md").read_text(), "## Notifications")
    events = [codes(row[0])[0] for row in table(notifications)]
    sent = {notify.FAILED, notify.REJECTED, notify.BUDGET, notify.ORDER_FINISHED, notify.NEEDS_PERSON,
            Status.INTERRUPTED.value.lower()}  # a task's end is sent as its status, lower case (recording)
    assert sorted(events) == sorted(sent)


def test_every_command_and_every_flag_is_in_the_reference():
    """A command missing from the commands table, or a flag (its long name) that reference.md never names."""
    import inspect

    from aipm.cli import _load_commands, decl

    _load_commands()
    readme = (DOCS.parent / "README.md").read_text()
    tables = {doc: {word for row in table(section(text, "## Commands")) for cell in codes(row[0])
                    for word in re.findall(r"aipm (\w+)", cell)} for doc, text in (("reference.md", REFERENCE),
                                                                                   ("README.md", readme))}
    for given, function in decl.COMMANDS:
        name = given or function.__name__
        assert [doc for doc, named in tables.items() if name not in named] == [], f"aipm {name} is not in its table"
        flags = [flag for param in inspect.signature(function).parameters.values()
                 if getattr(param.default, "kind", None) == "option" for flag in param.default.decls
                 if flag.startswith("--")]
        said = [flag for flag in flags if re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", REFERENCE)]
        assert said == flags, f"aipm {name}: reference.md does not name {sorted(set(flags) - set(said))}"


def test_the_worker_environment_and_placeholders_of_workers_md_are_the_workers():
    import inspect

    from aipm import worker
    from aipm.settingvalues import PLACEHOLDERS

    text = (DOCS / "workers.md").read_text()
    listed = [codes(row[0])[0] for row in table(section(text, "## Environment"))]
    assert sorted(listed) == sorted(set(re.findall(r"\b(AIPM_[A-Z_]+)\b", inspect.getsource(worker.environment))))
    placeholders = {name for row in table(section(text, "## Template placeholders")) for name in codes(row[0])}
    assert placeholders == {f"{{{name}}}" for name in PLACEHOLDERS}
