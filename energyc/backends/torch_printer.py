"""Print SymPy expressions as torch code.

Sub-expressions that involve a tensor argument print with ``torch.*`` functions; constant
sub-expressions (numbers and dim sizes) print with ``math.*``, so ``1 / sqrt(K)`` stays a Python
float. Each element-wise function of :mod:`energyc.ir.functions` brings its own torch spelling.

Products and sums print as in-place chains where the printer knows the result's shape: every
operator of ``a * b * c`` makes a new tensor (a pass over fresh memory each), while
``(a * b).mul_(c)`` writes ``c``'s factor into the first product. The first step must already
have the result's full shape, so the chain starts with an operand that has it (``full``: the
arguments that carry every axis of the output; any expression of one has the full shape too,
since element-wise ops only broadcast up). The rules, with the identity each one keeps:

    -a * b * c      -> (a * b).mul_(c).neg_()        x * (-1) = -x
    k * a * b / c   -> (a * b).div_(c).mul_(k)       x / c = x * c**-1, k a number
    a + b - c       -> (a + b).sub_(c)                x + (-1) c = x - c
    a * step(u) * b -> threshold_backward(a, u, 0).mul_(b)
                                        a step(u) = (a where u > 0, else 0): relu's backward op,
                                        one pass instead of a mask, a cast and a product

A function that autograd may record (``recorded``: the energy, which users differentiate once or
twice) keeps these chains but never modifies in place a tensor that an operation's backward
saves: autograd would find it changed ("modified by an inplace operation"). Binary operators and
the first steps above save their inputs, not their output, so a chain on them is safe; a
function whose backward reads its own output (``torch.exp``: d exp(u) = exp(u) du; tanh,
sigmoid, tan, relu: ``SAVES_OUTPUT``) is not scaled in place there, and a factor ``c + s y`` after
the first step is a product, not ``_rt.mul_affine_`` (whose ``addcmul_`` reads as a factor the
tensor it writes).
"""

from __future__ import annotations

import sympy
from sympy.printing.pycode import PythonCodePrinter

from energyc.backends.spelling import fill, stable_forms, unit
from energyc.ir.functions import EnergyFunction, step

# SymPy function -> torch function (tensor arguments); math fallbacks come from PythonCodePrinter.
TORCH_FUNCTIONS = {
    "exp": "torch.exp",
    "log": "torch.log",
    "tanh": "torch.tanh",
    "sinh": "torch.sinh",
    "cosh": "torch.cosh",
    "sin": "torch.sin",
    "cos": "torch.cos",
    "tan": "torch.tan",
    "atan": "torch.atan",
    "erf": "torch.erf",
    "erfc": "torch.erfc",
    "Abs": "torch.abs",
    "sign": "torch.sign",
    "asinh": "torch.asinh",
}

# torch functions whose backward reads their output (autograd saves the result tensor), with the
# derivative that reads it: such a result is never modified in place while autograd records.
# tests/test_torch_backend.py checks this set against torch: each spelling the printer knows is
# scaled in place under autograd and differentiated twice, which fails exactly for these.
SAVES_OUTPUT = {
    "exp",  # d exp(u) = exp(u) du
    "tanh",  # d tanh(u) = (1 - tanh(u)**2) du
    "tan",  # d tan(u) = (1 + tan(u)**2) du
    "sigmoid",  # d sigmoid(u) = sigmoid(u) (1 - sigmoid(u)) du
    "relu",  # d relu(u) = step(relu(u)) du (threshold_backward on the result)
}


