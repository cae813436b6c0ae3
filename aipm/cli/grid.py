"""Tables for the terminal, drawn as Rich draws its default table (a heavy head, a light body), in a few string
operations per cell.

Rich measures and renders every cell through its segment machinery: `aipm status` took 3.6 s for an order of 5,000
tasks (0.23 s with --json), nearly all of it in the table. The layout follows Rich's: each column as wide as its
widest cell; on a narrow terminal the widest wrappable columns give way first, then all of them evenly; a column's
min_width holds even then, and no column is left narrower than one character (Rich's could be none). A cell is
text, or runs of (text, style); it wraps at spaces, a word longer than its column (a path) folds across lines, and
a no_wrap column is never broken; a control character in it is a "?" (see plain). Colour as Rich gives it: on a
terminal (or TTY_COMPATIBLE=1, or FORCE_COLOR set), not with TERM=dumb; NO_COLOR keeps bold and italic.
"""

from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TextIO

Runs = Sequence[tuple[str, str]]  # (text, style) runs of one cell; style: Rich style words such as "bold red"
Cell = str | Runs
_Cell = tuple[Runs, str, int]  # a cell's runs, its text, and the cells its widest line takes
_Line = tuple[Runs, int]  # a line of a cell drawn: its runs and the cells they take

_SGR = {"bold": "1", "dim": "2", "italic": "3", "underline": "4", "red": "31", "green": "32", "yellow": "33",
        "blue": "34", "magenta": "35", "cyan": "36", "white": "37"}
_COLOURS = frozenset({"31", "32", "33", "34", "35", "36", "37"})
_WORD = re.compile(r"\s*\S+\s*")
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f]")  # any control character but a line break


@dataclass
class Column:
    header: str
    no_wrap: bool = False
    min_width: int | None = None


class Grid:
    def __init__(self, columns: Sequence[Column], title: str = ""):
        self.columns, self.title = list(columns), plain(title)
        self.rows: list[list[_Cell]] = []

    def add_row(self, *cells: Cell) -> None:
        self.rows.append([_cell(((plain(cell), ""),) if isinstance(cell, str) else [(plain(t), s) for t, s in cell])
                          for cell in cells])

    def lines(self, width: int | None, styles: Styles) -> Iterator[str]:
        """The table as lines of text, fitted to `width` columns (None: as wide as its cells)."""
        header = [_cell([(c.header, "bold")]) for c in self.columns]
        widths = self._widths([header, *self.rows], width)
        heavy, light = "━", "─"
        if self.title:  # at the left edge, as Rich prints it where lines are not wrapped to the terminal
            yield styles.paint([(self.title, "italic")])
        yield "┏" + "┳".join(heavy * w for w in widths) + "┓"
        yield from self._row(header, widths, "┃", styles, bottom=True)
        yield "┡" + "╇".join(heavy * w for w in widths) + "┩"
        for row in self.rows:
            yield from self._row(row, widths, "│", styles)
        yield "└" + "┴".join(light * w for w in widths) + "┘"

    def _widths(self, rows: list[list[_Cell]], width: int | None) -> list[int]:
        """Each column's width with its padding (one space each side), as Rich's Table lays them out."""
        room = None if width is None else width - len(self.columns) - 1
        wrappable = [not c.no_wrap for c in self.columns]
        least = [0 if c.min_width is None else c.min_width + 2 for c in self.columns]
        widths = [max(row[i][2] for row in rows) + 2 for i in range(len(self.columns))]
        # Measured as Rich measures a column, before the layout: no wider than the room (a wrappable one), no
        # narrower than its min_width (applied only afterwards, it pushed the table past the terminal).
        widths = [max(w if room is None or not ok else min(w, room), floor)
                  for w, ok, floor in zip(widths, wrappable, least)]
        if room is not None and sum(widths) > room:
            widths = _collapse(widths, wrappable, room)
            if sum(widths) > room:  # then every wrappable column evenly; a no_wrap one is never broken
                widths = _reduce(sum(widths) - room, [int(ok) for ok in wrappable], widths, widths)
        return [max(w, 3, floor) for w, floor in zip(widths, least)]  # (as Rich clamps its second measure)

    def _row(self, row: list[_Cell], widths: list[int], bar: str, styles: Styles, bottom: bool = False
             ) -> Iterator[str]:
        columns = [_drawn_lines(cell, w, not c.no_wrap, styles) for cell, w, c in zip(row, widths, self.columns)]
        height = max(map(len, columns))
        if height == 1:  # most rows: one line, drawn without the alignment below
            yield bar + bar.join([lines[0] for lines in columns]) + bar
            return
        for n, (lines, w) in enumerate(zip(columns, widths)):
            if len(lines) < height:
                blank = [" " * w] * (height - len(lines))
                columns[n] = blank + lines if bottom else lines + blank  # a header sits on the table's body
        for parts in zip(*columns):
            yield bar + bar.join(parts) + bar


