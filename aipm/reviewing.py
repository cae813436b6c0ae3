"""Reviewing an attempt whose work exited 0: starting its reviewer, recording the verdict (COMPLETED, or REWORK
with the review's output as feedback; a review that timed out is no approval), running a stopped or lost review
again for the same attempt, and merging a worktree task's changes back once approved. A mixin of
recording.Recording, which records what the work itself came to.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from aipm import lostreviews, outcome, runner, spending, workspace
from aipm.finish import after_review, rejects, review_command, time_limit
from aipm.model import Status, Task
from aipm.record import Record
from aipm.workspace import carry
from aipm.worker import environment, model_for
from aipm.workerfiles import append_log, read_ends, unlink_hard_link, write_bytes
from aipm.writer import now


# What the next attempt is given of a review's output: its head (the first error, often the cause of the rest) and
# its tail (a linter's or test runner's summary), the middle cut with a line saying how much and where it all is.
# 48 KiB is some 12k tokens: a long traceback or pages of lint, a small part of an agent's context. The 1 MiB kept
# before was some 250k tokens, more than most agents' whole context, and paid for again by every attempt.
FEEDBACK_HEAD = 16 << 10
FEEDBACK_TAIL = 32 << 10


class Reviewing:
    """The review half of an owner's recording (see Recording for the state it shares)."""

    def _review_again(self, rec: Record, task: Task, event: dict) -> dict:
        """Run the review of this attempt again: its work is done and paid for, only the verdict is missing. Where
        the work can no longer be reviewed (lostreviews.cannot_review), the attempt is re-queued as before; the review
        that runs is the one it started with (its worker may have rewritten or removed `review` in its task file: a
        Ctrl-C during the review made that edit its judge), and with none (`--no-review`) the kept work ends as it
        would have without review. What the stopped or lost reviewer reported it cost counts first, as a stopped
        attempt's does."""
        spent = spending.settle_review(self.rt, rec, task)
        if spent:
            task = self._write(task, spent)
        why = lostreviews.cannot_review(rec)
        if why:
            self._requeue(rec, rec.stopping or "review lost")
            return {"event": "interrupted", "requeued": [rec.task], "why": f"review: it cannot run again ({why})",
                    **self.kept([rec])}
        lost = "stopped" if rec.stopping else "lost without a verdict"
        said = f"review of attempt {rec.serial} {lost}" + f" ({rec.stopping})" * bool(rec.stopping)
        if review_command(task, self.settings, self.launcher.options.no_review, rec) is None:
            append_log(rec.log, f"{said}: no review command now; the attempt's work is kept, unreviewed")
            return self._ended(rec, self._unreviewed(rec, task, event), event)
        append_log(rec.log, f"{said}: it runs again; the attempt's work is kept")
        rec.stopping = ""
        self._start_review(rec, task)
        return {"event": "review", "order": rec.order, "task": rec.task, "attempt": rec.serial, "again": lost}

    def _unreviewed(self, rec: Record, task: Task, merged: dict) -> Task:
        """IN_REVIEW → DONE (a worktree task's work merged first), as its work's exit 0 would have ended without
        review; a merge that conflicts sends it back (REWORK), as after an approval. `merged`: its event."""
        conflict = self._merge_back(rec, task, merged)
        if conflict:
            return self._conflicted(rec, task, *conflict)
        return self._write(task, {"status": Status.DONE, "finished_at": now(),
                                  "reason": left_out(outcome.unreviewed(), merged)})

    def _review_ended(self, rec: Record, task: Task, code: int | None, timed_out: bool, merged: dict) -> Task:
        """IN_REVIEW → COMPLETED, or REWORK → QUEUED/REJECTED with the review's output kept as feedback. A review
        that timed out sends the task back whatever its code (it may exit 0 on the SIGTERM): a hung reviewer must
        not hold the task's files for ever, and no verdict is never approval. `merged`: its event (what the merge
        left out, where a conflicting attempt's changes are kept)."""
        review_log = Path(rec.log).with_suffix(".review.log")
        late = outcome.review_timed_out(time_limit(task, self.settings)) if timed_out else ""
        if late:
            code = code or 1  # killed without a code, or exit 0 on the SIGTERM: still no approval
            verdict = f"{outcome.timed_out(time_limit(task, self.settings))}; process group killed"
        else:
            verdict = "approved" if code == 0 else f"sent back (exit {code})"
        append_log(rec.log, f"review {verdict}; review output: {review_log}")
        spent = spending.settle_review(self.rt, rec, task)
        if spent:
            task = self._write(task, spent)
        conflict = self._merge_back(rec, task, merged) if code == 0 else None
        if conflict:
            return self._conflicted(rec, task, *conflict)
        if code == 0:  # (its old feedback goes once it is COMPLETED: Recording._ended)
            reason = left_out(outcome.review_approved(), merged)
        else:
            output, first = review_feedback(review_log, rec.review_from, rec.command, code, bool(late))
            write_bytes(self.rt.feedback_path(rec.order, rec.task, writing=True),
                        output + f"{late}\n".encode() * bool(late))
            # Before the verdict: killed between the two, the review runs again (approved: the mark goes with the
            # feedback), where an older attempt's mark would have had the next attempt drop this one's work.
            carried = rec.workspace and carry.mark(self.rt, rec.order, rec.task, rec.serial)
            reason = late or outcome.review_rejected(first, code)
        for updates in after_review(task, code, self.settings, reason):
            task = self._write(task, updates)
        if code != 0 and rec.workspace:  # (after its verdict is written: a review asked again finds it as it was)
            keep_ignored(self.rt.root, rec)
            kept = workspace.kept_words(workspace.patch_path(self.rt.root, rec.order, rec.task, rec.serial),
                                        workspace.kept_rest(self.rt.root, rec))
            # (rejected for good, no next attempt continues them: `aipm retry` starts the task anew, as _ended says)
            append_log(rec.log, f"the changes of attempt {rec.serial} are kept in {kept}"
                                + ("; its next attempt continues them" if carried and task.status == Status.QUEUED
                                   else ""))
        return task

    def _conflicted(self, rec: Record, task: Task, conflict: str, lasting: bool) -> Task:
        """An approved (or unreviewed) worktree task whose merge conflicts: sent back with the conflict as feedback;
        for good (REJECTED) where every attempt would meet it (`lasting`): each one retried is an agent paid."""
        log_whole(rec.log, conflict)
        write_bytes(self.rt.feedback_path(rec.order, rec.task, writing=True),
                    f"{conflict}\n".encode(errors="surrogateescape"))
        carry.unmark(self.rt, rec.order, rec.task)  # (the next attempt starts from the main tree as it is)
        for updates in after_review(task, 1, self.settings, outcome.one_line(conflict.splitlines()[0]), lasting):
            task = self._write(task, updates)
        return task

    def _merge_back(self, rec: Record, task: Task, event: dict) -> tuple[str, bool] | None:
        """An approved worktree task: apply its changes to the main tree. The conflict (its feedback) when they
        cannot be; then nothing was applied, and `task` is sent back."""
        if not rec.workspace:
            return None
        try:
            # (`last`: a conflict rejects it for good, so its message tells of no next attempt)
            for note in workspace.merge(self.rt.root, rec, last=rejects(task, self.settings)):
                append_log(rec.log, f"merge: {note}")
                if workspace.NOT_MERGED in note:
                    event["not_merged"] = note  # (the task's reason says so)
                elif workspace.UNDONE in note:
                    event["undone"] = note
                elif note.endswith(workspace.STASHED):
                    event["stashed"] = note
        except workspace.Conflict as exc:
            event["conflict"] = exc.paths
            # The finish line said "nothing of it was merged" and no more: where the work is, and what comes next
            kept = workspace.patch_path(self.rt.root, rec.order, rec.task, rec.serial)
            event["hint"] = f"its changes are kept in {kept}"
            if exc.lasting:
                event["hint"] += (f"; no next attempt starts, as each would meet the same: move them away, then "
                                  f"`aipm retry {rec.task}`")
            elif not rejects(task, self.settings):  # (a rejection for good starts none; a review's write is no edit)
                event["hint"] += "; a next attempt starts from the main tree as it is now" + (
                    ", your edit included" * exc.main_tree)
            return str(exc), exc.lasting
        except workspace.WorkspaceError as exc:
            keep_ignored(self.rt.root, rec)
            return f"merge failed, nothing of this attempt was merged: {exc}", False
        return None

    def _start_review(self, rec: Record, task: Task) -> None:
        """Start the review of the attempt's work: the one it started with (finish.review_command)."""
        command = review_command(task, self.settings, self.launcher.options.no_review, rec)
        if isinstance(command, tuple):
            command = list(command)
        env = environment(self.rt, rec, model_for(task, self.settings, self.launcher.options.model))
        lostreviews.as_review(rec, task)
        review_log = str(Path(rec.log).with_suffix(".review.log"))
        try:
            os.unlink(rec.exit_file)
        except FileNotFoundError:
            pass
        rec.command = [command] if isinstance(command, str) else command
        unlink_hard_link(review_log)  # the reviewer's output goes to a file of ours, not through the worker's link
        # Run again after a stop, it appends to the log of the run it replaces: its verdict is judged on its own output
        try:
            rec.review_from = os.lstat(review_log).st_size
        except OSError:
            rec.review_from = 0
        limit = time_limit(task, self.settings)
        try:
            runner.spawn(command, exit_file=rec.exit_file, env=env, cwd=workspace.directory(self.rt.root, rec),
                         log=review_log, limit=limit, started=lambda pid, ctime: self._record(rec, pid, ctime, limit))
        except runner.SpawnError as exc:
            # A reviewer that cannot start never approves (fail closed).
            append_log(review_log, f"review could not start: {exc}")
            rec.pid = 0
            write_bytes(Path(rec.exit_file), b"127\n")
            self.rt.write_record(rec)
        self._own(rec)


