"""The interface of a kernel family that every backend implements.

A fused context reduction (``passes/attention.py``) is called from the generated step functions
as ``kernels.attention_forward(...)``, ``kernels.attention_backward(...)`` and
``kernels.attention_transposed(...)``, where ``kernels`` is the module that
``energyc.runtime.implementation`` picks: ``energyc.runtime.attention`` (torch) or
``energyc.runtime.triton_attention`` (Triton). Both modules declare that they implement
:class:`AttentionKernels` by calling :func:`implements` at their end: a function missing, or one
whose parameters (names, order, defaults) differ from the interface's, fails the module's import,
so the two cannot drift apart.

The contract of each function (shapes, dtypes, empty context sets) is in the torch module's
docstrings; a backend may refuse an argument it does not serve with a clear error (the Triton
kernels take no ``offset``: decoding runs on the torch kernels).
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Any, Protocol

from energyc.context import Context


class AttentionKernels(Protocol):
    """Softmax attention over a context set, and its backward. ``kind`` is the context set: an
    ``energyc.context.Context`` or its spelling, e.g. ``("window", 4)``, as generated code
    passes it."""

    def attention_forward(self, q: Any, k: Any, v: Any, scale: Any, kind: Context | tuple,
                          slopes: Any = None, offset: int = 0, keep_probs: bool = False,
                          probs: Any = None) -> tuple:
        """(o, lse) of ``o_i = sum_{j in C(i)} softmax_j(scale q_i . k_j + slopes (i - j)) v_j``
        (with ``keep_probs`` a third result, the kept weights or None)."""

    def attention_backward(self, q: Any, k: Any, v: Any, scale: Any, kind: Context | tuple,
                           o: Any, lse: Any, g: Any, slopes: Any = None,
                           need_dscale: bool = False, probs: Any = None) -> tuple:
        """(dq, dk, dv, dscale or None, dslopes or None) for the upstream gradient g."""

    def attention_transposed(self, q: Any, k: Any, v: Any, scale: Any, kind: Context | tuple,
                             lse: Any, slopes: Any = None, probs: Any = None) -> Any:
        """The forward's weights applied keys-major: ``o_j = sum_{i : j in C(i)} P_ij v_i``."""


def _parameters(function: Any, skip_self: bool) -> list[tuple[str, Any, Any]]:
    params = list(inspect.signature(function).parameters.values())
    if skip_self:
        params = params[1:]
    return [(p.name, p.kind, p.default) for p in params]


def implements(module: ModuleType, interface: type = AttentionKernels) -> None:
    """Check that ``module`` defines every function of ``interface`` with its parameters.

    Raises:
        TypeError: naming the module, the function and the difference.
    """
    for name, member in vars(interface).items():
        if name.startswith("_") or not callable(member):
            continue
        function = getattr(module, name, None)
        if function is None:
            raise TypeError(f"{module.__name__} implements {interface.__name__} but lacks {name}")
        want, have = _parameters(member, True), _parameters(function, False)
        if want != have:
            spelled = [f"{n}={d!r}" if d is not inspect.Parameter.empty else n
                       for n, _, d in want]
            raise TypeError(
                f"{module.__name__}.{name} differs from {interface.__name__}.{name}: its "
                f"parameters are {[n for n, _, _ in have]}, the interface's "
                f"({', '.join(spelled)})"
            )
