"""Errors raised for bad energy files and bad arguments.

Every error the user can cause carries the place it came from (``file:line`` of the energy file, or
the argument name) so that the message alone tells what to fix; no traceback from inside SymPy,
networkx or Jinja reaches the user.
"""

from __future__ import annotations

import inspect
import os

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


class EnergyError(Exception):
    """A problem in an energy file, reported at ``where`` (``path:line``)."""

    def __init__(self, message: str, where: str | None = None) -> None:
        self.message = message
        self.where = where
        super().__init__(f"{where}: {message}" if where else message)


class CompileError(EnergyError):
    """The energy is well formed but cannot be compiled (e.g. an undifferentiable function)."""


def user_location(skip_package: bool = True) -> str | None:
    """Return ``path:line`` of the innermost stack frame outside the energyc package."""
    for frame_info in inspect.stack()[1:]:
        filename = os.path.abspath(frame_info.filename)
        if skip_package and filename.startswith(_PACKAGE_DIR + os.sep):
            continue
        if filename.startswith("<frozen"):
            continue
        return f"{frame_info.filename}:{frame_info.lineno}"
    return None
