"""The graph passes: each pass and each canonicalisation rule, structurally and numerically.

Structural tests count nodes and ops (``Graph.op_counts``) on a tiny hand-built graph before and
after; numeric tests check that every output keeps its axes and its value, using the op
table's reference evaluation (``energyc/ir/evaluate.py``). The last tests run the whole pipeline with ``verify=True`` on
every example energy file, and compare the example graphs' values before and after it.
"""

from __future__ import annotations

import importlib

import pytest
import sympy
import torch

from energyc.autodiff import vjp
from energyc.compiler import _energy_subgraph, compile_file, differentiate
from energyc.context import all_tokens, causal, not_self, strict, window
from energyc.ir import ops
from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS
from energyc.loader import load
from energyc.passes import PIPELINE, run_pipeline
from energyc.passes.canonicalize import RULES, canonicalize
from energyc.passes.cse import cse, dead_code
from energyc.passes.fuse import fuse_pointwise, fuse_reductions
from energyc.passes.share import reuse_values, share_subexpressions
from tests.conftest import example_files
from tests.test_ops import evaluate, expand_to, random_env

# the module, not the function that energyc.passes re-exports under the same name
canonicalize_module = importlib.import_module("energyc.passes.canonicalize")

a0, a1, a2, a3 = ARG_SYMBOLS[:4]
DIMS = ("D", "H")
SIZES = {"b": 2, "i": 4, "j": 4, "D": 3, "H": 2, "K": 2, "M": 3, "R": 2}


def new_graph(dims=DIMS) -> Graph:
    return Graph(dims)


def inp(g: Graph, name: str, axes) -> int:
    return g.add("input", name=name, axes=g.canonical(axes))


def duplicate(g: Graph, nid: int) -> int:
    """A second node equal to ``nid``, bypassing hash-consing (what CSE exists to merge)."""
    node = g.node(nid)
    del g._by_key[node.key]
    dup = g.add(node.op, node.inputs, where=node.where, **dict(node.attrs))
    assert dup != nid
    return dup


def assert_same_outputs(before: Graph, after: Graph, sizes=SIZES, seed: int = 0) -> None:
    """Both graphs verify, and every output of ``before`` is an output of ``after`` with the same
    axes and values."""
    before.verify()
    after.verify()
    assert set(after.outputs) == set(before.outputs)
    env = random_env(before, seed, sizes)
    cb: dict = {}
    ca: dict = {}
    for name, n in before.outputs.items():
        m = after.outputs[name]
        assert after.node(m).axes == before.node(n).axes, name
        want = evaluate(before, n, env, sizes, cb)
        got = evaluate(after, m, env, sizes, ca)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")


def only_rule(monkeypatch, name: str) -> None:
    """Let canonicalize apply the rule ``name`` alone."""
    rules = [r for r in RULES if r[0] == name]
    assert len(rules) == 1, name
    monkeypatch.setattr(canonicalize_module, "RULES", rules)


def n_live(g: Graph) -> int:
    return len(g.live())


# -- coverage of the tables --------------------------------------------------------------------------

TESTED_PASSES = {"dead_code", "canonicalize", "cse", "fuse_pointwise", "fuse_context_attention",
                 "share_subexpressions", "reuse_values", "fuse_reductions",
                 "fuse_pair_reductions",  # pairs: test_pairs.py
                 "fold_score_scales", "fuse_context_lse",  # test_attention_fusion.py
                 "split_context_sums", "expand_feature_sums", "log_sums_as_lse"}
TESTED_RULES = {"broadcast_into_pointwise", "pointwise_of_mask", "pointwise_normalise",
                "contract_normalise", "relabel_identity", "mask_idempotent"}


def test_every_pass_and_rule_has_tests_here():
    """Each pass function in PIPELINE and each rule in RULES is one this file tests."""
    assert {fn.__name__ for _, fn in PIPELINE} <= TESTED_PASSES
    assert {name for name, _, _ in RULES} <= TESTED_RULES


# -- dead_code -------------------------------------------------------------------------------------


def dead_code_graph():
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    W = g.add("param", name="W", axes=("D", "H"))
    y = ops.contract(g, [x, W], ("b", "i", "H"))
    ops.pointwise(g, sympy.exp(a0), [y])  # unused
    ops.reduce(g, x, ["D"])  # unused
    g.add("offset")  # unused
    g.outputs = {"y": ops.pointwise(g, sympy.tanh(a0), [y])}
    return g


def test_dead_code_drops_unused_nodes():
    """dead_code keeps exactly the nodes reachable from the outputs."""
    g = dead_code_graph()
    assert len(g) == 7 and n_live(g) == 4
    out = dead_code(g)
    out.verify()
    assert len(out) == 4
    assert out.op_counts(live_only=False) == {"contract": 1, "input": 1, "param": 1,
                                              "pointwise": 1}
    assert g.op_counts(live_only=False)["pointwise"] == 2


def test_dead_code_keeps_values():
    """dead_code leaves every output's value unchanged."""
    g = dead_code_graph()
    assert_same_outputs(g, dead_code(g))


# -- cse -------------------------------------------------------------------------------------------


def cse_graph():
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    W = g.add("param", name="W", axes=("D", "H"))
    y1 = ops.contract(g, [x, W], ("b", "i", "H"))
    y2 = duplicate(g, y1)
    e1 = ops.pointwise(g, sympy.exp(a0), [y1])
    e2 = ops.pointwise(g, sympy.exp(a0), [y2])  # equal to e1 once y2 is merged into y1
    g.outputs = {"s": ops.pointwise(g, a0 * a1, [e1, e2]), "e2": e2}
    return g