class TorchPrinter(PythonCodePrinter):
    """``names`` maps symbols (arguments, dims, sizes) to the code that denotes them."""

    def __init__(self, names: dict[str, str], tensor_symbols: set[sympy.Symbol],
                 full: set[sympy.Symbol] = frozenset(), recorded: bool = False):
        super().__init__({"fully_qualified_modules": True, "standard": "python3"})
        self.names = names
        self.tensor_names = {s.name for s in tensor_symbols}
        self.full_names = {s.name for s in full}
        self.recorded = recorded

    def _saves_output(self, f: sympy.Basic) -> bool:
        """Whether autograd, recording, saves the printed result of function ``f`` (a function
        printed by its definition, as a user's ``elementwise``, as that definition's)."""
        if not self.recorded:
            return False
        if isinstance(f, EnergyFunction) and not type(f).torch:
            return self._saves_output(type(f).definition(f.args[0]))
        return isinstance(f, sympy.Function) and type(f).__name__ in SAVES_OUTPUT

    def _fresh(self, f: sympy.Basic) -> bool:
        """Whether the printed ``f`` is a new tensor, one call of a torch function; a function
        printed by its definition is one only if that definition is (``elementwise("id",
        lambda u: u)`` prints its argument itself, which an in-place step would overwrite)."""
        if isinstance(f, EnergyFunction) and not type(f).torch:
            return self._fresh(type(f).definition(f.args[0]))
        return isinstance(f, sympy.Function)

    def _is_tensor(self, expr: sympy.Basic) -> bool:
        return any(s.name in self.tensor_names for s in expr.free_symbols)

    def _is_full(self, expr: sympy.Basic) -> bool:
        """Whether ``expr`` has the output's full shape (it involves a full argument)."""
        return any(s.name in self.full_names for s in expr.free_symbols)

    def _print_Mul(self, expr):
        coeff, factors = expr.as_coeff_mul()
        tensors = [f for f in factors if self._is_tensor(f)]
        if not tensors:
            return super()._print_Mul(expr)
        muls = [f for f in tensors if not (f.is_Pow and f.exp == -1)]
        divs = [f.base for f in tensors if f.is_Pow and f.exp == -1]
        # factors c + s y go last, each one pass over the product so far (_rt.mul_affine_)
        affine = [f for f in muls if self._affine(f) is not None]
        if affine and len(muls) + len(divs) > len(affine):
            muls = [f for f in muls if f not in affine]
        else:
            affine = []
        if not affine and len(tensors) < 2:
            (f,) = tensors
            if (isinstance(f, sympy.Function) and self._is_full(f) and f.is_commutative
                    and self._fresh(f) and not self._saves_output(f)):
                # c * f(a): f's result is a fresh tensor of the full shape: scale it in place
                return self._finish(self._print(f), coeff, factors, [])
            return super()._print_Mul(expr)
        if affine and len(muls) + len(divs) == 1:
            return self._affine_chain(coeff, factors, muls, divs, affine)
        masked = self._masked_first(muls)
        if masked is not None:
            code, muls = masked
            code += "".join(f".mul_({self._print(f)})" for f in muls)
            code += "".join(f".div_({self._print(f)})" for f in divs)
            return self._finish(code, coeff, factors, affine)
        # the first step, a fresh tensor of the full shape: (full * other) or (other / full)
        first = next((f for f in muls if self._is_full(f)), None)
        if first is not None:
            muls.remove(first)
            second, op = (muls.pop(0), "*") if muls else (divs.pop(0), "/")
        else:
            first = next((f for f in divs if self._is_full(f)), None)
            if first is None or not muls:
                return super()._print_Mul(expr)
            divs.remove(first)
            first, second, op = muls.pop(0), first, "/"
        prec = sympy.printing.precedence.PRECEDENCE["Mul"]
        code = (f"({self.parenthesize(first, prec)} {op} "
                f"{self.parenthesize(second, prec, strict=op == '/')})")
        code += "".join(f".mul_({self._print(f)})" for f in muls)
        code += "".join(f".div_({self._print(f)})" for f in divs)
        return self._finish(code, coeff, factors, affine)

    def _masked_first(self, muls: list) -> tuple[str, list] | None:
        """``a * step(u)`` as the chain's first step, one pass (relu's backward op), with the
        factors left: a full factor ``a`` and a step of a tensor among ``muls``; else None."""
        masks = [f for f in muls if isinstance(f, step) and self._is_tensor(f.args[0])]
        first = next((f for f in muls if self._is_full(f) and f not in masks), None)
        if not masks or first is None:
            return None
        rest = [f for f in muls if f is not first and f is not masks[0]]
        return (f"torch.ops.aten.threshold_backward({self._print(first)}, "
                f"{self._print(masks[0].args[0])}, 0)"), rest

    def _affine_chain(self, coeff, factors, muls, divs, affine) -> str:
        """``a (c + s y) ...`` with ``a`` the one other tensor factor: the first affine factor
        makes the fresh tensor, ``torch.addcmul(a, a, y, value=s / c)`` (times c), or the
        quotient does when ``a`` divides."""
        (a,) = muls or divs
        if divs or not self._is_full(a):
            return super()._print_Mul(sympy.Mul(coeff, *factors))
        c, s, y = self._affine(affine[0])
        ca = self._print(a)
        code = f"torch.addcmul({ca}, {ca}, {self._print(y)}, value={self._print(s / c)})"
        if c != 1:
            code += f".mul_({self._print(c)})"
        return self._finish(code, coeff, factors, affine[1:])

    def _finish(self, code: str, coeff, factors, affine) -> str:
        """The in-place tail of a product chain: affine factors, the scale, the sign."""
        for f in affine:
            if self.recorded:  # mul_affine_'s addcmul_ reads as a factor the tensor it writes
                prec = sympy.printing.precedence.PRECEDENCE["Mul"]
                code = f"({code} * {self.parenthesize(f, prec)})"
                continue
            c, s, y = self._affine(f)
            code = f"_rt.mul_affine_({code}, {self._print(y)}, {self._print(c)}, {self._print(s)})"
        scale = sympy.Mul(abs(coeff), *(f for f in factors if not self._is_tensor(f)))
        if not (scale.is_Number and float(scale) == 1.0):  # 1.0 (a float) too: no pass
            inverse = 1 / scale
            if not scale.is_Float and sympy.count_ops(inverse) < sympy.count_ops(scale):
                code += f".div_({self._print(inverse)})"  # x / sqrt(K), as written
            else:
                code += f".mul_({self._print(scale)})"
        return code + (".neg_()" if coeff < 0 else "")

    def _affine(self, f: sympy.Expr):
        """``(c, s, y)`` when the factor ``f`` is ``c + s y``: numbers c != 0 and s, y a tensor
        expression that is not a sum; else None. (A sigmoid's derivative s (1 - s) and tanh's
        1 - t**2 are of this form.)"""
        if not f.is_Add or not self.full_names:
            return None
        c, rest = f.as_coeff_Add()
        if c == 0 or not c.is_Number or rest.is_Add:
            return None
        s, y = rest.as_coeff_Mul()
        if not s.is_Number or not self._is_tensor(y):
            return None
        return c, s, y

    def _print_Add(self, expr):
        terms = list(expr.as_ordered_terms())
        tensors = [t for t in terms if self._is_tensor(t)]
        if len(tensors) < 2:
            return super()._print_Add(expr)
        positive = [t for t in tensors if not t.could_extract_minus_sign()]
        # the first step, a fresh tensor of the full shape: (p + q) or (p - q), p positive
        first = next((t for t in positive if self._is_full(t)), None)
        if first is not None:
            second = next(t for t in tensors if t is not first)
        else:  # every full term is negative: (p - full)
            second = next((t for t in tensors if self._is_full(t)), None)
            if second is None or not positive:
                return super()._print_Add(expr)
            first = positive[0]

        def step(t):
            return ("-", "sub_", -t) if t.could_extract_minus_sign() else ("+", "add_", t)

        sign, _, term = step(second)
        prec = sympy.printing.precedence.PRECEDENCE["Add"]
        code = f"({self._print(first)} {sign} {self.parenthesize(term, prec, strict=sign == '-')})"
        for t in terms:
            if t is not first and t is not second:
                _, op, term = step(t)
                code += f".{op}({self._print(term)})"
        return code

    def _print_Symbol(self, expr):
        if expr.name in self.names:
            return self.names[expr.name]
        raise KeyError(f"no name for symbol {expr}")

    def _print_Rational(self, expr):
        return f"({expr.p} / {expr.q})"

    def _print_Half(self, expr):
        return "0.5"

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Pi(self, expr):
        return "math.pi"

    def _print_Exp1(self, expr):
        return "math.e"

    def doprint(self, expr, assign_to=None):
        # forms that overflow where their value does not, rewritten (spelling.STABLE_FORMS)
        return super().doprint(stable_forms(expr), assign_to)

    def _print_Function(self, expr):
        # a spelling is one operand (spelling.unit): SymPy places a function as one
        if isinstance(expr, EnergyFunction):
            if type(expr).torch and self._is_tensor(expr):
                return fill(type(expr).torch, self._print(expr.args[0]))
            return unit(self._print(type(expr).definition(expr.args[0])))
        return super()._print_Function(expr)

    def _print_known_func(self, expr):
        name = type(expr).__name__
        if self._is_tensor(expr) and name in TORCH_FUNCTIONS:
            return f"{TORCH_FUNCTIONS[name]}({', '.join(self._print(a) for a in expr.args)})"
        # a constant (numbers and dim sizes): SymPy's own printer for the function (math.*)
        return getattr(super(), f"_print_{name}")(expr)

    _print_exp = _print_log = _print_tanh = _print_sinh = _print_cosh = _print_known_func
    _print_sin = _print_cos = _print_tan = _print_atan = _print_erf = _print_known_func
    _print_erfc = _print_Abs = _print_sign = _print_asinh = _print_known_func

    def _print_Pow(self, expr, rational=False):
        base, e = expr.args
        if self._is_tensor(expr):
            b = self.parenthesize(base, sympy.printing.precedence.PRECEDENCE["Pow"])
            if e == sympy.S.Half:
                return f"torch.sqrt({self._print(base)})"
            if e == -sympy.S.Half:
                return f"torch.rsqrt({self._print(base)})"
            if e == -1:
                return f"1 / {b}"
            if e.is_Integer and e < 0:
                return f"1 / {b}**{-e}"
            ex = self.parenthesize(e, sympy.printing.precedence.PRECEDENCE["Pow"])
            return f"{b}**{ex}"
        return super()._print_Pow(expr, rational=rational)

    def _print_Piecewise(self, expr):
        if not self._is_tensor(expr):
            return super()._print_Piecewise(expr)
        out = None
        for value, cond in reversed(expr.args):
            v = self._print(value)
            if cond == sympy.true:
                out = v
            else:
                out = f"torch.where({self._print(cond)}, {v}, {out if out is not None else 'math.nan'})"
        return out

    def _print_Relational(self, expr):
        op = {"==": "==", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}[expr.rel_op]
        return f"({self._print(expr.lhs)} {op} {self._print(expr.rhs)})"

    def _print_And(self, expr):
        return " & ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Or(self, expr):
        return " | ".join(f"({self._print(a)})" for a in expr.args)

    def _print_Max(self, expr):
        if not self._is_tensor(expr):
            return super()._print_Max(expr)
        return self._minmax(expr, "torch.maximum", "torch.clamp_min")

    def _print_Min(self, expr):
        if not self._is_tensor(expr):
            return super()._print_Min(expr)
        return self._minmax(expr, "torch.minimum", "torch.clamp_max")

    def _minmax(self, expr, fn: str, clamp: str) -> str:
        tensors = [a for a in expr.args if self._is_tensor(a)]
        consts = [a for a in expr.args if not self._is_tensor(a)]
        out = self._print(tensors[0])
        for t in tensors[1:]:
            out = f"{fn}({out}, {self._print(t)})"
        for c in consts:
            out = f"{clamp}({out}, {self._print(c)})"
        return out

    def _print_Heaviside(self, expr):
        # not torch.heaviside, which autograd cannot differentiate (layer.energy records the
        # energy): Heaviside(u) = (sign(u) + 1) / 2 with H(0) = 1/2, its derivative 0 as autograd's
        arg = self._print(expr.args[0])
        h0 = float(expr.args[1]) if len(expr.args) > 1 else 0.5
        if h0 == 0.5:
            return f"(0.5 * (torch.sign({arg}) + 1))"
        return f"torch.where(({arg}) == 0, {h0!r}, (({arg}) > 0).to(({arg}).dtype))"

