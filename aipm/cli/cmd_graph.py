"""`aipm graph`: an order's dependency graph as Mermaid or DOT text, or JSON."""

from __future__ import annotations

import sys

from aipm.board import as_seen
from aipm.cli.decl import Argument, Option, command

from aipm.cli.common import get_project, json_option, print_json
from aipm.errors import UserError
from aipm.graph import RENDERERS, as_data
from aipm.store import load_order


@command()
def graph(
    order: str = Argument(..., help="Order id or directory."),
    fmt: str = Option("mermaid", "--format", "-f", help="mermaid (renders on GitHub) or dot (Graphviz)."),
    json_out: bool = json_option("Mermaid or DOT text", "the nodes and edges as JSON ({order, nodes, edges})"),
) -> None:
    """Print the dependency graph of an order (edges from a dependency to the task waiting on it).

    Nodes are coloured by status; --json gives the nodes and edges as data. Examples: `aipm graph ORD > ord.mmd`;
    `aipm graph ORD --format dot | dot -Tsvg`.
    """
    render = RENDERERS.get(fmt)
    if render is None:
        raise UserError(f"--format: {fmt!r} is not one of {', '.join(RENDERERS)}")
    project = get_project()
    loaded = as_seen(load_order(project.order_dir(order), project.root), project.root)  # as `status` shows it
    if json_out:
        print_json(as_data(loaded))
        return
    sys.stdout.write(render(loaded))
