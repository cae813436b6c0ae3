"""What a worker runs and with which environment: the task's command, or the project's worker template."""

from __future__ import annotations

import os
from pathlib import Path

from aipm.errors import UserError
from aipm.model import Task
from aipm.runtime import Record, Runtime
from aipm.settings import Settings


def invocation(
    runtime: Runtime, settings: Settings, rec: Record, task: Task, model: str | None
) -> tuple[str | list[str], dict[str, str], str | None]:
    """(command, environment, stdin file) for one attempt of `task`."""
    model = model_for(task, settings, model)
    feedback = runtime.feedback_path(rec.order, rec.task)
    env = environment(runtime, rec, task, model)
    if task.command is not None:
        command = task.command if isinstance(task.command, str) else list(task.command)
        return command, env, None
    prompt = Path(rec.log).with_suffix(".prompt.md")
    text = task.prompt or task.title or task.id
    if feedback.exists():
        text += "\n\n## Review feedback from the previous attempt\n\n" + feedback.read_text(errors="replace")
    prompt.write_text(text)
    values = {"model": model, "task_id": rec.task, "order_id": rec.order, "prompt_file": str(prompt)}
    try:
        command = [part.format(**values) for part in settings.worker_command]
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"aipm.yaml: worker.command: bad placeholder {exc}; use {{model}}, {{task_id}}, "
                        "{order_id} or {prompt_file}") from None
    return command, env, str(prompt)


def model_for(task: Task, settings: Settings, override: str | None) -> str:
    """--model, else the task's `model`, else worker.model from aipm.yaml."""
    return override or task.model or settings.worker_model


def environment(runtime: Runtime, rec: Record, task: Task, model: str) -> dict[str, str]:
    """What a worker (and its reviewer) sees: the AIPM_* variables on top of ours."""
    env = dict(os.environ)
    env.update(
        AIPM_ROOT=str(runtime.root), AIPM_ORDER_ID=rec.order, AIPM_TASK_ID=rec.task, AIPM_ATTEMPT=str(rec.serial),
        AIPM_TARGET_FILES="\n".join(task.target_files), AIPM_MODEL=model, AIPM_LOG=rec.log,
    )
    feedback = runtime.feedback_path(rec.order, rec.task)
    if feedback.exists():
        env["AIPM_REVIEW_FEEDBACK"] = str(feedback)
    else:
        env.pop("AIPM_REVIEW_FEEDBACK", None)
    return env
