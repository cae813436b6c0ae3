"""`aipm schema`, `aipm new`, `aipm add`: write order and task files that are valid from the first byte.

A new file is validated in memory together with the order it joins, then published whole with a hard link,
which fails if the name exists: a refused `add` or `new` leaves every byte on disk as it was, a concurrent
`aipm run` never sees a half-written or invalid file, and two racing `add`s cannot overwrite each other.
"""

from __future__ import annotations

import os
import sys
import tempfile
from contextlib import suppress
from pathlib import Path
from typing import Any, List, Optional

from aipm.cli.decl import Argument, Option, command
import yaml

from aipm.advice import warnings
from aipm.cli.common import console, get_project, warn
from aipm.errors import UserError
from aipm.model import ID_PATTERN, ID_RULE, Priority
from aipm.paths import quote, real_relative
from aipm import settingvalues, writtenlog
from aipm.runtime import Runtime
from aipm.schema import KINDS, schema_text
from aipm.fields import one_line, task_from_mapping
from aipm.inodes import move_new
from aipm.store import NOT_TASKS, ORDER_FILE, check_links, load_order, parse_mapping
from aipm.workerfiles import read_bytes


@command("schema")
def schema_(kind: str = Option("task", "--kind", help="task (a task file) or order (order.yaml)."),
            json_out: bool = Option(False, "--json", help="Accepted as by every read command: the output is JSON "
                                                          "already.")) -> None:
    """Print the JSON Schema (draft 2020-12) of task files or of order.yaml, for editors and linters."""
    if kind not in KINDS:
        raise UserError(f"--kind: {kind!r} is not one of {', '.join(KINDS)}")
    sys.stdout.write(schema_text(kind))


@command()
def new(
    order: str = Argument(..., help="The new order's id (its directory name under orders_dir)."),
    title: Optional[str] = Option(None, "--title", help="One line saying what the order delivers."),
) -> None:
    """Create an order: <orders_dir>/ORDER/order.yaml. Refuses an order that already has one."""
    _check_id("ORDER", order)
    if order.endswith(".yaml"):  # a file's name given for the id: `new ord.yaml` made the directory orders/ord.yaml/
        raise UserError(f"ORDER: {order!r} is a file name; an order is a directory: give its id, "
                        f"{order[:-len('.yaml')]!r} (aipm new writes its order.yaml)")
    _check_utf8(title=title)
    project = get_project()
    order_dir = project.root / project.orders_dir / order
    meta = order_dir / ORDER_FILE
    if meta.exists():
        raise UserError(f"{meta}: already exists; pick another order id")
    # Another directory's order.yaml may give this id (orders/sprint-12 → ORDER_012): a second order of the same
    # id would make every command refuse both, the existing one included (runtime state is kept per id).
    for directory, (other_id, source) in project.order_ids().items():
        if other_id == order and directory != order_dir.resolve():
            raise UserError(f"{meta}: id: {order!r} is already the id of the order in {source}; pick another "
                            "order id")
    fields: dict[str, Any] = {"id": order}
    if title:
        fields["title"] = title
        one_line(meta, fields, "title", longer="description")  # as every command will read it: refused before anything is written
    # Directories we create are removed again if the file cannot be written: a refusal changes nothing.
    made = [d for d in (order_dir, *order_dir.parents) if not d.exists()]
    try:
        order_dir.mkdir(parents=True, exist_ok=True)
        # (before and after: an audit's window may open in between; the schema file too, written the first time)
        _noted(project.root, order_dir, _schema_path(order_dir.parent, "order"))
        _create(meta, _document("order", fields))
    except BaseException as exc:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise UserError(f"{order_dir}: cannot create: {exc.strerror}") from None
        raise
    out = console()
    out.print(f"created {_shown(meta, project.root)}", markup=False)
    _noted(project.root, order_dir, _install_schema(order_dir.parent, "order", project.root))
    out.print(f"next: aipm add {order} TASK_ID --title '...' --command '...'", markup=False)


