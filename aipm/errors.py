"""Errors a user can cause. The CLI prints them as one line and exits 2 (1 for Unwritable), with nothing changed
on disk."""

from __future__ import annotations

import math
import reprlib


# How alike a misspelling and the name it stands for must be (difflib's ratio) for a "did you mean" hint.
# difflib's default, 0.6, took three shared letters of short words for a match: `tags` → 'status'. At 0.75 a
# typo (`priorty`, `max_worker`, `depend`) still finds its name, and `target`, `module` or `comment` no
# longer find `agent`, `model` or `command`.
CLOSE = 0.75


def did_you_mean(word: str, known, synonyms: dict[str, str] | None = None) -> str:
    """The hint `; did you mean 'x'?` for a name spelt close to `word`, else for the one name that has `word` as
    one of its words (`target` → 'target_files', `ignore` → 'scope_ignore'; a word of five letters or more: `id`,
    `max` or `code` says too little), else for the one name it begins (`prio` → 'priority'; four letters or
    more), else for the name `synonyms` gives it (`dependencies` → 'depends_on': other tools' words, too far
    from ours to be spelt close); else "": better no guess than a wrong one."""
    import difflib  # only for this message: loading an order or the settings does without it

    known = list(known)
    near = difflib.get_close_matches(word, known, n=1, cutoff=CLOSE)
    if not near and len(word) >= 5:
        forms = {word, word[:-1]} if word.endswith("s") else {word}  # `targets` → target_files as `target` does
        near = [name for name in known if forms & set(name.replace(".", "_").split("_"))]
    if not near and len(word) >= 4:
        near = [name for name in known if name.startswith(word)]
    if not near and synonyms and synonyms.get(word.lower()) in known:
        near = [synonyms[word.lower()]]
    return f"; did you mean {near[0]!r}?" if len(near) == 1 else ""


class _Yaml(reprlib.Repr):
    """Values as YAML spells them (`true`, `null`, `.inf`, `2026-01-01`), not Python (`True`, `None`, `inf`,
    `datetime.date(2026, 1, 1)`): the error is read by whoever wrote the file. Text keeps its quotes."""

    def repr_NoneType(self, value, level):
        return "null"

    def repr_bool(self, value, level):
        return "true" if value else "false"

    def repr_float(self, value, level):
        return ".nan" if value != value else {math.inf: ".inf", -math.inf: "-.inf"}.get(value, repr(value))

    def repr_date(self, value, level):
        return value.isoformat()

    repr_datetime = repr_time = repr_date  # (a time is TOML's, in pyproject.toml)

    def repr_bytes(self, value, level):
        return "binary data"  # !!binary


# A value from a file, as an error shows it: bounded in depth, length and items. The loader shares an alias's
# value, never expands it, so a 300-byte task file (`timeout: *h`, h a list of ten of g, ... of ten strings) is
# 10^8 strings to repr(): a 500 MB error line after 20 s, and with one more level, no line at all.
_SHOWN = _Yaml()
_SHOWN.maxlevel = 2
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 5
_SHOWN.maxstring = _SHOWN.maxother = 200


def shown(value) -> str:
    return _SHOWN.repr(value)


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


class StateWriteError(OSError):
    """A file in the state directory could not be written (a full /tmp): named, as the task file's disk is not. The
    CLI says one that reaches it (the state directory itself could not be made or locked) in one line, exit 1."""


def said(exc: OSError) -> str:
    """An OSError in one line that names its file when it has one (`strerror` alone said "No such file or
    directory" of no file at all)."""
    what = exc.strerror or str(exc)
    return f"{exc.filename}: {what}" if exc.filename else what
