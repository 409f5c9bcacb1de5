"""Errors the runtime raises for problems a user can fix; the CLI prints them in one line."""


class AAEError(Exception):
    """A problem the user can act on. The message says what went wrong and what to do."""


class ModelError(AAEError):
    """The model directory, its ONNX files or their metadata are missing or unusable."""


class InputError(AAEError):
    """An input (image file, array, option) cannot be used."""


class DeviceError(AAEError):
    """The requested execution device cannot run here."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none), at most
    ``limit`` characters: what a one-line error quotes of a library's multi-line message."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:limit]
