"""Pair-reduction fusion: context reductions of element-wise pair functions -> pair ops.

Runs on the energy graph, before differentiation. A reduction over the context set of j

    R_i = logsumexp_{j in C(i)} S_ij     or     R_i = sum_{j in C(i)} S_ij

becomes one ``pair_lse`` or ``pair_sum`` node (``energyc.ir.pairs``) whose derivatives, to any
order needed, are pair sums: nothing of size (tokens x tokens) is formed.

Legal when ``S`` is built by element-wise (pointwise) nodes from leaves that are

* contractions ``q_i . k_j`` of a value of token i with a value of token j over exactly one feature
  axis (the pair's u^t; a contraction over no axis is the product of a row and a column extra);
* the offset ``i - j``;
* values of at most one token (rows ``x_i``, columns ``x_j``, per-head or scalar values, fixed or
  learned), also when broadcast to the pair's axes;

with any number of head axes (the axes of S besides b, i, j), any context set. phi, the composed
element-wise body, may be any SymPy expression: its derivatives come from SymPy. A sum whose
summand depends on one token only is a running sum (O(tokens)).

The log-sum-exps that the attention kernels (CPU flash, Triton flash) take are left to
:mod:`energyc.passes.attention`, marked, on that module's one decision
(``attention.for_attention``: linear scores ``s sum_t q_t . k_t + m (i - j)`` with a scalar s,
no slopes m over several head axes, and no learned s or m where the step reads the log-sum-exp
itself; other scales free of one token are moved into the queries or keys first, and terms of
one token each become terms of the unit axis, ``attention.fold_score_scales``); the attention
pass takes what is marked, and nothing else. Anything of neither form is left as it is and
reported by :func:`unfused_reductions` (correct, with (tokens x tokens) memory).
"""

from __future__ import annotations

import sympy

from energyc.context import all_tokens
from energyc.ir.functions import sigmoid, softplus
from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS, add_all, contract, pointwise, reduce, size_of
from energyc.ir.pairs import DIST, PairForm, e, make_pair_sum, u
from energyc.passes.attention import (
    _flat,
    _sub_body,
    for_attention,
    leave_to_attention,
    left_to_attention,
)


class NotFusableError(Exception):
    """Why a reduction over j is not of the pair form (the message is shown to the user)."""


def _pair_valued(graph: Graph, n: int) -> bool:
    return {"i", "j"} <= set(graph.node(n).axes)


def pair_form(graph: Graph, red: int) -> tuple[PairForm, sympy.Expr]:
    """The pair form and body phi of reduction node ``red``; raises :class:`NotFusableError`."""
    node = graph.node(red)
    mask = node.attr("mask")  # every context set is a band the pair kernels take
    S = node.inputs[0]
    heads = tuple(a for a in graph.node(S).axes if a not in ("b", "i", "j"))
    form = PairForm([], [], [], [], heads, mask)
    leaves: dict[int, sympy.Expr] = {}

    def extra(n: int) -> sympy.Expr:
        if graph.node(n).op == "const":
            return graph.node(n).attr("value")
        if n not in form.extras:
            form.extras.append(n)
        return e(form.extras.index(n))

    def walk(n: int) -> sympy.Expr:
        if n in leaves:
            return leaves[n]
        nd = graph.node(n)
        if not _pair_valued(graph, n):
            out = extra(n)
        elif nd.op == "pointwise":
            args = {ARG_SYMBOLS[k]: walk(a) for k, a in enumerate(nd.inputs)}
            out = nd.attr("body").xreplace(args)
        elif nd.op == "offset":
            out = DIST
        elif nd.op == "broadcast":
            inner = nd.inputs[0]
            out = walk(inner) if _pair_valued(graph, inner) else extra(inner)
        elif nd.op == "contract":
            out = _term(graph, n, form, extra)
        else:
            raise NotFusableError(f"the scores use j through a {graph.describe(n)} value, which is "
                             "not a contraction of a token-i value with a token-j value")
        leaves[n] = out
        return out

    return form, walk(S)


