"""Run an energy file and collect what it declared."""

from __future__ import annotations

import os
import sys
import traceback
import types

from energyc import dsl
from energyc.errors import EnergyError


def load(path: str) -> dsl.EnergyFile:
    """Execute the energy file at ``path``; return its declarations.

    Raises:
        EnergyError: with ``path:line`` for any error the file causes (syntax errors, undefined
            names, misuse of the notation), never a traceback from inside energyc's dependencies.
    """
    if not os.path.isfile(path):
        raise EnergyError(f"no such energy file: {path}")
    with open(path, encoding="utf-8") as fh:
        source = fh.read()
    energy_file = dsl.EnergyFile(path)
    try:
        code = compile(source, path, "exec")
    except SyntaxError as exc:
        raise EnergyError(f"syntax error: {exc.msg}", f"{path}:{exc.lineno}") from None
    module = types.ModuleType("_energyc_energy_file")
    module.__file__ = path
    previous = dsl._current
    dsl.set_current_file(energy_file)
    sys.path.insert(0, os.path.dirname(os.path.abspath(path)))
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the user's energy file is the point
    except EnergyError:
        raise
    except Exception as exc:  # report the innermost line of the energy file
        line = None
        for frame in traceback.extract_tb(exc.__traceback__):
            if os.path.abspath(frame.filename) == os.path.abspath(path):
                line = frame.lineno
        where = f"{path}:{line}" if line else path
        kind = type(exc).__name__
        message = str(exc)
        if isinstance(exc, NameError):
            kind, message = "undefined name", repr(exc.name) if exc.name else str(exc)
        raise EnergyError(f"{kind} {message}" if kind == "undefined name" else f"{kind}: {message}",
                          where) from None
    finally:
        sys.path.pop(0)
        dsl.set_current_file(previous)
    energy_file.doc = (module.__doc__ or "").strip()
    if not energy_file.layers:
        raise EnergyError("the file declares no layer: add layer(name, E, ...)", path)
    return energy_file
