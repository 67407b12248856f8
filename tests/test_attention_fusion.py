"""fuse_context_attention: structure (which layers fuse, no token-pair tensors left) and numerics
of both runtime paths (CPU flash kernels and the materialised fallback)."""

import pytest
import torch

from energyc.backends.lowering import split
from energyc.check import import_generated
from energyc.compiler import compile_file
from energyc.loader import load
from energyc.passes import PIPELINE
from energyc.passes.attention import fuse_context_attention
from energyc.passes.cse import rebuild
from tests.conftest import assert_within_tolerance


def step_graph(path):
    return compile_file(load(path))[0].step


ATTENTION_EXAMPLES = ["examples/cem_attention.py", "examples/bidirectional_gelu.py",
                      "examples/energy_transformer.py", "examples/window_alibi.py",
                      "examples/strict_dplr.py", "examples/lm_attention.py",
                      "examples/local_global_attention.py",
                      "examples/grouped_query_attention.py"]


@pytest.mark.parametrize("path,counts", [
    # j <= i, fixed beta: the forward and its VJP's one backward call (dq, dk, dv)
    ("examples/cem_attention.py", {"attention": 1, "attention_grad": 3}),
    ("examples/bidirectional_gelu.py", {"attention": 1, "attention_grad": 3}),
    # joint, j != i: the query role and the key role (transposed, with the saved normaliser);
    # the key role's VJP is one more attention and a backward call (dq, dk)
    ("examples/energy_transformer.py", {"attention": 2, "attention_transposed": 1,
                                        "attention_lse": 1, "attention_grad": 5}),
    # learned beta and an i - j term with learned slopes: gradients for q, k, v, beta, slopes
    ("examples/window_alibi.py", {"attention": 1, "attention_grad": 5}),
    # diagonal-plus-low-rank scores (two terms): two values (x_j and the low-rank keys), each
    # with its backward call (dq and dk of both terms, dv)
    ("examples/strict_dplr.py", {"attention": 2, "attention_grad": 10}),
    # two reductions on different context sets (a window and j <= i), each its own attention
    ("examples/local_global_attention.py", {"attention": 2, "attention_grad": 6}),
    # two head axes (G groups of R query heads sharing keys): flattened into the kernels' one
    ("examples/grouped_query_attention.py", {"attention": 1, "attention_grad": 3}),
])
def test_which_layers_fuse(path, counts):
    found = step_graph(path).op_counts()
    for op, n in counts.items():
        assert found.get(op, 0) == n, (op, found)


@pytest.mark.parametrize("path", ATTENTION_EXAMPLES)
def test_fused_step_has_no_token_pair_values(path):
    """Every attention-type example's step graph (forward and backward) fuses completely: no
    value has both token axes, and nothing saved for the backward has them."""
    for layer in compile_file(load(path)):
        g = layer.step
        assert _pair_values(g) == [], layer.name
        sp = split(g, ["grad"], ["grad_g"])
        assert all(not {"i", "j"} <= set(g.node(n).axes) for n in sp.saved)


def test_pass_is_in_pipeline_and_idempotent():
    assert "fuse_context_attention" in [name for name, _ in PIPELINE]
    g = step_graph("examples/cem_attention.py")
    again = rebuild(fuse_context_attention(g))
    assert again.op_counts() == rebuild(g).op_counts()


def test_unfused_graph_has_the_softmax_weighted_sum():
    """Before the pass, the same layer materialises (b, i, j, H) weights; after, none remain."""
    import energyc.passes as passes
    from energyc.autodiff import vjp
    from energyc.compiler import _energy_subgraph
    from energyc.ir import ops
    from energyc.passes import run_pipeline

    layer = compile_file(load("examples/cem_attention.py"))[0]
    g, e = _energy_subgraph(layer.decl)
    x = next(n for n in g.ids() if g.node(n).op == "input" and g.node(n).attr("name") == "x")
    g.outputs = {"grad": vjp(g, e, ops.const(g, 1), [x])[x]}
    before = run_pipeline.__globals__["PIPELINE"]
    try:
        passes.PIPELINE = [p for p in before  # (the normaliser's pass runs after this one)
                           if p[0] not in ("fuse_context_attention", "fuse_context_lse")]
        unfused = passes.run_pipeline(g, stages=("energy", "simplify"))
    finally:
        passes.PIPELINE = before
    assert any({"i", "j"} <= set(unfused.node(n).axes) for n in unfused.live())
    fused = fuse_context_attention(unfused)
    assert fused.op_counts().get("attention") == 1


