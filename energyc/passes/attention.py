"""Context-reduction fusion: softmax-weighted context sums -> attention nodes.

Differentiating a log-sum-exp context reduction ``L_i = log sum_{j in C(i)} exp(S_ij)`` gives the
weights ``P_ij = c_i exp(S_ij - L_i)`` on ``C(i)``. When the gradient contracts them with a
per-token value, the result is attention, in one of two directions:

    sum_j [j in C(i)] c_i exp(S_ij - L_i) V_j  =  c_i * attention(Q, K, V)_i              (query role)
    sum_i [j in C(i)] c_i exp(S_ij - L_i) V_i  =  attention_transposed(Q, K, c * V, L)_j  (key role)

(per head; a sum that also runs over the head axis, where the value's partner lacks it, is the
attention's output summed over heads)

with scores ``S_ij = s * sum_t Q_t,i . K_t,j + m * (i - j)``. This pass rewrites each such region
into one attention node (whose VJP is the attention backward), so the backends call fused kernels
that never hold the (tokens x tokens) weights; the key role, which a joint energy has, gets the
saved normaliser ``L`` from an ``attention_lse`` node.

Legal when: ``S`` is a pointwise body linear in its pair-valued arguments, each of which is a
contraction of a query-side value (token i) with a key-side value (token j) over one feature axis,
or the offset ``i - j``; the contractions share one scalar coefficient ``s`` (constants and scalar
values, fixed or learned), and the offset's coefficient ``m`` has at most the head axis; ``L``
reduces ``S`` over the same context set (any: each is a band the kernels take);
``c`` does not depend on j (it may depend on ``L``: a function of the log-sum-exp, f(L), has
the weights f'(L_i) P_ij); the scores have any number of head axes (several: grouped heads, which
the kernels see flattened into one; then without slopes), which any operand may lack;
``V`` has one feature axis. Otherwise the graph is left as it is (the materialised form is correct,
only slower).

Scales that are not one scalar (a learned temperature per head, a scale per query or key token, a
coefficient per term) are moved into the queries or keys on the energy first
(:func:`fold_score_scales`), so such scores reach this pass with scale 1.

Each log-sum-exp is decided once, on the energy before differentiation, by
:func:`for_attention` (the scores' legality above, :func:`attention_scores`, and what the step's
VJP will ask of ``L``): the pair pass (:func:`energyc.passes.pairs.fuse_pair_reductions`) leaves
those log-sum-exps as they are, marked (:func:`left_to_attention`), and turns the others into
pair ops. This pass (and :func:`fuse_context_lse`) takes the regions of marked log-sum-exps only,
reading their scores with :func:`attention_scores`, and re-decides nothing: a weight of a marked
log-sum-exp still live after the pass is a compile error naming its line (an error of the
compiler's, :func:`_check_taken`), never a step with (tokens x tokens) values or a second build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import sympy

from energyc.context import Context, all_tokens
from energyc.errors import CompileError
from energyc.ir.graph import UNIT, Graph
from energyc.ir.ops import ARG_SYMBOLS, add_all, const, contract, pointwise, reduce


@dataclass
class Scores:
    """``S = coef(scalars) * sum_t q_t . k_t + slope(per-head values) * (i - j)``."""

    q: list[int]
    k: list[int]
    features: list[str]
    scale: tuple[sympy.Expr, list[int]]  # body over ARG_SYMBOLS and its arguments
    slope: tuple[sympy.Expr, list[int]] | None


def _term(graph: Graph, n: int, heads: tuple[str, ...]):
    """(q, k, feature) when contract node ``n`` is ``q_i . k_j`` over one feature axis."""
    node = graph.node(n)
    if node.op != "contract" or len(node.inputs) != 2:
        return None
    q, k = node.inputs
    if "j" in graph.node(q).axes:
        q, k = k, q
    qa, ka = set(graph.node(q).axes), set(graph.node(k).axes)
    features = (qa & ka) - {"b", *heads}
    if len(features) != 1:
        return None
    (feature,) = features
    if not ({"b", "i", feature} <= qa <= {"b", "i", feature, *heads} and
            {"b", "j", feature} <= ka <= {"b", "j", feature, *heads}):
        return None
    return q, k, feature


def _sub_body(expr: sympy.Expr, inputs: tuple[int, ...]) -> tuple[sympy.Expr, list[int]]:
    """``expr`` over a subset of ``inputs``, renumbered to its own arguments."""
    used = sorted(ARG_SYMBOLS.index(a) for a in expr.free_symbols if a in ARG_SYMBOLS)
    renum = {ARG_SYMBOLS[k]: ARG_SYMBOLS[m] for m, k in enumerate(used)}
    return expr.xreplace(renum), [inputs[k] for k in used]


def _scores(graph: Graph, S: int, heads: tuple[str, ...]) -> Scores | None:
    """Split the scores ``S`` into their parts (see :class:`Scores`), or None."""
    node = graph.node(S)
    if node.op == "contract":
        body, inputs = ARG_SYMBOLS[0], (S,)
    elif node.op == "pointwise":
        # flattened: scores shared by two reductions stay a node of their own under a second
        # reduction's own terms (s and s - m (i - j))
        body, inputs = _flat(graph, S)
    else:
        return None
    found = _linear_terms(graph, body, inputs, heads)
    if found is None:
        return None
    terms, coefs, offset, slope, rest = found
    if rest != 0 or any(sympy.simplify(c - coefs[0]) != 0 for c in coefs[1:]):
        return None
    scale = _sub_body(coefs[0], inputs)
    if any(graph.node(u).axes for u in scale[1]):
        return None  # a per-head scale: not a scalar
    slopes = _sub_body(slope, inputs) if offset is not None else None
    if slopes is not None and any(not set(graph.node(u).axes) <= set(heads) for u in slopes[1]):
        return None
    return Scores(q=[t[1][0] for t in terms], k=[t[1][1] for t in terms],
                  features=[t[1][2] for t in terms], scale=scale, slope=slopes)


def _match(graph: Graph, n: int):
    """Return the pieces of an attention region ending at contract node ``n``, or None."""
    node = graph.node(n)
    if node.op != "contract" or len(node.inputs) != 2:
        return None
    for a_pos in (0, 1):
        A, V = node.inputs[a_pos], node.inputs[1 - a_pos]
        an, vn = graph.node(A), graph.node(V)
        if an.op == "mask":
            mask, P = an.attr("mask"), an.inputs[0]
        elif an.op == "pointwise":
            mask, P = all_tokens(), A
        else:
            continue
        pn = graph.node(P)
        if pn.op != "pointwise" or "i" not in pn.axes or "j" not in pn.axes:
            continue
        heads = tuple(a for a in pn.axes if a not in ("b", "i", "j"))
        va = set(vn.axes)
        if ("i" in va) == ("j" in va):
            continue
        token, out_token = ("j", "i") if "j" in va else ("i", "j")
        features = va - {"b", token, *heads}
        if len(features) != 1 or "b" not in va:
            continue
        # the weights' head axes kept in the output, or summed with the context tokens (a value
        # without one, e.g. a key x_j shared by the heads, takes sum_h sum_i P_ijh q_ih)
        summed = tuple(h for h in heads if h not in node.axes)
        kept = tuple(h for h in heads if h in node.axes)
        if node.axes != graph.canonical({"b", out_token, *kept, *features}):
            continue
        # find L = lse_j S (same mask) and S among P's args
        for l_pos, L in enumerate(pn.inputs):
            ln = graph.node(L)
            if not left_to_attention(graph, L) or ln.attr("mask") != mask:
                continue
            S = ln.inputs[0]
            if S not in pn.inputs:
                continue
            s_pos = pn.inputs.index(S)
            body = pn.attr("body")
            aS, aL = ARG_SYMBOLS[s_pos], ARG_SYMBOLS[l_pos]
            ratio = sympy.simplify(body * sympy.exp(aL - aS))
            if ratio.has(aS):
                continue
            # c_i may be a function of L itself (the derivative of f(L) is f'(L) P_ij): L is a
            # value of token i, an argument of c like any other
            others = [k for k in range(len(pn.inputs))
                      if k != s_pos and (k != l_pos or ratio.has(aL))]
            if any("j" in graph.node(pn.inputs[k]).axes for k in others):
                continue
            decided = attention_scores(graph, L)
            if decided is None or (len(heads) > 1 and decided[0].slope is not None):
                continue
            return dict(scores=decided[0], V=V, mask=mask, heads=heads, P=P, ratio=ratio,
                        others=others, transposed=token == "i", summed=summed)
    return None


def split_context_sums(graph: Graph) -> Graph:
    """Split each contraction of a sum of weights of different reductions (different context sets,
    or log-sum-exps of different scores) into one contraction per reduction, so that
    :func:`fuse_context_attention` finds each one's softmax weights on their own:

        sum_j (mask_A(f_A) + mask_B(f_B))_ij V_j  =  sum_j mask_A(f_A)_ij V_j + sum_j mask_B(f_B)_ij V_j

    Two log-sum-exps over one score tensor on different context sets (a window and j <= i), or
    of scores that share a term, give such sums: the gradient of the shared scores adds both
    reductions' weights before the product with the key. Each part's pointwise body is composed
    with the bodies of its masked values (the weights exp(S - L) among them), the mask
    outermost: ``mask_A(f_A(u))`` for ``f_A(mask_A(u))``, exact since every term of ``f_A``
    vanishes where its masked values do."""
    return graph.rewritten(lambda new, mapping, n: _split_context_sum(graph, new, mapping, n))


def _split_context_sum(graph: Graph, new: Graph, mapping: dict[int, int], n: int) -> int | None:
    """``split_context_sums``' parts of contract node ``n`` built in ``new``, or None."""
    node = graph.node(n)
    if node.op != "contract" or len(node.inputs) != 2:
        return None
    for k, a in enumerate(node.inputs):
        an = graph.node(a)
        if an.op != "pointwise":
            continue
        body, leaves = _flat(graph, a)  # a sum of the weights may sit under a product
        keys = {ARG_SYMBOLS[m]: _weights_of(graph, u) for m, u in enumerate(leaves)
                if graph.node(u).op == "mask"}
        if len(set(keys.values())) < 2:
            continue
        groups: dict[tuple, list[sympy.Expr]] = {}
        for term in sympy.Add.make_args(sympy.expand_mul(body)):
            found = {keys[s] for s in term.free_symbols if s in keys}
            if len(found) != 1 or term.xreplace({s: 0 for s in keys}) != 0:
                return None  # a term of no reduction's weights, of two, or not zero outside
            groups.setdefault(found.pop(), []).append(term)
        other = mapping[node.inputs[1 - k]]
        parts = []
        for (mask, _), terms in groups.items():
            body, args = _unmasked(graph, sympy.Add(*terms), leaves)
            inner = pointwise(new, body, [mapping[u] for u in args], where=an.where)
            masked = new.add("mask", (inner,), mask=mask)
            operands = [masked, other] if k == 0 else [other, masked]
            parts.append(contract(new, operands, node.axes, where=node.where))
        return add_all(new, parts)
    return None


