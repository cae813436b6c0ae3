"""The project watch behind `aipm ui` and `aipm logs ORDER -f` (aipm.changes.ProjectWatch): real inotify over real
directories that come and go as a worker's `git clean -fdx` or a new order makes them."""

import select
import shutil

import pytest

from aipm.changes import ProjectWatch
from aipm.project import Project
from aipm.statedir import state_dir


@pytest.fixture
def project(tmp_path):
    return Project(tmp_path)


def settle(watch: ProjectWatch, seconds: float = 0.3) -> tuple[bool, set]:
    """Every change the watch reports until it has been quiet for `seconds` (the last batch's rescan included)."""
    board, logs = False, set()
    while select.select([watch.fd], [], [], seconds)[0]:
        b, grown = watch.changes()
        board |= b
        logs |= grown
    return board, logs


def layout(project, order="ORD"):
    (project.root / "orders" / order).mkdir(parents=True)
    (project.runtime / "logs" / order).mkdir(parents=True)
    (state_dir(project.root) / "workers" / order).mkdir(parents=True)


def test_a_task_file_written_is_a_board_change_and_a_log_write_is_that_log(project):
    layout(project)
    watch = ProjectWatch.open(project)
    try:
        (project.root / "orders" / "ORD" / "A.yaml").write_text("title: a\n")
        assert settle(watch) == (True, set())
        log = project.runtime / "logs" / "ORD" / "A.1.log"
        log.write_text("line\n")
        board, logs = settle(watch)
        assert logs == {log}
    finally:
        watch.close()


def test_directories_made_again_after_a_clean_are_watched_again(project):
    """`git clean -fdx` takes .aipm/ away under the dashboard; the next run makes it again: its new logs are news,
    though no task file changed since (the rescan comes from where directories appear, not from every write)."""
    layout(project)
    watch = ProjectWatch.open(project)
    try:
        shutil.rmtree(project.runtime)
        settle(watch)
        (project.runtime / "logs" / "ORD").mkdir(parents=True)
        settle(watch)
        log = project.runtime / "logs" / "ORD" / "B.1.log"
        log.write_text("again\n")
        assert settle(watch)[1] == {log}
        workers = state_dir(project.root) / "workers" / "NEW"
        workers.mkdir()
        settle(watch)
        (workers / "T.1.json").write_text("{}")
        assert settle(watch)[0]
    finally:
        watch.close()


def test_a_new_order_directory_is_watched(project):
    layout(project)
    watch = ProjectWatch.open(project)
    try:
        (project.root / "orders" / "NEW").mkdir()
        settle(watch)
        (project.root / "orders" / "NEW" / "A.yaml").write_text("title: a\n")
        assert settle(watch)[0]
    finally:
        watch.close()


def test_an_order_given_by_path_that_is_made_again_is_watched_again(project, tmp_path_factory):
    """An order outside orders_dir (`aipm ui DIR`): no watch sees its directory made again, so while it is
    missing every change looks for it."""
    layout(project)
    outside = tmp_path_factory.mktemp("elsewhere") / "ORD2"
    outside.mkdir()
    watch = ProjectWatch.open(project, [outside])
    try:
        shutil.rmtree(outside)
        settle(watch)
        outside.mkdir()
        (state_dir(project.root) / "workers" / "ORD" / "T.1.json").write_text("{}")  # a change: the look
        settle(watch)
        (outside / "B.yaml").write_text("title: b\n")
        assert settle(watch)[0]
    finally:
        watch.close()