def _term(graph: Graph, n: int, form: PairForm, extra) -> sympy.Expr:
    """``u^t`` for a contraction ``q_i . k_j`` over one feature axis; a product of a row and a
    column value when nothing is summed."""
    node = graph.node(n)
    if len(node.inputs) != 2:
        raise NotFusableError("the scores contract more than two values at once; contract the "
                         "query side first (e.g. (A @ x[i]) . (B @ xbar[j]))")
    q, k = node.inputs
    if "j" in graph.node(q).axes:
        q, k = k, q
    qa, ka = set(graph.node(q).axes), set(graph.node(k).axes)
    if "j" in qa or "i" in ka or "i" not in qa or "j" not in ka:
        raise NotFusableError("the scores contract values that each depend on both tokens")
    summed = (qa | ka) - set(node.axes)
    if not summed:
        return extra(q) * extra(k)
    if len(summed) != 1 or not summed <= qa & ka:
        raise NotFusableError(f"the scores contract over {len(summed)} axes at once "
                         f"({', '.join(sorted(summed))}); a pair term contracts one feature axis")
    (feature,) = summed
    key = (q, k, feature)
    terms = list(zip(form.q, form.k, form.features))
    if key not in terms:
        form.q.append(q)
        form.k.append(k)
        form.features.append(feature)
        terms.append(key)
    return u(terms.index(key))


def _is_reduction_over_j(graph: Graph, n: int) -> bool:
    node = graph.node(n)
    return (node.op == "reduce" and node.attr("axes") == ("j",)
            and node.attr("mask") is not None and _pair_valued(graph, node.inputs[0]))


def expand_feature_sums(graph: Graph) -> Graph:
    """Expand a sum over a feature axis of a polynomial in values of one token each (a sum over
    the axis, or a contraction over it of such values, as ``dot(q_i - k_j, q_i - k_j, over=K)``)
    into contractions, the pair form's leaves: with q of token i and k of token j,

        sum_F (q_iF - k_jF)^2  =  sum_F q_iF^2 - 2 q_i . k_j + sum_F k_jF^2

    and in general each monomial c q_i^a k_j^b is the contraction of c q_i^a with k_j^b over F (a
    value of one token where only one side carries F, times |F| where neither does). A squared
    distance (a Gaussian kernel's scores) is then ``-2 q_i . k_j`` plus a term of each token,
    which the attention kernels take (``attention.fold_score_scales``); as written, its
    (tokens x tokens x F) summand stayed materialised. The expanded form rounds to the
    magnitude of |q|^2 and |k|^2 rather than of |q - k|^2, as every kernel method does."""
    return graph.rewritten(lambda new, mapping, n: _expanded_feature_sum(graph, new, mapping, n))


def _expanded_feature_sum(graph: Graph, new: Graph, mapping: dict[int, int], n: int) -> int | None:
    """``expand_feature_sums``' sum of contractions for reduce node ``n`` in ``new``, or None."""
    found = _feature_sum(graph, n)
    if found is None:
        return None
    feature, body, leaves = found
    node = graph.node(n)
    syms = ARG_SYMBOLS[: len(leaves)]
    token = {}
    for sym, v in zip(syms, leaves):
        if _pair_valued(graph, v):
            return None
        ax = graph.node(v).axes
        token[sym] = "i" if "i" in ax else "j" if "j" in ax else None
    if not body.is_polynomial(*syms):
        return None
    terms = []
    for monomial in sympy.Add.make_args(sympy.expand(body)):
        coef, factors = monomial.as_coeff_mul()
        sides: dict[str | None, list[sympy.Expr]] = {"i": [], "j": [], None: []}
        for factor in factors:
            sides[token.get(factor.as_base_exp()[0])].append(factor)
        # factors of no token (per-feature weights) go with the query's side, or the key's
        # where the monomial has no query factor: a value of one token is summed on its own
        sides["j" if sides["j"] and not sides["i"] else "i"] += sides.pop(None)
        values = []
        for side in ("i", "j"):
            if sides[side]:
                part, args = _sub_body(sympy.Mul(*sides[side]), leaves)
                values.append(pointwise(new, part, [mapping[v] for v in args]))
        with_f = [v for v in values if feature in new.node(v).axes]
        other = [v for v in values if feature not in new.node(v).axes]
        factor = coef
        if len(with_f) == 2:
            out = (set(new.node(with_f[0]).axes) | set(new.node(with_f[1]).axes)) - {feature}
            other.append(contract(new, with_f, out, where=node.where))
        elif with_f:
            other.append(reduce(new, with_f[0], [feature], where=node.where))
        else:
            factor = coef * size_of(new, feature)
        terms.append(pointwise(new, factor * sympy.Mul(*ARG_SYMBOLS[: len(other)]), other,
                               where=node.where))
    total = add_all(new, terms)
    if new.node(total).axes != node.axes:
        total = new.add("broadcast", (total,), out=node.axes)
    return total


