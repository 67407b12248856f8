"""What the torch and Triton printers share about spelling SymPy functions as code.

A function's spelling is text put in an expression (a table entry, an ``EnergyFunction``'s
``torch`` or ``triton`` format string, a printed definition). SymPy's printers parenthesise an
operand by the precedence of the SymPy node it prints, and a function node binds tightest, so
its spelling must be one operand too: a name, a call, or wholly parenthesised (``unit``). The
argument of a format string is parenthesised unless every place it goes is a whole argument of a
call (``fill``): ``({0} > 0)`` needs ``(a + b)``, ``tl.sigmoid({0})`` does not.

Some bodies print badly as SymPy writes them: the ratio sinh(u) / cosh(u) that differentiating
log(cosh(u)) gives is inf / inf in float32 beyond |u| = 89.4, where it is 1. Before printing,
both printers rewrite such forms into ones that stay finite where the value is
(``STABLE_FORMS``; a pass over pairs applies them before its common subexpressions are found,
so that sinh(u) and cosh(u) are not split into two variables first; the ratio is also one of
``functions.PRODUCT_IDENTITIES``, applied where a pointwise body is made, before the graph's
own common subexpressions could split it)::

    sinh(u)**a cosh(u)**-b  ->  tanh(u)**k sinh(u)**(a - k) cosh(u)**(k - b),  k = min(a, b)
                                sinh / cosh = tanh  (a, b > 0 integers; cosh / sinh likewise)
    log(c1 e^v1 + c2 e^v2)  ->  log(c1) + v1 + softplus(v2 - v1 + log(c2 / c1))
                                log(A + B) = log A + log(1 + B / A)  (c1, c2 > 0 numbers;
                                e^0 = 1: log(1 + e^u) = softplus(u))
"""

from __future__ import annotations

import re

import sympy

from energyc.ir.functions import hyperbolic_ratio, softplus

_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9.]*")


def _closing(code: str, start: int) -> int:
    """The index of the parenthesis that closes the one at ``start`` (-1 if none)."""
    depth = 0
    for k in range(start, len(code)):
        if code[k] == "(":
            depth += 1
        elif code[k] == ")":
            depth -= 1
            if depth == 0:
                return k
    return -1


def is_unit(code: str) -> bool:
    """Whether ``code`` is one operand: a non-negative number, or a name or a parenthesised
    whole followed by calls and attributes (``tl.exp(a0)``, ``(a0 > 0).to(a0.dtype)``)."""
    code = code.strip()
    try:
        return float(code) >= 0 and not code.startswith(("+", "-"))
    except ValueError:
        pass
    if code.startswith("("):
        k = _closing(code, 0) + 1
    else:
        name = _NAME.match(code)
        k = name.end() if name else 0
    if k <= 0:
        return False
    while k < len(code):  # trailers: a call, an attribute
        if code[k] == "(":
            k = _closing(code, k) + 1
        elif code[k] == ".":
            name = _NAME.match(code, k + 1)
            k = name.end() if name else 0
        else:
            return False
        if k <= 0:
            return False
    return True


def unit(code: str) -> str:
    """``code`` as one operand: parenthesised unless it is one already."""
    return code if is_unit(code) else f"({code})"


def fill(fmt: str, arg: str) -> str:
    """The format spelling ``fmt`` (over ``{0}``) at the printed argument ``arg``, as one
    operand: ``arg`` parenthesised unless it is one or every ``{0}`` is a whole argument of a
    call."""
    whole = all(
        fmt[: m.start()].rstrip().endswith(("(", ","))
        and fmt[m.end() :].lstrip().startswith((")", ","))
        for m in re.finditer(r"\{0\}", fmt)
    )
    return unit(fmt.format(arg if whole else unit(arg)))


def _exponential_term(term: sympy.Expr) -> tuple[sympy.Expr, sympy.Expr] | None:
    """(c, v) for a term c e^v with c > 0 a number (a positive number is c e^0); else None."""
    c, rest = term.as_coeff_Mul()
    if not (c.is_Number and c > 0):
        return None
    if rest == 1:
        return c, sympy.S.Zero
    if isinstance(rest, sympy.exp):
        return c, rest.args[0]
    return None


def _log_of_two_exponentials(expr: sympy.Expr) -> sympy.Expr | None:
    """log(c1 e^v1 + c2 e^v2) = log(c1) + v1 + softplus(v2 - v1 + log(c2 / c1)), the constant
    term (if any) first; None for any other log."""
    arg = expr.args[0]
    if not arg.is_Add or len(arg.args) != 2:
        return None
    terms = [_exponential_term(t) for t in arg.args]
    if None in terms:
        return None
    (c1, v1), (c2, v2) = sorted(terms, key=lambda t: t[1] != 0)
    return sympy.log(c1) + v1 + softplus(v2 - v1 + sympy.log(c2 / c1))


#: (name, which nodes, rewrite or None), applied bottom-up by ``stable_forms``
STABLE_FORMS = [
    ("hyperbolic_ratio", lambda e: e.is_Mul, hyperbolic_ratio),
    ("log_of_two_exponentials", lambda e: isinstance(e, sympy.log), _log_of_two_exponentials),
]


def stable_forms(expr: sympy.Basic) -> sympy.Basic:
    """``expr`` with every rule of STABLE_FORMS applied wherever it matches."""
    if not isinstance(expr, sympy.Basic) or not expr.has(sympy.sinh, sympy.log):
        return expr
    for _, query, rule in STABLE_FORMS:
        expr = expr.replace(query, lambda e, rule=rule: rule(e) or e)
    return expr
