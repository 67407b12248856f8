"""The one table of numerical tolerances, keyed by dtype name.

Every comparison of generated code against a reference takes its (rtol, atol) from here.
float64 bounds are for exact-maths agreement of two different evaluation orders; the lower
precisions follow the usual practice of flash-attention-style kernel test suites.
"""

from __future__ import annotations

TOLERANCES: dict[str, tuple[float, float]] = {
    "float64": (1e-7, 1e-9),
    "float32": (2e-4, 2e-5),
    "bfloat16": (3e-2, 3e-2),
    "float16": (5e-3, 5e-3),
}


def tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) for a torch dtype or its name."""
    name = str(dtype).replace("torch.", "")
    return TOLERANCES[name]
