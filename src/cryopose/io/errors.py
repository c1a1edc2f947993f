"""Exceptions raised for bad input files (shared by every cryopose module).

Every message is one line that names the file, the field and what was expected, e.g.
``relion31.star: missing column rlnImageName in data_particles``.
"""

from __future__ import annotations

from os import PathLike

__all__ = ["CryoposeInputError", "MissingFileError", "input_error", "require_file"]


class CryoposeInputError(ValueError):
    """A file or argument that cryopose cannot use; the message is one line."""


class MissingFileError(CryoposeInputError, FileNotFoundError):
    """A file that does not exist (also a ``FileNotFoundError``)."""


def input_error(path: str | PathLike[str] | None, message: str) -> CryoposeInputError:
    """Build a :class:`CryoposeInputError` whose message reads ``"<path>: <message>"``.

    Parameters
    ----------
    path : str or PathLike or None
        The offending file (``None`` when the input is not a file).
    message : str
        What is wrong and what was expected; newlines are replaced by spaces.
    """
    text = " ".join(str(message).split("\n"))
    return CryoposeInputError(f"{path}: {text}" if path is not None else text)


def require_file(path: str | PathLike[str], what: str = "file") -> None:
    """Raise :class:`MissingFileError` when ``path`` is not an existing file."""
    import os

    if not os.path.isfile(path):
        if os.path.exists(path):
            raise MissingFileError(f"{path}: {what} is not a regular file")
        raise MissingFileError(f"{path}: {what} not found")
