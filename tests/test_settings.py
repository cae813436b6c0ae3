"""Settings: precedence default < aipm.yaml (or pyproject [tool.aipm]) < environment < flags, and every bad value
is one line on stderr and exit 2, checked through the real CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from aipm.errors import SettingsError
from aipm.settings import SETTING_NAMES, Settings, load_settings
from conftest import capped_memory


def aipm(root: Path, *args: str, env: dict[str, str] | None = None, preexec_fn=None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIPM_")}
    return subprocess.run(
        [sys.executable, "-m", "aipm", "--root", str(root), *args],
        capture_output=True, text=True, env={**clean, **(env or {})}, cwd=root, timeout=120, preexec_fn=preexec_fn,
    )


def effective(root: Path, *flags: str, env: dict[str, str] | None = None) -> dict:
    proc = aipm(root, "config", "--json", *flags, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["settings"]


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert proc.stdout == ""
    return lines[0]


# -- in-process: the object and the layers ---------------------------------------------------------------------


def test_defaults_when_nothing_is_configured(tmp_path):
    s = load_settings(tmp_path, environ={})
    assert s == Settings()
    assert (s.max_workers, s.max_cpu_percent, s.max_memory_percent) == (5, 85.0, 85.0)
    assert s.enable_monitoring and s.enable_auto_scaling
    assert (s.max_attempts, s.max_rework, s.timeout, s.orders_dir) == (1, 3, 1800, "orders")
    assert s.worker_command == ("claude", "-p", "--model", "{model}") and s.worker_model == "sonnet"
    assert s.review_command is None
    assert dict(s.sources) == dict.fromkeys(SETTING_NAMES, "default")


def test_settings_are_frozen(tmp_path):
    s = load_settings(tmp_path, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_workers = 9  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.sources["max_workers"] = "x"  # type: ignore[index]


def test_every_layer_in_order(tmp_path):
    (tmp_path / "aipm.yaml").write_text("max_workers: 3\nmax_cpu_percent: 70\nmax_memory_percent: 60\n"
                                        "enable_monitoring: false\n")
    env = {"AIPM_MAX_CPU_PERCENT": "75", "AIPM_MAX_MEMORY_PERCENT": "65", "AIPM_ENABLE_MONITORING": "on"}
    s = load_settings(tmp_path, {"max_memory_percent": 50.0, "max_workers": None}, environ=env)
    assert (s.max_workers, s.max_cpu_percent, s.max_memory_percent, s.enable_monitoring) == (3, 75.0, 50.0, True)
    assert s.sources["max_workers"] == "aipm.yaml"
    assert s.sources["max_cpu_percent"] == "env AIPM_MAX_CPU_PERCENT"
    assert s.sources["max_memory_percent"] == "flag --max-memory"
    assert s.sources["enable_monitoring"] == "env AIPM_ENABLE_MONITORING"
    assert s.sources["enable_auto_scaling"] == "default"


def test_the_largest_counts_and_timeout_are_accepted(tmp_path):
    (tmp_path / "aipm.yaml").write_text("max_workers: 1000\nmax_attempts: 1000\nmax_rework: 1000\ntimeout: 604800\n")
    s = load_settings(tmp_path, environ={})
    assert (s.max_workers, s.max_attempts, s.max_rework, s.timeout) == (1000, 1000, 1000, 604800)


def test_full_aipm_yaml(tmp_path):
    (tmp_path / "aipm.yaml").write_text(
        "max_attempts: 2\nmax_rework: 0\ntimeout: none\norders_dir: work/orders\n"
        "worker:\n  command: \"my-agent --model '{model}' -q\"\n  model: opus\n"
        "review:\n  command: [ruff, check, .]\n"
    )
    s = load_settings(tmp_path, environ={})
    assert (s.max_attempts, s.max_rework, s.timeout, s.orders_dir) == (2, 0, None, "work/orders")
    assert s.worker_command == ("my-agent", "--model", "{model}", "-q") and s.worker_model == "opus"
    assert s.review_command == ("ruff", "check", ".")
    assert s.sources["worker_command"] == "aipm.yaml"
    (tmp_path / "aipm.yaml").write_text("timeout: null\nreview:\n  command: make lint\nworker:\n")
    s = load_settings(tmp_path, environ={})
    assert s.timeout is None and s.review_command == "make lint"


@pytest.mark.parametrize("text", ["true", "TRUE", "1", "yes", "On"])
def test_boolean_spellings_true(tmp_path, text):
    s = load_settings(tmp_path, environ={"AIPM_ENABLE_AUTO_SCALING": text}, flags={"enable_monitoring": None})
    assert s.enable_auto_scaling is True


@pytest.mark.parametrize("text", ["false", "False", "0", "no", "OFF"])
def test_boolean_spellings_false(tmp_path, text):
    s = load_settings(tmp_path, environ={"AIPM_ENABLE_AUTO_SCALING": text})
    assert s.enable_auto_scaling is False


def test_empty_aipm_yaml_is_fine(tmp_path):
    (tmp_path / "aipm.yaml").write_text("# nothing set yet\n")
    assert load_settings(tmp_path, environ={}) == Settings()


def test_pyproject_is_read_only_without_aipm_yaml(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.aipm]\nmax_workers = 7\ntimeout = "none"\n'
                                             '[tool.aipm.worker]\nmodel = "haiku"\n')
    s = load_settings(tmp_path, environ={})
    assert (s.max_workers, s.timeout, s.worker_model) == (7, None, "haiku")
    assert s.sources["max_workers"] == "pyproject.toml [tool.aipm]"
    (tmp_path / "aipm.yaml").write_text("max_attempts: 2\n")
    s = load_settings(tmp_path, environ={})
    assert (s.max_workers, s.max_attempts) == (5, 2)


def test_error_is_settings_error_in_process(tmp_path):
    with pytest.raises(SettingsError, match=r"^AIPM_MAX_WORKERS: 'abc' is not a positive integer$"):
        load_settings(tmp_path, environ={"AIPM_MAX_WORKERS": "abc"})


# -- through the CLI ---------------------------------------------------------------------------------------------


def test_precedence_through_the_cli(tmp_path):
    s = effective(tmp_path)
    assert s["max_workers"] == {"value": 5, "source": "default"}
    (tmp_path / "aipm.yaml").write_text("max_workers: 3\nenable_auto_scaling: false\n")
    s = effective(tmp_path)
    assert s["max_workers"] == {"value": 3, "source": "aipm.yaml"}
    assert s["enable_auto_scaling"] == {"value": False, "source": "aipm.yaml"}
    env = {"AIPM_MAX_WORKERS": "4", "AIPM_ENABLE_AUTO_SCALING": "yes", "AIPM_MAX_CPU_PERCENT": "70"}
    s = effective(tmp_path, env=env)
    assert s["max_workers"] == {"value": 4, "source": "env AIPM_MAX_WORKERS"}
    assert s["enable_auto_scaling"] == {"value": True, "source": "env AIPM_ENABLE_AUTO_SCALING"}
    s = effective(tmp_path, "--max-workers", "6", "--max-cpu", "60", "--max-memory", "55",
                  "--no-resource-monitoring", "--no-auto-scaling", env=env)
    assert s["max_workers"] == {"value": 6, "source": "flag --max-workers"}
    assert s["max_cpu_percent"] == {"value": 60.0, "source": "flag --max-cpu"}
    assert s["max_memory_percent"] == {"value": 55.0, "source": "flag --max-memory"}
    assert s["enable_monitoring"] == {"value": False, "source": "flag --no-resource-monitoring"}
    assert s["enable_auto_scaling"] == {"value": False, "source": "flag --no-auto-scaling"}


def test_config_json_keys_are_the_names_written_in_aipm_yaml(tmp_path):
    """`config --json` keyed a nested setting by its Python field (`worker_command`), not as aipm.yaml, the
    table and the error messages spell it (`worker.command`)."""
    from aipm.settings import SETTING_NAMES, setting_key

    (tmp_path / "aipm.yaml").write_text("worker:\n  command: [my-agent, '{model}']\n  model: opus\n"
                                        "review:\n  command: ruff check\n")
    s = effective(tmp_path)
    assert set(s) == {setting_key(name) for name in SETTING_NAMES}
    assert s["worker.command"] == {"value": ["my-agent", "{model}"], "source": "aipm.yaml"}
    assert s["worker.model"] == {"value": "opus", "source": "aipm.yaml"}
    assert s["review.command"] == {"value": "ruff check", "source": "aipm.yaml"}
    assert s["worker.agent"]["source"] == "default" and "worker_command" not in s


def test_config_takes_the_setting_flags_of_run_and_says_they_came_from_them(tmp_path):
    """`config` took only the load flags: what `run --runner ray --confine --workspace worktree --preempt` would use
    could not be shown, and `config --confine` was a usage error."""
    (tmp_path / "aipm.yaml").write_text("workspace: shared\n")
    s = effective(tmp_path, "--runner", "ray", "--confine", "--workspace", "worktree", "--preempt")
    assert s["runner"] == {"value": "ray", "source": "flag --runner"}
    assert s["confine"] == {"value": True, "source": "flag --confine"}
    assert s["workspace"] == {"value": "worktree", "source": "flag --workspace"}  # over aipm.yaml's
    assert s["preempt"] == {"value": True, "source": "flag --preempt"}
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_one_line_error(aipm(tmp_path, "config", "--workspace", "elsewhere"), "--workspace", "elsewhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_config_table_names_sources(tmp_path):
    (tmp_path / "aipm.yaml").write_text("max_workers: 3\n")
    proc = aipm(tmp_path, "config", env={"AIPM_MAX_MEMORY_PERCENT": "70"})
    assert proc.returncode == 0, proc.stderr
    for text in ("max_workers", "aipm.yaml", "env AIPM_MAX_MEMORY_PERCENT", "worker.command", "default"):
        assert text in proc.stdout


@pytest.mark.parametrize("text,said", [
    ("notify: true\n", "notify: true is not a command"),
    ("notify: [echo, 1]\n", "notify: ['echo', 1] is not a command"),
    ("worker:\n  command: [claude, -p, 1]\n", "worker.command: ['claude', '-p', 1] is not a command"),
    ("worker:\n  model: 4\n", "worker.model: 4 is not a non-empty string"),  # and every other text setting
])
def test_a_command_setting_yaml_read_as_no_text_is_told_to_be_quoted(tmp_path, text, said):
    """`notify: true` was "True is not a command": a Python spelling, and no word that YAML took the unquoted value
    (or an item of a list) for a boolean or a number, nor that quotes fix it."""
    (tmp_path / "aipm.yaml").write_text(text)
    proc = aipm(tmp_path, "config")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert said in proc.stderr and ", not text: put it in quotes" in proc.stderr, proc.stderr


@pytest.mark.parametrize("text,said", [
    ('worker:\n  command: ""\n', "worker.command: '' is not a command"),  # was "[] is not a command": the split
    ("orders_dir: /srv/orders\n", "orders_dir: '/srv/orders' is an absolute path; give a directory relative"),
    ("orders_dir: ../orders\n", "orders_dir: '../orders' is outside the project"),
    ("orders_dir: ./\n", "orders_dir: './' is the project root itself"),  # every directory an order
])
def test_a_setting_is_said_as_it_was_written(tmp_path, text, said):
    (tmp_path / "aipm.yaml").write_text(text)
    proc = aipm(tmp_path, "config")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and said in proc.stderr, proc.stderr


@pytest.mark.parametrize("file,text,said", [
    ("aipm.yaml", "max_workers: true\n", "max_workers: true is not a positive integer"),
    ("aipm.yaml", "enable_monitoring: null\n", "enable_monitoring: null is not a boolean (true/false, yes/no, on/off, "
                                               "1/0)"),
    ("aipm.yaml", "scope_ignore: [a, null]\n", "scope_ignore: ['a', null] is not a list of globs (strings)"),
    ("aipm.yaml", "just text\n", "must be a mapping of settings, not a string"),
    ("aipm.yaml", "worker: 5\n", "worker: must be a mapping (of worker.agent, worker.command, worker.model), not 5"),
    # A task file's `review: COMMAND` is `review: {command: COMMAND}` here
    ("aipm.yaml", "review: make check\n", "review: must be a mapping (of review.command), not 'make check'; write "
                                          "review: {command: 'make check'}"),
    ("pyproject.toml", "[tool.aipm]\nreview = ['make', 'x']\n",
     "review: must be a mapping (of review.command), not ['make', 'x']; write review = {command = ['make', 'x']}"),
])
def test_a_wrong_setting_is_said_as_the_file_spells_it(tmp_path, file, text, said):
    """`max_workers: true` was "True is not a positive integer", `review: make check` "review: expected a mapping,
    got str": Python's words, and nothing of what `review` takes here."""
    (tmp_path / file).write_text(text)
    proc = aipm(tmp_path, "config")
    assert (proc.returncode, proc.stderr) == (2, f"aipm: error: {tmp_path / file}: {said}\n")