@pytest.mark.parametrize("path", ["examples/cem_attention.py", "examples/bidirectional_gelu.py"])
def test_flash_and_fallback_paths_agree(path, monkeypatch):
    layer = compile_file(load(path))[0]
    module = import_generated(layer)
    runtime = module.layer._rt.attention
    kwargs = {d: 4 for d in layer.dims}
    kwargs[layer.state_dim] = 6
    torch.manual_seed(0)
    lay = module.Layer(**kwargs, dtype=torch.float64)
    x = torch.randn(2, 7, 6, dtype=torch.float64, requires_grad=True)
    results = []
    for flash in (True, False):
        monkeypatch.setattr(runtime, "_flash_cpu", lambda q, flash=flash: flash)
        y = lay(x)
        grads = torch.autograd.grad((y * torch.cos(y)).sum(), [x, *lay.parameters()])
        results.append((y.detach(), grads))
    (y1, g1), (y2, g2) = results
    torch.testing.assert_close(y1, y2, rtol=1e-10, atol=1e-12)  # float64, two exact algorithms
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


NO_HEADS = '''"""One head and no head axis: a scalar learned slope, a learned scale, both roles (joint)."""
from energyc.dsl import constant, dims, dot, hyper, layer, logsumexp, param, state, tokens, window

D, K = dims("D K")
i, j = tokens()
x, xbar = state(D)
W_q = param("W_q", (K, D))
W_k = param("W_k", (K, D))
m = param("m", (), init=constant(0.3))
beta = hyper("beta", default=0.5, learnable=True)
E = -logsumexp(beta * dot(W_q @ x[i], W_k @ x[j], over=K) - m * (i - j), over=window(3))
layer("no_heads", E, eta=0.5, joint=True)
'''


@pytest.mark.parametrize("check", ["forward", "backward", "descent"])
def test_energy_without_head_axis_fuses_and_matches_autograd(tmp_path, check):
    """Scores without a head axis (the kernels see one head), a scalar parameter as the slope:
    fused in both roles, and the generated layer agrees with autograd."""
    from energyc.check import run_check

    path = tmp_path / "no_heads.py"
    path.write_text(NO_HEADS)
    layer = compile_file(load(str(path)))[0]
    counts = layer.step.op_counts()
    assert counts.get("attention_transposed") == 1 and counts.get("attention_grad", 0) >= 4
    assert not _pair_values(layer.step)
    result = run_check(layer, import_generated(layer), check, 8)
    assert not result.error and result.examples == 8, result.error


def _compile_text(tmp_path, text, name="energy"):
    """The one layer of an energy file with ``text``."""
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    return compile_file(load(str(path)))[0]


def _pair_values(graph):
    """The live values of ``graph`` over both tokens (described): (tokens x tokens) tensors."""
    return [graph.describe(n) for n in graph.live() if {"i", "j"} <= set(graph.node(n).axes)]


def _assert_on_attention(layer):
    """The step's context reductions all on the attention kernels: no pair op, nothing over
    both tokens."""
    counts = layer.step.op_counts()
    assert "attention" in counts and not [op for op in counts if op.startswith("pair")], counts
    assert not _pair_values(layer.step)


def _assert_agrees_with_autograd(layer, module=None):
    """forward, backward, descent and energy checks of the generated layer, 4 examples each."""
    from energyc.check import run_check

    module = module or import_generated(layer)
    for check in ("forward", "backward", "descent", "energy"):
        result = run_check(layer, module, check, 4)
        assert not result.error and result.examples == 4, (check, result.error)


# -- scales of the scores folded into the queries (fold_score_scales) ----------------------------

