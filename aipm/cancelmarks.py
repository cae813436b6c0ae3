"""The user's cancels, marked in the state directory, where no worker writes (part of Runtime, the one owner of
aipm's runtime state): a task file is anyone's (an agent may write `status: CANCELLED` in it), so a CANCELLED over
an attempt is the user's only with this mark (see restore), and a cancel of a task whose file is gone is kept apart
until the file is back (see recovery.drop_gone)."""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from aipm.liveness import read_small
from aipm.record import Record
from aipm.statedir import safe_name as _safe


class CancelMarks:
    """Mixed into Runtime, whose state directory (`state`) and writes there (`_state_write`) it uses."""

    state: Path

    def mark_cancelled(self, rec: Record) -> None:
        """`aipm cancel` marks the attempt it stops, where no worker writes: a task file is anyone's (an agent may
        write `status: CANCELLED`), so a CANCELLED over an attempt is the user's only with this mark (see restore)."""
        self._state_write(self._cancel_path(rec), _attempt_name(rec))

    def cancelled(self, rec: Record) -> bool:
        try:
            return read_small(str(self._cancel_path(rec))).decode() == _attempt_name(rec)
        except (OSError, UnicodeDecodeError):
            return False

    def unmark_cancelled(self, rec: Record) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self._cancel_path(rec))

    def _cancel_path(self, rec: Record) -> Path:
        return self.state / "cancel" / _safe(rec.order) / _safe(rec.task)

    def keep_cancel(self, rec: Record) -> None:
        """The record of a cancelled attempt is dropped while its task file is gone (recovery.drop_gone): the
        cancel is kept apart (no sweep removes it), so the file put back as that attempt left it is CANCELLED by
        the next recovery, not re-queued and run again. A few bytes, left for good if the file never returns."""
        self._state_write(self._kept_cancel_path(rec.order, rec.task), f"{rec.attempt} {rec.started_at}")

    def kept_cancel(self, order: str, task: str) -> str:
        """The attempt ("<attempts> <started_at>") whose cancel keep_cancel() kept, "" if none."""
        try:
            return read_small(str(self._kept_cancel_path(order, task))).decode()
        except (OSError, UnicodeDecodeError):
            return ""

    def drop_kept_cancel(self, order: str, task: str) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self._kept_cancel_path(order, task))

    def _kept_cancel_path(self, order: str, task: str) -> Path:
        return self.state / "cancel-kept" / _safe(order) / _safe(task)


def _attempt_name(rec: Record) -> str:
    """One attempt among all of a task's: a number alone comes back once its log and exit file are gone."""
    return f"{rec.serial} {rec.started_at}"
