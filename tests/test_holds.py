"""A task IN_PROGRESS or IN_REVIEW in any order holds its target files, with or without a worker record."""

from __future__ import annotations

import os

from conftest import no_workers, snapshot, task_statuses, wait_for, write_task


def _setup(project, holder_status="IN_PROGRESS"):
    other = project.order("A")
    (other / "order.yaml").write_text("id: ORDER_2\n")
    write_task(other, "T3", status=holder_status, target_files=["docs/x.md"], command="true")
    order = project.order("B")
    write_task(order, "T1", target_files=["docs/"], command="echo edited > docs/x.md")
    write_task(order, "T2", target_files=["other.txt"], command="echo ok > other.txt")
    (project.root / "docs").mkdir()
    (project.root / "docs" / "x.md").write_text("mine\n")
    return other, order


def _blocked(data, task):
    return next(b for b in data["blocked"] if b["id"] == task)


def test_a_hand_marked_task_of_another_order_holds_its_files_in_every_command(project):
    other, order = _setup(project)
    assert not (project.root / ".aipm").exists()
    detect = project.json("detect", "B")
    assert [t["id"] for t in detect["launchable"]] == ["T2"]
    blocked = _blocked(detect, "T1")
    assert blocked["reason"] == "file_busy" and blocked["tasks"] == ["ORDER_2/T3"]
    assert "docs/x.md is held by ORDER_2/T3, IN_PROGRESS with its worker gone" in blocked["detail"]
    why = project.json("why", "B/T1")
    assert not why["launchable"] and "ORDER_2/T3, IN_PROGRESS" in why["reasons"][0]["detail"]
    text = project.aipm("why", "B/T1").stdout
    assert "docs/x.md is held by ORDER_2/T3, IN_PROGRESS with its worker gone" in " ".join(text.split())
    assert not (project.root / ".aipm").exists()  # read-only commands create nothing, not even .aipm/

    launch = project.json("launch", "B")
    assert [item["id"] for item in launch["launched"]] == ["T2"]
    wait_for(lambda: task_statuses(order)["T2"] == "DONE")
    wait_for(lambda: no_workers(project.root))
    run = project.aipm("run", "B")
    assert run.returncode == 1 and task_statuses(order)["T1"] == "QUEUED"
    exec_ = project.aipm("exec", "B/T1")
    assert exec_.returncode == 1 and "ORDER_2/T3, IN_PROGRESS" in exec_.stdout
    assert (project.root / "docs" / "x.md").read_text() == "mine\n"
    assert task_statuses(other)["T3"] == "IN_PROGRESS"  # aipm never touches the other order's hand-set status


def test_in_review_holds_too_and_the_hold_ends_with_the_status(project):
    other, order = _setup(project, "IN_REVIEW")
    project.aipm("launch", "B", "--dry-run")  # no record anywhere: only the status says the files are held
    assert "ORDER_2/T3, IN_REVIEW" in _blocked(project.json("detect", "B"), "T1")["detail"]
    path = other / "T3.yaml"
    path.write_text(path.read_text().replace("IN_REVIEW", "COMPLETED"))
    assert {t["id"] for t in project.json("detect", "B")["launchable"]} == {"T1", "T2"}
    assert project.aipm("run", "B").returncode == 0
    assert (project.root / "docs" / "x.md").read_text() == "edited\n"


