"""Kernel confinement of a worker to its target files (Linux Landlock).

The worker's wrapper runs the command as `python -m aipm.confine SPEC -- COMMAND...`: this module builds a
Landlock ruleset from the task's targets, restricts itself, and execs the command, so the command and every
process it starts inherit the restriction (the wrapper itself stays outside, to write the exit file).
Only write-ish rights are handled (write, truncate, remove, make, refer);
reading and executing stay free everywhere.

Landlock grants whole hierarchies and cannot subtract, so the ruleset is built from the project root outwards:
- outside the root: every entry beside the path from `/` down to the root (and to the repository's `.git`
  when it lies above the root, aipm's state directory and an order directory outside the root, which get
  nothing) gets every right (so `/tmp`, `$HOME` caches and `/dev/null` stay writable when they do not contain
  the project); the directories on that path cannot, so nothing new can be created directly in them;
- a target directory: every right below it (created empty first when missing: Landlock only takes rules on
  paths that exist, and an empty directory is invisible to git); one that holds the repository's `.git`,
  `.aipm/` or an order directory (the root, `*.md`) is granted as the outside is, everything beside those;
- a target file: write and truncate on the file itself, created empty first when missing (a file rule cannot
  let a process create a file, and a directory rule would open every file beside it);
- a glob: every right below its literal base directory (`tests/**/*.py` → `tests/`): Landlock has no patterns;
- the attempt's log, and a TMPDIR of its own when the system's temp directory contains the root;
- a worktree task's own git directory (ownrefs.py), with the object store of its own there (objects.py), nothing
  of the repository's object store: git works in its worktree.
What this module created is listed beside the log, and `tidy` removes what the worker left untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from functools import lru_cache
from pathlib import Path

from aipm.landlock import ALL_RIGHTS, FILE_RIGHTS, WRITE_FILE, restrict, unavailable
from aipm.paths import GLOB_CHARS, literal_base
from aipm.workerfiles import STATE_FILE_MAX, note_reason, read_bytes, read_git_file, reason, write_bytes

_FAILED = "confine: cannot confine the worker: "


def wanted(task, settings) -> bool:
    """The task's `confine`, else the `confine` setting (flag, environment, aipm.yaml)."""
    return task.confine if task.confine is not None else settings.confine


def exact(target_files) -> bool:
    """Whether the kernel enforces exactly the targets (a glob is granted its whole base directory)."""
    return all(GLOB_CHARS.isdisjoint(t) for t in target_files)


def prefix(root: str, targets: list[str], log: str, exit_file: str, keep: list[str], project: str | None = None,
           state: str | None = None) -> list[str]:
    """The argv to put in front of the worker's command so it runs confined to `targets` below `root`; `keep`:
    directories no rule may open unless a target names them (the order directories: task files are aipm's);
    `project`: the project root when `root` is a worktree of it (nothing of the project tree is opened then);
    `state`: aipm's directory outside the project (exit files, locks, the compiled wrapper), never opened;
    `exit_file`: the attempt's, beside which a ruleset that cannot be applied is noted (workerfiles.note_reason).

    Python runs isolated and without `site` (-I -S): the standard library first, then only the directories
    that hold aipm and the Landlock binding. From the project root, `-m` would have put the root first on the
    import path, and a module a task left there (`token.py`, `json.py`) ran before the ruleset did; `site` would
    run the `.pth` files of site-packages, which a worker may write when they lie outside the project."""
    return boot_argv("aipm.confine", {"root": root, "targets": targets, "log": log, "exit_file": exit_file,
                                      "keep": keep, "project": project or root, "state": state})


def boot_argv(module: str, spec: dict) -> list[str]:
    """`python ... SPEC --`: `module`'s main(SPEC, "--", ARGV...) in an isolated Python given aipm's own path."""
    boot = ("import json, sys; sys.path += json.loads(sys.argv[1])['path']; "
            f"from {module} import main; sys.exit(main(sys.argv[1:]))")
    return [sys.executable, "-I", "-S", "-c", boot, json.dumps({**spec, "path": boot_path()}), "--"]


@lru_cache(maxsize=None)
def boot_path() -> list[str]:
    """Where this process finds aipm and landlockpy (an editable install, PYTHONPATH and site-packages alike)."""
    import importlib.util

    places = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
    found = importlib.util.find_spec("landlockpy")
    if found is not None and found.origin:
        package = found.submodule_search_locations
        places.append(os.path.dirname(package[0] if package else found.origin))
    return list(dict.fromkeys(places))