def test_cse_merges_duplicates():
    """cse merges equal nodes, and then the nodes that become equal through them."""
    g = cse_graph()
    before = g.op_counts()
    assert before == {"contract": 2, "input": 1, "param": 1, "pointwise": 3}
    out = cse(g)
    out.verify()
    assert out.op_counts() == {"contract": 1, "input": 1, "param": 1, "pointwise": 2}
    assert out.node(out.outputs["s"]).inputs == (out.outputs["e2"],) * 2


def test_cse_keeps_values():
    """cse leaves every output's value unchanged."""
    g = cse_graph()
    assert_same_outputs(g, cse(g))


# -- fuse_pointwise --------------------------------------------------------------------------------


def fuse_graph():
    """x -> tanh -> (* p + 1) -> exp: three single-use pointwise nodes, then a reduction."""
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    p = g.add("param", name="p", axes=("D",))
    t = ops.pointwise(g, sympy.tanh(a0), [x])
    u = ops.pointwise(g, a0 * a1 + 1, [t, p])
    e = ops.pointwise(g, sympy.exp(a0), [u])
    g.outputs = {"y": ops.reduce(g, e, ["D"])}
    return g


def test_fuse_pointwise_collapses_a_chain():
    """fuse_pointwise turns a chain of three single-use pointwise nodes into one."""
    g = fuse_graph()
    assert g.op_counts()["pointwise"] == 3
    out = fuse_pointwise(g)
    out.verify()
    assert out.op_counts() == {"input": 1, "param": 1, "pointwise": 1, "reduce": 1}
    (fused,) = [n for n in out.live() if out.node(n).op == "pointwise"]
    assert len(out.node(fused).inputs) == 2  # x and p


def test_fuse_pointwise_keeps_shared_values_and_outputs():
    """A pointwise value used twice, or itself an output, is not inlined into its users."""
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    t = ops.pointwise(g, sympy.tanh(a0), [x])  # two users
    u = ops.pointwise(g, 2 * a0, [t])
    v = ops.pointwise(g, sympy.exp(a0), [t])
    w = ops.pointwise(g, a0 * a1, [u, v])  # u, v single-use: absorbed
    z = ops.pointwise(g, a0 + 1, [w])
    g.outputs = {"w": w, "z": z}
    out = fuse_pointwise(g)
    out.verify()
    # t stays (shared), w stays (an output), u and v are absorbed into w
    assert g.op_counts()["pointwise"] == 5
    assert out.op_counts()["pointwise"] == 3
    assert_same_outputs(g, out)


def test_fuse_pointwise_keeps_values():
    """fuse_pointwise leaves every output's value unchanged (mixed axes among the args)."""
    g = fuse_graph()
    assert_same_outputs(g, fuse_pointwise(g))


# -- fuse_reductions -------------------------------------------------------------------------------


def reduction_graph(mask=causal(), kind="lse"):  # noqa: B008 (an immutable Context)
    """exp-free score s = a * u + p over (b, i, j, H), reduced over j in C(i), then -r / a + w."""
    g = new_graph()
    u = inp(g, "u", ("b", "i", "j", "H"))
    p = g.add("param", name="p", axes=("H",))
    w = inp(g, "w", ("b", "i"))
    a = g.add("hyper", name="a")
    s = ops.pointwise(g, a0 * a1 + a2, [a, u, p])
    r = ops.reduce(g, s, ["j"], kind=kind, mask=mask)
    h = ops.reduce(g, r, ["H"])
    g.outputs = {"y": ops.pointwise(g, -a0 / a1 + a2, [h, a, w])}
    return g


def test_fuse_reductions_joins_prologue_and_epilogue():
    """Prologue and epilogue join their reduction: 3 pointwise + 2 reduce -> 2 fused_reduce, so a
    backend runs two kernels where it ran five."""
    g = reduction_graph()
    assert g.op_counts()["pointwise"] == 2 and g.op_counts()["reduce"] == 2
    out = dead_code(fuse_reductions(g))
    out.verify()
    counts = out.op_counts()
    assert counts.get("pointwise", 0) == 0 and counts.get("reduce", 0) == 0
    assert counts["fused_reduce"] == 2
    first, second = [n for n in out.live() if out.node(n).op == "fused_reduce"]
    assert out.node(first).attr("n_pre") == 3  # a, u, p evaluated inside the reduction
    assert out.node(second).attr("post") != a0  # -r / a + w is the epilogue
    assert_same_outputs(g, out)


@pytest.mark.parametrize("kind", ["sum", "lse"])
@pytest.mark.parametrize("mask", [causal(), strict(), window(2), not_self(), None])
def test_fuse_reductions_keeps_values(kind, mask):
    """Every context set and both kinds keep their values through the pass."""
    g = reduction_graph(mask, kind)
    assert_same_outputs(g, dead_code(fuse_reductions(g)))


def test_fuse_reductions_keeps_shared_values():
    """A pointwise value with a second user stays stored; a reduction that is an output stays."""
    g = new_graph()
    u = inp(g, "u", ("b", "i", "D"))
    e = ops.pointwise(g, sympy.exp(a0), [u])
    r = ops.reduce(g, e, ["D"])
    g.outputs = {"r": r, "z": ops.pointwise(g, a0 * a1, [e, r]),
                 "q": ops.pointwise(g, a0 + 1, [r])}
    out = dead_code(fuse_reductions(g))
    counts = out.op_counts()
    assert counts["reduce"] == 1 and counts["pointwise"] == 3 and "fused_reduce" not in counts
    assert_same_outputs(g, out)


