"""Element-wise functions that SymPy lacks, each defined in one place.

A function here is a SymPy ``Function`` subclass that carries, side by side:

* its value, as the SymPy expression it abbreviates (``definition``), used by the reference
  evaluator and for printing when no faster library call exists;
* its derivative (``fdiff``), which SymPy's ``diff`` uses;
* its torch spelling (``torch``) and its Triton spelling (``triton``), format strings over the
  printed argument (an empty spelling prints the definition instead); the printers place a
  spelling as one operand and parenthesise the argument where it is not a call's whole argument
  (``energyc.backends.spelling.fill``). A Triton spelling may call the helpers of
  ``energyc.runtime.triton_math`` as ``_tm.<name>``.

SymPy's own functions (exp, log, tanh, erf, sqrt, Piecewise, Max, ...) need no entry: SymPy knows
their derivatives and the torch printer knows their names.
"""

from __future__ import annotations

from collections.abc import Callable

import sympy


class EnergyFunction(sympy.Function):
    """Base class of the element-wise functions defined here (one argument each)."""

    nargs = 1
    torch: str = ""
    triton: str = ""

    @classmethod
    def definition(cls, u: sympy.Expr) -> sympy.Expr:  # pragma: no cover - overridden
        raise NotImplementedError

    def _eval_evalf(self, prec):
        # a number's value (softplus(2)), from the definition: SymPy compares and prints it
        if self.args[0].is_number:
            return type(self).definition(self.args[0])._eval_evalf(prec)
        return None


class sigmoid(EnergyFunction):  # noqa: N801 - lower case like SymPy's functions
    """sigma(u) = 1 / (1 + exp(-u));  sigma' = sigma (1 - sigma)."""

    torch = "torch.sigmoid({0})"
    triton = "tl.sigmoid({0})"

    @classmethod
    def definition(cls, u):
        return 1 / (1 + sympy.exp(-u))

    def fdiff(self, argindex=1):
        s = sigmoid(self.args[0])
        return s * (1 - s)

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None


class softplus(EnergyFunction):  # noqa: N801
    """softplus(u) = log(1 + exp(u));  softplus' = sigmoid."""

    torch = "torch.nn.functional.softplus({0})"
    # max(u, 0) + log1p(exp(-|u|)): no overflow for large |u|, relative accuracy for u < 0
    triton = "_tm.softplus({0})"

    @classmethod
    def definition(cls, u):
        return sympy.log(1 + sympy.exp(u))

    def fdiff(self, argindex=1):
        return sigmoid(self.args[0])

    def _eval_is_positive(self):
        return True if self.args[0].is_extended_real else None


class step(EnergyFunction):  # noqa: N801
    """step(u) = 1 if u > 0 else 0 (the derivative of relu, with step(0) = 0 as in torch)."""

    torch = "({0} > 0).to({0}.dtype)"
    triton = "tl.where({0} > 0, 1.0, 0.0)"

    @classmethod
    def definition(cls, u):
        return sympy.Piecewise((1, u > 0), (0, True))

    def fdiff(self, argindex=1):
        return sympy.Integer(0)

    def _eval_power(self, expt):
        # step(u)**n = step(u) for n > 0: its values are 0 and 1
        if expt.is_positive:
            return self
        return None


class relu(EnergyFunction):  # noqa: N801
    """relu(u) = max(u, 0);  relu' = step."""

    torch = "torch.relu({0})"
    triton = "tl.maximum({0}, 0.0)"

    @classmethod
    def definition(cls, u):
        return sympy.Piecewise((u, u > 0), (0, True))

    def fdiff(self, argindex=1):
        return step(self.args[0])


def _relu_absorbs_step(expr: sympy.Expr) -> sympy.Expr | None:
    """relu(u) step(u) = relu(u): step(u) is 1 wherever relu(u) is not 0 (relu(u)**2 / 2's
    derivative is their product)."""
    relus = {f.args[0] for f in expr.args if isinstance(f, relu)}
    kept = [f for f in expr.args if not (isinstance(f, step) and f.args[0] in relus)]
    return sympy.Mul(*kept) if len(kept) < len(expr.args) else None


