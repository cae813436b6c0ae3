"""The order view's indexes kept up to date task by task agree with recomputing them from scratch."""

import dataclasses

from hypothesis import HealthCheck, given, settings, strategies as st

from aipm.model import FINISHED_OK, Status
from aipm.ranking import ranked
from aipm.view import OrderView

from conftest import write_task

STATUSES = [Status.QUEUED, Status.IN_PROGRESS, Status.DONE, Status.FAILED, Status.COMPLETED]


def _ready_from_scratch(order) -> list[str]:
    tasks = order.tasks
    return [t.id for t in ranked(order) if t.status == Status.QUEUED
            and all(d in tasks and tasks[d].status in FINISHED_OK for d in t.depends_on)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), size=st.integers(min_value=1, max_value=12))
def test_the_ready_tasks_stay_in_launch_order_as_statuses_change(tmp_path_factory, data, size):
    root = tmp_path_factory.mktemp("view")
    order_dir = root / "orders" / "ORD"
    order_dir.mkdir(parents=True)
    for i in range(size):
        deps = data.draw(st.lists(st.sampled_from(range(i)), unique=True, max_size=3)) if i else []
        write_task(order_dir, f"T{i:02d}", command="true", priority=data.draw(st.sampled_from(["P0", "P1", "P2"])),
                   depends_on=[f"T{d:02d}" for d in deps])
    view = OrderView(order_dir, root, watch=False)
    assert view.ready_ordering() == _ready_from_scratch(view.order)
    for _ in range(data.draw(st.integers(min_value=1, max_value=25))):
        tid = data.draw(st.sampled_from(sorted(view.order.tasks)))
        task = dataclasses.replace(view.order.tasks[tid], status=data.draw(st.sampled_from(STATUSES)))
        view.note(task)  # as after a write of our own
        assert view.ready_ordering() == _ready_from_scratch(view.order)
        below = data.draw(st.integers(min_value=0, max_value=len(view.order.tasks)))
        assert view.ready_ordering(below) == [t for t in _ready_from_scratch(view.order) if view.rank(t) < below]
        assert view.running == {t.id for t in view.order.tasks.values() if t.status in (Status.IN_PROGRESS,)}
