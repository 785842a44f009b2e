"""The one exception type for failures a user causes and can fix, and the file check every reader shares.

Every stage's error class (a bad checkpoint, store, images file, run folder, argument, a full disk, ...)
derives from `UserError`; each command line has one handler that prints its message as one line and
exits with status 2, never a traceback. Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
from pathlib import Path


class UserError(ValueError):
    """A failure the user caused and can fix; the message names the file or value and what to do."""


def file_problem(path: str | os.PathLike) -> str | None:
    """Why `path` cannot be opened as a file ('does not exist', 'is a directory, not a file'), or None."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a file"
    if not path.is_file():
        return "does not exist" if not path.exists() else "is not a regular file"
    return None
