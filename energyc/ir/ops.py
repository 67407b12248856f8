"""The op table: every op's definition, shape rule, vector-Jacobian rule, description and formula.

Each op is one class; its pieces sit together as in JAX's ``lax.py``. Beside the table, one rule
per op class in each other table keyed by it: its reference evaluation in torch
(:mod:`energyc.ir.evaluate`) and its printing in each backend (:mod:`energyc.backends.rules`); a
missing rule fails at import, naming the op. Values have named axes (see
:mod:`energyc.ir.graph`). A gradient value may lack axes of the value it is the gradient of; it is
then constant (broadcast) along them. VJP rules honour that: where a rule sums over an axis that the
gradient lacks, it multiplies by that axis' size instead.

Ops:

=========  ===========================================================================
input      a runtime tensor (the state ``x``, its context role ``xbar``, an upstream grad)
param      a learned tensor with declared axes
hyper      a scalar hyperparameter (fixed or learned)
const      a scalar SymPy expression (numbers and dim sizes)
offset     the pair value ``i - j``
contract   ``einsum`` over named axes: the product of the inputs summed over dropped axes
pointwise  an element-wise SymPy body ``f(a0, a1, ...)`` with broadcasting by axis name
reduce     ``sum`` or ``logsumexp`` over axes; over ``j`` it takes a context set (a mask)
fused_reduce  ``post(reduce(pre(a...)), b...)``: a reduction with its element-wise prologue and
           epilogue (made by the ``fuse_reductions`` pass; one kernel on the Triton backend)
mask       ``where(j in C(i), u, 0)``: zero outside the context set
broadcast  expand to more axes
relabel    rename a token axis (``i`` <-> ``j``): the same tokens seen in another role
rotary     a fixed rotation by token position (rotary position embedding)
attention  softmax-weighted context sum (made by a fusion pass; with attention_lse and
           attention_grad, its saved normaliser and its backward; attention_transposed is the
           keys-major sum of a joint energy's key role)
=========  ===========================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import sympy

from energyc.ir.functions import diff, simplify_functions

if TYPE_CHECKING:
    from energyc.context import Context
    from energyc.ir.graph import Graph, Node


class ArgSymbols:
    """The argument symbols a0, a1, ... of element-wise bodies, as many as asked for: indexing
    and bounded slices create ``a<k>`` on demand; ``in`` and ``index`` recognise them."""

    def __init__(self) -> None:
        self._made: list[sympy.Symbol] = []

    def _upto(self, n: int) -> None:
        while len(self._made) < n:
            self._made.append(sympy.Symbol(f"a{len(self._made)}"))

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            if key.stop is None or key.stop < 0 or (key.start or 0) < 0:
                raise IndexError("ARG_SYMBOLS slices need a non-negative start and stop")
            self._upto(key.stop)
            return tuple(self._made[key])
        if key < 0:
            raise IndexError("ARG_SYMBOLS has no end: index it from 0")
        self._upto(key + 1)
        return self._made[key]

    def index(self, symbol: Any) -> int:
        """k for the symbol a<k>; ValueError for any other value."""
        if isinstance(symbol, sympy.Symbol):
            name = symbol.name
            if name[:1] == "a" and name[1:].isdigit() and name[1:] == str(int(name[1:])):
                k = int(name[1:])
                if self[k] == symbol:
                    return k
        raise ValueError(f"{symbol!r} is not an argument symbol")

    def __iter__(self) -> Any:
        raise TypeError("ARG_SYMBOLS has no end: slice it (ARG_SYMBOLS[:n]) to iterate")

    def __contains__(self, symbol: Any) -> bool:
        try:
            self.index(symbol)
        except ValueError:
            return False
        return True


ARG_SYMBOLS = ArgSymbols()
SIZE_SYMBOLS = {"b": sympy.Symbol("B", positive=True, integer=True),
                "i": sympy.Symbol("T", positive=True, integer=True),
                "j": sympy.Symbol("T", positive=True, integer=True)}

def describe_mask(mask: Context | None) -> str:
    """A node's context set (its ``mask``, an ``energyc.context.Context``) as text, e.g.
    ``j <= i``; "" without one."""
    return "" if mask is None else mask.described


def size_of(graph: Graph, axis: str) -> sympy.Expr:
    """The size of an axis as a SymPy symbol (dims are their own symbols)."""
    if axis in SIZE_SYMBOLS:
        return SIZE_SYMBOLS[axis]
    return sympy.Symbol(axis, positive=True, integer=True)


def formula(body: sympy.Expr, args: list[str]) -> str:
    """``body`` with each argument ``a<k>`` written as the text ``args[k]``."""
    if body == ARG_SYMBOLS[0]:
        return args[0]
    subs = {ARG_SYMBOLS[k]: sympy.Symbol(wrap(text)) for k, text in enumerate(args)}
    return sympy.sstr(body.xreplace(subs))


def wrap(text: str) -> str:
    """A formula's text as an operand: parenthesised unless a name or one call."""
    simple = text.replace("_", "").replace("{", "").replace("}", "").isalnum()
    return text if simple or (text.endswith(")") and text.count("(") == 1) else f"({text})"