def _weights_of(graph: Graph, m: int) -> tuple[tuple, frozenset[int]]:
    """Which weights mask node ``m`` holds: its context set and the log-sum-exps its value
    reads (the value itself where it reads none)."""
    inner = graph.node(m).inputs[0]
    node = graph.node(inner)
    lses = frozenset(u for u in node.inputs if graph.node(u).op == "reduce"
                     and graph.node(u).attr("kind") == "lse") if node.op == "pointwise" else None
    return graph.node(m).attr("mask"), lses or frozenset({inner})


def _unmasked(graph: Graph, body: sympy.Expr,
              inputs: tuple[int, ...]) -> tuple[sympy.Expr, list[int]]:
    """``body(inputs)`` with each masked input replaced by the value under its mask (a pointwise
    value's body inlined), over the arguments returned."""
    args: list[int] = []

    def arg(v: int) -> sympy.Symbol:
        if v not in args:
            args.append(v)
        return ARG_SYMBOLS[args.index(v)]

    subs = {}
    for m, u in enumerate(inputs):
        un = graph.node(u)
        inner = un.inputs[0] if un.op == "mask" else None
        if inner is not None and graph.node(inner).op == "pointwise":
            inn = graph.node(inner)
            subs[ARG_SYMBOLS[m]] = inn.attr("body").xreplace(
                {ARG_SYMBOLS[q]: arg(w) for q, w in enumerate(inn.inputs)})
        else:
            subs[ARG_SYMBOLS[m]] = arg(inner if inner is not None else u)
    return body.xreplace(subs), args


