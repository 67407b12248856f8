"""The notation of energy files.

An energy file is plain Python that imports this module and declares dims, tokens, the state,
parameters, hyperparameters, an energy, and one or more layers::

    from energyc.dsl import *

    D, H, K = dims("D H K")
    i, j = tokens()
    x, xbar = state(D)
    W_q = param("W_q", (H, K, D))
    W_k = param("W_k", (H, K, D))
    beta = hyper("beta", default=1 / sqrt(K))

    q = W_q @ x[i]                       # (H, K) at the updated token i
    k = W_k @ xbar[j]                    # (H, K) at a context token j
    E = -(1 / beta) * logsumexp(beta * dot(q, k, over=K), over=j <= i).sum(H)

    layer("cem_attention", E, eta=1.0)

Tensors carry named dims and the token roles they depend on (``i``, ``j``); arithmetic broadcasts
by name. ``x`` is the state (differentiated); ``xbar`` is the same tensor in the context role (held
fixed in ``dE/dx``). Every construct records its file and line, which error messages name.
"""

from __future__ import annotations

import functools
import inspect
import keyword
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import sympy
from sympy import Rational, pi  # noqa: F401 - re-exported for energy files

from energyc import context as _context
from energyc import settings
from energyc.errors import EnergyError, user_location
from energyc.ir import functions as _fn
from energyc.ir import ops as _ops
from energyc.ir.graph import Graph
from energyc.names import RESERVED, attribute_names, code_name

__all__ = [
    "dims", "tokens", "position", "state", "neurons", "memory", "param", "hyper", "layer", "normal", "uniform", "zeros", "ones",
    "constant", "dot", "sum_over", "logsumexp", "apply", "elementwise",
    "rotary", "alibi_slopes", "exp", "log", "tanh", "sigmoid", "softplus", "relu", "erf", "cos", "sin", "cosh", "sqrt",
    "Rational", "pi", "Tensor", "Dim", "Token", "ContextSet",
    *(f.__name__ for f in _context.FUNCTIONS),  # window, all_tokens
]



# -- declarations ----------------------------------------------------------------------------------


class Dim(sympy.Symbol):
    """A named size, e.g. ``D``. A positive integer SymPy symbol, usable in defaults and inits."""

    def __new__(cls, name: str):
        return super().__new__(cls, name, positive=True, integer=True)


class HyperSymbol(sympy.Symbol):
    """A scalar hyperparameter; a SymPy symbol so that ``1 / beta`` is an expression."""

    def __new__(cls, name: str):
        return super().__new__(cls, name, real=True)


@dataclass
class Init:
    """How a parameter is initialised: ``kind`` with SymPy-expression arguments in the dims."""

    kind: str
    args: dict[str, Any] = field(default_factory=dict)


# constants that make a declared number not a finite real one
NOT_FINITE_REAL = (sympy.I, sympy.zoo, sympy.nan, sympy.oo, -sympy.oo)


def _init_value(value: Any, what: str) -> sympy.Expr:
    """An init argument: a finite real number, or an expression of the dims."""
    try:
        expr = sympy.sympify(value)
    except (sympy.SympifyError, TypeError):
        message = f"{what} must be a number or an expression of the dims, got {value!r}"
        raise _fail(message) from None
    if not isinstance(expr, sympy.Expr) or expr.has(*NOT_FINITE_REAL):
        raise _fail(f"{what} must be a finite real number, got {value!r}")
    return expr


def normal(std: Any = None, mean: Any = 0) -> Init:
    """Gaussian init; ``std`` defaults to ``1/sqrt(fan_in)`` (the last axis)."""
    std_expr = None if std is None else _init_value(std, "normal(std): std")
    if std_expr is not None and std_expr.is_negative:
        raise _fail(f"normal(std): std must be >= 0, got {std!r}")
    return Init("normal", {"mean": _init_value(mean, "normal(mean=...): mean"), "std": std_expr})


def uniform(low: Any, high: Any) -> Init:
    """Uniform init on ``[low, high]``."""
    low_expr, high_expr = _init_value(low, "uniform(low, high): low"), _init_value(
        high, "uniform(low, high): high")
    if (high_expr - low_expr).is_negative:
        raise _fail(f"uniform(low, high) needs low <= high, got low={low!r}, high={high!r}")
    return Init("uniform", {"low": low_expr, "high": high_expr})


def zeros() -> Init:
    return Init("constant", {"value": sympy.Integer(0)})


def ones() -> Init:
    return Init("constant", {"value": sympy.Integer(1)})


def constant(value: Any) -> Init:
    """Every entry ``value`` (a number or an expression of the dims)."""
    return Init("constant", {"value": _init_value(value, "constant(value): value")})


def alibi_slopes() -> Init:
    """ALiBi's geometric slopes ``2^(-8 (h + 1) / H)`` over the parameter's entries."""
    return Init("alibi", {})


@dataclass
class ParamDecl:
    name: str  # the code name (energyc.names); ``public`` is the declared one
    dims: tuple[str, ...]  # declared (storage) order, code names
    init: Init
    where: str | None
    node: int
    public: str = ""


@dataclass
class HyperDecl:
    name: str
    default: sympy.Expr | None
    learnable: bool
    where: str | None
    symbol: HyperSymbol
    positive: bool = False
    public: str = ""


@dataclass
class LayerDecl:
    """A layer: the energy, and the settings of the descent step built from it."""

    name: str
    energy: int
    eta: float
    steps: int
    precond: str
    rank: int
    joint: bool
    context: str
    doc: str
    where: str | None
    file: EnergyFile
    memory: str | None = None  # the code name of the memory the energy reads (None: none)
    #: a neuron model's layers (``neurons``), in declared order; empty: the state is x itself
    neurons: tuple[NeuronDecl, ...] = ()
    #: how a neuron model steps: "descent" (x <- x - eta/tau dE/dg, the Energy Transformer's) or
    #: "legendre" (x <- x - eta/tau (x + dE/dg), hamux's, with the Legendre terms in its energy)
    dynamics: str = "descent"
    #: the energy's named terms (code-safe names, nodes), where it was given as a dict
    terms: tuple[tuple[str, int], ...] = ()