# -- builders with light normalisation (used by the DSL, the VJP rules and the passes) ------------


def const(graph: Graph, value: Any, where: str | None = None) -> int:
    return graph.add("const", (), where=where, value=sympy.sympify(value))


def pointwise(graph: Graph, body: sympy.Expr, args: list[int], where: str | None = None) -> int:
    """Add ``body(args)``: constants folded in, duplicate and unused arguments dropped, the
    identities of energyc's own functions applied (``functions.simplify_functions``)."""
    body = simplify_functions(sympy.sympify(body))
    subs: dict[sympy.Symbol, Any] = {}
    kept: list[int] = []
    for k, arg in enumerate(args):
        sym = ARG_SYMBOLS[k]
        node = graph.node(arg)
        if node.op == "const":
            subs[sym] = node.attr("value")
        elif arg in kept:
            subs[sym] = ARG_SYMBOLS[kept.index(arg)]
        else:
            subs[sym] = ARG_SYMBOLS[len(kept)]
            kept.append(arg)
    body = body.xreplace(subs) if subs else body
    free = body.free_symbols
    final = [(k, arg) for k, arg in enumerate(kept) if ARG_SYMBOLS[k] in free]
    renum = {ARG_SYMBOLS[k]: ARG_SYMBOLS[n] for n, (k, _) in enumerate(final)}
    body = body.xreplace(renum)
    args = [arg for _, arg in final]
    if not args:
        return const(graph, body, where)
    if body == ARG_SYMBOLS[0] and len(args) == 1:
        return args[0]
    return graph.add("pointwise", args, where=where, body=body)


def add_all(graph: Graph, terms: list[int]) -> int:
    if len(terms) == 1:
        return terms[0]
    return pointwise(graph, sympy.Add(*ARG_SYMBOLS[: len(terms)]), terms)


def reduce(graph: Graph, u: int, axes, kind: str = "sum", mask=None, where=None) -> int:
    missing = [a for a in axes if a not in graph.node(u).axes]
    if missing:
        raise ValueError(f"reduce over {missing}, which the value lacks")
    axes = graph.canonical(axes)
    if not axes:
        return u
    return graph.add("reduce", (u,), where=where, kind=kind, axes=axes, mask=mask)


def sum_to(graph: Graph, g: int, full_axes, target_axes) -> int:
    """Sum ``g`` (constant along axes it lacks) over ``full_axes - target_axes``."""
    drop = [a for a in full_axes if a not in target_axes]
    present = [a for a in drop if a in graph.node(g).axes]
    absent = [a for a in drop if a not in graph.node(g).axes]
    out = reduce(graph, g, present)
    if absent:
        factor = sympy.Mul(*[size_of(graph, a) for a in absent])
        out = pointwise(graph, factor * ARG_SYMBOLS[0], [out])
    return out


