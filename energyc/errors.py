"""Errors raised for bad energy files and bad arguments.

Every error the user can cause carries the place it came from (``file:line`` of the energy file, or
the argument name) so that the message alone tells what to fix; no traceback from inside SymPy,
networkx or Jinja reaches the user.
"""

from __future__ import annotations

import os
import sys

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
    """Return ``path:line`` of the innermost stack frame outside the energyc package.

    Walks the frames themselves: ``inspect.stack()`` reads the source lines of every frame, 8 ms
    a call, and every construct of an energy file calls this."""
    frame = sys._getframe(1)
    while frame is not None:
        code_file = frame.f_code.co_filename
        filename = os.path.abspath(code_file)
        if not (skip_package and filename.startswith(_PACKAGE_DIR + os.sep)) \
                and not filename.startswith("<frozen"):
            return f"{code_file}:{frame.f_lineno}"
        frame = frame.f_back
    return None
