"""The op table: every VJP rule against torch.autograd, the shape rules, verify and hash-consing.

Each test builds a tiny :class:`~energyc.ir.graph.Graph` by hand, differentiates it with
:func:`energyc.autodiff.vjp` seeded by an ``input`` node, and compares the value of the gradient
graph with ``torch.autograd`` applied to the value of the forward graph (float64, B=2, T=4).

Values are computed by :func:`evaluate`, the op table's reference evaluation
(:mod:`energyc.ir.evaluate`: each op from its definition, sharing no code with the backends or the
runtime; its docstring says how masks, bodies and pairs are evaluated).
"""

from __future__ import annotations

import pytest
import sympy
import torch

from energyc.autodiff import vjp
from energyc.context import Context, all_tokens, causal, not_self, strict, window
from energyc.errors import CompileError
from energyc.ir import evaluate as reference
from energyc.ir import ops
from energyc.ir.functions import relu, sigmoid, softplus
from energyc.ir.graph import Graph
from energyc.ir.ops import ARG_SYMBOLS

a0, a1, a2, a3 = ARG_SYMBOLS[:4]
DTYPE = torch.float64
DIMS = ("D", "H", "K")
#: axis -> size for the tests' graphs (b and i, j are B and T).
SIZES = {"b": 2, "i": 4, "j": 4, "D": 3, "H": 2, "K": 5, "F": 4}
MASKS = [causal(), strict(), window(2), all_tokens(), not_self()]
LEAF_OPS = ("input", "param", "hyper")

# -- the op table's reference evaluation (energyc.ir.evaluate), in float64 ----------------------


def context_mask(mask: tuple, T: int) -> torch.Tensor:
    """The (i, j) boolean matrix of a context set, from its definition."""
    return reference.context_mask(mask, T)


def expand_to(value: torch.Tensor, axes: tuple, to_axes: tuple, sizes=SIZES) -> torch.Tensor:
    """``value`` broadcast to the full shape of ``to_axes`` (constant along axes it lacks)."""
    return reference.align(value, axes, to_axes).expand([sizes[a] for a in to_axes])


def evaluate(graph: Graph, node_id: int, env: dict, sizes: dict = SIZES, cache=None):
    """The value of ``node_id``: a tensor of the full shape of its axes (canonical order).

    ``env`` maps the names of input, param and hyper leaves to tensors; ``cache`` (a dict) may be
    shared between calls on the same graph and env.
    """
    return reference.evaluate(graph, node_id, env, sizes, dtype=DTYPE, cache=cache)


def random_env(graph: Graph, seed: int = 0, sizes: dict = SIZES) -> dict[str, torch.Tensor]:
    """A random value for every input, param and hyper leaf (hypers in [0.5, 1.5])."""
    gen = torch.Generator().manual_seed(seed)
    env = {}
    for n in graph.ids():
        node = graph.node(n)
        if node.op not in LEAF_OPS or node.attr("name") in env:
            continue
        shape = [sizes[a] for a in node.axes]
        if node.op == "hyper":
            env[node.attr("name")] = 0.5 + torch.rand((), generator=gen, dtype=DTYPE)
        else:
            env[node.attr("name")] = torch.randn(shape, generator=gen, dtype=DTYPE)
    return env


# -- the VJP check ---------------------------------------------------------------------------------


def new_graph() -> Graph:
    return Graph(DIMS)


def leaf(graph: Graph, op: str, name: str, axes=()) -> int:
    if op == "hyper":
        return graph.add("hyper", name=name)
    return graph.add(op, name=name, axes=graph.canonical(axes))