def contract(graph: Graph, args: list[int], out_axes, where=None) -> int:
    """einsum of ``args`` to ``out_axes``; scalar constants among the args become a scale."""
    consts = [a for a in args if graph.node(a).op == "const"]
    if consts:
        rest = [a for a in args if graph.node(a).op != "const"]
        scale = sympy.Mul(*[graph.node(c).attr("value") for c in consts])
        if not rest:
            return const(graph, scale, where)
        inner = contract(graph, rest, out_axes, where)
        return pointwise(graph, scale * ARG_SYMBOLS[0], [inner], where)
    union = set().union(*(graph.node(a).axes for a in args))
    out_axes = graph.canonical(a for a in out_axes if a in union)
    if len(args) == 1:
        return reduce(graph, args[0], [a for a in graph.node(args[0]).axes if a not in out_axes])
    return graph.add("contract", args, where=where, out=out_axes)


# -- the ops --------------------------------------------------------------------------------------


class Op:
    """Base: leaves have no VJP rule."""

    name = ""

    @staticmethod
    def shape(graph: Graph, in_axes: list[tuple[str, ...]], attrs: dict) -> tuple[str, ...]:
        raise NotImplementedError

    @staticmethod
    def vjp(graph: Graph, nid: int, node: Node, g: int) -> list[tuple[int, int]]:
        return []

    @staticmethod
    def describe(node: Node) -> str:
        """The node as one line of ``energyc inspect``'s op table."""
        extra = ", ".join(f"{k}={v}" for k, v in node.attrs if k not in ("axes",))
        return f"{node.op}({extra})" if extra else node.op

    @staticmethod
    def formula(graph: Graph, node: Node, args: list[str]) -> str:
        """The node's value as a formula of its inputs' formulas ``args`` (an energy's formula
        in docstrings, ``energyc inspect``): by default, its first input's."""
        return args[0]


class Input(Op):
    """A runtime tensor: ``x`` (state, role i), ``xbar`` (context role), or an upstream grad."""

    name = "input"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return tuple(attrs["axes"])

    @staticmethod
    def describe(node):
        return f"input {node.attr('name')}"

    @staticmethod
    def formula(graph, node, args):
        return f"{node.attr('memory') or node.attr('name')}_i"  # a memory by its own name


class Param(Op):
    """A learned tensor; ``axes`` is its declared shape (canonical order)."""

    name = "param"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return tuple(attrs["axes"])

    @staticmethod
    def describe(node):
        return f"param {node.attr('name')}"

    @staticmethod
    def formula(graph, node, args):
        return node.attr("name")


class Hyper(Op):
    """A scalar hyperparameter (a runtime scalar; learned ones get a gradient)."""

    name = "hyper"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return ()

    @staticmethod
    def describe(node):
        return f"hyper {node.attr('name')}"

    @staticmethod
    def formula(graph, node, args):
        return node.attr("name")


class Const(Op):
    """A scalar SymPy expression of numbers and dim sizes."""

    name = "const"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return ()

    @staticmethod
    def describe(node):
        return f"const {node.attr('value')}"

    @staticmethod
    def formula(graph, node, args):
        return str(node.attr("value"))


class Offset(Op):
    """The pair value ``i - j`` (a float), for scores that depend on the token distance."""

    name = "offset"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return ("i", "j")

    @staticmethod
    def describe(node):
        return "offset i - j"

    @staticmethod
    def formula(graph, node, args):
        return "(i - j)"


class Position(Op):
    """The index of one token (attribute ``token``: ``i`` or ``j``) as a float: 0, 1, ... over
    that token's axis (continuing from the prefix's length where a layer decodes). A constant:
    no gradient."""

    name = "position"

    @staticmethod
    def shape(graph, in_axes, attrs):
        if attrs["token"] not in ("i", "j"):
            raise ValueError(f"position of token {attrs['token']!r}: i or j")
        return (attrs["token"],)

    @staticmethod
    def describe(node):
        return f"position {node.attr('token')}"

    @staticmethod
    def formula(graph, node, args):
        return f"position({node.attr('token')})"