def _lse_over_j(graph: Graph, n: int) -> tuple[int, tuple, tuple[str, ...]] | None:
    """(scores S, mask, heads) where node ``n`` is a log-sum-exp over j, on any context set, of
    pair-valued scores; else None."""
    node = graph.node(n)
    if node.op != "reduce" or node.attr("kind") != "lse" or node.attr("axes") != ("j",):
        return None
    mask = node.attr("mask") or all_tokens()
    S = node.inputs[0]
    if not {"i", "j"} <= set(graph.node(S).axes):
        return None
    return S, mask, tuple(a for a in graph.node(S).axes if a not in ("b", "i", "j"))


def attention_scores(graph: Graph, n: int) -> tuple[Scores, Context, tuple[str, ...]] | None:
    """(scores, mask, heads) where node ``n`` is a log-sum-exp over a context set of j of scores
    the attention kernels take; else None. The one legality decision of the attention kernels:
    the pair pass leaves ``n`` to this pass where it holds on the energy (:func:`for_attention`),
    and this pass reads the scores of a marked log-sum-exp with it after differentiation.

    Taken: ``S = s sum_t q_t,i . k_t,j + m (i - j)`` (a pointwise body of contractions over one
    feature axis each and the offset, or one contraction) with one coefficient ``s`` of scalars
    (constants, scalar values fixed or learned), slopes ``m`` of values over the head axes, no
    slopes over several head axes, on any context set (each is a band the kernels take)."""
    found = _lse_over_j(graph, n)
    if found is None:
        return None
    S, mask, heads = found
    scores = _scores(graph, S, heads)
    if scores is None or (len(heads) > 1 and scores.slope is not None):
        return None
    return scores, mask, heads


