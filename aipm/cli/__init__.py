"""The `aipm` command line: Typer commands that parse, call one function and print. No logic lives here."""

from __future__ import annotations

import sys

import click
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
    """Entry point: turn user errors into one line and exit 2; Ctrl-C into exit 130."""
    _load_commands()
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="aipm", standalone_mode=False)
    except UserError as exc:
        print(f"aipm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(130)
    except KeyboardInterrupt:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(code if isinstance(code, int) else 0)
