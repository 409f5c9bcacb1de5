"""What every command (aae-run, aae-export, aae-train) does with an error: one line, never a traceback.

`OneLineErrorsTyper` is a `typer.Typer` whose unexpected exceptions end in one line on stderr
and exit code 2 ("could not run"). Without it, Typer prints a traceback and exits with 1, which
for `aae-run score` means "some files failed". AAE_DEBUG=1 re-raises, to see the traceback.
"""

from __future__ import annotations

import os
import sys

import typer
from rich.console import Console
from rich.markup import escape

EXIT_CANNOT_RUN = 2
DEBUG_ENV = "AAE_DEBUG"


def print_error(message: str, console: Console | None = None) -> None:
    """``error: message`` on stderr; the message is printed literally (no Rich markup)."""
    (console or Console(stderr=True, soft_wrap=True)).print(f"[red]error:[/red] {escape(message)}", highlight=False)


class OneLineErrorsTyper(typer.Typer):
    """A Typer app that turns any unexpected exception into one line and exit code 2."""

    def __call__(self, *args, **kwargs):
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            lines = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
            print_error(f"internal error ({detail}); this is a bug: please report it with the output of the same "
                        f"command run with {DEBUG_ENV}=1")
            sys.exit(EXIT_CANNOT_RUN)