#: The attribute of a ``reduce`` log-sum-exp that the pair pass left to this pass.
_LEFT = "attention"


def for_attention(graph: Graph) -> set[int]:
    """The log-sum-exps over j of energy ``graph`` that the attention kernels take, decided once,
    before differentiation (the pair pass leaves them to this pass, marked): those whose scores
    :func:`attention_scores` takes, except where the scale or the slopes have a learned leaf
    (a learned parameter or hyperparameter) and the step reads ``L`` itself (the derivative of
    the outputs in ``L`` depends on the tokens: ``f(L)``, a gate of token i times ``L``). The
    step's VJP then has ``L``'s own derivatives in the scale and the slopes,

        dL_i/ds = sum_{j in C(i)} P_ij sum_t q_t,i . k_t,j      dL_i/dm = sum_{j in C(i)} P_ij (i - j)

    which no attention call computes (the attention backward's weight gradients
    ``P_ij (dO_i . v_j - delta_i)`` sum to zero over j; these to one): the pair kernels serve
    such a log-sum-exp. Every other weight of a marked ``L`` after differentiation is a
    softmax-weighted sum of a value of one token (``sum_j P_ij k_j`` and the key role's
    ``sum_i P_ij c_i q_i``, from the contractions of the scores), which
    :func:`fuse_context_attention` takes."""
    found = {n: lse_of[0] for n in graph.live() if (lse_of := attention_scores(graph, n))}
    learned = [n for n, scores in found.items() if _learned(graph, scores)]
    return set(found) - _read_by_step(graph, learned)


def _learned(graph: Graph, scores: Scores) -> bool:
    """Whether the scale or the slopes of ``scores`` have a learned leaf."""
    args = scores.scale[1] + (scores.slope[1] if scores.slope is not None else [])
    return any(graph.node(a).op == "param" or (graph.node(a).op == "hyper"
                                               and graph.node(a).attr("learnable"))
               for a in graph.ancestors(args))


def _read_by_step(graph: Graph, lses: list[int]) -> set[int]:
    """Those of ``lses`` in which the derivative of ``graph``'s outputs depends on the tokens
    (reads an input): the first derivative in the state, the step, then reads them (on a copy
    of ``graph``)."""
    if not lses:
        return set()
    from energyc.autodiff import vjp

    copy = Graph(graph.dims)
    mapping = graph.copy_into(copy)
    wrt = [mapping[L] for L in lses]
    read = set()
    for out in graph.outputs.values():
        grads = vjp(copy, mapping[out], const(copy, 1), wrt)
        read |= {L for L, w in zip(lses, wrt) if grads[w] is not None and any(
            copy.node(a).op == "input" for a in copy.ancestors([grads[w]]))}
    return read


