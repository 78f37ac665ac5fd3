"""User-facing error types.

Anything raised as a `KilnError` is the user's problem (a bad file, a bad
argument) and is printed by the CLI as one line without a traceback. Anything
else is a bug in kiln and keeps its traceback.
"""

from __future__ import annotations


class KilnError(Exception):
    """Base class for errors caused by user input; the message says what to do."""


class ModelLoadError(KilnError):
    """A model file or folder could not be loaded (bad format, missing tensor, ...)."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem


class ModelNotFoundError(KilnError):
    """A model name is neither a registered name nor an existing path."""
