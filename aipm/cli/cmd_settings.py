"""`aipm config` (effective settings and where each came from) and `aipm resources` (load and worker budget)."""

from __future__ import annotations

import shlex
from typing import Any, Optional

from aipm.cli import grid
from aipm.cli.common import JsonOpt, console, print_json, project_root, warn
from aipm.cli.decl import command
from aipm.cli.resource_options import (
    ConfineOpt, MaxCpuOpt, MaxMemoryOpt, MaxWorkersOpt, NoAutoScalingOpt, NoMonitoringOpt, PreemptOpt, RunnerOpt,
    WorkspaceOpt, settings_from_flags,
)
from aipm.cluster import check_form
from aipm.resources import ResourceMonitor, get_system_info
from aipm.settings import SETTING_NAMES, hidden_pyproject, setting_key


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return shlex.join(value)
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)


@command()
def config(
    max_workers: Optional[int] = MaxWorkersOpt,
    max_cpu: Optional[float] = MaxCpuOpt,
    max_memory: Optional[float] = MaxMemoryOpt,
    no_monitoring: bool = NoMonitoringOpt,
    no_auto_scaling: bool = NoAutoScalingOpt,
    runner: Optional[str] = RunnerOpt,
    preempt: bool = PreemptOpt,
    confine: bool = ConfineOpt,
    workspace: Optional[str] = WorkspaceOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show every effective setting, its value and where it came from (default, aipm.yaml, environment, flag).
    Takes the setting flags of `run`, to show what a run given them would use."""
    root = project_root()
    settings = settings_from_flags(root, max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling, runner,
                                   preempt, confine, workspace)
    if settings.runner == "ray":  # what a Ray run would refuse first (RAY_ADDRESS is Ray's: checked only then)
        check_form(settings.ray_address, settings.sources["ray_address"])
    values = {name: getattr(settings, name) for name in SETTING_NAMES}
    if hidden_pyproject(root):
        warn([f"{root / 'pyproject.toml'}: [tool.aipm] is not read: aipm.yaml is, instead of it (they are never "
              "merged); move those settings into aipm.yaml, or delete aipm.yaml"])
    if json_out:  # keyed as aipm.yaml spells each setting (`worker.command`), as the table and errors name it
        print_json({"root": str(root), "settings": {
            setting_key(name): {"value": list(v) if isinstance(v, tuple) else v, "source": settings.sources[name]}
            for name, v in values.items()
        }})
        return
    table = grid.Grid([grid.Column("setting", no_wrap=True), grid.Column("value"),
                       grid.Column("source", no_wrap=True)], title=f"aipm settings for {root}")
    for name, value in values.items():
        table.add_row(setting_key(name), _shown(value), settings.sources[name])
    grid.print_lines(table.lines(grid.fitting(), grid.Styles.of()))


def _size(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


@command()
def resources(
    max_workers: Optional[int] = MaxWorkersOpt,
    max_cpu: Optional[float] = MaxCpuOpt,
    max_memory: Optional[float] = MaxMemoryOpt,
    no_monitoring: bool = NoMonitoringOpt,
    no_auto_scaling: bool = NoAutoScalingOpt,
    json_out: bool = JsonOpt,
) -> None:
    """Show CPU and memory use (cgroup-aware), the thresholds, and how many workers may run now."""
    settings = settings_from_flags(project_root(), max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling)
    data: dict[str, Any] = {
        "cpu_percent": None, "memory_percent": None, "source": None, "healthy": None,
        "max_cpu_percent": settings.max_cpu_percent, "max_memory_percent": settings.max_memory_percent,
        "monitoring": settings.enable_monitoring, "auto_scaling": settings.enable_auto_scaling,
        "max_workers": settings.max_workers, "recommended_workers": settings.max_workers,
    }
    if settings.enable_monitoring:
        monitor = ResourceMonitor(settings.max_cpu_percent, settings.max_memory_percent)
        status = monitor.get_status()  # a one-off reading: it waits for its sample window
        data.update(cpu_percent=status.cpu_percent, memory_percent=status.memory_percent, source=status.source,
                    healthy=status.is_healthy)
        if settings.enable_auto_scaling:
            data["recommended_workers"] = monitor.get_recommended_worker_count(0, settings.max_workers)
    data["system"] = get_system_info()
    if json_out:
        print_json(data)
        return
    system = data["system"]
    from rich.table import Table  # (headerless: not a table cli/grid draws; psutil's sample dominates anyway)

    table = Table(title="aipm resources", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    if settings.enable_monitoring:
        state = "healthy" if data["healthy"] else "overloaded"
        table.add_row("CPU", f"{data['cpu_percent']:.1f}% (threshold {settings.max_cpu_percent:g}%)")
        table.add_row("memory", f"{data['memory_percent']:.1f}% (threshold {settings.max_memory_percent:g}%)")
        table.add_row("state", f"{state} (readings from {data['source']})")
    else:
        table.add_row("monitoring", "off (--no-resource-monitoring or enable_monitoring: false)")
    table.add_row("CPUs", f"{system['usable_cpus']:g} usable of {system['cpu_count']}")
    table.add_row("memory total", _size(system["memory_total"]))
    table.add_row("memory available", _size(system["memory_available"]))
    if system["load_average"] is not None:
        table.add_row("load average", " ".join(f"{x:.2f}" for x in system["load_average"]))
    cgroup = system["cgroup"]
    table.add_row("cgroup limits", "none found" if cgroup is None else
                  f"cpus {cgroup['cpus'] if cgroup['cpus'] is not None else 'max'}, "
                  f"memory {_size(cgroup['memory_max']) if cgroup['memory_max'] is not None else 'max'}")
    scaling = "" if settings.enable_auto_scaling else " (auto-scaling off)"
    table.add_row("workers", f"{data['recommended_workers']} of max {settings.max_workers} may run now{scaling}")
    console().print(table)