@command()
def add(
    order: str = Argument(..., help="Order id or directory."),
    task: str = Argument(..., help="The new task's id (its file name without .yaml)."),
    title: Optional[str] = Option(None, "--title", help="One line saying what the task does."),
    depends_on: Optional[List[str]] = Option(
        None, "--depends-on", help="A task of the same order that must finish first (repeatable)."),
    target_files: Optional[List[str]] = Option(
        None, "--target-file", help="A file, directory or glob the task may edit (repeatable)."),
    command: Optional[str] = Option(
        None, "--command", help="Shell command the worker runs (default: the worker template of aipm.yaml)."),
    prompt: Optional[str] = Option(None, "--prompt", help="Text for an agent worker (on its stdin)."),
    model: Optional[str] = Option(None, "--model", help="Model for the worker template's {model}."),
    priority: str = Option("P1", "--priority", help="P0 (most urgent) .. P3."),
    review: Optional[str] = Option(
        None, "--review", help="Review command: exit 0 approves, non-zero sends the task to REWORK."),
    timeout: Optional[str] = Option(
        None, "--timeout", help="Seconds per attempt before the worker's process group is killed; none: no limit, "
                                "whatever the setting says."),
    max_attempts: Optional[int] = Option(
        None, "--max-attempts", help="Tries: a failed or timed-out attempt runs again until this many have run."),
    max_rework: Optional[int] = Option(
        None, "--max-rework", help="Times a review may send the task back before it is REJECTED."),
    agent: Optional[str] = Option(
        None, "--agent", help="Agent preset for a --prompt task: claude, codex, aider (or command: the template)."),
    max_cost_usd: Optional[float] = Option(
        None, "--max-cost-usd", help="The task's budget in US dollars over all its attempts."),
    workspace: Optional[str] = Option(
        None, "--workspace", help="shared (the project's tree) or worktree (an isolated git worktree, merged back)."),
    confine: Optional[bool] = Option(
        None, "--confine/--no-confine", help="Hold the worker to its target files with Landlock (default: the "
                                             "setting)."),
    cpus: Optional[float] = Option(None, "--cpus", help="CPUs one attempt needs (resources.cpus)."),
    memory_mb: Optional[int] = Option(None, "--memory-mb", help="Memory one attempt needs, in MB (resources.memory_mb)."),
    gpus: Optional[float] = Option(None, "--gpus", help="GPUs one attempt needs (resources.gpus; Ray)."),
) -> None:
    """Create a task file ORDER/TASK.yaml, validated with its order before it is written."""
    _check_id("TASK", task)
    _check_utf8(title=title, depends_on=depends_on, target_file=target_files, command=command, prompt=prompt,
                model=model, review=review, agent=agent, workspace=workspace)
    if task.endswith(".yaml"):  # the file's name given for the id: `add ORD A.yaml` made A.yaml.yaml, task `A.yaml`
        raise UserError(f"TASK: {task!r} is a file name; give the task's id, {task[:-len('.yaml')]!r} (its file "
                        "is named ID.yaml)")
    if f"{task}.yaml" in NOT_TASKS:
        raise UserError(f"TASK: {task!r} is reserved ({task}.yaml is read as the "
                        f"{'order' if task == Path(ORDER_FILE).stem else 'settings'} file); pick another id")
    if priority.strip().upper() in {p.value for p in Priority}:
        priority = priority.strip().upper()  # `--priority p1`: the one it can mean, written as the file spells it
    else:
        raise UserError(f"--priority: {priority!r} is not one of {', '.join(p.value for p in Priority)}")
    project = get_project()
    order_dir = project.order_dir(order, empty_ok=True)  # (its first task may make a directory an order)
    path = order_dir / f"{task}.yaml"
    if path.exists():
        raise UserError(f"{path}: already exists; edit it, or pick another task id")
    fields: dict[str, Any] = {"id": task}
    if title:
        fields["title"] = title
    fields.update(priority=priority, depends_on=list(depends_on or []), target_files=list(target_files or []))
    # `--cpus 2` written as 2, as a person writes it, not 2.0
    needs = {key: int(value) if float(value).is_integer() else value
             for key, value in (("cpus", cpus), ("memory_mb", memory_mb), ("gpus", gpus)) if value is not None}
    optional = {"command": command, "prompt": prompt, "model": model, "review": review, "timeout": _timeout(timeout),
                "max_attempts": max_attempts, "max_rework": max_rework, "agent": agent,
                "max_cost_usd": max_cost_usd, "workspace": workspace, "confine": confine, "resources": needs or None}
    fields.update({key: value for key, value in optional.items() if value is not None})
    # The fields aipm writes come last, in one block: a person's edits (title, command, ...) and aipm's status
    # writes then touch different lines, so branches that did one and the other merge without conflict.
    fields["status"] = "QUEUED"
    # An order directory outside the project (`add /elsewhere/ORD T`) gets no schema copy beside it, so no line
    # naming one: it pointed at a file that did not exist.
    in_root = real_relative(str(project.root), str(order_dir.parent)) is not None  # (`add ..`: none above the root)
    text = _document("task", fields, schema=in_root)
    # The order as it will be once the file exists: field checks, then dependencies and cycles.
    loaded = load_order(order_dir, project.root)
    new_task = task_from_mapping(path, parse_mapping(path, text), project.root)
    loaded.tasks[new_task.id] = new_task
    check_links(loaded)
    # (before and after: an audit's window may open in between; the schema file too, written the first time)
    _noted(project.root, order_dir, _schema_path(order_dir.parent, "task") if in_root else None)
    _create(path, text)
    console().print(f"created {_shown(path, project.root)}", markup=False)
    schema = _install_schema(order_dir.parent, "task", project.root) if in_root else None
    _noted(project.root, order_dir, schema)
    warn(warnings([new_task]))


