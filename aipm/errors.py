"""Errors a user can cause. The CLI prints them as one line and exits 2 (1 for Unwritable), with nothing changed
on disk."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or configuration: one line, exit code 2."""

    exit_code = 2


class ValidationError(UserError):
    """A task, order or settings file that is wrong: names the file and the field."""

    def __init__(self, file: str, field: str | None, message: str):
        self.file, self.field, self.message = file, field, message
        where = f"{file}: {field}" if field else file
        super().__init__(f"{where}: {message}")


class SettingsError(UserError):
    """A bad setting value, naming the setting and where it came from."""


class Unwritable(UserError):
    """The machine refused a write the command needs first (a full state directory): one line, exit 1, and the
    command did nothing."""

    exit_code = 1