def review_feedback(review_log: Path, start: int, command: list[str], code: int, late: bool
                    ) -> tuple[bytes, str]:
    """(the feedback for the next attempt, the start of the review's output for its reason): the head and tail of
    its output (from `start` in its log), with a line for what was cut between them. A review that printed nothing
    has a line saying so, its command and how it ended (else the prompt's feedback section was empty: the agent was
    told nothing); one that timed out (`late`) ends in its own line for that."""
    try:
        head, cut, tail = read_ends(review_log, FEEDBACK_HEAD, FEEDBACK_TAIL, start)
    except OSError:
        head, cut, tail = b"", 0, b""  # none, or the worker replaced it with what is not a file
    first = head.decode(errors="replace")
    if cut:  # at line ends where there are some: a line's stray half reads as a message of its own
        end, begin = head.rfind(b"\n") + 1, tail.find(b"\n") + 1
        begin = begin if begin < len(tail) else 0
        cut += (len(head) - end if end else 0) + begin
        head, tail = head[: end or len(head)], tail[begin:]
        head += f"\naipm: {cut:,} bytes of the review's output cut here; all of it is in {review_log}\n\n".encode(
            errors="surrogateescape")  # (a path of the project, not UTF-8)
    elif not (head + tail).strip():
        shown = command[0] if len(command) == 1 else shlex.join(command)  # (one item: a shell string)
        ended = "" if late else f"exited {code} and " if code >= 0 else f"was {outcome.killed(-code)} and "
        said = f"the review command `{shown}` {ended}printed {'only blank space' if head else 'nothing'}\n"
        return said.encode(errors="replace"), first
    return head + tail, first


def keep_ignored(root: Path, rec: Record) -> None:
    """A worktree attempt sent back whole: the ignored files of its targets kept in its rest (workspace.keep_ignored),
    its log saying where; its worktree goes when the next attempt starts."""
    if rec.workspace:
        for note in workspace.keep_ignored(root, rec):
            append_log(rec.log, note)


def left_out(reason: str, merged: dict) -> str:
    """`reason`, saying what an approved merge left out: ignored files, the task's changes its review put back,
    changes its worker stashed."""
    if "not_merged" in merged:
        reason = outcome.not_merged(reason)
    if "stashed" in merged:
        reason = outcome.stashed(reason)
    return outcome.undone_by_review(reason) if "undone" in merged else reason


def log_whole(log: str, text: str) -> None:
    """A message of several lines (a merge conflict's paths, markers and kept patch) in the attempt's log: the
    reason keeps only its first line. Lines after the first are indented, so no line of a file's text can be
    taken for an agent's JSON event when the log's usage is read."""
    append_log(log, "\n  ".join(text.rstrip("\n").splitlines()))