class Styles:
    """Whether (and how far) styles reach the output."""

    def __init__(self, colour: bool, no_colour: bool = False):
        self.colour, self.no_colour = colour, no_colour

    @classmethod
    def of(cls, stream: TextIO = sys.stdout) -> Styles:
        return cls(_is_terminal(stream) and os.environ.get("TERM", "").lower() not in ("dumb", "unknown"),
                   bool(os.environ.get("NO_COLOR")))

    def paint(self, runs: Runs) -> str:
        if not self.colour:
            return _text(runs) if runs else ""
        out = []
        for text, style in runs:
            codes = [_SGR[w] for w in style.split() if w in _SGR and not (self.no_colour and _SGR[w] in _COLOURS)]
            out.append(f"\x1b[{';'.join(codes)}m{text}\x1b[0m" if codes and text else text)
        return "".join(out)


def fitting(wide: bool = False, stream: TextIO = sys.stdout) -> int | None:
    """The width a table is fitted to: None (as wide as its cells) with --wide, or in a pipe or a file without
    COLUMNS (like git and kubectl: `less -S` scrolls it; Rich broke words inside narrow cells at 80); else
    COLUMNS, or the terminal's width."""
    columns = os.environ.get("COLUMNS", "")
    if wide:
        return None
    if columns.isdecimal():
        return int(columns)
    if not _is_terminal(stream):
        return None
    for fd in (stream, sys.stdin):
        try:
            return os.get_terminal_size(fd.fileno()).columns
        except (AttributeError, OSError, ValueError):
            continue
    return 80


def plain(text: str) -> str:
    """`text` as it is safe to write to a terminal: a tab as the spaces to its next stop (as Rich drew it), any
    other control character "?". A worker writes a task's reason (and could name a path): its BEL, backspace or
    carriage return (which Rich dropped) would ring or overwrite the table, its escape sequences (which Rich let
    through) clear the screen or retitle the terminal."""
    return text if text.isprintable() else _CONTROL.sub("?", text.expandtabs())


def _is_terminal(stream: TextIO) -> bool:
    tty = os.environ.get("TTY_COMPATIBLE", "")
    if tty in ("0", "1"):
        return tty == "1"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _text(runs: Runs) -> str:
    return runs[0][0] if len(runs) == 1 else "".join(text for text, _ in runs)


def _cells(text: str) -> int:
    """How many cells `text` takes on a terminal: one a character but for the wide (two) and combining (none),
    each distinct character looked up once."""
    if text.isascii():
        return len(text)
    return len(text) + sum((_char_cells(c) - 1) * text.count(c) for c in set(text) if not c.isascii())


@functools.lru_cache(maxsize=4096)
def _char_cells(char: str) -> int:
    from rich.cells import cell_len  # (Rich's table of widths: loaded only for text that is not ASCII)

    return cell_len(char)


def _cell(runs: Runs) -> _Cell:
    text = runs[0][0] if len(runs) == 1 else "".join([text for text, _ in runs])
    size = len if text.isascii() else _cells
    return runs, text, size(text) if "\n" not in text else max(map(size, text.split("\n")))


def _drawn(runs: Runs) -> _Line:
    return runs, sum(_cells(text) for text, _ in runs)


def _drawn_lines(cell: _Cell, w: int, wrap: bool, styles: Styles) -> list[str]:
    """The cell's lines drawn in a column `w` wide with its padding. A cell whose lines all fit is drawn from its
    text as it is (`status` of 10,000 tasks spent most of its table cutting such cells into runs and painting them)."""
    runs, text, widest = cell
    fits = not wrap or widest <= w - 2
    if fits and "\n" not in text and text[-1:] != " ":
        return [" " + (styles.paint(runs) if styles.colour else text) + " " * (w - 1 - widest)]
    if fits and not styles.colour:  # (a task's target files, one to a line)
        size = len if text.isascii() else _cells
        return [" " + line + " " * (w - 1 - size(line)) for line in map(str.rstrip, text.split("\n"))]
    return [" " + styles.paint(line) + " " * (w - 1 - used) for line, used in _wrap(cell, w - 2, wrap)]


