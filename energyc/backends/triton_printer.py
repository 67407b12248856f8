"""Print SymPy expressions as Triton (``triton.language``) code inside a ``@triton.jit`` kernel.

Every symbol is a kernel value: a loaded tile (``a0``), the reduced value, or a dim size passed
as a scalar argument. Constants print as float literals (no ``math.*`` inside a kernel). Each
element-wise function of :mod:`energyc.ir.functions` brings its own Triton spelling. A function
with no Triton spelling raises :class:`NoTritonSpellingError`; the backend then computes that node with
torch instead, so an unusual body is slower, never wrong.
"""

from __future__ import annotations

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter, _known_functions, _known_functions_math

from energyc.ir.functions import EnergyFunction

# SymPy function -> triton.language function
TRITON_FUNCTIONS = {
    "exp": "tl.exp",
    "log": "tl.log",
    "sin": "tl.sin",
    "cos": "tl.cos",
    "erf": "tl.erf",
    "Abs": "tl.abs",
}

# rewritten in terms of the functions above
REWRITES = {
    "tanh": lambda u: 2 * sympy.Function("_sigmoid")(2 * u) - 1,
    "sinh": lambda u: (sympy.exp(u) - sympy.exp(-u)) / 2,
    "cosh": lambda u: (sympy.exp(u) + sympy.exp(-u)) / 2,
    "erfc": lambda u: 1 - sympy.erf(u),
}

MAX_INTEGER_POWER = 8  # u**n for |n| <= 8 prints as repeated products


class NoTritonSpellingError(Exception):
    """The expression uses a function this printer cannot spell in Triton."""


class TritonPrinter(PythonCodePrinter):
    """``names`` maps symbol names to the kernel values that denote them."""

    def __init__(self, names: dict[str, str]):
        super().__init__({"standard": "python3"})
        self.names = names

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            value = float(expr)
            return repr(value) if value >= 0 else f"({value!r})"
        return super()._print(expr, **kwargs)

    def _print_Integer(self, expr):
        return str(int(expr)) if expr >= 0 else f"({int(expr)})"

    def _print_Symbol(self, expr):
        if expr.name in self.names:
            return self.names[expr.name]
        raise KeyError(f"no name for symbol {expr}")

    def _print_Function(self, expr):
        if isinstance(expr, EnergyFunction):
            fmt = type(expr).triton
            if fmt:
                return fmt.format(self._print(expr.args[0]))
            return self._print(type(expr).definition(expr.args[0]))
        name = type(expr).__name__
        if name == "_sigmoid":
            return f"tl.sigmoid({self._print(expr.args[0])})"
        if name in TRITON_FUNCTIONS:
            return f"{TRITON_FUNCTIONS[name]}({', '.join(self._print(a) for a in expr.args)})"
        if name in REWRITES:
            return self._print(REWRITES[name](*expr.args))
        raise NoTritonSpellingError(name)

    _print_exp = _print_log = _print_sin = _print_cos = _print_erf = _print_Function
    _print_Abs = _print_tanh = _print_sinh = _print_cosh = _print_erfc = _print_Function

    def _print_known_func(self, expr):
        return self._print_Function(expr)

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        b = self.parenthesize(base, PRECEDENCE["Mul"])
        if e == sympy.S.Half:
            return f"tl.sqrt({self._print(base)})"
        if e == -sympy.S.Half:
            return f"(1.0 / tl.sqrt({self._print(base)}))"
        if e.is_Integer and 0 < abs(int(e)) <= MAX_INTEGER_POWER:
            product = " * ".join([b] * abs(int(e)))
            return f"({product})" if e > 0 else f"(1.0 / ({product}))"
        if base == sympy.E:
            return f"tl.exp({self._print(e)})"
        raise NoTritonSpellingError(f"power {expr}")

    def _print_Piecewise(self, expr):
        out = None
        for value, cond in reversed(expr.args):
            v = self._print(value)
            if cond == sympy.true:
                out = v
            else:
                other = out if out is not None else 'float("nan")'
                out = f"tl.where({self._print(cond)}, {v}, {other})"
        return out

    def _print_Relational(self, expr):
        return f"({self._print(expr.lhs)} {expr.rel_op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Max(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"tl.maximum({out}, {self._print(a)})"
        return out

    def _print_Min(self, expr):
        out = self._print(expr.args[0])
        for a in expr.args[1:]:
            out = f"tl.minimum({out}, {self._print(a)})"
        return out

    def _print_Heaviside(self, expr):
        u = self._print(expr.args[0])
        h0 = float(expr.args[1]) if len(expr.args) > 1 else 0.5
        return f"tl.where({u} > 0, 1.0, tl.where({u} < 0, 0.0, {h0!r}))"

    def _print_sign(self, expr):
        u = self._print(expr.args[0])
        return f"tl.where({u} > 0, 1.0, tl.where({u} < 0, -1.0, 0.0))"

    def emptyPrinter(self, expr):  # noqa: N802 - SymPy's name
        raise NoTritonSpellingError(type(expr).__name__)


# SymPy's Python printer spells the functions it knows as math.* (math.atan, math.gamma): inside
# a kernel each must be Triton's spelling above or NoTritonSpellingError, never math.*
for _name in {**_known_functions, **_known_functions_math}:
    setattr(TritonPrinter, f"_print_{_name}", TritonPrinter._print_Function)