class EnergyFile:
    """What one energy file declared. The loader sets one as current while the file runs."""

    def __init__(self, path: str = "<energy>") -> None:
        self.path = path
        self.graph = Graph(())
        self.dims: dict[str, Dim] = {}
        self.dim_where: dict[str, str | None] = {}
        self.dim_sizes: dict[str, int] = {}  # default sizes (code name -> size), where declared
        self.state_dim: str | None = None
        self.state_where: str | None = None
        self.memories: dict[str, MemoryDecl] = {}  # code name -> the declared second sequence
        self.neurons: list[NeuronDecl] = []  # the neuron layers (neurons(...)), in declared order
        self.params: dict[str, ParamDecl] = {}
        self.hypers: dict[str, HyperDecl] = {}
        self.layers: list[LayerDecl] = []
        self.tokens: tuple[Token, Token] | None = None
        self.joint_uses: list[str | None] = []
        self.doc = ""
        # declared name -> code name (energyc.names), and back; what each name was declared as
        self.codes: dict[str, str] = {}
        self.public: dict[str, str] = {}
        self.declared: dict[str, tuple[str, str | None]] = {}

    def declare(self, name: str, what: str) -> str:
        """Record the declared ``name`` (checked by the caller); return its code name."""
        code = code_name(name, set(self.public), dim=what == "dim")
        self.codes[name] = code
        self.public[code] = name
        self.declared[name] = (what, user_location())
        return code

    def name_values(self, namespace: dict[str, Any]) -> None:
        """Label each value that the file binds to a module-level name with that name (a
        value's first name wins; names with a leading underscore are skipped): generated code
        names its variable so where it can (``energyc.backends.lowering``)."""
        for name, value in namespace.items():
            if isinstance(value, Tensor) and not name.startswith("_"):
                self.graph.label(value.node, name)

    def public_name(self, code: str) -> str:
        """The name the user declared for code name ``code`` (``code`` if none)."""
        return self.public.get(code, code)

    def public_names(self, codes: Iterable[str]) -> str:
        """``D, H, K``: code names as the user declared them, for messages."""
        return ", ".join(self.public_name(c) for c in codes)

    def attribute(self, code: str) -> str:
        """The generated Layer's attribute (and constructor keyword) for code name ``code``."""
        return attribute_names(list(self.codes))[self.public_name(code)]


_current: EnergyFile | None = None


def current_file() -> EnergyFile:
    global _current
    if _current is None:
        _current = EnergyFile()
    return _current


def set_current_file(energy_file: EnergyFile | None) -> None:
    global _current
    _current = energy_file


def _pub(codes: Iterable[str]) -> str:
    return current_file().public_names(codes)


def _fail(message: str) -> EnergyError:
    return EnergyError(message, user_location())


def _check_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise _fail(f"{what} name {name!r} must be a Python identifier")
    normal = unicodedata.normalize("NFKC", name)
    if normal != name:
        raise _fail(f"{what} name {name!r} is not in Unicode normal form (NFKC): Python reads it "
                    f"as {normal!r} in code; write {normal!r}")
    if name in RESERVED:
        raise _fail(f"{what} name {name!r} is reserved: the notation uses i, j (tokens), x, xbar "
                    "(the state) and eta (the step size)")
    earlier = current_file().declared.get(name)
    if earlier is not None and earlier[0] != what:
        raise _fail(f"name {name!r} declared twice (first as a {earlier[0]}"
                    + (f" at {earlier[1]})" if earlier[1] else ")"))
    return name


def dims(names: str, **sizes: int) -> tuple[Dim, ...] | Dim:
    """Declare named dims: ``D, H, K = dims("D H K")``; ``dims("D G R K", G=2, R=2)`` gives G
    and R default sizes (positive integers), the defaults of the generated Layer's keywords."""
    f = current_file()
    declared = names.replace(",", " ").split()
    for name, size in sizes.items():
        if name not in declared:
            raise _fail(f"dims({names!r}) gives a size to {name!r}, which it does not declare")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise _fail(f"the size of dim {name} must be a positive integer, got {size!r}")
    out = []
    for name in declared:
        _check_name(name, "dim")
        if name in f.codes:
            raise _fail(f"dim {name!r} declared twice")
        code = f.declare(name, "dim")
        f.dims[code] = Dim(code)
        f.dim_where[code] = user_location()
        if name in sizes:
            f.dim_sizes[code] = sizes[name]
        f.graph.dims = f.graph.dims + (code,)
        out.append(f.dims[code])
    return tuple(out) if len(out) != 1 else out[0]


def _dim_name(d: Any, what: str = "dim") -> str:
    f = current_file()
    if isinstance(d, Dim) and d.name in f.dims:
        return d.name
    if isinstance(d, str) and f.codes.get(d) in f.dims:
        return f.codes[d]
    raise _fail(f"{d!r} is not a declared {what}; declare it with dims(...)")


# -- tokens and context sets -----------------------------------------------------------------------


# A set of context tokens j for each updated token i (``j <= i``, ``window(4)``, ...): the
# compiler's one object for it, whose kinds, relations and functions energyc.context defines.
ContextSet = _context.Context


