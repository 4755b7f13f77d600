"""The error contract: every error a user causes and can fix is a `SemlaError`, whose message says what
was wrong and what to do; `semla-lab` prints it as one line and exits with status 2. Anything else is a
bug (or the machine: out of memory) and keeps its traceback.

Each class also derives from the built-in exception it replaced, so `except ValueError` still works.
Errors of one concept live with it: SpecError (world/spec.py), DataError and MissingDataError (data/datasets.py,
real_data.py), LibraryError (library/index.py), ClipLoadError (clip.py).
"""
from __future__ import annotations


class SemlaError(Exception):
    """Base of every user-facing error."""


class UsageError(SemlaError, ValueError):
    """A bad argument value: an unknown name, a number out of range, a device this machine lacks."""


class MissingFileError(SemlaError, FileNotFoundError):
    """A file or folder that was named, or that the package needs, does not exist."""


class UnknownNameError(SemlaError, KeyError):
    """A name (domain, dataset, module) that is not among the known ones; the message lists them."""

    def __str__(self) -> str:     # KeyError would print the message quoted, as a repr
        return str(self.args[0]) if self.args else ""