# -- fuse_context_attention ------------------------------------------------------------------------


def attention_region(mask=causal(), scores="plain", role="query"):  # noqa: B008 (an immutable Context)
    """o = sum_{j in C(i)} c_i exp(S_ij - L_i) v_j (query role) or sum_{i : j in C(i)} of the same
    weights times v_i (key role), L = lse_j S, with scores S:

    plain: beta q . k (beta fixed); alibi: beta q . k - m_H (i - j) (beta learned, slopes m);
    dplr: beta (q . k + (d x_i) . x_j) (a second term whose key lacks the head axis)."""
    g = Graph(("H", "K", "D"))
    q = inp(g, "q", ("b", "i", "H", "K"))
    k = inp(g, "k", ("b", "j", "H", "K"))
    v = inp(g, "v", ("b", "j" if role == "query" else "i", "H", "D"))
    c = inp(g, "c", ("b", "i", "H"))
    beta = g.add("hyper", name="beta", learnable=scores == "alibi")
    qk = ops.contract(g, [q, k], ("b", "i", "j", "H"))
    if scores == "plain":
        S = ops.pointwise(g, a0 * a1, [beta, qk])
    elif scores == "alibi":
        m = g.add("param", name="m", axes=("H",))
        S = ops.pointwise(g, a0 * a1 - a2 * a3, [beta, qk, m, g.add("offset")])
    else:
        d = g.add("param", name="d", axes=("H", "D"))
        xq = ops.pointwise(g, a0 * a1, [d, inp(g, "x", ("b", "i", "D"))])
        xk = inp(g, "xk", ("b", "j", "D"))
        S = ops.pointwise(g, a0 * (a1 + a2), [beta, qk, ops.contract(g, [xq, xk], ("b", "i", "j", "H"))])
    L = ops.reduce(g, S, ["j"], kind="lse", mask=mask)
    P = ops.pointwise(g, a2 * sympy.exp(a0 - a1), [S, L, c])
    weights = g.add("mask", (P,), mask=mask) if mask != all_tokens() else P
    out = ("b", "i", "H", "D") if role == "query" else ("b", "j", "H", "D")
    g.outputs = {"o": ops.contract(g, [weights, v], out)}
    return g


def fuse_attention(g: Graph) -> Graph:
    """The attention pass on a region whose log-sum-exps are left to it where their scores are
    the attention kernels' (as the pair pass leaves an energy's)."""
    from energyc.passes.attention import (
        attention_scores,
        fuse_context_attention,
        leave_to_attention,
    )

    left = g.rewritten(lambda new, mapping, n: leave_to_attention(g, new, mapping, n)
                       if attention_scores(g, n) else None)
    return dead_code(fuse_context_attention(left))


def pair_values(g: Graph) -> list[int]:
    return [n for n in g.live() if {"i", "j"} <= set(g.node(n).axes)]


needs_attention = pytest.mark.skipif(
    "fuse_context_attention" not in {fn.__name__ for _, fn in PIPELINE},
    reason="no attention fusion pass in this tree")


@pytest.mark.parametrize("body,contracts", [
    ((a0 - a1) ** 2, 1),  # q^2 - 2 q k + k^2: one contraction, a reduce of each side
    (a2 * (a0 + a1 + 1) ** 2, 1),  # a per-feature weight, on the side of its token factor
    ((a0 - a1 + 1) ** 2, 1),  # a constant: |F| times it
    (a0 * a1 * a1, 1),  # q k^2
])
def test_expand_feature_sums(body, contracts):
    """expand_feature_sums: sum_F body(q_iF, k_jF, w_F) of a polynomial body becomes
    contractions over F of a query-side and a key-side monomial, sums over F of one side, and
    |F| times what carries no F; the value is kept and nothing over (i, j, F) is left. A body
    that is not a polynomial is left as it is."""
    from energyc.passes.pairs import expand_feature_sums

    g = Graph(("H", "K"))
    q = inp(g, "q", ("b", "i", "H", "K"))
    k = inp(g, "k", ("b", "j", "H", "K"))
    w = g.add("param", name="w", axes=("K",))
    summand = ops.pointwise(g, body, [q, k, w])
    g.outputs = {"s": ops.reduce(g, summand, ["K"])}
    out = dead_code(expand_feature_sums(g))
    assert out.op_counts().get("contract") == contracts
    assert not [n for n in out.live() if {"i", "j", "K"} <= set(out.node(n).axes)]
    assert_same_outputs(g, out)
    g.outputs = {"s": ops.reduce(g, ops.pointwise(g, sympy.tanh(a0 * a1), [q, k]), ["K"])}
    assert dead_code(expand_feature_sums(g)).op_counts() == dead_code(g).op_counts()


