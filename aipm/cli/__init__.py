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


def _load_commands() -> None:
    import importlib
    import pkgutil

    import aipm.cli as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("cmd_"):
            importlib.import_module(f"aipm.cli.{info.name}")


def main(argv: list[str] | None = None) -> None:
    """Entry point. Typer handles usage errors (exit 2) and Ctrl-C (exit 130); user errors become one line."""
    _load_commands()
    try:
        app(args=argv, prog_name="aipm")
    except UserError as exc:
        print(f"aipm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