class Contract(Op):
    """``out[o] = sum_{s} prod_k u_k[...]``: einsum over named axes (s = union - out).

    VJP: ``du_m = einsum(g, u_{l != m}) -> axes(u_m)``; axes of ``u_m`` found in neither ``g`` nor
    the other operands are broadcast (the forward summed them from ``u_m`` alone).
    """

    name = "contract"

    @staticmethod
    def shape(graph, in_axes, attrs):
        union = set().union(*in_axes)
        out = tuple(attrs["out"])
        if not set(out) <= union:
            raise ValueError(f"contract output {out} not within inputs {sorted(union)}")
        return graph.canonical(out)

    @staticmethod
    def vjp(graph, nid, node, g):
        grads = []
        for m, u in enumerate(node.inputs):
            others = [v for k, v in enumerate(node.inputs) if k != m]
            target = graph.node(u).axes
            grads.append((m, contract(graph, [g, *others], target)))
        return grads

    @staticmethod
    def describe(node):
        return f"contract -> ({', '.join(node.attr('out'))})"

    @staticmethod
    def formula(graph, node, args):
        summed = sorted(set().union(*(graph.node(u).axes for u in node.inputs)) - set(node.axes))
        prod = " * ".join(args)
        return f"sum_{{{', '.join(summed)}}}({prod})" if summed else f"({prod})"


class Pointwise(Op):
    """``out = body(a0, a1, ...)`` element-wise, broadcasting by axis name.

    VJP: ``du_m = sum_{axes(out) - axes(u_m)} g * d body / d a_m`` (SymPy does the derivative,
    with autograd's subgradients of Abs, sign, Heaviside, Max, Min: ``functions.diff``).
    """

    name = "pointwise"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return graph.canonical(set().union(*in_axes))

    @staticmethod
    def vjp(graph, nid, node, g):
        from energyc.errors import CompileError

        body = node.attr("body")
        grads = []
        nargs = len(node.inputs)
        gsym = ARG_SYMBOLS[nargs]
        for m, u in enumerate(node.inputs):
            d = diff(body, ARG_SYMBOLS[m])
            if d.has(sympy.Derivative) or d.has(sympy.Subs):
                bad = sorted({str(f.expr.func) for f in d.atoms(sympy.Derivative)})
                raise CompileError(
                    f"cannot differentiate {body.xreplace(_readable(node))}: SymPy has no "
                    f"derivative for {', '.join(bad) or 'a function in it'}; define it with "
                    "elementwise(name, value, derivative=...)",
                    node.where,
                )
            if d == 0:
                continue
            contrib = pointwise(graph, gsym * d, [*node.inputs, g])
            grads.append((m, sum_to(graph, contrib, node.axes, graph.node(u).axes)))
        return grads

    @staticmethod
    def describe(node):
        return f"pointwise {node.attr('body')}"

    @staticmethod
    def formula(graph, node, args):
        return formula(node.attr("body"), args)


def _readable(node: Node) -> dict:
    return {ARG_SYMBOLS[k]: sympy.Symbol(f"u{k}") for k in range(len(node.inputs))}


def _reduction_text(node: Node) -> str:
    """``sum_{over}`` or ``logsumexp_{over}`` of a reduction, over its context set or axes."""
    mask = node.attr("mask")
    over = describe_mask(mask) if mask else ", ".join(node.attr("axes"))
    return f"{'sum' if node.attr('kind') == 'sum' else 'logsumexp'}_{{{over}}}"


class Reduce(Op):
    """``sum`` or ``logsumexp`` over ``axes``; over ``j`` restricted to the context set ``mask``.

    * sum: ``du = mask(g)`` (broadcast over the reduced axes);
    * logsumexp ``l = log sum exp(u)``: ``du = mask(g * exp(u - l))`` (the softmax weights).
      An empty context set has logsumexp 0 by convention, and zero gradient.
    """

    name = "reduce"

    @staticmethod
    def shape(graph, in_axes, attrs):
        axes = attrs["axes"]
        if not set(axes) <= set(in_axes[0]):
            raise ValueError(f"reduce over {axes} of a value with axes {in_axes[0]}")
        if attrs.get("mask") is not None and axes != ("j",):
            raise ValueError("a context set applies to a reduction over j only")
        mask = attrs.get("mask")
        if mask is not None and not mask.everything and "i" not in in_axes[0]:
            raise ValueError("a reduction over a context set C(i) needs a value with axis i")
        if attrs["kind"] == "lse" and len(axes) != 1:
            raise ValueError("logsumexp reduces one axis at a time")
        return tuple(a for a in in_axes[0] if a not in axes)

    @staticmethod
    def vjp(graph, nid, node, g):
        (u,) = node.inputs
        mask = node.attr("mask")
        if node.attr("kind") == "sum":
            du = g
        else:
            du = pointwise(graph, ARG_SYMBOLS[0] * sympy.exp(ARG_SYMBOLS[1] - ARG_SYMBOLS[2]),
                           [g, u, nid])
        if mask is not None:  # every set, all tokens too: the call's lengths bound it
            du = graph.add("mask", (du,), mask=mask)
        return [(0, du)]

    @staticmethod
    def describe(node):
        ctx = describe_mask(node.attr("mask"))
        over = ", ".join(node.attr("axes"))
        return f"{node.attr('kind')} over {over}" + (f" in {{{ctx}}}" if ctx else "")

    @staticmethod
    def formula(graph, node, args):
        return f"{_reduction_text(node)}({args[0]})"


