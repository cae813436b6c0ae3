"""Local capacity: tasks that declare `resources:` share this machine's CPUs and memory.

On a Ray cluster the same field is Ray's resource request and Ray does the packing; on this machine aipm does:
a task starts only when its CPUs and memory fit beside the running tasks' declared needs, and a task that could
never fit here is refused with the reason. Tasks without `resources:` declare nothing and count nothing.
Pure: the caller passes the machine's totals and what running tasks hold.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from aipm.model import Task


@dataclass(frozen=True)
class Capacity:
    cpus: float
    memory_mb: int | None  # None: the machine's memory cannot be read, so only CPUs are counted


def fit(tasks: Iterable[Task], total: Capacity, used_cpus: float, used_memory_mb: int,
        kept: Iterable[tuple[int, float, int]] = ()) -> tuple[list[Task], dict[str, str], dict[str, str]]:
    """(tasks that fit, in order; id → why it waits; id → why it can never start here). `kept`: (rank, cpus,
    memory_mb) that more urgent tasks elsewhere wait for, kept free from every task of a greater rank."""
    start, waiting, refused = [], {}, {}
    kept = list(kept)
    for task in tasks:
        need = task.resources
        if need is None:
            start.append(task)
            continue
        cpus, memory = need.cpus or 0.0, need.memory_mb or 0
        ahead = [k for k in kept if k[0] < task.priority.rank]
        busy_cpus = min(total.cpus, used_cpus + sum(k[1] for k in ahead))
        busy_memory = used_memory_mb + sum(k[2] for k in ahead)
        room = total.memory_mb if total.memory_mb is not None else busy_memory + memory  # unknown: it fits
        busy_memory = min(room, busy_memory)
        if need.gpus:
            refused[task.id] = f"needs {need.gpus:g} GPU(s); the local runner has none (use --runner ray)"
        elif cpus > total.cpus or memory > room:
            refused[task.id] = (f"needs {cpus:g} CPU(s) and {memory} MB; this machine has {total.cpus:g} CPU(s) "
                                f"and {_mb(total.memory_mb)} (lower `resources` or use --runner ray)")
        elif busy_cpus + cpus > total.cpus or busy_memory + memory > room:
            waiting[task.id] = (f"waiting for {cpus:g} CPU(s) and {memory} MB "
                                f"({max(0.0, total.cpus - busy_cpus):g} CPU(s)"
                                + (f", {max(0, room - busy_memory)} MB" if total.memory_mb is not None else "")
                                + " free" + (", the rest kept for a more urgent task of another order" if ahead
                                             else "") + ")")
            # What is free is kept for it from the tasks ranked after it: else each CPU it waits for goes to the
            # next smaller task as it frees, and a P0 that needs two waits behind every P3 that needs one.
            used_cpus = max(used_cpus, min(total.cpus, used_cpus + cpus))
            used_memory_mb = max(used_memory_mb, min(room, used_memory_mb + memory))
        else:
            used_cpus += cpus
            used_memory_mb += memory
            start.append(task)
    return start, waiting, refused


def _mb(value: int | None) -> str:
    return f"{value} MB" if value is not None else "memory it cannot read"


class Refusals(Mapping[str, str]):
    """Id → why, of the tasks among `tasks` that can never start on a machine of `total()` (fit's third part),
    found task by task as the plan asks (it stops at the first free slots): over every ready task at each plan, a
    run of a thousand ready tasks was quadratic. `total` is read at the first task that declares resources."""

    def __init__(self, tasks: Mapping[str, Task], total: Callable[[], Capacity]):
        self._tasks, self._total, self._known = tasks, total, {}
        self._capacity: Capacity | None = None

    def _why(self, tid: str) -> str | None:
        if tid not in self._known:
            task = self._tasks[tid]
            if task.resources is not None and self._capacity is None:
                self._capacity = self._total()
            self._known[tid] = fit([task], self._capacity, 0.0, 0)[2].get(tid) if task.resources else None
        return self._known[tid]

    def __contains__(self, tid: object) -> bool:
        return tid in self._tasks and self._why(tid) is not None

    def __getitem__(self, tid: str) -> str:
        why = self._why(tid) if tid in self._tasks else None
        if why is None:
            raise KeyError(tid)
        return why

    def __iter__(self) -> Iterator[str]:
        return (tid for tid in self._tasks if tid in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)
