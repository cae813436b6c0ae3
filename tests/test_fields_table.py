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
