"""Where a task's workspace keeps things: its worktree, merge plan, patches, refs and scratch space, by order and
task id (see the package's docstring for the layout); and the test seam that kills a process at a named point."""

from __future__ import annotations

import os
import re
import signal
import stat
import time
from pathlib import Path

from aipm.digest import sha1
from aipm.workspace.repo import RUNTIME_DIR


def component(text: str) -> str:
    """A directory and ref-name component for an order or task id; ids that need changing get a hash suffix,
    so two ids never share one."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", text)
    return safe if safe == text else f"{safe}-{sha1(text.encode(errors='surrogateescape')).hexdigest()[:8]}"


def runtime_dir(root: Path) -> Path:
    return Path(root) / RUNTIME_DIR


def worktree_path(root: Path, order: str, task: str) -> Path:
    return runtime_dir(root) / "worktrees" / component(order) / component(task)


def merge_dir(root: Path, order: str, task: str) -> Path:
    return runtime_dir(root) / "merges" / component(order) / component(task)


def patch_path(root: Path, order: str, task: str, attempt: int) -> Path:
    return runtime_dir(root) / "patches" / component(order) / f"{component(task)}.{attempt}.patch"


def later_patch_path(root: Path, order: str, task: str, attempt: int) -> Path:
    """What was changed in attempt N's kept worktree after its end (by its review, or by hand), beside its patch."""
    return runtime_dir(root) / "patches" / component(order) / f"{component(task)}.{attempt}.later.patch"


def rest_path(root: Path, order: str, task: str, attempt: int) -> Path:
    """Where what attempt N left in its worktree that no patch can hold is kept, beside its patch."""
    return runtime_dir(root) / "patches" / component(order) / f"{component(task)}.{attempt}.rest"


def tangled_path(root: Path, order: str, task: str, attempt: int) -> Path:
    """Where attempt N's end says which paths its patch leaves as its start has them and where its versions of them
    are kept (kept.keep_tangled), beside its patch: read by `aipm diff` when it shows that patch."""
    return runtime_dir(root) / "patches" / component(order) / f"{component(task)}.{attempt}.tangled"


def kept_words(patch: object, rest: object) -> str:
    """Where an attempt's work is kept, for a line that says so (`...kept in <this>`): its patch, its rest, or both.
    Every line that names the patch names the rest: the patch alone is not the whole work."""
    if patch and rest:
        return f"{patch}, and what no patch can hold in {rest}"
    return str(patch) if patch else f"{rest} (what no patch can hold)"


def own_dir(root: Path, path: Path) -> bool:
    """`path`, below the runtime directory, is a directory reached without a symbolic link below `.aipm` (a
    `.aipm` that is a link is a person's choice of where it lives; runtime.py refuses one that leads out). Only
    then is it listed or removed: through a worker's `.aipm/worktrees/ORD -> ~` a sweep took every directory it
    found there for a finished task's worktree and `rm -rf`ed it, and `git worktree remove` would remove a
    person's worktree a link named."""
    here = runtime_dir(root)
    return real_dirs(here, *Path(path).relative_to(here).parts)


def real_dirs(start: Path, *parts: str) -> bool:
    """Each of `start`/parts[0], `start`/parts[0]/parts[1], ... is a directory, none reached through a link."""
    here = start
    for part in parts:
        here = here / part
        try:
            if not stat.S_ISDIR(os.lstat(here).st_mode):
                return False
        except OSError:
            return False
    return True


def make_own_dir(root: Path, path: Path) -> None:
    """Make `path` below the runtime directory as own_dir() wants it: a link or file a worker left on the way
    is moved aside (kept under a name that says why, as runtime.py does for the logs' directories)."""
    here = runtime_dir(root)
    for part in Path(path).relative_to(here).parts:
        here = here / part
        try:
            if stat.S_ISDIR(os.lstat(here).st_mode):
                continue
            os.rename(here, f"{here}.not-a-directory.{time.time_ns()}")
        except FileNotFoundError:
            pass
        os.makedirs(here, exist_ok=True)


def refname(order: str, task: str, which: str = "", prefix: str = "") -> str:
    """The ref of a task's attempt: `refs/aipm/<ORDER>/<TASK>/<which>`, under `@<dir>/` for a project in a
    directory `prefix` of its repository, so that two projects of one repository never share one (an order id
    never starts with `@`)."""
    return f"{ref_space(prefix)}{component(order)}/{component(task)}/{which}"


def ref_space(prefix: str) -> str:
    """Where a project's refs live: `refs/aipm/`, or `refs/aipm/@<dir>/` for one below its repository's top."""
    return f"refs/aipm/@{component(prefix.rstrip('/'))}/" if prefix else "refs/aipm/"


def scratch(root: Path) -> Path:
    return runtime_dir(root) / "tmp"


def seam(point: str) -> None:
    if os.environ.get("AIPM_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)


def relative(path: str, prefix: str) -> str:
    """A repository path relative to the project root (outside it: `../...`, which no target covers)."""
    return path[len(prefix):] if path.startswith(prefix) else os.path.relpath(path, prefix or ".")
