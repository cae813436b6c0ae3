"""What a worker runs and with which environment: the task's command, an agent preset, or the worker template."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from aipm import agents, workspace
from aipm.model import Task
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.settings import Settings
from aipm.workerfiles import STATE_FILE_MAX, read_bytes, write_bytes


def invocation(
    runtime: Runtime, settings: Settings, rec: Record, task: Task, model: str | None
) -> tuple[str | list[str], dict[str, str], str | None]:
    """(command, environment, stdin file) for one attempt of `task`; notes the agent that runs it in `rec`."""
    chosen = bool(model or task.model or settings.sources["worker_model"] != "default")
    model = model_for(task, settings, model)
    feedback = runtime.feedback_path(rec.order, rec.task)
    env = environment(runtime, rec, model)
    rec.agent = agent_for(task, settings)
    if task.command is not None:
        command = task.command if isinstance(task.command, str) else list(task.command)
        return command, env, None
    prompt = Path(rec.log).with_suffix(".prompt.md")
    text = task.prompt or task.title or task.id
    with suppress(OSError):  # none, or what a worker put in its place and is no file (or a sparse terabyte)
        text += ("\n\n## Review feedback from the previous attempt\n\n"
                 + read_bytes(feedback, STATE_FILE_MAX).decode(errors="replace"))
    write_bytes(prompt, text.encode())  # renamed over: an earlier attempt's worker may have put a FIFO here
    if agents.is_preset(rec.agent):
        resume = runtime.resume_path(rec.order, rec.task)
        work = Path(workspace.directory(runtime.root, rec))  # the tree the agent edits: its rules are for it
        protected = [runtime.dir, Path(rec.order_dir).resolve()]
        in_root = os.path.relpath(rec.order_dir, runtime.root)
        if rec.workspace and not in_root.startswith(".."):
            protected.append(work / in_root)  # the worktree's copy of the order directory
        attempt = agents.Attempt(
            root=work, prompt_file=prompt, log=Path(rec.log), model=model, model_chosen=chosen,
            targets=task.targets, protected=tuple(protected), max_cost_usd=rec.cost_cap,
            resume=_resume(resume),
            workspace=Path(rec.workspace) if rec.workspace else None,
        )
        return agents.command_line(rec.agent, attempt), env, str(prompt)
    values = {"model": model, "task_id": rec.task, "order_id": rec.order, "prompt_file": str(prompt)}
    return [part.format(**values) for part in settings.worker_command], env, str(prompt)  # checked by settings


def agent_for(task: Task, settings: Settings) -> str:
    """The task's `agent`, else the worker.agent setting; a task with its own `command` runs that."""
    return agents.COMMAND if task.command is not None else task.agent or settings.worker_agent


def program(task: Task, settings: Settings) -> list[str]:
    """The argv whose program must exist before the task may start (a string command is the shell's)."""
    if task.command is not None:
        return [] if isinstance(task.command, str) else list(task.command)
    agent = agent_for(task, settings)
    return [agents.program(agent)] if agents.is_preset(agent) else list(settings.worker_command)


def program_source(task: Task, settings: Settings) -> str:
    """Where the program `program()` names was chosen: what to fix when it is missing."""
    if task.command is not None:
        return f"`command` in {task.path}"
    if not agents.is_preset(agent_for(task, settings)):
        return "worker.command (the worker template) in aipm.yaml"
    return f"`agent` in {task.path}" if task.agent else "worker.agent (the agent preset) in aipm.yaml"


def model_for(task: Task, settings: Settings, override: str | None) -> str:
    """--model, else the task's `model`, else worker.model from aipm.yaml."""
    return override or task.model or settings.worker_model


def environment(runtime: Runtime, rec: Record, model: str) -> dict[str, str]:
    """What a worker (and its reviewer) sees: the AIPM_* variables on top of ours."""
    env = _ours()
    env.update(
        AIPM_ROOT=str(runtime.root), AIPM_ORDER_ID=rec.order, AIPM_TASK_ID=rec.task, AIPM_ATTEMPT=str(rec.serial),
        AIPM_TARGET_FILES="\n".join(rec.targets), AIPM_MODEL=model, AIPM_LOG=rec.log,
    )  # the targets as normalised, as locked and confined (`./src/../a.py` is `a.py`; a directory ends in /)
    if rec.workspace:
        env["AIPM_WORKSPACE"] = rec.workspace  # its git worktree; AIPM_ROOT is its copy of the project root
    else:
        env.pop("AIPM_WORKSPACE", None)  # the setting's value is not meant for the worker
    feedback = runtime.feedback_path(rec.order, rec.task)
    if feedback.exists():
        env["AIPM_REVIEW_FEEDBACK"] = str(feedback)
    else:
        env.pop("AIPM_REVIEW_FEEDBACK", None)
    return env


_copied: tuple[dict[bytes, bytes], dict[str, str]] | None = None  # os.environ's bytes as last copied, and the copy


def _ours() -> dict[str, str]:
    """A copy of os.environ: decoded again only when it changed (decoding every variable was a tenth of a chain's
    start; `_data` holds its bytes, and comparing them costs little)."""
    global _copied
    raw = getattr(os.environ, "_data", None)
    if not isinstance(raw, dict):
        return dict(os.environ)
    if _copied is None or _copied[0] != raw:
        _copied = (dict(raw), dict(os.environ))
    return dict(_copied[1])


def _resume(path: Path) -> str | None:
    """The session `aipm retry --resume` left; none when there is no file (missing, a worker's FIFO or sparse
    terabyte)."""
    try:
        return read_bytes(path, STATE_FILE_MAX).decode(errors="replace").strip() or None
    except OSError:
        return None
