"""aipm.cli.grid draws the tables Rich drew (status), line for line, at a fraction of the cost."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest
from rich.cells import cell_len
from rich.console import Console
from rich.table import Table

from aipm.cli import grid
from conftest import write_task

COLUMNS = [grid.Column("task"), grid.Column("status", no_wrap=True), grid.Column("depends on"),
           grid.Column("target files", min_width=12), grid.Column("reason")]
ROWS = [
    ["T1", "IN_PROGRESS", [("A", ""), (", ", ""), ("B✗", "red"), (", ", ""), ("C…", "bold")],
     "src/a_rather_long_directory_name/module.py\nREADME.md", "interrupted: its worker was lost with its supervisor"],
    ["T2", "QUEUED", "", "", ""],
    ["T3-界面", "DONE", "T1", "docs/界面/说明.md", "exit 0"],
    ["T4", "FAILED", "T1, T2, T3", "a   b", "  leading and   inner   spaces  "],
]


REASON = "interrupted: its worker was lost with its supervisor while it ran the tests"


def rich_lines(width: int, columns=COLUMNS, rows=ROWS, title: str = "Order ORD") -> str:
    table = Table(title=title)
    for column in columns:
        table.add_column(column.header, overflow="fold", no_wrap=column.no_wrap, min_width=column.min_width)
    for row in rows:
        table.add_row(*["".join(t for t, _ in cell) if isinstance(cell, list) else cell for cell in row])
    out = io.StringIO()
    Console(file=out, width=width, color_system=None, highlight=False, soft_wrap=True).print(table)
    return out.getvalue()


def grid_lines(width: int | None, styles: grid.Styles = grid.Styles(False), columns=COLUMNS, rows=ROWS,
               title: str = "Order ORD") -> str:
    table = grid.Grid(columns, title=title)
    for row in rows:
        table.add_row(*row)
    return "".join(line + "\n" for line in table.lines(width, styles))


@pytest.mark.parametrize("width", [400, 120, 90, 70, 60])
def test_the_grid_draws_what_rich_drew(width):
    """Wide, then narrower than the table: the reason and paths wrap and fold, the status stays whole, a wide
    character takes two cells, a path column keeps its min_width."""
    assert grid_lines(width) == rich_lines(width)


@pytest.mark.parametrize("width", [50, 60])
def test_a_min_width_wider_than_its_cells_is_laid_out_from_the_start(width):
    """Rich measures a column at its min_width before fitting the table: widened only afterwards, the path
    column pushed the table past the terminal (65 characters on a terminal of 50)."""
    columns, rows = [grid.Column("path", min_width=20), grid.Column("reason")], [["a.txt", REASON]]
    drawn = grid_lines(width, columns=columns, rows=rows, title="")
    assert drawn == rich_lines(width, columns, rows, title="")
    assert max(map(cell_len, drawn.splitlines())) <= width


@pytest.mark.parametrize("width", [16, 20])
def test_a_cell_wider_than_the_terminal_is_measured_at_the_terminal_s_width(width):
    """As Rich does, before the columns share what is left evenly: else they share it differently."""
    columns, rows = [grid.Column("task"), grid.Column("reason")], [["T1 and T2 and T3", REASON]]
    assert grid_lines(width, columns=columns, rows=rows, title="") == rich_lines(width, columns, rows, title="")


def test_unfitted_the_grid_is_as_wide_as_its_cells():
    lines = grid_lines(None).splitlines()
    assert "│ T1      │ IN_PROGRESS │ A, B✗, C…  │ src/a_rather_long_directory_name/module.py │" in lines[4], lines
    assert "│ T3-界面 │ DONE        │ T1         │ docs/界面/说明.md" in lines[7], lines  # (two cells a character)
    assert len({cell_len(line) for line in lines[1:]}) == 1  # every line of the frame as wide


def test_styles_reach_a_terminal_and_no_colour_keeps_bold():
    coloured = grid_lines(None, grid.Styles(True))
    assert "\x1b[1mtask\x1b[0m" in coloured and "\x1b[31mB✗\x1b[0m" in coloured and "\x1b[3mOrder ORD" in coloured
    plain = grid_lines(None, grid.Styles(True, no_colour=True))
    assert "\x1b[1mC…\x1b[0m" in plain and "B✗" in plain and "\x1b[31m" not in plain
    assert "\x1b" not in grid_lines(None)


def test_status_of_a_big_order_draws_without_rich(project):
    """`aipm status` drew 5,000 tasks through Rich's Table in 3.6 s (0.23 s with --json); it draws them itself
    now. Checked by what it loads, not by a timing: Rich's table and markup modules stay unloaded."""
    order = project.order()
    for i in range(50):
        write_task(order, f"T{i:02d}", command="true", depends_on=[f"T{i - 1:02d}"] if i else None,
                   target_files=[f"out/{i}"])
    code = ("import os, sys, aipm.cli as c\n"
            "leave = os._exit\n"  # (main leaves through os._exit: say what was loaded first)
            "def said(code):\n"
            "    sys.stderr.write(' '.join(m for m in ('rich.table', 'rich.markup') if m in sys.modules) or 'none')\n"
            "    sys.stderr.flush()\n"
            "    leave(code)\n"
            "os._exit = said\n"
            "c.main(['--root', sys.argv[1], 'status', 'ORD'])")
    proc = subprocess.run([sys.executable, "-c", code, str(project.root)], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "100"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "│ T49  │ QUEUED │ P1  │ T48…       │ out/49" in proc.stdout, proc.stdout
    assert proc.stdout.splitlines()[-1] == "QUEUED 50"
    assert proc.stderr == "none"


def test_control_characters_a_worker_wrote_reach_the_terminal_as_question_marks(project):
    """A task's reason (a worker writes it) and its paths go into tables and lines as text: a BEL, a backspace,
    a carriage return or an escape sequence there would ring, overwrite the table or clear the screen. A tab
    takes the spaces to its next stop, as Rich drew it, keeping the frame straight."""
    order = project.order()
    reason = "lost \x1b]0;owned\x07\x1b[2J\x1b[31mred\x1b[0m\rDONE\b\b\x9b tab\there"
    write_task(order, "A", command="true", target_files=["src/a\tb.py", "x\x1b[2Jy.txt"], reason=reason)
    write_task(order, "B", command="true", status="FAILED", reason=reason)
    control = {chr(c) for c in [*range(0x20), *range(0x7f, 0xa0)]} - {"\n"}
    for args in (("status", "ORD"), ("why", "ORD/A"), ("why", "ORD/B"), ("detect", "ORD")):
        proc = project.aipm(*args, env={"COLUMNS": "100", "TTY_COMPATIBLE": "0"})
        assert proc.returncode == 0, (args, proc.stderr)
        assert "?[2J" in proc.stdout and not set(proc.stdout) & control, (args, proc.stdout)
        frame = [line for line in proc.stdout.splitlines() if line[:1] in "┏┃┡│└"]
        assert len({cell_len(line) for line in frame}) <= 1, (args, proc.stdout)  # (why draws no table)


@pytest.mark.parametrize("width", [40, 12, 5, 0])
def test_a_cell_of_one_style_on_several_lines_is_cut_as_one_of_several_runs(width):
    """Such a cell (target files, one a line) takes a shorter way when every line fits: the lines it gives are
    those of the general way, which a cell of two runs takes (trailing blanks dropped, blank and empty lines kept
    empty, a line too wide folded)."""
    for text in ["src/a.py\nREADME.md", "a.py  \n   \n\nb.md\n", "x\ny ", "wide_name_here.py\nz", "界面\n说明.md"]:
        one = grid._wrap(grid._cell([(text, "bold")]), width, True)
        two = grid._wrap(grid._cell([(text[:1], "bold"), (text[1:], "bold")]), width, True)
        assert [(grid._text(runs), used) for runs, used in one] == [(grid._text(runs), used) for runs, used in two]
        assert all(style == "bold" for runs, _ in one for _, style in runs)
