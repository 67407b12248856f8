"""Torch printing of the attention family: every attention-family node is one call into
``kernels`` (the runtime's attention kernels: CPU flash blocks, the chunked fallback or the Triton
flash kernels, chosen at run time).

Attention nodes over the same scores share a forward call (their values concatenated), the
gradients of one attention share one backward call, and backward calls over the same scores and
log-sum-exp merge where their gradients are only ever summed (``_merge_backwards``). Where three
or more calls read the same scores the forward keeps the weights P (``kept_weights.keeps_probs``)
and later calls take them as ``probs=``.
"""

from __future__ import annotations

import re

import sympy

from energyc.backends.kept_weights import keeps_probs, same_scores
from energyc.backends.rules import TORCH
from energyc.backends.torch_backend import SIZE_NAMES, Emitter
from energyc.ir import ops
from energyc.ir.graph import Node
from energyc.ir.ops import ARG_SYMBOLS, attention_operands, value_feature

# The kernels take (B, T, H, F) tensors: batch, token, head, feature. ``_layout`` brings an operand
# there (a permute, a head axis inserted and expanded where the operand lacks it; with no head axis
# at all, H = 1); ``_from_layout`` brings a result back to its node's canonical axes.


def _layout_axes(token: str, heads: tuple[str, ...], feature: str | None) -> tuple[str, ...]:
    return ("b", token, *(heads or ("_h",)), *((feature,) if feature else ()))


def _layout(em: Emitter, nid: int, token: str, heads: tuple[str, ...], feature: str | None) -> str:
    """Code for node ``nid`` as a (B, T, H, F) tensor (or (B, T, H) when ``feature`` is None).

    Head axes the operand lacks are inserted and expanded (it is shared by those heads); several
    head axes (grouped heads, G x R) are flattened into the kernels' one, G major."""
    axes = em.graph.node(nid).axes
    target = _layout_axes(token, heads, feature)
    code = em.names[nid]
    present = [a for a in target if a in axes]
    perm = [axes.index(a) for a in present]
    if perm != list(range(len(axes))):
        code = f"{code}.permute({', '.join(map(str, perm))})"
    missing = [pos for pos, a in enumerate(target) if a not in axes]
    for pos in missing:
        code = f"{code}.unsqueeze({pos})"
    if missing and heads:
        sizes = [em.size(a) if a not in axes else "-1" for a in target]
        code = f"{code}.expand({', '.join(sizes)})"
    if len(heads) > 1:
        code = f"{code}.flatten(2, {1 + len(heads)})"
    return code


def _from_layout(code: str, token: str, heads: tuple[str, ...], feature: str | None,
                 axes: tuple[str, ...]) -> str:
    """A kernel result ``code`` in (B, T, H, F) layout as a value with canonical ``axes``: several
    head axes unflattened, the head axes summed where the value lacks them (a shared operand's
    gradient), then permuted."""
    layout = list(_layout_axes(token, heads, feature))
    if len(heads) > 1:
        code = f"{code}.unflatten(2, ({', '.join(SIZE_NAMES.get(a, a) for a in heads)}))"
    summed = [pos for pos, a in enumerate(layout) if a not in axes]
    if summed:
        if heads:
            dims = summed[0] if len(summed) == 1 else tuple(summed)
            code = f"{code}.sum({dims})"
        else:
            code = f"{code}[:, :, 0]"
        layout = [a for a in layout if a in axes]
    perm = [layout.index(a) for a in axes]
    if perm != list(range(len(axes))):
        code = f"{code}.permute({', '.join(map(str, perm))})"
    return code


def _bind(em: Emitter, code: str, var: str) -> str:
    """``code`` as a variable: a new line ``var = code`` unless it already is a name."""
    if re.fullmatch(r"[A-Za-z_]\w*", code):
        return code
    em.lines.append(f"{var} = {code}")
    return var


def _relayout(em: Emitter, var: str, code: str) -> None:
    """``var = code`` where ``code`` (``var`` brought to its node's axes) differs from ``var``."""
    if code != var:
        em.lines.append(f"{var} = {code}")