def opened(targets: list[str]) -> list[str]:
    """What a confined worker's rules open in the project beyond its targets (relative to the root, "" for the root
    itself): each glob target's literal base, granted whole, as Landlock has no patterns."""
    return list(dict.fromkeys(literal_base(t.rstrip("/")) for t in targets if not exact([t])))


def reachable(paths: list[str], targets: list[str]) -> list[str]:
    """Of the project paths `paths`, changed beside a confined worker's targets, those the kernel let it write (below
    what its globs opened). Everywhere else in the project it refused the worker every write: a change there is
    someone else's, never its own."""
    bases = opened(targets)
    return [p for p in paths if any(base == "" or _contains(base, p) for base in bases)]


WHOLE = -1  # a listing's mtime for a directory removed with all it holds (the worker's TMPDIR)


def made_file(log: str) -> str:
    """Where the paths created for the ruleset are listed (beside the log, like the scope snapshot)."""
    return log[: -len(".log")] + ".confine.json"


def private_tmp(log: str) -> str:
    return log[: -len(".log")] + ".tmp"


# -- building the rules (in the worker's process, just before it restricts itself) --------------------------


def rules(root: str, targets: list[str], log: str, made: list, keep: list[str] = (),
          project: str | None = None, state: str | None = None) -> tuple[list, str | None]:
    """[(path, rights)] for a worker, and its TMPDIR when it needs one of its own: its targets below `root`
    (the project root, or the worktree it works in, inside `project`), nothing else of the project.

    Creates what must exist for a rule (missing targets, the TMPDIR), appending each new path to `made` as
    [path, is_dir, mtime_ns]. Raises OSError when a target now leads through a symlink (one made after the order
    was read, where its locks did not look).
    """
    import tempfile  # only here: a run that confines nothing does without it

    real_root = os.path.realpath(root)
    real_project = os.path.realpath(project or root)
    git = _git_dirs(real_root)
    runtime = os.path.realpath(os.path.join(real_root, ".aipm"))  # (a link to where it lives: that place)
    orders = [os.path.realpath(k) for k in keep]
    kept = git + [runtime] + orders
    state = [os.path.realpath(state)] if state else []
    out = _beside("/", [real_project] + [k for k in git + orders if not _contains(real_project, k)] + state)
    for raw in targets:
        path, kind = _target_path(real_root, raw)
        if os.path.realpath(path) != path:
            raise OSError(f"target {raw or '.'} now leads through a symlink, to {os.path.realpath(path)}")
        if _contains(runtime, path):
            continue  # aipm's: no target opens it
        if kind == "file":
            if _order_dir(os.path.dirname(path), orders) and path.endswith(".yaml"):
                continue  # a task file
            _make_parents(os.path.dirname(path), made)
            _make_file(path, made)
            out.append((path, FILE_RIGHTS))
            continue
        _make_parents(path, made)
        if _order_dir(path, orders):
            out += _order_entries(path)
            continue
        inside = [k for k in kept if _contains(path, k)]
        out += _beside(path, inside) if inside else [(path, ALL_RIGHTS)]
    out += _own_git(git, real_root, real_project)
    out.append((log, WRITE_FILE))
    tmp = None
    system_tmp = os.path.realpath(tempfile.gettempdir())
    # A temp directory that holds the project or aipm's state cannot be opened whole: the worker gets its own,
    # made there with a short name (a socket's path must fit in 108 bytes), removed by tidy().
    if any(_contains(system_tmp, p) or _contains(p, system_tmp) for p in [real_project] + state):
        inside = _contains(real_project, system_tmp)
        tmp = private_tmp(log) if inside else tempfile.mkdtemp(prefix="aipm-tmp-", dir=system_tmp)
        os.makedirs(tmp, exist_ok=True)
        made.append([tmp, True, WHOLE])
        out.append((tmp, ALL_RIGHTS))
    return out, tmp


def _order_dir(path: str, orders: list[str]) -> bool:
    """An order directory: one aipm was given (the task's, the one holding the orders), or one beside the task's
    in the directory holding the orders (another order: its task files are aipm's just as much)."""
    return path in orders or (os.path.dirname(path) in orders and _holds_tasks(path))


