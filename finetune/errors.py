"""Errors a user can fix: a recipe value, a dataset line, a path, a missing extra.

The CLI prints a `UserError` as one line (`error: ...`, exit status 2), because its message says
what is wrong and what to do. Anything else is a bug of ours or of a library and keeps its
traceback. The subclasses also derive from the built-in error a caller would expect.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem in what the user gave us; the message names it and the fix."""


class ConfigError(UserError, ValueError):
    """A setting, model folder or combination that cannot work."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not what it should be)."""


class MissingExtraError(UserError, ImportError):
    """An optional dependency the recipe needs is not installed; the message says which extra."""
