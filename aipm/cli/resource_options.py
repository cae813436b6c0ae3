"""The setting flags shared by launch, run, exec, detect, config and resources.

Use the Opt constants as parameter defaults and hand the values to `settings_from_flags`:

    def launch(..., max_workers: Optional[int] = MaxWorkersOpt, max_cpu: Optional[float] = MaxCpuOpt,
               max_memory: Optional[float] = MaxMemoryOpt, no_monitoring: bool = NoMonitoringOpt,
               no_auto_scaling: bool = NoAutoScalingOpt):
        settings = settings_from_flags(root, max_workers, max_cpu, max_memory, no_monitoring, no_auto_scaling)
"""

from __future__ import annotations

from aipm.cli.decl import Option

from aipm.settings import settings_from_flags  # noqa: F401 - re-exported for the command modules

# Defaults are None (flag not given) so that aipm.yaml and the environment show through; the help states the
# built-in default. Values are checked by load_settings, which names the flag in its one-line error.
MaxWorkersOpt = Option(
    None, "--max-workers", help="Most workers running at once in the project (default 5, or aipm.yaml)."
)
MaxCpuOpt = Option(None, "--max-cpu", help="CPU percent at which fewer workers start (default 85).")
MaxMemoryOpt = Option(None, "--max-memory", help="Memory percent at which fewer workers start (default 85).")
NoMonitoringOpt = Option(
    False, "--no-resource-monitoring", help="Take no CPU or memory readings: start up to --max-workers."
)
NoAutoScalingOpt = Option(
    False, "--no-auto-scaling", help="Read the load but never start fewer than --max-workers because of it."
)
RunnerOpt = Option(
    None, "--runner", help="Where workers run: local (default) or ray (a Ray cluster: RAY_ADDRESS or ray.address)."
)
PreemptOpt = Option(
    False, "--preempt", help="An urgent (P0/P1) task that only lower-priority work of this run keeps from "
    "starting stops that work (re-queued, attempt not counted; at most twice per task). Setting `preempt`.")
ConfineOpt = Option(False, "--confine", help="Confine workers to their target files with Landlock "
                    "(tasks that say `confine: false` excepted); refused where the kernel lacks it.")
WorkspaceOpt = Option(
    None, "--workspace", help="Where tasks without `workspace:` work: shared (the project tree, default) or "
                              "worktree (a git worktree each, merged back when approved).")
