"""Where things are: the project root, its settings file, its orders, and how ORDER/TASK arguments resolve."""

from __future__ import annotations

import errno
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from aipm.errors import UserError, ValidationError
from aipm.settings import holds_settings
from aipm.store import NOT_TASKS, ORDER_FILE, SETTINGS_FILE as CONFIG_FILE, order_meta, task_names

RUNTIME_DIR = ".aipm"


def find_root(start: str | os.PathLike | None = None) -> Path:
    """Nearest ancestor holding aipm.yaml (or pyproject.toml's [tool.aipm], its alternative); else the top of the git
    work tree; else the working directory."""
    here = Path(start or os.getcwd()).resolve()
    for d in (here, *here.parents):
        if holds_settings(d):
            return d
    for d in (here, *here.parents):
        if (d / ".git").exists():
            return d
    return here


def name_too_long(what: str):
    """Decorate a look-up of (project, arg): an `arg` with a name longer than a file system holds (NAME_MAX, 255
    bytes) ended every command given it in an OSError traceback (File name too long) at the first look; it is
    one line naming the argument now."""
    def decorate(function):
        @functools.wraps(function)
        def looked_up(*args, **kwargs):
            try:
                return function(*args, **kwargs)
            except OSError as exc:
                if exc.errno != errno.ENAMETOOLONG:
                    raise
                arg = str(args[1])
                shown = repr(arg) if len(arg) <= 60 else f"{arg[:40]!r}... ({len(arg)} characters)"
                raise UserError(f"{what} {shown}: a name too long for a file (at most 255 bytes)") from None
        return looked_up
    return decorate


class AmbiguousOrder(UserError):
    """An ORDER argument that is one order's directory name and another order's id."""


class TaskNotFound(UserError):
    """A task id found in no order."""