def _scores_args(em: Emitter, node: Node, var: str) -> tuple[str, str, str]:
    """(q, k, trailing keyword arguments) of the kernel call for an attention-family node.

    The score terms' features are concatenated: ``sum_t q_t . k_t = [q_0, q_1] . [k_0, k_1]``."""
    ins = attention_operands(node)
    heads, features = node.attr("heads"), node.attr("features")
    key = tuple(ins[f"{r}{t}"] for r in "qk" for t in range(len(features)))
    if key not in em.bound:
        qk = []
        for role, token in (("q", "i"), ("k", "j")):
            parts = [_layout(em, ins[f"{role}{t}"], token, heads, f) for t, f in enumerate(features)]
            code = parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], dim=-1)"
            qk.append(_bind(em, code, f"{var}_{role}"))
        em.bound[key] = tuple(qk)
    q, k = em.bound[key]
    extra = f"{em.names[ins['s']]}, {node.attr('mask').spelling!r}"
    if "m" in ins:
        m = ins["m"]
        slopes = em.names[m]
        if em.graph.node(m).axes != tuple(heads) or not heads:
            slopes = f"torch.as_tensor({slopes}).expand({em.size(heads[0]) if heads else 1})"
        extra += f", slopes={slopes}"
    return q, k, extra


def _value(em: Emitter, nid: int, token: str, heads: tuple[str, ...], var: str) -> tuple[str, str]:
    """(code, feature axis) of a per-token value (v, o or g) in the kernels' layout."""
    feature = value_feature(em.graph.node(nid).axes, token, heads)
    return _bind(em, _layout(em, nid, token, heads, feature), var), feature


def _siblings(em: Emitter, node: Node, op: str) -> list[int]:
    return [n for n in em.graph.live() if em.graph.node(n).op == op
            and same_scores(em.graph.node(n), node)]


def _keeps(em: Emitter, lse: int) -> bool:
    """Whether this function's call makes the kept weights of ``lse``: not when decoding (at a
    position after a prefix), where no backward reads them."""
    return not em.position and keeps_probs(em.graph, lse)


def _probs_arg(em: Emitter, node: Node, lse: int | None = None) -> str:
    """``, probs=<name>_p`` where a log-sum-exp over ``node``'s scores (``lse``, or any named
    one) keeps its weights and is named; else nothing."""
    known = [lse] if lse is not None else _siblings(em, node, "attention_lse")
    for n in known:
        if n in em.names and keeps_probs(em.graph, n) and same_scores(em.graph.node(n), node):
            return f", probs={em.names[n]}_p"
    return ""


def _ready_attention(em: Emitter, node: Node) -> list[int]:
    """The attention nodes of this function over ``node``'s scores, not yet printed, whose values
    are ready: the ones one forward call can serve."""
    return [n for n in sorted(em.region) if n not in em.names
            and em.graph.node(n).op == "attention" and same_scores(em.graph.node(n), node)
            and attention_operands(em.graph.node(n))["v"] in em.names]


@TORCH(ops.Attention)
def _emit_attention(em: Emitter, nid: int, node: Node) -> None:
    """Forward and its saved log-sum-exp in one fused call: ``o, lse = attention_forward(...)``.

    Attention nodes over the same scores whose values are ready share the call, their values
    concatenated along the feature axis: ``P [v_1, v_2] = [P v_1, P v_2]`` (one pass over the
    scores instead of one per value, as for the two values of a diagonal-plus-low-rank step)."""
    var = em.names.get(nid) or em.pending[nid]
    heads = node.attr("heads")
    group = [nid] + [n for n in _ready_attention(em, node) if n != nid]
    lse = [n for n in _siblings(em, node, "attention_lse") if n not in em.names]
    q, k, extra = _scores_args(em, node, var)
    names = [var if n == nid else em.pending[n] for n in group]
    values = [_value(em, attention_operands(em.graph.node(n))["v"], "j", heads, f"{name}_v")
              for n, name in zip(group, names)]
    if len(group) == 1:
        (v, _), out = values[0], var
    else:
        v = _bind(em, f"torch.cat([{', '.join(code for code, _ in values)}], dim=-1)", f"{var}_v")
        out = f"{var}_o"
    if lse and _keeps(em, lse[0]):  # this call makes the weights later calls use
        name = em.pending[lse[0]]
        em.lines.append(f"{out}, {name}, {name}_p = kernels.attention_forward({q}, {k}, {v}, "
                        f"{extra}{em.offset_arg()}, keep_probs=True)")
    else:
        em.lines.append(f"{out}, {em.pending.get(lse[0], '_') if lse else '_'} = "
                        f"kernels.attention_forward({q}, {k}, {v}, {extra}{em.offset_arg()}"
                        f"{'' if lse else _probs_arg(em, node)})")
    start = ""
    for n, name, (_, feature) in zip(group, names, values):
        if len(group) > 1:  # this value's features of the shared output
            stop = f"{start} + {em.size(feature)}" if start else em.size(feature)
            em.lines.append(f"{name} = {out}[..., {start}:{stop}]")
            start = stop
        _relayout(em, name, _from_layout(name, "i", heads, feature, em.graph.node(n).axes))
        em.names[n] = name
    if lse:
        name = em.pending[lse[0]]
        _relayout(em, name, _from_layout(name, "i", heads, None, em.graph.node(lse[0]).axes))
        em.names[lse[0]] = name
    return None


