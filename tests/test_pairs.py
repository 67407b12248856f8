"""Pair reductions: the op family's VJP rules, the fuse_pair_reductions pass on every form, the
block-sparse torch kernels, and the report of what stays materialised.

VJP rules are checked against torch.autograd of a materialising interpreter of the ops (the
pair ops' reference evaluation, ``energyc/ir/evaluate.py``), to first and second order; the pass
on each form by structure (no (tokens x tokens) value left in the step graph) and by value (the
layer against autograd double backward of the declared energy, ``energyc.check``).
"""

from __future__ import annotations

import textwrap

import pytest
import sympy
import torch

from energyc.check import CHECKS, import_generated, run_check
from energyc.compiler import _energy_subgraph, compile_file
from energyc.context import all_tokens, causal, not_self, strict, window
from energyc.ir import pairs
from energyc.ir.functions import softplus
from energyc.ir.pairs import DIST, PairForm, e, u
from energyc.loader import load
from energyc.passes import run_pipeline
from energyc.passes.pairs import fuse_pair_reductions, unfused_reductions
from energyc.runtime import pairs as kernels
from energyc.tolerances import tolerance
from tests.test_ops import check_vjp, leaf, new_graph
from tests.test_passes import assert_same_outputs

# -- the op family's VJP rules, on random bodies --------------------------------------------------

# phi over u0 (q0 . k0 over K), u1 (q1 . k1 over D), d = i - j, e0 (row), e1 (column), e2 (per head)
BODIES = {
    "softcap": 2 * sympy.tanh(u(0) / 2),
    "polynomial": u(0) ** 2 / 4 + u(1) * e(2),
    "softplus_row_col": softplus(u(0) + e(0) - e(1)),
    "distance": u(0) * sympy.exp(-e(2) * DIST ** 2 / 8) + sympy.sin(u(1)),
    "no_terms": e(0) * e(1) + sympy.tanh(e(2) * DIST),
}
MASKS = [causal(), strict(), window(2), not_self(), all_tokens()]


def _form(g, grouped: bool = False) -> PairForm:
    """Operands of both terms and the three kinds of extras; ``grouped``: a second head axis D
    that the keys and the per-head extra lack."""
    heads = ("D", "H") if grouped else ("H",)
    q0 = leaf(g, "input", "q0", ("b", "i", *heads, "K"))
    k0 = leaf(g, "input", "k0", ("b", "j", "H", "K"))
    q1 = leaf(g, "input", "q1", ("b", "i", "H", "F") if grouped else ("b", "i", "H", "D"))
    k1 = leaf(g, "input", "k1", ("b", "j", "F") if grouped else ("b", "j", "D"))
    row = leaf(g, "input", "row", ("b", "i", *heads))
    col = leaf(g, "input", "col", ("b", "j"))
    per_head = leaf(g, "param", "theta", ("H",))
    features = ["K", "F" if grouped else "D"]
    return PairForm([q0, q1], [k0, k1], features, [row, col, per_head], heads, causal())


def _graph(grouped: bool = False):
    from energyc.ir.graph import Graph

    return Graph(("D", "H", "K", "F")) if grouped else new_graph()


def _leaves(g, form: PairForm) -> list[int]:
    return [*form.q, *form.k, *form.extras]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize("name", sorted(BODIES))
def test_pair_lse_vjp_matches_autograd_to_second_order(name, mask):
    """d pair_lse equals autograd, and so does the VJP of each of its gradients (pair sums)."""
    g = new_graph()
    form = _form(g)
    form.mask = mask
    body = BODIES[name]
    form, body = pairs._prune(g, form, body)
    out = g.add("pair_lse", form.inputs(), body=body, **form.attrs())
    grads = check_vjp(g, out, _leaves(g, form), seed=1)
    for k, grad in enumerate(v for v in grads.values() if v is not None):
        check_vjp(g, grad, _leaves(g, form), seed=2, seed_name=f"seed{k}")


@pytest.mark.parametrize("with_value", [True, False], ids=["value", "no_value"])
@pytest.mark.parametrize("token", ["i", "j"])
@pytest.mark.parametrize("name", sorted(BODIES))
def test_pair_sum_vjp_matches_autograd(name, token, with_value):
    g = new_graph()
    form = _form(g)
    form.mask = window(2) if token == "j" else causal()
    other = "j" if token == "i" else "i"
    value = leaf(g, "input", "v", ("b", other, "H", "K")) if with_value else None
    out = pairs.make_pair_sum(g, form, BODIES[name], token, value)
    wrt = _leaves(g, form) + ([value] if with_value else [])
    check_vjp(g, out, wrt, seed=3)