def test_config_and_validate_show_a_root_whose_name_holds_brackets_as_it_is(tmp_path):
    """Rich read `[bold]` in the project's path as markup: `config` titled its table "aipm settings for
    .../projx" and `validate` said "no orders under .../projx/orders" for a project in `proj[bold]x`."""
    root = tmp_path / "proj[bold]x"
    root.mkdir()
    (root / "aipm.yaml").write_text("max_workers: 3\n")
    proc = aipm(root, "config")
    assert proc.returncode == 0 and f"aipm settings for {root}" in proc.stdout, proc.stdout + proc.stderr
    proc = aipm(root, "validate")
    assert proc.returncode == 0 and f"no orders under {root / 'orders'}" in proc.stdout, proc.stdout + proc.stderr


def test_ray_address_in_the_environment_wins_over_aipm_yaml(tmp_path):
    """RAY_ADDRESS is the environment layer of ray.address: environment > aipm.yaml, as for every setting (it lost
    to aipm.yaml, so `--runner ray` went to the cluster of aipm.yaml whatever RAY_ADDRESS said)."""
    (tmp_path / "aipm.yaml").write_text("ray:\n  address: 127.0.0.1:2\n")
    assert effective(tmp_path)["ray.address"] == {"value": "127.0.0.1:2", "source": "aipm.yaml"}
    assert effective(tmp_path, env={"RAY_ADDRESS": "127.0.0.1:1"})["ray.address"] == {
        "value": "127.0.0.1:1", "source": "env RAY_ADDRESS"}


