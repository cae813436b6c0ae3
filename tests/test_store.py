"""Loading and the one writer of task files."""

import os

import pytest

from aipm.errors import ValidationError
from aipm.model import Status
from aipm.paths import Target
from aipm.store import load_order, load_task
from aipm.rewriting import rewrite
from aipm.writer import StaleWrite, update_task

COMMENTED = """\
# A task with comments everywhere
id: TASK_1   # the id
title: "Quoted title"  # keep the quotes
status: QUEUED  # managed, comment kept
priority: P2
depends_on: []
target_files:
  - src/a.py   # one file
command: >
  echo hello
# trailing comment
"""


def test_rewrite_changes_only_managed_lines():
    new = rewrite(COMMENTED, {"status": Status.IN_PROGRESS, "attempts": 1, "started_at": "2026-01-01T00:00:00+00:00"})
    old_lines, new_lines = COMMENTED.splitlines(), new.splitlines()
    # Missing keys follow the last entry (the managed block), ahead of the comment that ends the file.
    assert new_lines == [
        line if not line.startswith("status:") else "status: IN_PROGRESS  # managed, comment kept"
        for line in old_lines[:-1]
    ] + ["attempts: 1", "started_at: '2026-01-01T00:00:00+00:00'", old_lines[-1]]


def test_update_task_is_byte_identical_outside_managed_lines(tmp_path):
    path = tmp_path / "TASK_1.yaml"
    path.write_text(COMMENTED)
    task = update_task(path, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED)
    assert task.status == Status.IN_PROGRESS and task.attempts == 1
    task = update_task(path, {"status": Status.DONE, "exit_code": 0, "finished_at": "x"}, expect=Status.IN_PROGRESS)
    text = path.read_text()
    assert text.replace("status: DONE", "status: QUEUED").startswith(COMMENTED[: -len("# trailing comment\n")])
    assert load_task(path).started_at is None and load_task(path).exit_code == 0
    # Round trip: back to QUEUED restores the original bytes of the original lines.
    update_task(path, {"status": Status.QUEUED}, expect=Status.DONE)
    assert path.read_text().startswith(COMMENTED[: -len("# trailing comment\n")])
    assert path.read_text().endswith("# trailing comment\n")


def test_update_refuses_stale_expectations_and_illegal_transitions(tmp_path):
    path = tmp_path / "T.yaml"
    path.write_text("status: DONE\n")
    before = path.read_bytes()
    with pytest.raises(StaleWrite):
        update_task(path, {"status": Status.IN_PROGRESS}, expect=Status.QUEUED)
    with pytest.raises(StaleWrite):
        update_task(path, {"status": Status.IN_PROGRESS})
    assert path.read_bytes() == before


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "TASK_1.yaml"
    path.write_text(COMMENTED)
    real_fsync = os.fsync

    def broken_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        update_task(path, {"status": Status.IN_PROGRESS}, expect=Status.QUEUED)
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert path.read_text() == COMMENTED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TASK_1.yaml"]  # no temp file left behind


def test_write_beyond_file_size_limit_leaves_file_intact(tmp_path):
    """RLIMIT_FSIZE makes the write itself fail midway, as a full disk would."""
    import subprocess
    import sys

    path = tmp_path / "TASK_1.yaml"
    path.write_text(COMMENTED + "#" * 3000 + "\n")
    before = path.read_bytes()
    code = f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1024, 1024))
from pathlib import Path
from aipm.writer import update_task
from aipm.model import Status
from aipm.paths import Target
try:
    update_task(Path({str(path)!r}), {{"status": Status.IN_PROGRESS}})
except OSError as exc:
    print("failed", exc.errno)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "failed" in out.stdout, out.stderr
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["TASK_1.yaml"]


def test_concurrent_user_edit_of_other_lines_survives(tmp_path):
    path = tmp_path / "T.yaml"
    path.write_text("title: a\nstatus: QUEUED\n")
    # The user edits between two aipm writes; the writer re-reads, so nothing is lost.
    update_task(path, {"status": Status.IN_PROGRESS})
    path.write_text(path.read_text().replace("title: a", "title: edited # by hand"))
    update_task(path, {"status": Status.DONE})
    assert path.read_text() == "title: edited # by hand\nstatus: DONE\n"


def test_targets_of_a_file_aipm_wrote_are_normalised_again_on_every_read(tmp_path, tmp_path_factory):
    """The writer remembers the versions it wrote, so a run does not parse them again; their targets depend on
    the tree, not the file, and read as a fresh process reads them (found by review: a target made a symlink
    leading out of the root was still taken as a plain file by the process that had written the task)."""
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True)
    path = order / "T.yaml"
    path.write_text("command: 'true'\ntarget_files: [build]\n")
    assert update_task(path, {"attempts": 1}, root=tmp_path).targets == (Target("build", False, False),)
    (tmp_path / "build").mkdir()  # as a worker makes its target: a directory, so all that is below it
    assert update_task(path, {"attempts": 2}, root=tmp_path).targets == (Target("build", True, False),)
    (tmp_path / "build").rmdir()
    (tmp_path / "build").symlink_to(tmp_path_factory.mktemp("outside"))
    with pytest.raises(ValidationError, match="'build' is a symlink that leads outside the project root"):
        load_order(order, tmp_path)


def test_missing_trailing_newline_gets_one_before_appending(tmp_path):
    path = tmp_path / "T.yaml"
    path.write_text("title: a")
    update_task(path, {"attempts": 2})
    assert path.read_text() == "title: a\nattempts: 2\n"


def test_alias_bomb_is_refused_quickly(tmp_path):
    order = tmp_path / "O"
    order.mkdir()
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, 40):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]")
    bomb = "\n".join(lines) + "\n"
    bomb += "#" * (10 * 2**20 - len(bomb)) + "\n"  # 10 MB
    (order / "T.yaml").write_text(bomb)
    with pytest.raises(ValidationError, match="1 MiB"):  # refused by its size, never parsed
        load_order(order)


def test_small_alias_bomb_does_not_expand(tmp_path):
    order = tmp_path / "O"
    order.mkdir()
    lines = ['a0: &a0 ["lol"]'] + [
        f"a{i}: &a{i} [" + ", ".join([f"*a{i-1}"] * 10) + "]" for i in range(1, 30)
    ]
    (order / "T.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValidationError, match="unknown key"):
        load_order(order)


@pytest.mark.parametrize("size", [65535, 65536, 65537, 300000])
def test_a_task_file_longer_than_one_read_is_loaded_whole(tmp_path, size):
    # read_text reads a small file in one call; one of that size or more is read again, all of it.
    path = tmp_path / "T1.yaml"
    head = 'id: T1\ncommand: "true"\nprompt: "'
    path.write_text(head + "x" * (size - len(head) - 2) + '"\n')
    assert os.path.getsize(path) == size
    task = load_task(path)
    assert len(task.prompt) == size - len(head) - 2
