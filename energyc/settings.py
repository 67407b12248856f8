"""A layer's step settings, defined once: what each may be, its check, and its description.

A layer runs ``steps`` descent steps ``x <- x - eta * P * dE/dx`` (energyc.runtime.layer). Its
settings are declared as defaults in the energy file (``dsl.layer``: ``eta``, ``steps``,
``precond``, ``rank``, ``context``) and taken again by the generated Layer's constructor (the same,
with ``precond_rank`` for ``rank``, and ``backend``). Both read this module: the DSL reports a bad
default at its file:line, the Layer raises for a bad argument, the compiler and the property
checks draw from the same kinds, and the template writes the descriptions below into the Layer's
docstring. Imports no torch (the compiler reads it).
"""

from __future__ import annotations

import math
from typing import Any

#: P in the step: the identity, softplus(P_diag) (learned, positive), or
#: diag(softplus(P_diag)) + P_lowrank P_lowrank^T (learned, positive definite); see
#: energyc.runtime.precond
PRECONDITIONERS = ("identity", "diagonal", "dplr")

#: the learned parameters of each preconditioner, by attribute name
PRECOND_PARAMETERS = {"identity": (), "diagonal": ("P_diag",), "dplr": ("P_diag", "P_lowrank")}

#: the context xbar of each step: the current state, or the layer's input (frozen)
CONTEXTS = ("current", "input")

#: where a Layer runs: Triton kernels for CUDA tensors when triton is installed (auto), torch, or
#: Triton (on CPU under TRITON_INTERPRET=1)
BACKENDS = ("auto", "torch", "triton")

#: the generated Layer's own constructor keywords (after the dims and hyperparameters)
KEYWORDS = ("eta", "steps", "precond", "precond_rank", "context", "backend", "dtype", "device")

#: the Layer's docstring lines for its settings (the template writes them under Args)
DOC = """\
eta: step size. steps: descent steps with shared weights.
precond: "identity", "diagonal" (softplus(P_diag), learned) or "dplr"
    (diag(softplus(P_diag)) + P_lowrank P_lowrank^T, learned, positive definite).
precond_rank: columns of P_lowrank for "dplr".
context: "current" (context = current state at each step) or "input" (frozen at the
    layer input).
backend: "auto" (Triton kernels for CUDA tensors when triton is installed, torch
    otherwise), "torch", or "triton" (on CPU under TRITON_INTERPRET=1). The Triton path
    (_triton_layer.py) runs element-wise work and reductions in generated kernels,
    fused context reductions in flash kernels, and projections on torch.
dtype, device: of the parameters; inputs must match (under torch.autocast: the device,
    and a dtype autocast casts; see forward)."""


class SettingError(ValueError):
    """A setting outside its domain: its ``name``, what it ``expected`` (a phrase: "a positive
    int") and the ``value``. The message is the Layer's: ``argument NAME: expected ..., got ...``;
    the DSL words its own from the fields."""

    def __init__(self, name: str, expected: str, value: Any) -> None:
        super().__init__(f"argument {name}: expected {expected}, got {value!r}")
        self.name, self.expected, self.value = name, expected, value


class SettingTypeError(SettingError, TypeError):
    """A setting of the wrong type (a string, a bool or None for a number)."""


def check_number(value: Any, name: str) -> float:
    """A finite real number (the step size ``eta``: 0 is the identity map, a negative one climbs
    E; a hyperparameter's value). TypeError for what is not a number (a str, a bool, None),
    ValueError for NaN and +-inf."""
    if isinstance(value, (str, bytes, bool)):
        raise SettingTypeError(name, "a number", value)
    try:
        number = float(value)
    except (TypeError, ValueError, RuntimeError):  # RuntimeError: a tensor of several values
        raise SettingTypeError(name, "a number", value) from None
    except OverflowError:  # an integer or SymPy number beyond float's range
        number = math.inf
    if not math.isfinite(number):
        raise SettingError(name, "a finite number", value)
    return number


def check_count(value: Any, name: str) -> int:
    """A positive int (``steps``, ``precond_rank``): not a bool, a float or anything else."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SettingError(name, "a positive int", value)
    return value


def check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    """One of ``choices`` (``precond``, ``context``, ``backend``)."""
    if not isinstance(value, str) or value not in choices:
        raise SettingError(name, f"one of {choices}", value)
    return value


def check_step_settings(eta: Any, steps: Any, precond: Any, precond_rank: Any, context: Any,
                        backend: Any = "auto") -> tuple[float, int, str, str, str]:
    """A Layer's settings, checked in the constructor's order: (eta, steps, precond, context,
    backend), the Layer's ``config``.

    Raises:
        SettingError: (a ValueError; SettingTypeError, also a TypeError, for an eta that is no
            number) naming the first bad setting.
    """
    eta = check_number(eta, "eta")
    steps = check_count(steps, "steps")
    precond = check_choice(precond, "precond", PRECONDITIONERS)
    check_count(precond_rank, "precond_rank")
    context = check_choice(context, "context", CONTEXTS)
    backend = check_choice(backend, "backend", BACKENDS)
    return (eta, steps, precond, context, backend)