def check_vjp(graph: Graph, out: int, wrt: list[int], seed: int = 0,
              seed_name: str = "seed") -> dict[int, int | None]:
    """``vjp(out, s, wrt)`` equals ``torch.autograd.grad(out, wrt, grad_outputs=s)``.

    ``s`` is a random upstream seed with the axes of ``out``. A gradient node must not have axes
    its value lacks; it may lack some (it is then constant along them) and is expanded before the
    comparison.
    """
    s = graph.add("input", name=seed_name, axes=graph.node(out).axes)
    grads = vjp(graph, out, s, wrt)
    graph.verify()
    env = random_env(graph, seed)
    names = [graph.node(w).attr("name") for w in wrt]
    tracked = dict(env)
    for name in names:
        tracked[name] = env[name].clone().requires_grad_(True)
    y = evaluate(graph, out, tracked)
    expected = torch.autograd.grad(y, [tracked[name] for name in names], grad_outputs=env[seed_name],
                                   allow_unused=True)
    for w, name, want in zip(wrt, names, expected):
        got_id = grads[w]
        if got_id is None:
            assert want is None or not want.any(), f"no gradient for {name}"
            continue
        got_axes = graph.node(got_id).axes
        w_axes = graph.node(w).axes
        assert set(got_axes) <= set(w_axes), f"grad of {name} has axes {got_axes} beyond {w_axes}"
        got = expand_to(evaluate(graph, got_id, env), got_axes, w_axes)
        want = torch.zeros_like(got) if want is None else want
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10,
                                   msg=lambda m, name=name: f"d/d{name}: {m}")
    return grads


# -- VJP rules, one op at a time -------------------------------------------------------------------


def test_vjp_contract_matmul():
    """contract: du_m = einsum(g, u_{l != m}) for q_bih = sum_D W_HD x_biD (both operands)."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    W = leaf(g, "param", "W", ("H", "D"))
    out = g.add("contract", (x, W), out=("b", "i", "H"))
    check_vjp(g, out, [x, W])


def test_vjp_contract_three_operands_with_private_summed_axis():
    """contract of three operands to (i, j); K appears in P only, so dP is constant along K."""
    g = new_graph()
    q = leaf(g, "input", "q", ("b", "i", "D"))
    k = leaf(g, "param", "k", ("j", "D", "H"))
    P = leaf(g, "param", "P", ("H", "K"))
    out = g.add("contract", (q, k, P), out=("b", "i", "j"))
    grads = check_vjp(g, out, [q, k, P])
    assert "K" not in g.node(grads[P]).axes  # the broadcast case of the rule


def test_vjp_contract_outer_product_keeps_all_axes():
    """contract with nothing summed (an outer product): du_m = sum over the other's axes."""
    g = new_graph()
    u = leaf(g, "input", "u", ("b", "i"))
    v = leaf(g, "param", "v", ("H",))
    out = g.add("contract", (u, v), out=("b", "i", "H"))
    check_vjp(g, out, [u, v])


BODIES = {
    "polynomial": a0**3 * a1 - a2 / (1 + a0**2) + sympy.Symbol("D") * a1 * a3,
    "transcendental": sympy.tanh(a0) * a1 + sympy.exp(a2 * a0) + sympy.log(1 + a1**2) * a3,
    "erf_sqrt": sympy.erf(a0 / sympy.sqrt(2)) * sympy.sqrt(1 + a1**2) + a3 * a2,
    "energy_functions": sigmoid(a0 * a2) * softplus(a1) + relu(a0) ** 2 * a3,
    # subgradients (energyc.ir.functions.diff): random points are never ties
    "subgradients": (sympy.Abs(a0 - a1) * a3 + sympy.Max(a0, a2) * sympy.Min(a1, a3)
                     + sympy.sign(a0) * a2 + sympy.Heaviside(a1) * a0 ** 2
                     + sympy.Min(sympy.Max(a0 * a3, -1), 1)),
}


@pytest.mark.parametrize("body", list(BODIES), ids=list(BODIES))
def test_vjp_pointwise(body):
    """pointwise: du_m = sum_{axes(out) - axes(u_m)} g * d body / d a_m (args of mixed axes)."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    p = leaf(g, "param", "p", ("D",))
    h = leaf(g, "hyper", "h")
    s = leaf(g, "param", "s", ("H",))
    out = g.add("pointwise", (x, p, h, s), body=BODIES[body])
    assert g.node(out).axes == ("b", "i", "D", "H")
    check_vjp(g, out, [x, p, h, s])


def test_vjp_pointwise_with_upstream_lacking_axes():
    """pointwise under a sum: the upstream grad lacks D and H, so sum_to multiplies by sizes."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    s = leaf(g, "param", "s", ("H",))
    h = leaf(g, "hyper", "h")
    y = ops.pointwise(g, a0 + a1 + 3 * a2, [x, s, h])
    out = ops.reduce(g, y, ["D", "H"])
    check_vjp(g, out, [x, s, h])


