"""Priority across orders: a worker slot kept for a more urgent task another run is waiting to start.

Each `run` plans its own order, and the worker limit is the project's. Without a word between them, the run
whose worker ended takes the slot for its own next task, so a P0 of one order waited behind every P3 of a busy
one. A run (or exec) whose plan has a ready task waiting only for a slot says so here: the best priority
waiting, in a file of its order's in the state directory, with its own pid and start time. Another owner
planning with slots free leaves one per such demand more urgent than its candidate, and that run, woken by the
worker's end (runs watch every worker), takes it. A demand is written when it changes (not per round), removed
when its run ends, and ignored once its process is gone (a killed run's). Written and read under the launch lock.
A task waiting for this machine's CPUs or memory (`resources:`) is said the same way, with what it asks for (a
`.need` file): the other runs keep that much free from their less urgent tasks (capacity.fit).
"""

from __future__ import annotations

import os
from pathlib import Path

from aipm.digest import sha1
from aipm.liveness import process_alive, process_ctime
from aipm.model import Priority, Task
from aipm.workerfiles import open_regular, write_bytes

_BY_RANK = {p.rank: p for p in Priority}


class Demands:
    """One process's view of the project's demands: its own (published) and the others' (read per plan)."""

    def __init__(self, state: Path):
        self.dir = f"{state}/demand"
        self._mine: dict[str, tuple[Priority, int] | None] = {}  # order → what this process last said for it

    def publish(self, order_id: str, waiting: Priority | None, max_workers: int = 0) -> None:
        """Say that `order_id`'s best ready task waiting for a slot has priority `waiting` (None: none waits), in a
        run whose worker limit is `max_workers` (a slot kept for it is one it can take only below that)."""
        said = None if waiting is None else (waiting, max_workers)
        self._say(order_id, SLOT, said, lambda: f"{waiting.rank} {max_workers}")

    def publish_need(self, order_id: str, waiting: Task | None) -> None:
        """Say that `order_id`'s best ready task waiting for this machine's CPUs or memory (`resources:`, not a slot)
        is `waiting` (None: none waits): the runs of other orders keep that much free from their less urgent
        tasks, as fit() keeps it from the tasks ranked after it in one plan."""
        need = waiting.resources if waiting is not None else None
        said = None if need is None else (waiting.priority, float(need.cpus or 0), int(need.memory_mb or 0))
        self._say(order_id, NEED, said, lambda: f"{said[0].rank} {said[1]!r} {said[2]}")

    def _say(self, order_id: str, kind: str, said: tuple | None, words) -> None:
        """Write (or, `said` None, remove) this process's word of `kind` for the order, when it changed."""
        path = f"{self.dir}/{_name(order_id, kind)}"
        if self._mine.get((kind, order_id), False) == said and (said is None or os.path.exists(path)):
            return  # said already (and still there: a worker may have removed the state directory)
        try:
            if said is None:
                os.unlink(path)
            else:
                pid = os.getpid()
                os.makedirs(self.dir, exist_ok=True)
                write_bytes(Path(path), f"{words()} {pid} {process_ctime(pid)!r} {order_id}\n"
                            .encode(errors="surrogateescape"))  # (regular files only: a FIFO there is refused)
        except FileNotFoundError:
            pass  # nothing to withdraw (a worker removed the state directory)
        except OSError:
            return  # unwritable (a full disk, a file where the directory goes): a courtesy, tried again next plan
        self._mine[(kind, order_id)] = said

    def said(self, order_id: str) -> tuple[Priority, int] | None:
        """What this process last said for `order_id` (priority, worker limit)."""
        return self._mine.get((SLOT, order_id))

    def withdraw(self) -> None:
        """Remove this process's demands (its run ends)."""
        for kind, order_id in list(self._mine):
            self._say(order_id, kind, None, str)

    def ahead_of(self, order_id: str, least: Priority, live: int) -> list[tuple[str, Priority]]:
        """(order, priority) of the live demands of other orders more urgent than `least` whose runs could take a
        slot with `live` workers alive in the project (a run whose own limit is reached cannot)."""
        return [(other, priority) for priority, limit, other in
                self._read(order_id, SLOT, lambda rank, limit: (_BY_RANK[int(rank)], int(limit)))
                if priority.rank < least.rank and limit > live]

    def needs_ahead(self, order_id: str) -> list[tuple[int, float, int]]:
        """(rank, cpus, memory_mb) of the live needs other orders' runs said (publish_need)."""
        return [need[:3] for need in self._read(
            order_id, NEED, lambda rank, cpus, memory: (_BY_RANK[int(rank)].rank, float(cpus), int(memory)))]

    def _read(self, order_id: str, kind: str, parse) -> list[tuple]:
        """parse(*words) and the order, of each live demand of `kind` of the other orders than `order_id`."""
        try:
            names = os.listdir(self.dir)
        except (FileNotFoundError, NotADirectoryError):
            return []
        mine, found = _name(order_id, kind), []
        for name in names:
            if name == mine or not name.endswith(f".{kind}"):
                continue
            try:
                fd = open_regular(f"{self.dir}/{name}")  # (a worker may leave a FIFO or a link to /dev/zero)
                try:
                    text = os.read(fd, 512).decode(errors="surrogateescape")
                finally:
                    os.close(fd)
                *words, pid, ctime, other = text.rstrip("\n").split(" ", _WORDS[kind] + 2)
                if len(words) == _WORDS[kind] and process_alive(int(pid), float(ctime)):
                    found.append((*parse(*words), other))
            except (OSError, ValueError, KeyError):
                continue  # gone meanwhile, or not ours to read: no demand
        return found


SLOT, NEED = "demand", "need"  # a task waits for a worker slot / for this machine's CPUs or memory
_WORDS = {SLOT: 2, NEED: 3}  # what each says before its pid, start time and order


def _name(order_id: str, kind: str = SLOT) -> str:
    """A file name for the order (its id made safe, and told apart from ids that make the same safe name)."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "_.-") else "_" for c in order_id)
    return f"{safe}.{sha1(order_id.encode(errors='surrogateescape')).hexdigest()[:8]}.{kind}"