def _wrap(cell: _Cell, width: int, wrap: bool) -> list[_Line]:
    """The cell's lines at `width`: runs cut where the text breaks (its own line breaks, and the wrap's); a word
    longer than `width` folds."""
    runs, text, widest = cell
    fits = not wrap or widest <= width
    if "\n" not in text and fits:  # most cells: one line that fits
        return [(runs, widest) if text[-1:] != " " else _drawn(_rstrip(list(runs)))]
    if len(runs) == 1 and (fits or width <= 0):  # lines of one style that all fit (a task's target files)
        style = runs[0][1]
        return [([(line, style)], _cells(line)) if line else ([], 0) for line in map(str.rstrip, text.split("\n"))]
    cuts: list[int] = []  # offsets where a line ends (its trailing spaces dropped when shown)
    at = 0
    for line in text.split("\n"):
        if wrap and width > 0 and _cells(line) > width:
            cuts += [at + b for b in _breaks(line, width)]
        at += len(line) + 1
        cuts.append(at - 1)
    out, start = [], 0
    for end in cuts:
        out.append(_drawn(_rstrip(_slice(runs, start, end))))
        start = end + 1 if end < len(text) and text[end] == "\n" else end
    return out


def _breaks(line: str, width: int) -> list[int]:
    """Offsets to break `line` at to fit `width` cells: Rich's divide_line (rich/_wrap.py)."""
    breaks: list[int] = []
    used = 0
    for match in _WORD.finditer(line):
        start, word = match.start(), match.group(0)
        length = _cells(word.rstrip())
        if width - used >= length:
            used += _cells(word)
        elif length > width:
            pieces = _chop(word, width)
            for n, piece in enumerate(pieces):
                if start:
                    breaks.append(start)
                if n == len(pieces) - 1:
                    used = _cells(piece)
                else:
                    start += len(piece)
        elif used and start:
            breaks.append(start)
            used = _cells(word)
    return breaks


def _chop(word: str, width: int) -> list[str]:
    """`word` in pieces of `width` cells (a wide character that would straddle the edge starts the next)."""
    pieces, piece, used = [], "", 0
    for char in word:
        size = _cells(char)
        if used + size > width and piece:
            pieces.append(piece)
            piece, used = "", 0
        piece += char
        used += size
    return [*pieces, piece] if piece else pieces


def _slice(runs: Runs, start: int, end: int) -> list[tuple[str, str]]:
    out, at = [], 0
    for text, style in runs:
        lo, hi = max(start, at), min(end, at + len(text))
        if lo < hi:
            out.append((text[lo - at:hi - at].replace("\n", ""), style))
        at += len(text)
    return out


def _rstrip(runs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    while runs and not runs[-1][0].rstrip():
        runs.pop()
    if runs:
        runs[-1] = (runs[-1][0].rstrip(), runs[-1][1])
    return runs


def _collapse(widths: list[int], wrappable: list[bool], room: int) -> list[int]:
    """Narrow the widest wrappable columns, towards the next widest, until the table fits (Rich's rule)."""
    excess = sum(widths) - room
    while excess > 0 and any(wrappable):
        widest = max(w for w, ok in zip(widths, wrappable) if ok)
        second = max((w for w, ok in zip(widths, wrappable) if ok and w != widest), default=0)
        ratios = [1 if ok and w == widest else 0 for w, ok in zip(widths, wrappable)]
        if not any(ratios) or widest == second:
            break
        widths = _reduce(excess, ratios, [min(excess, widest - second)] * len(widths), widths)
        excess = sum(widths) - room
    return widths


def _reduce(total: int, ratios: list[int], maximums: list[int], values: list[int]) -> list[int]:
    """Take `total` off `values` in proportion to `ratios`, at most `maximums` each (Rich's ratio_reduce)."""
    ratios = [r if m else 0 for r, m in zip(ratios, maximums)]
    left, weight, out = total, sum(ratios), []
    for ratio, most, value in zip(ratios, maximums, values):
        if ratio and weight > 0:
            cut = min(most, round(ratio * left / weight))
            out.append(value - cut)
            left -= cut
            weight -= ratio
        else:
            out.append(value)
    return out


def print_lines(lines: Iterable[str], stream: TextIO = sys.stdout) -> None:
    stream.write("".join(line + "\n" for line in lines))