FOLDS = {
    # a learned temperature per head, also outside the log-sum-exp
    "per_head": """
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); t = param("t", (H,))
        beta = exp(t) / sqrt(K)
        E = -(logsumexp(beta * dot(W_q @ x[i], W_k @ xbar[j], over=K), over=j <= i) / beta).sum(H)
        layer("f", E, eta=0.5)
    """,
    # a scale per query token (a function of x_i), with a learned ALiBi slope per head
    "per_query": """
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); w = param("w", (D,))
        m = param("m", (H,), init=constant(0.2))
        c = softplus(dot(w, x[i], over=D))
        E = -logsumexp(c * dot(W_q @ x[i], W_k @ xbar[j], over=K) - m * (i - j),
                       over=window(3)).sum(H)
        layer("f", E, eta=0.5)
    """,
    # a scale per key token: it moves into the keys
    "per_key": """
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); w = param("w", (D,))
        c = sigmoid(dot(w, xbar[j], over=D))
        E = -logsumexp(c * dot(W_q @ x[i], W_k @ xbar[j], over=K), over=j <= i).sum(H)
        layer("f", E, eta=0.5)
    """,
    # two terms, each with its own coefficient (per head, scalar), in a joint energy (key role)
    "two_terms_joint": """
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); t = param("t", (H,))
        U = param("U", (H, K, D)); V = param("V", (H, K, D))
        E = -logsumexp(exp(t) * dot(W_q @ x[i], W_k @ x[j], over=K)
                       + 0.5 * dot(U @ x[i], V @ x[j], over=K), over=j != i).sum(H)
        layer("f", E, eta=0.2, joint=True)
    """,
}
FOLD_HEADER = '''from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
'''


def _fold_layer(tmp_path, name):
    import textwrap

    return _compile_text(tmp_path, FOLD_HEADER + textwrap.dedent(FOLDS[name]), name)


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_scales_fold_into_attention(tmp_path, name):
    """Linear scores whose scale is not one scalar run on the attention kernels (no pair ops, no
    value over both tokens) and the generated layer agrees with autograd of the energy."""

    layer = _fold_layer(tmp_path, name)
    counts = layer.step.op_counts()
    assert counts.get("attention", 0) >= 1, counts
    assert not set(counts) & {"pair_lse", "pair_sum", "running_sum"}, counts
    assert not _pair_values(layer.step)
    _assert_agrees_with_autograd(layer)


@pytest.mark.parametrize("name", sorted(FOLDS))
def test_fold_score_scales_keeps_the_energy(tmp_path, name):
    """The pass changes the energy's graph, not its value."""
    from energyc.compiler import _energy_subgraph
    from energyc.passes.attention import fold_score_scales
    from tests.test_ops import SIZES
    from tests.test_passes import assert_same_outputs

    g, out = _energy_subgraph(_fold_layer(tmp_path, name).decl)
    g.outputs = {"energy": out}
    from energyc.inspect import format_graph

    folded = fold_score_scales(g)
    assert format_graph(folded) != format_graph(g)  # something moved
    sizes = dict(SIZES, **{d: 3 for d in g.dims if d not in SIZES})
    assert_same_outputs(g, folded, sizes=sizes)


def test_a_scale_of_both_tokens_stays_with_the_pair_kernels(tmp_path):
    """A coefficient that is a product of a query-token and a key-token value moves nowhere: the
    scores keep it, and the general pair kernels serve them."""
    both_tokens = FOLD_HEADER + '''
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); w = param("w", (D,))
c = sigmoid(dot(w, x[i], over=D)) * sigmoid(dot(w, xbar[j], over=D))
E = -logsumexp(c * dot(W_q @ x[i], W_k @ xbar[j], over=K), over=j <= i).sum(H)
layer("f", E, eta=0.5)
'''
    counts = _compile_text(tmp_path, both_tokens, "both_tokens").step.op_counts()
    assert "attention" not in counts and counts.get("pair_lse", 0) + counts.get("pair_sum", 0)


SHARED_KEY = '''from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); A = param("A", (H, D))
E = -logsumexp(dot(W_q @ x[i], W_k @ KEY[j], over=K) + dot(A * x[i], KEY[j], over=D),
               over=CONTEXT).sum(H)
layer("f", E, eta=0.2, joint=JOINT)
'''


@pytest.mark.parametrize("context,joint,key", [("j != i", True, "x"), ("j <= i", False, "xbar")])
def test_a_key_shared_by_the_heads_fuses(tmp_path, context, joint, key):
    """A score term whose key has no head axis (x_j itself): in the key role its gradient sums
    over the heads as well as the queries, sum_h sum_i P_ijh q_ih, which is the transposed
    attention summed over heads; every region fuses (nothing over both tokens is left) and the
    layer agrees with autograd."""

    layer = _compile_text(tmp_path, SHARED_KEY.replace("CONTEXT", context)
                          .replace("JOINT", str(joint)).replace("KEY", key), "shared_key")
    assert not _pair_values(layer.step)
    _assert_agrees_with_autograd(layer)


