"""Pair reductions: context reductions of element-wise functions of pair values (PAIRS.md).

A *pair form* describes per-pair values for every batch element, head and (i, j) with j in C(i):

    u^t_ij = q^t_i . k^t_j     t = 0..n-1, each a contraction over one feature axis F_t
    d_ij   = i - j
    e^m    extras: values of token i (row), of token j (column), or of neither (per head / scalar)

Node inputs are ``(q_0 .. q_{n-1}, k_0 .. k_{n-1}, e_0 .. e_{m-1}[, v])``; a body is a SymPy
expression over the symbols :func:`u`, :data:`DIST` and :func:`e`. ``heads`` are the pair values'
axes besides b, i, j (any number; an operand may lack some of them, as grouped keys do).

Ops:

============  ==================================================================================
pair_lse      ``R_i = log sum_{j in C(i)} exp(phi_ij)`` (0 for an empty context set)
pair_sum      ``o_i = sum_{j in C(i)} A_ij [v_j]`` (``token="i"``) or the keys-major
              ``o_j = sum_{i : j in C(i)} A_ij [v_i]`` (``token="j"``); without a value v the
              per-token sum of the weights A
running_sum   ``o_i = sum_{j in C(i)} v_j`` of a value of one token: a prefix sum, O(tokens)
============  ==================================================================================

The family is closed under differentiation. The gradient of ``L = sum_{pairs} Phi_ij`` for any
body Phi is, per operand (:func:`form_grads`):

    dq^t_i = sum_j dPhi/du^t k^t_j      dk^t_j = sum_i dPhi/du^t q^t_i      (pair_sum nodes)
    de     = sum over the axes e lacks of dPhi/de

* pair_lse with upstream g is ``L = sum_i g_i R_i``: ``dR_i/dphi_ij = w_ij = exp(phi_ij - R_i)``,
  so ``Phi = g_i w_ij phi`` differentiated through phi only (g and R held; the row factor g of the
  queries-major sums is applied after the sum, so nothing is divided by it);
* pair_sum with upstream G is ``L = sum_{pairs} rho_ij A_ij`` with ``rho_ij = G_i . v_j`` (a new
  contraction term; ``G_i`` itself, a new row extra, without a value). For a row extra e whose
  derivative is ``dA/de = kappa(e) A`` (a row factor, as R in the softmax weights), the sum over
  the context folds: ``de_i = kappa_i sum_j rho_ij A_ij = kappa_i G_i . o_i`` (FlashAttention's
  ``delta = do . o``): no pass over pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import sympy

from energyc.ir.functions import diff
from energyc.ir.ops import ARG_SYMBOLS, OPS, Op, describe_mask, pointwise, sum_to, wrap

if TYPE_CHECKING:
    from energyc.context import Context
    from energyc.ir.graph import Graph, Node

DIST = sympy.Symbol("pair_d")  # i - j


def u(t: int) -> sympy.Symbol:
    """The t-th contraction ``q^t_i . k^t_j`` in a pair body."""
    return sympy.Symbol(f"pair_u{t}")


def e(m: int) -> sympy.Symbol:
    """The m-th extra (a row, column or per-head value) in a pair body."""
    return sympy.Symbol(f"pair_e{m}")


def extra_token(axes: tuple[str, ...]) -> str | None:
    """Which token an extra is indexed by: ``"i"`` (row), ``"j"`` (column) or None."""
    return "i" if "i" in axes else "j" if "j" in axes else None


@dataclass
class PairForm:
    """The operands of a pair form: terms ``q[t] . k[t]`` over ``features[t]``, and extras."""

    q: list[int]
    k: list[int]
    features: list[str]
    extras: list[int]
    heads: tuple[str, ...]
    mask: Context  # the context set C(i)

    def inputs(self) -> list[int]:
        return [*self.q, *self.k, *self.extras]

    def attrs(self) -> dict:
        return dict(features=tuple(self.features), heads=tuple(self.heads), mask=self.mask)

    def with_term(self, q: int, k: int, feature: str) -> PairForm:
        return PairForm([*self.q, q], [*self.k, k], [*self.features, feature], list(self.extras),
                        self.heads, self.mask)

    def with_extra(self, x: int) -> PairForm:
        return PairForm(list(self.q), list(self.k), list(self.features), [*self.extras, x],
                        self.heads, self.mask)


def form_of(graph: Graph, node: Node) -> PairForm:
    """The pair form of a pair_lse or pair_sum node."""
    n = len(node.attr("features"))
    m = len(node.inputs) - 2 * n - (1 if node.attr("value") else 0)
    ins = list(node.inputs)
    return PairForm(ins[:n], ins[n:2 * n], list(node.attr("features")), ins[2 * n:2 * n + m],
                    tuple(node.attr("heads")), node.attr("mask"))


def pair_symbols(body: sympy.Expr) -> set[sympy.Symbol]:
    return {s for s in body.free_symbols if s.name.startswith("pair_")}


def _prune(graph: Graph, form: PairForm, body: sympy.Expr) -> tuple[PairForm, sympy.Expr]:
    """Drop the terms and extras ``body`` does not use, fold constant extras, merge duplicates;
    renumber the symbols."""
    free = body.free_symbols
    subs: dict[sympy.Symbol, sympy.Expr] = {}
    extras: list[int] = []
    for m, x in enumerate(form.extras):
        if e(m) not in free:
            continue
        xn = graph.node(x)
        if xn.op == "const":
            subs[e(m)] = xn.attr("value")
        elif x in extras:
            subs[e(m)] = e(extras.index(x))
        else:
            subs[e(m)] = e(len(extras))
            extras.append(x)
    q, k, features = [], [], []
    for t in range(len(form.q)):
        if u(t) not in free:
            continue
        key = (form.q[t], form.k[t], form.features[t])
        if key in zip(q, k, features):
            subs[u(t)] = u(list(zip(q, k, features)).index(key))
            continue
        subs[u(t)] = u(len(q))
        q.append(form.q[t])
        k.append(form.k[t])
        features.append(form.features[t])
    body = body.xreplace(subs)
    return PairForm(q, k, features, extras, form.heads, form.mask), body


def _token_axes(graph: Graph, form: PairForm, token: str, value: int | None) -> tuple[str, ...]:
    axes = {"b", token, *form.heads}
    if value is not None:
        axes |= set(_value_feature(graph.node(value).axes, token, form.heads))
    return graph.canonical(axes)


def _value_feature(axes: tuple[str, ...], token: str, heads: tuple[str, ...]) -> tuple[str]:
    other = "j" if token == "i" else "i"
    rest = [a for a in axes if a not in ("b", other, *heads)]
    if len(rest) != 1 or token in axes:
        raise ValueError(f"a pair sum's value needs axes ([b], {other}, [heads], feature), "
                         f"has {axes}")
    return (rest[0],)


def _row_col(body: sympy.Expr, form: PairForm, graph: Graph, token: str):
    """For a body with no term and no distance: (factor of this token's extras, factor of the
    other token's extras) when the body is their product, else None."""
    if pair_symbols(body) & ({u(t) for t in range(len(form.q))} | {DIST}):
        return None
    own = {e(m) for m, x in enumerate(form.extras)
           if extra_token(graph.node(x).axes) == token}
    if not own:
        return sympy.Integer(1), body
    other, mine = body.as_independent(*own, as_Add=False)
    if pair_symbols(mine) - own:
        return None
    return mine, other


def make_pair_sum(graph: Graph, form: PairForm, body: sympy.Expr, token: str,
                  value: int | None = None, where: str | None = None) -> int | None:
    """``sum over the context of body [* value]`` indexed by ``token``; None when body is 0.

    A body with no term and no distance that factors into this token's extras times the other
    token's is a running sum: ``o_i = r_i sum_{j in C(i)} c_j [v_j]``, O(tokens)."""
    body = sympy.sympify(body)
    if body == 0:
        return None
    form, body = _prune(graph, form, body)
    split = _row_col(body, form, graph, token)
    if split is not None:
        mine, other = split
        other_args = [x for m, x in enumerate(form.extras) if e(m) in other.free_symbols]
        col = pointwise(graph, other.xreplace({e(m): ARG_SYMBOLS[other_args.index(x)]
                                               for m, x in enumerate(form.extras)
                                               if x in other_args}), other_args)
        if value is not None:
            col = pointwise(graph, ARG_SYMBOLS[0] * ARG_SYMBOLS[1], [col, value])
        other_token = "j" if token == "i" else "i"
        if other_token not in graph.node(col).axes:
            col = graph.add("broadcast", (col,),
                            out=graph.canonical({*graph.node(col).axes, other_token}))
        summed = graph.add("running_sum", (col,), where=where, mask=form.mask, token=token)
        mine_args = [x for m, x in enumerate(form.extras) if e(m) in mine.free_symbols]
        renum = {e(m): ARG_SYMBOLS[1 + mine_args.index(x)] for m, x in enumerate(form.extras)
                 if x in mine_args}
        out = pointwise(graph, ARG_SYMBOLS[0] * mine.xreplace(renum), [summed, *mine_args])
        full = _token_axes(graph, form, token, value)
        if graph.node(out).axes != full:
            out = graph.add("broadcast", (out,), out=full)
        return out
    inputs = form.inputs() + ([value] if value is not None else [])
    return graph.add("pair_sum", inputs, where=where, body=body, token=token,
                     value=value is not None, **form.attrs())


def form_grads(graph: Graph, form: PairForm, dbody, wanted: dict[int, int],
               where: str | None = None, row_factor: int | None = None) -> dict[int, int]:
    """Gradients of ``L = sum_{pairs in C} Phi`` w.r.t. operands of ``form``.

    ``dbody(sym)`` is ``dPhi/dsym`` for a pair symbol; ``wanted`` maps a position (0..n-1: q^t,
    n..2n-1: k^t, 2n..: extras) to its operand node. Returns position -> gradient node, summed to
    the operand's axes; zero gradients are left out. A ``row_factor`` (of token i, for
    queries-major sums only) multiplies each sum before it is summed to the operand's axes."""
    n = len(form.q)
    out: dict[int, int] = {}
    for pos, operand in wanted.items():
        if pos < 2 * n:
            t = pos % n
            token, value = ("i", form.k[t]) if pos < n else ("j", form.q[t])
            g = make_pair_sum(graph, form, dbody(u(t)), token, value, where)
        else:
            x = form.extras[pos - 2 * n]
            g = make_pair_sum(graph, form, dbody(e(pos - 2 * n)),
                              extra_token(graph.node(x).axes) or "i", None, where)
        if g is None:
            continue
        if row_factor is not None:
            g = pointwise(graph, ARG_SYMBOLS[0] * ARG_SYMBOLS[1], [row_factor, g])
        out[pos] = sum_to(graph, g, graph.node(g).axes, graph.node(operand).axes)
    return out


def _check_form(graph: Graph, in_axes: list[tuple[str, ...]], attrs: dict, n_inputs: int) -> None:
    features, heads = attrs["features"], set(attrs["heads"])
    n = len(features)
    if n_inputs < 2 * n:
        raise ValueError(f"a pair form with {n} terms needs {2 * n} operands")
    for t, f in enumerate(features):
        for axes, token in ((in_axes[t], "i"), (in_axes[n + t], "j")):
            if not ({token, f} <= set(axes) <= {"b", token, f, *heads}):
                raise ValueError(f"pair operand {t} needs axes ([b], {token}, [heads], {f}), "
                                 f"has {axes}")
    for axes in in_axes[2 * n:n_inputs]:
        if not set(axes) <= {"b", "i", "j", *heads} or {"i", "j"} <= set(axes):
            raise ValueError(f"a pair extra has axes {axes}: of one token at most, within heads")


def describe_form(node: Node) -> str:
    terms = ", ".join(f"u{t} = q{t}.k{t} over {f}" for t, f in enumerate(node.attr("features")))
    ctx = describe_mask(node.attr("mask"))
    readable = {s: sympy.Symbol(s.name[5:]) for s in pair_symbols(node.attr("body"))}
    body = node.attr("body").xreplace(readable)
    return f"{{{ctx}}} of {body}" + (f" ({terms})" if terms else "")


def pair_formula(graph: Graph, node: Node, args: list[str]) -> str:
    """A pair op as ``logsumexp_{C}(phi)`` or ``sum_{C}(A * v)`` with its pairs written out, from
    its inputs' formulas ``args``."""
    text = dict(zip(node.inputs, args))
    form = form_of(graph, node)
    subs = {u(t): sympy.Symbol(f"({text[q]} . {text[k]})") for t, (q, k) in
            enumerate(zip(form.q, form.k))}
    subs.update({e(m): sympy.Symbol(wrap(text[x])) for m, x in enumerate(form.extras)})
    subs[DIST] = sympy.Symbol("(i - j)")
    body = sympy.sstr(node.attr("body").xreplace(subs))
    ctx = describe_mask(node.attr("mask"))
    if node.op == "pair_lse":
        return f"logsumexp_{{{ctx}}}({body})"
    value = f" * {wrap(args[-1])}" if node.attr("value") else ""
    over = "j" if node.attr("token") == "i" else "i"
    return f"sum_{{{over}: {ctx}}}({body}{value})"


class PairLse(Op):
    """``R_i = log sum_{j in C(i)} exp(phi(u_ij, i - j, e))`` (see the module docstring).

    VJP with upstream g: ``dq^t_i = g_i sum_j w_ij phi_t k^t_j``, ``dk^t_j = sum_i g_i w_ij phi_t
    q^t_i``, ``de = sum g w phi_e`` with ``w_ij = exp(phi_ij - R_i)`` (pair_sum nodes)."""

    name = "pair_lse"

    @staticmethod
    def shape(graph, in_axes, attrs):
        _check_form(graph, in_axes, attrs, len(in_axes))
        return graph.canonical({"b", "i", *attrs["heads"]})

    @staticmethod
    def vjp(graph, nid, node, g):
        form = form_of(graph, node)
        phi = node.attr("body")
        n, m = len(form.q), len(form.extras)
        weights = sympy.exp(phi - e(m))  # softmax weights, from R = this node (extra m)
        rows = form.with_extra(nid)
        # queries-major sums (q, row and per-head extras): the row factor g applied after the sum
        wanted = {t: form.q[t] for t in range(n)}
        wanted.update({2 * n + k: x for k, x in enumerate(form.extras)
                       if extra_token(graph.node(x).axes) != "j"})
        grads = list(form_grads(graph, rows, lambda s: weights * diff(phi, s), wanted,
                                node.where, row_factor=g).items())
        # keys-major sums (k, column extras): g (extra m + 1) inside the sum over i
        cols = rows.with_extra(g)
        wanted = {n + t: form.k[t] for t in range(n)}
        wanted.update({2 * n + k: x for k, x in enumerate(form.extras)
                       if extra_token(graph.node(x).axes) == "j"})
        grads += form_grads(graph, cols, lambda s: e(m + 1) * weights * diff(phi, s),
                            wanted, node.where).items()
        return grads

    @staticmethod
    def describe(node):
        return f"pair logsumexp {describe_form(node)}"

    formula = staticmethod(pair_formula)


class PairSum(Op):
    """``o = sum over the context of A(u, i - j, e) [* v]``, queries- or keys-major (``token``).

    VJP with upstream G: the gradient of ``sum_{pairs} rho A`` with ``rho_ij = G . v`` (or G alone
    without a value); a row extra with ``dA/de = kappa A`` (kappa constant) gets ``kappa G . o``."""

    name = "pair_sum"

    @staticmethod
    def shape(graph, in_axes, attrs):
        has_value = attrs["value"]
        _check_form(graph, in_axes, attrs, len(in_axes) - (1 if has_value else 0))
        axes = {"b", attrs["token"], *attrs["heads"]}
        if has_value:
            axes |= set(_value_feature(in_axes[-1], attrs["token"], attrs["heads"]))
        return graph.canonical(axes)

    @staticmethod
    def vjp(graph, nid, node, g):
        if node.attr("value") and graph.node(g).axes != node.axes:
            g = graph.add("broadcast", (g,), out=node.axes)  # G is a contraction operand
        form = form_of(graph, node)
        token, A = node.attr("token"), node.attr("body")
        n, m = len(form.q), len(form.extras)
        # the extended form: rho = G . v as a new term n (or G as a new extra m)
        if node.attr("value"):
            v = node.inputs[-1]
            (feature,) = _value_feature(graph.node(v).axes, token, form.heads)
            ext = form.with_term(g, v, feature) if token == "i" else form.with_term(v, g, feature)
            rho, n2 = u(n), n + 1
        else:
            ext, rho, n2 = form.with_extra(g), e(m), n
        node_pos = {t: t for t in range(n)}  # extended position -> position in node
        node_pos.update({n2 + t: n + t for t in range(n)})
        node_pos.update({2 * n2 + k: 2 * n + k for k in range(m)})
        if node.attr("value"):
            node_pos[n2 + n if token == "i" else n] = len(node.inputs) - 1
        grads: list[tuple[int, int]] = []
        wanted: dict[int, int] = {}
        for pos, at in node_pos.items():
            x = node.inputs[at]
            if 2 * n <= at < 2 * n + m and extra_token(graph.node(x).axes) == token:
                kappa = sympy.simplify(diff(A, e(at - 2 * n)) / A)
                if kappa != 0 and not kappa.free_symbols & pair_symbols(A):
                    # dA/de = kappa A: de_i = kappa sum_j rho_ij A_ij = kappa G_i . o_i
                    grads.append((at, _row_dot(graph, g, nid, kappa, x)))
                    continue
            wanted[pos] = x
        for pos, grad in form_grads(graph, ext, lambda s: diff(rho * A, s), wanted,
                                    node.where).items():
            grads.append((node_pos[pos], grad))
        return grads

    @staticmethod
    def describe(node):
        major = "queries" if node.attr("token") == "i" else "keys"
        value = " times v" if node.attr("value") else ""
        return f"pair sum ({major}-major){value} {describe_form(node)}"

    formula = staticmethod(pair_formula)


def _row_dot(graph: Graph, g: int, nid: int, kappa, x: int) -> int:
    """``kappa * sum_features(G * o)`` summed to the axes of row extra ``x``."""
    prod = pointwise(graph, kappa * ARG_SYMBOLS[0] * ARG_SYMBOLS[1], [g, nid])
    return sum_to(graph, prod, graph.node(prod).axes, graph.node(x).axes)


class RunningSum(Op):
    """``o_i = sum_{j in C(i)} v_j`` (``token="i"``; v indexed by j) or the keys-major
    ``o_j = sum_{i : j in C(i)} v_i`` (``token="j"``): a prefix sum over tokens, O(tokens).

    VJP: the running sum the other way: ``dv_j = sum_{i : j in C(i)} g_i``."""

    name = "running_sum"

    @staticmethod
    def shape(graph, in_axes, attrs):
        token = attrs["token"]
        other = "j" if token == "i" else "i"
        axes = set(in_axes[0])
        if token in axes or other not in axes:
            raise ValueError(f"a running sum over {other} needs a value of token {other} alone")
        return graph.canonical((axes - {other}) | {token})

    @staticmethod
    def vjp(graph, nid, node, g):
        if graph.node(g).axes != node.axes:
            g = graph.add("broadcast", (g,), out=node.axes)
        other = "j" if node.attr("token") == "i" else "i"
        return [(0, graph.add("running_sum", (g,), mask=node.attr("mask"), token=other))]

    @staticmethod
    def describe(node):
        major = "queries" if node.attr("token") == "i" else "keys"
        return f"running sum ({major}-major) over {{{describe_mask(node.attr('mask'))}}}"

    @staticmethod
    def formula(graph, node, args):
        return f"sum_{{{describe_mask(node.attr('mask'))}}}({args[0]})"


OPS.update({op.name: op for op in (PairLse, PairSum, RunningSum)})
