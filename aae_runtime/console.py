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
import sys
import unicodedata
from dataclasses import dataclass, field
from typing import TextIO

_STYLES = {"bold": "1", "italic": "3", "red": "31", "yellow": "33"}  # SGR codes of the styles the runtime uses
_TAG = re.compile(r"((\\*)\[([a-z#/@][^[]*?)])")  # Rich's markup tag, after any backslashes
_ESCAPE = re.compile(r"(\\*)(\[[a-z#/@][^[]*?])")
MIN_FOLD_WIDTH = 8  # a folding column is never made narrower than this to fit a terminal


def counted(n: int, noun: str) -> str:
    """``n`` and the noun, plural unless one: '1 image', '12 images', '0 photos'."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def display_path(path: "str | os.PathLike[str]", controls: bool = False) -> str:
    """``path`` as UTF-8 text: bytes of a non-UTF-8 file name (which Python keeps as lone
    surrogates) become ``\\xff`` escapes instead of breaking the CSV writer or the console.

    ``controls=True`` (for terminals) also escapes control characters, so that a file named
    with a newline or an ANSI escape sequence cannot fake table rows or drive the terminal.
    Idempotent: escaping twice gives what escaping once does.
    """
    text = str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return text.translate(_CONTROL_ESCAPES) if controls else text


# C0 and C1 controls, the line and paragraph separators (U+2028-2029), and the bidirectional
# overrides and isolates (U+202A-202E, U+2066-2069), with which a name could show itself
# reversed in a terminal
_CONTROL_ESCAPES = {c: (f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}")
                    for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F),
                              *range(0x2066, 0x206A))}


def literal(text: "str | os.PathLike[str]") -> str:
    """A file name or message to print through markup exactly as it is: control characters and
    undecodable bytes escaped (`display_path`), markup escaped (`escape`)."""
    return escape(display_path(text, controls=True))


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
        """Columns of this stream's terminal (COLUMNS when set), 80 when unknown: stderr's own, as
        stdout may go to a file while the status line goes to the terminal."""
        columns = os.environ.get("COLUMNS", "")
        if columns.isdigit() and int(columns) > 0:
            return int(columns)
        try:
            return os.get_terminal_size(self.file.fileno()).columns or 80
        except (AttributeError, ValueError, OSError):  # not a terminal, no descriptor, or closed
            return 80

    @property
    def live(self) -> bool:
        """Whether lines can be rewritten in place: a terminal that moves the cursor (not TERM=dumb)."""
        return self.is_terminal and os.environ.get("TERM") not in ("dumb", "unknown")

    def print(self, text: str = "", *, markup: bool = True, highlight: bool = False) -> None:
        """One line (``highlight`` is accepted for Rich's signature and ignored: nothing is highlighted)."""
        self._write(render(text, self.color) if markup else text)

    def print_json(self, text: str) -> None:
        """JSON, indented; characters the stream cannot encode as JSON's own escapes (``\\u00e9``),
        so the output stays valid JSON."""
        value = json.loads(text)
        shown = json.dumps(value, indent=2, ensure_ascii=False)
        if self._encoded(shown) != shown:
            shown = json.dumps(value, indent=2, ensure_ascii=True)
        self._write(shown)

    def print_table(self, table: "Table") -> None:
        """The table; in a terminal its folding columns are broken to fit its width, elsewhere
        (a file, a pipe) every row stays on one line."""
        self._write("\n".join(table.lines(self.color, self.width if self.is_terminal else None, _fits_box(self.file),
                                          self._encoded)))

    def status(self, text: str, name: str = "", rest: str = "") -> None:
        """A status line on a terminal, rewritten in place by the next one and erased by
        `clear_status`; nothing in a file or a pipe (logs get no carriage-return clutter). The
        line is ``text + name + rest`` cut to one row (a wrapped line could not be erased), the
        middle of ``name`` (a file's) first."""
        if self.live:
            room, unicode = max(1, self.width - 1), _fits_box(self.file)  # the last column: no wrap on any terminal
            text, name, rest = self._encoded(text), self._encoded(name), self._encoded(rest)
            left = room - cells(text) - cells(rest)
            if name and cells(name) > left >= 2:  # the name gives way first: the counts are what changes
                name = _squeeze(name, left, unicode)
            shown = _squeeze(text + name + rest, room, unicode)
            self.file.write("\r" + shown + "\x1b[K")  # one row, never wrapped: \r returns to its start
            self.file.flush()

    def clear_status(self) -> None:
        if self.live:
            self.file.write("\r\x1b[K")
            self.file.flush()

    def _encoded(self, text: str) -> str:
        """``text`` as the stream shows it: a character it cannot encode becomes its escape (\\u90e8)."""
        encoding = getattr(self.file, "encoding", None)
        if not encoding:
            return text
        try:
            return text.encode(encoding, "backslashreplace").decode(encoding, "replace")
        except LookupError:  # an encoding Python does not know: leave it to the stream
            return text

    def _write(self, text: str) -> None:
        file = self.file
        file.write(self._encoded(text) + "\n")  # never an encoding error, whatever the stream
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

    def lines(self, color: bool, width: int | None = None, unicode: bool = True, shown=None) -> list[str]:
        """The table's lines; with ``width`` (a terminal's), columns are narrowed, widest first,
        until it fits: the folding ones (paths, errors) down to MIN_FOLD_WIDTH, then headers wider
        than their column's values, then the folding ones down to two columns, then any column
        (a terminal too narrow for the table still gets lines that do not wrap; a cell of a
        column that does not fold, a number, is then cut short with an ellipsis, never broken).
        ``shown``: how the stream shows a text (escapes for what it cannot encode), applied
        before anything is measured."""
        heavy, light = ("━┏┳┓┃┡╇┩", "─│└┴┘") if unicode else ("-+++|+++", "-|+++")
        shown = shown or (lambda text: text)
        rows = [row + ("",) * (len(self.columns) - len(row)) for row in self.rows]  # columns added after rows
        plain = [[shown(render(c, False)) for c in row] for row in rows]
        headers = [shown(c.header) for c in self.columns]
        values = [max([cells(row[i]) for row in plain], default=0) for i in range(len(self.columns))]
        widths = [max(cells(h), values[i]) for i, h in enumerate(headers)]
        if width is not None:
            excess = sum(widths) + 3 * len(widths) + 1 - width
            fold = [c.fold for c in self.columns]
            least = [min(w, 2) for w in widths]  # two: room for one wide character
            floors = ([MIN_FOLD_WIDTH if f else w for f, w in zip(fold, widths)],  # each pass: the least width of each column
                      [MIN_FOLD_WIDTH if f else max(1, v) for f, v in zip(fold, values)],
                      [m if f else max(m, v) for f, v, m in zip(fold, values, least)],
                      least)
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
            """One row, its cells broken over as many lines as the widest needs (a broken or cut
            cell loses its colour)."""
            pieces = [[t] if cells(t) <= widths[i] else _fold(t, widths[i]) if self.columns[i].fold
                      else [_cut(t, widths[i], unicode)] for i, t in enumerate(texts)]
            out = []
            for k in range(max(len(p) for p in pieces)):
                parts = []
                for i, p in enumerate(pieces):
                    part = p[k] if k < len(p) else ""
                    whole = len(p) == 1 and k == 0 and part == texts[i]
                    parts.append(f" {cell(part, styled[i] if whole else part, i)} ")
                out.append(edge + edge.join(parts) + edge)
            return out

        def rule(ends: str, line: str) -> str:
            return ends[0] + ends[1].join(line * (w + 2) for w in widths) + ends[2]

        lines = []
        if self.title:
            title = shown(render(self.title, False))
            for piece in _fold(title, total) if width is not None and cells(title) > total else [title]:
                pad = " " * max(0, (total - cells(piece)) // 2)
                lines.append(pad + (f"\x1b[3m{piece}\x1b[0m" if color else piece))
        lines.append(rule(heavy[1:4], heavy[0]))
        lines += row_lines(headers, [f"\x1b[1m{h}\x1b[0m" if color else h for h in headers], heavy[4])
        lines.append(rule(heavy[5:8], heavy[0]))
        for row, texts in zip(rows, plain):
            lines += row_lines(texts, [shown(render(c, color)) for c in row], light[1])
        lines.append(light[2] + light[3].join(light[0] * (w + 2) for w in widths) + light[4])
        return lines


def cells(text: str) -> int:
    """Terminal columns ``text`` takes: two for a wide character (CJK, most emoji, a character
    made an emoji by U+FE0F), none for a mark that joins the one before it, an invisible format
    character (a zero-width space), a Hangul vowel or final of a composed syllable, an emoji's
    skin tone or a character joined to the one before by a zero-width joiner (U+200D: the
    family emoji is one picture)."""
    return sum(w for _, w in _clusters(text))


def _clusters(text: str):
    """(cluster, columns) for each piece of ``text`` that a terminal draws as one: a character
    with the zero-width ones that follow it, and whatever a zero-width joiner joins to it."""
    cluster, width, joined = "", 0, False
    for ch in text:
        w = _char_cells(ch)
        if cluster and (w == 0 or (joined and _pictograph(ch))):
            cluster += ch
            if ch == "\ufe0f" and width == 1 and _pictograph(cluster[0]):  # a symbol drawn as a (wide) emoji
                width = 2
        else:
            if cluster:
                yield cluster, width
            cluster, width = ch, w
        joined = ch == "\u200d" and _pictograph(cluster[0])  # a ZWJ joins pictures, not letters (Devanagari)
    if cluster:
        yield cluster, width


def _pictograph(ch: str) -> bool:
    return unicodedata.category(ch) == "So"


def _char_cells(ch: str) -> int:
    code = ord(ch)
    if ch != "\xad" and (unicodedata.category(ch) in ("Mn", "Me", "Cf") or 0x1160 <= code <= 0x11FF
                         or 0x1F3FB <= code <= 0x1F3FF):
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


_BREAKS = ("/\\ ", "_-.")  # where a folded cell may break, best first: after a folder or a word, then inside a name


def _fold(text: str, width: int) -> list[str]:
    """``text`` in pieces of at most ``width`` columns (at least one character cluster each),
    broken after the last path separator or space that fits (else after the last ``_``, ``-`` or
    ``.``, else anywhere), so a path's folder and file names stay whole where they fit."""
    pieces, piece, used = [], [], 0  # piece: the (cluster, columns) of the line being filled
    for chunk in _clusters(text):
        piece.append(chunk)
        used += chunk[1]
        while len(piece) > 1 and used > width:
            cut = _break_after(piece[:-1])
            pieces.append("".join(c for c, _ in piece[:cut]))
            used -= sum(w for _, w in piece[:cut])
            piece = piece[cut:]
    return pieces + ["".join(c for c, _ in piece)] if piece or not pieces else pieces


def _break_after(piece: list[tuple[str, int]]) -> int:
    """How many clusters of ``piece`` (a full line) go on it: up to its last break (not its first
    cluster, which would stand alone), or all."""
    for breaks in _BREAKS:
        last = max((i for i, (c, _) in enumerate(piece) if c in breaks and i > 0), default=None)
        if last is not None:
            return last + 1
    return len(piece)


def _squeeze(text: str, width: int, unicode: bool = True) -> str:
    """``text`` in at most ``width`` columns: whole, or its start and its end with an ellipsis
    between (a status line's counts are at both ends, a long file name in the middle)."""
    clusters = list(_clusters(text))
    if sum(w for _, w in clusters) <= width:
        return text
    room = width - 1  # the ellipsis's column
    head, used = [], 0
    for c, w in clusters:
        if used + w > room // 2:
            break
        head.append(c)
        used += w
    tail, used_tail = [], 0
    for c, w in reversed(clusters):
        if used + used_tail + w > room:
            break
        tail.append(c)
        used_tail += w
    return "".join(head) + ("…" if unicode else "~") + "".join(reversed(tail))


def _cut(text: str, width: int, unicode: bool = True) -> str:
    """``text`` cut to ``width`` columns, its end replaced by an ellipsis (as Rich shortens a
    cell that may not wrap)."""
    mark = "…" if unicode else "~"  # not ".": "1234." would read as a number
    kept, used = "", 0
    for chunk, w in _clusters(text):
        if used + w > width - 1:
            break
        kept, used = kept + chunk, used + w
    return kept + mark if width >= 1 else ""


def _fits_box(file: TextIO) -> bool:
    """Whether the stream can encode the box-drawing characters (else tables are drawn in ASCII)."""
    try:
        "━┃│".encode(getattr(file, "encoding", None) or "utf-8")
        return True
    except (UnicodeEncodeError, LookupError):
        return False
