"""Settings: one typed, frozen object used by every command.

Precedence, lowest first: defaults < `<root>/aipm.yaml` (or `[tool.aipm]` in `<root>/pyproject.toml` when there is
no aipm.yaml) < environment (`AIPM_MAX_WORKERS`, ...) < command-line flags. Every value is checked where it enters;
a bad one raises SettingsError with one line naming the setting, where it came from and what is wrong.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Mapping

import yaml

from aipm import settingvalues as values
from aipm.errors import SettingsError, ValidationError, did_you_mean, shown
from aipm.fields import copy_globs
from aipm.yamlkinds import kind, reading
from aipm.store import MAX_FILE_BYTES, DuplicateKey, load_yaml, read_text
from aipm.workerfiles import read_bytes


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
    scope_ignore: tuple[str, ...] = ()  # globs the audit never charges: files a person edits during runs
    runner: str = "local"  # where workers run: "local" or "ray"
    ray_address: str = "auto"  # ray.address (RAY_ADDRESS wins): the cluster for --runner ray; auto: one on this machine
    worker_agent: str = "command"  # worker.agent: the preset for tasks without `command` (aipm.agents.NAMES)
    max_cost_usd: float | None = None  # budget of every order whose order.yaml sets none
    notify: str | tuple[str, ...] | None = None  # run when a task fails, is rejected, needs a person; an order ends
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


# Keys as written in aipm.yaml (dotted = nested) -> converter. The Settings field is the key with "." -> "_".
_KEYS: dict[str, Callable[[Any], Any]] = {
    "max_workers": values.positive,
    "max_cpu_percent": values.percent,
    "max_memory_percent": values.percent,
    "enable_monitoring": values.boolean,
    "enable_auto_scaling": values.boolean,
    "max_attempts": values.positive,
    "max_rework": values.non_negative,
    "timeout": values.timeout,
    "orders_dir": values.orders_dir,
    "worker.command": values.template,
    "worker.model": values.text,
    "review.command": values.review,
    "scope_audit": values.boolean,
    "scope_watch": values.boolean,
    "scope_ignore": copy_globs,
    "runner": values.runner,
    "ray.address": values.text,
    "worker.agent": values.agent,
    "max_cost_usd": values.budget,
    "notify": values.review,  # same shape as a review command: null, a string (shell) or a list (argv)
    "preempt": values.boolean,
    "confine": values.boolean,
    "workspace": values.workspace,
    "workspace_setup": values.review,
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
    "preempt": "--preempt",  # (AIPM_PREEMPT=false: a run without the preemption aipm.yaml turns on)
    "confine": "--confine",
    "workspace": "--workspace",
}
ENV_VARS = {f"AIPM_{name.upper()}": name for name in FLAG_NAMES}  # AIPM_MAX_WORKERS, ...
ENV_VARS["RAY_ADDRESS"] = "ray_address"  # Ray's own variable: the environment layer of ray.address

# One layer of settings: field name -> (typed value, source label).
Layer = dict[str, tuple[Any, str]]


def _convert(name: str, value: Any, where: str, language: str = "YAML") -> Any:
    """The setting's typed value; `language`: what its file was read as, which the error's fix names."""
    said = reading.set(language)
    try:
        return _KEYS[_FIELD_KEYS[name]](value)
    except ValueError as exc:
        raise SettingsError(f"{where}: {exc}") from None
    finally:
        reading.reset(said)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _unknown(path: Path, key: str, known: list[str]) -> SettingsError:
    hint = did_you_mean(key, known) or f"; known keys: {', '.join(known)}"
    return SettingsError(f"{path}: {key}: unknown setting{hint}")


def _nested_command(path: Path, key: str, subkeys: list[str], value: Any) -> str:
    """The fix for `review: make check` (a task file's form) in the settings, where the command is `review.command`
    (shown values are valid TOML too)."""
    if "command" not in subkeys:
        return ""
    try:
        values.review(value)
    except ValueError:  # no command either
        return ""
    return "; write " + (f"{key} = {{command = {shown(value)}}}" if path.suffix == ".toml"
                         else f"{key}: {{command: {shown(value)}}}")


def _file_layer(path: Path, data: Any, source: str) -> Layer:
    """Check and convert the settings mapping read from `path` (aipm.yaml, or pyproject's [tool.aipm])."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        where = f"{path}: tool.aipm" if path.suffix == ".toml" else str(path)  # `[tool] aipm = 3` named no field
        raise SettingsError(f"{where}: must be a mapping of settings, not {kind(data)}")
    layer: Layer = {}
    language = "TOML" if path.suffix == ".toml" else "YAML"
    top = sorted({key.split(".")[0] for key in _KEYS})
    for key, value in data.items():
        key = str(key)
        if key not in top:
            raise _unknown(path, key, top)
        if key in _KEYS:
            layer[key] = (_convert(key, value, f"{path}: {key}", language), source)
            continue
        if value is None:  # `worker:` with nothing under it
            continue
        subkeys = sorted(k.split(".", 1)[1] for k in _KEYS if k.startswith(key + "."))
        if not isinstance(value, dict):
            raise SettingsError(f"{path}: {key}: must be a mapping (of {', '.join(f'{key}.{s}' for s in subkeys)}), "
                                f"not {shown(value)}" + _nested_command(path, key, subkeys, value))
        for sub, subvalue in value.items():
            dotted = f"{key}.{sub}"
            if dotted not in _KEYS:
                raise _unknown(path, dotted, [f"{key}.{s}" for s in subkeys])
            name = dotted.replace(".", "_")
            layer[name] = (_convert(name, subvalue, f"{path}: {dotted}", language), source)
    return layer


def _read_yaml(path: Path) -> Any:
    try:
        # A regular file (a FIFO there hung every command), through a symlink: `aipm.yaml -> ci/aipm.yaml` was
        # "cannot read: Too many levels of symbolic links" to every command, and `init` wrote through a link to
        # nothing, wherever it led.
        return load_yaml(read_text(path))
    except ValidationError as exc:  # cannot read, not a regular file, not UTF-8, over 1 MiB
        raise SettingsError(str(exc)) from None
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
    # tomli is tomllib before 3.11 (a dependency there): without it, 3.10 ignored [tool.aipm] silently and `init`
    # wrote an aipm.yaml that hid those settings for good.
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib

    try:
        # As aipm.yaml is read: a worker's FIFO or sparse terabyte there hung or was read whole by every command.
        tool = tomllib.loads(read_text(path)).get("tool")
    except ValidationError as exc:  # cannot read, not a regular file, not UTF-8, over 1 MiB
        raise SettingsError(str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {_one_line(exc)}") from None
    # `tool = 3` or `[[tool]]` (not the table PEP 518 asks for) is another tool's broken file and holds no
    # [tool.aipm]: it ended every command below it in an AttributeError traceback.
    return tool.get("aipm") if isinstance(tool, dict) else None


def in_pyproject(root: Path) -> bool:
    """Whether the project's settings are `[tool.aipm]` in pyproject.toml (and there is no aipm.yaml to hide them)."""
    pyproject = Path(root) / "pyproject.toml"
    return not (Path(root) / "aipm.yaml").exists() and pyproject.exists() and _read_pyproject(pyproject) is not None


def hidden_pyproject(root: Path) -> bool:
    """Whether pyproject.toml has a [tool.aipm] that aipm.yaml hides: aipm.yaml is read instead, never merged, so
    settings put there after `aipm init` wrote an aipm.yaml were ignored without a word."""
    pyproject = Path(root) / "pyproject.toml"
    if not (Path(root) / "aipm.yaml").exists() or not pyproject.is_file():
        return False
    try:
        return _read_pyproject(pyproject) is not None
    except SettingsError:  # a broken pyproject.toml is not read at all here: none of ours
        return False


def holds_settings(directory: Path) -> bool:
    """Whether `directory` is a project's root by its settings: aipm.yaml, or pyproject.toml's [tool.aipm]. A
    pyproject.toml that does not parse counts when it names tool.aipm, so its error is told (not another root
    taken), and not otherwise: a broken one of another tool's package on the way up is none of ours."""
    if (directory / "aipm.yaml").is_file():
        return True
    try:
        return in_pyproject(directory)
    except SettingsError:
        try:
            return b"tool.aipm" in read_bytes(directory / "pyproject.toml", MAX_FILE_BYTES)
        except OSError:  # unreadable (another user's, on the way up; no file, or over 1 MiB): no project we could run
            return False


def _config_layer(root: Path) -> Layer:
    config = root / "aipm.yaml"
    if config.exists():
        return _file_layer(config, _read_yaml(config), "aipm.yaml")
    if config.is_symlink():  # a link to nothing: its settings were meant, and every default taken silently instead
        raise SettingsError(f"{config}: a link to nothing ({os.readlink(config)}); give it its file, or remove it")
    pyproject = root / "pyproject.toml"
    if pyproject.exists():  # what is not a file there is named, as for aipm.yaml (not taken for no settings)
        return _file_layer(pyproject, _read_pyproject(pyproject), "pyproject.toml [tool.aipm]")
    return {}


def _env_layer(environ: Mapping[str, str]) -> Layer:
    layer: Layer = {}
    for var, name in ENV_VARS.items():
        value = environ.get(var)
        if var == "AIPM_WORKSPACE" and os.path.isabs(value or ""):
            continue  # inside a worker it names the worker's worktree (docs/workspaces.md), not a setting
        if var == "RAY_ADDRESS" and not (value or "").strip():
            continue  # Ray's own variable, set by other tools: a blank one must not stop commands that use no Ray
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