@pytest.mark.parametrize("mask,outer,gate,lse", [
    (causal(), sympy.log(a0), sympy.exp(a1), True),  # log sum exp(s)
    (window(2), sympy.log(1 + a0) * a1, sympy.exp(a1), True),  # log(1 + sum exp(s)) * c
    (None, sympy.log(a0), sympy.exp(a1) / (1 + sympy.exp(-a0)), True),  # a positive gate
    (strict(), sympy.log(a0), sympy.exp(a1), False),  # an empty first row: log 0 there
    (causal(), sympy.log(a0) + a0, sympy.exp(a1), False),  # the sum read outside a log
    (causal(), sympy.log(a0), a0**2 * sympy.exp(a1), False),  # a gate that may be 0
])
def test_log_sums_as_lse(mask, outer, gate, lse):
    """log_sums_as_lse: a log of a context sum of g exp(s) (g > 0), or of A + that (A > 0), over
    a set with no empty row, becomes a log-sum-exp of s + log g (and a softplus of it), with the
    same value; otherwise the graph is left as it is."""
    from energyc.passes.pairs import log_sums_as_lse

    g = Graph(("H",))
    s = inp(g, "s", ("b", "i", "j", "H"))
    c = inp(g, "c", ("b", "i", "H"))
    summand = ops.pointwise(g, gate, [inp(g, "u", ("b", "j", "H")), s])
    total = ops.reduce(g, summand, ["j"], kind="sum", mask=mask)
    g.outputs = {"e": ops.pointwise(g, outer, [total, c])}
    out = dead_code(log_sums_as_lse(g))
    kinds = [out.node(n).attr("kind") for n in out.live() if out.node(n).op == "reduce"]
    assert kinds == (["lse"] if lse else ["sum"])
    assert_same_outputs(g, out)


def test_expand_feature_sums_of_a_contraction():
    """The same expansion where the sum over F is a contraction of pair values with each other
    (dot(q_i - k_j, q_i - k_j, over=K)) or with a one-token value; a contraction of one-token
    values alone (q_i . k_j, already a leaf of the pair form) is left as it is."""
    from energyc.passes.pairs import expand_feature_sums

    g = Graph(("H", "K"))
    q = inp(g, "q", ("b", "i", "H", "K"))
    k = inp(g, "k", ("b", "j", "H", "K"))
    diff = ops.pointwise(g, a0 - a1, [q, k])
    g.outputs = {"d2": ops.contract(g, [diff, diff], ("b", "i", "j", "H")),
                 "qd": ops.contract(g, [q, diff], ("b", "i", "j", "H")),
                 "qk": ops.contract(g, [q, k], ("b", "i", "j", "H"))}
    out = dead_code(expand_feature_sums(g))
    assert not [n for n in out.live() if {"i", "j", "K"} <= set(out.node(n).axes)]
    assert out.node(out.outputs["qk"]).op == "contract"
    assert_same_outputs(g, out)


def two_reductions_region(second_mask=window(1), slope=False):  # noqa: B008 (an immutable Context)
    """o = sum_j (mask_A(c exp(S - L_A)) + mask_B(exp(S' - L_B)))_ij v_j: the weights of two
    log-sum-exps of one score tensor S (S' = S, or S - m (i - j) on the same set) summed before
    the product with v, as the gradient of shared scores sums them."""
    g = Graph(("H", "K", "D"))
    q = inp(g, "q", ("b", "i", "H", "K"))
    k = inp(g, "k", ("b", "j", "H", "K"))
    v = inp(g, "v", ("b", "j", "H", "D"))
    c = inp(g, "c", ("b", "i", "H"))
    beta = g.add("hyper", name="beta")
    S = ops.pointwise(g, a0 * a1, [beta, ops.contract(g, [q, k], ("b", "i", "j", "H"))])
    S2 = S
    if slope:
        m = g.add("param", name="m", axes=("H",))
        S2 = ops.pointwise(g, a0 - a1 * a2, [S, m, g.add("offset")])
    weights = []
    for scores, mask, factor in ((S, causal(), c), (S2, second_mask, None)):
        L = ops.reduce(g, scores, ["j"], kind="lse", mask=mask)
        P = (ops.pointwise(g, a2 * sympy.exp(a0 - a1), [scores, L, factor]) if factor is not None
             else ops.pointwise(g, sympy.exp(a0 - a1), [scores, L]))
        weights.append(g.add("mask", (P,), mask=mask))
    summed = ops.pointwise(g, a0 * (a1 + a2), [beta, *weights])
    g.outputs = {"o": ops.contract(g, [summed, v], ("b", "i", "H", "D"))}
    return g


@needs_attention
@pytest.mark.parametrize("second_mask,slope", [(window(1), False), (causal(), True)])
def test_split_context_sums(second_mask, slope):
    """split_context_sums: the product of the summed weights of two reductions becomes one
    product per reduction (the mask outermost, the weights' body composed in), with the same
    value; the attention pass then takes both (two attention nodes, nothing over (i, j)); as
    it stands, it cannot, which is an error for weights of log-sum-exps left to it. A sum of
    one reduction's weights is left as it is."""
    from energyc.errors import CompileError
    from energyc.passes.attention import split_context_sums

    g = two_reductions_region(second_mask, slope)
    with pytest.raises(CompileError, match="did not fuse into attention"):
        fuse_attention(g)  # not as it stands
    split = dead_code(split_context_sums(g))
    assert split.op_counts()["contract"] == 3  # q . k and one product per reduction
    assert_same_outputs(g, split)
    out = fuse_attention(split)
    assert out.op_counts().get("attention") == 2 and pair_values(out) == []
    assert_same_outputs(g, out)
    one = attention_region(causal())
    assert dead_code(split_context_sums(one)).op_counts() == dead_code(one).op_counts()


@needs_attention
@pytest.mark.parametrize("mask", [causal(), all_tokens()], ids=str)
def test_fuse_context_attention_structure(mask):
    """fuse_context_attention turns a softmax-weighted context sum into one attention node: no
    (i, j) value is left live."""
    g = attention_region(mask)
    assert pair_values(g) and "attention" not in g.op_counts()
    out = fuse_attention(g)
    out.verify()
    assert out.op_counts().get("attention") == 1
    assert pair_values(out) == []


