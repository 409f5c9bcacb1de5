"""What `aae-run` prints, with the standard library only: lines with a little colour, JSON and tables.

`aae-run` starts on inspection devices, where the cold start of one `score` is a target
(README, "Installed size and cold start"). Rich, which the training commands use for their
progress bars, took some 25 ms of it to import and to lay out one table; the runtime needs only
this much of it:

- lines with Rich's markup for a few styles (``[red]error:[/red] ...``; `escape` is Rich's own
  escaping, so a string escaped here prints the same through a Rich console, as the training
  commands' errors do);
- colour only where the stream is a terminal and ``NO_COLOR`` is unset (https://no-color.org);
- tables drawn as Rich draws them (a heavy-lined header), every row on one line in a file or a
  pipe, and in a terminal the folding columns (paths, errors) broken to fit its width.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import TextIO

_STYLES = {"bold": "1", "italic": "3", "red": "31", "yellow": "33"}  # SGR codes of the styles the runtime uses
_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")  # Rich's markup tag, after any backslashes
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
MIN_FOLD_WIDTH = 8  # a folding column is never made narrower than this to fit a terminal


def escape(text: str) -> str:
    """``text`` to print literally, whatever brackets it holds (a file named ``x[red]y.png``):
    Rich's escaping of tags (so a Rich console prints it alike), without its doubling of a final
    backslash (which protects a tag that follows; here escaped text is never followed by one)."""
    return _ESCAPE.sub(lambda m: f"{m.group(1)}{m.group(1)}\\{m.group(2)}", text)


def render(markup: str, color: bool) -> str:
    """Markup -> text: known style tags become ANSI colour codes (``color``) or nothing, escaped
    tags literal ones, and anything else stays as written (unlike Rich, a backslash before a
    bracket that starts no tag is kept: ``render(escape(t)) == t`` for every text)."""
    out: list[str] = []
    active: list[str] = []  # SGR codes open, innermost last
    position = 0
    for match in _TAG.finditer(markup):
        full, escapes, tag = match.groups()
        out.append(markup[position : match.start()])
        position = match.end()
        if escapes:
            backslashes, escaped = divmod(len(escapes), 2)
            out.append("\\" * backslashes)
            if escaped:
                out.append(full[len(escapes) :])
                continue
        closing = tag.startswith("/")
        name = tag[1:] if closing else tag
        code = _STYLES.get(name)
        if closing and active and (code in active or not name):  # [/red], or [/]: the innermost
            if name:
                active.remove(code)
            else:
                active.pop()
            if color:
                out.append("\x1b[0m" + "".join(f"\x1b[{c}m" for c in active))
        elif not closing and code is not None:
            active.append(code)
            if color:
                out.append(f"\x1b[{code}m")
        else:
            out.append(full[len(escapes) :])
    out.append(markup[position:])
    if color and active:
        out.append("\x1b[0m")
    return "".join(out)


@dataclass
class Console:
    """One output stream (stdout, or stderr with ``stderr=True``), looked up at each print, so a
    test harness that swaps ``sys.stdout`` sees the output."""

    stderr: bool = False

    @property
    def file(self) -> TextIO:
        return sys.stderr if self.stderr else sys.stdout

    @property
    def is_terminal(self) -> bool:
        try:
            return bool(self.file.isatty())
        except (AttributeError, ValueError):  # no isatty, or closed
            return False

    @property
    def color(self) -> bool:
        """Colour on a terminal, or wherever FORCE_COLOR is set (CI logs); never with NO_COLOR set
        (non-empty, https://no-color.org) or a terminal that says it has none."""
        if os.environ.get("NO_COLOR"):
            return False
        if os.environ.get("FORCE_COLOR"):
            return True
        return self.is_terminal and os.environ.get("TERM") not in ("dumb", "unknown")

    @property
    def width(self) -> int:
        """Columns of the terminal (COLUMNS when set), 80 when unknown."""
        return shutil.get_terminal_size((80, 24)).columns

    def print(self, text: str = "", *, markup: bool = True, highlight: bool = False) -> None:
        """One line (``highlight`` is accepted for Rich's signature and ignored: nothing is highlighted)."""
        self._write(render(text, self.color) if markup else text)

    def print_json(self, text: str) -> None:
        self._write(json.dumps(json.loads(text), indent=2, ensure_ascii=False))

    def print_table(self, table: "Table") -> None:
        """The table; in a terminal its folding columns are broken to fit its width, elsewhere
        (a file, a pipe) every row stays on one line."""
        self._write("\n".join(table.lines(self.color, self.width if self.is_terminal else None, _fits_box(self.file))))

    def _write(self, text: str) -> None:
        file = self.file
        encoding = getattr(file, "encoding", None)
        if encoding:  # a stream that cannot show a character gets its escape (\u90e8), not an error
            text = text.encode(encoding, "backslashreplace").decode(encoding, "replace")
        file.write(text + "\n")
        file.flush()


@dataclass
class _Column:
    header: str
    justify: str = "left"  # left | right | center
    fold: bool = False  # may be broken over several lines to fit a terminal


@dataclass
class Table:
    """A table of markup cells, drawn as Rich draws one (title above, a heavy-lined header)."""

    title: str | None = None
    columns: list[_Column] = field(default_factory=list)
    rows: list[tuple[str, ...]] = field(default_factory=list)

    def add_column(self, header: str, justify: str = "left", overflow: str | None = None, no_wrap: bool = False) -> None:
        """A column; ``overflow="fold"`` lets it break its cells to fit a terminal (Rich's arguments)."""
        self.columns.append(_Column(header, justify, overflow == "fold" and not no_wrap))

    def add_row(self, *cells: str) -> None:
        self.rows.append(tuple(cells))  # short rows are filled out when drawn (`lines`)

    def lines(self, color: bool, width: int | None = None, unicode: bool = True) -> list[str]:
        """The table's lines; with ``width`` (a terminal's), columns are narrowed, widest first,
        until it fits: the folding ones (paths, errors) down to MIN_FOLD_WIDTH, then headers wider
        than their column's values, then the folding ones down to one character, then any column
        (a terminal too narrow for the table still gets lines that do not wrap)."""
        heavy, light = ("━┏┳┓┃┡╇┩", "─│└┴┘") if unicode else ("-+++|+++", "-|+++")
        rows = [row + ("",) * (len(self.columns) - len(row)) for row in self.rows]  # columns added after rows
        plain = [[render(c, False) for c in row] for row in rows]
        values = [max([cells(row[i]) for row in plain], default=0) for i in range(len(self.columns))]
        widths = [max(cells(c.header), values[i]) for i, c in enumerate(self.columns)]
        if width is not None:
            excess = sum(widths) + 3 * len(widths) + 1 - width
            fold = [c.fold for c in self.columns]
            floors = ([MIN_FOLD_WIDTH if f else w for f, w in zip(fold, widths)],  # each pass: the least width of each column
                      [MIN_FOLD_WIDTH if f else max(1, v) for f, v in zip(fold, values)],
                      [1 if f else max(1, v) for f, v in zip(fold, values)],
                      [1] * len(widths))
            for floor in floors:
                while excess > 0:
                    narrower = [i for i in range(len(widths)) if widths[i] > floor[i]]
                    if not narrower:
                        break
                    widths[max(narrower, key=widths.__getitem__)] -= 1
                    excess -= 1
        total = sum(widths) + 3 * len(widths) + 1

        def cell(text: str, shown: str, i: int) -> str:  # ``shown``: ``text`` with its colour codes
            room = widths[i] - cells(text)
            left = {"left": 0, "right": room, "center": room // 2}[self.columns[i].justify]
            return " " * left + shown + " " * (room - left)

        def row_lines(texts: list[str], styled: list[str], edge: str) -> list[str]:
            """One row, its cells broken over as many lines as the widest needs (a broken cell loses its colour)."""
            pieces = [_fold(t, widths[i]) if cells(t) > widths[i] else [t] for i, t in enumerate(texts)]
            out = []
            for k in range(max(len(p) for p in pieces)):
                parts = []
                for i, p in enumerate(pieces):
                    part = p[k] if k < len(p) else ""
                    parts.append(f" {cell(part, styled[i] if len(p) == 1 and k == 0 else part, i)} ")
                out.append(edge + edge.join(parts) + edge)
            return out

        def rule(ends: str, line: str) -> str:
            return ends[0] + ends[1].join(line * (w + 2) for w in widths) + ends[2]

        lines = []
        if self.title:
            title = render(self.title, False)
            for piece in _fold(title, total) if width is not None and cells(title) > total else [title]:
                pad = " " * max(0, (total - cells(piece)) // 2)
                lines.append(pad + (f"\x1b[3m{piece}\x1b[0m" if color else piece))
        lines.append(rule(heavy[1:4], heavy[0]))
        headers = [c.header for c in self.columns]
        lines += row_lines(headers, [f"\x1b[1m{h}\x1b[0m" if color else h for h in headers], heavy[4])
        lines.append(rule(heavy[5:8], heavy[0]))
        for row, texts in zip(rows, plain):
            lines += row_lines(texts, [render(c, color) for c in row], light[1])
        lines.append(light[2] + light[3].join(light[0] * (w + 2) for w in widths) + light[4])
        return lines


def cells(text: str) -> int:
    """Terminal columns ``text`` takes: two for a wide character (CJK, most emoji), none for a
    mark that joins the one before it, an invisible format character (a zero-width space), a
    Hangul vowel or final of a composed syllable or an emoji's skin tone."""
    return sum(_char_cells(ch) for ch in text)


def _char_cells(ch: str) -> int:
    code = ord(ch)
    if ch != "\xad" and (unicodedata.category(ch) in ("Mn", "Me", "Cf") or 0x1160 <= code <= 0x11FF
                         or 0x1F3FB <= code <= 0x1F3FF):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _fold(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width`` columns (at least one character each)."""
    pieces, piece, used = [], "", 0
    for ch in text:
        w = _char_cells(ch)
        if piece and used + w > width:
            pieces.append(piece)
            piece, used = "", 0
        piece, used = piece + ch, used + w
    return pieces + [piece] if piece or not pieces else pieces


def _fits_box(file: TextIO) -> bool:
    """Whether the stream can encode the box-drawing characters (else tables are drawn in ASCII)."""
    try:
        "━┃│".encode(getattr(file, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False