def test_aipm_preempt_turns_aipm_yamls_preemption_off_for_one_run(tmp_path):
    """`preempt: true` in aipm.yaml could not be turned off for one run: `run` has no --no-preempt and there was
    no environment variable (there is AIPM_CONFINE for confine)."""
    (tmp_path / "aipm.yaml").write_text("preempt: true\n")
    assert effective(tmp_path)["preempt"] == {"value": True, "source": "aipm.yaml"}
    assert effective(tmp_path, env={"AIPM_PREEMPT": "false"})["preempt"] == {"value": False,
                                                                          "source": "env AIPM_PREEMPT"}
    assert_one_line_error(aipm(tmp_path, "config", "--json", env={"AIPM_PREEMPT": "maybe"}), "AIPM_PREEMPT", "'maybe'")


def test_a_blank_ray_address_counts_as_unset(tmp_path):
    """Ray's own variable, set by whatever else the shell runs: a blank one made every command exit 2 ("' ' is not
    a non-empty string"), `aipm status` of a local project too. Ray would only fail to parse it."""
    (tmp_path / "orders" / "ORD").mkdir(parents=True)
    (tmp_path / "orders" / "ORD" / "T.yaml").write_text("command: 'true'\n")
    for blank in (" ", "\t \n"):
        status = aipm(tmp_path, "status", "ORD", env={"RAY_ADDRESS": blank})
        assert status.returncode == 0, status.stderr
        assert effective(tmp_path, env={"RAY_ADDRESS": blank})["ray.address"] == {"value": "auto", "source": "default"}


