"""Exceptions that the CLI turns into one-line messages and exit code 2."""

from __future__ import annotations

import os

__all__ = [
    "WsisegError",
    "SlideError",
    "ConfigError",
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
