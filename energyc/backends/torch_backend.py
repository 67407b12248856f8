"""The torch backend: print a graph region as a straight-line torch function.

Each op prints itself here (one ``_emit_<op>`` per op, see :data:`EMITTERS`). Values keep the
graph's canonical axis order, so broadcasting an argument only inserts ``None`` indices; contractions
print as ``torch.einsum`` (``_rt.contract`` for two operands); masks are boolean (T, T) tensors
built once per function.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field

import sympy

from energyc.backends.torch_pairs import PAIR_EMITTERS, print_call
from energyc.backends.torch_printer import TorchPrinter
from energyc.context import Context
from energyc.errors import CompileError
from energyc.ir import ops
from energyc.ir.graph import UNIT, Graph, Node
from energyc.ir.ops import (
    ARG_SYMBOLS,
    OPS,
    FusedReduce,
    attention_operands,
    describe_mask,
    value_feature,
)

SIZE_NAMES = {"b": "B", "i": "T", "j": "T", UNIT: "1"}


def _broadcast(name: str, axes: tuple[str, ...], to_axes: tuple[str, ...]) -> str:
    """``name`` (with canonical ``axes``) indexed with ``None`` where ``to_axes`` has more axes."""
    index = [":" if a in axes else "None" for a in to_axes]
    while index and index[-1] == ":":
        index.pop()
    return f"{name}[{', '.join(index)}]" if index and axes else name


@dataclass
class Emitter:
    """Prints nodes of ``graph``. ``names`` maps node ids to the expressions that denote them."""

    graph: Graph
    names: dict[int, str]
    letters: dict[str, str]
    lines: list[str] = field(default_factory=list)
    masks: dict[tuple, str] = field(default_factory=dict)
    pending: dict[int, str] = field(default_factory=dict)  # planned variable names
    mask_lines: list[str] = field(default_factory=list)
    bound: dict[tuple, tuple[str, str]] = field(default_factory=dict)  # attention operands
    region: set[int] = field(default_factory=set)  # the nodes of the function being printed
    # gradients folded into another's backward call (_merge_backwards): 0 in their one consumer
    zeros: set[int] = field(default_factory=set)
    merge_backwards: bool = True  # an emitter whose element-wise nodes are kernels sets False
    # decoding: the variable holding the position of the first token (the queries' offset); ops
    # that depend on token positions pass it on as ``offset=`` (rotary, the context reductions)
    position: str = ""
    # a sum whose term is a matrix product used nowhere else takes that product inside one GEMM
    # (_rt.contract_add); an emitter whose element-wise nodes are kernels sets False
    accumulate_products: bool = True
    deferred: set[int] = field(default_factory=set)  # such products
    # returned values wanted in an axis order other than the canonical one (a parameter's
    # gradient in the parameter's layout); a contraction (or a sum of them) read by nothing
    # else prints its einsum's output in that order, recorded in ``printed_order``
    wanted_order: dict[int, tuple[str, ...]] = field(default_factory=dict)
    printed_order: dict[int, tuple[str, ...]] = field(default_factory=dict)
    # a function that autograd may record (the energy): no in-place step on a tensor an
    # operation's backward saves (TorchPrinter's ``recorded``)
    recorded: bool = False
    _users: dict[int, list[int]] | None = None

    def users(self, nid: int) -> list[int]:
        """The nodes of the graph that read node ``nid`` (each once)."""
        if self._users is None:
            self._users = {}
            for n in self.graph.live():
                for u in dict.fromkeys(self.graph.node(n).inputs):
                    self._users.setdefault(u, []).append(n)
        return self._users.get(nid, [])

    def offset_arg(self) -> str:
        return f", offset={self.position}" if self.position else ""

    def size(self, axis: str) -> str:
        return SIZE_NAMES.get(axis, axis)

    def align(self, nid: int, to_axes: tuple[str, ...]) -> str:
        """The expression of node ``nid`` indexed so that it broadcasts against ``to_axes``."""
        axes = self.graph.node(nid).axes
        assert set(axes) <= set(to_axes), (axes, to_axes)
        return _broadcast(self.names[nid], axes, to_axes)

    def mask(self, mask: Context, to_axes: tuple[str, ...]) -> str:
        if mask not in self.masks:
            name = "mask_" + "_".join(str(m) for m in mask.spelling)
            self.masks[mask] = name
            self.mask_lines.append(
                f"{name} = _rt.context_mask({mask.spelling!r}, T, x.device)  "
                f"# {{{describe_mask(mask)}}}"
            )
        return _broadcast(self.masks[mask], ("i", "j"), to_axes)

    def print_body(self, body: sympy.Expr, args: list[int], out_axes: tuple[str, ...],
                   first: str | None = None) -> str:
        """``body`` with its arguments broadcast to ``out_axes``; ``first`` (code, already of
        ``out_axes``) when given is ``a0`` and ``args`` are ``a1, a2, ...``."""
        shift = 0 if first is None else 1
        folded = {ARG_SYMBOLS[k + shift]: 0 for k, a in enumerate(args) if a in self.zeros}
        if folded:
            body = body.xreplace(folded)
        names = {ARG_SYMBOLS[k + shift].name: self.align(a, out_axes) for k, a in enumerate(args)
                 if a not in self.zeros}
        if first is not None:
            names[ARG_SYMBOLS[0].name] = first
        tensor_symbols = set(ARG_SYMBOLS[: len(args) + shift])
        full = {ARG_SYMBOLS[k + shift] for k, a in enumerate(args)
                if a not in self.zeros and set(self.graph.node(a).axes) == set(out_axes)}
        if first is not None:
            full.add(ARG_SYMBOLS[0])
        names.update({d: d for d in self.graph.dims})
        names.update({"B": "B", "T": "T"})
        printer = TorchPrinter(names, tensor_symbols, full, recorded=self.recorded)
        return printer.doprint(body)

    def emitters(self) -> dict:
        """The op -> printer table (a subclass overrides some entries)."""
        return EMITTERS

    def print_pair_call(self, call) -> None:
        """Print one pass over pairs (a ``torch_pairs.PairCall``): one runtime call here."""
        print_call(self, call)

    def emit(self, nid: int, var: str) -> None:
        node = self.graph.node(nid)
        self.pending[nid] = var
        expr = self.emitters()[OPS[node.op]](self, nid, node)
        if expr is None:
            return
        self.names[nid] = var
        axes = self.printed_order.get(nid, node.axes)
        comment = f"# ({', '.join(axes)})" if axes else "# scalar"
        self.lines.append(f"{var} = {expr}  {comment}")


def _emit_leaf(em: Emitter, nid: int, node: Node) -> None:
    return None  # inputs, params and hypers are arguments; their names are preset


def _emit_const(em: Emitter, nid: int, node: Node) -> None:
    em.names[nid] = f"({em.print_body(node.attr('value'), [], ())})"
    return None


def _emit_offset(em: Emitter, nid: int, node: Node) -> str:
    return "_rt.token_offset(T, x.dtype, x.device)"


def _einsum_call(em: Emitter, node: Node, out_axes: tuple[str, ...]) -> str:
    """``"subscripts", operands`` of contraction ``node`` with its output in ``out_axes``."""
    subs = ["".join(em.letters[a] for a in em.graph.node(u).axes) for u in node.inputs]
    out = "".join(em.letters[a] for a in out_axes)
    args = ", ".join(em.names[u] for u in node.inputs)
    return f'"{",".join(subs)}->{out}", {args}'


def _output_order(em: Emitter, nid: int) -> tuple[str, ...]:
    """The axis order node ``nid`` is printed in: the storage order it is returned in where it is
    a value read by nothing else (so no permuted view goes out: a gradient returned as a
    transposed view costs its consumer a strided pass, e.g. autograd's accumulation into the
    parameter's .grad, 25x slower than a contiguous add for a (3072, 768) weight), else its
    canonical axes. ``sum_S A[P, S] B[S, Q]`` is one GEMM in either output order (P Q or Q P),
    so the order costs nothing."""
    node = em.graph.node(nid)
    order = em.wanted_order.get(nid)
    if order is None or em.users(nid) or sorted(order) != sorted(node.axes):
        return node.axes
    em.printed_order[nid] = order
    return order


def _emit_contract(em: Emitter, nid: int, node: Node) -> str | None:
    if _accumulates(em, nid, node):
        em.deferred.add(nid)  # printed inside its sum (_emit_pointwise)
        return None
    return _contraction(_einsum_call(em, node, _output_order(em, nid)), len(node.inputs))


def _contraction(call: str, n_inputs: int) -> str:
    """A contraction's code: ``_rt.contract`` for two operands (one GEMM on the faster CPU
    GEMM where it is one), ``torch.einsum`` otherwise."""
    return f"_rt.contract({call})" if n_inputs == 2 else f"torch.einsum({call})"


def _plain_sum(node: Node) -> bool:
    """Whether a pointwise body is a0 + a1 + ... (each argument once, coefficient 1)."""
    body = node.attr("body")
    return body.is_Add and set(body.args) == set(ARG_SYMBOLS[: len(node.inputs)]) and len(
        body.args) == len(node.inputs)


def _accumulates(em: Emitter, nid: int, node: Node) -> bool:
    """A product of two operands with no batch axis (every axis of the output belongs to one
    operand: one GEMM of the flattened axes), read only by a plain sum of values of its own
    axes in this function: the sum takes it inside the GEMM, ``total + A B`` with beta = 1,
    instead of a product into a new tensor and an add (whose operands may not even share a
    memory layout: einsum returns a transposed view where that is cheaper)."""
    if not em.accumulate_products or len(node.inputs) != 2 or nid in em.graph.outputs.values():
        return False
    a, b = (set(em.graph.node(u).axes) for u in node.inputs)
    if a & b & set(node.axes):
        return False
    users = em.users(nid)
    if len(users) != 1 or users[0] not in em.region:
        return False
    user = em.graph.node(users[0])
    return (user.op == "pointwise" and _plain_sum(user) and len(user.inputs) >= 2
            and all(set(em.graph.node(u).axes) == set(node.axes) for u in user.inputs)
            and user.axes == node.axes)


def _emit_pointwise(em: Emitter, nid: int, node: Node) -> str:
    products = [u for u in node.inputs if u in em.deferred]
    if not products:
        return em.print_body(node.attr("body"), list(node.inputs), node.axes)
    # total + A1 B1 + A2 B2 ...: each deferred product accumulates into the sum of the others
    rest = [u for u in node.inputs if u not in em.deferred]
    if rest:
        code = em.print_body(sympy.Add(*ARG_SYMBOLS[: len(rest)]), rest, node.axes)
        order = node.axes
    else:  # a sum of products alone may come out in its returned order (_output_order)
        order = _output_order(em, nid)
        code = f"_rt.contract({_einsum_call(em, em.graph.node(products.pop(0)), order)})"
    for u in products:
        code = f"_rt.contract_add({code}, {_einsum_call(em, em.graph.node(u), order)})"
    return code


def _reduce_code(em: Emitter, src: str, in_axes: tuple[str, ...], node: Node) -> str:
    """``src`` (a value with ``in_axes``) reduced as ``node`` says: sum or logsumexp, masked."""
    dims = tuple(in_axes.index(a) for a in node.attr("axes"))
    dim = dims[0] if len(dims) == 1 else dims
    mask = node.attr("mask")
    if mask is not None and not mask.everything:
        m = em.mask(mask, in_axes)
        if node.attr("kind") == "lse":
            return f"_rt.masked_logsumexp({src}, {m}, dim={dim})"
        return f"torch.where({m}, {src}, 0).sum(dim={dim})"
    if node.attr("kind") == "lse":
        return f"torch.logsumexp({src}, dim={dim})"
    return f"{src}.sum(dim={dim})"


def _emit_reduce(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    return _reduce_code(em, em.names[u], em.graph.node(u).axes, node)


def _emit_fused_reduce(em: Emitter, nid: int, node: Node) -> str:
    """``post(reduce(pre(a...)), b...)`` as one expression (torch evaluates it in steps)."""
    pre_args, post_args, in_axes = FusedReduce.parts(em.graph, node)
    pre = em.print_body(node.attr("pre"), pre_args, in_axes)
    reduced = _reduce_code(em, pre if _simple(pre) else f"({pre})", in_axes, node)
    return em.print_body(node.attr("post"), post_args, node.axes, first=reduced)


def _simple(code: str) -> bool:
    """A name, or a name with one index (``t3``, ``grad_g[:, :, None]``): needs no parentheses."""
    return re.fullmatch(r"[A-Za-z_]\w*(\[[^\[\]()]*\])?", code) is not None


def _emit_mask(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    return f"torch.where({em.mask(node.attr('mask'), node.axes)}, {em.align(u, node.axes)}, 0)"


def _emit_broadcast(em: Emitter, nid: int, node: Node) -> str:
    (u,) = node.inputs
    sizes = ", ".join(em.size(a) for a in node.axes)
    if em.graph.node(u).op == "const":  # a constant with axes: a tensor like the state's
        return f"x.new_full(({sizes}{',' if len(node.axes) == 1 else ''}), {em.names[u]})"
    return f"{em.align(u, node.axes)}.expand({sizes})"


def _emit_relabel(em: Emitter, nid: int, node: Node) -> None:
    em.names[nid] = em.names[node.inputs[0]]  # the same tensor seen in another token role
    return None


def _emit_rotary(em: Emitter, nid: int, node: Node) -> str:
    axes = node.axes
    token = next(a for a in axes if a in ("i", "j"))
    inverse = node.attr("inverse")
    return (f"_rt.rotary({em.names[node.inputs[0]]}, token_dim={axes.index(token)}, "
            f"feature_dim={axes.index(node.attr('feature'))}, base={node.attr('base')!r}, "
            f"inverse={inverse}{em.offset_arg()})")


# -- fused context reductions: every attention-family node is one call into ``kernels`` ----------
#
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


NOT_SCORES = ("v", "o", "lse", "g")  # the attention-family slots that are not score operands


def _same_scores(a: Node, b: Node) -> bool:
    """Whether two attention-family nodes have the same scores (operands, context set)."""
    ia, ib = attention_operands(a), attention_operands(b)
    keep = [name for name in ia if name not in NOT_SCORES]
    return ([ia[n] for n in keep] == [ib.get(n) for n in keep] and
            all(a.attr(x) == b.attr(x) for x in ("mask", "features", "heads", "bias")))


def _siblings(em: Emitter, node: Node, op: str) -> list[int]:
    return [n for n in em.graph.live() if em.graph.node(n).op == op
            and _same_scores(em.graph.node(n), node)]


# A log-sum-exp whose scores this many calls read, its forward's included, keeps the attention
# weights P (``probs``): the runtime may form them once in the forward (where the tokens fit
# one query block, ``_rt.probs_fit``) and each later call multiplies by them. With fewer
# calls (a forward and its backward) P costs more than the flash kernels' recomputation
# (measured on the 2-core machine of benchmarks/RESULTS.md at 64-256 tokens: a forward and a
# backward 1.1-2x slower with P kept; the Energy Transformer's four calls 1.4-2x faster).
PROBS_MIN_CALLS = 3


def keeps_probs(graph, lse: int) -> bool:
    """Whether the attention_lse node ``lse`` has a companion variable ``<name>_p``: the weights
    P its forward kept (or None), saved beside it and passed as ``probs=`` to every call over
    the same scores. The calls counted: the forward, the key role (attention_transposed), the
    forwards of the backward (values that depend on the upstream gradient ``grad_g``) and the
    backward (attention_grad; calls over the same scores merge into one). A function of the graph
    alone, so that the forward (which makes and saves it) and the backward (which unpacks it)
    agree."""
    node = graph.node(lse)
    if node.op != "attention_lse":
        return False
    upstream = {n for n in graph.live() if graph.node(n).op == "input"
                and graph.node(n).attr("name") == "grad_g"}
    calls = {"forward"}
    for n in graph.live():
        other = graph.node(n)
        if other.op not in ("attention", "attention_transposed", "attention_grad") or not (
                _same_scores(other, node)):
            continue
        if other.op == "attention":
            if upstream & graph.ancestors([n]):
                calls.add("backward forward")
        elif attention_operands(other).get("lse") == lse:
            calls.add(other.op)
    return len(calls) >= PROBS_MIN_CALLS


def _keeps(em: Emitter, lse: int) -> bool:
    """Whether this function's call makes the kept weights of ``lse``: not when decoding (at a
    position after a prefix), where no backward reads them."""
    return not em.position and keeps_probs(em.graph, lse)


def _probs_arg(em: Emitter, node: Node, lse: int | None = None) -> str:
    """``, probs=<name>_p`` where a log-sum-exp over ``node``'s scores (``lse``, or any named
    one) keeps its weights and is named; else nothing."""
    known = [lse] if lse is not None else _siblings(em, node, "attention_lse")
    for n in known:
        if n in em.names and keeps_probs(em.graph, n) and _same_scores(em.graph.node(n), node):
            return f", probs={em.names[n]}_p"
    return ""


def _ready_attention(em: Emitter, node: Node) -> list[int]:
    """The attention nodes of this function over ``node``'s scores, not yet printed, whose values
    are ready: the ones one forward call can serve."""
    return [n for n in sorted(em.region) if n not in em.names
            and em.graph.node(n).op == "attention" and _same_scores(em.graph.node(n), node)
            and attention_operands(em.graph.node(n))["v"] in em.names]


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
                or not _same_scores(other, node) or attention_operands(other)["lse"] != lse):
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
EMITTERS = {
    ops.Input: _emit_leaf,
    ops.Param: _emit_leaf,
    ops.Hyper: _emit_leaf,
    ops.Const: _emit_const,
    ops.Offset: _emit_offset,
    ops.Contract: _emit_contract,
    ops.Pointwise: _emit_pointwise,
    ops.Reduce: _emit_reduce,
    ops.FusedReduce: _emit_fused_reduce,
    ops.Mask: _emit_mask,
    ops.Broadcast: _emit_broadcast,
    ops.Relabel: _emit_relabel,
    ops.Rotary: _emit_rotary,
    ops.Attention: _emit_attention,
    ops.AttentionLse: _emit_attention_lse,
    ops.AttentionTransposed: _emit_attention_transposed,
    ops.AttentionGrad: _emit_attention_grad,
    **PAIR_EMITTERS,
}


def einsum_letters(dims: tuple[str, ...]) -> dict[str, str]:
    """One einsum letter per axis: b, i, j, then each dim's lower-case initial when free."""
    letters = {"b": "b", "i": "i", "j": "j"}
    taken = set(letters.values())
    pool = string.ascii_lowercase + string.ascii_uppercase  # what einsum accepts
    for d in (*dims, UNIT):
        c = d[0].lower()
        if c in taken or c not in pool:
            c = next((ch for ch in pool if ch not in taken), None)
            if c is None:
                raise CompileError(f"too many dims for one einsum: {len(dims)} (at most "
                                   f"{len(pool) - 3})", None)
        letters[d] = c
        taken.add(c)
    return letters


def full_output(em: Emitter, nid: int | None, axes: tuple[str, ...], order: tuple[str, ...]) -> str:
    """Expression of ``nid`` expanded to ``axes`` (canonical) and permuted to ``order``."""
    if nid is None:
        return "None"
    node_axes = em.graph.node(nid).axes
    expr = em.names[nid]
    if em.printed_order.get(nid) == tuple(order):  # printed in the returned order already
        return expr
    if node_axes != axes:
        if not node_axes:
            expr = f"torch.as_tensor({expr}).expand({', '.join(em.size(a) for a in axes)})"
        else:
            expr = f"{em.align(nid, axes)}.expand({', '.join(em.size(a) for a in axes)})"
    if tuple(order) != tuple(axes):
        perm = ", ".join(str(axes.index(a)) for a in order)
        expr = f"{expr}.permute({perm})"
    return expr