def _holds_tasks(directory: str) -> bool:
    return any(e.name.endswith(".yaml") for e in _entries(directory))


def _order_entries(directory: str) -> list[tuple[str, int]]:
    """An order directory (or the one holding them) named by a glob's base or as a directory target: Landlock
    cannot open it without letting task files be made or replaced in it, so only its files that are no task files
    (nor aipm's hidden temporary ones) may be written, and nothing made in it; its subdirectories are open, but
    for one that holds task files itself (an order directory in `orders/`), which gets the same again."""
    out = []
    for entry in _entries(directory):
        if entry.is_symlink() or entry.name[:1] == ".":
            continue
        if entry.is_dir():
            out += _order_entries(entry.path) if _holds_tasks(entry.path) else [(entry.path, ALL_RIGHTS)]
        elif entry.is_file() and not entry.name.endswith(".yaml"):
            out.append((entry.path, FILE_RIGHTS))
    return out


def _entries(directory: str) -> list[os.DirEntry]:
    try:
        return list(os.scandir(directory))
    except OSError:
        return []


def _contains(outer: str, inner: str) -> bool:
    return inner == outer or inner.startswith(outer.rstrip("/") + "/")


def _beside(top: str, avoid: list[str]) -> list[tuple[str, int]]:
    """Every entry below `top` but the `avoid` paths, in as few rules as Landlock allows: an entry on the way to
    one is walked into (it cannot be granted: the grant would cover what it holds), any other gets every right it
    can carry. So nothing new can be created directly in `top` or a directory on the way. Symlinks are skipped:
    what they point to is covered by its own entry, and one pointing into the project must not open it."""
    found = []
    pending = [top]
    while pending:
        for entry in _entries(pending.pop()):
            if any(_contains(entry.path, a) for a in avoid):
                if entry.path not in avoid and entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
            elif not entry.is_symlink():
                found.append((entry.path, ALL_RIGHTS if entry.is_dir(follow_symlinks=False) else FILE_RIGHTS))
    return found


def _git_dirs(real_root: str) -> list[str]:
    """The repository's git directories that hold the root (its `.git`, in the root or above it; for a linked
    worktree also the directory `.git` names and the common one): no rule may open them unless a target does."""
    directory = real_root
    while True:
        dot_git = os.path.join(directory, ".git")
        if os.path.isdir(dot_git):
            return [os.path.realpath(dot_git)]
        if os.path.isfile(dot_git):
            found = [dot_git]
            try:
                line = read_git_file(dot_git)
                if line.startswith("gitdir:"):
                    named = os.path.realpath(os.path.join(directory, line[len("gitdir:"):].strip()))
                    found.append(named)
                    common = read_git_file(os.path.join(named, "commondir"))
                    found.append(os.path.realpath(os.path.join(named, common)))
            except OSError:
                # no commondir: a submodule's own git directory, already listed; or what is not git's (a FIFO or a
                # sparse file a worker left in place of `.git`): no git directory it names is known
                pass
            return found
        if directory == "/":
            return []
        directory = os.path.dirname(directory)


def _own_git(git: list[str], real_root: str, real_project: str) -> list[tuple[str, int]]:
    """A worktree task's git: its worktree's own git directory (index, HEAD, its own refs and stash: ownrefs.py), and
    with it the object store of its own in it, where its git adds its commits and stash entries (objects.py). Not
    the repository's object store, nor any of its directories: Landlock cannot tell git's adding of an object there
    from the rewriting (a chmod, then a write) or the deletion of one, nor keep an `info/alternates` or a
    commit-graph, which every git of the repository reads, from being made. Nothing of the main tree's refs, index
    or config. None for a task in the project tree, or a worktree whose git directory is not its own (no
    `commondir` in it)."""
    if real_root == real_project or len(git) != 3 or not _contains(git[1], git[2]):
        return []
    return [(git[1], ALL_RIGHTS)]


def _target_path(real_root: str, raw: str) -> tuple[str, str]:
    """(absolute path, "file" | "dir") that a target's rule goes on. A glob's rule goes on its literal base."""
    base = literal_base(raw.rstrip("/"))
    path = os.path.normpath(os.path.join(real_root, base)) if base else real_root
    if base != raw.rstrip("/"):
        return path, "dir"
    return path, "dir" if raw.endswith("/") or not base or os.path.isdir(path) else "file"


