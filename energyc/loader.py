"""Run an energy file and collect what it declared."""

from __future__ import annotations

import io
import os
import sys
import tokenize
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
    source = read_source(path)
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
    except SystemExit as exc:  # sys.exit() in the file would end the compiler without a word
        raise EnergyError(f"the file exits (sys.exit({exc.code!r})); an energy file declares "
                          "layers and must run to its end", _innermost_line(exc, path)) from None
    except Exception as exc:  # report the innermost line of the energy file
        where = _innermost_line(exc, path)
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
    energy_file.name_values(module.__dict__)
    if not energy_file.layers:
        raise EnergyError("the file declares no layer: add layer(name, E, ...)", path)
    return energy_file


def read_source(path: str) -> str:
    """The text of the energy file at ``path``: UTF-8, or the encoding its coding line names.

    Raises:
        EnergyError: the file is missing or unreadable, or its bytes are not text in that
            encoding (with the line of the first bad byte).
    """
    if not os.path.isfile(path):
        raise EnergyError(f"no such energy file: {path}")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise EnergyError(f"cannot read the file: {exc.strerror or exc}", path) from None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
    except SyntaxError as exc:  # a coding line naming an unknown encoding
        raise EnergyError(f"cannot read the file: {exc.msg}", path) from None
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        name = "UTF-8" if encoding.startswith("utf-8") else encoding
        raise EnergyError(f"the file is not {name} text (byte 0x{data[exc.start]:02x} cannot be "
                          "decoded); save it as UTF-8", f"{path}:{line}") from None


def _innermost_line(exc: BaseException, path: str) -> str:
    """``path:line`` of the innermost frame of ``exc``'s traceback in the energy file."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == os.path.abspath(path):
            line = frame.lineno
    return f"{path}:{line}" if line else path
