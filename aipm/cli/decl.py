"""Command declarations without importing Typer.

The command modules declare their parameters with `Option` and `Argument` (the arguments `typer.Option` and
`typer.Argument` take) and register with `@command()`. The plain forms of the commands scripts and builds run
(cli.__init__.DIRECT) read these declarations and call the function directly; only a command line that needs
Typer's parsing (help, completion, an unusual form) imports Typer, which then gets the same declarations as
real Typer parameters (cli.__init__.typer_app). Importing Typer costs ~30 ms, a fifth of a short command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Keyword arguments that only shape help: any other (callback, envvar, ...) sends a command line through Typer.
HELP_ONLY = frozenset({"help", "show_default", "metavar", "hidden", "rich_help_panel"})


class Param:
    """typer.Option(default, *decls, **kw) or typer.Argument(default, **kw), recorded."""

    def __init__(self, kind: str, default: Any, decls: tuple[str, ...], kw: dict[str, Any]):
        self.kind, self.default, self.decls, self.kw = kind, default, decls, kw

    @property
    def plain(self) -> bool:
        """Read on the direct path exactly as Typer reads it (no callback, environment variable, range, ...)."""
        return set(self.kw) <= HELP_ONLY


def Option(default: Any, *decls: str, **kw: Any) -> Param:  # noqa: N802 - spelled as Typer's
    return Param("option", default, decls, kw)


def Argument(default: Any, **kw: Any) -> Param:  # noqa: N802 - spelled as Typer's
    return Param("argument", default, (), kw)


class Exit(SystemExit):
    """End the command with this exit code (typer.Exit's role; a SystemExit, so Typer lets it through)."""

    def __init__(self, code: int = 0):
        super().__init__(code)
        self.exit_code = code


COMMANDS: list[tuple[str | None, Callable[..., None]]] = []  # (name given, function), in declaration order


def command(name: str | None = None) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a command function (`@app.command(name)` in Typer's terms: no name, Typer derives it)."""
    def register(function: Callable[..., None]) -> Callable[..., None]:
        COMMANDS.append((name, function))
        return function
    return register


def find(name: str) -> Callable[..., None] | None:
    """The function of a command whose name is given or is its function's name (the DIRECT commands')."""
    return next((f for given, f in COMMANDS if (given or f.__name__) == name), None)