def hyperbolic_ratio(expr: sympy.Expr) -> sympy.Expr | None:
    """sinh(u)**a cosh(u)**-b = tanh(u)**k sinh(u)**(a - k) cosh(u)**(k - b), k = min(a, b)
    (a, b > 0 integers; cosh(u)**a sinh(u)**-b likewise, with tanh(u)**-k) in a product, else
    None: the ratio that differentiating log(cosh(u)) gives is inf / inf beyond |u| = 89.4 in
    float32 (710 in float64), where tanh is 1."""
    powers: dict[sympy.Basic, sympy.Expr] = {}
    rest = []
    for f in expr.args:
        base, e = f.as_base_exp()
        if isinstance(base, (sympy.sinh, sympy.cosh)) and e.is_Integer:
            powers[base] = powers.get(base, 0) + e
        else:
            rest.append(f)
    changed = False
    for base, a in list(powers.items()):
        if not isinstance(base, sympy.sinh):
            continue
        other = sympy.cosh(base.args[0])
        b = powers.get(other, 0)
        if a * b >= 0:
            continue
        k = min(abs(a), abs(b)) * (1 if a > 0 else -1)  # tanh**k takes sinh**k cosh**-k
        powers[base], powers[other] = a - k, b + k
        powers[sympy.tanh(base.args[0])] = k
        changed = True
    if not changed:
        return None
    return sympy.Mul(*rest, *(base**e for base, e in powers.items()))


#: Identities of products of the functions here and SymPy's, (name, rewrite of a Mul or None),
#: applied by ``simplify_functions`` wherever a pointwise body is made (energyc.ir.ops.pointwise);
#: the printers apply hyperbolic_ratio again to what they print (backends.spelling)
PRODUCT_IDENTITIES = [
    ("relu_absorbs_step", _relu_absorbs_step),
    ("hyperbolic_ratio", hyperbolic_ratio),
]