@TORCH(ops.AttentionLse)
def _emit_attention_lse(em: Emitter, nid: int, node: Node) -> None:
    ready = _ready_attention(em, node)
    if ready:  # the forward over these scores returns the normaliser with its output
        return _emit_attention(em, ready[0], em.graph.node(ready[0]))
    var = em.pending[nid]
    q, k, extra = _scores_args(em, node, var)
    if _keeps(em, nid):
        em.lines.append(f"_, {var}, {var}_p = kernels.attention_forward({q}, {k}, {k}, {extra}"
                        f"{em.offset_arg()}, keep_probs=True)  # the normaliser and weights")
    else:
        em.lines.append(f"_, {var} = kernels.attention_forward({q}, {k}, {k}, {extra}"
                        f"{em.offset_arg()})  # the normaliser only")
    _relayout(em, var, _from_layout(var, "i", node.attr("heads"), None, node.axes))
    em.names[nid] = var
    return None


@TORCH(ops.AttentionTransposed)
def _emit_attention_transposed(em: Emitter, nid: int, node: Node) -> None:
    """The key role: ``o_j = sum_{i : j in C(i)} P_ij v_i`` from the saved log-sum-exp."""
    var = em.pending[nid]
    heads = node.attr("heads")
    ins = attention_operands(node)
    q, k, extra = _scores_args(em, node, var)
    v, feature = _value(em, ins["v"], "i", heads, f"{var}_v")
    lse = _layout(em, ins["lse"], "i", heads, None)
    em.lines.append(f"{var} = kernels.attention_transposed({q}, {k}, {v}, {extra}, lse={lse}"
                    f"{_probs_arg(em, node, ins['lse'])})")
    _relayout(em, var, _from_layout(var, "j", heads, feature, node.axes))
    em.names[nid] = var
    return None


def _grad_group(em: Emitter, node: Node) -> dict[str, int]:
    """The attention_grad nodes of one backward call (same inputs), by what they differentiate."""
    return {em.graph.node(n).attr("wrt"): n for n in _siblings(em, node, "attention_grad")
            if em.graph.node(n).inputs == node.inputs}


def _summed_alike(em: Emitter, a: int, b: int) -> bool:
    """Whether gradients ``a`` and ``b`` have one consumer, the same element-wise node, which is
    linear in them with equal coefficients: it then depends on ``a + b`` alone."""
    users = em.graph.users(a)
    if len(users) != 1 or em.graph.users(b) != users:
        return False
    user = em.graph.node(users[0])
    if (user.op != "pointwise" or users[0] not in em.region or users[0] in em.names
            or user.inputs.count(a) != 1 or user.inputs.count(b) != 1):
        return False
    body = user.attr("body")
    sa, sb = ARG_SYMBOLS[user.inputs.index(a)], ARG_SYMBOLS[user.inputs.index(b)]
    da = sympy.diff(body, sa)
    return (sympy.simplify(da - sympy.diff(body, sb)) == 0 and sympy.diff(da, sa) == 0
            and sympy.diff(da, sb) == 0)


def _merge_backwards(em: Emitter, node: Node, sibs: dict[str, int]) -> list[dict[str, int]]:
    """Other backward calls over the same scores and log-sum-exp that can share this one.

    ``dS_ij = P_ij (g_i . v_j - g_i . o_i)`` is additive over value triples: one call on the
    concatenated ``[v_1, v_2], [o_1, o_2], [g_1, g_2]`` gives ``dS_1 + dS_2``, so the sums
    ``dq_1 + dq_2``, ``dk_1 + dk_2`` (and ds, dm) and both dv's. Legal when each of those gradients
    of the two calls exists for both and is consumed only through their sum (``_summed_alike``);
    the second call's then count 0 there (``em.zeros``)."""
    if not em.merge_backwards:
        return []
    lse = attention_operands(node)["lse"]
    shared = sorted(w for w in sibs if w != "v")
    groups: list[dict[str, int]] = []
    seen = set(sibs.values())
    for n in sorted(em.region):
        other = em.graph.node(n)
        if (n in seen or n in em.names or other.op != "attention_grad"
                or not same_scores(other, node) or attention_operands(other)["lse"] != lse):
            continue
        group = _grad_group(em, other)
        seen |= set(group.values())
        ins = attention_operands(other)
        if (any(m in em.names for m in group.values())
                or sorted(w for w in group if w != "v") != shared
                or not all(_summed_alike(em, sibs[w], group[w]) for w in shared)
                or not _emit_early(em, [ins[x] for x in ("v", "o", "g")], set(sibs.values()))):
            continue
        groups.append(group)
    return groups