class Token:
    """The updated token ``i`` or a context token ``j``. Compare them to make context sets."""

    def __init__(self, role: str) -> None:
        self.role = role

    def __repr__(self) -> str:
        return self.role

    def _pair(self, other: Any, op: str) -> Any:
        if isinstance(other, _context.Prefix):
            if self.role == "j" and op == "<":
                return _context.PrefixSet()
            raise _fail(f"the prefix compares as j < prefix(); got {self} {op} prefix()")
        if not isinstance(other, Token) or other.role == self.role:
            raise _fail(f"a context set compares j with i, e.g. j <= i; got {self} {op} {other}")
        # normalise to "j op i"
        flip = {"<=": ">=", "<": ">", ">=": "<=", ">": "<", "!=": "!="}
        rel = op if self.role == "j" else flip[op]
        if rel not in _context.RELATIONS:
            usable = [f"j {r} i" for r in _context.RELATIONS]
            usable += [f"{f.__name__}({', '.join(inspect.signature(f).parameters)})"
                       for f in _context.FUNCTIONS]
            raise _fail(f"context set j {rel} i is not supported; use {', '.join(usable[:-1])} "
                        f"or {usable[-1]}")
        return _context.RELATIONS[rel]()

    def __le__(self, other):
        return self._pair(other, "<=")

    def __lt__(self, other):
        return self._pair(other, "<")

    def __ge__(self, other):
        return self._pair(other, ">=")

    def __gt__(self, other):
        return self._pair(other, ">")

    def __ne__(self, other):  # type: ignore[override]
        return self._pair(other, "!=")

    __hash__ = object.__hash__

    def __sub__(self, other):
        if isinstance(other, Token) and self.role == "i" and other.role == "j":
            g = current_file().graph
            return Tensor(g.add("offset", where=user_location()), ())
        raise _fail("only the token distance i - j is a value")


def tokens() -> tuple[Token, Token]:
    """The updated token ``i`` and the context token ``j``: ``i, j = tokens()``."""
    f = current_file()
    if f.tokens is None:
        f.tokens = (Token("i"), Token("j"))
    return f.tokens


def position(token: Token) -> Tensor:
    """The index 0, 1, ... of token ``i`` or ``j`` as a value over that token alone (a decoding
    layer's new tokens continue after the prefix), e.g. ``log(position(i) + 1)``: log n_i of
    Scalable-Softmax. A constant: nothing differentiates it."""
    if not isinstance(token, Token):
        raise _fail(f"position() takes a token, i or j (i, j = tokens()); got {token!r}")
    g = current_file().graph
    return Tensor(g.add("position", where=user_location(), token=token.role), ())


def _context_function(make: Callable[..., ContextSet]) -> Callable[..., ContextSet]:
    """``make`` (a constructor of energyc.context) as an energy file calls it: a bad argument is
    an error at the file's line."""

    @functools.wraps(make)
    def function(*args: Any) -> ContextSet:
        try:
            return make(*args)
        except (TypeError, ValueError) as error:
            raise _fail(str(error)) from None

    return function


# the context sets made by a function call: window(w), all_tokens(), same_document(); and
# prefix(), the bound of j < prefix()
globals().update({f.__name__: _context_function(f) for f in _context.FUNCTIONS})


# -- tensors ---------------------------------------------------------------------------------------


class Tensor:
    """A value of the energy: a node of the energy graph plus the user's order of its dims."""

    _op_priority = 100.0  # win over SymPy in mixed arithmetic

    def __init__(self, node: int, order: tuple[str, ...]) -> None:
        self.node = node
        self.order = order  # dims in the user's order (tokens excluded)

    @property
    def _graph(self) -> Graph:
        return current_file().graph

    @property
    def axes(self) -> tuple[str, ...]:
        return self._graph.node(self.node).axes

    def __repr__(self) -> str:
        toks = [a for a in self.axes if a in ("i", "j")]
        return f"Tensor(dims=({_pub(self.order)}), tokens=({', '.join(toks)}))"

    # arithmetic
    def __add__(self, o):
        return apply(lambda a, b: a + b, self, o)

    def __radd__(self, o):
        return apply(lambda a, b: a + b, o, self)

    def __sub__(self, o):
        return apply(lambda a, b: a - b, self, o)

    def __rsub__(self, o):
        return apply(lambda a, b: a - b, o, self)

    def __mul__(self, o):
        return apply(lambda a, b: a * b, self, o)

    def __rmul__(self, o):
        return apply(lambda a, b: a * b, o, self)

    def __truediv__(self, o):
        return apply(lambda a, b: a / b, self, o)

    def __rtruediv__(self, o):
        return apply(lambda a, b: a / b, o, self)

    def __pow__(self, o):
        return apply(lambda a, b: a**b, self, o)

    def __neg__(self):
        return apply(lambda a: -a, self)

    def __matmul__(self, other):
        """``A @ v``: contract A's last dim with the same dim of ``v``."""
        if not isinstance(other, Tensor):
            raise _fail(f"@ needs a tensor on the right, got {type(other).__name__}")
        if not self.order:
            raise _fail("@ needs a left operand with at least one dim")
        d = self.order[-1]
        if d not in other.order:
            raise _fail(
                f"shape mismatch in contraction: the left operand has dims ({_pub(self.order)})"
                f" and @ contracts its last dim {_pub([d])}, but the right operand has dims "
                f"({_pub(other.order)})"
            )
        return _contract([self, other], [d])

    def sum(self, *over: Any) -> Tensor:
        """Sum over the given dims: ``t.sum(H)``."""
        return sum_over(self, *over)


def _contract(tensors: list[Tensor], over: list[str]) -> Tensor:
    g = current_file().graph
    union = set().union(*(g.node(t.node).axes for t in tensors))
    out = [a for a in union if a not in over]
    order: list[str] = []
    for t in tensors:
        order.extend(d for d in t.order if d not in over and d not in order)
    node = _ops.contract(g, [t.node for t in tensors], out, where=user_location())
    return Tensor(node, tuple(order))