def real_parts(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with re(z) as z, im(z) as 0 and conjugate(z) as z: every value of an energy is
    real, but SymPy's symbols carry no such assumption, so it writes |exp(u)| as exp(re(u)),
    which no printer spells."""
    if not expr.has(sympy.re, sympy.im, sympy.conjugate):
        return expr
    return expr.replace(lambda e: isinstance(e, (sympy.re, sympy.conjugate)), lambda e: e.args[0]
                        ).replace(lambda e: isinstance(e, sympy.im), lambda e: sympy.Integer(0))


def simplify_functions(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with its real parts taken (``real_parts``) and PRODUCT_IDENTITIES applied to
    every product in it."""
    expr = real_parts(expr)
    if not expr.has(step, sympy.sinh):
        return expr

    def rewrite(e):
        for _, rule in PRODUCT_IDENTITIES:
            out = rule(e)
            if out is not None:
                return out
        return e

    return expr.replace(lambda e: e.is_Mul, rewrite)


class _Frozen(sympy.Function):
    """A stand-in, during ``diff`` only, for a function whose derivative energyc defines."""

    back: type[sympy.Function]

    @classmethod
    def eval(cls, *args):
        return None


class _abs(_Frozen):  # noqa: N801
    nargs = 1
    back = sympy.Abs

    def fdiff(self, argindex=1):
        return sympy.sign(self.args[0])


class _sign(_Frozen):  # noqa: N801
    nargs = 1
    back = sympy.sign

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class _heaviside(_Frozen):  # noqa: N801
    nargs = (1, 2)
    back = sympy.Heaviside

    def fdiff(self, argindex=1):
        return sympy.Integer(0)


class _max(_Frozen):  # noqa: N801
    nargs = 2
    back = sympy.Max

    def fdiff(self, argindex=1):
        a, b = self.args if argindex == 1 else self.args[::-1]
        return sympy.Heaviside(a - b)


class _min(_Frozen):  # noqa: N801
    nargs = 2
    back = sympy.Min

    def fdiff(self, argindex=1):
        a, b = self.args if argindex == 1 else self.args[::-1]
        return sympy.Heaviside(b - a)


def _fold(cls: type[_Frozen]) -> Callable[[sympy.Expr], sympy.Expr]:
    def fold(e):
        out = e.args[0]
        for a in e.args[1:]:
            out = cls(out, a)
        return out
    return fold


_FREEZE = [
    (sympy.Abs, lambda e: _abs(e.args[0])),
    (sympy.sign, lambda e: _sign(e.args[0])),
    (sympy.Heaviside, lambda e: _heaviside(*e.args)),
    (sympy.Max, _fold(_max)),
    (sympy.Min, _fold(_min)),
]


def diff(expr: sympy.Expr, *symbols: sympy.Symbol) -> sympy.Expr:
    """d expr / d symbols, with the derivatives autograd takes where SymPy takes none or another:

    * d|u|/du = sign(u) (0 at u = 0, torch.abs's); d sign(u)/du = 0, d Heaviside(u)/du = 0
      (torch.sign's; SymPy's DiracDelta is 0 wherever it is not infinite);
    * Max(a1, ..., an) = max(...max(max(a1, a2), a3)..., an) in its argument order (as the
      printers and the reference evaluate it), each max(a, b) with d/da = Heaviside(a - b) and
      d/db = Heaviside(b - a), Heaviside(0) = 1/2: torch.maximum's autograd, which splits the
      gradient equally between tied arguments; Min likewise (torch.minimum's), so a clamp
      Min(Max(u, lo), hi) has derivative 1 strictly inside, 0 outside, 1/2 at a bound.

    SymPy's own rules need real symbols for |u| (else re/im forms) and give DiracDelta for sign
    and Heaviside; an energy's symbols are real but carry no assumption.
    """
    for s in symbols:
        if not expr.has(*(f for f, _ in _FREEZE)):
            expr = sympy.diff(expr, s)
            continue
        for f, make in _FREEZE:
            expr = expr.replace(lambda e, f=f: isinstance(e, f), make)
        expr = sympy.diff(expr, s).replace(lambda e: isinstance(e, _Frozen),
                                           lambda e: e.back(*e.args))
    return expr


BUILTIN_FUNCTIONS: dict[str, type[EnergyFunction]] = {
    f.__name__: f for f in (sigmoid, softplus, step, relu)
}

_USER_FUNCTIONS: dict[str, type[EnergyFunction]] = {}


def elementwise(
    name: str,
    value: Callable[[sympy.Symbol], sympy.Expr],
    derivative: Callable[[sympy.Symbol], sympy.Expr] | None = None,
) -> type[EnergyFunction]:
    """Define a named element-wise function ``name(u) = value(u)`` with an optional derivative.

    When ``derivative`` is given, SymPy uses it instead of differentiating ``value`` (useful when a
    simpler closed form exists). The function prints as its value expression.
    """
    if not name.isidentifier():
        raise ValueError(f"elementwise(): name {name!r} is not an identifier")
    u = sympy.Dummy("u")
    value_expr = sympy.sympify(value(u))
    deriv_expr = sympy.sympify(derivative(u)) if derivative is not None else None

    def _definition(cls, arg):
        return value_expr.subs(u, arg)

    def _fdiff(self, argindex=1):
        if deriv_expr is None:
            return sympy.diff(value_expr, u).subs(u, self.args[0])
        return deriv_expr.subs(u, self.args[0])

    cls = type(
        name,
        (EnergyFunction,),
        {"definition": classmethod(_definition), "fdiff": _fdiff, "torch": "", "triton": "",
         "__module__": __name__},
    )
    _USER_FUNCTIONS[name] = cls
    return cls
