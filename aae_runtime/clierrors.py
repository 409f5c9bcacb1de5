"""What every command (aae-run, aae-export, aae-train) does with an error: one line, never a traceback.

`OneLineErrorsTyper` is a `typer.Typer` whose unexpected exceptions end in one line on stderr
and exit code 2 ("could not run"). Without it, Typer prints a traceback and exits with 1, which
for `aae-run score` means "some files failed". AAE_DEBUG=1 re-raises, to see the traceback.
Its commands also print usage errors (an unknown option, a bad value) as one line, say so when
Ctrl-C stops them (exit 130), and format ``--help`` as plain text that wraps instead of Rich
panels that cut option names and choices off at 80 columns, with metavars a user reads
(``--model PATH``, ``--threshold FLOAT``, ``--device auto|cpu|cuda``). A run builds only the
command it runs (`_LazyCommands`): building all nine of `aae-run`'s took 12 ms of every start.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, MutableMapping
from functools import partial
from typing import Any

import typer
import typer.core

try:  # Typer vendors Click (typer._click), whose UsageError is then another class than click's
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older Typer on real Click
    from click.exceptions import NoArgsIsHelpError, UsageError

from aae_runtime.console import Console, literal

EXIT_CANNOT_RUN = 2
DEBUG_ENV = "AAE_DEBUG"


def print_error(message: str, console: Any = None) -> None:
    """``error: message`` on stderr (or ``console``: this package's or a Rich one); the message
    is printed literally (no markup; control characters escaped, so a file name cannot drive the
    terminal)."""
    (console or Console(stderr=True)).print(f"[red]error:[/red] {literal(message)}", highlight=False)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where a command handles it, so that a run stops the way
    Ctrl-C stops it (exit 143 instead of 130)."""


class _OneLineUsageError(UsageError):
    """A usage error shown as ``error: MESSAGE (see PROG --help)``, one line on stderr, exit 2."""

    def __init__(self, exc: UsageError, command_path: str):
        super().__init__(exc.format_message())
        self.command_path = command_path

    def show(self, file: Any = None) -> None:
        print_error(" ".join(self.format_message().split()) + f" (see {self.command_path} --help)")


# Click's type names (``param.type.name``) -> the metavar shown in --help
_METAVARS = {"path": "PATH", "float": "FLOAT", "float range": "FLOAT", "integer": "INT", "integer range": "INT",
             "text": "TEXT"}


def _metavar(param: Any) -> str | None:
    """A readable metavar for one parameter, or None to keep Typer's (flags have none)."""
    kind = getattr(param, "type", None)  # Click's ParamType (Typer 0.26-0.28)
    if kind is None or getattr(param, "is_flag", False) or param.metavar is not None:
        return None
    choices = getattr(kind, "choices", None)
    if choices:
        return "|".join(str(c) for c in choices)
    if isinstance(param, typer.core.TyperArgument):
        param.display_type_rich = lambda ctx: None  # its name says it (Typer 0.29 would add "<list[Path]>")
        return param.name.upper() + ("..." if param.nargs != 1 else "")
    return _METAVARS.get(getattr(kind, "name", ""), "VALUE")


def _empty_path(value) -> str | None:
    """pathlib reads "" as the current folder: ``score ""`` scored it, ``watch ""`` moved
    everything under it, and a writer wrote into it."""
    return "an empty path: give a file or folder name ('.' for the current folder)" if value == "" else None


def _not_finite(value) -> str | None:
    """Click's float ranges let nan and inf through (their checks are comparisons):
    `serve --max-body-mb nan` was an internal error, `--max-wait-ms nan` was taken."""
    return f"{value} is not a finite number" if isinstance(value, float) and not math.isfinite(value) else None


# Click's type names -> what a parameter of that type refuses: (check of the raw text, check of the value)
_REFUSALS = {"path": (_empty_path, None), "float": (None, _not_finite), "float range": (None, _not_finite)}


def _refusing(kind: Any) -> None:
    """Make a parameter type refuse what `_REFUSALS` lists for it, with Click's usage error."""
    before, after = _REFUSALS.get(getattr(kind, "name", None), (None, None))
    if (before is None and after is None) or getattr(kind, "refusing", False):
        return
    convert = kind.convert

    def checked(value, param, ctx):
        problem = before(value) if before is not None else None
        converted = convert(value, param, ctx) if problem is None else None
        problem = problem or (after(converted) if after is not None else None)
        if problem:
            kind.fail(problem, param, ctx)
        return converted

    kind.convert, kind.refusing = checked, True


class _Readable:
    """Mixin for Typer's command and group classes: readable metavars, one-line usage errors, a
    message on Ctrl-C."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            name = _metavar(param)
            if name is not None:
                param.metavar = name
            if getattr(param, "type", None) is not None:
                _refusing(param.type)
        return params

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except UsageError as exc:
            if isinstance(exc, (_OneLineUsageError, NoArgsIsHelpError)):  # a command alone: its help, as it is
                raise
            path = " ".join(p for p in ((parent.command_path if parent else None), info_name) if p)
            raise _OneLineUsageError(exc, path or "the command") from None

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UsageError as exc:  # raised while the command runs (typer.BadParameter), or an unknown sub-command
            if isinstance(exc, _OneLineUsageError):
                raise
            raise _OneLineUsageError(exc, (exc.ctx or ctx).command_path) from None
        except ImportError as exc:  # Ctrl-C during a C extension's import surfaces as an ImportError it caused
            interrupt = _interrupt_behind(exc)
            if interrupt is None:
                raise
            raise typer.Exit(_interrupted(interrupt)) from None
        except KeyboardInterrupt as exc:
            raise typer.Exit(_interrupted(exc)) from None


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C (or SIGTERM) that caused ``exc``, if one did."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def signal_name(exc: KeyboardInterrupt) -> str:
    """Which signal stopped a command: "SIGTERM" (`Terminated`) or "Ctrl-C"."""
    return "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C"


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Say so; the exit code: 130 for Ctrl-C, 143 for SIGTERM."""
    print_error(f"interrupted ({signal_name(exc)})")
    return 143 if isinstance(exc, Terminated) else 130


class ReadableCommand(_Readable, typer.core.TyperCommand):
    pass


class ReadableGroup(_Readable, typer.core.TyperGroup):
    pass


class _LazyCommands(MutableMapping):
    """A group's commands by name, in the order they were defined, each built from its Typer
    definition when first looked up: a run looks up the one it runs; help and a mistyped name's
    suggestions list them all."""

    def __init__(self, builders: dict[str, Callable[[], Any]]):
        self._builders, self._built = dict(builders), {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            self._built[name] = self._builders[name]()  # KeyError: no such command
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:
        self._builders.setdefault(name, lambda: command)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        del self._builders[name]
        self._built.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)


class OneLineErrorsTyper(typer.Typer):
    """A Typer app that turns any unexpected exception into one line and exit code 2."""

    def __init__(self, **kwargs):
        kwargs.setdefault("cls", ReadableGroup)
        kwargs.setdefault("rich_markup_mode", None)  # plain help: wraps, never cuts off
        super().__init__(**kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", ReadableCommand)
        return super().command(*args, **kwargs)

    def click_command(self) -> Any:
        """The Click command Typer makes of this app, a group's commands built when first used."""
        infos = self.registered_commands
        if not (self.registered_callback and infos) or self.registered_groups:
            return typer.main.get_command(self)
        self.registered_commands = []  # the group alone: its commands come lazily
        try:
            group = typer.main.get_command(self)
        finally:
            self.registered_commands = infos
        build = partial(typer.main.get_command_from_info, pretty_exceptions_short=self.pretty_exceptions_short,
                        rich_markup_mode=self.rich_markup_mode)
        group.commands = _LazyCommands({info.name or typer.main.get_command_name(info.callback.__name__):
                                        partial(build, info) for info in infos})
        return group

    def __call__(self, *args, **kwargs):
        try:
            return self.click_command()(*args, **kwargs)
        except Exception as exc:
            if os.environ.get(DEBUG_ENV):
                raise
            if isinstance(exc, ImportError) and _interrupt_behind(exc) is not None:  # Ctrl-C while a module was imported
                sys.exit(_interrupted(_interrupt_behind(exc)))
            lines = str(exc).strip().splitlines()
            detail = f"{type(exc).__name__}: {lines[0][:300]}" if lines else type(exc).__name__
            print_error(f"internal error ({detail}); this is a bug: please report it with the output of the same "
                        f"command run with {DEBUG_ENV}=1")
            sys.exit(EXIT_CANNOT_RUN)
