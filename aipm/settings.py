"""Settings: one typed, frozen object used by every command.

Precedence, lowest first: defaults < `<root>/aipm.yaml` (or `[tool.aipm]` in `<root>/pyproject.toml` when there is
no aipm.yaml) < environment (`AIPM_MAX_WORKERS`, ...) < command-line flags. Every value is checked where it enters;
a bad one raises SettingsError with one line naming the setting, where it came from and what is wrong.
"""

from __future__ import annotations

import os
import posixpath
import shlex
import string
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

from aipm import agents
from aipm.errors import SettingsError
from aipm.fields import MAX_COUNT, MAX_TIMEOUT, WORKSPACES, copy_globs
from aipm.store import DuplicateKey, load_yaml


@dataclass(frozen=True)
class Settings:
    max_workers: int = 5
    max_cpu_percent: float = 85.0
    max_memory_percent: float = 85.0
    enable_monitoring: bool = True
    enable_auto_scaling: bool = True
    max_attempts: int = 1
    max_rework: int = 3
    timeout: int | None = 1800  # seconds; None = no limit ("none"/null in aipm.yaml)
    orders_dir: str = "orders"
    worker_command: tuple[str, ...] = ("claude", "-p", "--model", "{model}")  # aipm.yaml worker.command
    worker_model: str = "sonnet"  # worker.model
    review_command: str | tuple[str, ...] | None = None  # review.command: a string runs in a shell, a list is argv
    scope_audit: bool = True  # in a git tree, a worker that writes outside its target_files fails its review
    scope_watch: bool = True  # run audits its own attempts from an inotify watch of the tree, not git status
    runner: str = "local"  # where workers run: "local" or "ray"
    ray_address: str | None = None  # ray.address (RAY_ADDRESS wins): the cluster for --runner ray, else auto
    worker_agent: str = "command"  # worker.agent: the preset for tasks without `command` (aipm.agents.NAMES)
    max_cost_usd: float | None = None  # budget of every order whose order.yaml sets none
    notify: str | tuple[str, ...] | None = None  # run when a task fails or is rejected, or an order stops or ends
    preempt: bool = False  # run: an urgent (P0/P1) task stops a lower-priority one that holds its files or slot
    confine: bool = False  # default for tasks without `confine`: Landlock confinement to the target files
    workspace: str = "shared"  # "shared" (the project tree) or "worktree" (a git worktree per task, merged back)
    workspace_setup: str | tuple[str, ...] | None = None  # run in a new worktree before the worker
    workspace_copy: tuple[str, ...] = ()  # globs of ignored files copied into a new worktree (.env, ...)
    # setting name -> where its value came from: "default", "aipm.yaml", "env AIPM_MAX_WORKERS", "flag --max-cpu", ...
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType(dict.fromkeys(SETTING_NAMES, "default")), compare=False, repr=False
    )


SETTING_NAMES = tuple(f.name for f in fields(Settings) if f.name != "sources")


# -- converters: a raw value (from YAML, TOML, the environment or a flag) -> a typed value, or ValueError ----------