@pytest.mark.parametrize("axes", [("D",), ("H",), ("D", "H"), ("b",), ("b", "i", "D", "H")])
def test_vjp_reduce_sum_over_dims(axes):
    """reduce sum over dims: du = g, broadcast over the reduced axes."""
    g = new_graph()
    u = leaf(g, "input", "u", ("b", "i", "D", "H"))
    out = g.add("reduce", (u,), kind="sum", axes=axes, mask=None)
    check_vjp(g, out, [u])


@pytest.mark.parametrize("axis", ["D", "H", "b", "i"])
def test_vjp_reduce_logsumexp_over_dim(axis):
    """reduce logsumexp over one dim: du = g * exp(u - l) (the softmax weights)."""
    g = new_graph()
    u = leaf(g, "input", "u", ("b", "i", "D", "H"))
    out = g.add("reduce", (u,), kind="lse", axes=(axis,), mask=None)
    check_vjp(g, out, [u])


def test_fused_reduce_is_made_after_the_last_differentiation():
    """fuse_reductions is a lowering pass: a fused_reduce is never differentiated, and asking for
    its VJP says so (no op's VJP rule calls back into autodiff)."""
    from energyc.errors import CompileError
    from energyc.passes import STAGE

    assert STAGE["fuse_reductions"] == "lower"
    g = new_graph()
    u = leaf(g, "input", "u", ("b", "i", "j", "H"))
    a0 = ARG_SYMBOLS[0]
    out = g.add("fused_reduce", (u,), kind="sum", axes=("j",), mask=causal(), n_pre=1,
                pre=sympy.tanh(a0), post=a0)
    with pytest.raises(CompileError, match="after the last differentiation"):
        vjp(g, out, g.add("input", name="s", axes=g.node(out).axes), [u])


@pytest.mark.parametrize("kind", ["sum", "lse"])
@pytest.mark.parametrize("mask", [*MASKS, None], ids=[*(m.name for m in MASKS), "none"])
def test_vjp_reduce_over_j_with_context_set(kind, mask):
    """reduce over j in C(i): du = mask_C(g) for sum, mask_C(g * softmax) for logsumexp.

    Under j < i token 0 has an empty context set: its logsumexp is 0 and its gradient 0.
    """
    g = new_graph()
    u = leaf(g, "input", "u", ("b", "i", "j", "H"))
    out = g.add("reduce", (u,), kind=kind, axes=("j",), mask=mask)
    check_vjp(g, out, [u])
    if mask == strict() and kind == "lse":
        env = random_env(g)
        assert not evaluate(g, out, env)[:, 0].any()  # empty set => 0


def test_interpreter_masks_follow_their_definitions():
    """The interpreter's masks: causal j<=i, strict j<i, window i-2<=j<=i, all, not_self j!=i."""
    T = 4
    want = {
        "causal": [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]],
        "strict": [[0, 0, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]],
        "window": [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1]],
        "all": [[1] * 4] * 4,
        "not_self": [[0, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 0]],
    }
    for mask in MASKS:
        assert context_mask(mask, T).int().tolist() == [want[mask.name]], mask


@pytest.mark.parametrize("mask", MASKS, ids=[m.name for m in MASKS])
@pytest.mark.parametrize("axes", [("b", "i", "j", "H"), ("b", "i", "H"), ("b", "j", "H"), ("H",)])
def test_vjp_mask(mask, axes):
    """mask: out = where(j in C(i), u, 0) over (i, j); du = sum of mask(g) over the added axes."""
    g = new_graph()
    u = leaf(g, "input", "u", axes)
    out = g.add("mask", (u,), mask=mask)
    assert {"i", "j"} <= set(g.node(out).axes)
    check_vjp(g, out, [u])


@pytest.mark.parametrize(
    "src, dst", [(("b", "i"), ("b", "i", "D", "H")), (("D",), ("b", "i", "j", "D")), ((), ("i",))]
)
def test_vjp_broadcast(src, dst):
    """broadcast: du = sum of g over the added axes."""
    g = new_graph()
    u = leaf(g, "input", "u", src)
    out = g.add("broadcast", (u,), out=dst)
    check_vjp(g, out, [u])


