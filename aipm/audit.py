"""The scope audit of an attempt that ended, as its outcome is recorded (recording.py): which of the paths it changed
no target allowed, and what the task and the person are told about them. The snapshots and windows themselves are
scope.py's; a worktree's exact check is workspace.py's.
"""

from __future__ import annotations

from pathlib import Path

from aipm import confine, observers, ownoutput, scope, workspace, writtenlog
from aipm.coverage import files_above
from aipm.record import Record
from aipm.runtime import Runtime
from aipm.settings import Settings


def findings(rt: Runtime, settings: Settings, rec: Record, in_commits: set[str] | None) -> tuple[list[str], list[str]]:
    """(out of scope, those of them written in the main tree by a worktree task). Out of scope: the paths the
    worker changed or committed (`in_commits`, see scope.findings) that neither it nor any task running alongside
    it may write; a worktree task's: what it changed outside its own targets in its worktree, exactly, and what the
    main tree's audit finds, as for a task in the shared tree. WorkspaceError (NotCaptured) when its worktree cannot
    be captured."""
    tree = _tree_findings(rt, settings, rec, in_commits)
    if not rec.workspace:
        return tree, []
    return sorted(set(workspace.outside_targets(rt.root, rec)) | set(tree)), tree


def _tree_findings(rt: Runtime, settings: Settings, rec: Record, in_commits: set[str] | None) -> list[str]:
    """The project tree's audit of the attempt (none when none began for it: scope.findings). What aipm's processes
    print into the tree is no worker's write: this run's output, and that of the other aipm processes of the
    project whose attempts ran meanwhile (another `aipm run ORD2 > run2.log`) or that own none (`nohup aipm ui &`:
    observers.py): the live ones' by what their sessions hold open for writing, the ended ones' by their notes
    (writtenlog.outputs_since)."""
    seen: dict = {}

    def allowed(since_ns: int) -> list:
        others = seen["others"] = rt.records()
        seen["since"] = since_ns
        # aipm writes the task files of the orders that run (and people edit them meanwhile): those files, not
        # their whole directory (an order at the root allowed every path). Orders whose attempts ended meanwhile
        # are in the written log.
        task_files = [f for d in {r.order_dir for r in [rec, *others]} for f in writtenlog.order_files(rt.root, d)]
        return [*rec.targets, *rec.scope_allowed, *(t for r in others for t in r.targets), *task_files,
                *settings.scope_ignore, *writtenlog.written_since(rt, since_ns)]

    found = scope.findings(rt.root, rec.scope_file, allowed, in_commits, rec.scope_since)
    if rec.confined:  # (audited for its glob targets alone: elsewhere the kernel held it to its targets)
        found = confine.reachable(found, rec.targets)
    if not found:
        return found
    others = seen.get("others", [])
    # (not the other records' own_output: it keeps the output of every owner an attempt had, a killed run's too,
    # which no one writes but a worker now; a live owner's output is found by its session, an ended one's by its
    # notes made in the window)
    noted = [*rec.own_output, *writtenlog.outputs_since(rt, seen.get("since", rec.scope_since))]
    owners = {r.owner_pid for r in others if r.owner_alive()} | observers.live(rt)
    return ownoutput.not_own_output(rt.root, found, noted, owners, {r.pid for r in others if r.pid})


def feedback(root: Path, rec: Record, outside: list[str], escaped: list[str]) -> str:
    """What the next attempt is told (its prompt) of its writes out of scope. A person or another process may have
    made the change, and an agent told it wrote a file it never touched could undo that person's work: it is told
    what to do either way."""
    message = ("scope audit: changed outside target_files while this attempt ran: " + ", ".join(outside)
               + "; if you changed them, undo that and keep to target_files; if you did not, leave them as they are")
    for target in files_above(outside, rec.targets):  # `gen` for the directory the task makes
        message += (f"; {target} is a file target, not a directory (it did not exist when the attempt started): "
                    f"write `{target}/` in target_files to cover everything below it")
    if escaped:
        message += (f"; {', '.join(escaped)} changed in the main tree, outside this task's worktree: a worktree task "
                    "writes only in its worktree (its changes reach the main tree by its merge), never by a path that "
                    "leads out of it")
    if rec.workspace:  # its worktree goes when the next attempt starts: say where the work is kept
        message += ("; nothing of this attempt was merged; its changes are kept in "
                    + workspace.kept_words(workspace.patch_path(root, rec.order, rec.task, rec.serial),
                                           workspace.kept_rest(root, rec))
                    + "".join(f"; {note}" for note in workspace.stashed(root, rec)))
    return message


def hint(rec: Record, escaped: list[str]) -> str | None:
    """What the person is told beside the finding, where their own edit may have been charged."""
    if not rec.workspace and rec.confined:  # (charged only with what its globs opened to it: confine.reachable)
        where = ", ".join(f"{base}/" if base else "the project root" for base in confine.opened(rec.targets))
        return (f"its worker is confined, but a glob target opens all of {where} to it (Landlock has no patterns), "
                "so aipm cannot tell who wrote them there: if you edited them yourself during the attempt, list them "
                "in scope_ignore (aipm.yaml); or name the task's files or directories instead of globs")
    if not rec.workspace:  # in the shared tree a person's edit meanwhile is charged too: say what to do
        # (not workspace: worktree alone: an unconfined worktree task is audited in the main tree too, by the rule
        # below; confined, a task is held to its targets by the kernel, and audited only for its globs, above)
        return ("aipm cannot tell who wrote them: if you edited them yourself during the attempt, list them in "
                "scope_ignore (aipm.yaml), or run such tasks with confine: true, which holds their workers to their "
                "targets")
    if escaped:  # so is one in the main tree while a worktree task runs unconfined
        return ("aipm cannot tell who wrote them in the main tree: if you edited them yourself during the attempt, "
                "list them in scope_ignore (aipm.yaml), or run such tasks with confine: true, which keeps their "
                "workers out of the main tree")
    return None