@dataclass(frozen=True)
class Project:
    root: Path
    orders_dir: str = "orders"

    @property
    def runtime(self) -> Path:
        return self.root / RUNTIME_DIR

    @name_too_long("order")
    def order_dir(self, arg: str, empty_ok: bool = False) -> Path:
        """An order id (`ORDER_090` → <root>/orders/ORDER_090) or a path to an order directory (`empty_ok`: also
        one that holds nothing yet, for `add`)."""
        if not arg.strip():  # it would name the directory of the orders itself
            raise UserError("ORDER: empty; name an order id or the path of an order directory")
        # Only one name is looked up in orders_dir: `.` there was the orders directory itself (an order of no
        # tasks, so `aipm run .` inside an order directory ran nothing and exited 0).
        name = arg.rstrip("/")
        by_id = self.root / self.orders_dir / arg
        if name not in ("", ".", "..") and "/" not in name and by_id.is_dir():
            ids = self.order_ids()
            self._one_meaning(arg, by_id, ids)
            return self.check_unique(by_id, ids)
        as_path = Path(arg)
        if not as_path.is_absolute():
            as_path = Path(os.getcwd()) / as_path
        if as_path.is_dir():
            found = as_path.resolve()
            orders = (self.root / self.orders_dir).resolve()
            if found == orders:  # it holds orders; its task files are none
                raise UserError(f"order {arg!r}: {found} is the directory of the orders, not an order; give an "
                                f"order id ({self.orders_here()}) or a path to an order directory")
            if not empty_ok and found.parent != orders and not (found / ORDER_FILE).is_file() \
                    and not task_names(found):
                # `aipm run src`, `aipm status .`: an order of no tasks, which ran nothing and exited 0 (one in
                # orders_dir is an order, emptied or not: its workers may outlive its deleted task files)
                raise UserError(f"order {arg!r}: {found} holds no {ORDER_FILE} and no task file, so it is no order; "
                                f"give an order id ({self.orders_here()}) or a path to an order directory")
            return self.check_unique(found)
        if as_path.is_file():  # `aipm status orders/O1/T1.yaml`: said "no such path"
            raise UserError(f"order {arg!r}: {as_path} is a file, not an order directory; give an order id "
                            f"({self.orders_here()}) or a path to an order directory")
        # The id order.yaml gives, which every command reports, names its order too (orders/sprint-12 → ORDER_012).
        ids = self.order_ids()
        named = [d for d in self.order_dirs() if ids.get(d.resolve(), ("",))[0] == arg]
        if named:  # two or more: check_unique names the other one, as for a directory name
            return self.check_unique(named[0], ids)
        if "/" not in name and by_id.exists() and not by_id.is_dir():  # said "no directory ...; `aipm new F`"
            raise UserError(f"order {arg!r}: {self.orders_dir}/{name} under {self.root} is a file, not an order "
                            f"directory; give an order id ({self.orders_here(ids)}) or a path to an order directory")
        if by_id.is_dir():  # `group/ORD` below orders_dir: a path, taken from the working directory
            raise UserError(f"order {arg!r}: no such path from {os.getcwd()}; only a single name is looked up in "
                            f"{self.orders_dir}: give the path {os.path.normpath(by_id)}")
        from_root = self.root / arg
        if "/" in name and not as_path.exists() and from_root.is_dir():
            # `orders/ORD` typed in src/, or with --root from elsewhere: "no directory orders/orders/ORD"
            raise UserError(f"order {arg!r}: no such path from {os.getcwd()}; a path is taken from the working "
                            f"directory, not the project root: give the path {os.path.normpath(from_root)}")
        if "/" in name:  # a path, never looked up in orders_dir: `/x/O` was "no directory orders//x/O under ROOT"
            raise UserError(f"order {arg!r}: no such directory {os.path.normpath(as_path)}; give an order id "
                            f"({self.orders_here(ids, Path(name).name)}) or a path to an order directory")
        raise UserError(
            f"order {arg!r}: no directory {self.orders_dir}/{arg} under {self.root} and no such path; "
            f"give an order id ({self.orders_here(ids, arg)}) or a path to an order directory"
        )

    def orders_here(self, ids: dict[Path, tuple[str, Path]] | None = None, new: str = "ORDER") -> str:
        """The order ids a user may give, for a message about a wrong or missing one; or how to make the first."""
        known = sorted(order_id for order_id, _ in (self.order_ids() if ids is None else ids).values())
        if not known:
            return f"no order yet: `aipm new {new}` makes one"
        return f"orders here: {', '.join(known[:10])}{', ...' if len(known) > 10 else ''}"

    def _one_meaning(self, arg: str, order_dir: Path, ids: dict[Path, tuple[str, Path]]) -> None:
        """`arg` names the directory `order_dir`, whose id is something else: refused when another order's id is
        `arg`, since every command reports that other order by that name (a silent pick would run, cancel or
        retry the wrong order). A path to the directory says which."""
        mine = ids.get(order_dir.resolve())
        if mine is None or mine[0] == arg:
            return
        clash = _other_with_id(ids, arg, order_dir)
        if clash is not None:
            other, source = clash
            raise AmbiguousOrder(
                f"order {arg!r} is ambiguous: {self.orders_dir}/{arg} is the directory of order {mine[0]!r}, and "
                f"{source} gives {arg!r} as its id; give a path to the order directory "
                f"({self.root / self.orders_dir / arg} or {other})")

    def order_dirs(self) -> list[Path]:
        base = self.root / self.orders_dir
        if not base.is_dir():
            if os.path.lexists(base):
                raise UserError(f"{base}: orders_dir names {'a link to nothing' if base.is_symlink() else 'a file'}, "
                                "not a directory; fix orders_dir in aipm.yaml (or move the file away)")
            return []
        return sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))

    def order_ids(self) -> dict[Path, tuple[str, Path]]:
        """Each order directory of the project (resolved) → its id and the file or directory that gives it.
        Orders that do not load are left out: they cannot run, so they share nothing."""
        ids = {}
        for d in self.order_dirs():
            try:
                order_id, _, source, _ = order_meta(d)
            except ValidationError:
                continue
            ids[d.resolve()] = (order_id, source or d)
        return ids

    def check_unique(self, order_dir: Path, ids: dict[Path, tuple[str, Path]] | None = None) -> Path:
        """`order_dir`, unless another order of the project has the same id: runtime state (worker records,
        logs, exit codes) is kept per order id, so two such orders would adopt each other's workers."""
        ids = self.order_ids() if ids is None else ids
        mine = ids.get(order_dir.resolve())
        if mine is None:  # outside orders_dir, or broken (its own load reports that)
            try:
                order_id, _, source, _ = order_meta(order_dir)
            except ValidationError:
                return order_dir
            mine = (order_id, source or order_dir)
        clash = _other_with_id(ids, mine[0], order_dir)
        if clash is not None:
            others = [str(source) for d, (i, source) in ids.items() if i == mine[0] and d != order_dir.resolve()]
            raise IdClash(mine[0], str(mine[1]), "id" if mine[1].is_file() else None,
                          f"order id {mine[0]!r} is also the id of {' and '.join(others)}; "
                          "give each order its own id (runtime state is kept per id)")
        return order_dir