def test_the_index_follows_in_place_edits_renames_and_new_files(project):
    other, order = _setup(project)
    write_task(order, "T2", target_files=["other.txt"], command="true", status="DONE")
    assert project.aipm("run", "B").returncode == 1  # T1 blocked; `run` writes the index
    index = project.root / ".aipm" / "holds" / "A.json"
    assert index.exists()
    path = other / "T3.yaml"
    inode = path.stat().st_ino
    with open(path, "r+") as handle:  # an editor that writes in place: same inode, same directory mtime
        text = handle.read().replace("IN_PROGRESS", "DONE")
        handle.seek(0)
        handle.write(text)
        handle.truncate()
    assert path.stat().st_ino == inode
    assert "T1" in {t["id"] for t in project.json("detect", "B")["launchable"]}
    # Back to IN_PROGRESS by rename (a new inode), and a second holder appears as a new file.
    tmp = other / ".T3.tmp"
    tmp.write_text(path.read_text().replace("status: DONE", "status: IN_PROGRESS"))
    os.replace(tmp, path)
    assert _blocked(project.json("detect", "B"), "T1")["tasks"] == ["ORDER_2/T3"]
    path.write_text(path.read_text().replace("IN_PROGRESS", "DONE"))
    write_task(other, "T4", status="IN_PROGRESS", target_files=["docs/"], command="true")
    assert _blocked(project.json("detect", "B"), "T1")["tasks"] == ["ORDER_2/T4"]
    assert project.aipm("run", "B").returncode == 1
    (other / "T4.yaml").unlink()
    assert project.aipm("run", "B").returncode == 0


def test_a_broken_file_in_another_order_holds_its_files_and_breaks_nothing(project):
    """(A file that fails validation held nothing: see the test below.)"""
    other, order = _setup(project)
    (other / "T3.yaml").write_text("status: IN_PROGRESS\ntarget_files: docs/x.md\n")  # not a list
    before = snapshot(project.root)
    detect = project.json("detect", "B")
    assert {t["id"] for t in detect["launchable"]} == {"T2"}
    assert _blocked(detect, "T1")["tasks"] == ["ORDER_2/T3"]
    assert snapshot(project.root) == before


def test_the_holds_index_is_never_written_through_a_link_at_its_temp_name(tmp_path):
    """`.aipm/holds/` is in the tree: a link a worker left at the index's temp name had the file it led to (outside
    the project) truncated and written with the index."""
    from aipm.holds import _write_index

    victim = tmp_path / "victim.txt"
    victim.write_text("the user's\n")
    index = tmp_path / "holds" / "A.json"
    index.parent.mkdir()
    (index.parent / f".A.json.{os.getpid()}.tmp").symlink_to(victim)
    _write_index(index, {"files": {}})
    assert victim.read_text() == "the user's\n" and '"files"' in index.read_text()


def test_a_hand_marked_task_whose_file_has_an_error_still_holds(project):
    """A typo in a field of the holder's file (`priority: high`, an unknown key, broken YAML) dropped its hold
    without a word, and agents took the files a person was editing. Its targets hold while they can be read; else
    (its YAML broken) the whole tree, until the file is fixed."""
    other, order = _setup(project)
    holder = other / "T3.yaml"
    held = {"priority: high\n": ["docs/x.md"], "colour: red\n": ["docs/x.md"]}
    for typo, targets in held.items():
        holder.write_text(holder.read_text().split("priority:")[0] + typo)
        blocked = _blocked(project.json("detect", "B"), "T1")
        assert blocked["reason"] == "file_busy" and blocked["tasks"] == ["ORDER_2/T3"], (typo, blocked)
        # (`aipm recover` cannot free it: the file is what to fix)
        assert "IN_PROGRESS in a file that does not validate: fix it (`aipm validate ORDER_2`" in blocked["detail"]
        assert [t["id"] for t in project.json("detect", "B")["launchable"]] == ["T2"], typo
    for eol in ("\n", "\r\n"):  # YAML broken: everything held (its status line found in the bytes)
        holder.write_bytes(f"id: T3{eol}status: IN_PROGRESS{eol}target_files: [docs/x.md{eol}".encode())
        detect = project.json("detect", "B")
        assert detect["launchable"] == [] and {b["reason"] for b in detect["blocked"]} == {"file_busy"}, detect
    holder.write_text("id: T3\nstatus: DONE\ntarget_files: [docs/x.md]\ncolour: red\n")  # says it is not running
    assert {t["id"] for t in project.json("detect", "B")["launchable"]} == {"T1", "T2"}
    assert project.aipm("run", "B").returncode == 0