GATED = '''from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); w = param("w", (D,))
gate = sigmoid(dot(w, x[i], over=D))
E = -gate * logsumexp(dot(W_q @ x[i], W_k @ xbar[j], over=K) / sqrt(K), over=CONTEXT).sum(H)
layer("f", E, eta=0.5)
'''


@pytest.mark.parametrize("context", ["j <= i", "j < i", "window(3)"])
def test_a_normaliser_used_as_a_value_fuses(tmp_path, context):
    """The log-sum-exp itself is a value of the step (a gate multiplies it, so dE/dx has the
    gate's derivative times it): the step reads it from the attention call (attention_lse)
    instead of materialised scores, and agrees with autograd (the strict set's empty first row
    included); the energy's function keeps the reduction, which autograd can differentiate."""
    from energyc.reference import evaluate_energy

    layer = _compile_text(tmp_path, GATED.replace("CONTEXT", context), "gated")
    assert "attention_lse" in layer.step.op_counts()
    assert not _pair_values(layer.step)
    assert "attention_lse" not in layer.energy.op_counts()
    module = import_generated(layer)
    _assert_agrees_with_autograd(layer, module)
    lay = module.Layer(D=6, H=2, K=3, dtype=torch.float64)
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    params = dict(lay.named_parameters())
    want = evaluate_energy(layer, x, x, params, {})
    x.requires_grad_()
    mine = lay.energy(x, per_token=True)
    torch.testing.assert_close(mine, want, rtol=1e-12, atol=1e-12)
    torch.autograd.grad(mine.sum(), [x, *lay.parameters()])  # differentiable


OF_LSE = '''from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
s = dot(W_q @ x[i], W_k @ KEY[j], over=K) / sqrt(K)
E = -F(logsumexp(s, over=CONTEXT)).sum(H)
layer("f", E, eta=0.5, joint=JOINT)
'''


@pytest.mark.parametrize("f,context,joint", [
    ("softplus", "j < i", False),  # log(1 + sum_j exp(s_ij)), stably: a softmax with a null key
    ("tanh", "window(3)", False),
    ("(lambda L: L * L)", "j <= i", False),
    ("softplus", "j != i", True),
])
def test_a_function_of_the_normaliser_fuses(tmp_path, f, context, joint):
    """E = f(L) for a log-sum-exp L: dE/dx has the weights f'(L_i) P_ij, a factor of token i
    that uses L itself, and the step's VJP more of them (f''(L)): attention calls (with the
    normaliser from attention_lse) and nothing over both tokens, agreeing with autograd. (These
    fell to the fallback before: the attention pass refused weights whose factor used L.)"""
    text = (OF_LSE.replace("F(", f + "(").replace("CONTEXT", context)
            .replace("KEY", "x" if joint else "xbar").replace("JOINT", str(joint)))
    layer = _compile_text(tmp_path, text, "of_lse")
    _assert_on_attention(layer)
    _assert_agrees_with_autograd(layer)

SHARED = '''from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); m = param("m", (H,))
g = param("g", (H,))
s = dot(W_q @ x[i], W_k @ xbar[j], over=K) / sqrt(K)
E = -(sigmoid(g) * logsumexp(FIRST, over=A) + (1 - sigmoid(g)) * logsumexp(SECOND, over=B)).sum(H)
layer("f", E, eta=0.5)
'''