def _make_parents(directory: str, made: list) -> None:
    missing = []
    while not os.path.isdir(directory):
        missing.append(directory)
        directory = os.path.dirname(directory)
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:
            if os.path.isdir(path) and not os.path.islink(path):
                continue  # made meanwhile by another confined worker whose targets lie in it too: its, not ours
            raise
        made.append([path, True, 0])


def _make_file(path: str, made: list) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    os.close(fd)
    made.append([path, False, os.stat(path).st_mtime_ns])


def failure(exit_file: str, confined: bool) -> str | None:
    """Why a confined attempt's ruleset could not be applied (its exit 126), as main() noted it; None when the
    attempt was not confined or its ruleset was applied (its command's own exit 126)."""
    return reason(exit_file) if confined else None


def tidy(log: str, confined: bool) -> None:
    """After an attempt: remove the TMPDIR and what was created for the rules and left untouched since
    (empty files with their first mtime, empty directories)."""
    tmp = private_tmp(log)
    if os.path.lexists(tmp):  # (where an older aipm made every one)
        shutil.rmtree(tmp, ignore_errors=True)
    if not confined:
        # Beside the log, a listing is only trusted from a worker that could not write there: an unconfined one
        # could name any directory for us to remove (or leave a FIFO, holding us for ever).
        return
    listing = made_file(log)
    try:  # (another task's worker may have left a FIFO or a sparse terabyte there: not waited on, not read)
        made = json.loads(read_bytes(listing, STATE_FILE_MAX))
    except (OSError, ValueError):
        return
    at = log.rfind(f"{os.sep}.aipm{os.sep}")  # the project's (a worktree's paths lie below it too), as rules() saw it
    root = os.path.join(os.path.realpath(log[:at]), "") if at > 0 else ""
    for path, is_dir, mtime in reversed(made):
        try:
            if mtime == WHOLE:
                if _made_tmp(path, log):
                    shutil.rmtree(path, ignore_errors=True)
            elif not path.startswith(root) or root == "":
                continue  # (a rewritten listing: the empty files and directories aipm makes are all in the project)
            elif is_dir:
                os.rmdir(path)
            else:
                st = os.stat(path)
                if st.st_size == 0 and st.st_mtime_ns == mtime:
                    os.unlink(path)
        except OSError:
            continue  # used by the worker (not empty, or written): it stays
    os.unlink(listing)


def _made_tmp(path: str, log: str) -> bool:
    """Whether a listing's directory to remove whole is a TMPDIR rules() makes: beside the log, or `aipm-tmp-*` in
    the system's temp directory. The listing lies in `.aipm/`, where another task's unconfined worker can rewrite
    it while this attempt runs: one that named `~` there had it removed with all it holds."""
    import tempfile

    if path == private_tmp(log):
        return True
    return (os.path.dirname(path) == os.path.realpath(tempfile.gettempdir())
            and os.path.basename(path).startswith("aipm-tmp-"))


def main(argv: list[str]) -> int:
    """`python -m aipm.confine SPEC -- ARGV...`: confine this process to SPEC, then exec ARGV."""
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m aipm.confine SPEC -- ARGV...", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    try:
        reason = unavailable()
        if reason:
            raise OSError(reason)
        made: list = []
        try:
            grants, tmp = rules(spec["root"], spec["targets"], spec["log"], made, spec["keep"], spec["project"],
                                spec.get("state"))
        finally:
            # Renamed into place: a link an earlier, unconfined attempt left under this name is not written through.
            write_bytes(Path(made_file(spec["log"])), json.dumps(made).encode())
        restrict(grants)
    except OSError as exc:
        # Never run the command unconfined: the attempt fails with the reason in its log.
        print(f"[aipm] {_FAILED}{exc}", file=sys.stderr)
        note_reason(spec["exit_file"], f"{_FAILED}{exc}")
        return 126
    if tmp:
        os.environ["TMPDIR"] = tmp
    # An argv names its program as the wrapper would run it: a bare name (`claude`, an agent preset's) is
    # looked up on the worker's PATH, as execvp does unconfined.
    try:
        os.execvp(argv[2], argv[2:])
    except OSError as exc:  # as a shell says it: one line, 127 for a program not found, 126 for one not runnable
        print(f"aipm: cannot run {argv[2]}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