BAD_ENV = [
    ("AIPM_MAX_WORKERS", "abc"), ("AIPM_MAX_WORKERS", "0"), ("AIPM_MAX_WORKERS", "-1"), ("AIPM_MAX_WORKERS", "2.5"),
    ("AIPM_MAX_CPU_PERCENT", "0"), ("AIPM_MAX_CPU_PERCENT", "101"), ("AIPM_MAX_CPU_PERCENT", "-5"),
    ("AIPM_MAX_CPU_PERCENT", "nan"), ("AIPM_MAX_MEMORY_PERCENT", "150"), ("AIPM_MAX_MEMORY_PERCENT", "lots"),
    ("AIPM_ENABLE_MONITORING", "maybe"), ("AIPM_ENABLE_AUTO_SCALING", "2"), ("AIPM_MAX_WORKERS", "1001"),
    # Python's int() reads other scripts' digits: Arabic-Indic three, full-width four, Devanagari five.
    ("AIPM_MAX_WORKERS", "\u0663"), ("AIPM_MAX_WORKERS", "\uff14"), ("AIPM_MAX_CPU_PERCENT", "\u096b0"),
]


@pytest.mark.parametrize("var,value", BAD_ENV)
def test_bad_environment_value(tmp_path, var, value):
    line = assert_one_line_error(aipm(tmp_path, "config", "--json", env={var: value}), var, repr(value))
    if var == "AIPM_MAX_WORKERS" and value == "abc":
        assert line.endswith("AIPM_MAX_WORKERS: 'abc' is not a positive integer")