class FusedReduce(Op):
    """``out = post(reduce_{axes, mask} pre(a_0 .. a_{n-1}), b_0 .. b_{m-1})``.

    Inputs: the ``n_pre`` prologue arguments ``a`` then the epilogue arguments ``b``. ``pre`` is a
    body over ``a0 .. a{n-1}``; ``post`` a body over ``a0`` (the reduced value) then ``a1 ..`` (the
    ``b``). The ``b`` have no axis beyond the output's, so the output keeps the reduction's axes.
    Made by the ``fuse_reductions`` pass (a lowering pass, after the last differentiation) so
    that a backend computes it in one kernel; it is never differentiated.
    """

    name = "fused_reduce"

    @staticmethod
    def shape(graph, in_axes, attrs):
        n_pre = attrs["n_pre"]
        pre_axes = graph.canonical(set().union(*in_axes[:n_pre]))
        out = Reduce.shape(graph, [pre_axes], attrs)
        for axes in in_axes[n_pre:]:
            if not set(axes) <= set(out):
                raise ValueError(f"an epilogue argument with axes {axes} is wider than {out}")
        return out

    @staticmethod
    def parts(graph, node) -> tuple[list[int], list[int], tuple[str, ...]]:
        """(prologue arguments, epilogue arguments, the prologue's axes: the reduction's input)."""
        n_pre = node.attr("n_pre")
        pre_args, post_args = list(node.inputs[:n_pre]), list(node.inputs[n_pre:])
        return pre_args, post_args, graph.canonical(set().union(*[graph.node(u).axes
                                                                  for u in pre_args]))

    @staticmethod
    def vjp(graph, nid, node, g):
        from energyc.errors import CompileError

        raise CompileError("a fused reduction has no VJP rule: fuse_reductions is a lowering "
                           "pass, run after the last differentiation")

    @staticmethod
    def describe(node):
        red = Reduce.describe(node)
        return f"fused {red} of {node.attr('pre')}, then {node.attr('post')}"

    @staticmethod
    def formula(graph, node, args):
        n_pre = node.attr("n_pre")
        reduced = f"{_reduction_text(node)}({formula(node.attr('pre'), args[:n_pre])})"
        return formula(node.attr("post"), [reduced] + args[n_pre:])


class Mask(Op):
    """``out[..., i, j, ...] = u[...] if j in C(i) else 0``. VJP: ``du = sum mask(g)``."""

    name = "mask"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return graph.canonical(set(in_axes[0]) | {"i", "j"})

    @staticmethod
    def vjp(graph, nid, node, g):
        (u,) = node.inputs
        masked = graph.add("mask", (g,), mask=node.attr("mask"))
        return [(0, sum_to(graph, masked, node.axes, graph.node(u).axes))]

    @staticmethod
    def describe(node):
        return f"mask {{{describe_mask(node.attr('mask'))}}}"

    @staticmethod
    def formula(graph, node, args):
        return f"[{describe_mask(node.attr('mask'))}]*{wrap(args[0])}"


