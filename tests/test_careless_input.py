"""Every command as a careless user types it: names too long, paths written the Windows way, a dependency given
twice. Each is one line naming the argument or the file and field, exit 2, and not one byte changed on disk."""

import pytest

from conftest import write_task
from test_hostile_input import full_snapshot
from test_validation import assert_one_line_error


@pytest.mark.parametrize("args", [("cancel", "NOPE"), ("cancel", "ORD/NOPE"), ("cancel", "NOPE/A"), ("retry", "NOPE"),
                                  ("exec", "NOPE"), ("recover", "NOPE"), ("launch", "NOPE"), ("run", "NOPE")],
                         ids=" ".join)
def test_a_mistyped_task_or_order_of_a_write_command_creates_nothing(project, args):
    """`aipm cancel NOPE` said the task was not found, and had made .aipm/ (and the state directory) first."""
    write_task(project.order(), "A", command="true", target_files=["a.txt"])
    before = full_snapshot(project.root)
    assert_one_line_error(project.aipm(*args), "NOPE", "-")
    assert full_snapshot(project.root) == before
