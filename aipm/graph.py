"""An order's dependency graph as text: Mermaid (renders on GitHub) or DOT (Graphviz).

Pure: an Order in, a string out. Edges point from a dependency to the task that waits on it, so the graph
reads in execution order. Nodes are coloured by status. Task ids are file names and may hold any character,
so every id and label is escaped for the target language rather than trusted.
"""

from __future__ import annotations

import re

from aipm.model import Order, Status, Task, natural_key

# (fill, border) per status, in the spirit of `aipm status`: cyan waiting, yellow running, green finished,
# red needing a human, grey cancelled.
COLOURS: dict[Status, tuple[str, str]] = {
    Status.QUEUED: ("#e0f7fa", "#00838f"),
    Status.IN_PROGRESS: ("#fff9c4", "#f9a825"),
    Status.IN_REVIEW: ("#f3e5f5", "#8e24aa"),
    Status.DONE: ("#c8e6c9", "#2e7d32"),
    Status.COMPLETED: ("#a5d6a7", "#1b5e20"),
    Status.REWORK: ("#ffe0b2", "#ef6c00"),
    Status.REJECTED: ("#ffcdd2", "#c62828"),
    Status.FAILED: ("#ffcdd2", "#c62828"),
    Status.INTERRUPTED: ("#ffccbc", "#d84315"),
    Status.CANCELLED: ("#eeeeee", "#757575"),
}

TITLE_WIDTH = 40  # longer titles are cut: the graph is for shape, `aipm status` for detail


def _tasks(order: Order) -> list[Task]:
    return sorted(order.tasks.values(), key=lambda t: natural_key(t.id))


def _short(title: str) -> str:
    title = " ".join(title.split())
    return title if len(title) <= TITLE_WIDTH else title[: TITLE_WIDTH - 1] + "…"


def _label_lines(task: Task) -> list[str]:
    lines = [task.id, task.status.value]
    if task.title:
        lines.insert(1, _short(task.title))
    return lines


# ---- Mermaid ----------------------------------------------------------------------------------------------

# Mermaid node ids are a restricted syntax with reserved words (`end`, `graph`, ...), so nodes get synthetic
# ids (t0, t1, ...) and the task id lives only in the label.
_MERMAID_SAFE = re.compile(r"[A-Za-z0-9 _.:,()+/-]")


def _mermaid_text(text: str) -> str:
    """Every character that could end or re-open a label becomes a Mermaid entity code (#34; for a quote)."""
    return "".join(ch if _MERMAID_SAFE.fullmatch(ch) else f"#{ord(ch)};" for ch in text)


def mermaid(order: Order) -> str:
    tasks = _tasks(order)
    node = {t.id: f"t{i}" for i, t in enumerate(tasks)}
    lines = ["flowchart LR"]
    for t in tasks:
        label = "<br/>".join(_mermaid_text(part) for part in _label_lines(t))
        lines.append(f'    {node[t.id]}["{label}"]')
    for t in tasks:
        for dep in t.depends_on:
            lines.append(f"    {node[dep]} --> {node[t.id]}")
    used = sorted({t.status for t in tasks}, key=list(Status).index)
    for status in used:
        fill, border = COLOURS[status]
        lines.append(f"    classDef {status.value} fill:{fill},stroke:{border},color:#000")
        members = ",".join(node[t.id] for t in tasks if t.status == status)
        lines.append(f"    class {members} {status.value}")
    return "\n".join(lines) + "\n"


# ---- DOT --------------------------------------------------------------------------------------------------


def _dot_id(text: str) -> str:
    """A DOT quoted string. Backslashes are doubled too, or an id ending in `\\` would escape the closing quote."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def dot(order: Order) -> str:
    tasks = _tasks(order)
    lines = [
        f"digraph {_dot_id(order.id)} {{",
        "    rankdir=LR;",
        '    node [shape=box, style="rounded,filled", fontname="Helvetica"];',
    ]
    for t in tasks:
        fill, border = COLOURS[t.status]
        # In a label `\n` is a line break and `\\` a backslash, which is what _dot_id's escaping produces.
        label = _dot_id("\n".join(_label_lines(t)))
        lines.append(f'    {_dot_id(t.id)} [label={label}, fillcolor="{fill}", color="{border}"];')
    for t in tasks:
        for dep in t.depends_on:
            lines.append(f"    {_dot_id(dep)} -> {_dot_id(t.id)};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def as_data(order: Order) -> dict:
    """The graph for `aipm graph --json`: nodes with what colours them, and edges dependency → task."""
    tasks = _tasks(order)
    return {"order": order.id,
            "nodes": [{"id": t.id, "title": t.title, "status": t.status.value, "priority": t.priority.value}
                      for t in tasks],
            "edges": [{"from": dep, "to": t.id} for t in tasks for dep in t.depends_on]}


RENDERERS = {"mermaid": mermaid, "dot": dot}