def _timeout(value: str | None) -> int | str | None:
    """--timeout as the task file spells it: seconds, or `none` (no limit, which a task file may say)."""
    if value is None:
        return None
    try:
        seconds = settingvalues.timeout(value)
    except ValueError as exc:
        raise UserError(f"aipm add: Invalid value for '--timeout': {exc}") from None
    return "none" if seconds is None else seconds


def _check_utf8(**flags: Any) -> None:
    """Refuse an argument that is not UTF-8 (bytes the shell passed on, which Python holds as surrogates): written
    as a `\\uDCxx` escape, it made a file YAML refuses, so `new --title` wrote an order.yaml no command could read."""
    for name, value in flags.items():
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as exc:
                    byte = ord(text[exc.start]) - 0xDC00
                    raise UserError(f"--{name.replace('_', '-')}: not UTF-8 (byte 0x{byte:02x} at character "
                                    f"{exc.start + 1}); task and order files are UTF-8") from None


def _check_id(what: str, value: str) -> None:
    if not ID_PATTERN.fullmatch(value):
        raise UserError(f"{what}: {value!r} is not a usable id; use {ID_RULE}")


def _shown(path: Path, root: Path) -> str:
    """The path as the user thinks of it: relative to the project root when inside it."""
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (prompts) as `|` blocks, which stay readable and editable."""


# Line breaks to YAML 1.1 besides \n. PyYAML writes them raw into a plain, quoted or `|` scalar (allow_unicode), where
# reading folds them into a space or a \n: `--command $'echo a\u0085b'` was written as `echo a b`. Only double
# quotes escape them (\N, \L, \P).
_OTHER_BREAKS = ("\x85", "\u2028", "\u2029")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = '"' if any(c in value for c in _OTHER_BREAKS) else "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def _document(kind: str, fields: dict[str, Any], schema: bool = True) -> str:
    """The file's text: a schema line for editors (yaml-language-server) where `schema`, then the fields in block
    style.

    The schema line is the same in every file and every clone: `../<kind>.schema.json`, a copy aipm keeps
    beside the order directories (never a path of this machine, such as the installed package's).
    """
    body = yaml.dump(fields, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=1000)
    return f"# yaml-language-server: $schema=../{kind}.schema.json\n{body}" if schema else body


def _noted(root: Path, order_dir: Path, schema: Path | None) -> None:
    """What `new` and `add` wrote is no worker's: noted for the scope audits of the attempts running now (writing
    the next order's first task during a run sent every running task back: `scope: wrote orders/NEXT/order.yaml`).
    Nothing to note, and no state made, where nothing runs."""
    rt = Runtime(root)
    if not rt.records():
        return
    with rt.launch_lock():
        writtenlog.note_order(rt, order_dir, [] if schema is None else _written_through(root, schema))


def _written_through(root: Path, path: Path) -> list[str]:
    """`path` and the temp files it is written through, as targets (its name's `*` a character, not a pattern)."""
    rel = os.path.relpath(path, root)
    directory = os.path.dirname(rel)
    return [quote(rel), (quote(directory) + "/" if directory else "") + f".{quote(path.name)}.*.tmp"]


def _schema_path(directory: Path, kind: str) -> Path:
    return directory / f"{kind}.schema.json"


def _install_schema(directory: Path, kind: str, root: Path) -> Path | None:
    """Make <directory>/<kind>.schema.json this aipm's schema (aipm generates it: an old copy is replaced).
    Returns the path when it was written."""
    path = _schema_path(directory, kind)
    text = schema_text(kind)
    ours = text.encode()
    try:  # no longer than ours: a worker's sparse terabyte there is not read, nor a FIFO waited on; both replaced
        if read_bytes(path, len(ours)) == ours:
            return None
    except OSError:
        pass
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        os.unlink(tmp)
        console(stderr=True).print(f"aipm: warning: {path}: cannot write the editor schema: {exc.strerror}",
                                   markup=False)
        return None
    console().print(f"wrote {_shown(path, root)} (the schema editors check these files against)", markup=False)
    return path


def _create(path: Path, text: str) -> None:
    """Publish a new file whole or not at all; never replace a file that appeared meanwhile."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the task from teammates and their tools
        # A rename that refuses an existing name (renameat2 RENAME_NOREPLACE): a running `aipm run` watches its
        # order for files moved in or written, and a hard link is neither (only IN_CREATE, which it leaves out as
        # an editor's empty new file): a task added by link mid-run was never started, and the run ended exit 0.
        if not move_new(tmp, str(path)):
            os.link(tmp, path)  # where renameat2 cannot: link refuses an existing name too
    except FileExistsError:
        raise UserError(f"{path}: already exists (created meanwhile); nothing written") from None
    except OSError as exc:
        raise UserError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)  # (renamed: gone)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
