"""The `aipm` command line: Typer commands that parse, call one function and print. No logic lives here."""

from __future__ import annotations

import gc
import os
import sys

from aipm.cli import decl
from aipm.errors import StateWriteError, UserError


def typer_app():
    """The Typer application, with every command module's declarations made Typer parameters (see decl.py).
    Built only for a command line the direct path does not read."""
    import typer
    from typer.core import TyperCommand, TyperGroup

    from aipm.cli import common

    app = typer.Typer(
        cls=_flags_read_as_flags(TyperGroup),
        name="aipm",
        help="Run the tasks of an order (YAML files) in parallel: dependencies, file locks, review, recovery.",
        no_args_is_help=True,
        add_completion=True,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_typer_function(common._root_callback))
    for name, function in decl.COMMANDS:
        app.command(name, cls=_flags_read_as_flags(TyperCommand), help=_prose(function.__doc__))(
            _typer_function(function))
    return app


def _prose(doc: str | None) -> str | None:
    """A docstring as help: each paragraph one line, for the terminal to wrap. Typer's rich help keeps every line
    break of the source, so a paragraph wrapped at 116 columns came out ragged at any other width."""
    if doc is None:
        return None
    import inspect

    return "\n\n".join(" ".join(part.split()) for part in inspect.cleandoc(doc).split("\n\n"))


def _flags_read_as_flags(cls):
    """`cls` whose help shows a flag as a flag: Typer's rich help gives every option a type cell, `<bool>` for a
    flag (ours, `--help` and the completion options included), which reads as if the flag took a value."""
    class FlagsReadAsFlags(cls):
        def get_params(self, ctx):
            params = super().get_params(ctx)
            for param in params:
                if getattr(param, "is_flag", False) and param.metavar is None:
                    param.metavar = ""  # an empty type cell; a flag's usage and errors show no metavar
            return params
    return FlagsReadAsFlags


def _typer_function(function):
    """`function` as Typer reads a command: its decl.Param defaults made typer.Option/typer.Argument."""
    import functools
    import inspect

    import typer

    def typer_param(param: decl.Param, annotation):
        kw = _numbers_read_as_settings(annotation, param.kw)
        if param.kind == "argument":
            return typer.Argument(param.default, **kw)
        return typer.Option(param.default, *param.decls, **kw)

    signature = inspect.signature(function, eval_str=True)
    params = [p.replace(default=typer_param(p.default, p.annotation)) if isinstance(p.default, decl.Param) else p
              for p in signature.parameters.values()]

    @functools.wraps(function)
    def typer_function(**values):
        return function(**values)

    typer_function.__signature__ = signature.replace(parameters=params)
    return typer_function


def _numbers_read_as_settings(annotation, kw: dict) -> dict:
    """Typer's keyword arguments for a parameter, with an int or float one (Optional or not) read as a setting is
    (settingvalues.number: ASCII digits, no `_`, no inf or nan). Click's own number types are int() and float(),
    which read `--max-workers ٣` as 3 and `1_0` as 10 where AIPM_MAX_WORKERS=٣ is refused; the refusal keeps
    Click's wording (`'٣' is not a valid integer.`), a usage error like any other bad value."""
    import types as pytypes
    import typing

    union = typing.get_origin(annotation) in (typing.Union, pytypes.UnionType)
    kinds = set(typing.get_args(annotation) if union else (annotation,)) - {type(None)}
    if kinds not in ({int}, {float}):
        return kw
    from aipm.settingvalues import number

    (kind,) = kinds

    def read(value):
        found = number(value, kind)
        if found is None:
            raise ValueError(value)  # the base class turns it into its usage error
        return found

    click_types, kw = _click_module("types"), dict(kw)
    bounds = {key: kw.pop(key) for key in ("min", "max", "clamp") if key in kw}  # Typer ignores them beside click_type
    if "min" in bounds or "max" in bounds:
        base = click_types.IntRange if kind is int else click_types.FloatRange
    else:
        base, bounds = (click_types.IntParamType if kind is int else click_types.FloatParamType), {}
    kw["click_type"] = type(base.__name__, (base,), {"_number_class": staticmethod(read)})(**bounds)
    return kw