def leave_to_attention(graph: Graph, new: Graph, mapping: dict[int, int], n: int) -> int:
    """Log-sum-exp node ``n`` copied into ``new`` marked as left to this pass (the pair pass's
    rule for the log-sum-exps of :func:`for_attention`)."""
    node = graph.node(n)
    return new.add(node.op, [mapping[u] for u in node.inputs], where=node.where,
                   **{**dict(node.attrs), _LEFT: True})


def left_to_attention(graph: Graph, n: int) -> bool:
    """Whether node ``n`` is a log-sum-exp that the pair pass left to this pass."""
    node = graph.node(n)
    return node.op == "reduce" and node.attr(_LEFT, False)


def _check_taken(graph: Graph) -> None:
    """Raise where a live value over both tokens reads a marked log-sum-exp: its weights, which
    :func:`fuse_context_attention` was to take (every energy the tests compile passes; a
    failure is the compiler's, which the message says)."""
    for n in graph.live():
        node = graph.node(n)
        if not {"i", "j"} <= set(node.axes):
            continue
        for L in node.inputs:
            if left_to_attention(graph, L):
                where = graph.node(L).where
                raise CompileError(
                    "internal error: the softmax weights of this log-sum-exp, which the pair "
                    "pass left to the attention kernels, did not fuse into attention after "
                    f"differentiation ({graph.describe(n)}); please report it with the "
                    "energy file", where)


def _scores_inputs(new: Graph, mapping: dict[int, int], scores: Scores, mask: Context,
                   heads: tuple[str, ...]) -> tuple[list[int], list[int], dict]:
    """The attention ops' operands (q.., k..), scalars (scale[, slopes]) and attributes."""
    attrs = dict(mask=mask, features=tuple(scores.features), heads=heads,
                 bias=scores.slope is not None)
    operands = [mapping[u] for u in scores.q + scores.k]
    scalars = [pointwise(new, scores.scale[0], [mapping[u] for u in scores.scale[1]])]
    if scores.slope is not None:
        scalars.append(pointwise(new, scores.slope[0], [mapping[u] for u in scores.slope[1]]))
    return operands, scalars, attrs


def fuse_context_lse(graph: Graph) -> Graph:
    """Rewrite each log-sum-exp ``L`` of scores the attention kernels take that is still used as
    a value (by a gate that multiplies it, whose derivative is the gate's derivative times L)
    into ``attention_lse``, which the attention call over the same scores returns anyway; the
    materialised form held (tokens x tokens) scores for it.

    On the step graph after the last differentiation only (stage "step"): ``attention_lse`` has
    no VJP, while the VJP of the reduction is the softmax weights, which
    :func:`fuse_context_attention` makes attention of; and the energy's own function stays one
    autograd can differentiate (``Layer.energy``)."""

    def rule(new: Graph, mapping: dict[int, int], n: int) -> int | None:
        lse_of = attention_scores(graph, n) if left_to_attention(graph, n) else None
        if lse_of is None:
            return None
        operands, scalars, attrs = _scores_inputs(new, mapping, *lse_of)
        return new.add("attention_lse", (*operands, *scalars), where=graph.node(n).where, **attrs)

    return graph.rewritten(rule)


def fuse_context_attention(graph: Graph) -> Graph:
    """Rewrite each softmax-weighted context sum into ``c * attention(Q, K, V)`` (query role) or
    ``attention_transposed(Q, K, c * V, L)`` (key role), for each log-sum-exp ``L`` left to
    this pass; raises :class:`CompileError` where a weight of such an ``L`` is left."""
    out = graph.rewritten(lambda new, mapping, n: _attention_region(graph, new, mapping, n))
    _check_taken(out)
    return out