@pytest.mark.parametrize("first,a,second,b", [
    ("s", "window(3)", "s", "j < i"),  # one score tensor, two context sets
    ("s - m * (i - j)", "window(3)", "s", "j < i"),  # a slope on one: a local and a global head
    ("s - m * (i - j)", "j <= i", "s", "j <= i"),  # one context set, scores that share a term
])
def test_two_normalisers_of_shared_scores_fuse(tmp_path, first, a, second, b):
    """Two log-sum-exps over one score tensor (or scores sharing a term): the gradient of the
    shared scores sums both reductions' weights before the product with the key
    (split_context_sums splits it per reduction), and the second reduction's scores build on
    the first's node (the attention pass reads the scores flattened). Each is then an attention
    call, nothing over both tokens, and the layer agrees with autograd. (These fell to the
    fallback before; materialised before that.)"""
    text = (SHARED.replace("FIRST", first).replace("SECOND", second).replace("A)", a + ")")
            .replace("B)", b + ")"))
    layer = _compile_text(tmp_path, text, "shared")
    _assert_on_attention(layer)
    assert layer.step.op_counts()["attention"] == 2
    _assert_agrees_with_autograd(layer)

ADDITIVE = {
    # a learned gate per key inside the softmax: log sigmoid(v . x_j) added to the scores
    "key_gate": ("s - softplus(-dot(v, xbar[j], over=D))", "j <= i"),
    # a Gaussian kernel -|q_i - k_j|^2 / 2, expanded: a term per query, one per key
    "gaussian": ("-(dot(q, q, over=K) - 2 * dot(q, k, over=K) + dot(k, k, over=K)) / 2", "window(3)"),
    # a term per query on the strict set (whose first row is empty: its normaliser stays 0)
    "query_bias": ("s + tanh(dot(v, x[i], over=D)) + 0.5", "j < i"),
}


def _additive_layer(tmp_path, name):
    scores, context = ADDITIVE[name]
    return _compile_text(tmp_path, f"""from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); v = param("v", (H, D))
q = W_q @ x[i]; k = W_k @ xbar[j]
s = dot(q, k, over=K) / sqrt(K)
E = -logsumexp({scores}, over={context}).sum(H)
layer("f", E, eta=0.5)
""", name)


@pytest.mark.parametrize("name", sorted(ADDITIVE))
def test_one_token_score_terms_fold_into_attention(tmp_path, name):
    """Score terms of one token each (a bias per key, per query, a constant) are score terms of
    the unit feature axis, r_i = r_i . 1_j and c_j = 1_i . c_j (fold_score_scales): the
    attention kernels take the scores, with one more feature; nothing over both tokens, and
    the layer agrees with autograd. (On the pair kernels before.)"""
    layer = _additive_layer(tmp_path, name)
    _assert_on_attention(layer)
    assert any("_1" in f for n in layer.step.live() for f in
               (layer.step.node(n).attr("features") or ()) if layer.step.node(n).op == "attention")
    _assert_agrees_with_autograd(layer)


@pytest.mark.parametrize("name", sorted(ADDITIVE))
def test_one_token_score_terms_decode(tmp_path, name):
    """Decoding such a layer (its keys and their unit-axis terms extended by a cache, the ones
    of the query side made for the new tokens alone) gives the forward's outputs."""
    module = import_generated(_additive_layer(tmp_path, name))
    torch.manual_seed(0)
    lay = module.Layer(D=8, H=2, K=4, dtype=torch.float64, context="input")
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    with torch.no_grad():
        first, cache = lay.decode(x[:, :5])
        second, _ = lay.decode(x[:, 5:], cache)
        # float64, the same operations on the same operands but in query blocks: a few ulps
        torch.testing.assert_close(torch.cat([first, second], 1), lay(x), rtol=1e-12, atol=1e-12)

@pytest.mark.parametrize("name", ["key_gate", "query_bias"])
def test_one_token_score_terms_on_the_triton_path(tmp_path, name):
    """The same layers' Triton path (the unit feature concatenated to the kernels' queries and
    keys) against the float64 reference, under the interpreter, float32."""
    from tests.test_triton_layers import check_triton_path

    pytest.importorskip("triton")
    layer = _additive_layer(tmp_path, name)
    check_triton_path(layer, import_generated(layer), torch.float32, "cpu")

FEATURE_SUMS = {
    # a Gaussian kernel as written: -beta/2 |q_i - k_j|^2
    "gaussian": ("-((q - k) ** 2).sum(K) / (2 * sqrt(K))", "j <= i", True),
    # the same as a contraction of the difference with itself
    "gaussian_dot": ("-dot(q - k, q - k, over=K) / (2 * sqrt(K))", "j < i", True),
    # per-feature weights and a constant inside: every monomial kind (|K| times the constant)
    "weighted": ("-(w * (q - k + 1) ** 2).sum(K) / K", "window(3)", True),
    # not a polynomial: stays as it is, and the compiler says so
    "tanh": ("tanh(q * k).sum(K)", "j <= i", False),
}


