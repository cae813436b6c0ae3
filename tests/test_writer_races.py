"""The writer against people editing the same file (issue 11, items 7 and 9).

An editor process changes the task file at the worst moment: after aipm read it and wrote its temp file, just
before the rename. The edit must survive and aipm's change must still land (read and rewrite again).
"""

import os
import subprocess
import sys

import pytest

from aipm.errors import ValidationError
from aipm.model import Status
from aipm.store import load_order, load_task
from aipm.writer import update_task

EDITOR = r"""
import os, sys
path, how = sys.argv[1], sys.argv[2]
for _ in sys.stdin:  # one edit per line received
    text = open(path).read().replace("title: original", "title: edited by hand")
    if how == "same_size_mtime_kept":  # `rsync --inplace -t`, `cp -p` of a same-size file: only the ctime moves
        before = os.stat(path)
        with open(path, "r+") as f:
            f.write(open(path).read().replace("original", "ORIGINAL"))
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    elif how == "rename":  # how vim and most editors save
        with open(path + ".swp", "w") as f:
            f.write(text)
        os.replace(path + ".swp", path)
    else:  # in place, same inode
        with open(path, "r+") as f:
            f.write(text)
            f.truncate()
    print("done", flush=True)
"""


@pytest.mark.parametrize("how", ["rename", "in_place", "same_size_mtime_kept"])
def test_an_edit_between_read_and_rename_is_not_lost(tmp_path, monkeypatch, how):
    path = tmp_path / "T.yaml"
    path.write_text("title: original\ncommand: x\nstatus: QUEUED\n")
    editor = subprocess.Popen([sys.executable, "-c", EDITOR, str(path), how],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    real_fsync = os.fsync
    edits = []

    def fsync_then_let_the_editor_in(fd):
        real_fsync(fd)
        if not edits:  # the first fsync is aipm's temp file: the rename comes next
            editor.stdin.write("edit\n")
            editor.stdin.flush()
            edits.append(editor.stdout.readline().strip())

    monkeypatch.setattr(os, "fsync", fsync_then_let_the_editor_in)
    try:
        task = update_task(path, {"status": Status.IN_PROGRESS, "attempts": 1}, expect=Status.QUEUED)
    finally:
        editor.stdin.close()
        editor.wait(timeout=60)
    assert edits == ["done"]
    title = "ORIGINAL" if how == "same_size_mtime_kept" else "edited by hand"
    assert path.read_text() == f"title: {title}\ncommand: x\nstatus: IN_PROGRESS\nattempts: 1\n"
    assert task.title == title and task.status == Status.IN_PROGRESS
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T.yaml"]


def test_a_status_changed_by_hand_meanwhile_makes_the_write_stale(tmp_path, monkeypatch):
    """The re-read sees the person's CANCELLED: aipm's IN_PROGRESS must not overwrite it."""
    from aipm.writer import StaleWrite

    path = tmp_path / "T.yaml"
    path.write_text("command: x\nstatus: QUEUED\n")
    real_fsync = os.fsync
    calls = []

    def fsync_then_cancel(fd):
        real_fsync(fd)
        if not calls:
            calls.append(fd)
            subprocess.run([sys.executable, "-c", f"import pathlib; p = pathlib.Path({str(path)!r}); "
                            "p.write_text(p.read_text().replace('QUEUED', 'CANCELLED') + '# cancelled\\n')"],
                           check=True)

    monkeypatch.setattr(os, "fsync", fsync_then_cancel)
    with pytest.raises(StaleWrite):
        update_task(path, {"status": Status.IN_PROGRESS}, expect=Status.QUEUED)
    assert path.read_text() == "command: x\nstatus: CANCELLED\n# cancelled\n"


def test_a_task_file_that_is_a_symlink_is_refused_not_replaced_by_a_copy(tmp_path):
    real = tmp_path / "elsewhere.yaml"
    real.write_text("command: x\nstatus: QUEUED\n")
    order = tmp_path / "ORD"
    order.mkdir()
    link = order / "T.yaml"
    link.symlink_to(real)
    with pytest.raises(ValidationError, match="symlink") as info:
        load_order(order)
    assert info.value.file == str(link)
    with pytest.raises(ValidationError, match="symlink"):
        load_task(link)
    with pytest.raises(ValidationError, match="symlink"):
        update_task(link, {"status": Status.IN_PROGRESS})
    assert link.is_symlink() and real.read_text() == "command: x\nstatus: QUEUED\n"