def _attention_region(graph: Graph, new: Graph, mapping: dict[int, int], n: int) -> int | None:
    """``fuse_context_attention``'s attention node for contract node ``n`` in ``new``, or
    None where ``n`` ends no attention region."""
    found = _match(graph, n)
    if found is None:
        return None
    where = graph.node(n).where
    operands, scalars, attrs = _scores_inputs(new, mapping, found["scores"], found["mask"],
                                              found["heads"])
    pn = graph.node(found["P"])
    others = found["others"]
    renum = {ARG_SYMBOLS[k]: ARG_SYMBOLS[m] for m, k in enumerate(others)}
    ratio = found["ratio"].xreplace(renum)
    c_args = [mapping[pn.inputs[k]] for k in others]
    if found["transposed"]:
        lse = new.add("attention_lse", (*operands, *scalars), where=where, **attrs)
        v = pointwise(new, ratio * ARG_SYMBOLS[len(others)], c_args + [mapping[found["V"]]],
                      where=where)
        out = new.add("attention_transposed", (*operands, v, *scalars, lse), where=where,
                      **attrs)
    else:
        attention = new.add("attention", (*operands, mapping[found["V"]], *scalars),
                            where=where, **attrs)
        out = pointwise(new, ratio * ARG_SYMBOLS[len(others)], c_args + [attention],
                        where=where)
    return reduce(new, out, found["summed"], where=where)


# -- scales of the scores folded into the query --------------------------------------------------


def _linear_terms(graph: Graph, body: sympy.Expr, inputs: tuple[int, ...],
                  heads: tuple[str, ...]):
    """``(terms, coefs, offset, slope, rest)`` where scores ``body(inputs)`` are ``sum_t coef_t
    u_t + slope (i - j) + rest`` with ``u_t`` contractions ``q_i . k_j`` over one feature axis
    (``terms``: their positions in ``inputs`` and their (q, k, feature)), and coefficients and
    ``rest`` free of pairs; or None."""
    syms = ARG_SYMBOLS[: len(inputs)]
    terms, offset = [], None
    for k, v in enumerate(inputs):
        axes = set(graph.node(v).axes)
        if {"i", "j"} <= axes:
            if graph.node(v).op == "offset" and offset is None:
                offset = k
                continue
            term = _term(graph, v, heads)
            if term is None:
                return None
            terms.append((k, term))
    pair = {syms[k] for k, _ in terms} | ({syms[offset]} if offset is not None else set())
    coefs = [sympy.diff(body, syms[k]) for k, _ in terms]
    slope = sympy.diff(body, syms[offset]) if offset is not None else sympy.Integer(0)
    if not terms or any(c.free_symbols & pair for c in [*coefs, slope]):
        return None
    linear = sympy.Add(*(c * syms[k] for c, (k, _) in zip(coefs, terms)))
    if offset is not None:
        linear += slope * syms[offset]
    rest = sympy.simplify(body - linear)
    if rest.free_symbols & pair:
        return None
    return terms, coefs, offset, slope, rest


def _flat(graph: Graph, n: int,
          inline: Callable[[int], bool] | None = None) -> tuple[sympy.Expr, tuple[int, ...]]:
    """Pointwise node ``n`` as one body over its leaves: the pointwise nodes under it that
    ``inline`` accepts, by default the pair-valued ones (the energy's graph is not yet fused:
    ``c * dot(q, k) - m * (i - j)`` is two nodes), are inlined; anything else is an argument."""
    leaves: list[int] = []
    if inline is None:
        def inline(v: int) -> bool:
            return {"i", "j"} <= set(graph.node(v).axes)

    def walk(v: int) -> sympy.Expr:
        node = graph.node(v)
        if node.op == "pointwise" and (v == n or inline(v)):
            return node.attr("body").xreplace(
                {ARG_SYMBOLS[k]: walk(a) for k, a in enumerate(node.inputs)})
        if v not in leaves:
            leaves.append(v)
        return ARG_SYMBOLS[leaves.index(v)]

    return walk(n), tuple(leaves)