@needs_attention
@pytest.mark.parametrize("mask", [strict(), window(2), not_self()], ids=str)
def test_fuse_context_attention_covers_every_context_set(mask):
    """Every context set fuses, j < i (whose first row is empty) included."""
    g = attention_region(mask)
    out = fuse_attention(g)
    assert out.op_counts().get("attention") == 1
    assert_same_outputs(g, out)


@needs_attention
@pytest.mark.parametrize("mask", [causal(), all_tokens(), strict()], ids=str)
def test_fuse_context_attention_keeps_values(mask):
    """fuse_context_attention leaves every output's axes and value unchanged."""
    g = attention_region(mask)
    assert_same_outputs(g, fuse_attention(g))


@needs_attention
@pytest.mark.parametrize("role", ["query", "key"])
@pytest.mark.parametrize("scores", ["plain", "alibi", "dplr"])
@pytest.mark.parametrize("mask", [causal(), window(2), not_self()], ids=str)
def test_fuse_context_attention_scores_and_roles(mask, scores, role):
    """Scores with an i - j term (learned slopes, learned scale) and two-term (diagonal plus low
    rank) scores fuse too, in the query role (attention) and the key role (transposed attention,
    with its saved normaliser): no (i, j) value is left, and the values are unchanged."""
    g = attention_region(mask, scores, role)
    out = fuse_attention(g)
    out.verify()
    op = "attention" if role == "query" else "attention_transposed"
    counts = out.op_counts()
    assert counts.get(op) == 1 and counts.get("attention_lse", 0) == (role == "key")
    assert pair_values(out) == []
    node = next(out.node(n) for n in out.live() if out.node(n).op == op)
    assert node.attr("bias") == (scores == "alibi")
    assert len(node.attr("features")) == (2 if scores == "dplr" else 1)
    assert_same_outputs(g, out)


@needs_attention
def test_fuse_context_attention_leaves_other_scores():
    """Scores that are not linear in the contraction (here tanh(q . k)) stay materialised."""
    g = Graph(("H", "K", "D"))
    q, k = inp(g, "q", ("b", "i", "H", "K")), inp(g, "k", ("b", "j", "H", "K"))
    v = inp(g, "v", ("b", "j", "H", "D"))
    S = ops.pointwise(g, sympy.tanh(a0), [ops.contract(g, [q, k], ("b", "i", "j", "H"))])
    L = ops.reduce(g, S, ["j"], kind="lse", mask=causal())
    P = g.add("mask", (ops.pointwise(g, sympy.exp(a0 - a1), [S, L]),), mask=causal())
    g.outputs = {"o": ops.contract(g, [P, v], ("b", "i", "H", "D"))}
    out = fuse_attention(g)
    assert "attention" not in out.op_counts() and pair_values(out)


# -- canonicalize: one rule at a time --------------------------------------------------------------


def broadcast_graph():
    g = new_graph()
    u = inp(g, "u", ("b", "i"))
    v = inp(g, "v", ("b", "i", "D"))
    s = g.add("param", name="s", axes=("H",))
    bu = g.add("broadcast", (u,), out=("b", "i", "D"))
    keep = g.add("broadcast", (u,), out=("b", "i", "H"))
    g.outputs = {
        "y": ops.pointwise(g, a0 * sympy.exp(a1), [bu, v]),
        "alone": ops.pointwise(g, sympy.tanh(a0), [keep]),  # the only arg: must keep its axes
        "z": ops.pointwise(g, a0 - a1, [keep, s]),
    }
    return g


def test_broadcast_into_pointwise_structure(monkeypatch):
    """f(broadcast(u), v) => f(u, v) when the other args carry the broadcast axes; a broadcast
    that alone gives the result its axes stays."""
    only_rule(monkeypatch, "broadcast_into_pointwise")
    g = broadcast_graph()
    assert g.op_counts()["broadcast"] == 2
    out = canonicalize(g)
    out.verify()
    assert out.op_counts()["broadcast"] == 1
    y = out.node(out.outputs["y"])
    assert [out.node(a).op for a in y.inputs] == ["input", "input"]
    assert out.node(out.node(out.outputs["alone"]).inputs[0]).op == "broadcast"
    assert out.node(out.node(out.outputs["z"]).inputs[0]).op == "input"  # s brings H


def test_broadcast_into_pointwise_keeps_values(monkeypatch):
    """broadcast_into_pointwise leaves every output's axes and value unchanged."""
    only_rule(monkeypatch, "broadcast_into_pointwise")
    g = broadcast_graph()
    assert_same_outputs(g, canonicalize(g))


def test_broadcast_into_pointwise_two_broadcasts(monkeypatch):
    """f(broadcast(u), broadcast(v)) to (b, i, D), summed over D by a contraction: one broadcast
    at most may go, and the value sum_D f(u, v) w = D f(u, v) w must not change."""
    only_rule(monkeypatch, "broadcast_into_pointwise")
    g = new_graph()
    u = inp(g, "u", ("b", "i"))
    v = inp(g, "v", ("b", "i"))
    w = inp(g, "w", ("b", "i"))
    bu = g.add("broadcast", (u,), out=("b", "i", "D"))
    bv = g.add("broadcast", (v,), out=("b", "i", "D"))
    f = ops.pointwise(g, a0 + a1, [bu, bv])
    g.outputs = {"y": g.add("contract", (f, w), out=("b", "i"))}
    assert_same_outputs(g, canonicalize(g))