def test_pair_ops_with_grouped_heads_match_autograd():
    """Two head axes, keys and a per-head value lacking one of them (grouped keys)."""
    g = _graph(grouped=True)
    form = _form(g, grouped=True)
    body = 2 * sympy.tanh(u(0) / 2) + u(1) * e(2) + e(0)
    out = g.add("pair_lse", form.inputs(), body=body, **form.attrs())
    grads = check_vjp(g, out, _leaves(g, form), seed=4)
    check_vjp(g, grads[form.q[0]], _leaves(g, form), seed=5, seed_name="seed_q")
    check_vjp(g, grads[form.k[0]], _leaves(g, form), seed=6, seed_name="seed_k")


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize("token", ["i", "j"])
def test_running_sum_vjp_matches_autograd(token, mask):
    g = new_graph()
    other = "j" if token == "i" else "i"
    v = leaf(g, "input", "v", ("b", other, "K"))
    out = g.add("running_sum", (v,), mask=mask, token=token)
    check_vjp(g, out, [v], seed=6)


def test_a_sum_of_one_token_is_a_running_sum():
    """sum_{j <= i} r_i c_j v_j needs no pairs: make_pair_sum gives a running sum."""
    g = new_graph()
    form = _form(g)
    v = leaf(g, "input", "v", ("b", "j", "H", "K"))
    out = pairs.make_pair_sum(g, form, e(0) * sympy.exp(e(1)), "i", v)
    ops = {g.node(n).op for n in g.ancestors([out])}
    assert "running_sum" in ops and "pair_sum" not in ops
    check_vjp(g, out, [form.extras[0], form.extras[1], v], seed=7)


def test_softmax_normaliser_gradient_folds_into_a_row_dot():
    """dA/dR = -A for the softmax weights: the VJP of the queries-major sum gives dR as
    -G . o (one product per row), not another pass over the pairs."""
    g = new_graph()
    form = _form(g)
    phi = 2 * sympy.tanh(u(0) / 2)
    form, phi = pairs._prune(g, form, phi)
    lse = g.add("pair_lse", form.inputs(), body=phi, **form.attrs())
    seed = g.add("input", name="s", axes=g.node(lse).axes)
    dq = pairs.PairLse.vjp(g, lse, g.node(lse), seed)[0][1]
    sums = [n for n in g.ancestors([dq]) if g.node(n).op == "pair_sum"]
    (ps,) = sums
    G = g.add("input", name="G", axes=g.node(ps).axes)
    grads = dict(pairs.PairSum.vjp(g, ps, g.node(ps), G))
    r_pos = len(g.node(ps).inputs) - 2  # R is the extra after the form's own
    assert g.node(ps).inputs[r_pos] == lse
    made = {n for n in g.ancestors([grads[r_pos]]) if g.node(n).op == "pair_sum"} - {ps}
    assert made == set()  # only the sum's own output o, no new pass over the pairs


# -- the pass on every form ------------------------------------------------------------------------

