"""Options and output shared by the command modules."""

from __future__ import annotations

import codecs
import errno
import gc
import json
import os
import stat
import sys
from contextlib import suppress
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, BinaryIO, Optional

from aipm.cli.decl import Option

from aipm.errors import UserError
from aipm.project import Project, find_root

if TYPE_CHECKING:
    from rich.console import Console

_state: dict[str, Any] = {"root": None}


def _print_version(value: bool) -> None:
    if value:
        from aipm import __version__
        from aipm.cli.decl import Exit

        print(f"aipm {__version__}")
        raise Exit(0)


def _root_callback(
    root: Optional[Path] = Option(
        # (\\[ escapes rich markup, which took "[tool.aipm]" for a style and dropped it)
        None, "--root", help="Project root (default: nearest aipm.yaml or pyproject.toml with \\[tool.aipm], else "
        "the git top level, else the cwd).",
        envvar="AIPM_ROOT_DIR",
    ),
    version: bool = Option(False, "--version", help="Print aipm's version and exit.", is_eager=True,
                           callback=_print_version),
) -> None:
    _state["root"] = root
    _observe()


def _observe() -> None:
    """This command writes its output into the project's tree (`nohup aipm ui &`, `aipm status > s.txt`): it is an
    observer until it ends (observers.py), so audits in flight charge none of it to a worker. Two fstat calls
    when it writes to a terminal or a pipe."""
    for fd in (1, 2):
        with suppress(OSError):
            if stat.S_ISREG(os.fstat(fd).st_mode):
                break
    else:
        return
    try:
        root = project_root()
    except (UserError, OSError):
        return  # the command says what is wrong with the root
    from aipm import observers

    observers.begin(root)
    _state["observing"] = True


def observed_end() -> None:
    """The command is done writing (see _observe)."""
    if _state.pop("observing", False):
        from aipm import observers

        observers.end()


def project_root(create: Callable[[Path], object] | None = None) -> Path:
    """The project root: --root (or AIPM_ROOT_DIR), which must be a directory (for `init`, made if missing once
    `create(path)` has raised nothing: a bad setting changes nothing), else found from the working directory."""
    root = _state["root"]
    if not root:
        return find_root()
    path = Path(root).resolve()
    if create is not None and not path.exists():
        create(path)
        try:
            path.mkdir(parents=True)
        except OSError as exc:
            raise UserError(f"project root {root} (--root or AIPM_ROOT_DIR): cannot create it: {exc.strerror}") from None
    try:
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
        what = "not a directory"
    except OSError as exc:  # (a name too long for a file was a traceback)
        is_dir = False
        what = exc.strerror if exc.errno != errno.ENOENT else \
            "no such directory (`aipm --root DIR init` makes a project there)"
    if not is_dir:
        raise UserError(f"project root {root} (--root or AIPM_ROOT_DIR): {what}")
    return path


# A width no table reaches: each column as wide as its widest cell, every line whole.
UNLIMITED = 10**6


def console(stderr: bool = False) -> Console:
    from rich.console import Console  # here: JSON output never needs rich

    # Rich honours NO_COLOR itself; no colour or markup tricks when not a terminal.
    out = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not out.is_terminal and not os.environ.get("COLUMNS", "").isdecimal():
        # A pipe or a file has no width to fit. Rich takes 80 columns (or the width of a terminal on stdin, so
        # a file's content would depend on where it was made) and then breaks words inside narrow cells
        # (`superviso` / `r`). Like git and kubectl, print whole lines instead; `less -S` scrolls them, and
        # COLUMNS (read by Rich) still sets a width.
        out.width = UNLIMITED
    return out


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=_indent(), default=str) + "\n")


def _indent() -> int | None:
    # Indented for a person at a terminal; compact for a pipe, where json's C encoder is many times faster.
    return 2 if sys.stdout.isatty() else None


# What a log or patch is copied out by: never whole in memory, a worker's file may be gigabytes (or a sparse terabyte)
_CHUNK = 1 << 20


def copy_out(handle: BinaryIO) -> None:
    """The rest of `handle` to stdout, a chunk at a time."""
    while chunk := handle.read(_CHUNK):
        sys.stdout.buffer.write(chunk)
    sys.stdout.flush()


def print_json_text(data: dict, key: str, handle: BinaryIO, *more: tuple[str, BinaryIO]) -> None:
    """print_json(`data` and, after it, `key` (not in `data`): the rest of `handle` as text, UTF-8 with errors
    replaced; and so each (key, handle) of `more`), each text encoded a chunk at a time (the same JSON: a string's
    escapes are those of its characters one by one)."""
    texts = [(key, handle), *more]
    mark = f"\0{os.urandom(8).hex()}"  # (in place of each text: no value of `data` holds it)
    whole = json.dumps({**data, **{k: f"{mark}{n}" for n, (k, _) in enumerate(texts)}}, indent=_indent(),
                       default=str)
    for n, (_, text) in enumerate(texts):
        before, whole = whole.split(json.dumps(f"{mark}{n}"), 1)
        sys.stdout.write(before + '"')
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := text.read(_CHUNK):
            sys.stdout.write(json.dumps(decoder.decode(chunk))[1:-1])
        sys.stdout.write(json.dumps(decoder.decode(b"", final=True))[1:-1] + '"')
    sys.stdout.write(whole + "\n")


def warn(lines: list[str]) -> None:
    """Warnings go to stderr, one line each, and change neither the exit code nor the output on stdout."""
    for line in lines:
        print(f"aipm: warning: {line}", file=sys.stderr)


def read_only() -> None:
    """For commands that read, print and exit: the cyclic GC would only rescan the order just loaded (for 10k
    tasks it costs about as much as planning), and the process ends before any garbage matters. Such a process
    may parse a big order in forked readers (aipm.readers)."""
    from aipm import readers

    gc.disable()
    readers.allow()


def json_option(instead: str, what: str = "machine-readable JSON") -> Any:
    """`--json`, whose help names what the command prints without it: not every command prints a table."""
    return Option(False, "--json", help=f"Print {what} instead of {instead}.")


JsonOpt = json_option("a table")


def get_project() -> Project:
    from aipm.settings import load_settings

    root = project_root()
    return Project(root, load_settings(root).orders_dir)