@pytest.mark.parametrize("name", sorted(FEATURE_SUMS))
def test_feature_sums_of_polynomials_expand_into_contractions(tmp_path, name):
    """A sum over a feature axis of a polynomial in values of one token each becomes
    contractions and one-token terms (expand_feature_sums): a squared distance runs on the
    attention kernels with nothing over both tokens and no note, and agrees with autograd; a
    summand that is not a polynomial stays materialised, with the note."""
    scores, context, fuses = FEATURE_SUMS[name]
    layer = _compile_text(tmp_path, f"""from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); w = param("w", (K,), init=ones())
q = W_q @ x[i]; k = W_k @ xbar[j]
E = -logsumexp({scores}, over={context}).sum(H)
layer("f", E, eta=0.5)
""", name)
    pairs = _pair_values(layer.step)
    if not fuses:
        assert pairs and layer.notes and "stays materialised" in layer.notes[0]
        return
    assert not pairs and not layer.notes and "attention" in layer.step.op_counts()
    _assert_agrees_with_autograd(layer)

LOG_SUMS = {
    # a gate per key inside a hand-written log-sum-exp
    "gated": ("log(sum_over(sigmoid(dot(v, xbar[j], over=D)) * exp(s), j <= i))", True),
    # a softmax with a null key of score 0, on a window
    "null_key": ("log(1 + sum_over(exp(s), window(3)))", True),
    # the strict set's first row is empty (log 0 there): left as written
    "strict": ("log(sum_over(exp(s), j < i))", False),
    # a gate SymPy cannot tell is positive: left as written
    "tanh_gate": ("log(sum_over(tanh(dot(v, xbar[j], over=D)) * exp(s), j <= i))", False),
}


@pytest.mark.parametrize("name", sorted(LOG_SUMS))
def test_log_of_a_sum_of_exponentials_is_a_log_sum_exp(tmp_path, name):
    """log sum_j g exp(s) (g > 0) and log(A + sum_j exp(s)) over a context set with no empty row
    are log-sum-exps (log_sums_as_lse): the attention kernels take them, the layer agrees with
    autograd, and it stays finite in float32 at scores where exp(s) overflows, agreeing with
    float64. Otherwise the sum is left as written (pair kernels)."""
    expr, rewritten = LOG_SUMS[name]
    layer = _compile_text(tmp_path, f"""from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); v = param("v", (H, D))
s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
E = -({expr}).sum(H)
layer("f", E, eta=0.5)
""", name)
    counts = layer.step.op_counts()
    assert ("attention" in counts) == rewritten, counts
    if not rewritten:
        return
    module = import_generated(layer)
    _assert_agrees_with_autograd(layer, module)
    torch.manual_seed(0)
    exact = module.Layer(D=8, H=2, K=4, dtype=torch.float64)
    with torch.no_grad():
        exact.W_q.mul_(30)  # scores of a few hundred: exp overflows float32
    lay = module.Layer(D=8, H=2, K=4, dtype=torch.float32)
    lay.load_state_dict({k: t.float() for k, t in exact.state_dict().items()})
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    want = exact(x)
    got = lay(x.float())
    assert torch.isfinite(got).all()
    assert_within_tolerance("forward", got.double(), want, torch.float32)

GROUPED = '''from energyc.dsl import *
D, G, R, K = dims("D G R K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (G, R, K, D)); W_k = param("W_k", (G, K, D)); t = param("t", (G,))
m = param("m", (G, R), init=constant(0.1))
beta = exp(t) / sqrt(K)
E = -(logsumexp(beta * dot(W_q @ x[i], W_k @ KEY[j], over=K) BIAS, over=CONTEXT) / beta).sum(G, R)
layer("f", E, eta=0.5, joint=JOINT)
'''