def dot(a: Tensor, b: Tensor, over: Any) -> Tensor:
    """``sum_over a * b`` over the given dim(s): per-head dot products and the like."""
    over_dims = [_dim_name(d) for d in (over if isinstance(over, (tuple, list)) else [over])]
    for name, t in (("first", a), ("second", b)):
        if not isinstance(t, Tensor):
            raise _fail(f"dot(): the {name} operand is not a tensor")
        for d in over_dims:
            if d not in t.order:
                raise _fail(
                    f"shape mismatch in contraction: dot over {_pub([d])}, but the {name} operand has dims "
                    f"({_pub(t.order)})"
                )
    return _contract([a, b], over_dims)


def _as_tensor(value: Any) -> Tensor | sympy.Expr:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (State, Memory, Token, ContextSet)):
        raise _fail(f"{value!r} is not a value here (index the state: x[i], xbar[j])")
    try:
        return sympy.sympify(value, strict=True)
    except (sympy.SympifyError, TypeError):
        raise _fail(f"cannot use {type(value).__name__} {value!r} in an energy") from None


def apply(fn: Callable[..., Any], *values: Any) -> Tensor:
    """Apply an element-wise SymPy function of scalars to tensors (broadcast by dim name)."""
    f = current_file()
    g = f.graph
    where = user_location()
    args: list[int] = []
    symbols: list[sympy.Expr] = []
    order: list[str] = []
    for v in values:
        v = _as_tensor(v)
        if isinstance(v, Tensor):
            symbols.append(_ops.ARG_SYMBOLS[len(args)])
            args.append(v.node)
            order.extend(d for d in v.order if d not in order)
        else:
            symbols.append(v)
    try:
        body = _fn.real_parts(sympy.sympify(fn(*symbols)))
    except (TypeError, ValueError, sympy.SympifyError) as exc:
        raise EnergyError(f"cannot build element-wise expression: {exc}", where) from None
    # hyperparameters become scalar inputs; dims stay as constants; anything else is undefined
    subs = {}
    for sym in sorted(body.free_symbols, key=str):
        if sym in _ops.ARG_SYMBOLS[: len(args)]:
            continue
        if isinstance(sym, HyperSymbol) and sym.name in f.hypers:
            subs[sym] = _ops.ARG_SYMBOLS[len(args)]
            args.append(g.add("hyper", where=where, name=sym.name,
                              learnable=f.hypers[sym.name].learnable))
        elif isinstance(sym, Dim) and sym.name in f.dims:
            continue
        else:
            raise EnergyError(
                f"undefined symbol {sym.name!r}: declare it with hyper({sym.name!r}, ...) or "
                "dims(...)",
                where,
            )
    body = body.xreplace(subs)
    if isinstance(body, sympy.Expr) and body.has(sympy.zoo, sympy.nan):
        raise EnergyError("the expression is undefined for every input: it divides by zero (or "
                          "takes log(0), or the like)", where)
    if isinstance(body, sympy.Expr) and body.has(sympy.I):
        raise EnergyError("the expression has a constant that is not a real number (the log or "
                          "square root of a negative number?); an energy is real", where)
    if not args:
        raise EnergyError("an element-wise expression needs at least one tensor", where)
    _check_differentiable(body, len(args), where)
    node = _ops.pointwise(g, body, args, where=where)
    if g.node(node).op == "const":
        raise EnergyError(f"expression {body} does not depend on any tensor", where)
    return Tensor(node, tuple(order))


def _check_differentiable(body: sympy.Expr, n_args: int, where: str | None) -> None:
    """Refuse a body whose first derivative SymPy leaves unevaluated, naming the functions."""
    if not isinstance(body, sympy.Expr):
        return
    for k in range(n_args):
        arg = _ops.ARG_SYMBOLS[k]
        if not _fn.diff(body, arg).has(sympy.Derivative, sympy.Subs):
            continue
        names = sorted({type(f).__name__ for f in body.atoms(sympy.Function)
                        if _fn.diff(f, arg).has(sympy.Derivative, sympy.Subs)})
        raise EnergyError(
            f"cannot differentiate {', '.join(names) or 'the expression'}: no derivative is known "
            "for it; define the function with elementwise(name, value, derivative=...)",
            where,
        )


def _unary(fn: Any, name: str) -> Callable[[Any], Any]:
    def wrapped(value: Any) -> Any:
        if isinstance(value, Tensor):
            return apply(fn, value)
        return fn(value)

    wrapped.__name__ = name
    wrapped.__doc__ = f"Element-wise {name}; on SymPy expressions it is SymPy's {name}."
    return wrapped


exp = _unary(sympy.exp, "exp")
log = _unary(sympy.log, "log")
tanh = _unary(sympy.tanh, "tanh")
erf = _unary(sympy.erf, "erf")
cos = _unary(sympy.cos, "cos")
sin = _unary(sympy.sin, "sin")
cosh = _unary(sympy.cosh, "cosh")
sigmoid = _unary(_fn.sigmoid, "sigmoid")
softplus = _unary(_fn.softplus, "softplus")
relu = _unary(_fn.relu, "relu")
sqrt = _unary(sympy.sqrt, "sqrt")  # works on tensors and on SymPy expressions


def rotary(t: Tensor, over: Any, base: float = 10000.0) -> Tensor:
    """Rotary position embedding: rotate feature pairs of ``over`` by the token's position.

    ``t`` must depend on exactly one token (i or j); the size of ``over`` must be even.
    """
    if not isinstance(t, Tensor):
        raise _fail("rotary() needs a tensor")
    d = _dim_name(over)
    if d not in t.order:
        raise _fail(f"rotary over {_pub([d])}, but the value has dims ({_pub(t.order)})")
    toks = [a for a in t.axes if a in ("i", "j")]
    if len(toks) != 1:
        raise _fail("rotary() needs a value of one token (built from x[i] or xbar[j]), got "
                    f"tokens ({', '.join(toks)})")
    g = current_file().graph
    node = g.add("rotary", (t.node,), where=user_location(), feature=d, base=float(base),
                 inverse=False)
    return Tensor(node, t.order)


