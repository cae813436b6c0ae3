"""The `aipm` command line: Typer commands that parse, call one function and print. No logic lives here."""

from __future__ import annotations

import os
import sys

import typer

from aipm.errors import UserError

app = typer.Typer(
    name="aipm",
    help="Run the tasks of an order (YAML files) in parallel: dependencies, file locks, review, recovery.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

# Command modules register themselves on `app` when imported.
from aipm.cli import common  # noqa: E402

app.callback()(common._root_callback)


# The module that defines each command: a command imports only its own module, since imports are most of a
# short command's time. Only a shortcut: a name missing here (or none, e.g. `aipm --help`) loads every module.
COMMAND_MODULES = {
    "detect": "cmd_detect", "why": "cmd_detect", "diff": "cmd_diff", "graph": "cmd_graph",
    "launch": "cmd_launch", "run": "cmd_launch", "exec": "cmd_launch",
    "init": "cmd_project", "validate": "cmd_project", "status": "cmd_project",
    "schema": "cmd_scaffold", "new": "cmd_scaffold", "add": "cmd_scaffold",
    "config": "cmd_settings", "resources": "cmd_settings", "ui": "cmd_ui",
    "ps": "cmd_workers", "locks": "cmd_workers", "logs": "cmd_workers", "cancel": "cmd_workers",
    "retry": "cmd_workers", "recover": "cmd_workers",
}


def _command_name(argv: list[str]) -> str | None:
    """The command named on the command line: the first word that is no option of `aipm` itself."""
    words = iter(argv)
    for word in words:
        if word == "--root":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def _load_commands(argv: list[str] | None = None) -> None:
    import importlib
    import os
    import pkgutil

    import aipm.cli as pkg

    completing = any(key.startswith("_AIPM_COMPLETE") for key in os.environ)
    module = None if argv is None or completing else COMMAND_MODULES.get(_command_name(argv) or "")
    if module is not None:
        importlib.import_module(f"aipm.cli.{module}")
        return
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"aipm.cli.{info.name}")


def _polled(argv: list[str]) -> tuple[str | None, str, str] | None:
    """(root, command, order) when argv is exactly `[--root DIR] detect|status ORDER --json`, else None.

    That is the form scripts poll, and Typer's argument coercion alone (it imports pydantic) costs a third of
    such a command on a big order. Nothing else is recognised here: every other form, option or spelling, and
    AIPM_ROOT_DIR in the environment, go through Typer.
    """
    root = None
    if argv[:1] == ["--root"] and len(argv) > 1:
        root, argv = argv[1], argv[2:]
    if "AIPM_ROOT_DIR" in os.environ or len(argv) != 3 or argv[0] not in ("detect", "status"):
        return None
    command, order, flag = argv
    if flag != "--json" or order.startswith("-") or not order or (root is not None and not root):
        return None
    return root, command, order


def _run_polled(root: str | None, command: str, order: str) -> None:
    """The command function itself, with the values Typer would hand it for that form."""
    from pathlib import Path

    common._root_callback(Path(root) if root is not None else None)
    if command == "detect":
        from aipm.cli.cmd_detect import detect

        detect(order, summary=False, max_workers=None, json_out=True)
    else:
        from aipm.cli.cmd_project import status

        status(order, wide=False, json_out=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point. Typer handles usage errors (exit 2) and Ctrl-C (exit 130); user errors become one line."""
    args = sys.argv[1:] if argv is None else argv
    try:
        polled = _polled(args)
        if polled is not None:
            try:
                _run_polled(*polled)
                sys.stdout.flush()
            except KeyboardInterrupt:
                sys.exit(130)
            except BrokenPipeError:  # `| head`: as Typer does, exit 1 without a traceback
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
            return
        _load_commands(args)
        app(args=argv, prog_name="aipm")
    except UserError as exc:
        print(f"aipm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
