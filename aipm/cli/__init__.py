"""The `aipm` command line: Typer commands that parse, call one function and print. No logic lives here."""

from __future__ import annotations

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


def main(argv: list[str] | None = None) -> None:
    """Entry point. Typer handles usage errors (exit 2) and Ctrl-C (exit 130); user errors become one line."""
    _load_commands(sys.argv[1:] if argv is None else argv)
    try:
        app(args=argv, prog_name="aipm")
    except UserError as exc:
        print(f"aipm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
