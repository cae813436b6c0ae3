"""A person steering a run: cancel a task (stop its worker's whole process group) or retry it.

`aipm cancel`, `aipm retry` and the web dashboard's buttons call these, so they behave alike.
"""

from __future__ import annotations

from pathlib import Path

from aipm.errors import UserError
from aipm.launcher import append_log
from aipm.model import RUNNING, Status
from aipm.project import Project
from aipm.runner import terminate_group
from aipm.runtime import Runtime
from aipm.store import StaleWrite, load_order, load_task, now, update_task


def cancel(project: Project, order_dir: Path, task_id: str, grace: float = 5.0) -> None:
    """Mark the task CANCELLED, then stop its worker's group (SIGTERM, SIGKILL after `grace` seconds)."""
    rt = Runtime(project.root)
    path = order_dir / f"{task_id}.yaml"
    with rt.launch_lock():
        current = load_task(path, project.root)
        if current.status not in (*RUNNING, Status.QUEUED, Status.REWORK, Status.INTERRUPTED):
            raise UserError(f"{path}: status: {current.status} cannot be cancelled")
        update_task(path, {"status": Status.CANCELLED, "finished_at": now()}, expect=current.status)
        order_id = load_order(order_dir, project.root).id
        rec = rt.read_record(order_id, task_id)
    if rec is not None and rec.pid and rec.worker_alive():
        append_log(rec.log, "cancelled by the user: stopping the process group")
        terminate_group(rec.pgid, rec.pid, grace)


def retry(project: Project, order_dir: Path, task_id: str) -> None:
    """Put a finished, failed, rejected or cancelled task back to QUEUED with fresh attempts."""
    path = order_dir / f"{task_id}.yaml"
    with Runtime(project.root).launch_lock():
        current = load_task(path, project.root)
        if current.status in RUNNING:
            raise UserError(f"{path}: status: {current.status}; it is running (cancel it first)")
        try:
            update_task(path, {"status": Status.QUEUED, "attempts": 0, "reworks": 0, "exit_code": None,
                               "preemptions": 0}, expect=current.status)
        except StaleWrite as exc:
            raise UserError(f"{path}: status: {exc}") from None
