"""Content hashes of files: the identity of a model file for resume fingerprints, reports and records."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_hash"]


def file_hash(path: str | os.PathLike, *, length: int = 16) -> str:
    """Short SHA-256 of a file's bytes (model identity for resume and reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]