def _fold_scores(graph: Graph, new: Graph, mapping: dict[int, int], S: int,
                 heads: tuple[str, ...]) -> int | None:
    """The scores ``S`` rebuilt in ``new`` with each term's coefficient moved into its query (or
    its key, for a coefficient of key-token values), and terms of one token each made terms of
    the unit axis; or None where nothing is to fold, a coefficient depends on both tokens or a
    term free of pairs does. The identities, for ``c_t`` free of one token:

        sum_t c_t (q_t,i . k_t,j) + m (i - j)  =  sum_t (c_t q_t,i) . k_t,j + m (i - j)
        r_i + c_j  =  r_i . 1_j + 1_i . c_j      (over the unit axis, of size 1)
    """
    if graph.node(S).op != "pointwise":
        return None
    body, inputs = _flat(graph, S)
    found = _linear_terms(graph, body, inputs, heads)
    if found is None:
        return None
    terms, coefs, offset, slope, rest = found
    sides = _one_token_parts(graph, rest, inputs, heads)
    if sides is None:
        return None
    scalar = all(not graph.node(v).axes for c in coefs for v in _sub_body(c, inputs)[1])
    if rest == 0 and scalar and all(sympy.simplify(c - coefs[0]) == 0 for c in coefs[1:]):
        return None  # one scalar scale: the attention pass takes it as it is
    new_terms = []
    for coef, (_, (q, k, feature)) in zip(coefs, terms):
        body, args = _sub_body(coef, inputs)
        axes = set().union(*(graph.node(v).axes for v in args))
        if axes <= {"b", "i", *heads}:
            side = "q"
        elif axes <= {"b", "j", *heads}:
            side = "k"
        else:
            return None
        c = pointwise(new, body, [mapping[v] for v in args])
        q_new, k_new = mapping[q], mapping[k]
        if side == "q":
            q_new = pointwise(new, ARG_SYMBOLS[0] * ARG_SYMBOLS[1], [c, q_new])
        else:
            k_new = pointwise(new, ARG_SYMBOLS[0] * ARG_SYMBOLS[1], [c, k_new])
        out = (set(new.node(q_new).axes) | set(new.node(k_new).axes)) - {feature}
        new_terms.append(contract(new, [q_new, k_new], out, where=graph.node(S).where))
    for side, part in sides.items():  # r_i = r_i . 1_j, c_j = 1_i . c_j over the unit axis
        body, args = _sub_body(part, inputs)
        value = pointwise(new, body, [mapping[v] for v in args])
        own = new.canonical({"b", side, *new.node(value).axes, UNIT})
        ones = new.add("broadcast", (const(new, 1),),
                       out=new.canonical({"b", "j" if side == "i" else "i", UNIT}))
        value = new.add("broadcast", (value,), out=own)
        operands = [value, ones] if side == "i" else [ones, value]
        out = (set(own) | {"i", "j"}) - {UNIT}
        new_terms.append(contract(new, operands, out, where=graph.node(S).where))
    parts = [sympy.Add(*ARG_SYMBOLS[: len(new_terms)])]
    args = list(new_terms)
    if offset is not None:
        body, slope_args = _sub_body(slope, inputs)
        shift = {ARG_SYMBOLS[m]: ARG_SYMBOLS[len(args) + 1 + m] for m in range(len(slope_args))}
        parts.append(body.xreplace(shift) * ARG_SYMBOLS[len(args)])
        args += [mapping[inputs[offset]]] + [mapping[v] for v in slope_args]
    return pointwise(new, sympy.Add(*parts), args, where=graph.node(S).where)


def _one_token_parts(graph: Graph, rest: sympy.Expr, inputs: tuple[int, ...],
                     heads: tuple[str, ...]) -> dict[str, sympy.Expr] | None:
    """``rest`` (the scores' terms free of pairs) as ``{"i": r, "j": c}``, r of values of token i
    (and constants, per-head values), c of values of token j; None where a term has both."""
    sides: dict[str, sympy.Expr] = {}
    for term in sympy.Add.make_args(sympy.expand_mul(rest)):
        if term == 0:
            continue
        axes = set().union(*(graph.node(v).axes for v in _sub_body(term, inputs)[1]))
        if axes <= {"b", "i", *heads}:
            side = "i"
        elif axes <= {"b", "j", *heads}:
            side = "j"
        else:
            return None
        sides[side] = sides.get(side, 0) + term
    return sides


def fold_score_scales(graph: Graph) -> Graph:
    """Move the scales of linear log-sum-exp scores that are not one scalar (a learned
    temperature per head, per query token, or per term) into the queries, and their terms of
    one token each (a bias per key or per query, a constant) into terms of the unit axis, so
    that the scores are ``sum_t q'_t . k'_t + m (i - j)`` with scale 1 and
    :func:`fuse_context_attention` takes them (the attention kernels, with one more feature)
    instead of the general pair kernels. Runs on the energy, before differentiation: the
    derivatives of ``q' = c q`` and of a broadcast are those of any product and broadcast."""
    targets = {S: heads for S, _, heads in filter(None, (_lse_over_j(graph, n)
                                                          for n in graph.live()))}
    return graph.rewritten(lambda new, mapping, n: _fold_scores(graph, new, mapping, n, targets[n])
                           if n in targets else None)