BAD_FLAGS = [
    (("--max-workers", "0"), "--max-workers"), (("--max-workers", "-1"), "--max-workers"),
    (("--max-workers", "1001"), "--max-workers"), (("--max-cpu", "150"), "--max-cpu"), (("--max-cpu", "0"), "--max-cpu"), (("--max-memory", "100.5"), "--max-memory"),
]


@pytest.mark.parametrize("args,flag", BAD_FLAGS)
def test_bad_flag_value(tmp_path, args, flag):
    assert_one_line_error(aipm(tmp_path, "config", "--json", *args), flag)


def test_flag_of_wrong_type_is_a_usage_error(tmp_path):
    proc = aipm(tmp_path, "config", "--max-workers", "abc")
    assert proc.returncode == 2 and "--max-workers" in proc.stderr and "Traceback" not in proc.stderr


BAD_YAML = [
    ("max_workers: abc\n", "max_workers"),
    ("max_workers: 0\n", "max_workers"),
    ("max_workers: true\n", "max_workers"),
    ("max_workers: [1, 2]\n", "max_workers"),
    ("max_cpu_percent: 120\n", "max_cpu_percent"),
    ("max_memory_percent: 0\n", "max_memory_percent"),
    ("enable_monitoring: maybe\n", "enable_monitoring"),
    ("enable_auto_scaling: 3\n", "enable_auto_scaling"),
    ("max_attempts: 0\n", "max_attempts"),
    ("max_rework: -1\n", "max_rework"),
    ("timeout: -5\n", "timeout"),
    ("timeout: soon\n", "timeout"),
    ("orders_dir: ''\n", "orders_dir"),
    ("orders_dir: ../elsewhere\n", "orders_dir"),  # outside the project
    ("orders_dir: orders/../../x\n", "orders_dir"),
    ("orders_dir: /srv/orders\n", "orders_dir"),
    ("worker: 5\n", "worker"),
    ("worker:\n  command: []\n", "worker.command"),
    ("worker:\n  command: [claude, 5]\n", "worker.command"),
    ("worker:\n  command: \"unclosed 'quote\"\n", "worker.command"),
    ("worker:\n  command: [agent, '{prompt}']\n", "worker.command: bad placeholder {prompt}"),
    ("worker:\n  command: 'agent {model'\n", "worker.command"),
    ("worker:\n  command: [agent, '{model:d}']\n", "worker.command"),
    ("worker:\n  command: [agent, '{model:{x}}']\n", "worker.command: bad placeholder {x}"),
    ("worker:\n  command: [agent, '{model:{0}}']\n", "worker.command: bad placeholder {0}"),
    ("worker:\n  command: [agent, '{task_id:{model}}']\n", "worker.command: {model} in a format spec in "),
    ("worker:\n  model: 7\n", "worker.model"),
    ("review:\n  command: 5\n", "review.command"),
    ("- max_workers\n", "must be a mapping of settings, not a list"),
    ("timeout: 99999999999\n", "timeout"),
    # 1.5 is a positive number of seconds, as the message said it was not: a timeout is whole seconds (a review)
    ("timeout: 1.5\n", "timeout: 1.5 is not a positive whole number of seconds, or none"),
    # Counts over 1000: a typo, not a limit anyone means (and not exact in every JSON reader past 2**53).
    ("max_workers: 1001\n", "max_workers: 1001 is more than the maximum 1000"),
    ("max_attempts: 1000000000000\n", "max_attempts: 1000000000000 is more than the maximum 1000"),
    ("max_rework: 99999999999999999999999999999\n", "max_rework: 99999999999999999999999999999 is more than"),
    ("max_workers: 2\nmax_workers: 8\n", "max_workers: appears twice"),
    ("worker:\n  model: a\n  model: b\n", "model: appears twice"),
    # In double quotes YAML reads \0 as a NUL byte, where a command line ends: the worker ran the words cut short.
    ('worker:\n  command: [sh, -c, "printf a\\0b"]\n', "worker.command: 'printf a\\x00b' holds a NUL byte"),
    ('worker:\n  model: "a\\0b"\n', "worker.model: 'a\\x00b' holds a NUL byte"),
    ('review:\n  command: "test -s a\\0b"\n', "review.command: 'test -s a\\x00b' holds a NUL byte"),
    ('notify: "echo \\0"\n', "notify: 'echo \\x00' holds a NUL byte"),
    # YAML reads these as a date and an int that are none: a ValueError traceback, exit 1, before.
    ("orders_dir: 2026-02-30\n", ":1:13: invalid YAML: '2026-02-30' is not a valid timestamp (day is out of range"),
    ("max_workers: !!int five\n", ":1:14: invalid YAML: 'five' is not a valid int"),
]


