"""Where things are: the project root, its settings file, its orders, and how ORDER/TASK arguments resolve."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from aipm.errors import UserError

CONFIG_FILE = "aipm.yaml"
RUNTIME_DIR = ".aipm"


def find_root(start: str | os.PathLike | None = None) -> Path:
    """Nearest ancestor holding aipm.yaml; else the top of the git work tree; else the working directory."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if (d / CONFIG_FILE).is_file():
            return d
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d
    return here


@dataclass(frozen=True)
class Project:
    root: Path
    orders_dir: str = "orders"

    @property
    def runtime(self) -> Path:
        return self.root / RUNTIME_DIR

    def order_dir(self, arg: str) -> Path:
        """An order id (`ORDER_090` → <root>/orders/ORDER_090) or a path to an order directory."""
        by_id = self.root / self.orders_dir / arg
        if by_id.is_dir():
            return by_id
        as_path = Path(arg)
        if not as_path.is_absolute():
            as_path = Path(os.getcwd()) / as_path
        if as_path.is_dir():
            return as_path.resolve()
        raise UserError(
            f"order {arg!r}: no directory {self.orders_dir}/{arg} under {self.root} and no such path; "
            "give an order id or a path to an order directory"
        )

    def order_dirs(self) -> list[Path]:
        base = self.root / self.orders_dir
        if not base.is_dir():
            return []
        return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))



def find_task(project: Project, arg: str) -> tuple[Path, str]:
    """A task given as an id, `ORDER/TASK`, or a path to its file → (order directory, task id)."""
    path = Path(arg)
    if arg.endswith(".yaml") and path.is_file():
        return path.resolve().parent, path.stem
    if "/" in arg:
        order, _, task = arg.rpartition("/")
        order_dir = project.order_dir(order)
        if (order_dir / f"{task}.yaml").is_file():
            return order_dir, task
        raise UserError(f"task {arg!r}: no file {task}.yaml in {order_dir}")
    hits = [d for d in project.order_dirs() if (d / f"{arg}.yaml").is_file()]
    if len(hits) == 1:
        return hits[0], arg
    if not hits:
        raise UserError(f"task {arg!r}: not found in any order under {project.root / project.orders_dir}; "
                        "give ORDER/TASK or a path to the task file")
    names = ", ".join(f"{d.name}/{arg}" for d in hits)
    raise UserError(f"task {arg!r} is in several orders ({names}); say which, as ORDER/TASK")
