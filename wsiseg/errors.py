"""Exceptions that the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations

import os

__all__ = [
    "WsisegError",
    "SlideError",
    "ConfigError",
    "ModelConfigError",
    "one_line",
]


class WsisegError(Exception):
    """A user-facing error: bad input, refused data, unwritable output.

    Parameters
    ----------
    message : str
        What went wrong, in one line.
    path : str or os.PathLike, optional
        The file the problem is about; it is named first in the message.
    """

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class SlideError(WsisegError):
    """A slide cannot be opened or is refused (format, size, modality)."""


class ConfigError(WsisegError):
    """An option or configuration value is invalid."""


class ModelConfigError(ConfigError, ValueError):
    """An unknown or unsupported model name or option.

    A :class:`ValueError` for library callers and a
    :class:`wsiseg.errors.ConfigError` for the CLI (one-line message).
    """


def one_line(text: object) -> str:
    """``text`` (a message or an exception) on one line: whitespace runs and newlines become one space.

    An exception with an empty message gives its type's name, so a status
    row or error line never ends up blank.
    """
    line = " ".join(str(text).split())
    return line or (type(text).__name__ if isinstance(text, BaseException) else "")
