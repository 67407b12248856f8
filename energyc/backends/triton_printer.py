"""Print SymPy expressions as Triton (``triton.language``) code inside a ``@triton.jit`` kernel.

Every symbol is a kernel value: a loaded tile (``a0``), the reduced value, or a dim size passed
as a scalar argument. Constants print as float literals (no ``math.*`` inside a kernel). Each
element-wise function of :mod:`energyc.ir.functions` brings its own Triton spelling; SymPy's
functions take a ``triton.language`` function or a helper of ``energyc.runtime.triton_math``
(imported by generated modules as ``_tm``), where the formulas and their accuracy are. Every
function the torch printer knows has a spelling here; one without raises
:class:`NoTritonSpellingError`, and the backend then computes that node with torch instead, so
an unusual body is slower, never wrong.

Every spelling is one operand (``spelling.unit``: a call or parenthesised), so SymPy's
precedence places it, and the printer first rewrites forms that overflow where their value does
not (``spelling.STABLE_FORMS``: sinh / cosh as tanh, a log of two exponentials as softplus).
Powers, with the identity each keeps (a constant exponent e, a tensor or symbol v):

    u**n, 0 < n <= 8      (u * u * ... * u)
    u**n, n > 8           _tm.ipow(u, n)                   repeated squaring
    u**-n                 (1.0 / u**n)                     u**n as above
    u**(1/2), u**(-1/2)   tl.sqrt(u), (1.0 / tl.sqrt(u))
    u**(n + 1/2), n >= 1  (u**n * tl.sqrt(u))              NaN for u < 0, as torch
    u**e, e another real  tl.exp(e * tl.log(u))            NaN for u < 0, 0 or inf at u = 0
    E**v, c**v (c > 0)    tl.exp(v), tl.exp(log(c) * v)
    c**v (c < 0)          _tm.power_of_negative(v, log|c|)  torch.pow's values
    u**v                  _tm.power(u, v)                  torch.pow's values for u < 0
"""

from __future__ import annotations

import math

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter, _known_functions, _known_functions_math

from energyc.backends.spelling import fill, stable_forms, unit
from energyc.ir.functions import EnergyFunction

# SymPy function -> its Triton spelling, a triton.language function or a helper of
# energyc.runtime.triton_math (_tm), with what each computes where tl's does not serve
TRITON_FUNCTIONS = {
    "exp": "tl.exp",
    "log": "tl.log",
    "sin": "tl.sin",
    "cos": "tl.cos",
    "erf": "tl.erf",
    "Abs": "tl.abs",
    "sinh": "_tm.sinh",  # no overflow before sinh's own (|u| 89.4 in fp32, not e^u's 88.7)
    "cosh": "_tm.cosh",  # likewise
    "tanh": "_tm.tanh",  # 1 for large |u|, odd, accurate near 0 (2 sigmoid(2u) - 1 is not)
    "tan": "_tm.tan",  # sin u / cos u
    "atan": "_tm.atan",
    "asinh": "_tm.asinh",  # accurate near 0 and beyond sqrt(max float)
    "erfc": "_tm.erfc",  # relative accuracy where 1 - erf(u) rounds to 0 (u > 4 in fp32)
    "sign": "_tm.sign",
}

MAX_INTEGER_POWER = 8  # u**n for |n| <= 8 prints as a product, beyond as repeated squaring


class NoTritonSpellingError(Exception):
    """The expression uses a function this printer cannot spell in Triton."""


class TritonPrinter(PythonCodePrinter):
    """``names`` maps symbol names to the kernel values that denote them."""

    def __init__(self, names: dict[str, str]):
        super().__init__({"standard": "python3"})
        self.names = names

    def doprint(self, expr, assign_to=None):
        return super().doprint(stable_forms(expr), assign_to)

    def _print(self, expr, **kwargs):
        if isinstance(expr, sympy.Expr) and expr.is_number and not expr.is_Integer:
            value = float(expr)
            return repr(value) if value >= 0 else f"({value!r})"
        code = super()._print(expr, **kwargs)
        if isinstance(expr, sympy.Basic) and not (
            expr.is_Add or expr.is_Mul or expr.is_Atom or expr.is_Relational or expr.is_Boolean
        ):
            return unit(code)  # a function's or a power's spelling: one operand
        return code

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
                return fill(fmt, self._print(expr.args[0]))
            return self._print(type(expr).definition(expr.args[0]))
        name = type(expr).__name__
        if name in TRITON_FUNCTIONS:
            return f"{TRITON_FUNCTIONS[name]}({', '.join(self._print(a) for a in expr.args)})"
        raise NoTritonSpellingError(name)

    def _print_known_func(self, expr):
        return self._print_Function(expr)

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if e.is_Float and float(e) * 2 == int(float(e) * 2):
            e = sympy.Rational(int(float(e) * 2), 2)  # 2.0, 1.5: the integer and half rules
        if base == sympy.E:
            return f"tl.exp({self._print(e)})"
        if not e.is_number:
            exponent = self.parenthesize(e, PRECEDENCE["Mul"])
            if base.is_number and base > 0:
                return f"tl.exp({self._print(sympy.log(base))} * {exponent})"
            if base.is_number and base < 0:
                log_abs = self._print(sympy.log(-base))
                return f"_tm.power_of_negative({self._print(e)}, {log_abs})"
            b = "0.0" if base.is_number else self._print(base)  # 0**v: 0, inf or 1
            return f"_tm.power({b}, {self._print(e)})"
        if e.is_Integer and e < 0:
            return f"(1.0 / {self._print(sympy.Pow(base, -e, evaluate=False))})"
        if e.is_Integer:
            if e > MAX_INTEGER_POWER:
                return f"_tm.ipow({self._print(base)}, {int(e)})"
            return f"({' * '.join([self.parenthesize(base, PRECEDENCE['Mul'])] * int(e))})"
        if e.is_Rational and e.q == 2:
            root = f"tl.sqrt({self._print(base)})"
            if abs(e.p) > 1:
                power = self.parenthesize(sympy.Pow(base, abs(e) - sympy.S.Half), PRECEDENCE["Mul"])
                root = f"({power} * {root})"
            return root if e > 0 else f"(1.0 / {root})"
        if math.isfinite(float(e)):
            return f"tl.exp({self._print(e)} * tl.log({self._print(base)}))"
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
        h0 = float(expr.args[1]) if len(expr.args) > 1 else 0.5
        return f"_tm.heaviside({self._print(expr.args[0])}, {h0!r})"

    def emptyPrinter(self, expr):  # noqa: N802 - SymPy's name
        raise NoTritonSpellingError(type(expr).__name__)


# SymPy's Python printer spells the functions it knows as math.* (math.atan, math.gamma): inside
# a kernel each must be Triton's spelling above or NoTritonSpellingError, never math.*
# (those printed above, Max and Min among SymPy's "known functions", keep their own printing)
for _name in {**_known_functions, **_known_functions_math, **TRITON_FUNCTIONS}:
    if f"_print_{_name}" not in vars(TritonPrinter):
        setattr(TritonPrinter, f"_print_{_name}", TritonPrinter._print_Function)