class Broadcast(Op):
    """Expand to ``out`` axes. VJP: sum over the added axes."""

    name = "broadcast"

    @staticmethod
    def shape(graph, in_axes, attrs):
        if not set(in_axes[0]) <= set(attrs["out"]):
            raise ValueError("broadcast cannot drop axes")
        return graph.canonical(attrs["out"])

    @staticmethod
    def vjp(graph, nid, node, g):
        (u,) = node.inputs
        return [(0, sum_to(graph, g, node.axes, graph.node(u).axes))]


class Relabel(Op):
    """The same tokens in another role: rename axis ``src`` to ``dst``. VJP: rename back."""

    name = "relabel"

    @staticmethod
    def shape(graph, in_axes, attrs):
        axes = in_axes[0]
        if attrs["dst"] in axes:
            raise ValueError(f"relabel to {attrs['dst']} of a value that has it")
        return graph.canonical(attrs["dst"] if a == attrs["src"] else a for a in axes)

    @staticmethod
    def vjp(graph, nid, node, g):
        if node.attr("dst") not in graph.node(g).axes:
            return [(0, g)]
        return [(0, graph.add("relabel", (g,), src=node.attr("dst"), dst=node.attr("src")))]

    @staticmethod
    def describe(node):
        return f"relabel {node.attr('src')}->{node.attr('dst')}"

    @staticmethod
    def formula(graph, node, args):
        if graph.node(node.inputs[0]).op == "input":
            return args[0].replace("_i", "_j")
        return f"{args[0]}[i->j]"


class Rotary(Op):
    """A fixed position-dependent rotation (rotary position embedding) along ``feature``.

    For the value's token axis (i or j) at position p, each pair of features (2m, 2m+1) turns by
    the angle ``p * base^(-2m/F)``: ``out[2m] = u[2m] cos - u[2m+1] sin``,
    ``out[2m+1] = u[2m] sin + u[2m+1] cos``. Rotations are orthogonal, so the VJP is the inverse
    rotation: ``du = R_p^T g``.
    """

    name = "rotary"

    @staticmethod
    def shape(graph, in_axes, attrs):
        axes = in_axes[0]
        tokens = [a for a in axes if a in ("i", "j")]
        if len(tokens) != 1 or attrs["feature"] not in axes:
            raise ValueError("rotary needs a value with one token axis and the feature axis")
        return axes

    @staticmethod
    def vjp(graph, nid, node, g):
        if graph.node(g).axes != node.axes:
            g = graph.add("broadcast", (g,), out=node.axes)
        attrs = dict(node.attrs)
        attrs["inverse"] = not attrs["inverse"]
        return [(0, graph.add("rotary", (g,), **attrs))]

    @staticmethod
    def describe(node):
        inv = "inverse " if node.attr("inverse") else ""
        return f"{inv}rotary over {node.attr('feature')} (base {node.attr('base')})"


def attention_slots(op: str, attrs: dict) -> dict[str, int]:
    """Input positions of an attention-family node, by name.

    ``q0..q{n-1}, k0..k{n-1}`` (one pair per score term, n = ``len(features)``), ``v`` (not for
    attention_lse), ``s`` (the scalar scale), ``m`` (per-head slopes, when ``bias``), then the op's
    own extras: ``lse`` for attention_transposed; ``o, lse, g`` for attention_grad.
    """
    n = len(attrs["features"])
    names = [f"q{t}" for t in range(n)] + [f"k{t}" for t in range(n)]
    if op != "attention_lse":
        names.append("v")
    names.append("s")
    if attrs["bias"]:
        names.append("m")
    names += {"attention_transposed": ["lse"], "attention_grad": ["o", "lse", "g"]}.get(op, [])
    return {name: pos for pos, name in enumerate(names)}


def attention_operands(node: Node) -> dict[str, int]:
    """The node ids of an attention-family node's inputs, by slot name (see attention_slots)."""
    slots = attention_slots(node.op, dict(node.attrs))
    return {name: node.inputs[pos] for name, pos in slots.items()}


def value_feature(v_axes: tuple[str, ...], token: str, heads: tuple[str, ...]) -> str:
    """The one feature axis of a value ``v`` (besides b, its token axis and the heads)."""
    rest = [a for a in v_axes if a not in ("b", token, *heads)]
    if len(rest) != 1 or "b" not in v_axes or token not in v_axes:
        raise ValueError(f"attention value needs axes (b, {token}, [heads], feature), has {v_axes}")
    return rest[0]


