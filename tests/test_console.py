"""The runtime's own terminal output (aae_runtime.console): Rich's markup and escaping, tables."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from hypothesis import given, strategies as st
from rich.markup import escape as rich_escape, render as rich_render

from aae_runtime.console import MIN_FOLD_WIDTH, Console, Table, _fold, cells, escape, render

# text with what markup is made of: brackets, slashes, backslashes, style names
MARKUPISH = st.lists(st.sampled_from(list("[]/\\=#@ ab") + ["red", "bold", "yellow"]), max_size=30).map("".join)


@given(MARKUPISH)
def test_escaped_text_prints_as_it_is_here_and_through_rich(text):
    assert render(escape(text), color=False) == text
    if "\\[" not in text and not text.endswith("\\"):  # what Rich itself cannot print literally
        assert rich_render(escape(text)).plain == text  # the training commands' errors go through Rich
    if not text.endswith("\\"):
        assert escape(text) == rich_escape(text)


def test_styles_are_colour_codes_only_when_asked():
    assert render("[red]error:[/red] x [bold]y[/] z", color=False) == "error: x y z"
    assert render("[red]error:[/red] x", color=True) == "\x1b[31merror:\x1b[0m x"
    assert render("[unknown]a[/unknown]", color=True) == "[unknown]a[/unknown]"  # not a style: literal


def test_a_console_in_a_pipe_prints_no_colour(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr("sys.stdout", buf)
    Console().print("[red]yes[/red] " + escape("x[red]y.png"))
    assert buf.getvalue() == "yes x[red]y.png\n"


def _table() -> Table:
    t = Table(title="a title")
    t.add_column("path", overflow="fold")
    t.add_column("score", justify="right", no_wrap=True)
    t.add_column("anomaly", justify="center", no_wrap=True)
    t.add_row("runs/demo/images/digits/test00165_digit5.png", "-0.291060", "no")
    t.add_row(escape("odd[red]name.png"), "3.4", "[red]yes[/red]")
    return t


def test_a_table_keeps_every_row_on_one_line_without_a_width():
    lines = _table().lines(color=False)
    assert len(lines) == 1 + 3 + 2 + 1 and len({len(line) for line in lines[1:]}) == 1  # title, header, rows, bottom
    assert "│ runs/demo/images/digits/test00165_digit5.png │ -0.291060 │   no    │" == lines[4]
    assert "│ odd[red]name.png" in lines[5] and "│       3.4 │   yes   │" in lines[5]


def test_a_table_folds_its_paths_to_fit_a_terminal():
    lines = _table().lines(color=True, width=40)
    rows = [line for line in lines if line.startswith("│")]
    assert all(len(render(line, False).replace("\x1b[0m", "")) <= 40 for line in rows)
    assert len(rows) > 2  # the long path went over several lines
    text = "".join(line.split("│")[1].strip() for line in rows)
    assert "runs/demo/images/digits/test00165_digit5.png" in text
    assert "\x1b[31myes\x1b[0m" in "".join(rows)
    assert {cells(re.sub("\x1b\\[[0-9;]*m", "", line)) for line in lines[1:]} == {40}  # as wide as the terminal
    first_row = next(line for line in _table().lines(color=False, width=34) if line.startswith("│ runs"))
    assert len(first_row.split("│")[1]) == MIN_FOLD_WIDTH + 2  # paths give way first, to their minimum


def test_a_folded_path_breaks_after_its_folders_so_names_stay_whole():
    lines = _table().lines(color=False, width=40)
    cells_ = [line.split("│")[1].strip() for line in lines if line.startswith("│")]
    pieces = cells_[:cells_.index("odd[red]name.")]  # the first row's, the path column 14 wide
    assert pieces == ["runs/demo/", "images/digits/", "test00165_", "digit5.png"]  # folders whole, the name at its _
    assert _fold("test00165_digit5.png", 12) == ["test00165_", "digit5.png"]  # a name too long: at its _ - .
    assert _fold("unreadable image: truncated file", 20) == ["unreadable image: ", "truncated file"]
    assert _fold("0123456789", 4) == ["0123", "4567", "89"]  # nowhere to break: anywhere
    assert "".join(_fold("a/b c_d.部品/e", 3)) == "a/b c_d.部品/e"


def test_ascii_boxes_where_the_stream_cannot_encode_box_drawing():
    lines = _table().lines(color=False, unicode=False)
    assert all(set(line) <= set("".join(chr(i) for i in range(32, 127))) for line in lines)


def test_wide_characters_take_two_columns_and_the_rows_line_up():
    t = Table()
    t.add_column("path", overflow="fold")
    t.add_column("score", justify="right")
    t.add_row("部品写真_0001.png", "1.0")
    t.add_row("e\u0301te.png", "2.0")  # a combining accent takes no column
    for width in (None, 14):
        lines = t.lines(color=False, width=width)
        assert len({cells(line) for line in lines}) == 1, lines
    assert cells("部品") == 4 and cells("e\u0301") == 1


def test_a_terminal_too_narrow_for_the_table_still_gets_lines_that_do_not_wrap():
    t = _table()
    t.add_column("normalized_score", justify="right", no_wrap=True)
    for width in (60, 40, 25):
        lines = t.lines(color=False, width=width)
        assert max(cells(line) for line in lines) <= width, (width, lines)
    assert "-0.291060" in "".join(t.lines(color=False, width=40))  # paths and headers give way before figures


def test_colour_follows_no_color_force_color_and_the_terminal(monkeypatch):
    for name in ("NO_COLOR", "FORCE_COLOR", "TERM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("sys.stdout", io.StringIO())
    assert not Console().color  # a pipe
    monkeypatch.setenv("FORCE_COLOR", "1")
    assert Console().color  # CI logs
    monkeypatch.setenv("NO_COLOR", "")
    assert Console().color  # NO_COLOR counts only when not empty (no-color.org)
    monkeypatch.setenv("NO_COLOR", "1")
    assert not Console().color


def test_a_stream_that_cannot_encode_a_name_gets_its_escape_not_an_error(monkeypatch):
    buf = io.BytesIO()
    stream = io.TextIOWrapper(buf, encoding="ascii")
    monkeypatch.setattr("sys.stdout", stream)
    Console().print("部品.png")
    stream.flush()
    assert buf.getvalue() == b"\\u90e8\\u54c1.png\n"


def test_a_too_narrow_terminal_cuts_figures_with_an_ellipsis_and_never_breaks_them():
    t = _table()
    for width in (30, 20, 10):
        lines = t.lines(color=False, width=width)
        body = [line for line in lines[1:] if line.startswith("│")]
        figures = re.findall(r"-?\d\.\d+…?", "".join(body))  # what the score column shows: whole, or cut and marked
        assert all(f in ("-0.291060", "3.4") or f.endswith("…") for f in figures), (width, figures)
        assert len({cells(line) for line in lines[1:]}) == 1, (width, lines)  # the borders line up


def test_a_wide_character_in_a_narrowed_column_keeps_the_borders_in_line():
    t = Table()
    t.add_column("path", overflow="fold")
    t.add_column("score", justify="right", no_wrap=True)
    t.add_row("部品部品部品部品部品部品部品部品.png", "1.000000")
    for width in (40, 20, 14, 8):
        lines = t.lines(color=False, width=width)
        assert len({cells(line) for line in lines}) == 1, (width, lines)


def test_emoji_sequences_take_the_columns_a_terminal_draws():
    assert cells("\u2764\ufe0f") == 2  # a heart made an emoji by VS16
    assert cells("\U0001f468\u200d\U0001f469\u200d\U0001f467") == 2  # a family: three joined by ZWJs, one picture
    assert cells("\U0001f44d\U0001f3fd") == 2  # a skin tone joins the thumb


def test_tables_line_up_on_a_stream_that_cannot_encode_the_names(monkeypatch):
    buf = io.BytesIO()
    stream = io.TextIOWrapper(buf, encoding="ascii")
    monkeypatch.setattr("sys.stdout", stream)
    t = Table()
    t.add_column("path", overflow="fold")
    t.add_column("score", justify="right", no_wrap=True)
    t.add_row("emoji\U0001f600\U0001f44d\U0001f3fd.png", "1.000000")
    t.add_row("plain.png", "2.000000")
    Console().print_table(t)
    stream.flush()
    lines = buf.getvalue().decode("ascii").splitlines()
    assert "emoji\\U0001f600\\U0001f44d\\U0001f3fd.png" in lines[3]
    assert len({len(line) for line in lines}) == 1, lines


def test_json_stays_json_on_a_stream_that_cannot_encode_it(monkeypatch):
    import json

    for encoding in ("ascii", "latin-1", "utf-8"):
        buf = io.BytesIO()
        stream = io.TextIOWrapper(buf, encoding=encoding)
        monkeypatch.setattr("sys.stdout", stream)
        value = {"classes": ["café", "猫😀", "[red]x"], "n": 1}
        Console().print_json(json.dumps(value))
        stream.flush()
        assert json.loads(buf.getvalue().decode(encoding)) == value, encoding


def test_names_escape_line_separators_and_escaping_twice_changes_nothing():
    from aae_runtime.console import display_path

    name = "a\u2028b\nc\x1b[31md\u202ee"
    once = display_path(name, controls=True)
    assert once == "a\\u2028b\\x0ac\\x1b[31md\\u202ee" and display_path(once, controls=True) == once


def test_error_lines_escape_control_characters_and_markup_once(capsys):
    from aae_runtime.clierrors import print_error

    print_error("--out o[red]x\x1b[2J.txt: bad")
    assert capsys.readouterr().err == "error: --out o[red]x\\x1b[2J.txt: bad\n"


def _in_a_terminal(args: list[str]) -> bytes:
    """What a command writes to a pseudo-terminal (stdout and stderr both), read to its end."""
    import os
    import pty

    pid, fd = pty.fork()
    if pid == 0:  # the child: its stdout and stderr are the terminal
        os.execvp(args[0], args)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    os.close(fd)
    return out


def test_score_counts_the_images_on_a_terminal_and_erases_the_count_and_prints_none_in_a_pipe(tiny_model_dir, tmp_path):
    import subprocess

    import numpy as np

    from tests.conftest import write_png

    rng = np.random.default_rng(0)
    for i in range(5):
        write_png(tmp_path / "line" / f"{i}.png", rng.integers(0, 255, (28, 28), dtype=np.uint8))
    args = ["aae-run", "score", str(tmp_path / "line"), "--model", str(tiny_model_dir)]
    shown = _in_a_terminal(args)
    assert re.search(rb"\rscored 1 of 5 images \(0:00:0\d\)\x1b\[K", shown), shown
    assert shown.index(b"\r\x1b[K") < shown.index(b"score, threshold"), shown  # erased before the table
    piped = subprocess.run(args, capture_output=True, text=True)
    assert piped.returncode == 0 and " of 5 images" not in piped.stderr + piped.stdout and "\r" not in piped.stderr


class _Terminal(io.StringIO):
    """A stream that says it is a terminal (no descriptor: its width comes from COLUMNS)."""

    encoding = "utf-8"

    def isatty(self) -> bool:
        return True


def test_the_status_line_keeps_to_one_row_shortening_the_file_name_first(monkeypatch):
    monkeypatch.setenv("COLUMNS", "70")
    monkeypatch.delenv("TERM", raising=False)
    monkeypatch.setattr("sys.stderr", _Terminal())
    err = Console(stderr=True)
    err.status("scored 0 of 3 images; ", "不良品サンプル_0001_不良品サンプル.png", ": 4032 of 11781 tiles (0:00:05)")
    shown = sys.stderr.getvalue()
    assert shown.startswith("\r") and shown.endswith("\x1b[K")
    line = shown[1:-3]
    assert 68 <= cells(line) <= 69, line  # (a wide character may leave one column) a wrapped line could not be erased by \r
    assert line.startswith("scored 0 of 3 images; ") and line.endswith(": 4032 of 11781 tiles (0:00:05)"), line
    assert "…" in line  # the name gave way, the counts did not
    err.status("x" * 100)  # no name: its middle
    assert cells(sys.stderr.getvalue().split("\r")[-1][:-3]) == 69


def test_no_status_line_where_the_terminal_cannot_rewrite_a_line(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    monkeypatch.setattr("sys.stderr", _Terminal())
    Console(stderr=True).status("scored 1 of 2 images")
    Console(stderr=True).clear_status()
    assert sys.stderr.getvalue() == ""


def test_a_status_line_has_the_width_of_its_own_terminal_not_stdouts(tmp_path):
    import os
    import pty
    import struct
    import termios
    import fcntl

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 25, 0, 0))  # 25 columns
    code = ("import sys; from aae_runtime.console import Console; "
            "Console(stderr=True).status('scored 1 of 12 images (0:00:01)'); sys.stderr.flush()")
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "TERM")}
    with open(tmp_path / "out.txt", "w") as stdout:  # stdout a file, as with `> scores.txt`
        subprocess.run([sys.executable, "-c", code], stdout=stdout, stderr=follower, env=env, check=True, timeout=60)
    os.close(follower)
    shown = os.read(leader, 4096).decode()
    os.close(leader)
    assert cells(shown.strip("\r").replace("\x1b[K", "")) == 24, shown