HEADER = "from energyc.dsl import *\n"
FORMS = {
    "non_linear_scores": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
        E = -logsumexp(apply(lambda s: 3 * tanh(s / 3), dot(W_q @ x[i], W_k @ xbar[j], over=K)),
                       over=j <= i).sum(H)
        layer("f", E, eta=0.5)
    """,
    "sum_reduction": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); bias = param("bias", (H,))
        E = -sum_over(softplus(dot(W_q @ x[i], W_k @ xbar[j], over=K) + bias), j < i).sum(H)
        layer("f", E, eta=0.5)
    """,
    "several_contractions": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
        s = dot(W_q @ x[i], W_k @ xbar[j], over=K); c = dot(x[i], xbar[j], over=D)
        E = -logsumexp(s * s / 8 + 0.5 * c, over=window(3)).sum(H)
        layer("f", E, eta=0.5)
    """,
    # a learned per-head value inside non-linear scores (linear scores with a per-head scale
    # become attention: fold_score_scales)
    "per_head_theta": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D)); t = param("t", (H,))
        beta = exp(t)
        s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
        E = -(logsumexp(beta * tanh(s / beta), over=j <= i) / beta).sum(H)
        layer("f", E, eta=0.5)
    """,
    "grouped_heads": """
        D, G, R, K = dims("D G R K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (G, R, K, D)); W_k = param("W_k", (G, K, D))
        E = -logsumexp(dot(W_q @ x[i], W_k @ xbar[j], over=K) - 0.1 * (i - j), over=j <= i).sum(G, R)
        layer("f", E, eta=0.5)
    """,
    "two_context_sets": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
        s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
        E = -(logsumexp(tanh(s), over=window(2)) + sum_over(sigmoid(s), all_tokens())).sum(H)
        layer("f", E, eta=0.5)
    """,
    "key_role": """
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
        E = -logsumexp(2 * tanh(dot(W_q @ x[i], W_k @ x[j], over=K) / 2), over=j != i).sum(H)
        layer("f", E, eta=0.2, joint=True)
    """,
    "running_sum": """
        D, M = dims("D M"); i, j = tokens(); x, xbar = state(D)
        W = param("W", (M, D)); V = param("V", (M, D))
        E = -(tanh(W @ x[i]) * sum_over(sigmoid(V @ xbar[j]), window(3))).sum(M)
        layer("f", E, eta=0.5)
    """,
}


def _energy_file(tmp_path, name: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + textwrap.dedent(FORMS[name]))
    return str(path)


def _pair_valued(graph) -> list[str]:
    return [graph.describe(n) for n in graph.live() if {"i", "j"} <= set(graph.node(n).axes)]


@pytest.mark.parametrize("name", sorted(FORMS))
def test_fuse_pair_reductions_structure(tmp_path, name):
    """Every form fuses: no value over (i, j) in the energy or the step graph (forward and
    second-order backward), and pair ops (or a running sum) in their place."""
    (layer,) = compile_file(load(_energy_file(tmp_path, name)))
    assert _pair_valued(layer.step) == []
    assert _pair_valued(layer.energy) == []
    ops = set(layer.step.op_counts())
    assert ops & {"pair_lse", "pair_sum", "running_sum"}


@pytest.mark.parametrize("name", sorted(FORMS))
def test_fuse_pair_reductions_keeps_values(tmp_path, name):
    """The pass leaves the energy's value as it was (before and after, on random inputs)."""
    (layer,) = compile_file(load(_energy_file(tmp_path, name)))
    g, out = _energy_subgraph(layer.decl)
    g.outputs = {"energy": out}
    from tests.test_ops import SIZES

    sizes = dict(SIZES, **{d: 3 for d in g.dims if d not in SIZES})
    assert_same_outputs(g, fuse_pair_reductions(g), sizes=sizes)


@pytest.mark.parametrize("name", sorted(FORMS))
def test_fused_forms_agree_with_autograd(tmp_path, name):
    """The generated layer of each form against autograd (double backward) of the energy."""
    (layer,) = compile_file(load(_energy_file(tmp_path, name)))
    module = import_generated(layer)
    for check in CHECKS:
        result = run_check(layer, module, check, 4)
        assert not result.error, f"{check}: {result.error}"


def test_unfusable_reduction_is_reported_with_file_and_line(tmp_path, capsys):
    """A reduction over j that is not of the pair form compiles, is correct, and is named."""
    path = tmp_path / "bad.py"
    path.write_text(HEADER + textwrap.dedent("""
        D, H, K = dims("D H K"); i, j = tokens(); x, xbar = state(D)
        W_q = param("W_q", (H, K, D)); W_k = param("W_k", (H, K, D))
        s = dot(W_q @ x[i], W_k @ xbar[j], over=K)
        E = -logsumexp(tanh(s) * tanh(s.sum(H)), over=j <= i).sum(H)
        layer("f", E, eta=0.5)
    """))
    (layer,) = compile_file(load(str(path)))
    g, out = _energy_subgraph(layer.decl)
    g.outputs = {"energy": out}
    found = unfused_reductions(g)
    assert len(found) == 1
    where, reason = found[0]
    assert where.startswith(f"{path}:") and "contraction" in reason
    module = import_generated(layer)
    assert not run_check(layer, module, "backward", 3).error
    from energyc.cli import main

    assert main(["compile", str(path), "-o", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert f"energyc: note: {path}:6: the reduction over j stays materialised" in err
    # --quiet prints nothing on success, the notes included
    assert main(["compile", str(path), "-o", str(tmp_path / "quiet"), "--quiet"]) == 0
    assert capsys.readouterr() == ("", "")
    assert (tmp_path / "quiet" / "f" / "layer.py").exists()
    assert main(["inspect", str(path)]) == 0
    assert f"note: {path}:6:" in capsys.readouterr().out


def test_fusable_energies_get_no_note(tmp_path, capsys):
    from energyc.cli import main

    assert main(["compile", _energy_file(tmp_path, "key_role"), "-o", str(tmp_path / "o")]) == 0
    assert "note:" not in capsys.readouterr().err


def test_pipeline_keeps_values_with_pair_ops(tmp_path):
    """run_pipeline on a step graph with pair ops keeps every output."""
    (layer,) = compile_file(load(_energy_file(tmp_path, "several_contractions")))
    assert_same_outputs(layer.step, run_pipeline(layer.step, verify=True),
                        sizes={"b": 2, "i": 5, "j": 5, "D": 3, "H": 2, "K": 4})


# -- the torch kernels ------------------------------------------------------------------------------


def _naive_pairs(T, mask):
    from tests.test_ops import context_mask

    return context_mask(mask, T)[0]  # (i, j): a set without the call's data, one for all rows


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_kernels_match_the_materialised_sums(monkeypatch, mask, dtype):
    """pair_lse and pair_sums with ragged, non-square tiles (4 queries x 3 keys, 11 tokens)
    against the (T, T) forms in float64 of the same (rounded) inputs."""
    monkeypatch.setattr(kernels, "BLOCK_Q", 4)
    monkeypatch.setattr(kernels, "BLOCK_K", 3)
    torch.manual_seed(0)
    B, H, T, F, G = 2, 3, 11, 5, 4

    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    q, k = draw(B, H, T, F), draw(1, H, T, F)  # k: a broadcast batch axis
    row, v = draw(B, 1, T, 1), draw(B, H, T, G)
    m = _naive_pairs(T, mask)
    d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(torch.float64)
    qk = q.double() @ k.double().transpose(-1, -2)
    S = 2 * torch.tanh(qk / 2) - 0.1 * d + row.double()
    ref_R = torch.where(m.any(-1), torch.logsumexp(S.masked_fill(~m, -torch.inf), -1), 0.0)

    def phi(u_, d_, e_):
        return 2 * torch.tanh(u_[0] / 2) - 0.1 * d_ + e_[0]

    kw = dict(T=T, shape=(B, H), uses_offset=True, dtype=dtype, device=q.device)
    rtol, atol = tolerance(dtype)
    R = kernels.pair_lse([q], [k], [row], phi, mask, **kw)
    assert R.dtype == dtype
    torch.testing.assert_close(R.double(), ref_R, rtol=rtol, atol=atol)

    def weights(u_, d_, e_):
        p = torch.exp(phi(u_, d_, e_) - e_[1])
        return p, p * u_[0], p

    R_in = ref_R[..., None].to(dtype)
    outs = kernels.pair_sums([q], [k], [row, R_in], weights,
                             [("i", v, 0), ("j", v, 1), ("i", None, 2)], mask, **kw)
    A = torch.where(m, torch.exp(S - R_in.double()), 0.0)
    expected = [A @ v.double(), (A * qk).transpose(-1, -2) @ v.double(), A.sum(-1)]
    for got, want in zip(outs, expected):
        scale = float(want.abs().max())  # sums of many terms: the error scales with their size
        torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * max(1.0, scale))


def test_kernels_skip_blocks_outside_the_context_set():
    """Causal tiles stop at the diagonal; a window's tiles reach only its w keys."""
    T, block = 1024, 256
    causal_tiles = list(kernels.pair_tiles(T, causal(), block, block))
    assert len(causal_tiles) == 4 * 5 // 2
    window_tiles = list(kernels.pair_tiles(T, window(8), block, block))
    assert len(window_tiles) == 4 + 3  # the diagonal block and a sliver of the one before
    assert sum(1 for t in causal_tiles if t[4]) == 4  # only the diagonal tiles are masked
    everything = list(kernels.pair_tiles(T, all_tokens(), block, block))
    assert len(everything) == 16 and not any(t[4] for t in everything)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize("keys_major", [False, True])
def test_running_sum_kernel(mask, keys_major):
    torch.manual_seed(1)
    T = 9
    v = torch.randn(2, T, 3, dtype=torch.float64)
    m = _naive_pairs(T, mask).to(torch.float64)  # (i, j)
    m = m.T if keys_major else m
    got = kernels.running_sum(v, 1, mask, keys_major)
    torch.testing.assert_close(got, torch.einsum("ij,bjc->bic", m, v))


@pytest.mark.parametrize("mask", MASKS + [window(0)],
                         ids=lambda m: "_".join(map(str, m.spelling)))
def test_mask_tiles_and_partial_tiles_follow_the_context_set(mask):
    """Every rectangle of queries x keys of 9 tokens: the additive mask tile is 0 exactly on the
    context set's pairs (-inf elsewhere) and the tile is reported partial exactly when some pair is
    outside, against the (T, T) set of the test ops."""
    import itertools

    T = 9
    full = _naive_pairs(T, mask)
    for i0, i1, j0, j1 in itertools.product(range(T), range(1, T + 1), range(T), range(1, T + 1)):
        if i1 <= i0 or j1 <= j0:
            continue
        inside = full[i0:i1, j0:j1]
        tile = kernels.mask_tile(mask, i0, i1, j0, j1, torch.float32, torch.device("cpu"))
        assert torch.equal(tile == 0, inside), (i0, i1, j0, j1)
        assert torch.isneginf(tile[~inside]).all(), (i0, i1, j0, j1)
        assert mask.needs_mask(i0, i1, j0, j1) == bool((~inside).any()), (i0, j0)


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.name)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=lambda d: str(d)[6:])
def test_softmax_sums_in_one_pass_match_the_materialised_sums(monkeypatch, mask, dtype):
    """pair_softmax_sums (R and sums with weights g exp(phi - R), online) with ragged tiles
    (4 queries x 3 keys, 11 tokens; the running max grows across tiles) against the (T, T)
    forms in float64 of the same (rounded) inputs; rows with an empty set give 0."""
    monkeypatch.setattr(kernels, "BLOCK_Q", 4)
    monkeypatch.setattr(kernels, "BLOCK_K", 3)
    torch.manual_seed(2)
    B, H, T, F, G = 2, 3, 11, 5, 4

    def draw(*shape):
        return torch.randn(*shape, dtype=torch.float64).to(dtype)

    q, k, v = draw(B, H, T, F), draw(1, H, T, F), draw(B, H, T, G)
    m = _naive_pairs(T, mask)
    d = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).to(torch.float64)
    qk = 3 * q.double() @ k.double().transpose(-1, -2)  # scores of several units: maxima move
    S = 2 * torch.tanh(qk / 2) + 0.3 * d
    gq = 1 - torch.tanh(qk / 2) ** 2
    ref_R = torch.where(m.any(-1), torch.logsumexp(S.masked_fill(~m, -torch.inf), -1), 0.0)
    P = torch.where(m, torch.exp(S - ref_R[..., None]), 0.0)

    def phi_g(u_, d_, e_):
        c = torch.tanh(3 * u_[0] / 2)
        return 2 * c + 0.3 * d_, 1 - c ** 2, 1

    kw = dict(T=T, shape=(B, H), uses_offset=True, dtype=dtype, device=q.device)
    R, o, s, o1 = kernels.pair_softmax_sums([q], [k], [], phi_g,
                                            [("i", v, 0), ("i", None, 0), ("i", v, 1)],
                                            mask, **kw)
    rtol, atol = tolerance(dtype)
    assert R.dtype == o.dtype == dtype
    torch.testing.assert_close(R.double(), ref_R, rtol=rtol, atol=atol)
    torch.testing.assert_close(o.double(), (P * gq) @ v.double(), rtol=rtol, atol=atol)
    torch.testing.assert_close(s.double(), (P * gq).sum(-1), rtol=rtol, atol=atol)
    torch.testing.assert_close(o1.double(), P @ v.double(), rtol=rtol, atol=atol)


def test_softmax_sums_fuse_into_the_log_sum_exp_pass():
    """softcap attention's forward: R and its softmax-weighted sum come from one pass over the
    tiles (pair_softmax_sums), not a log-sum-exp pass and a sums pass."""
    import inspect

    import generated.softcap_attention.layer as mod

    src = inspect.getsource(mod._grad_forward)
    assert src.count("_rt.pair_softmax_sums(") == 1
    assert "_rt.pair_lse(" not in src and "_rt.pair_sums(" not in src