class IdClash(ValidationError):
    """Two or more orders of the project give one id (`validate` says so once, not once per order)."""

    def __init__(self, order_id: str, *args):
        self.order_id = order_id
        super().__init__(*args)


def _other_with_id(ids: dict[Path, tuple[str, Path]], order_id: str, order_dir: Path) -> tuple[Path, Path] | None:
    """An order other than `order_dir` whose id is `order_id`: its directory and the file or directory giving the
    id (`ids` as Project.order_ids gives them); None when there is none."""
    here = order_dir.resolve()
    return next(((d, source) for d, (i, source) in ids.items() if i == order_id and d != here), None)


@name_too_long("task")
def find_task(project: Project, arg: str) -> tuple[Path, str]:
    """A task given as an id, `ORDER/TASK`, or a path to its file → (order directory, task id)."""
    if not arg.strip():
        raise UserError("TASK: empty; give a task id, ORDER/TASK or the path of a task file")
    path = Path(arg)
    name = arg.rpartition("/")[2]
    name = name if name.endswith(".yaml") else f"{name}.yaml"
    if name in NOT_TASKS:  # (`why ORD/order` was a KeyError traceback, `why order` "in several orders")
        raise UserError(f"task {arg!r}: {name} is no task file (it is read as the "
                        f"{'order' if name == ORDER_FILE else 'settings'} file)")
    if arg.endswith(".yaml") and path.is_file():
        return project.check_unique(path.resolve().parent), path.stem
    if "/" in arg:
        try:
            return _in_order(project, arg)
        except UserError:
            _not_an_order(project, arg)  # `cancel orders/ORD`: "order 'orders': ... the directory of the orders"
            raise
    hits = [d for d in project.order_dirs() if (d / f"{arg}.yaml").is_file()]
    if not hits and arg.endswith(".yaml"):  # `aipm why A.yaml`: the file's name for the id, as `ORD/A.yaml` above
        arg = arg[:-len(".yaml")]
        hits = [d for d in project.order_dirs() if (d / f"{arg}.yaml").is_file()]
    if len(hits) == 1:
        return project.check_unique(hits[0]), arg
    if not hits:
        _not_an_order(project, arg)
        raise TaskNotFound(f"task {arg!r}: not found in any order under {project.root / project.orders_dir}; "
                        "give ORDER/TASK or a path to the task file")
    names = ", ".join(f"{d.name}/{arg}" for d in hits)
    raise UserError(f"task {arg!r} is in several orders ({names}); say which, as ORDER/TASK")


def _in_order(project: Project, arg: str) -> tuple[Path, str]:
    """A task given as `ORDER/TASK` (ORDER an id or a path) → (order directory, task id)."""
    order, _, task = arg.rpartition("/")
    if not task or not order.strip("/"):  # `ORD/`, `/etc`: said "no file .yaml", "ORDER: empty"
        raise UserError(f"task {arg!r}: give ORDER/TASK (an order, then a task id) or a path to the task file")
    order_dir = project.order_dir(order)
    if (order_dir / f"{task}.yaml").is_file():
        return order_dir, task
    if task.endswith(".yaml") and (order_dir / task).is_file():  # `ORD/A.yaml`: the file's name for the id
        return order_dir, task[:-len(".yaml")]
    hint = "; task files end in .yaml" if task.endswith(".yml") else ""
    raise UserError(f"task {arg!r}: no file {task.removesuffix('.yaml')}.yaml in {order_dir}{hint}")


def _not_an_order(project: Project, arg: str) -> None:
    """Raise if `arg`, given for a task, names an order: `aipm cancel ORD` (meant for the whole order) said "task
    'ORD': not found in any order" of an order it lists, and `aipm why orders/ORD` "order 'orders': ... is the
    directory of the orders", a directory the user never named. (Checked only once the task is not found.)"""
    try:
        order_dir = project.order_dir(arg)
    except UserError:
        return
    named = [f"{arg.rstrip('/')}/{name[:-len('.yaml')]}" for name in task_names(order_dir)]
    some = f" ({', '.join(named[:3])}{', ...' if len(named) > 3 else ''})" if named else ""
    raise UserError(f"task {arg!r}: {order_dir} is an order, not a task; give ORDER/TASK, a task of it{some}")
