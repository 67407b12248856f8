"""Which attention log-sum-exps keep their weights P: one decision that lowering (which saves
``<name>_p`` beside a kept log-sum-exp) and the torch attention printing (which makes and passes
them) both read.

It is a function of the graph alone (how many calls read the same scores), so that the forward,
which makes and saves the weights, and the backward, which unpacks them, agree; whether P is
formed at run time is the runtime's (``probs_fit``: where the tokens fit one query block).
"""

from __future__ import annotations

from energyc.ir.graph import Graph, Node
from energyc.ir.ops import attention_operands

NOT_SCORES = ("v", "o", "lse", "g")  # the attention-family slots that are not score operands


def same_scores(a: Node, b: Node) -> bool:
    """Whether two attention-family nodes have the same scores (operands, context set)."""
    ia, ib = attention_operands(a), attention_operands(b)
    keep = [name for name in ia if name not in NOT_SCORES]
    return ([ia[n] for n in keep] == [ib.get(n) for n in keep] and
            all(a.attr(x) == b.attr(x) for x in ("mask", "features", "heads", "bias")))


# A log-sum-exp whose scores this many calls read, its forward's included, keeps the attention
# weights P (``probs``): the runtime may form them once in the forward (where the tokens fit
# one query block, ``_rt.probs_fit``) and each later call multiplies by them. With fewer
# calls (a forward and its backward) P costs more than the flash kernels' recomputation
# (measured on the 2-core machine of benchmarks/RESULTS.md at 64-256 tokens: a forward and a
# backward 1.1-2x slower with P kept; the Energy Transformer's four calls 1.4-2x faster).
PROBS_MIN_CALLS = 3


def keeps_probs(graph: Graph, lse: int) -> bool:
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
                same_scores(other, node)):
            continue
        if other.op == "attention":
            if upstream & graph.ancestors([n]):
                calls.add("backward forward")
        elif attention_operands(other).get("lse") == lse:
            calls.add(other.op)
    return len(calls) >= PROBS_MIN_CALLS