def test_vjp_relabel():
    """relabel i->j: the same tensor in the context role; du = relabel_{j->i}(g)."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    out = g.add("relabel", (x,), src="i", dst="j")
    assert g.node(out).axes == ("b", "j", "D")
    grads = check_vjp(g, out, [x])
    assert g.node(grads[x]).axes == ("b", "i", "D")


def test_vjp_relabel_with_upstream_lacking_the_new_axis():
    """relabel i->j then sum over j: the upstream lacks j, so du is g, constant along i."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    xj = g.add("relabel", (x,), src="i", dst="j")
    out = ops.reduce(g, xj, ["j"])
    grads = check_vjp(g, out, [x])
    assert g.node(grads[x]).axes == ("b", "D")


def test_vjp_relabel_back_and_forth():
    """relabel j->i of a j-value: the rule renames the gradient back (j->i then i->j)."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    xj = g.add("relabel", (x,), src="i", dst="j")
    y = ops.pointwise(g, sympy.tanh(a0), [xj])
    out = g.add("relabel", (y,), src="j", dst="i")
    check_vjp(g, out, [x])


@pytest.mark.skipif("rotary" not in ops.OPS, reason="no rotary op in this tree")
@pytest.mark.parametrize("axes", [("b", "i", "F"), ("b", "j", "H", "F")])
@pytest.mark.parametrize("reduced", [False, True], ids=["full", "summed"])
def test_vjp_rotary(axes, reduced):
    """rotary (a position-dependent rotation of feature pairs): du = R_p^T g, also when the
    upstream grad lacks the feature axis (the value is summed over it)."""
    g = Graph(("H", "F"))
    u = leaf(g, "input", "u", axes)
    out = g.add("rotary", (u,), feature="F", base=100.0, inverse=False)
    assert g.node(out).axes == axes
    if reduced:
        out = ops.pointwise(g, sympy.tanh(a0), [ops.reduce(g, out, ["F"])])
    check_vjp(g, out, [u])


@pytest.mark.skipif("rotary" not in ops.OPS, reason="no rotary op in this tree")
def test_rotary_is_a_rotation():
    """rotary preserves the norm of each feature pair, fixes position 0, and inverse undoes it."""
    g = Graph(("F",))
    x = leaf(g, "input", "x", ("b", "i", "F"))
    r = g.add("rotary", (x,), feature="F", base=100.0, inverse=False)
    back = g.add("rotary", (r,), feature="F", base=100.0, inverse=True)
    env = random_env(g)
    rx = evaluate(g, r, env)
    torch.testing.assert_close(rx[:, 0], env["x"][:, 0])
    pair_norm = (rx.unflatten(-1, (2, 2)) ** 2).sum(-1)
    torch.testing.assert_close(pair_norm, (env["x"].unflatten(-1, (2, 2)) ** 2).sum(-1))
    assert not torch.allclose(rx[:, 1:], env["x"][:, 1:])
    torch.testing.assert_close(evaluate(g, back, env), env["x"])


def attention_graph(op: str, mask: Context, bias: bool, terms: int):
    """An attention-family node over leaves: q0 (b,i,H,K) . k0 (b,j,H,K), with ``terms == 2`` a
    second term q1 (b,i,D,H) . k1 (b,j,D) whose key lacks the head axis; a learned scalar scale,
    per-head slopes when ``bias``; v per context token (attention) or per query (transposed)."""
    g = Graph(("D", "H", "K"))
    qs = [leaf(g, "input", "q0", ("b", "i", "H", "K"))]
    ks = [leaf(g, "input", "k0", ("b", "j", "H", "K"))]
    if terms == 2:
        qs.append(leaf(g, "input", "q1", ("b", "i", "D", "H")))
        ks.append(leaf(g, "input", "k1", ("b", "j", "D")))
    token = "i" if op == "attention_transposed" else "j"
    v = leaf(g, "input", "v", ("b", token, "D", "H"))
    s = leaf(g, "hyper", "s")
    extra = [leaf(g, "param", "m", ("H",))] if bias else []
    attrs = dict(mask=mask, features=("K", "D")[:terms], heads=("H",), bias=bias)
    if op == "attention_transposed":
        lse = g.add("attention_lse", (*qs, *ks, s, *extra), **attrs)
        extra = [*extra, lse]
    out = g.add(op, (*qs, *ks, v, s, *extra), **attrs)
    return g, out, [*qs, *ks, v, s] + ([] if not bias else [extra[0]])


@pytest.mark.skipif("attention" not in ops.OPS, reason="no fused attention op in this tree")
@pytest.mark.parametrize("op", ["attention", "attention_transposed"])
@pytest.mark.parametrize("mask,bias,terms", [(causal(), False, 1), (all_tokens(), True, 1),
                                             (window(2), True, 2), (not_self(), False, 2)],
                         ids=str)
def test_vjp_attention(op, mask, bias, terms):
    """The attention ops (fused softmax-weighted context sums, query and key role): their VJP
    (attention, attention_lse and attention_grad nodes) equals autograd on their definitions,
    for every operand: score terms, shared (head-less) keys, a learned scale and slopes."""
    g, out, leaves = attention_graph(op, mask, bias, terms)
    assert g.node(out).axes == ("b", "j" if op == "attention_transposed" else "i", "D", "H")
    grads = check_vjp(g, out, leaves)
    assert {g.node(grads[w]).op for w in leaves[:2 * terms]} == {"attention_grad"}


def attention_energy(g: Graph, mask: Context, joint: bool):
    """E_bi = -(1/beta) sum_H log sum_{j in C(i)} exp(beta q_biH . k_bjH), with offsets too."""
    x = leaf(g, "input", "x", ("b", "i", "D"))
    xbar = x if joint else leaf(g, "input", "xbar", ("b", "i", "D"))
    Wq = leaf(g, "param", "W_q", ("H", "K", "D"))
    Wk = leaf(g, "param", "W_k", ("H", "K", "D"))
    slopes = leaf(g, "param", "slopes", ("H",))
    beta = leaf(g, "hyper", "beta")
    q = ops.contract(g, [Wq, x], ("b", "i", "H", "K"))
    k = ops.contract(g, [Wk, g.add("relabel", (xbar,), src="i", dst="j")], ("b", "j", "H", "K"))
    dots = ops.contract(g, [q, k], ("b", "i", "j", "H"))
    scores = ops.pointwise(g, a0 * a1 - a2 * a3, [beta, dots, slopes, g.add("offset")])
    lse = ops.reduce(g, scores, ["j"], kind="lse", mask=mask)
    energy = ops.pointwise(g, -a0 / a1, [ops.reduce(g, lse, ["H"]), beta])
    return energy, x, [x, Wq, Wk, slopes, beta] + ([] if joint else [xbar])


@pytest.mark.parametrize("joint", [False, True], ids=["xbar", "joint"])
@pytest.mark.parametrize("mask", [causal(), strict(), window(2)], ids=str)
def test_vjp_twice_matches_double_backward(mask, joint):
    """vjp applied twice (the compiler's second derivatives) equals autograd's double backward.

    First ``grad = dE/dx`` (seed 1), then the VJP of ``grad`` seeded by ``s`` w.r.t. every leaf:
    ``d/dw sum(s * dE/dx)``.
    """
    g = new_graph()
    energy, x, leaves = attention_energy(g, mask, joint)
    grad = vjp(g, energy, ops.const(g, 1), [x])[x]
    g.verify()
    # first order against autograd
    env = random_env(g, seed=1)
    tracked = {name: v.clone().requires_grad_(True) for name, v in env.items()}
    e = evaluate(g, energy, tracked)
    (want,) = torch.autograd.grad(e.sum(), [tracked["x"]], create_graph=True)
    got = expand_to(evaluate(g, grad, env), g.node(grad).axes, ("b", "i", "D"))
    torch.testing.assert_close(got, want.detach(), rtol=1e-9, atol=1e-10)
    # second order: check_vjp compares the VJP of grad against autograd on the graph of grad
    if g.node(grad).axes != ("b", "i", "D"):
        grad = g.add("broadcast", (grad,), out=("b", "i", "D"))
    check_vjp(g, grad, leaves, seed=2)


# -- shape rules -----------------------------------------------------------------------------------


def test_shape_rules_give_canonical_axes():
    """Each op's output axes follow its rule and the canonical order (b, i, j, *dims)."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    W = leaf(g, "param", "W", ("H", "D"))
    assert g.node(g.add("contract", (x, W), out=("H", "i", "b"))).axes == ("b", "i", "H")
    assert g.node(g.add("pointwise", (W, x), body=a0 * a1)).axes == ("b", "i", "D", "H")
    assert g.node(g.add("mask", (W,), mask=causal())).axes == ("i", "j", "D", "H")
    assert g.node(g.add("broadcast", (W,), out=("H", "j", "D"))).axes == ("j", "D", "H")
    assert g.node(g.add("relabel", (x,), src="i", dst="j")).axes == ("b", "j", "D")
    assert g.node(g.add("reduce", (x,), kind="sum", axes=("D",), mask=None)).axes == ("b", "i")
    assert g.node(g.add("offset")).axes == ("i", "j")
    assert g.node(g.add("position", token="j")).axes == ("j",)
    assert g.node(ops.const(g, 2)).axes == ()
    g.verify()


def test_shape_rules_reject_bad_input():
    """Shape rules raise: contract onto absent axes, reduce over a missing axis, a context set on a
    reduction over a dim, logsumexp over two axes, relabel onto an existing axis, broadcast that
    drops axes, and unknown axis names."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    W = leaf(g, "param", "W", ("H", "D"))
    s = leaf(g, "input", "s", ("b", "i", "j", "H"))
    n = len(g)
    with pytest.raises(ValueError, match="not within inputs"):
        g.add("contract", (x, W), out=("b", "i", "K"))
    with pytest.raises(ValueError, match="reduce over"):
        g.add("reduce", (x,), kind="sum", axes=("H",), mask=None)
    with pytest.raises(ValueError, match="lacks"):
        ops.reduce(g, x, ["H"])
    with pytest.raises(ValueError, match="context set"):
        g.add("reduce", (s,), kind="sum", axes=("H",), mask=causal())
    with pytest.raises(ValueError, match="context set"):
        g.add("reduce", (s,), kind="lse", axes=("i", "j"), mask=causal())
    with pytest.raises(ValueError, match="one axis"):
        g.add("reduce", (s,), kind="lse", axes=("j", "H"), mask=None)
    with pytest.raises(ValueError, match="relabel"):
        g.add("relabel", (s,), src="i", dst="j")
    with pytest.raises(ValueError, match="drop"):
        g.add("broadcast", (x,), out=("b", "i"))
    with pytest.raises(ValueError, match="unknown axes"):
        g.canonical(("b", "Q"))
    with pytest.raises(ValueError, match="unknown axes"):
        g.add("broadcast", (x,), out=("b", "i", "D", "Q"))
    assert len(g) == n  # nothing was added by a failed add
    g.verify()


@pytest.mark.parametrize("mask", [m for m in MASKS if m != all_tokens()], ids=str)
def test_masked_reduction_of_value_without_i_keeps_i(mask):
    """sum_{j in C(i)} k_j depends on i: the reduce must keep axis i (or refuse the value)."""
    g = new_graph()
    k = leaf(g, "input", "k", ("b", "j", "H"))
    try:
        out = g.add("reduce", (k,), kind="sum", axes=("j",), mask=mask)
    except ValueError:
        return  # refusing the value is an acceptable fix too
    assert "i" in g.node(out).axes


def test_verify_passes_and_catches_a_broken_graph():
    """Graph.verify accepts the graphs built here, and rejects a node whose axes break its rule
    and a leaf declared with axes out of canonical order."""
    g = new_graph()
    energy, x, _ = attention_energy(g, causal(), joint=True)
    vjp(g, energy, ops.const(g, 1), [x])
    g.verify()
    bad = g.node(energy)
    g.nx.nodes[energy]["node"] = type(bad)(bad.op, bad.inputs, ("b",), bad.attrs)
    with pytest.raises(AssertionError, match="axes"):
        g.verify()
    g2 = new_graph()
    g2.add("param", name="W", axes=("H", "D"))  # leaves take their axes as given
    with pytest.raises(AssertionError, match="not canonical"):
        g2.verify()


# -- hash-consing and builders ---------------------------------------------------------------------


def test_hash_consing_returns_the_same_id():
    """Adding a node equal to an existing one (op, inputs, attrs; not ``where``) returns its id."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    assert leaf(g, "input", "x", ("b", "i", "D")) == x
    y = g.add("pointwise", (x,), body=sympy.exp(a0), where="a.py:1")
    n = len(g)
    assert g.add("pointwise", (x,), body=sympy.exp(a0), where="b.py:2") == y
    assert ops.const(g, 2) == ops.const(g, 2)
    assert len(g) == n + 1  # only the const was new
    assert g.add("pointwise", (x,), body=sympy.exp(2 * a0)) != y  # other attrs: a new node
    assert g.add("relabel", (x,), src="i", dst="j") == g.add("relabel", (x,), dst="j", src="i")
    g.verify()


def test_builders_normalise():
    """pointwise folds constants and merges repeated args; contract turns constants into a scale;
    sum_to multiplies by the size of axes the gradient lacks; add_all of one term is that term."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    two = ops.const(g, 2)
    y = ops.pointwise(g, a0 * a1 * a2, [two, x, x])
    assert g.node(y).attr("body") == 2 * a0**2 and g.node(y).inputs == (x,)
    assert ops.pointwise(g, a0, [x]) == x
    assert g.node(ops.pointwise(g, a0 + a1, [two, two])).op == "const"
    W = leaf(g, "param", "W", ("H", "D"))
    c = ops.contract(g, [two, x, W], ("b", "i", "H"))
    assert g.node(c).op == "pointwise" and g.node(g.node(c).inputs[0]).op == "contract"
    assert g.node(ops.contract(g, [x], ("b", "i"))).op == "reduce"
    s = ops.sum_to(g, x, ("b", "i", "D", "H"), ("D",))
    env = random_env(g)
    torch.testing.assert_close(evaluate(g, s, env), env["x"].sum((0, 1)) * SIZES["H"])
    assert ops.add_all(g, [x]) == x
    g.verify()


def test_undefined_function_is_a_compile_error():
    """Differentiating a body with an undefined SymPy function raises CompileError that points to
    energyc.elementwise."""
    g = new_graph()
    x = leaf(g, "input", "x", ("b", "i", "D"))
    f = sympy.Function("f")
    y = ops.pointwise(g, f(a0) * 2, [x], where="energy.py:7")
    s = g.add("input", name="seed", axes=g.node(y).axes)
    with pytest.raises(CompileError, match="elementwise") as info:
        vjp(g, y, s, [x])
    assert info.value.where == "energy.py:7"
    assert "f" in info.value.message
    # a composite argument (SymPy then returns a Subs of a Derivative) is caught too
    z = ops.pointwise(g, f(a0 * a1), [x, leaf(g, "param", "p", ("D",))])
    s2 = g.add("input", name="seed2", axes=g.node(z).axes)
    with pytest.raises(CompileError, match="elementwise"):
        vjp(g, z, s2, [x])


def test_product_identities_of_relu_and_step_keep_values():
    """functions.PRODUCT_IDENTITIES: relu(u) step(u) = relu(u) and step(u)**n = step(u), at
    negative, zero and positive u (step(0) = 0 = relu(0))."""
    from energyc.ir.functions import relu, simplify_functions, step

    u, a = sympy.symbols("u a")
    body = relu(u) * step(u) ** 2 * a
    simple = simplify_functions(body)
    assert simple == relu(u) * a
    assert step(u) ** 3 == step(u)

    def value(expr, at):
        defined = expr.replace(lambda e: isinstance(e, (relu, step)),
                               lambda e: type(e).definition(e.args[0]))
        return float(defined.subs({u: at, a: 3.0}))

    unsimplified = relu(u) * sympy.Piecewise((1, u > 0), (0, True)) ** 2 * a  # as defined
    for at in (-1.5, 0.0, 2.0):
        assert value(simple, at) == value(unsimplified, at)
