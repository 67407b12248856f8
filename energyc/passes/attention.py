"""Context-reduction fusion for the torch backend: the softmax-weighted context sum -> attention.

Differentiating a log-sum-exp context reduction ``L_i = log sum_{j in C(i)} exp(S_ij)`` gives the
weights ``P_ij = c_i exp(S_ij - L_i)`` on ``C(i)``; when the gradient then contracts them with a
per-token value ``V_j`` the result is attention:

    sum_j [j in C(i)] c_i exp(S_ij - L_i) V_j  =  c_i * attention(Q, K, V)_i,   S = s * Q_i . K_j

This pass rewrites that region into one ``attention`` node (whose VJP is the attention backward),
so the backend can call a fused kernel that never holds the (tokens x tokens) weights.

Legal when: ``S`` is a scalar ``s`` (a constant, or fixed hyperparameters) times a contraction of
``Q`` (token i) with ``K`` (token j) over one feature dim, both with the same head dims (at most
one) as the weights; ``L`` reduces ``S`` over the same context set (any: ``j <= i``, ``j < i``,
a window, ``j != i``, all); ``c`` does not depend on j; ``V`` has the same head dims plus one
feature dim; feature dims are the last axes. Otherwise the graph is
left as it is (the materialised form is correct, only slower).
"""

from __future__ import annotations

import sympy

from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS, pointwise

FUSABLE_KINDS = ("causal", "strict", "window", "not_self", "all")


def _scale(graph: Graph, s: int):
    """(qk node, scale node) when ``S = scale * qk`` with a fixed scalar scale, else None."""
    node = graph.node(s)
    if node.op == "contract":
        return s, None
    if node.op != "pointwise":
        return None
    body = node.attr("body")
    qk_pos = [k for k, u in enumerate(node.inputs) if graph.node(u).op == "contract"]
    if len(qk_pos) != 1:
        return None
    a = ARG_SYMBOLS[qk_pos[0]]
    coef = sympy.simplify(body / a)
    if coef.has(a) or body.subs(a, 0) != 0:
        return None
    scalars = [u for k, u in enumerate(node.inputs) if k != qk_pos[0]]
    for u in scalars:
        un = graph.node(u)
        if un.op != "hyper" or un.attr("learnable") or un.axes:
            return None
    return node.inputs[qk_pos[0]], (coef, [u for k, u in enumerate(node.inputs) if k != qk_pos[0]],
                                    [k for k in range(len(node.inputs)) if k != qk_pos[0]])


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
            mask, P = ("all",), A
        else:
            continue
        if mask[0] not in FUSABLE_KINDS:
            continue
        pn = graph.node(P)
        if pn.op != "pointwise" or "i" not in pn.axes or "j" not in pn.axes:
            continue
        heads = [a for a in pn.axes if a not in ("b", "i", "j")]
        if len(heads) > 1 or "i" in vn.axes or "j" not in vn.axes:
            continue
        if list(vn.axes[:-1]) != ["b", "j", *heads] or list(node.axes) != ["b", "i", *heads,
                                                                            vn.axes[-1]]:
            continue
        # find L = lse_j S (same mask) and S among P's args
        for l_pos, L in enumerate(pn.inputs):
            ln = graph.node(L)
            if ln.op != "reduce" or ln.attr("kind") != "lse" or ln.attr("mask") != mask:
                continue
            S = ln.inputs[0]
            if S not in pn.inputs:
                continue
            s_pos = pn.inputs.index(S)
            body = pn.attr("body")
            aS, aL = ARG_SYMBOLS[s_pos], ARG_SYMBOLS[l_pos]
            ratio = sympy.simplify(body * sympy.exp(aL - aS))
            if ratio.has(aS) or ratio.has(aL):
                continue
            others = [k for k in range(len(pn.inputs)) if k not in (s_pos, l_pos)]
            if any("j" in graph.node(pn.inputs[k]).axes for k in others):
                continue
            scaled = _scale(graph, S)
            if scaled is None:
                continue
            QK, scale = scaled
            qkn = graph.node(QK)
            if len(qkn.inputs) != 2:
                continue
            Q, K = qkn.inputs
            if "j" in graph.node(Q).axes:
                Q, K = K, Q
            qn, kn = graph.node(Q), graph.node(K)
            if "j" in qn.axes or "i" in kn.axes or "i" not in qn.axes or "j" not in kn.axes:
                continue
            feat = qn.axes[-1]
            if (list(qn.axes) != ["b", "i", *heads, feat] or
                    list(kn.axes) != ["b", "j", *heads, feat]):
                continue
            return dict(Q=Q, K=K, V=V, scale=scale, mask=mask, P=P, ratio=ratio,
                        others=others)
    return None


def fuse_context_attention(graph: Graph) -> Graph:
    """Rewrite each softmax-weighted context sum into ``c * attention(Q, K, V)``."""
    new = Graph(graph.dims)
    mapping: dict[int, int] = {}
    for n in graph.live():
        node = graph.node(n)
        found = _match(graph, n)
        if found is None:
            mapping[n] = new.add_like(node, [mapping[u] for u in node.inputs])
            continue
        if found["scale"] is None:
            scale = new.add("const", value=sympy.Integer(1))
        else:
            coef, args, positions = found["scale"]
            renum = {ARG_SYMBOLS[p]: ARG_SYMBOLS[k] for k, p in enumerate(positions)}
            scale = pointwise(new, coef.xreplace(renum), [mapping[u] for u in args])
        attention = new.add("attention", (mapping[found["Q"]], mapping[found["K"]],
                                          mapping[found["V"]], scale), where=node.where,
                            mask=found["mask"])
        pn = graph.node(found["P"])
        others = found["others"]
        renum = {ARG_SYMBOLS[k]: ARG_SYMBOLS[m] for m, k in enumerate(others)}
        body = found["ratio"].xreplace(renum) * ARG_SYMBOLS[len(others)]
        mapping[n] = pointwise(new, body, [mapping[pn.inputs[k]] for k in others] + [attention],
                               where=node.where)
    new.outputs = {name: mapping[n] for name, n in graph.outputs.items()}
    return new
