"""Element-wise functions that SymPy lacks, each defined in one place.

A function here is a SymPy ``Function`` subclass that carries, side by side:

* its value, as the SymPy expression it abbreviates (``definition``), used by the reference
  evaluator and for printing when no faster library call exists;
* its derivative (``fdiff``), which SymPy's ``diff`` uses;
* its torch spelling (``torch``) and its Triton spelling (``triton``), format strings over the
  printed argument (an empty spelling prints the definition instead).

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
    # max(u, 0) + log(1 + exp(-|u|)): no overflow for large |u|
    triton = "(tl.maximum({0}, 0.0) + tl.log(1.0 + tl.exp(-tl.abs({0}))))"

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


#: Identities of products of the functions here, (name, rewrite of a Mul or None), applied by
#: ``simplify_functions`` wherever a pointwise body is made (energyc.ir.ops.pointwise).
PRODUCT_IDENTITIES = [
    ("relu_absorbs_step", _relu_absorbs_step),
]


def simplify_functions(expr: sympy.Expr) -> sympy.Expr:
    """``expr`` with PRODUCT_IDENTITIES applied to every product in it."""
    if not expr.has(step):
        return expr

    def rewrite(e):
        for _, rule in PRODUCT_IDENTITIES:
            out = rule(e)
            if out is not None:
                return out
        return e

    return expr.replace(lambda e: e.is_Mul, rewrite)


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