def _number(value: Any, kind: type) -> Any:
    """`value` as an int or float, from a number or a string; None when it is neither (booleans are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, (str, int) if kind is int else (str, int, float)):
        return None
    if isinstance(value, str) and not value.isascii():  # int() would read "٣" (Arabic-Indic three) as 3
        return None
    try:
        return kind(value.strip() if isinstance(value, str) else value)
    except ValueError:
        return None


def _integer(minimum: int, what: str, maximum: int | None = MAX_COUNT) -> Callable[[Any], int]:
    def convert(value: Any) -> int:
        number = _number(value, int)
        if number is None or number < minimum:
            raise ValueError(f"{value!r} is not a {what} integer")
        if maximum is not None and number > maximum:
            raise ValueError(f"{value!r} is more than the maximum {maximum}")
        return number

    return convert


_positive, _non_negative = _integer(1, "positive"), _integer(0, "non-negative")
_seconds = _integer(1, "positive", maximum=None)  # the timeout has its own maximum and message


def _percent(value: Any) -> float:
    number = _number(value, float)
    if number is None or not 0 < number <= 100:  # NaN fails this test too
        raise ValueError(f"{value!r} is not a percentage above 0 and at most 100")
    return number


_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, (str, int)) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{value!r} is not a boolean (true/false, yes/no, on/off, 1/0)")


def _timeout(value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    try:
        seconds = _seconds(value)
    except ValueError:
        raise ValueError(f"{value!r} is not a positive number of seconds or none") from None
    if seconds > MAX_TIMEOUT:
        raise ValueError(f"{seconds} is more than the maximum {MAX_TIMEOUT} seconds (a week); or say none")
    return seconds


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{value!r} is not a non-empty string")
    return value


def _orders_dir(value: Any) -> str:
    """A directory inside the project, written relative to its root: orders are version-controlled with it, and
    every order path (locks, the audit, the view) is taken relative to the root."""
    text = _text(value)
    parts = posixpath.normpath(text.replace(os.sep, "/")).split("/")
    if os.path.isabs(text) or parts[0] == "..":
        raise ValueError(f"{text!r} is outside the project; give a directory relative to the project root")
    return text


def _argv(value: Any) -> tuple[str, ...]:
    """A command as argv: a list of strings, or a string split like a shell would."""
    if isinstance(value, str):
        try:
            value = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"{value!r} cannot be split into arguments: {exc}") from None
    if not isinstance(value, list) or not value or not all(isinstance(a, str) and a for a in value):
        raise ValueError(f"{value!r} is not a command (a non-empty list of strings, or a string)")
    return tuple(value)


# What aipm fills into worker.command: the worker module formats the template with exactly these.
PLACEHOLDERS = ("model", "task_id", "order_id", "prompt_file")


def _fields(text: str, inner: bool = False):
    """The placeholders in a format string, each as (name, whether it is nested in a format spec: `{model:{x}}`)."""
    for _, name, spec, _ in string.Formatter().parse(text):
        if name is not None:
            yield name, inner
            yield from _fields(spec or "", True)


def _template(value: Any) -> tuple[str, ...]:
    """worker.command: an argv whose only placeholders are PLACEHOLDERS, so a typo fails every command (exit 2)
    rather than each launch of a task that uses it."""
    argv = _argv(value)
    for part in argv:
        try:
            found = list(_fields(part))
            unknown = next((name for name, _ in found if name not in PLACEHOLDERS), None)
            # A spec made of a value (`{task_id:{model}}`) is a bad one for most values: no check here could pass it.
            inner = next((name for name, nested in found if nested), None)
            if unknown is None and inner is None:
                part.format(**dict.fromkeys(PLACEHOLDERS, ""))  # a format spec no string takes (`{model:d}`)
        except ValueError as exc:  # a lone brace, or that spec
            raise ValueError(f"{part!r}: {exc}; write {{{{ and }}}} for literal braces") from None
        if unknown is not None:
            raise ValueError(f"bad placeholder {{{unknown}}} in {part!r}; use {{model}}, {{task_id}}, {{order_id}} "
                             "or {prompt_file}")
        if inner is not None:
            raise ValueError(f"{{{inner}}} in a format spec in {part!r}; write each placeholder on its own")
    return argv


def _runner(value: Any) -> str:
    if value not in ("local", "ray"):
        raise ValueError(f"{value!r} is not a runner; use local or ray")
    return value


def _workspace(value: Any) -> str:
    if value in WORKSPACES:
        return value
    raise ValueError(f"{value!r} is not one of {', '.join(WORKSPACES)}")


def _review(value: Any) -> str | tuple[str, ...] | None:
    """A review command: null (no review), a string (run by the shell) or a list (argv)."""
    if value is None or isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list):
        return _argv(value)
    raise ValueError(f"{value!r} is not a command (a string, a list of strings, or null)")


def _agent(value: Any) -> str:
    if value not in agents.NAMES:
        raise ValueError(f"{value!r} is not one of {', '.join(agents.NAMES)}")
    return value


def _budget(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
        return None
    number = _number(value, float)
    if number is None or not 0 < number < float("inf"):
        raise ValueError(f"{value!r} is not a positive number of US dollars or none")
    return number


# Keys as written in aipm.yaml (dotted = nested) -> converter. The Settings field is the key with "." -> "_".
_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_workers": _positive,
    "max_cpu_percent": _percent,
    "max_memory_percent": _percent,
    "enable_monitoring": _boolean,
    "enable_auto_scaling": _boolean,
    "max_attempts": _positive,
    "max_rework": _non_negative,
    "timeout": _timeout,
    "orders_dir": _orders_dir,
    "worker.command": _template,
    "worker.model": _text,
    "review.command": _review,
    "scope_audit": _boolean,
    "scope_watch": _boolean,
    "runner": _runner,
    "ray.address": _text,
    "worker.agent": _agent,
    "max_cost_usd": _budget,
    "notify": _review,  # same shape as a review command: null, a string (shell) or a list (argv)
    "preempt": _boolean,
    "confine": _boolean,
    "workspace": _workspace,
    "workspace_setup": _review,
    "workspace_copy": copy_globs,
}
_FIELD_KEYS = {key.replace(".", "_"): key for key in _KEYS}
assert set(_FIELD_KEYS) == set(SETTING_NAMES)

# The command-line flag that sets a field, for messages and `aipm config`.
FLAG_NAMES = {
    "max_workers": "--max-workers",
    "max_cpu_percent": "--max-cpu",
    "max_memory_percent": "--max-memory",
    "enable_monitoring": "--no-resource-monitoring",
    "enable_auto_scaling": "--no-auto-scaling",
    "runner": "--runner",
    "confine": "--confine",
    "workspace": "--workspace",
}
ENV_VARS = {f"AIPM_{name.upper()}": name for name in FLAG_NAMES}  # AIPM_MAX_WORKERS, ...
ENV_VARS["RAY_ADDRESS"] = "ray_address"  # Ray's own variable: the environment layer of ray.address

# One layer of settings: field name -> (typed value, source label).
Layer = dict[str, tuple[Any, str]]


def _convert(name: str, value: Any, where: str) -> Any:
    try:
        return _KEYS[_FIELD_KEYS[name]](value)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _unknown(path: Path, key: str, known: list[str]) -> SettingsError:
    import difflib  # only for this message: loading the settings does without it

    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return SettingsError(f"{path}: {key}: unknown setting{hint}")


def _file_layer(path: Path, data: Any, source: str) -> Layer:
    """Check and convert the settings mapping read from `path` (aipm.yaml, or pyproject's [tool.aipm])."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    layer: Layer = {}
    top = sorted({key.split(".")[0] for key in _KEYS})
    for key, value in data.items():
        key = str(key)
        if key not in top:
            raise _unknown(path, key, top)
        if key in _KEYS:
            layer[key] = (_convert(key, value, f"{path}: {key}"), source)
            continue
        if value is None:  # `worker:` with nothing under it
            continue
        if not isinstance(value, dict):
            raise SettingsError(f"{path}: {key}: expected a mapping, got {type(value).__name__}")
        subkeys = sorted(k.split(".", 1)[1] for k in _KEYS if k.startswith(key + "."))
        for sub, subvalue in value.items():
            dotted = f"{key}.{sub}"
            if dotted not in _KEYS:
                raise _unknown(path, dotted, [f"{key}.{s}" for s in subkeys])
            name = dotted.replace(".", "_")
            layer[name] = (_convert(name, subvalue, f"{path}: {dotted}"), source)
    return layer


def _read_yaml(path: Path) -> Any:
    try:
        return load_yaml(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 (byte {exc.start}); save it as UTF-8") from None
    except DuplicateKey as exc:
        # Both lines look like the setting; the last would win silently.
        raise SettingsError(f"{path}:{exc.mark.line + 1}: {exc.key}: appears twice; keep one") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        raise SettingsError(f"{path}{at}: invalid YAML: {_one_line(exc.problem or exc.context or exc)}") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: invalid YAML: {_one_line(exc)}") from None


def _read_pyproject(path: Path) -> Any:
    if sys.version_info < (3, 11):  # no tomllib, and tomli is not a dependency: pyproject settings need 3.11+
        return None
    import tomllib

    try:
        with path.open("rb") as fh:
            return tomllib.load(fh).get("tool", {}).get("aipm")
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SettingsError(f"{path}: invalid TOML: {_one_line(exc)}") from None


def _config_layer(root: Path) -> Layer:
    config = root / "aipm.yaml"
    if config.exists():
        return _file_layer(config, _read_yaml(config), "aipm.yaml")
    pyproject = root / "pyproject.toml"
    if pyproject.is_file():
        return _file_layer(pyproject, _read_pyproject(pyproject), "pyproject.toml [tool.aipm]")
    return {}


def _env_layer(environ: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for var, name in ENV_VARS.items():
        value = environ.get(var)
        if var == "AIPM_WORKSPACE" and os.path.isabs(value or ""):
            continue  # inside a worker it names the worker's worktree (docs/workspaces.md), not a setting
        if value:  # unset or empty: not given
            layer[name] = (_convert(name, value, var), f"env {var}")
    return layer


def _flag_layer(flags: Mapping[str, object]) -> Layer:
    layer: Layer = {}
    for name, value in flags.items():
        if name not in _FIELD_KEYS:
            raise TypeError(f"load_settings: unknown setting {name!r} in flags")
        if value is not None:  # None: the flag was not given
            flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
            layer[name] = (_convert(name, value, flag), f"flag {flag}")
    return layer


def load_settings(
    root: Path, flags: Mapping[str, object] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """The effective settings for the project at `root`. Flags are keyed by field name; None means not given."""
    values: Layer = {}
    for layer in (_config_layer(Path(root)), _env_layer(os.environ if environ is None else environ),
                  _flag_layer(flags or {})):
        values.update(layer)
    sources = {name: values[name][1] if name in values else "default" for name in SETTING_NAMES}
    return Settings(**{name: value for name, (value, _) in values.items()}, sources=MappingProxyType(sources))


def setting_key(name: str) -> str:
    """How a field is spelled in aipm.yaml (`worker_command` -> `worker.command`)."""
    return _FIELD_KEYS[name]


def settings_from_flags(
    root: Path,
    max_workers: int | None = None,
    max_cpu: float | None = None,
    max_memory: float | None = None,
    no_monitoring: bool = False,
    no_auto_scaling: bool = False,
    runner: str | None = None,
    preempt: bool = False,
    confine: bool = False,
    workspace: str | None = None,
) -> Settings:
    """Settings for `root` with the resource flags on top (a flag not given leaves the lower layers alone)."""
    return load_settings(root, {
        "max_workers": max_workers,
        "max_cpu_percent": max_cpu,
        "max_memory_percent": max_memory,
        "enable_monitoring": False if no_monitoring else None,
        "enable_auto_scaling": False if no_auto_scaling else None,
        "runner": runner,
        "preempt": True if preempt else None,
        "confine": True if confine else None,
        "workspace": workspace,
    })