# The module that defines each command: a command imports only its own module, since imports are most of a
# short command's time. Only a shortcut: a name missing here (or none, e.g. `aipm --help`) loads every module.
COMMAND_MODULES = {
    "detect": "cmd_detect", "why": "cmd_detect", "diff": "cmd_diff", "graph": "cmd_graph",
    "launch": "cmd_launch", "run": "cmd_launch", "exec": "cmd_launch",
    "init": "cmd_project", "validate": "cmd_project", "status": "cmd_project",
    "schema": "cmd_scaffold", "new": "cmd_scaffold", "add": "cmd_scaffold",
    "config": "cmd_settings", "resources": "cmd_settings", "ui": "cmd_ui",
    "ps": "cmd_workers", "locks": "cmd_workers", "logs": "cmd_watching", "cancel": "cmd_workers",
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


# Commands whose common forms skip Typer altogether (its import and its parsing cost more than a short command
# does: `detect`/`status` polled by scripts, `run` of a build; `ps` 0.54 -> 0.10 s, `why` 0.82 -> 0.36 s on an
# order of 10,000 tasks; `config` 0.44 -> 0.16 s). Others go through Typer.
DIRECT = ("detect", "status", "run", "launch", "exec", "ps", "locks", "validate", "why", "diff", "config", "cancel",
          "retry", "recover")
# Parameter types read here exactly as Typer reads them (bool: a flag; int, float: _read; str: the word).
_TYPES = {"bool": bool, "int": int, "float": float, "str": str,
          "Optional[int]": int, "Optional[float]": float, "Optional[str]": str}


def _direct(argv: list[str]) -> tuple[str | None, object, dict] | None:
    """(root, command function, its arguments) when argv is a plain form of a DIRECT command, else None.

    Plain: `[--root DIR] COMMAND` then its arguments and its options, in any order, each option once, spelled as
    declared (`--max-workers 2`, `--json`), with values of the declared type. Anything else (`--opt=v`, `--`,
    `--help`, a short cluster, a missing or extra argument, a bad value, AIPM_ROOT_DIR in the environment, an
    option with a callback, range, environment variable or an unlisted type) goes through Typer, whose answer
    (usage errors included) is the reference.
    """
    import importlib
    import inspect

    root = None
    if argv[:1] == ["--root"] and len(argv) > 1 and argv[1]:
        root, argv = argv[1], argv[2:]
    completing = any(key.startswith("_AIPM_COMPLETE") for key in os.environ)
    if "AIPM_ROOT_DIR" in os.environ or completing or not argv or argv[0] not in DIRECT:
        return None
    importlib.import_module(f"aipm.cli.{COMMAND_MODULES[argv[0]]}")  # declares the command (decl.COMMANDS)
    function = decl.find(argv[0])
    options: dict[str, tuple[str, type]] = {}
    positional: list[tuple[str, type, object]] = []
    values: dict[str, object] = {}
    for name, param in inspect.signature(function).parameters.items():
        info, kind = param.default, _TYPES.get(str(param.annotation))
        if not (isinstance(info, decl.Param) and info.plain and kind is not None):
            return None
        if info.kind == "argument":
            positional.append((name, kind, info.default))
            continue
        if not info.decls or any("/" in d or not d.startswith("--") for d in info.decls):
            return None
        values[name] = info.default
        options.update((decl_, (name, kind)) for decl_ in info.decls)
    words = iter(argv[1:])
    given: set[str] = set()
    args: list[str] = []
    for word in words:
        if not word.startswith("-"):
            args.append(word)
            continue
        name, kind = options.get(word, (None, None))
        if name is None or name in given:
            return None
        given.add(name)
        if kind is bool:
            values[name] = True
            continue
        value = next(words, None)
        found = None if value is None or value.startswith("-") else _read(kind, value)
        if found is None:  # a missing or bad value: Typer's usage error
            return None
        values[name] = found
    if len(args) > len(positional) or any(d is ... for _, _, d in positional[len(args):]):
        return None
    read = [_read(kind, word) for (_, kind, _), word in zip(positional, args)]
    if None in read:
        return None
    values.update((name, value) for (name, _, _), value in zip(positional, read))
    values.update((name, d) for name, _, d in positional[len(args):])
    return root, function, values


def _read(kind: type, word: str):
    """A word as a value of `kind`, as Typer reads it (numbers: as _numbers_read_as_settings has Typer read them,
    so `--max-workers ٣` is refused as AIPM_MAX_WORKERS=٣ is, not taken as 3 by int()); None when it is no such
    value."""
    if kind not in (int, float):
        return kind(word)
    from aipm.settingvalues import number  # loaded with the settings by every direct command

    return number(word, kind)


def _run_direct(root: str | None, function, values: dict) -> None:
    """The command function itself, with the values Typer would hand it (its decl.Exit is a SystemExit)."""
    from pathlib import Path

    from aipm.cli import common

    common._root_callback(Path(root) if root is not None else None)
    function(**values)


def _click_module(name: str):
    """A module of the click that Typer runs on (`exceptions`, `types`): vendored in Typer since 0.2x, the package
    before."""
    import importlib

    try:
        return importlib.import_module(f"typer._click.{name}")
    except ImportError:
        return importlib.import_module(f"click.{name}")


def _orders_hint() -> str:
    """For a command run without its ORDER: the orders there are (a first-time user types `aipm run`)."""
    from aipm.cli.common import get_project

    try:
        return f" ({get_project().orders_here()})"
    except (UserError, OSError):
        return ""  # no project to look in: the usage hint alone


def _run_typer(args: list[str]) -> int:
    """Typer's answer for args, as an exit code. Its usage errors (a bad value, an unknown option, a missing
    argument) are one line, as every other bad input is, instead of its boxed usage text."""
    import typer

    exceptions = _click_module("exceptions")
    try:
        result = typer_app()(args=args, prog_name="aipm", standalone_mode=False)
    except getattr(exceptions, "NoArgsIsHelpError", ()) as exc:  # a bare `aipm`/`aipm new`: the help is the answer
        exc.show()
        return exc.exit_code
    except exceptions.ClickException as exc:
        where = exc.ctx.command_path if getattr(exc, "ctx", None) is not None else "aipm"
        message = " ".join(exc.format_message().split())
        hint = f" (see '{where} --help')" if isinstance(exc, exceptions.UsageError) else ""
        if getattr(exc, "option_name", None) == "--root" and where != "aipm":  # `aipm run --root`: absent there
            hint = f" (--root goes before the command: aipm --root DIR {exc.ctx.info_name} ...)"
        elif isinstance(exc, exceptions.MissingParameter) and getattr(exc.param, "name", "") == "order" and (
                exc.ctx.info_name != "new"):  # `new` wants an id that is not there yet
            hint = _orders_hint() or hint
        prefix = "" if where == "aipm" else f"{where}: "  # `aipm: error: aipm: No such command` said it twice
        print(f"aipm: error: {prefix}{message}{hint}", file=sys.stderr)
        return exc.exit_code
    except typer.Abort:
        print("Aborted!", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0  # Typer returns an Exit's code (--help, Ctrl-C) in this mode


def main(argv: list[str] | None = None) -> None:
    """The command line (aipm.main runs it, and turns an interrupt outside a command's own handling into exit 130).
    Typer handles usage errors (exit 2) and Ctrl-C in its commands (exit 130); user errors become one line."""
    args = sys.argv[1:] if argv is None else argv
    for name, least in (("COLUMNS", 20), ("LINES", 0)):  # Rich reads them with isdigit() then int(): "²" was a
        size = os.environ.get(name, str(least))  # traceback; COLUMNS=0 broke every word of a table into letters
        if not (size.isdecimal() and int(size) >= least):
            del os.environ[name]  # not a size: as if unset, as ls(1) takes it
    if "AIPM_TASK_ID" in os.environ:  # run by a worker's command: it may have handed us its locks
        from aipm.statedir import keep_inherited_locks

        keep_inherited_locks()
    try:
        # The start-up imports make ~25k container objects that live as long as the process: the cyclic GC would
        # only scan them again and again (~5 ms of a `run`'s start). Off while they load; then left out for good.
        collecting = gc.isenabled()
        gc.disable()
        try:
            direct = _direct(args)
        finally:
            gc.freeze()
            if collecting:
                gc.enable()
        if direct is not None:
            try:
                try:
                    _run_direct(*direct)
                    code = 0
                except SystemExit as exc:
                    code = exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
                sys.stdout.flush()
                sys.stderr.flush()
            except BrokenPipeError:  # `| head`: as Typer does, exit 1 without a traceback
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                sys.exit(1)
            # Done, and everything written is flushed or closed: skip the interpreter's teardown of every
            # module (~20 ms, the tail of every `run` of a build and of every polled `status`).
            _observed_end()
            os._exit(code)
        _load_commands(args)
        sys.exit(_run_typer(args))
    except UserError as exc:
        print(f"aipm: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except StateWriteError as exc:  # the state directory itself could not be made or locked (/tmp full, read-only)
        print(f"aipm: error: {exc.filename}: {exc.strerror}; aipm keeps its locks, worker records and exit codes "
              "there: make room (or make it writable) and run the command again", file=sys.stderr)
        sys.exit(1)
    finally:
        _observed_end()  # after its last line


def _observed_end() -> None:
    common = sys.modules.get("aipm.cli.common")  # (not loaded: no command ran, nothing observed)
    if common is not None:
        common.observed_end()
