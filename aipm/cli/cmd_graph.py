"""`aipm graph`: an order's dependency graph as Mermaid or DOT text."""

from __future__ import annotations

import sys

from aipm.cli.decl import Argument, Option, command

from aipm.cli.common import get_project
from aipm.errors import UserError
from aipm.graph import RENDERERS
from aipm.store import load_order


@command()
def graph(
    order: str = Argument(..., help="Order id or directory."),
    fmt: str = Option("mermaid", "--format", "-f", help="mermaid (renders on GitHub) or dot (Graphviz)."),
) -> None:
    """Print the dependency graph of an order (edges from a dependency to the task waiting on it).

    Nodes are coloured by status. Examples: `aipm graph ORD > ord.mmd`; `aipm graph ORD --format dot | dot -Tsvg`.
    """
    render = RENDERERS.get(fmt)
    if render is None:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(RENDERERS)}")
    project = get_project()
    sys.stdout.write(render(load_order(project.order_dir(order), project.root)))