def elementwise(
    name: str, value: Callable[[Any], Any], derivative: Callable[[Any], Any] | None = None
) -> Callable[[Any], Any]:
    """Define an element-wise function ``name(u) = value(u)``, with ``derivative`` if given."""
    try:
        fn = _fn.elementwise(name, value, derivative)
    except (ValueError, TypeError, sympy.SympifyError) as exc:
        raise _fail(f"elementwise({name!r}): {exc}") from None
    return _unary(fn, name)


# -- reductions ------------------------------------------------------------------------------------


def sum_over(t: Tensor, *over: Any) -> Tensor:
    """Sum over dims (``sum_over(t, H)``) or over a context set (``sum_over(s, j <= i)``)."""
    return _reduce(t, over, "sum")


def logsumexp(t: Tensor, over: Any) -> Tensor:
    """``log sum exp`` over one dim or over a context set of j (``over=j <= i``)."""
    return _reduce(t, (over,), "lse")


def _reduce(t: Tensor, over: tuple, kind: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise _fail("a reduction needs a tensor")
    g = current_file().graph
    where = user_location()
    if len(over) == 1 and isinstance(over[0], ContextSet):
        if "j" not in t.axes:
            raise _fail("a reduction over a context set needs a value that depends on j")
        read = _memory_reads(g, t.node)
        if read and not (over[0].everything or over[0] == _context.all_tokens()):
            name = current_file().memories[read[0]].public
            raise _fail(f"the memory {name} is read over all its tokens: over=all_tokens() (the "
                        f"call's memory_lengths= bound it per row), not {over[0]!r}")
        if "i" not in t.axes and not over[0].everything:
            # the context set depends on i: the summand is constant along i, the sum is not
            t = Tensor(g.add("broadcast", (t.node,), out=g.canonical(set(t.axes) | {"i"})),
                       t.order)
        node = g.add("reduce", (t.node,), where=where, kind=kind, axes=("j",), mask=over[0])
        return Tensor(node, t.order)
    if not over:
        raise _fail("say what to reduce over: a dim, or a context set such as j <= i")
    names = []
    for d in over:
        if isinstance(d, Token):
            raise _fail(f"reduce over the context token with a context set, e.g. over=j <= i "
                        f"(got {d})")
        names.append(_dim_name(d))
    for d in names:
        if d not in t.order:
            raise _fail(f"cannot reduce over {_pub([d])}: the value has dims ({_pub(t.order)})")
    if kind == "lse" and len(names) != 1:
        raise _fail("logsumexp reduces one dim at a time")
    node = g.add("reduce", (t.node,), where=where, kind=kind, axes=g.canonical(names), mask=None)
    return Tensor(node, tuple(d for d in t.order if d not in names))


def _memory_reads(g: Graph, node: int) -> list[str]:
    """The memories (code names) that value ``node`` reads."""
    found = {g.node(n).attr("memory") for n in g.ancestors([node]) if g.node(n).op == "input"}
    return sorted(m for m in found if m is not None)


def _check_memory(f: EnergyFile, energy: int, joint: bool, where: str | None) -> str | None:
    """The memory the energy reads (None: none), refusing an energy that reads two, or a memory
    and the state's context tokens (xbar[j], x[j], i - j, position(j), rotary): its reductions
    over j read one sequence."""
    g = f.graph
    ancestors = sorted(g.ancestors([energy]))
    reads = _memory_reads(g, energy)
    if not reads:
        return None
    if len(reads) > 1:
        raise EnergyError(f"the energy reads two memories ({f.public_names(reads)}); a layer "
                          f"reads one", where)
    decl = f.memories[reads[0]]
    read_at = next((g.node(n).where for n in ancestors if g.node(n).op == "input"
                    and g.node(n).attr("memory") == decl.name), None)
    if joint:
        raise EnergyError(f"a layer that reads the memory {decl.public} is not joint: its context "
                          f"is the memory, not the state", where)
    for n in ancestors:
        node = g.node(n)
        state_context = (node.op == "relabel" and g.node(node.inputs[0]).op == "input"
                         and g.node(node.inputs[0]).attr("memory") is None)
        what = ("the state at the context token (xbar[j] or x[j])" if state_context
                else "the token distance i - j" if node.op == "offset"
                else "position(j)" if node.op == "position" and node.attr("token") == "j"
                else "rotary() (a position-dependent rotation)" if node.op == "rotary"
                else None)
        if what is not None:
            raise EnergyError(
                f"the energy reads the memory {decl.public} (at {read_at}) and {what}: an energy "
                f"reads the state's context tokens or a memory's, not both", node.where or where)
    return decl.name


# -- state, params, hypers -------------------------------------------------------------------------


class State:
    """The state ``x`` (role ``x``, differentiated) or its context role ``xbar``; for a neuron
    model, a neuron layer's activation (``g``, the first layer's in role ``x``, a further layer's
    in a role of its own name) or the first layer's context role (``gbar``). ``public``: the
    name the user reads it by, for messages."""

    def __init__(self, role: str, dim: str, public: str | None = None,
                 context: str | None = None, is_context: bool = False) -> None:
        self.role = role
        self.dim = dim
        self.public = public or role
        #: why this value has no context role (None: it has one): a further neuron layer
        self.no_context = context
        #: whether this is the context role (``xbar``, ``gbar``), not the updated token's value
        self.is_context = is_context

    def __repr__(self) -> str:
        return self.public

    def __getitem__(self, token: Any) -> Tensor:
        f = current_file()
        g = f.graph
        where = user_location()
        if not isinstance(token, Token):
            raise _fail(f"index the state by a token: {self.public}[i] or {self.public}[j]")
        if self.no_context is not None and (token.role == "j" or self.is_context):
            raise _fail(self.no_context)
        node = g.add("input", where=where, name=self.role, axes=("b", "i", self.dim))
        if token.role == "j":
            if self.role == "x":
                f.joint_uses.append(where)
            node = g.add("relabel", (node,), where=where, src="i", dst="j")
        return Tensor(node, (self.dim,))

    def __mul__(self, other):
        raise _fail(f"index the state by a token before using it: {self.public}[i]")

    __rmul__ = __add__ = __radd__ = __sub__ = __rsub__ = __matmul__ = __rmatmul__ = __mul__


def state(dim: Dim) -> tuple[State, State]:
    """Declare the state's dim: ``x, xbar = state(D)``."""
    f = current_file()
    if f.neurons:
        raise _fail("a file declares its state with state(D) or neuron layers with neurons(...), "
                    "not both")
    if f.state_dim is not None:
        raise _fail("state(...) declared twice")
    f.state_dim = _dim_name(dim)
    f.state_where = user_location()
    return State("x", f.state_dim), State("xbar", f.state_dim, is_context=True)


@dataclass
class NeuronDecl:
    """A neuron layer (``neurons``): a state over ``dim`` with a Lagrangian ``L`` (a scalar per
    token, the node ``lagrangian``) whose gradient is the layer's activation g = dL/dx. The
    energies read g; the dynamics step on the state. ``input``: the name of the graph input that
    stands for the layer (its state in the Lagrangian's graph, its activation in the energy's):
    ``x`` for the first layer, the code name for the others. ``tau``: its time constant (its
    step is eta / tau)."""

    name: str  # the code name
    dim: str
    input: str
    lagrangian: int
    tau: float
    where: str | None
    public: str = ""


def neurons(name: str, dim: Dim, lagrangian: Callable[[Tensor], Tensor],
            tau: float = 1.0) -> tuple[State, State]:
    """Declare a neuron layer: ``g, gbar = neurons("g", D, layernorm())``.

    Its state x (batch, tokens, D) is what the dynamics update and what the Layer takes and
    returns; ``lagrangian`` is a function of the state at the updated token (a tensor over D)
    returning the Lagrangian L(x_i), a scalar per token (``energyc.lagrangians`` has the usual
    ones: ``identity()``, ``relu()``, ``softmax(beta)``, ``layernorm()``, ...). The energy is
    written in the activation g = dL/dx (derived by the compiler): ``g[i]``, and for the first
    layer declared ``gbar[j]`` (the context role) or ``g[j]`` (a joint energy), as ``x`` and
    ``xbar`` are for ``state(D)``. Further layers (a model of several: pixels, hidden, labels)
    are read at the updated token alone. ``tau``: the layer's time constant, its step eta / tau.
    """
    f = current_file()
    where = user_location()
    _check_name(name, "neuron layer")
    if name in f.codes:
        raise _fail(f"name {name!r} declared twice")
    if f.state_dim is not None and not f.neurons:
        raise _fail("a file declares its state with state(D) or neuron layers with neurons(...), "
                    "not both")
    d = _dim_name(dim)
    if not callable(lagrangian):
        raise _fail(f"neurons({name!r}, ...): the Lagrangian must be a function of the state "
                    f"(e.g. energyc.lagrangians.layernorm(), or lambda x: ...), got "
                    f"{type(lagrangian).__name__}")
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise _fail(f"neurons({name!r}, ...): tau must be a positive number, got {tau!r}") from None
    if not tau > 0 or tau == float("inf"):
        raise _fail(f"neurons({name!r}, ...): tau must be a positive number, got {tau!r}")
    code = f.declare(name, "neuron layer")
    first = not f.neurons
    role = "x" if first else code
    g = f.graph
    x_i = Tensor(g.add("input", where=where, name=role, axes=("b", "i", d)), (d,))
    L = lagrangian(x_i)
    if not isinstance(L, Tensor):
        raise EnergyError(f"the Lagrangian of {name} must be a tensor expression of its state, got "
                          f"{type(L).__name__}", where)
    if L.order:
        raise EnergyError(f"the Lagrangian of {name} is not a scalar per token: it still has dims "
                          f"({_pub(L.order)}); sum over them", where)
    reads = {g.node(n).attr("name") for n in g.ancestors([L.node]) if g.node(n).op == "input"}
    if "j" in L.axes or reads != {role}:
        raise EnergyError(f"the Lagrangian of {name} must be a function of its own state at the "
                          f"updated token alone (no context token, no other layer)", where)
    if "i" not in L.axes or "b" not in L.axes:
        raise EnergyError(f"the Lagrangian of {name} does not depend on its state", where)
    decl = NeuronDecl(code, d, role, L.node, tau, where, public=name)
    f.neurons.append(decl)
    if first:
        f.state_dim, f.state_where = d, where
        return State("x", d, name), State("xbar", d, name + "bar", is_context=True)
    why = (f"{name} is a further neuron layer of the model: energies read it at the updated token "
           f"alone ({name}[i]); the first layer declared ({f.neurons[0].public}) has a context "
           f"role")
    return (State(role, d, name, context=why),
            State(role, d, name + "bar", context=why, is_context=True))


@dataclass
class MemoryDecl:
    """A second sequence (``c = memory("c", Dm)``): tokens given at call time, read at the
    context token ``c[j]`` over all of them."""

    name: str  # the code name
    dim: str  # its feature dim (a code name)
    where: str | None
    public: str = ""


class Memory:
    """A second sequence of tokens, not the state, given to the layer at call time
    (``layer(x, memory=c)``): read at the context token, ``c[j]``, over all its tokens
    (``over=all_tokens()``, bounded per row by the call's ``memory_lengths=``). Its tokens are not
    updated; the layer's backward gives their gradient."""

    def __init__(self, decl: MemoryDecl) -> None:
        self.decl = decl

    def __repr__(self) -> str:
        return self.decl.public

    def __getitem__(self, token: Any) -> Tensor:
        f = current_file()
        g = f.graph
        where = user_location()
        if not isinstance(token, Token) or token.role != "j":
            raise _fail(f"a memory is read at the context token: {self.decl.public}[j] (its tokens "
                        f"are not the state's, so there is no {self.decl.public}[i])")
        # the context role's input, over the memory's tokens and dim: the step functions take
        # the memory where they take xbar, and its gradient where they give xbar's
        node = g.add("input", where=where, name="xbar", axes=("b", "i", self.decl.dim),
                     memory=self.decl.name)
        node = g.add("relabel", (node,), where=where, src="i", dst="j")
        return Tensor(node, (self.decl.dim,))

    def __mul__(self, other):
        raise _fail(f"index the memory by the context token before using it: "
                    f"{self.decl.public}[j]")

    __rmul__ = __add__ = __radd__ = __sub__ = __rsub__ = __matmul__ = __rmatmul__ = __mul__


def memory(name: str, dim: Dim) -> Memory:
    """Declare a second sequence over dim ``dim``: ``c = memory("c", Dm)`` (an encoder's output,
    stored patterns), passed to the layer at call time as ``memory=`` and read as ``c[j]`` in
    reductions over ``all_tokens()``. An energy reads either the state's context (``xbar[j]``,
    ``x[j]``) or one memory, not both."""
    f = current_file()
    _check_name(name, "memory")
    if name in f.codes:
        raise _fail(f"name {name!r} declared twice")
    d = _dim_name(dim)
    code = f.declare(name, "memory")
    decl = MemoryDecl(code, d, user_location(), public=name)
    f.memories[code] = decl
    return Memory(decl)


def param(name: str, shape: Iterable[Any], init: Init | None = None) -> Tensor:
    """Declare a learned parameter with dims ``shape`` (its storage order) and an init rule."""
    f = current_file()
    _check_name(name, "parameter")
    if name in f.codes:
        raise _fail(f"name {name!r} declared twice")
    try:
        shape = tuple(shape)
    except TypeError:
        raise _fail(f"the shape of parameter {name} must be a tuple of dims, got "
                    f"{type(shape).__name__}") from None
    names = tuple(_dim_name(d) for d in shape)
    if len(set(names)) != len(names):
        raise _fail(f"parameter {name} repeats a dim: ({_pub(names)})")
    if init is not None and not isinstance(init, Init):
        raise _fail("init= takes normal(...), uniform(...), zeros(), ones() or constant(...)")
    where = user_location()
    code = f.declare(name, "parameter")
    node = f.graph.add("param", where=where, name=code, axes=f.graph.canonical(names))
    f.params[code] = ParamDecl(code, names, init or normal(), where, node, public=name)
    return Tensor(node, names)


def hyper(name: str, default: Any = None, learnable: bool = False) -> HyperSymbol:
    """Declare a scalar hyperparameter; ``default`` may use the dims (``1 / sqrt(K)``)."""
    f = current_file()
    _check_name(name, "hyperparameter")
    if name in f.codes:
        raise _fail(f"name {name!r} declared twice")
    if default is not None:
        try:
            default = sympy.sympify(default)
        except (sympy.SympifyError, TypeError):
            raise _fail(f"default of {name} must be a number or an expression of the dims, got "
                        f"{default!r}") from None
        if not isinstance(default, sympy.Expr) or default.has(*NOT_FINITE_REAL):
            raise _fail(f"default of {name} must be a finite real number, got {default!r}")
        extra = {s for s in default.free_symbols if not isinstance(s, Dim)}
        if extra:
            raise _fail(f"default of {name} uses {sorted(map(str, extra))}, which are not dims")
    code = f.declare(name, "hyperparameter")
    sym = HyperSymbol(code)
    f.hypers[code] = HyperDecl(code, default, bool(learnable), user_location(), sym, public=name)
    return sym


def layer(
    name: str,
    energy: Tensor,
    eta: float = 1.0,
    steps: int = 1,
    precond: str = "identity",
    rank: int = 4,
    joint: bool = False,
    context: str = "current",
    doc: str = "",
    dynamics: str = "descent",
) -> LayerDecl:
    """Declare a layer: ``steps`` descent steps ``x <- x - eta * P * dE/dx`` on ``energy``.

    Args:
        name: the generated package's name (a Python identifier).
        energy: the per-token energy E_i: a tensor with no dims left and no j.
        eta: default step size. steps: default number of steps (shared weights).
        precond: default preconditioner P: "identity", "diagonal" (softplus(p), positive) or
            "dplr" (diag(softplus(p)) + L L^T, positive definite) with ``rank`` columns in L.
        joint: the state is used in the context role too (``x[j]``), and both roles contribute.
        context: "current" (the context is the current state at each step) or "input" (frozen
            at the layer input).
        dynamics: for a neuron model (``neurons``): "descent", x <- x - (eta / tau) P dE/dg (the
            Energy Transformer's), or "legendre", x <- x - (eta / tau) (x + dE/dg) (hamux's:
            the total energy adds each layer's Legendre term x . g - L(x)).

    ``energy`` may be a dict of named terms ({"attention": E_att, "hopfield": E_hop}): the energy
    is their sum, and a neuron model's trace reports each.
    """
    f = current_file()
    where = user_location()
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_"):
        raise EnergyError(f"layer name {name!r} must be a Python identifier (a package name)",
                          where)
    if keyword.iskeyword(name):
        raise EnergyError(f"layer name {name!r} is a Python keyword: the package could not be "
                          f"imported (from generated.{name} import Layer does not parse)", where)
    if unicodedata.normalize("NFKC", name) != name:
        normal = unicodedata.normalize("NFKC", name)
        raise EnergyError(f"layer name {name!r} is not in Unicode normal form (NFKC): Python "
                          f"reads it as {normal!r} in an import; write {normal!r}", where)
    if any(lay.name == name for lay in f.layers):
        raise EnergyError(f"layer {name!r} declared twice", where)
    terms: tuple[tuple[str, int], ...] = ()
    if isinstance(energy, dict):
        energy, terms = _terms(energy, where)
    if not isinstance(energy, Tensor):
        raise EnergyError(
            f"the energy must be a tensor expression, got {type(energy).__name__}", where
        )
    if f.state_dim is None:
        raise EnergyError("no state declared: add x, xbar = state(D) (or neuron layers, "
                          "g, gbar = neurons(\"g\", D, lagrangian))", where)
    if f.neurons:
        _check_neuron_model(f, energy, dynamics, precond, where)
    elif dynamics != "descent":
        raise EnergyError(f"dynamics={dynamics!r} is for neuron models (neurons(...)); this "
                          f"layer's state is x itself", where)
    elif terms:
        raise EnergyError("named energy terms are for neuron models (their energy trace reports "
                          "each); give this layer's energy as one expression", where)
    axes = f.graph.node(energy.node).axes
    leftover = [d for d in energy.order]
    if leftover:
        raise EnergyError(
            f"the energy is not a scalar per token: it still has dims ({', '.join(leftover)}); "
            f"sum over them, e.g. .sum({', '.join(leftover)})",
            where,
        )
    if "j" in axes:
        raise EnergyError(
            "the energy still depends on the context token j: reduce it over a context set, "
            "e.g. logsumexp(..., over=j <= i)",
            where,
        )
    ancestors = f.graph.ancestors([energy.node])
    uses_x = any(
        f.graph.node(n).op == "input" and f.graph.node(n).attr("name") == "x" for n in ancestors
    )
    if not uses_x and not f.neurons:
        raise EnergyError("the energy does not depend on the state x (use x[i])", where)
    joint_here = any(
        f.graph.node(n).op == "relabel"
        and f.graph.node(f.graph.node(n).inputs[0]).attr("name") == "x"
        for n in ancestors
    )
    if joint_here and not joint:
        bad = next((w for w in f.joint_uses), where)
        raise EnergyError(
            "the context index j is used with the state x (x[j]): the state is the updated "
            "token x[i]; use xbar[j] for the context, or declare the layer joint=True",
            bad,
        )
    memory_read = _check_memory(f, energy.node, joint, where)
    if not isinstance(doc, str):
        raise EnergyError(f"doc must be a string, got {type(doc).__name__}", where)
    notes = {"eta": " (the default step size)",
             "rank": " (the columns of the dplr preconditioner's low-rank part)"}
    try:
        settings.check_step_settings(eta, steps, precond, rank, context)
    except settings.SettingError as exc:
        setting = "rank" if exc.name == "precond_rank" else exc.name  # the DSL's keyword
        expected = "a finite real number" if setting == "eta" else exc.expected
        raise EnergyError(f"{setting} must be {expected}{notes.get(setting, '')}, got "
                          f"{exc.value!r}", where) from None
    decl = LayerDecl(name, energy.node, float(eta), steps, precond, int(rank), bool(joint),
                     context, doc, where, f, memory_read, tuple(f.neurons), dynamics, terms)
    f.layers.append(decl)
    return decl


DYNAMICS = ("descent", "legendre")


def _terms(energy: dict, where: str | None) -> tuple[Tensor, tuple[tuple[str, int], ...]]:
    """The sum of an energy given as named terms, and the terms (name, node) in order."""
    if not energy:
        raise EnergyError("the energy's dict of terms is empty", where)
    terms = []
    for name, term in energy.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise EnergyError(f"energy term name {name!r} must be a Python identifier", where)
        if not isinstance(term, Tensor):
            raise EnergyError(f"energy term {name!r} must be a tensor expression, got "
                              f"{type(term).__name__}", where)
        if term.order or "j" in term.axes:
            raise EnergyError(f"energy term {name!r} is not a scalar per token (dims "
                              f"({_pub(term.order)}) or the context token j left)", where)
        terms.append((name, term.node))
    total = functools.reduce(lambda a, b: a + b, [t for t in energy.values()])
    return total, tuple(terms)


def _check_neuron_model(f: EnergyFile, energy: Tensor, dynamics: str, precond: str,
                        where: str | None) -> None:
    """A neuron model's energy reads every neuron layer's activation; its dynamics is known;
    several layers step with the identity preconditioner (P acts on one state)."""
    if dynamics not in DYNAMICS:
        raise EnergyError(f"dynamics must be one of {', '.join(map(repr, DYNAMICS))}, got "
                          f"{dynamics!r}", where)
    g = f.graph
    inputs = [g.node(n) for n in g.ancestors([energy.node]) if g.node(n).op == "input"]
    memory = next((node for node in inputs if node.attr("memory") is not None), None)
    if memory is not None:
        raise EnergyError("a neuron model reads no memory (its states are its neuron layers; "
                          "a second sequence is not supported yet)", memory.where or where)
    reads = {node.attr("name") for node in inputs}
    for n in f.neurons:
        if n.input not in reads:
            raise EnergyError(f"the energy does not read the neuron layer {n.public} (use "
                              f"{n.public}[i]): it would have no dynamics of its own", where)
    if len(f.neurons) > 1 and precond != "identity":
        raise EnergyError(f"precond={precond!r} with several neuron layers: a preconditioner "
                          f"acts on one state; a model of several steps with eta / tau per "
                          f"layer", where)