@pytest.mark.parametrize("text,setting", BAD_YAML)
def test_bad_aipm_yaml_value(tmp_path, text, setting):
    (tmp_path / "aipm.yaml").write_text(text)
    assert_one_line_error(aipm(tmp_path, "config", "--json"), str(tmp_path / "aipm.yaml"), setting)


def test_a_bad_template_placeholder_stops_run_before_anything_starts(tmp_path):
    """`worker.command: [agent, "{prompt}"]` passed `config` and `validate`; `run` then failed each template task at
    its launch (exit 1) while it ran the others. A bad value is exit 2 naming the setting, nothing changed."""
    (tmp_path / "aipm.yaml").write_text("worker:\n  command: [cat, '{prompt}']\n")
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True)
    (order / "AGENT.yaml").write_text("prompt: hello\ntarget_files: [a]\n")
    (order / "CMD.yaml").write_text("command: 'true'\ntarget_files: [b]\n")
    before = {p: p.read_bytes() for p in order.iterdir()}
    assert_one_line_error(aipm(tmp_path, "validate"), "worker.command: bad placeholder {prompt}")
    assert_one_line_error(aipm(tmp_path, "run", "ORD"), "worker.command: bad placeholder {prompt}")
    assert {p: p.read_bytes() for p in order.iterdir()} == before