def log_sums_as_lse(graph: Graph) -> Graph:
    """Read a log of a context sum of exponentials as a log-sum-exp, the stable form the pair and
    attention kernels take: for g > 0 and A > 0 free of j,

        log sum_{j in C(i)} g_ij exp(h_ij)  =  L_i  =  logsumexp_{j in C(i)} (h_ij + log g_ij)
        log (A_i + sum_{j in C(i)} g_ij exp(h_ij))  =  log A_i + softplus(L_i - log A_i)

    where the sum is read only through such logs and C(i) is never empty (``Context.may_be_empty``
    false: i itself is in it, as in j <= i, a window, all tokens; empty rows, the normaliser's 0
    against log 0, never arise). Written out, exp(h) overflows float32 at h > 88 in every framework; the gate's log
    is taken stably (log sigmoid(u) = -softplus(-u)). A gate whose sign SymPy cannot tell, or a
    strict set (whose first row is empty: log 0 there), is left as written."""
    lses: dict[int, int] = {}  # sum node -> its log-sum-exp in the new graph
    live = graph.live()
    alive = set(live)
    users = {n: [v for v in graph.users(n) if v in alive] for n in live}
    return graph.rewritten(
        lambda new, mapping, n: _log_sum_user(graph, new, mapping, lses, users, n))


def _exp_sum(graph: Graph, R: int) -> tuple[sympy.Expr, tuple[int, ...]] | None:
    """(h + log g, leaves) where node ``R`` is sum_{j in C(i)} g exp(h) with g > 0 over a context
    set that is never empty; else None."""
    node = graph.node(R)
    if (node.op != "reduce" or node.attr("kind") != "sum" or node.attr("axes") != ("j",)
            or (node.attr("mask") or all_tokens()).may_be_empty
            or not _pair_valued(graph, node.inputs[0])
            or graph.node(node.inputs[0]).op != "pointwise"):
        return None
    # every pointwise node inlined: a gate's sign shows in its body
    body, leaves = _flat(graph, node.inputs[0], lambda v: True)
    h, g = sympy.Integer(0), sympy.Integer(1)
    for factor in sympy.Mul.make_args(body):
        base, power = factor.as_base_exp()  # exp(u) is (E, u)
        if base == sympy.E:
            h += power
        else:
            g *= factor
    if h == 0 or not _positive(g):
        return None
    return h + _stable_log(g), leaves


def _positive(expr: sympy.Expr) -> bool:
    """Whether SymPy can tell ``expr`` > 0 for every real value of its arguments."""
    real = {a: sympy.Dummy(real=True) for a in expr.free_symbols}
    return bool(expr.xreplace(real).is_positive)


def _stable_log(g: sympy.Expr) -> sympy.Expr:
    """log g, a sum of logs of its factors, with log sigmoid(u) = -softplus(-u)."""
    out = sympy.Integer(0)
    for factor in sympy.Mul.make_args(g):
        base, power = factor.as_base_exp()
        out += power * (-softplus(-base.args[0]) if isinstance(base, sigmoid) else sympy.log(base))
    return out


def _log_sum_user(graph: Graph, new: Graph, mapping: dict[int, int], lses: dict[int, int],
                  users: dict[int, list[int]], n: int) -> int | None:
    """Pointwise node ``n`` rebuilt in ``new`` with each context sum of exponentials among its
    inputs that it reads only through log(A + sum) replaced by its log-sum-exp; or None."""
    node = graph.node(n)
    if node.op != "pointwise" or not node.attr("body").has(sympy.log):
        return None
    body, leaves, inlined = _chain(graph, n, users)
    args = list(leaves)
    changed = False
    for k, R in enumerate(leaves):
        sym = ARG_SYMBOLS[k]
        logs = [e for e in body.atoms(sympy.log) if e.has(sym)]
        if not logs or any(v not in inlined for v in users[R]):
            continue
        A = {e: sympy.expand(e.args[0] - sym) for e in logs}
        marks = {e: sympy.Dummy() for e in logs}
        if (body.xreplace(marks).has(sym) or any(a.has(sym) for a in A.values())
                or any(a != 0 and not _positive(a) for a in A.values())):
            continue
        found = _exp_sum(graph, R)
        if found is None:
            continue
        if R not in lses:
            scores, score_args = found
            inner = pointwise(new, scores, [mapping[v] for v in score_args])
            lses[R] = new.add("reduce", (inner,), where=graph.node(R).where, kind="lse",
                              axes=("j",), mask=graph.node(R).attr("mask"))
        L = ARG_SYMBOLS[len(args)]
        args.append(R)  # its log-sum-exp, mapped below
        body = body.xreplace({e: L if A[e] == 0 else sympy.log(A[e]) + softplus(L - sympy.log(A[e]))
                              for e in logs})  # log(A + e^L) = log A + log(1 + e^(L - log A))
        changed = True
    if not changed:
        return None
    mapped = [lses[v] if pos >= len(leaves) else mapping[v] for pos, v in enumerate(args)]
    return pointwise(new, body, mapped, where=node.where)