@pytest.mark.parametrize("bias,joint", [(False, False), (False, True), (True, False)])
def test_grouped_heads(tmp_path, bias, joint):
    """Scores over two head axes (a temperature per group): the attention kernels take them,
    the heads flattened into one, keys expanded over the R heads of their group, the gradients
    of what a head axis lacks summed over it; with slopes over the two head axes the pair
    kernels do. Nothing over both tokens either way, and the layer agrees with autograd."""

    text = (GROUPED.replace("BIAS", "- m * (i - j)" if bias else "")
            .replace("KEY", "x" if joint else "xbar").replace("JOINT", str(joint))
            .replace("CONTEXT", "j != i" if joint else "j <= i"))
    layer = _compile_text(tmp_path, text, "grouped")
    counts = layer.step.op_counts()
    assert ("attention" in counts) == (not bias), counts
    assert not _pair_values(layer.step)
    _assert_agrees_with_autograd(layer)


def test_a_log_sum_exp_left_to_attention_is_taken_or_the_compiler_says_so(monkeypatch):
    """The pair pass leaves a log-sum-exp to the attention pass on the one decision of
    attention.attention_scores, and the attention pass takes every softmax-weighted sum of it
    after differentiation: a weight of it left over (simulated by an attention pass that
    matches nothing) is a compile error naming the log-sum-exp's line, never a step with
    (tokens x tokens) values or a second build."""
    from energyc.compiler import _energy_subgraph
    from energyc.errors import CompileError
    from energyc.passes import attention, run_pipeline

    energy, e = _energy_subgraph(compile_file(load("examples/window_alibi.py"))[0].decl)
    energy.outputs = {"energy": e}
    energy = run_pipeline(energy, stages=("energy",))
    left = [n for n in energy.live() if attention.left_to_attention(energy, n)]
    assert len(left) == 1 and attention.attention_scores(energy, left[0]) is not None
    monkeypatch.setattr(attention, "_match", lambda graph, n: None)
    with pytest.raises(CompileError, match="did not fuse into attention") as err:
        compile_file(load("examples/window_alibi.py"))
    assert err.value.where == energy.node(left[0]).where
    assert "window_alibi.py:" in str(err.value.where)


LEARNED_READ = '''from energyc.dsl import *
D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); m = param("m", (H,))
t = param("t", ()); w = param("w", (D,))
beta = hyper("beta", default=0.5, learnable=True)
gate = sigmoid(dot(w, x[i], over=D))
L = logsumexp(SCALE * dot(W_q @ x[i], W_k @ KEY[j], over=K) SLOPE, over=CONTEXT)
E = -(F).sum(H)
layer("f", E, eta=0.5, joint=JOINT)
'''


@pytest.mark.parametrize("f,scale,slope,context,joint", [
    ("softplus(L)", "beta", "", "window(3)", False),  # a learned scale
    ("gate * L", "1 / sqrt(K)", "- m * (i - j)", "j != i", True),  # learned slopes, joint
    ("L * L", "exp(t)", "", "j < i", False),  # a scalar parameter's scale
])
def test_a_normaliser_read_by_the_step_with_a_learned_scale_takes_the_pair_kernels(
        tmp_path, f, scale, slope, context, joint):
    """The step reads L (f(L), a gate of token i times L) and the scores' scale or slopes are
    learned: the step's VJP has dL/ds = sum_j P_ij q_i . k_j or dL/dm = sum_j P_ij (i - j),
    which no attention call computes. The one decision (attention.for_attention) gives such a
    log-sum-exp to the pair kernels on the energy, though its scores are the attention
    kernels' (attention_scores): linear memory, the step built once, and the layer agrees with
    autograd. (These needed a second build of the step before.)"""
    from energyc.compiler import _energy_subgraph
    from energyc.passes import attention

    text = (LEARNED_READ.replace("F", f).replace("SCALE", scale).replace("SLOPE", slope)
            .replace("CONTEXT", context).replace("KEY", "x" if joint else "xbar")
            .replace("JOINT", str(joint)))
    layer = _compile_text(tmp_path, text, "learned_read")
    energy, e = _energy_subgraph(layer.decl)
    energy.outputs = {"energy": e}
    (L,) = [n for n in energy.live() if energy.node(n).op == "reduce"
            and energy.node(n).attr("kind") == "lse"]
    assert attention.attention_scores(energy, L) is not None
    assert attention.for_attention(energy) == set()
    counts = layer.step.op_counts()
    assert "pair_lse" in counts and "attention" not in counts, counts
    assert not _pair_values(layer.step) and layer.notes == []
    _assert_agrees_with_autograd(layer)