def test_template_placeholders_and_literal_braces_reach_the_worker(tmp_path):
    (tmp_path / "aipm.yaml").write_text(
        "worker:\n  command: [sh, -c, 'echo \"$0 $1 $2 {{x}}\" > out; cat $3 >> out', '{task_id}', '{order_id}',"
        " '{model}', '{prompt_file}']\n")
    order = tmp_path / "orders" / "ORD"
    order.mkdir(parents=True)
    (order / "T.yaml").write_text("prompt: hello\nmodel: opus\ntarget_files: [out]\n")
    proc = aipm(tmp_path, "run", "ORD", env={"AIPM_ENABLE_MONITORING": "false"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "out").read_text() == "T ORD opus {x}\nhello"


def test_unknown_key_suggests_the_right_one(tmp_path):
    (tmp_path / "aipm.yaml").write_text("max_worker: 3\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "max_worker", "did you mean 'max_workers'")
    (tmp_path / "aipm.yaml").write_text("worker:\n  comand: [x]\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "worker.comand", "did you mean 'worker.command'")
    (tmp_path / "aipm.yaml").write_text("zzz: 1\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "zzz", "unknown setting", "max_workers")


def test_broken_yaml_names_line_and_column(tmp_path):
    (tmp_path / "aipm.yaml").write_text("max_workers: 3\nworker:\n  command: [claude,\n")
    line = assert_one_line_error(aipm(tmp_path, "config", "--json"), "invalid YAML")
    assert f"{tmp_path / 'aipm.yaml'}:4:1:" in line
    (tmp_path / "aipm.yaml").write_text("max_workers: 3\n  bad: indent\n")
    line = assert_one_line_error(aipm(tmp_path, "config", "--json"), "invalid YAML")
    assert f"{tmp_path / 'aipm.yaml'}:2:" in line


def test_bad_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.aipm]\nmax_workers = 0\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "pyproject.toml", "max_workers")
    (tmp_path / "pyproject.toml").write_text("[tool.aipm]\nmax_wrkers = 2\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "did you mean 'max_workers'")
    (tmp_path / "pyproject.toml").write_text("[tool.aipm\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "pyproject.toml", "invalid TOML")


@pytest.mark.parametrize("line, said", [
    ("notify = 3", "notify: 3 is not a command (a string, a list of strings, or null); TOML read 3 as a number, "
                   "not text: put it in quotes"),
    ("orders_dir = 2026-01-01", "orders_dir: 2026-01-01 is not a non-empty string; TOML read 2026-01-01 as a date, "
                                "not text: put it in quotes"),
    ("orders_dir = 07:32:00", "TOML read 07:32:00 as a time, not text: put it in quotes"),
    ("[tool.aipm.worker]\ncommand = true", "worker.command: true is not a command (a non-empty list of strings, "
                                            "or a string); TOML read true as a boolean, not text: put it in quotes"),
])
def test_a_pyproject_values_fix_names_toml(tmp_path, line, said):
    """The fix for a value read as no text named YAML in a pyproject.toml ("YAML read 3 as a number"), sending the
    user looking for a YAML file; aipm.yaml's errors still name YAML."""
    (tmp_path / "pyproject.toml").write_text(f"[tool.aipm]\n{line}\n")
    proc = aipm(tmp_path, "config", "--json")
    assert_one_line_error(proc, "pyproject.toml", said)
    assert "YAML" not in proc.stderr
    (tmp_path / "pyproject.toml").unlink()
    (tmp_path / "aipm.yaml").write_text("notify: 3\n")
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "aipm.yaml: notify:", "YAML read 3 as a number")


@pytest.mark.parametrize("name, text, said", [
    ("aipm.yaml", "max_workers: 0\n", "aipm.yaml: max_workers: 0 is not a positive integer"),
    ("aipm.yaml", "max_workers: [1\n", "aipm.yaml"),
    ("pyproject.toml", "[tool.aipm]\nnotify = 3\n", "pyproject.toml: notify: 3 is not a command"),
])
def test_validate_json_says_a_bad_settings_file_in_its_json(tmp_path, name, text, said):
    """`validate --json` reports a bad task file in its JSON (`ok: false`), but a bad settings file printed no JSON
    at all (the error on stderr): a script reading it had nothing to parse. Exit 2 either way, nothing written."""
    (tmp_path / "orders" / "ORD").mkdir(parents=True)
    (tmp_path / "orders" / "ORD" / "A.yaml").write_text("command: 'true'\n")
    (tmp_path / name).write_text(text)
    before = sorted(p for p in tmp_path.rglob("*"))
    proc = aipm(tmp_path, "validate", "--json")
    assert proc.returncode == 2, proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["orders"] == [] and said in report["error"], report
    assert str(tmp_path / name) in report["error"] and "\n" not in report["error"]
    assert sorted(p for p in tmp_path.rglob("*")) == before
    assert_one_line_error(aipm(tmp_path, "validate"), said)  # without --json: the one line, as before


def test_config_warns_of_a_tool_aipm_that_aipm_yaml_hides(tmp_path):
    """Settings put in [tool.aipm] after `aipm init` wrote an aipm.yaml were ignored without a word."""
    (tmp_path / "aipm.yaml").write_text("max_workers: 5\n")
    (tmp_path / "pyproject.toml").write_text("[tool.aipm]\nmax_workers = 2\n")
    proc = aipm(tmp_path, "config", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["settings"]["max_workers"] == {"value": 5, "source": "aipm.yaml"}
    assert proc.stderr == (f"aipm: warning: {tmp_path / 'pyproject.toml'}: [tool.aipm] is not read: aipm.yaml is, "
                           "instead of it (they are never merged); move those settings into aipm.yaml, or delete "
                           "aipm.yaml\n")
    (tmp_path / "pyproject.toml").write_text("[tool.ruff]\nline-length = 120\n")  # another tool's: nothing to say
    assert aipm(tmp_path, "config", "--json").stderr == ""


def test_a_pyproject_whose_tool_is_no_table_holds_no_settings(tmp_path):
    """`[[tool]]` (or `tool = 3`) in a pyproject.toml above the working directory ended every command in an
    AttributeError traceback; such a file holds no [tool.aipm], so the defaults apply."""
    (tmp_path / "pyproject.toml").write_text('[[tool]]\nname = "x"\n')
    (tmp_path / "sub").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("AIPM_")}
    proc = subprocess.run([sys.executable, "-m", "aipm", "config", "--json"], capture_output=True, text=True,
                          env=clean, cwd=tmp_path / "sub", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert {v["source"] for v in json.loads(proc.stdout)["settings"].values()} == {"default"}
    (tmp_path / "pyproject.toml").write_text("tool = 3\n")
    assert effective(tmp_path)["max_workers"] == {"value": 5, "source": "default"}


def test_a_tool_aipm_that_is_no_table_is_named(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[tool]\naipm = "x"\n')
    assert_one_line_error(aipm(tmp_path, "config", "--json"), "pyproject.toml: tool.aipm: must be a mapping")


@pytest.mark.parametrize("hostile, wrong", [("sparse", "over the 1 MiB limit"), ("fifo", "not a regular file")])
def test_a_pyproject_toml_that_is_a_sparse_terabyte_or_a_fifo_is_one_line_error(tmp_path, hostile, wrong):
    """pyproject.toml's [tool.aipm] is read as aipm.yaml is: a sparse terabyte there (`truncate -s 1T`, by a
    worker) was read whole by every command (a MemoryError traceback), and a FIFO was taken for no settings."""
    pyproject = tmp_path / "pyproject.toml"
    if hostile == "sparse":
        pyproject.write_text("[tool.aipm]\nmax_workers = 2\n")
        os.truncate(pyproject, 2**40)
    else:
        os.mkfifo(pyproject)
    for args in [("config", "--json"), ("init",)]:
        assert_one_line_error(aipm(tmp_path, *args, preexec_fn=capped_memory), "pyproject.toml", wrong)


def test_bad_setting_stops_resources_too(tmp_path):
    assert_one_line_error(aipm(tmp_path, "resources", "--json", env={"AIPM_MAX_MEMORY_PERCENT": "0"}),
                          "AIPM_MAX_MEMORY_PERCENT")


def test_config_shows_ray_address_default_as_the_reference_does(tmp_path):
    """`config --json` said ray.address null where reference.md gives its default as `auto`."""
    assert effective(tmp_path)["ray.address"] == {"value": "auto", "source": "default"}


def test_an_aipm_yaml_linked_to_nothing_is_named_not_taken_for_no_settings(tmp_path):
    """`config` and `status` showed every default with no word: the settings the link was meant to give were lost."""
    (tmp_path / "aipm.yaml").symlink_to(tmp_path / "gone.yaml")
    proc = aipm(tmp_path, "config")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "aipm.yaml: a link to nothing" in proc.stderr, \
        proc.stderr