def _attention_check(graph, op, in_axes, attrs) -> dict[str, tuple[str, ...]]:
    """Check the operands' axes against ``features`` and ``heads``; return them by slot name."""
    slots = attention_slots(op, attrs)
    if len(in_axes) != len(slots):
        raise ValueError(f"{op} takes {len(slots)} inputs ({', '.join(slots)}), got {len(in_axes)}")
    ax = {name: in_axes[pos] for name, pos in slots.items()}
    heads = tuple(attrs["heads"])
    for t, feature in enumerate(attrs["features"]):
        for role, token in (("q", "i"), ("k", "j")):
            a = set(ax[f"{role}{t}"])
            if not {"b", token, feature} <= a <= {"b", token, feature, *heads}:
                raise ValueError(f"attention {role}{t} needs axes (b, {token}, [heads], {feature}), "
                                 f"has {ax[f'{role}{t}']}")
    if ax["s"] or ("m" in ax and not set(ax["m"]) <= set(heads)):
        raise ValueError("attention takes a scalar scale and per-head slopes")
    return ax


def _weighted_sum_axes(graph, op, in_axes, attrs, value_token: str) -> tuple[str, ...]:
    """Axes of a softmax-weighted sum whose value ``v`` is indexed by ``value_token``: the other
    token, the heads and v's feature."""
    ax = _attention_check(graph, op, in_axes, attrs)
    other = "i" if value_token == "j" else "j"
    if other in ax["v"]:
        raise ValueError(f"{op}'s value is indexed by token {value_token}, not {other}")
    feature = value_feature(ax["v"], value_token, attrs["heads"])
    return graph.canonical(("b", other, *attrs["heads"], feature))


class Attention(Op):
    """``o[b,i,h,G] = sum_{j in C(i)} P_ij v[b,j,h,G]``, ``P_ij = softmax_{j in C(i)} S_ij``,

        S_ij = s * sum_t q_t[b,i,h,:] . k_t[b,j,h,:]  (+ m_h * (i - j) when ``bias``)

    Inputs ``(q_0.., k_0.., v, s[, m])`` (see :func:`attention_slots`): one (q, k) pair per score
    term, contracted over its feature axis ``features[t]`` (a diagonal-plus-low-rank score is two
    terms); ``heads`` is the head axis (or none); an operand may lack the head axis (it is then
    shared by every head). s is a scalar (fixed or learned), m per-head slopes (or a scalar);
    ``mask`` is the context set. Made by the ``fuse_context_attention`` pass from the
    softmax-weighted context sum that the VJP of a log-sum-exp context reduction produces.

    VJP (``attention_grad``, one call for all): with ``dS = P * (g v^T - rowsum(g * o))``,
    ``dv = P^T g``, ``dq_t = s dS k_t``, ``dk_t = s dS^T q_t``, ``ds = sum dS * (q . k)``,
    ``dm_h = sum dS_ij (i - j)``.
    """

    name = "attention"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return _weighted_sum_axes(graph, "attention", in_axes, attrs, value_token="j")

    @staticmethod
    def vjp(graph, nid, node, g):
        if graph.node(g).axes != node.axes:
            g = graph.add("broadcast", (g,), out=node.axes)
        attrs = dict(node.attrs)
        ins = attention_operands(node)
        lse = graph.add("attention_lse", [u for name, u in ins.items() if name != "v"], **attrs)
        return _attention_grads(graph, node, node.inputs, (nid, lse, g), skip=())

    @staticmethod
    def describe(node):
        return f"attention {_describe_scores(node)}"


def _attention_grads(graph, node: Node, inputs, saved, skip) -> list[tuple[int, int]]:
    """(position in ``node``, ``attention_grad`` node) for each of ``node``'s slots but ``skip``
    and a constant scale: one backward call of the attention with ``inputs`` and saved
    ``(o, lse, g)``."""
    attrs = dict(node.attrs)
    ins = attention_operands(node)
    return [(pos, graph.add("attention_grad", (*inputs, *saved), wrt=name, **attrs))
            for name, pos in attention_slots(node.op, attrs).items()
            if name not in skip and not (name == "s" and graph.node(ins["s"]).op == "const")]