def _chain(graph: Graph, n: int, users: dict[int, list[int]]) -> tuple[sympy.Expr, list[int],
                                                                         set[int]]:
    """Pointwise node ``n`` as one body over its leaves, with the pointwise nodes under it that
    only it reads inlined (``log(1 + s)`` is two nodes in the unfused energy); and the set of
    ``n`` and the nodes inlined."""
    inlined = {n}

    def read_here_only(v: int) -> bool:
        if len(users[v]) == 1 and users[v][0] in inlined:
            inlined.add(v)
            return True
        return False

    body, leaves = _flat(graph, n, read_here_only)
    return body, list(leaves), inlined


def _feature_sum(graph: Graph, n: int) -> tuple[str, sympy.Expr, tuple[int, ...]] | None:
    """(F, body, leaves) where node ``n`` sums a pair-valued ``body(leaves)`` over one feature
    axis F: a sum over F of a pointwise value, or a contraction over F of two values of which
    one at least is pair-valued (``dot(q_i - k_j, q_i - k_j, over=K)``); else None."""
    node = graph.node(n)
    if node.op == "reduce" and node.attr("kind") == "sum" and node.attr("mask") is None:
        axes, operands = node.attr("axes"), node.inputs
    elif node.op == "contract" and len(node.inputs) == 2:
        operands = node.inputs
        axes = tuple(set().union(*(graph.node(u).axes for u in operands)) - set(node.axes))
    else:
        return None
    if len(axes) != 1 or axes[0] in ("b", "i", "j"):
        return None
    if not any(_pair_valued(graph, v) and graph.node(v).op == "pointwise" for v in operands):
        return None
    body, leaves = sympy.Integer(1), []
    for operand in operands:
        part, args = (_flat(graph, operand) if graph.node(operand).op == "pointwise"
                      else (ARG_SYMBOLS[0], (operand,)))
        leaves += [v for v in args if v not in leaves]
        body *= part.xreplace({ARG_SYMBOLS[m]: ARG_SYMBOLS[leaves.index(v)]
                               for m, v in enumerate(args)})
    return axes[0], body, tuple(leaves)


def fuse_pair_reductions(graph: Graph) -> Graph:
    """Rewrite each context reduction of the pair form into a pair_lse or pair_sum node, except
    the log-sum-exps that the attention kernels take (:func:`energyc.passes.attention.for_attention`,
    the one decision): those stay, marked as left to the attention pass, which takes their every
    softmax-weighted sum after differentiation."""
    left = for_attention(graph)

    def rule(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        if n in left:
            return leave_to_attention(graph, new, mapping, n)
        if not _is_reduction_over_j(graph, n):
            return None
        try:
            form, phi = pair_form(graph, n)
        except NotFusableError:
            return None
        node = graph.node(n)
        mapped = PairForm([mapping[x] for x in form.q], [mapping[x] for x in form.k],
                          form.features, [mapping[x] for x in form.extras], form.heads, form.mask)
        if node.attr("kind") == "lse":
            return new.add("pair_lse", mapped.inputs(), where=node.where, body=phi,
                           **mapped.attrs())
        return make_pair_sum(new, mapped, phi, "i", None, node.where)

    return graph.rewritten(rule)


def unfused_reductions(graph: Graph) -> list[tuple[str | None, str]]:
    """(source location, reason) of each reduction over j that stays materialised."""
    found = []
    for n in graph.live():
        if not _is_reduction_over_j(graph, n) or left_to_attention(graph, n):
            continue
        try:
            pair_form(graph, n)
        except NotFusableError as exc:
            found.append((graph.node(n).where, str(exc)))
    return found