def mask_graph():
    g = new_graph()
    u = inp(g, "u", ("b", "i", "j", "H"))
    p = g.add("param", name="p", axes=("H",))
    beta = g.add("hyper", name="beta")
    m = g.add("mask", (u,), mask=causal())
    v = inp(g, "v", ("b", "i", "D"))
    mv = g.add("mask", (v,), mask=strict())
    g.outputs = {
        "linear": ops.pointwise(g, 2 * a0 * a1 * a2, [m, p, beta]),  # moves inside
        "affine": ops.pointwise(g, a0 + a1, [m, p]),  # f(0, p) != 0: stays
        "nonlinear": ops.pointwise(g, a0**2 * a1, [m, p]),  # not linear: stays
        "widening": ops.pointwise(g, a0 * a1, [mv, p]),  # p adds H: stays
    }
    return g


def test_pointwise_of_mask_structure(monkeypatch):
    """f(mask_C(u), c) => mask_C(f(u, c)) when f is linear in the masked arg and the other args add
    no axes; otherwise the node is left alone."""
    only_rule(monkeypatch, "pointwise_of_mask")
    g = mask_graph()
    out = canonicalize(g)
    out.verify()
    lin = out.node(out.outputs["linear"])
    assert lin.op == "mask" and lin.attr("mask") == causal()
    inner = out.node(lin.inputs[0])
    assert inner.op == "pointwise" and all(out.node(a).op != "mask" for a in inner.inputs)
    for name in ("affine", "nonlinear", "widening"):
        assert out.node(out.outputs[name]).op == "pointwise", name
    assert out.op_counts()["mask"] == g.op_counts()["mask"] + 1  # one new, both old still used


def test_pointwise_of_mask_keeps_values(monkeypatch):
    """pointwise_of_mask leaves every output's axes and value unchanged."""
    only_rule(monkeypatch, "pointwise_of_mask")
    g = mask_graph()
    assert_same_outputs(g, canonicalize(g))


def normalise_graph():
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    two = ops.const(g, 2)
    half = ops.const(g, sympy.Rational(1, 2) * sympy.Symbol("D"))
    g.outputs = {
        "const_arg": g.add("pointwise", (two, x), body=a0 * sympy.exp(a1)),
        "repeated": g.add("pointwise", (x, x), body=a0 * a1 + a0),
        "unused": g.add("pointwise", (x, two, half), body=a0 * a2 + 1),
        "identity": ops.reduce(g, g.add("pointwise", (x,), body=a0), ["D"]),
    }
    return g


def test_pointwise_normalise_structure(monkeypatch):
    """pointwise_normalise folds constant args, merges repeated args, drops unused ones and
    removes identity bodies."""
    only_rule(monkeypatch, "pointwise_normalise")
    g = normalise_graph()
    out = canonicalize(g)
    out.verify()
    x = next(n for n in out.live() if out.node(n).op == "input")
    for name in ("const_arg", "repeated", "unused"):
        assert out.node(out.outputs[name]).inputs == (x,), name
    assert out.node(out.outputs["const_arg"]).attr("body") == 2 * sympy.exp(a0)
    assert out.node(out.outputs["repeated"]).attr("body") == a0**2 + a0
    assert out.node(out.outputs["identity"]).inputs == (x,)
    assert "const" not in out.op_counts()
    assert g.op_counts()["pointwise"] == 4 and out.op_counts()["pointwise"] == 3


def test_pointwise_normalise_keeps_values(monkeypatch):
    """pointwise_normalise leaves every output's axes and value unchanged."""
    only_rule(monkeypatch, "pointwise_normalise")
    g = normalise_graph()
    assert_same_outputs(g, canonicalize(g))


def contract_graph():
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    W = g.add("param", name="W", axes=("D", "H"))
    three = ops.const(g, 3)
    g.outputs = {
        "scaled": g.add("contract", (three, x, W), out=("b", "i", "H")),
        "single": g.add("contract", (x,), out=("b", "i")),
        "plain": g.add("contract", (x, W), out=("b", "H")),
    }
    return g


def test_contract_normalise_structure(monkeypatch):
    """contract(c, u, v) => c * contract(u, v); contract(u) => sum(u); others unchanged."""
    only_rule(monkeypatch, "contract_normalise")
    g = contract_graph()
    assert g.op_counts() == {"const": 1, "contract": 3, "input": 1, "param": 1}
    out = canonicalize(g)
    out.verify()
    assert out.op_counts() == {"contract": 2, "input": 1, "param": 1, "pointwise": 1,
                               "reduce": 1}
    scaled = out.node(out.outputs["scaled"])
    assert scaled.op == "pointwise" and scaled.attr("body") == 3 * a0
    assert out.node(out.outputs["single"]).op == "reduce"
    assert out.node(out.outputs["plain"]).op == "contract"


def test_contract_normalise_keeps_values(monkeypatch):
    """contract_normalise leaves every output's axes and value unchanged."""
    only_rule(monkeypatch, "contract_normalise")
    g = contract_graph()
    assert_same_outputs(g, canonicalize(g))


def relabel_graph():
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    p = g.add("param", name="p", axes=("D",))
    xj = g.add("relabel", (x,), src="i", dst="j")
    back = g.add("relabel", (xj,), src="j", dst="i")
    g.outputs = {
        "round_trip": ops.pointwise(g, a0 * a1, [back, x]),
        "no_token": g.add("relabel", (p,), src="i", dst="j"),
        "kept": ops.reduce(g, xj, ["j"], mask=None),
    }
    return g


def test_relabel_identity_structure(monkeypatch):
    """relabel_{i->j}(u) => u when u lacks i; relabel_{j->i}(relabel_{i->j}(u)) => u."""
    only_rule(monkeypatch, "relabel_identity")
    g = relabel_graph()
    assert g.op_counts()["relabel"] == 3
    out = canonicalize(g)
    out.verify()
    assert out.op_counts()["relabel"] == 1  # the one under the reduction
    assert out.node(out.outputs["no_token"]).op == "param"
    rt = out.node(out.outputs["round_trip"])
    x = next(n for n in out.live() if out.node(n).op == "input")
    assert rt.inputs == (x, x)  # the round trip is gone (the pointwise rules are off here)


