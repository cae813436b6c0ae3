"""task_from_mapping validates only the keys a file holds: every other field keeps Task's default, so that default
must be what the key's validator gives when the key is absent (or null). Checked for every key, so a new key whose
validator defaults differently from Task fails here instead of loading differently by whether it is written."""

import pytest

from aipm import fields
from aipm.errors import ValidationError
from aipm.model import Task

BARE = Task(id="T1", path="orders/o/T1.yaml")


@pytest.mark.parametrize("row", fields._FIELDS, ids=[row[0] for row in fields._FIELDS])
def test_an_absent_or_null_key_gives_tasks_default(row):
    key, check, extra = row
    assert check("orders/o/T1.yaml", {}, key, *extra) == getattr(BARE, key)
    assert check("orders/o/T1.yaml", {key: None}, key, *extra) == getattr(BARE, key)


def test_every_key_but_id_and_targets_has_a_validator():
    assert {row[0] for row in fields._FIELDS} == set(fields.TASK_KEYS) - {"id", "target_files"}


def test_a_file_of_one_key_builds_the_bare_task():
    assert fields.task_from_mapping("orders/o/T1.yaml", {"id": "T1"}, None) == BARE


def test_present_keys_are_validated_in_the_tables_order():
    # Two wrong keys: the one earlier in the table is reported, whatever the file's order.
    with pytest.raises(ValidationError) as caught:
        fields.task_from_mapping("orders/o/T1.yaml", {"status": "NOPE", "timeout": -1}, None)
    assert caught.value.field == "timeout"


def test_managed_values_sets_every_managed_field_even_when_absent():
    values = fields.managed_values("orders/o/T1.yaml", {"status": "DONE"})
    assert values["status"].value == "DONE" and values["exit_code"] is None and values["attempts"] == 0
    assert set(values) == {row[0] for row in fields._MANAGED}


def test_evolve_is_dataclasses_replace_for_every_field_and_refuses_a_name_that_is_none():
    """model.evolve stands in for dataclasses.replace on every status write."""
    import dataclasses

    from aipm.model import Status, evolve

    changes = {"status": Status.DONE, "attempts": 3, "cost_usd": 1.5, "reason": "why"}
    assert evolve(BARE, changes) == dataclasses.replace(BARE, **changes)
    assert evolve(BARE, {}) == BARE and evolve(BARE, {}) is not BARE
    with pytest.raises(TypeError, match="stauts"):
        evolve(BARE, {"stauts": Status.DONE})  # a misspelt field is no silent no-op


def test_new_task_builds_the_task_that_task_builds_and_it_stays_frozen():
    """model.new_task (the loader's fast Task) goes through a twin class: every field, by position or by name,
    with defaults, lands where Task puts it, and what comes out is a frozen, hashable Task."""
    import dataclasses

    from aipm.model import Priority, Resources, Status, new_task

    names = [f.name for f in dataclasses.fields(Task)]
    values = [f"v{i}" for i in range(len(names))]  # a distinct value in each slot: a shifted field shows
    assert dataclasses.astuple(new_task(*values)) == dataclasses.astuple(Task(*values)) == tuple(values)
    given = {"id": "T2", "path": "p", "status": Status.DONE, "priority": Priority.P0, "resources": Resources(cpus=1.0)}
    made = new_task(**given)
    assert type(made) is Task and made == Task(**given) and hash(made) == hash(Task(**given))
    assert repr(made) == repr(Task(**given))
    assert new_task(id="T1", path="orders/o/T1.yaml") == BARE
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.status = Status.QUEUED
    with pytest.raises(TypeError):
        new_task(id="T1")  # path has no default, as in Task