def _emit_early(em: Emitter, roots: list[int], avoid: set[int]) -> bool:
    """Emit now what ``roots`` need and is not yet emitted (in topological order), unless that
    needs a node of ``avoid``; whether ``roots`` are then ready. Node ids are topological."""
    need = sorted(n for n in em.graph.ancestors(roots) if n in em.region and n not in em.names)
    if avoid & set(need):
        return False
    for n in need:
        if n not in em.names:  # an earlier one of them may have emitted it with its group
            em.emit(n, em.pending.get(n, ""))
    return all(r in em.names for r in roots)


@TORCH(ops.AttentionGrad)
def _emit_attention_grad(em: Emitter, nid: int, node: Node) -> None:
    """All gradients of one attention (q, k, v, scale, slopes) in one fused backward call, and
    those of other calls over the same scores where they can share it (_merge_backwards)."""
    sibs = _grad_group(em, node)
    merged = _merge_backwards(em, node, sibs)
    var = em.pending[nid]
    heads, features = node.attr("heads"), node.attr("features")
    ins = attention_operands(node)
    q, k, extra = _scores_args(em, node, var)
    triples = []  # (v, o, g, the value's feature) of each call
    for t, group in enumerate([sibs, *merged]):
        gi = attention_operands(em.graph.node(next(iter(group.values()))))
        tag = var if t == 0 else f"{var}_{t}"
        v, v_feature = _value(em, gi["v"], "j", heads, f"{tag}_v")
        o, _ = _value(em, gi["o"], "i", heads, f"{tag}_o")
        g, _ = _value(em, gi["g"], "i", heads, f"{tag}_g")
        triples.append((v, o, g, v_feature))
    if merged:
        v, o, g = (_bind(em, f"torch.cat([{', '.join(x[r] for x in triples)}], dim=-1)",
                         f"{var}_{'vog'[r]}_all") for r in range(3))
    else:
        v, o, g, _ = triples[0]
    lse = _layout(em, ins["lse"], "i", heads, None)
    outs = [f"{var}_d{w}" if any(n.startswith(w) for group in [sibs, *merged] for n in group)
            else "_" for w in "qkvsm"]
    need_ds = ", need_dscale=True" if "s" in sibs else ""
    em.lines.append(f"{', '.join(outs)} = kernels.attention_backward({q}, {k}, {v}, {extra}, "
                    f"o={o}, lse={lse}, g={g}{need_ds}{_probs_arg(em, node, ins['lse'])})")
    offsets = ["0"]
    for f in features:
        offsets.append(em.size(f) if offsets[-1] == "0" else f"{offsets[-1]} + {em.size(f)}")
    start = ""
    for t, group in enumerate([sibs, *merged]):
        v_feature = triples[t][3]
        stop = f"{start} + {em.size(v_feature)}" if start else em.size(v_feature)
        for wrt, n in group.items():
            if t and wrt != "v":  # counted in the first call's gradient
                em.zeros.add(n)
                em.names[n] = "0"
                continue
            axes = em.graph.node(n).axes
            grad = outs["qkvsm".index(wrt[0])]
            if wrt[0] in "qk":
                i = int(wrt[1:])
                if len(features) > 1:
                    grad = f"{grad}[..., {offsets[i] if i else ''}:{offsets[i + 1]}]"
                code = _from_layout(grad, "i" if wrt[0] == "q" else "j", heads, features[i], axes)
            elif wrt == "v":
                if merged:
                    grad = f"{grad}[..., {start}:{stop}]"
                code = _from_layout(grad, "j", heads, v_feature, axes)
            elif wrt == "m":
                code = grad if axes else f"{grad}.sum()"
            else:
                code = grad
            if code == grad:  # already in the node's layout: no new variable
                em.names[n] = grad
                continue
            em.lines.append(f"{em.pending[n]} = {code}")
            em.names[n] = em.pending[n]
        start = stop
    return None


# op class -> its torch printing (one entry per op of energyc.ir.ops.OPS)