def test_relabel_identity_keeps_values(monkeypatch):
    """relabel_identity leaves every output's axes and value unchanged."""
    only_rule(monkeypatch, "relabel_identity")
    g = relabel_graph()
    assert_same_outputs(g, canonicalize(g))


def idempotent_graph():
    g = new_graph()
    u = inp(g, "u", ("b", "i", "j", "H"))
    v = inp(g, "v", ("b", "i", "D"))
    once = g.add("mask", (u,), mask=window(2))
    g.outputs = {
        "twice": g.add("mask", (once,), mask=window(2)),
        "different": g.add("mask", (g.add("mask", (v,), mask=causal()),), mask=not_self()),
    }
    return g


def test_mask_idempotent_structure(monkeypatch):
    """mask_C(mask_C(u)) => mask_C(u); masks by different sets both stay."""
    only_rule(monkeypatch, "mask_idempotent")
    g = idempotent_graph()
    assert g.op_counts()["mask"] == 4
    out = canonicalize(g)
    out.verify()
    assert out.op_counts()["mask"] == 3
    twice = out.node(out.outputs["twice"])
    assert twice.op == "mask" and out.node(twice.inputs[0]).op == "input"


def test_mask_idempotent_keeps_values(monkeypatch):
    """mask_idempotent leaves every output's axes and value unchanged."""
    only_rule(monkeypatch, "mask_idempotent")
    g = idempotent_graph()
    assert_same_outputs(g, canonicalize(g))


GRAPHS = [dead_code_graph, cse_graph, fuse_graph, broadcast_graph, mask_graph, normalise_graph,
          contract_graph, relabel_graph, idempotent_graph]


@pytest.mark.parametrize("make", GRAPHS, ids=[f.__name__ for f in GRAPHS])
def test_canonicalize_with_all_rules_keeps_values(make):
    """canonicalize with its full rule table leaves every output's axes and value unchanged and
    never grows the live graph of these examples."""
    g = make()
    out = canonicalize(g)
    out.verify()
    assert n_live(out) <= n_live(g) + 1  # pointwise_of_mask may add one mask
    assert_same_outputs(g, out)


@pytest.mark.parametrize("make", GRAPHS, ids=[f.__name__ for f in GRAPHS])
def test_pipeline_keeps_values(make):
    """run_pipeline(verify=True) leaves every output's axes and value unchanged."""
    g = make()
    assert_same_outputs(g, run_pipeline(g, verify=True))


# -- the pipeline on the examples ------------------------------------------------------------------


@pytest.mark.parametrize("path", example_files())
def test_pipeline_verifies_on_examples(path):
    """compile_file(verify=True) succeeds: every graph obeys its invariants after every pass."""
    layers = compile_file(load(path), verify=True)
    assert layers
    for layer in layers:
        assert "grad" in layer.step.outputs and "grad_x" in layer.step.outputs


@pytest.mark.parametrize("path", example_files())
def test_pipeline_keeps_example_values(path):
    """On each example: the energy, dE/dx and its VJP (second derivatives) have the same values
    before and after the pipeline, and dE/dx matches torch.autograd on the energy."""
    for decl in load(path).layers:
        sizes = {**SIZES, **{d: 3 for d in decl.file.graph.dims if d not in SIZES}}
        energy, e = _energy_subgraph(decl)
        energy.outputs = {"energy": e}
        assert_same_outputs(energy, run_pipeline(energy, verify=True), sizes)

        def first_order(fuse_pairs: bool, decl=decl) -> Graph:
            """dE/dx as the compiler builds it: the energy stage (pair fusion) first."""
            step, e = _energy_subgraph(decl)
            if fuse_pairs:
                step.outputs = {"energy": e}
                step = run_pipeline(step, verify=True, stages=("energy",))
                e = step.outputs["energy"]
            x = next(n for n in step.ids() if step.node(n).op == "input" and
                     step.node(n).attr("name") == "x")
            grad = vjp(step, e, ops.const(step, 1), [x])[x]
            x_axes = step.node(x).axes
            if step.node(grad).axes != x_axes:
                grad = step.add("broadcast", (grad,), out=x_axes)
            step.outputs = {"grad": grad}
            return step, e

        step, e = first_order(fuse_pairs=False)
        fused, _ = first_order(fuse_pairs=True)
        optimised = run_pipeline(fused, verify=True, stages=("simplify",))
        assert_same_outputs(step, optimised, sizes)

        env = random_env(step, 0, sizes)
        xt = env["x"].clone().requires_grad_(True)
        value = evaluate(step, e, {**env, "x": xt}, sizes)
        (want,) = torch.autograd.grad(value.sum(), [xt])
        got = evaluate(optimised, optimised.outputs["grad"], env, sizes)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)

        leaves = {optimised.node(n).attr("name"): n for n in optimised.live()
                  if optimised.node(n).op in ("input", "param", "hyper")}
        second = differentiate(optimised, [("grad", "grad_g")], leaves)
        assert_same_outputs(second, run_pipeline(second, verify=True, stages=("simplify", "lower")),
                            sizes)


def test_expand_to_aligns_missing_axes():
    """The helper used to compare values: a value lacking axes is constant along them."""
    v = torch.arange(3.0, dtype=torch.float64)
    out = expand_to(v, ("D",), ("b", "i", "D"), SIZES)
    assert out.shape == (2, 4, 3) and (out[1, 2] == v).all()