def _describe_scores(node: Node) -> str:
    over = " + ".join(f"q{t}.k{t} over {f}" for t, f in enumerate(node.attr("features")))
    bias = " + m (i - j)" if node.attr("bias") else ""
    return f"{{{describe_mask(node.attr('mask'))}}} of s ({over}){bias}"


class AttentionLse(Op):
    """``l[b,i,h] = log sum_{j in C(i)} exp(S_ij)``: the attention's saved normaliser.

    Inputs ``(q_0.., k_0.., s[, m])``: those of :class:`Attention` without v."""

    name = "attention_lse"

    @staticmethod
    def shape(graph, in_axes, attrs):
        _attention_check(graph, "attention_lse", in_axes, attrs)
        return graph.canonical(("b", "i", *attrs["heads"]))

    @staticmethod
    def describe(node):
        return f"attention logsumexp {_describe_scores(node)}"


class AttentionTransposed(Op):
    """``o[b,j,h,G] = sum_{i : j in C(i)} P_ij v[b,i,h,G]``: the keys-major (transposed) context
    sum, which the key role of a joint energy produces (``P`` as in :class:`Attention`).

    Inputs ``(q_0.., k_0.., v, s[, m], lse)`` with ``lse = attention_lse(...)`` of the same scores
    (saved, so P is recomputed without a (tokens x tokens) tensor); v is indexed by the query
    token i. VJP, with ``a = attention(q, k, g)`` (the i-major attention of the upstream g):
    ``dv = a``, and since ``dS_ij = P_ij (v_i . g_j - v_i . a_i)`` is the attention backward of
    values g, output a and upstream v, ``dq, dk, ds, dm = attention_grad(q, k, g, s, m; a, lse, v)``.
    The lse input gets no gradient: its dependence on q, k, s, m is already in dS.
    """

    name = "attention_transposed"

    @staticmethod
    def shape(graph, in_axes, attrs):
        return _weighted_sum_axes(graph, "attention_transposed", in_axes, attrs, value_token="i")

    @staticmethod
    def vjp(graph, nid, node, g):
        if graph.node(g).axes != node.axes:
            g = graph.add("broadcast", (g,), out=node.axes)
        attrs = dict(node.attrs)
        ins = attention_operands(node)
        slots = attention_slots("attention_transposed", attrs)
        base = [g if name == "v" else ins[name] for name in slots if name != "lse"]
        a = graph.add("attention", base, **attrs)
        v_axes = graph.node(ins["v"]).axes
        dv = reduce(graph, a, [x for x in graph.node(a).axes if x not in v_axes])
        return [(slots["v"], dv), *_attention_grads(graph, node, base, (a, ins["lse"], ins["v"]),
                                                     skip=("v", "lse"))]

    @staticmethod
    def describe(node):
        return f"transposed attention {_describe_scores(node)}"


class AttentionGrad(Op):
    """One of the gradients of :class:`Attention` (``wrt``: a slot name ``q0``, ``k1``, ``v``,
    ``s`` or ``m``); all of one attention share one backward call.

    Inputs: the attention's, then ``(o, lse, g)``.
    """

    name = "attention_grad"

    @staticmethod
    def shape(graph, in_axes, attrs):
        _attention_check(graph, "attention_grad", in_axes, attrs)
        return in_axes[attention_slots("attention_grad", attrs)[attrs["wrt"]]]

    @staticmethod
    def vjp(graph, nid, node, g):
        from energyc.errors import CompileError

        raise CompileError("third derivatives through a fused attention are not supported")

    @staticmethod
    def describe(node):
        return f"attention backward d{node.attr('wrt')} {_describe_scores(node)}"


OPS: dict[str, type[Op]] = {
    op.name: op
    for op in (Input, Param, Hyper, Const, Offset, Position, Contract, Pointwise, Reduce, FusedReduce, Mask,
               Broadcast,
               Relabel, Rotary, Attention, AttentionLse, AttentionTransposed, AttentionGrad)
}