# -- share_subexpressions --------------------------------------------------------------------------


def shared_exp_graph():
    """Two bodies that both contain exp(u - v) (v broadcast over D), and one that does not."""
    g = new_graph()
    u = inp(g, "u", ("b", "i", "D"))
    v = inp(g, "v", ("b", "i"))
    w = inp(g, "w", ("b", "i", "D"))
    f = ops.pointwise(g, a2 * sympy.exp(a0 - a1), [u, v, w])
    h = ops.pointwise(g, sympy.exp(a0 - a1) + sympy.tanh(a2), [u, v, w])
    k = ops.pointwise(g, sympy.tanh(a0) * a1, [w, u])
    g.outputs = {"f": f, "h": h, "k": k}
    return g


def test_share_subexpressions_structure():
    """exp(u - v) in two bodies becomes one node; tanh(w) (in two bodies too) also; nothing else."""
    g = shared_exp_graph()
    out = share_subexpressions(g)
    bodies = [out.node(n).attr("body") for n in out.live() if out.node(n).op == "pointwise"]
    assert sum(b.has(sympy.exp) for b in bodies) == 1
    assert sum(b.has(sympy.tanh) for b in bodies) == 1
    assert out.op_counts()["pointwise"] == 5  # exp, tanh, and the three consumers


def test_share_subexpressions_keeps_values():
    """Computing the shared subexpression apart and broadcasting gives the same values."""
    g = shared_exp_graph()
    assert_same_outputs(g, share_subexpressions(g))


def test_share_subexpressions_no_sharing_is_identity():
    g = dead_code_graph()
    assert share_subexpressions(g).op_counts() == g.op_counts()


# -- reuse_values ----------------------------------------------------------------------------------


def gated_step_graph():
    """A gated unit's forward and the backward body that recomputes its product:
    t = -(s a) (forward, also read by the backward), n = -(s a g (1 - s)) (backward), and a
    forward-only value f = 2 exp(a) s whose product appears in the backward's m = exp(a) s g."""
    g = new_graph()
    a = inp(g, "a", ("b", "i", "D"))
    z = inp(g, "z", ("b", "i", "D"))
    up = inp(g, "grad_g", ("b", "i", "D"))  # the upstream gradient: the backward's side
    s = ops.pointwise(g, 1 / (1 + sympy.exp(-a0)), [z])
    t = ops.pointwise(g, -a0 * a1, [s, a])
    f = ops.pointwise(g, 2 * sympy.exp(a0) * a1, [a, s])
    n = ops.pointwise(g, -a0 * a1 * a2 * (1 - a0), [s, a, up])
    m = ops.pointwise(g, sympy.exp(a0) * a1 * a2, [a, s, up])
    r = ops.pointwise(g, a0 * a1, [t, up])  # the backward reads t anyway
    g.outputs = {"t": t, "f": f, "n": n, "m": m, "r": r}
    return g, t, n, m


def test_reuse_values_structure():
    """The backward body uses the saved product t (n = t g (1 - s)); the forward-only f is not
    kept for the backward (m still computes exp(a) s itself)."""
    g, t, n, m = gated_step_graph()
    out = reuse_values(g)
    n2, m2, t2 = out.outputs["n"], out.outputs["m"], out.outputs["t"]
    assert t2 in out.node(n2).inputs
    assert sympy.count_ops(out.node(n2).attr("body")) < sympy.count_ops(g.node(n).attr("body"))
    assert out.node(m2).attr("body") == g.node(m).attr("body")
    assert out.node(m2).inputs == g.node(m).inputs


def test_reuse_values_keeps_values():
    g, *_ = gated_step_graph()
    assert_same_outputs(g, reuse_values(g))


def test_reuse_values_no_reuse_is_identity():
    g = shared_exp_graph()
    out = reuse_values(g)
    assert out.op_counts() == g.op_counts()
    assert [out.node(n).attr("body") for n in out.live() if out.node(n).op == "pointwise"] == \
        [g.node(n).attr("body") for n in g.live() if g.node(n).op == "pointwise"]


def test_fuse_pointwise_expands_each_node_once():
    """A chain of n single-use pointwise nodes: each node's inlined body was computed again inside
    every later node's (cubic in n, 50 s of an energy of 300 terms; a RecursionError at some
    thousand nodes); now once per node, from its inputs' bodies."""
    g = new_graph()
    x = inp(g, "x", ("b", "i", "D"))
    y = x
    for _ in range(3000):
        y = ops.pointwise(g, a0 + 1, [y])
    g.outputs = {"y": ops.reduce(g, y, ["D"])}
    out = fuse_pointwise(g)
    (fused,) = [n for n in out.live() if out.node(n).op == "pointwise"]
    assert out.node(fused).attr("body") == a0 + 3000


def test_split_walks_the_saved_tensors_ancestors_once(monkeypatch):
    """compiler.split computed the ancestors of the saved tensors again for every live node not
    needed by the forward outputs: quadratic in the graph (6 s of a 300-term energy)."""
    from energyc.backends.lowering import split

    (layer,) = compile_file(load("examples/cem_mlp.py"))
    calls = []
    ancestors = Graph.ancestors
    monkeypatch.setattr(Graph, "ancestors", lambda g, roots: calls.append(1) or ancestors(g, roots))
    sp = split(layer.step, ["grad"], ["grad_g"])
    assert sp.forward and sp.backward and len(calls) <= 3  # live(), forward outputs, saved
